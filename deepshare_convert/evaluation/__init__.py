"""Evaluation: top-1 / loss of a model on a loader, and segmentation scores (per-class IoU, mIoU, pixel accuracy).

* :mod:`.run` -- :func:`evaluate` over a loader (classification or dense prediction);
* :mod:`.metrics` -- scores from a confusion matrix, and which task a dataset's labels mean.
"""

from __future__ import annotations

from .metrics import confusion_matrix, seg_scores, task_key
from .run import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate", "confusion_matrix", "seg_scores", "task_key"]
