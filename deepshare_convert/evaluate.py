"""Accuracy and loss of a model over a loader: the one number every conversion step is judged by."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """``top1`` in percent, ``loss`` the mean per-example loss, ``n`` the number of examples seen.

    With ``n == 0`` both ``top1`` and ``loss`` are NaN (nothing was measured).
    """

    top1: float
    loss: float
    n: int


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int | None], None] | None = None,
) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``loader``'s ``(x, y)`` batches.

    The model is moved to ``device`` and run in eval mode under ``no_grad``;
    its train/eval mode is restored afterwards so this can sit inside a
    training loop.  A model with a single output (binary, e.g. XOR) is scored
    with BCE-with-logits and predicts class 1 where the logit is > 0.
    ``progress(batches_done, total_batches_or_None)`` is called after each batch.
    """
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    was_training = model.training
    model.to(device).eval()
    correct, loss_sum, n = 0, 0.0, 0
    try:
        with torch.no_grad():
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                batch_correct, batch_loss = _score(model(x), y)
                correct += batch_correct
                loss_sum += batch_loss
                n += len(y)
                if progress is not None:
                    progress(i + 1, total)
    finally:
        model.train(was_training)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0)
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
