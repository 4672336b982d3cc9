"""The three DeepShare phases (paper Alg. 1, Supp. B) as loop hooks.

* ``gelu``     -- every gate is Phi(gamma*x): gradients reach the prototypes.
* ``switch``   -- channels move from the GELU gate to the step gate progressively:
                  within every site from the last channel backwards (prototypes,
                  the first P channels, switch last); replicates switch on their
                  own schedule, independent of their prototype.  At the end every
                  gate is a step.
* ``finetune`` -- step gates only.
"""

from __future__ import annotations

import math

import torch.nn as nn

from ..gates import SharedGate
from ..rewrite import set_gate_mode
from .engine import PhaseHooks

__all__ = ["GeluPhase", "SwitchPhase", "StepPhase", "hooks_for", "switched_count", "apply_switch_fraction"]


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


class GeluPhase(PhaseHooks):
    def on_phase_start(self, model):
        set_gate_mode(model, "gelu")


class StepPhase(PhaseHooks):
    def on_phase_start(self, model):
        set_gate_mode(model, "step")


class SwitchPhase(PhaseHooks):
    """Mixed gates with a switched fraction that grows to 1 over the phase."""

    def __init__(self, granularity: str = "epoch"):
        self.granularity = granularity

    def on_phase_start(self, model):
        set_gate_mode(model, "mixed")

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


def hooks_for(kind: str, granularity: str = "epoch") -> PhaseHooks:
    """The hooks of a recipe phase kind (``pretrain`` trains the original model: no hooks)."""
    if kind == "gelu":
        return GeluPhase()
    if kind == "switch":
        return SwitchPhase(granularity)
    if kind == "finetune":
        return StepPhase()
    return PhaseHooks()
