"""The SNL plan kind: an SNL-linearised model as a replayable plan (``plan.json`` + weights).

``kind="snl"`` plans hold the kept ReLUs per site; which neurons stay is data (a bool
tensor per site, in ``model.safetensors``).  ``rewrite.apply_plan`` and ``rewrite.load``
reach :func:`apply_snl_plan` and :func:`check_kept` through :mod:`..conversion.plan_kinds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..conversion.plan import Plan
from ..errors import PlanError
from .masks import MASKS_ATTR, kept_counts, mask_relus, masked_relus

__all__ = ["snl_plan", "apply_snl_plan", "check_kept", "load_masks"]


def snl_plan(model_census, counts: dict[str, int], *, spec: dict[str, Any], budget: int, budget_requested: str,
             leaf_modules: Sequence[str] = ()) -> Plan:  # fmt: skip
    """The replayable record of an SNL-linearised model: which sites, how many ReLUs each keeps.

    Which neurons stay is data (a bool tensor per site), so it lives in
    ``model.safetensors``; the plan holds the counts that the loaded weights
    must reproduce.
    """
    return Plan(
        model=spec, input_size=list(model_census.input_size), total_relus=model_census.total_relus,
        budget_requested=str(budget_requested), budget=budget, allocator="snl", group_size=1, gate="step",
        gamma=1.0, sites=[s.to_dict() for s in model_census.sites], groups=[], kept=[],
        hidden_relus=model_census.hidden_relus, leaf_modules=list(leaf_modules), kind="snl", snl_kept=dict(counts),
    )  # fmt: skip


def apply_snl_plan(model: nn.Module, plan: Plan) -> fx.GraphModule:
    """Rebuild an SNL plan's graph on ``model``: binarised masks at its sites (the weights fill them)."""
    gm = mask_relus(model, plan.input_size, leaf_modules=plan.leaf_modules, binary=True)
    masks = masked_relus(gm)
    if list(masks) != list(plan.snl_kept):
        missing = next((s for s in plan.snl_kept if s not in masks), None) or next(s for s in masks)
        raise PlanError(f"SNL plan site {missing!r} does not match this model's ReLU sites (plan for another model?)")
    shapes = {s["name"]: list(s["shape"]) for s in plan.sites}
    for name, m in masks.items():
        if list(m.shape) != shapes.get(name):
            raise PlanError(f"SNL plan site {name!r} has shape {shapes.get(name)}, the model {list(m.shape)}")
    return gm


def check_kept(gm: nn.Module, plan: Plan, weights: Path | str) -> None:
    """After loading: the weights' masks must keep exactly the plan's ReLUs at every site."""
    for name, kept in kept_counts(gm).items():
        if kept != plan.snl_kept[name]:
            raise PlanError(f"{weights} does not fit the plan: site {name!r} keeps {kept:,} ReLUs, "
                            f"the plan says {plan.snl_kept[name]:,}")  # fmt: skip


def load_masks(gm: nn.Module, plan: Plan, weights: Path | str) -> nn.Module:
    """Put the saved ``keep`` masks into ``gm`` (from :func:`apply_snl_plan`), reading no other tensor.

    Which neurons are ReLUs is public architecture under private inference: the input party
    needs the masks to run (and hash) the same program, but never the weights beside them.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
            for name, m in masked_relus(gm).items():
                key = f"{MASKS_ATTR}.{name}.keep"
                if key not in keys:
                    raise PlanError(f"{weights} does not fit the plan: no mask for site {name!r}")
                keep = f.get_tensor(key)
                if keep.dtype != m.keep.dtype or tuple(keep.shape) != tuple(m.keep.shape):
                    raise PlanError(f"{weights} does not fit the plan: mask {key!r} is {keep.dtype} "
                                    f"{tuple(keep.shape)}, the site {tuple(m.keep.shape)}")  # fmt: skip
                m.keep.copy_(keep)
    except (SafetensorError, OSError) as e:
        raise PlanError(f"{weights} is not a readable safetensors file: {e}") from None
    check_kept(gm, plan, weights)
    return gm
