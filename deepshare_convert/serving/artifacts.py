"""What each side may read of a converted directory.

The client of a private inference holds the architecture, never the weights: :func:`architecture_only`
rebuilds the converted graph from ``plan.json`` alone (the built-in model it names, rewritten by the
plan), with the built-in's input normalisation -- what a query must apply to the client's pixels.
The dealer reads the same (it needs shapes, not values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

__all__ = ["ClientModel", "architecture_only"]


@dataclass
class ClientModel:
    """A converted model without its weights, its input size (C, H, W) and normalisation (None: unknown)."""

    model: nn.Module
    input_size: tuple[int, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    kind: str = "deepshare"


def architecture_only(out_dir: str | Path) -> ClientModel:
    """The model of ``out_dir`` rebuilt from ``plan.json`` (no weights read): what party 1 may hold.

    An SNL model's masks (which neurons are ReLUs) are architecture, not weights: they are read
    from model.safetensors, and nothing else in it is.
    """
    from ..conversion.plan import WEIGHTS_FILE, Plan
    from ..conversion.rewrite import apply_plan
    from ..models import ModelSpec, load_model

    plan = Plan.read(out_dir)
    spec = ModelSpec.from_dict(plan.model)
    loaded = load_model(spec.display, num_classes=spec.num_classes, input_size=tuple(plan.input_size))
    gm = apply_plan(loaded.model, plan)
    if plan.kind == "snl":
        from ..snl.plan import load_masks

        load_masks(gm, plan, Path(out_dir) / WEIGHTS_FILE)
    return ClientModel(gm, tuple(plan.input_size), loaded.mean, loaded.std, plan.kind)
