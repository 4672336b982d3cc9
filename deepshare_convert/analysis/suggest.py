"""From correlations to a conversion: prototype counts per group proportional to ED.

A site whose gates span ED effective dimensions needs about ED independent gates, so a
group's demand is taken as its sites' ED (median over positions, in channels) times H*W:
the "effective ReLUs" of the site.  These are written in the format ``--snl-counts`` reads
(``{"sites": {name: count}}``), so ``convert --allocator snl --snl-counts ed_counts.json``
allocates a budget in proportion to them with the same bisection and greedy fill as every
allocator (a group's weight is the sum over its sites, as for SNL's kept ReLUs).

Why not a new allocator ``ed``: allocators get their per-site numbers through the
``--snl-counts`` plumbing, so an ``ed`` allocator would read the very same file under
another name; the counts file keeps one code path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..conversion.budget import allocate, parse_budget
from ..conversion.census import ActivationSite
from ..conversion.grouping import group_sites
from ..errors import DeepShareError
from .report import AnalysisReport

__all__ = ["ed_counts", "write_ed_counts", "suggest_prototypes"]


def ed_counts(report: AnalysisReport) -> dict[str, int]:
    """Per site: round(median aligned ED x H*W), at least 1 (a dead site still needs its gate)."""
    _require_original(report)
    counts = {}
    for s in report.sites:
        median = s.summary()["aligned_median"]
        counts[s.name] = max(1, round((median or 0.0) * s.channels * s.spatial))
    return counts


def write_ed_counts(report: AnalysisReport, path: str | Path) -> Path:
    """``{"sites": {name: count}}``, the file ``convert --allocator snl --snl-counts`` reads."""
    from ..conversion.plan import write_json_atomic

    path = Path(path)
    write_json_atomic(path, {"source": "deepshare analyze", "model": report.model, "sites": ed_counts(report)})
    return path


def suggest_prototypes(report: AnalysisReport, budget_or_fraction: str | int | float,
                       group_size: int = 2) -> list[dict[str, Any]]:  # fmt: skip
    """Prototypes per group for a budget (``12k``, ``2.5%``, or a fraction in (0, 1) of the site ReLUs).

    Groups are formed as ``convert --group-size`` forms them; the allocation is the one
    ``convert --allocator snl --snl-counts ed_counts.json`` makes.
    """
    counts = ed_counts(report)
    sites = [ActivationSite(s.name, s.module, "module", tuple(s.shape), s.channels * s.spatial) for s in report.sites]
    total = sum(s.relus for s in sites)
    if isinstance(budget_or_fraction, float) and 0 < budget_or_fraction < 1:
        budget = math.floor(total * budget_or_fraction)
    else:
        budget = parse_budget(budget_or_fraction, total)
    groups = group_sites(sites, group_size)
    protos = allocate(groups, budget, "snl", snl_counts=counts)
    return [{"group": g.index, "sites": list(g.sites), "channels": g.channels, "spatial": g.spatial,
             "prototypes": p, "drelus": p * g.spatial} for g, p in zip(groups, protos)]  # fmt: skip


def _require_original(report: AnalysisReport) -> None:
    if report.converted:
        raise DeepShareError("prototype suggestions need the analysis of an original (unconverted) model")
