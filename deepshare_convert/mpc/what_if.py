"""What-if across layer-sharing group sizes: the same budget re-planned at G = 1, 2, 4, ... and costed.

Rounds are set by the *number of gate layers* (each comparison call costs the table's
``comparison_rounds`` whatever its width), bytes by the DReLUs and the openings; the group
size trades one against the other at a fixed budget: G sites share one gate, so a larger G
means fewer comparison calls (fewer rounds) and more prototypes per gate.  Which G is best
depends on the link (RTT against bandwidth) and on accuracy, which this table does not know.

Each row is made by the very code ``deepshare convert --group-size G`` runs
(:func:`~deepshare_convert.conversion.rewrite.convert` with the plan's settings, only
``group_size`` changed), then :func:`~.costs.estimate` -- so a row equals what
``convert --group-size G`` followed by ``estimate-latency`` reports (tests/test_mpc_what_if.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from ..conversion.rewrite import convert
from ..conversion.settings import ConversionSettings
from ..errors import DeepShareError
from .costs import CostTable, Estimate, estimate

__all__ = ["WhatIfRow", "what_if", "GROUP_SIZES"]

GROUP_SIZES = (1, 2, 4)


@dataclass
class WhatIfRow:
    """One group size; ``infeasible`` (the planner's one-line reason) when the budget cannot be met."""

    group_size: int
    compare_calls: int | None = None  # comparison calls: gate layers, kept ReLUs, max-pools (same rounds each)
    drelus: int | None = None  # comparisons per example (the plan's achieved DReLUs)
    bytes: int | None = None
    rounds: int | None = None
    network_s: float | None = None
    latency_s: float | None = None  # compute included
    setup_bytes: int | None = None
    speedup: float | None = None  # over the original, compute included
    speedup_network: float | None = None
    own: bool = False  # the plan's own group size
    infeasible: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def what_if(original: nn.Module, input_size: Sequence[int], settings: ConversionSettings, *,
            group_sizes: Iterable[int] = GROUP_SIZES, baseline: Estimate | None = None, batch: int = 1,
            weights_mode: str = "public", table: CostTable | None = None, bandwidth: float = 1e9,
            rtt: float = 1e-3) -> list[WhatIfRow]:  # fmt: skip
    """Re-plan ``settings`` (the budget and everything else) at each group size and estimate it.

    ``original`` is the unconverted model; ``baseline`` its estimate (for the speedups), made
    here when not given.  The settings' own group size is always among the rows (``own``).
    """
    table = table or CostTable.load()
    kw = dict(batch=batch, weights_mode=weights_mode, table=table, bandwidth=bandwidth, rtt=rtt,
              leaf_modules=settings.leaf_modules)  # fmt: skip
    if settings.allocator == "snl" and settings.snl_counts is None:
        raise DeepShareError("what-if needs the SNL counts of an allocator-snl plan (re-plan it with --snl-counts)")
    base = baseline or estimate(original, input_size, **kw)
    rows = []
    for g in sorted({*group_sizes, settings.group_size}):
        s = settings.model_copy(update={"group_size": g, "gate": "step"})
        try:
            conv = convert(original, input_size, s)
        except DeepShareError as e:  # e.g. the budget is below one prototype per group at this G
            rows.append(WhatIfRow(g, own=g == settings.group_size, infeasible=str(e)))
            continue
        est = estimate(conv.model, input_size, **kw)
        rows.append(WhatIfRow(
            g, sum(1 for n in est.nodes if n.comparisons), conv.plan.achieved, est.bytes, est.rounds, est.network_s,
            est.latency_s, est.setup_bytes, base.latency_s / est.latency_s, base.network_s / est.network_s,
            own=g == settings.group_size))  # fmt: skip
    return rows
