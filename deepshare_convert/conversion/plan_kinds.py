"""Plan kinds other than the shared-gate conversion: how ``rewrite`` replays and checks them.

A plan's ``kind`` says which pass rebuilds its graph.  ``"deepshare"`` (shared gates) is
:func:`~.rewrite.apply_plan`'s own; another kind registers here, and ``rewrite.apply_plan``
and ``rewrite.load`` dispatch to it.  The registry imports nothing of the project, so the
rewrite can consult it without importing any kind's package (no cycle):
``deepshare_convert/__init__.py`` registers the SNL kind (``"snl"``) with functions that
import :mod:`deepshare_convert.snl` only when a plan of that kind is replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PlanKind", "register_plan_kind", "registered_plan_kind"]


@dataclass(frozen=True)
class PlanKind:
    """``apply(model, plan) -> GraphModule`` rebuilds the graph; ``check_loaded(gm, plan, weights)``
    (optional) checks the model once ``load`` has put the saved weights in."""

    name: str
    apply: Callable[[Any, Any], Any]
    check_loaded: Callable[[Any, Any, Any], None] | None = None


_KINDS: dict[str, PlanKind] = {}


def register_plan_kind(name: str, apply: Callable[[Any, Any], Any], *,
                       check_loaded: Callable[[Any, Any, Any], None] | None = None) -> PlanKind:  # fmt: skip
    """Make ``rewrite.apply_plan``/``load`` hand plans of kind ``name`` to ``apply`` (and ``check_loaded``)."""
    if name == "deepshare":
        raise ValueError("the shared-gate plan kind 'deepshare' is the rewrite's own")
    kind = PlanKind(name, apply, check_loaded)
    _KINDS[name] = kind
    return kind


def registered_plan_kind(name: str) -> PlanKind | None:
    """The registered kind ``name``; None for ``"deepshare"`` (the rewrite's own) and unknown kinds."""
    return _KINDS.get(name)
