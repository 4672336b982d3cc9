"""Accuracy and loss of a model over a loader: the one number every conversion step is judged by.

For segmentation data (a loader whose ``task`` is ``"segmentation"``, or
(N, K, H, W) logits against (N, H, W) masks) the number is the mean IoU, from
one confusion matrix over all pixels (:mod:`.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import confusion_matrix, seg_scores

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """``top1`` in percent, ``loss`` the mean per-example loss, ``n`` the number of examples seen.

    With ``n == 0`` both ``top1`` and ``loss`` are NaN (nothing was measured).
    Segmentation: ``top1`` is the pixel accuracy, ``loss`` the mean per labelled
    pixel, and ``miou``/``pixel_acc``/``iou`` (per class) are set, in percent.
    """

    top1: float
    loss: float
    n: int
    miou: float | None = None
    pixel_acc: float | None = None
    iou: list[float] | None = None

    @property
    def score(self) -> float:
        """The headline number: mIoU for segmentation, top-1 otherwise."""
        return self.top1 if self.miou is None else self.miou


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int | None], None] | None = None,
) -> EvalResult:
    """Top-1 accuracy (or mIoU) and mean cross-entropy of ``model`` on ``loader``'s ``(x, y)`` batches.

    The model is moved to ``device`` and run in eval mode under ``no_grad``;
    its device and train/eval mode are restored afterwards so this can sit inside a
    training loop.  A model with a single output (binary, e.g. XOR) is scored
    with BCE-with-logits and predicts class 1 where the logit is > 0.
    ``progress(batches_done, total_batches_or_None)`` is called after each batch.
    """
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    ignore = getattr(loader, "ignore_index", None)
    was_training = model.training
    home = next(iter(model.parameters()), None)
    home = home.device if home is not None else None
    model.to(device).eval()
    correct, loss_sum, n, pixels = 0, 0.0, 0, 0
    conf: torch.Tensor | None = None
    try:
        with torch.no_grad():
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                if y.ndim == 3 and logits.ndim == 4:  # per-pixel classes
                    batch_conf, batch_loss, batch_pixels = _score_pixels(logits, y, ignore)
                    conf = batch_conf if conf is None else conf + batch_conf
                    loss_sum += batch_loss
                    pixels += batch_pixels
                else:
                    batch_correct, batch_loss = _score(logits, y)
                    correct += batch_correct
                    loss_sum += batch_loss
                n += len(y)
                if progress is not None:
                    progress(i + 1, total)
    finally:
        model.train(was_training)
        if home is not None:
            model.to(home)  # callers keep their models where they were (the CPU outside a training loop)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    if conf is not None:
        s = seg_scores(conf)
        loss = loss_sum / pixels if pixels else float("nan")
        return EvalResult(s.pixel_acc, loss, n, miou=s.miou, pixel_acc=s.pixel_acc, iou=s.iou)
    return EvalResult(100.0 * correct / n, loss_sum / n, n)


def _score(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    """(number correct, summed loss) for one batch."""
    if logits.ndim == 1 or logits.shape[-1] == 1:  # one logit: binary classification
        z = logits.reshape(-1).float()
        t = y.reshape(-1).to(z.dtype)
        loss = F.binary_cross_entropy_with_logits(z, t, reduction="sum")
        correct = ((z > 0).long() == y.reshape(-1).long()).sum()
    else:
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(dim=1) == y).sum()
    return int(correct.item()), float(loss.item())


def _score_pixels(logits: torch.Tensor, y: torch.Tensor, ignore: int | None) -> tuple[torch.Tensor, float, int]:
    """(confusion matrix, summed loss over labelled pixels, labelled pixels) for one batch of masks."""
    logits = logits.float()
    k = logits.shape[1]
    ii = -100 if ignore is None else ignore
    loss = F.cross_entropy(logits, y, ignore_index=ii, reduction="sum")
    conf = confusion_matrix(logits.argmax(dim=1), y, k, ignore)
    return conf, float(loss.item()), int(conf.sum())
