"""Segmentation scores from a confusion matrix: per-class IoU, mean IoU, pixel accuracy.

One matrix per evaluation (``torch.bincount`` of ``K * target + prediction``
over the labelled pixels) holds everything; ignore pixels never enter it.  A
class absent from both the labels and the predictions has no IoU (NaN) and is
left out of the mean, as in the usual mIoU (mmseg's ``nanmean``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SegScores", "confusion_matrix", "seg_scores", "task_key"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    """(K, K) int64 counts, row = true class, column = predicted, over pixels whose label is not ignored."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


@dataclass
class SegScores:
    """``miou``/``pixel_acc`` in percent; ``iou`` per class in percent (NaN: class in neither labels nor predictions)."""

    miou: float
    pixel_acc: float
    iou: list[float]


def seg_scores(conf: torch.Tensor) -> SegScores:
    """Scores of a confusion matrix (rows true, columns predicted)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = float(conf.sum())
    pixel_acc = float(tp.sum()) / total if total else float("nan")
    return SegScores(100.0 * miou, 100.0 * pixel_acc, [100.0 * float(v) for v in iou])


def task_key(key: str, task: str) -> str:
    """A result key in the task's terms: the ``acc`` (top-1) word becomes ``miou`` for segmentation
    (``final_acc`` -> ``final_miou``, ``converted_acc_before_retraining`` -> ``converted_miou_before_retraining``)."""
    if task != "segmentation":
        return key
    return "_".join("miou" if part == "acc" else part for part in key.split("_"))
