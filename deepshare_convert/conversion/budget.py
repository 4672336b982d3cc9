"""DReLU budgets: parsing ``--budget`` and allocating prototype channels to groups.

A group with P prototypes of spatial size S costs P*S DReLUs per example.
Every allocator returns P_g with 1 <= P_g <= C_g and sum(P_g*S_g) <= budget,
then fills the remainder greedily, so the total is as close to the budget as
channel granularity allows.  Below one prototype per group (sum S_g), a group may get
P_g = 0 and become *linear* (each site ``beta * x``, no comparison), as SNL linearises
whole layers: the allocator's weights then decide which groups keep a gate.

* ``uniform``      -- the same fraction of channels everywhere;
* ``proportional`` -- DReLUs proportional to the group's original ReLU count;
* ``equal``        -- the same DReLUs in every group: deep groups, whose channels are
                      cheap (small spatial size), get a larger fraction of prototypes --
                      the direction the SNL search takes (docs/results.md);
* ``snl``          -- proportional to the ReLUs SNL kept at the group's sites
                      (paper Sec. 3.2), scaled so the total fits.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BudgetError

if TYPE_CHECKING:  # budget.py stays free of torch: the CLI lists allocators without importing it
    from .grouping import Group

__all__ = ["parse_budget", "allocate", "allocator_names", "register_allocator", "read_snl_counts"]

# name -> weights(groups, snl_counts): each group's relative DReLU demand (the scale is found later)
_ALLOCATORS: dict[str, Callable[[Sequence[Group], Mapping[str, int] | None], list[float]]] = {}


def register_allocator(name: str):
    """Decorator: make ``fn(groups, snl_counts) -> weights`` the allocator ``name``."""

    def add(fn):
        _ALLOCATORS[name] = fn
        return fn

    return add


def allocator_names() -> tuple[str, ...]:
    return tuple(_ALLOCATORS)


def check_allocator(name: str) -> str:
    if name not in _ALLOCATORS:
        raise BudgetError(f"unknown allocator {name!r}; choose one of {', '.join(_ALLOCATORS)}")
    return name
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kKmM%]?)\s*$")


def parse_budget(text: str | int | float, total_relus: int | None = None) -> int:
    """'12k' -> 12000, '1.5M' -> 1500000, '2.5%' -> 2.5% of ``total_relus``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    m = _BUDGET_RE.match(str(text))
    if not m:
        raise BudgetError(f"budget {text!r} is not a number like 12k, 1.5M, 6000 or 2.5%")
    value, suffix = float(m.group(1)), m.group(2).lower()
    if suffix == "" and value != int(value):  # 0.5 DReLUs means nothing; 0.5% is a budget
        raise BudgetError(f"budget {text!r} is not a whole number of DReLUs; did you mean {m.group(1)}%?")
    if suffix == "%":
        if total_relus is None:
            raise BudgetError("a percentage budget needs the model's ReLU count")
        if not 0 < value <= 100:
            raise BudgetError(f"budget {text!r} must be a percentage in (0, 100]")
        budget = math.floor(total_relus * value / 100)
    else:
        budget = math.floor(value * _SUFFIX[suffix] + 1e-9)
    if budget <= 0:
        raise BudgetError(f"budget {text!r} must be positive")
    if total_relus is not None and budget > total_relus:
        raise BudgetError(f"budget {text!r} ({budget:,}) is above the model's {total_relus:,} ReLUs")
    return budget


def read_snl_counts(path: str | Path) -> dict[str, int]:
    """Per-site kept-ReLU counts from ``deepshare snl`` (``{"sites": {name: count}}``)."""
    p = Path(path)
    if not p.is_file():
        raise BudgetError(f"SNL counts file {path} not found")
    try:
        data = json.loads(p.read_text())
        counts = data["sites"] if isinstance(data, dict) and "sites" in data else data
        return {str(k): int(v) for k, v in counts.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BudgetError(f"{path} is not an SNL counts file: {e}") from None


def allocate(
    groups: Sequence[Group],
    budget: int,
    allocator: str = "uniform",
    snl_counts: Mapping[str, int] | None = None,
) -> list[int]:
    """Prototype channels per group under ``budget`` DReLUs (already net of kept ReLUs)."""
    if not groups:
        return []
    least = 1 if budget >= one_per_group(groups) else 0  # below one prototype per group: linear groups
    weights = _target_weights(groups, allocator, snl_counts)
    protos = _greedy_fill(groups, _scaled(groups, weights, budget, least), weights, budget)
    if not any(protos):
        smallest = min(g.spatial for g in groups)
        raise BudgetError(f"budget {budget:,} buys no prototype channel (the smallest group needs {smallest:,} "
                          "DReLUs): every activation would be linear; raise the budget")  # fmt: skip
    return protos


def one_per_group(groups: Sequence[Group]) -> int:
    """DReLUs of one prototype channel in every group: below it, some groups must go linear."""
    return sum(g.spatial for g in groups)


def _target_weights(groups, allocator, snl_counts) -> list[float]:
    """Relative DReLU demand of each group; the scale is found later."""
    return _ALLOCATORS[check_allocator(allocator)](groups, snl_counts)


@register_allocator("uniform")
def _uniform(groups, snl_counts) -> list[float]:
    return [g.channels * g.spatial for g in groups]  # same fraction f of every group's channels


@register_allocator("proportional")
def _proportional(groups, snl_counts) -> list[float]:
    return [float(g.relus) for g in groups]


@register_allocator("equal")
def _equal(groups, snl_counts) -> list[float]:
    return [1.0 for _ in groups]


@register_allocator("snl")
def _snl(groups, snl_counts) -> list[float]:
    if not snl_counts:
        raise BudgetError("--allocator snl needs --snl-counts FILE (written by `deepshare snl`)")
    missing = [s for g in groups for s in g.sites if s not in snl_counts]
    if missing:
        raise BudgetError(f"SNL counts have no entry for site {missing[0]!r} (from another model?)")
    return [float(sum(snl_counts[s] for s in g.sites)) for g in groups]


def _protos_at(groups, weights, scale, least=1) -> list[int]:
    return [min(g.channels, max(least, math.floor(scale * w / g.spatial))) for g, w in zip(groups, weights)]


def _cost(groups, protos) -> int:
    return sum(p * g.spatial for g, p in zip(groups, protos))


def _scaled(groups, weights, budget, least=1) -> list[int]:
    """Largest common scale s with sum(clip(floor(s*w_g/S_g))*S_g) <= budget (bisection)."""
    lo, hi = 0.0, 1.0
    while _cost(groups, _protos_at(groups, weights, hi, least)) <= budget and hi < 1e18:
        if all(p == g.channels for g, p in zip(groups, _protos_at(groups, weights, hi, least))):
            return _protos_at(groups, weights, hi, least)
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if _cost(groups, _protos_at(groups, weights, mid, least)) <= budget:
            lo = mid
        else:
            hi = mid
    return _protos_at(groups, weights, lo, least)


def _greedy_fill(groups, protos, weights, budget) -> list[int]:
    """Spend what is left one channel at a time, neediest group (largest deficit) first."""
    protos = list(protos)
    left = budget - _cost(groups, protos)
    total_w = sum(weights) or 1.0
    while True:
        best, best_key = None, None
        for i, g in enumerate(groups):
            if protos[i] >= g.channels or g.spatial > left:
                continue
            share = weights[i] / total_w * budget  # the group's fair share in DReLUs
            key = (share - protos[i] * g.spatial) / g.spatial
            if best_key is None or key > best_key:
                best, best_key = i, key
        if best is None:
            return protos
        protos[best] += 1
        left -= groups[best].spatial
