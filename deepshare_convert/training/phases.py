"""The three DeepShare phases (paper Alg. 1, Supp. B) as loop hooks.

* ``gelu``     -- every gate is Phi(gamma*x): gradients reach the prototypes.
* ``switch``   -- channels move from the GELU gate to the step gate progressively:
                  within every site from the last channel backwards (prototypes,
                  the first P channels, switch last); replicates switch on their
                  own schedule, independent of their prototype.  At the end every
                  gate is a step.
* ``finetune`` -- step gates only (or straight-through step gates, ``gate: ste``).
* ``progressive`` -- progressive sharing from the intact network: every site
                  starts as the original ReLU (blend t = 0) and each channel's t
                  rises to 1 (the shared gate) on a schedule; at the end of the
                  phase every t is 1 and the census equals the plan.  Leader
                  prototypes are shared from the start (their shared gate *is*
                  their own DReLU).  Order: ``together`` (all channels ramp at
                  once) or ``distortion`` (least distorted channels first,
                  measured on calibration images at the start of the phase).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..conversion.gates import PrototypeGate, SharedGate, set_gate_mode
from ..conversion.rewrite import GATES_ATTR, SITES_ATTR
from .engine import PhaseHooks

__all__ = ["GeluPhase", "SwitchPhase", "StepPhase", "ProgressivePhase", "hooks_for", "switched_count",
           "apply_switch_fraction", "set_gamma"]


def switched_count(channels: int, fraction: float) -> int:
    """Channels on the step gate when ``fraction`` of the switch is done (ceil: never stalls)."""
    return min(channels, math.ceil(round(fraction * channels, 9)))


def apply_switch_fraction(model: nn.Module, fraction: float) -> None:
    """Switch the last ``ceil(fraction*C)`` channels of every site to the step gate."""
    for m in model.modules():
        if isinstance(m, SharedGate):
            n = switched_count(m.channels, fraction)
            m.switched.zero_()
            if n:
                m.switched[m.channels - n :] = True


def switched_fraction(model: nn.Module) -> float:
    sites = [m for m in model.modules() if isinstance(m, SharedGate)]
    total = sum(m.channels for m in sites)
    return sum(int(m.switched.sum()) for m in sites) / max(total, 1)


def set_gamma(model: nn.Module, gamma: float | None) -> None:
    """Sharpness of the GELU / straight-through surrogate of every gate (None: leave as is)."""
    if gamma is None:
        return
    for m in model.modules():
        if isinstance(m, PrototypeGate):
            m.gamma = float(gamma)


class GeluPhase(PhaseHooks):
    def __init__(self, gamma: float | None = None):
        self.gamma = gamma

    def on_phase_start(self, model):
        set_gate_mode(model, "gelu")
        set_gamma(model, self.gamma)


class StepPhase(PhaseHooks):
    """Step gates: plain DReLU (``step``), or DReLU with a surrogate gradient (``ste``)."""

    def __init__(self, gate: str = "step", gamma: float | None = None):
        self.gate, self.gamma = gate, gamma

    def on_phase_start(self, model):
        set_gate_mode(model, self.gate)
        set_gamma(model, self.gamma)

    def on_phase_end(self, model):
        set_gate_mode(model, "step")


class SwitchPhase(PhaseHooks):
    """Mixed gates with a switched fraction that grows to 1 over the phase."""

    def __init__(self, granularity: str = "epoch", gamma: float | None = None):
        self.granularity, self.gamma = granularity, gamma

    def on_phase_start(self, model):
        set_gate_mode(model, "mixed")
        set_gamma(model, self.gamma)

    def before_step(self, model, step, total_steps, epoch, epochs):
        if self.granularity == "step":
            fraction = (step + 1) / total_steps
        else:
            fraction = (epoch + 1) / epochs
        apply_switch_fraction(model, fraction)

    def on_phase_end(self, model):
        apply_switch_fraction(model, 1.0)
        set_gate_mode(model, "step")

    def metrics(self, model):
        return {"switched": round(switched_fraction(model), 4)}


class ProgressivePhase(PhaseHooks):
    """Blend every channel from its own ReLU (t = 0) to the shared gate (t = 1).

    Channel c's blend is ``u = clip((f - start_c) / width, 0, 1)`` at phase fraction
    f = step / steps (``easing: quadratic``: ``1 - (1 - u)^2``, slower near t = 1);
    every channel reaches t = 1 by ``ramp_end``.  ``together``:
    start_c = 0, width = ramp_end.  ``distortion``: channels ranked by
    :func:`~deepshare_convert.conversion.fitting.channel_distortion` (least first) start
    evenly over [0, ramp_end - width] with width = ``window * ramp_end``.
    The starts are part of the hook state, so a resumed run keeps its order.
    """

    def __init__(self, gate: str = "ste", gamma: float | None = None, ramp_end: float = 0.6,
                 order: str = "together", window: float = 0.25, easing: str = "linear",
                 calibration: Callable[[], torch.Tensor] | None = None):  # fmt: skip
        self.gate, self.gamma, self.easing = gate, gamma, easing
        self.ramp_end, self.order, self.window = float(ramp_end), order, float(window)
        self.calibration = calibration
        self.starts: dict[str, torch.Tensor] | None = None
        self.width = self.ramp_end
        self.fraction = 0.0

    def _sites(self, model) -> dict[str, SharedGate]:
        return dict(getattr(model, SITES_ATTR).named_children())

    def _leader_prototypes(self, model) -> dict[str, int]:
        """Leader site -> its P (those channels' shared gate is their own DReLU)."""
        gates = getattr(model, GATES_ATTR)
        leaders = {}
        for node in model.graph.nodes:
            if node.op == "call_module" and node.target.startswith(SITES_ATTR + "."):
                gate_node = node.args[1]
                gate = gates.get_submodule(gate_node.target.split(".", 1)[1])
                if gate_node.args[0] is node.args[0]:  # the gate reads this site's own input: the leader
                    leaders[node.target.split(".", 1)[1]] = gate.prototypes
        return leaders

    def on_phase_start(self, model):
        set_gate_mode(model, self.gate)
        set_gamma(model, self.gamma)
        self.width = self.ramp_end if self.order == "together" else max(self.window * self.ramp_end, 1e-9)
        self._protos = self._leader_prototypes(model)
        for m in self._sites(model).values():
            m.blending = True

    def _schedule(self, model, sites) -> dict[str, torch.Tensor]:
        if self.order == "together" or self.ramp_end <= 0:
            return {name: torch.zeros(m.channels) for name, m in sites.items()}
        from ..conversion.fitting import channel_distortion

        if self.calibration is None:
            raise ValueError("order 'distortion' needs calibration images")
        d = channel_distortion(model, self.calibration())
        names = list(sites)
        flat = torch.cat([d[n].float() for n in names])
        rank = torch.empty_like(flat)
        rank[flat.argsort()] = torch.arange(len(flat), dtype=flat.dtype) / max(len(flat) - 1, 1)
        span = max(self.ramp_end - self.window * self.ramp_end, 0.0)
        starts, offset = {}, 0
        for n in names:
            c = sites[n].channels
            starts[n] = rank[offset : offset + c] * span
            offset += c
        return starts

    def _apply(self, model, fraction: float) -> None:
        if self.starts is None:  # first step of a fresh phase (a resumed one loaded its starts: no recalibration)
            self.starts = self._schedule(model, self._sites(model))
        self.fraction = fraction
        for name, m in self._sites(model).items():
            if self.ramp_end <= 0:
                t = torch.ones(m.channels)
            else:
                t = ((fraction - self.starts[name]) / self.width).clamp(0.0, 1.0)
                if self.easing == "quadratic":
                    t = 1.0 - (1.0 - t) ** 2
            p = self._protos.get(name, 0)
            t[:p] = 1.0
            m.blend.copy_(t)

    def before_step(self, model, step, total_steps, epoch, epochs):
        self._apply(model, step / max(total_steps, 1))

    def on_phase_end(self, model):
        for m in self._sites(model).values():
            m.blend.fill_(1.0)
            m.blending = False
        set_gate_mode(model, "step")

    def metrics(self, model):
        sites = self._sites(model).values()
        total = sum(m.channels for m in sites)
        shared = sum(float(m.blend.sum()) for m in sites) / max(total, 1)
        return {"shared": round(shared, 4)}

    def state_dict(self) -> dict[str, Any]:
        return {"starts": {k: v.tolist() for k, v in (self.starts or {}).items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        starts = state.get("starts")
        self.starts = {k: torch.tensor(v) for k, v in starts.items()} if starts else None


def hooks_for(kind: str, granularity: str = "epoch", *, gate: str | None = None, gamma: float | None = None,
              progressive: dict[str, Any] | None = None,
              calibration: Callable[[], torch.Tensor] | None = None) -> PhaseHooks:  # fmt: skip
    """The hooks of a recipe phase kind (``pretrain`` trains the original model: no hooks)."""
    if kind == "gelu":
        return GeluPhase(gamma)
    if kind == "switch":
        return SwitchPhase(granularity, gamma)
    if kind == "finetune":
        return StepPhase(gate or "step", gamma)
    if kind == "progressive":
        return ProgressivePhase(gate or "ste", gamma, calibration=calibration, **(progressive or {}))
    return PhaseHooks()
