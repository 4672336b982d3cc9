"""deepshare: convert pretrained CNNs to DeepShare shared-DReLU networks.

Public API (the CLI is a thin layer over these)::

    import deepshare_convert as ds
    loaded = ds.load_model("resnet20", weights="resnet20.th")
    print(ds.inspect(loaded.model, loaded.input_size).total_relus)        # 188416
    conv = ds.convert(loaded.model, loaded.input_size, budget="15k", spec=loaded.spec.to_dict())
    ds.save(conv, "out/r20")                     # plan.json + model.safetensors
    again = ds.load("out/r20")                   # the same outputs
    ds.retrain("recipes/digits_demo.yaml", "out/digits")
    print(ds.estimate_latency(again.model, (3, 32, 32)).latency_s)

Attributes are imported lazily so that ``deepshare --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "convert": ".conversion.rewrite",
    "load": ".conversion.rewrite",
    "save": ".conversion.rewrite",
    "set_gate_mode": ".conversion.gates",
    "retrain": ".training.retrain",
    "DeepShareError": ".errors",
    "LoadedModel": ".models",
    "ModelSpec": ".models",
    "list_models": ".models",
    "load_model": ".models",
    "load_any": ".model_or_out",
    "Census": ".conversion.census",
    "census": ".conversion.census",
    "query": ".serving",
    "Server": ".serving",
    "ServeConfig": ".serving",
    "read_inputs": ".serving",
}

__all__ = sorted([*_LAZY, "inspect", "estimate_latency"])


def inspect(model, input_size, **kwargs):
    """ReLU census of ``model`` at ``input_size`` (see :func:`deepshare_convert.conversion.census.census`)."""
    from .conversion.census import census

    return census(model, input_size, **kwargs)


def estimate_latency(model, input_size, **kwargs):
    """Private-inference bytes, rounds and latency (see :func:`deepshare_convert.mpc.costs.estimate`)."""
    from .mpc.costs import estimate

    return estimate(model, input_size, **kwargs)


def _register_plan_kinds() -> None:
    """Plan kinds beyond the shared gates, for ``rewrite.apply_plan``/``load`` (see :mod:`.conversion.plan_kinds`).

    Registered here, the package every submodule's import runs first, so any ``load``
    finds them; their code is imported only when such a plan is replayed (no torch at
    ``import deepshare_convert``, and no import cycle: ``snl`` imports ``rewrite``, not the reverse).
    """
    from .conversion.plan_kinds import register_plan_kind

    def apply_snl_plan(model, plan):
        from .snl.plan import apply_snl_plan

        return apply_snl_plan(model, plan)

    def check_snl_weights(gm, plan, weights) -> None:
        from .snl.plan import check_kept

        check_kept(gm, plan, weights)

    register_plan_kind("snl", apply_snl_plan, check_loaded=check_snl_weights)


_register_plan_kinds()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'deepshare_convert' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .conversion.census import Census, census
    from .conversion.gates import set_gate_mode
    from .conversion.rewrite import convert, load, save
    from .errors import DeepShareError
    from .model_or_out import load_any
    from .models import LoadedModel, ModelSpec, list_models, load_model
    from .training.retrain import retrain
