"""Per-site feature distillation: each converted site imitates the original ReLU's output.

Logit KD tells the student *what* to output; after a site's gate changes, the
layers above it see a different input and only learn of it through the logits.
Matching every site's post-activation output to the original network's, with a
normalised MSE (``||s - t||^2 / ||t||^2`` per site, averaged over sites), gives
each layer its own signal.  The teacher is the original model traced with the
same tracer, so its ReLU nodes carry the plan's site names; each is swapped
for a :class:`_Tap` (a ReLU that keeps its output), and forward hooks keep the
student's site outputs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ..conversion.passes import swap_site
from ..conversion.plan import Plan
from ..conversion.rewrite import SITES_ATTR
from ..conversion.tracing import register_leaf_module, trace
from .engine import PhaseHooks

__all__ = ["FeatureDistillation", "tapped_teacher"]

TAPS_ATTR = "deepshare_taps"


@register_leaf_module
class _Tap(nn.Module):
    """ReLU that remembers its last output (the teacher side of feature distillation)."""

    def __init__(self):
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.out = torch.relu(x)
        return self.out


def tapped_teacher(original: nn.Module, plan: Plan) -> nn.Module:
    """A traced copy of ``original`` whose planned sites record their outputs."""
    gm = trace(copy.deepcopy(original), plan.leaf_modules)
    gm.add_module(TAPS_ATTR, nn.Module())
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    for g in plan.groups:
        for site in g.sites:
            getattr(gm, TAPS_ATTR).add_module(site, _Tap())
            swap_site(gm, nodes[site], f"{TAPS_ATTR}.{site}", modules)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


class FeatureDistillation(PhaseHooks):
    """Wraps a phase's hooks and adds ``weight * mean_sites ||s - t||^2 / ||t||^2`` to its loss."""

    def __init__(self, inner: PhaseHooks, teacher: nn.Module, weight: float):
        self.inner, self.teacher, self.weight = inner, teacher, float(weight)
        self.student_out: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def on_phase_start(self, model):
        self.inner.on_phase_start(model)
        for name, site in getattr(model, SITES_ATTR).named_children():
            self._handles.append(site.register_forward_hook(
                lambda mod, args, out, name=name: self.student_out.__setitem__(name, out)))  # fmt: skip

    def extra_loss(self, model):
        taps = getattr(self.teacher, TAPS_ATTR)
        terms = []
        for name, s in self.student_out.items():
            t = taps.get_submodule(name).out
            if t is not None:
                terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        self.student_out.clear()
        loss = self.inner.extra_loss(model)
        if terms:
            feature = self.weight * torch.stack(terms).mean()
            loss = feature if loss is None else loss + feature
        return loss

    def on_phase_end(self, model):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.inner.on_phase_end(model)

    def before_step(self, model, step, total_steps, epoch, epochs):
        self.inner.before_step(model, step, total_steps, epoch, epochs)

    def after_step(self, model, steps_done):
        return self.inner.after_step(model, steps_done)

    def on_epoch_end(self, model, epoch, metrics):
        return self.inner.on_epoch_end(model, epoch, metrics)

    def metrics(self, model):
        return self.inner.metrics(model)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
