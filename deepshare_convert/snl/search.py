"""SNL's search as training-loop hooks: the L1 mask penalty, the lambda policies and schedule, the budget stop.

:class:`SNLSearch` plugs into the engine's :class:`~..training.engine.Trainer` as
:class:`~..training.engine.PhaseHooks`, so the search is checkpointed and resumed like
any phase; ``LAMBDA_POLICIES`` are the ``--lambda-policy`` presets.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ..training.engine import PhaseHooks, Reporter
from .masks import MaskedReLU, masked_relus

__all__ = ["SNLSearch", "LAMBDA_POLICIES"]

# How lambda moves (``--lambda-policy``): start, growth, warm-up epochs, masks' lr multiple, budget checks.
#   faithful: SNL's code -- 1e-5, x1.1 only when the count stalls, after 5 epochs, masks at the model's lr,
#             the budget checked at epoch ends;
#   fast (default): 1e-3 (near the masks' gradient noise), x1.25 after every epoch still above the budget
#             from the second epoch on, masks at 5x the lr, the budget checked after every step -- so a
#             search ends in tens of epochs, not hundreds (digits CNN at 10%: 20 epochs).
LAMBDA_POLICIES = {
    "fast": {"lam": 1e-3, "lam_growth": 1.25, "warmup_epochs": 1, "mask_lr_scale": 5.0, "check_every": 1},
    "faithful": {"lam": 1e-5, "lam_growth": 1.1, "warmup_epochs": 5, "mask_lr_scale": 1.0, "check_every": None},
}


class SNLSearch(PhaseHooks):
    """SNL's search inside the engine: the L1 mask penalty, the lambda schedule, the stop at the budget.

    ``budget`` counts mask ReLUs (hidden ReLUs are taken off by the caller).
    The count is checked at every epoch end and, with ``check_every=K``, every K
    steps too, so a small model stops as soon as it is within budget.  Lambda,
    the best count and the trajectories are checkpointed with the engine's
    state, so a resumed search continues exactly.
    """

    def __init__(self, budget: int, *, lam: float = 1e-5, growth: float = 1.1, warmup_epochs: int = 5,
                 check_every: int | None = None, grow_while_above: bool = False):  # fmt: skip
        self.budget = int(budget)
        self.grow_while_above = grow_while_above  # fast policy: grow after every epoch above budget, not on stalls
        self.lam, self.growth, self.warmup_epochs, self.check_every = float(lam), growth, warmup_epochs, check_every
        self.best: int | None = None  # lowest live count so far (starts at the model's count)
        self.lambdas: list[float] = []  # lambda used in each epoch
        self.lives: list[int] = []  # live count at the end of each epoch
        self.reached = False
        self.steps = 0  # steps done in the phase
        self.epoch_start_step = 0  # steps done when the current epoch began
        self.train_seconds = 0.0
        self._masks: list[MaskedReLU] = []

    def on_phase_start(self, model: nn.Module) -> None:
        self._masks = list(masked_relus(model).values())
        if self.best is None:
            self.best = self.live()

    def live(self) -> int:
        """Neurons with ``m > threshold`` now."""
        return sum(int(m.live().sum()) for m in self._masks)

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.lam * sum(m.mask.abs().sum() for m in self._masks)

    def after_step(self, model: nn.Module, steps_done: int) -> bool:
        self.steps = steps_done
        if self.check_every and steps_done % self.check_every == 0 and self.live() <= self.budget:
            self.reached = True
        return self.reached

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> bool:
        if self.steps == self.epoch_start_step:  # an epoch without steps (a cap already met) changes nothing
            return self.reached
        self.epoch_start_step = self.steps
        live = self.live()
        self.lambdas.append(self.lam)
        self.lives.append(live)
        self.train_seconds += float(metrics.get("epoch_seconds", 0.0))
        if live <= self.budget:
            self.reached = True
            return True
        stalled = live >= self.best
        self.best = min(self.best, live)
        if epoch >= self.warmup_epochs and (stalled or self.grow_while_above):
            self.lam *= self.growth
        return self.reached

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        used = self.lambdas[-1] if self.lambdas else self.lam
        return {"live": self.live(), "budget": self.budget, "lambda": used}

    _STATE = ("lam", "best", "lambdas", "lives", "reached", "steps", "epoch_start_step", "train_seconds")

    def state_dict(self) -> dict[str, Any]:
        return {k: copy.copy(getattr(self, k)) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, copy.copy(state[k]))


def _mask_groups(scale: float):
    """Masks in their own Adam group at ``scale`` x the lr (None at 1: one group, as SNL's code has it).

    Adam moves a parameter by about lr per step whatever lambda is, so at lr 1e-3 a mask
    needs ~1,000 steps to fall from 1 to the 1e-2 threshold; 10x makes that ~100.
    """
    if scale == 1.0:
        return None

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        masks = {id(m.mask) for m in masked_relus(model).values()}
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in masks]},
                {"params": [p for p in params if id(p) in masks], "lr_scale": scale}]  # fmt: skip

    return groups


class _SearchReporter:
    """Adds the live count, the budget and lambda to each step's info, for the progress bar."""

    def __init__(self, inner: Reporter, hooks: SNLSearch):
        self.inner, self.hooks = inner, hooks

    def start(self, name: str, total: int, done: int = 0) -> None:
        self.inner.start(name, total, done)

    def advance(self, info: dict[str, Any]) -> None:
        self.inner.advance({**info, "live": self.hooks.live(), "budget": self.hooks.budget, "lambda": self.hooks.lam})

    def epoch(self, info: dict[str, Any]) -> None:
        self.inner.epoch(info)

    def stop(self) -> None:
        self.inner.stop()
