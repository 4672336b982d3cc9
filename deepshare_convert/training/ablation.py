"""Ablation switches of the paper's Table 5 that act on a converted model.

Two rows of the table change what a converted model may learn rather than how it
is built or trained, so they are applied to the rewritten model (after
:func:`~.rewrite.convert` or :func:`~.rewrite.apply_plan`, and again on resume):

* **no affine** -- every site keeps ``alpha = 1, beta = 0`` frozen: replicates
  copy their prototype's gate as is (Eq. 2 instead of Eq. 3);
* **no replicates** -- the replicate channels are switched off (``alpha = beta = 0``,
  frozen), leaving a plain network whose only live channels are the prototypes:
  the same DReLU count, without reusing any gate.  Needs one site per group
  (``group_size 1``): a second site of a group has no prototypes of its own.

The other rows (no layer sharing, no budget, no GELU phase) are recipe settings:
``group_size: 1``, ``allocator: uniform`` and a phase list without ``gelu``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..conversion.gates import SharedGate
from ..conversion.plan import Plan
from ..conversion.rewrite import SITES_ATTR
from ..errors import PlanError

__all__ = ["AFFINE_MODES", "REPLICATE_MODES", "apply_ablation", "freeze_affine", "drop_replicates"]

AFFINE_MODES = ("learned", "frozen")
REPLICATE_MODES = ("shared", "none")


def _sites(model: nn.Module) -> dict[str, SharedGate]:
    holder = getattr(model, SITES_ATTR, None)
    if holder is None:
        raise PlanError("not a converted model: it has no shared-gate sites")
    return {name: m for name, m in holder.named_children() if isinstance(m, SharedGate)}


def _fix(site: SharedGate, alpha: torch.Tensor | float, beta: float) -> None:
    """Set a site's affine and take it out of training."""
    for param, value in ((site.alpha, alpha), (site.beta, beta)):
        param.data.copy_(torch.as_tensor(value, dtype=param.dtype).expand_as(param))
        param.requires_grad_(False)


def freeze_affine(model: nn.Module) -> None:
    """alpha = 1, beta = 0 at every site, excluded from training (the 'no affine' row)."""
    for site in _sites(model).values():
        _fix(site, 1.0, 0.0)


def drop_replicates(model: nn.Module, plan: Plan) -> None:
    """Zero and freeze the replicate channels of every site (the 'no replicates' row)."""
    shared = [g for g in plan.groups if len(g.sites) > 1]
    if shared:
        raise PlanError(
            f"dropping replicates needs one site per group (group_size 1); group {shared[0].index} shares its "
            f"gate across {len(shared[0].sites)} sites"
        )
    sites = _sites(model)
    for g in plan.groups:
        site = sites[g.sites[0]]
        _fix(site, torch.arange(site.channels) < g.prototypes, 0.0)  # prototypes: plain ReLU; replicates: 0


def apply_ablation(model: nn.Module, plan: Plan, *, affine: str = "learned", replicates: str = "shared") -> None:
    """Apply the recipe's ``conversion.affine`` / ``conversion.replicates`` settings to ``model``."""
    if affine not in AFFINE_MODES:
        raise PlanError(f"affine must be one of {AFFINE_MODES}, got {affine!r}")
    if replicates not in REPLICATE_MODES:
        raise PlanError(f"replicates must be one of {REPLICATE_MODES}, got {replicates!r}")
    if replicates == "none":
        drop_replicates(model, plan)
    elif affine == "frozen":
        freeze_affine(model)
