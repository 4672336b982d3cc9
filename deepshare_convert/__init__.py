"""deepshare: convert pretrained CNNs to DeepShare shared-DReLU networks.

Public API (the CLI is a thin layer over these)::

    from deepshare_convert import load_model, inspect
    loaded = load_model("resnet20", weights="resnet20.th")
    report = inspect(loaded.model, loaded.input_size)
    print(report.total_relus)

Attributes are imported lazily so that ``deepshare --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DeepShareError": ".errors",
    "LoadedModel": ".models",
    "ModelSpec": ".models",
    "list_models": ".models",
    "load_model": ".models",
    "Census": ".tracing",
    "census": ".tracing",
}

__all__ = sorted([*_LAZY, "inspect"])


def inspect(model, input_size, **kwargs):
    """ReLU census of ``model`` at ``input_size`` (see :func:`deepshare_convert.tracing.census`)."""
    from .tracing import census

    return census(model, input_size, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'deepshare_convert' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .errors import DeepShareError
    from .models import LoadedModel, ModelSpec, list_models, load_model
    from .tracing import Census, census
