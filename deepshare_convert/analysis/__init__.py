"""Gate analysis (paper Sec. 3.1 / Fig. 2 and Supp. E / Fig. 10) and the counts it feeds to ``convert``.

* :mod:`.effective_dim` -- streamed float64 covariance of 0/1 gate vectors per position, ED, the shuffle;
* :mod:`.recording` -- the sites of an original or converted model, and a recording forward pass;
* :mod:`.report` -- :func:`analyze` / :func:`analyze_dataset`, per-site reports, (beta, alpha) statistics;
* :mod:`.suggest` -- prototypes per group proportional to ED, as an ``--snl-counts`` file.
"""

from __future__ import annotations

from .effective_dim import GateCovariance, effective_dimension, shuffle_positions
from .report import AnalysisReport, SiteReport, affine_summary, analyze, analyze_dataset, dataset_batches
from .suggest import ed_counts, suggest_prototypes, write_ed_counts

__all__ = [
    "GateCovariance", "effective_dimension", "shuffle_positions", "AnalysisReport", "SiteReport",
    "affine_summary", "analyze", "analyze_dataset", "dataset_batches", "ed_counts", "suggest_prototypes", "write_ed_counts",
]  # fmt: skip
