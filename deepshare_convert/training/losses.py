"""Losses shared by every training job: cross-entropy plus knowledge distillation.

``loss = ce_weight * CE(student, y) + kd_weight * T^2 * KL(p_teacher^T || p_student^T)``

The T^2 factor keeps the KD gradient scale independent of the temperature
(Hinton et al.); SNL and DeepShare use T = 4.  Segmentation logits (N, K, H, W)
are scored per pixel: CE skips the ignore label, and KD is the per-pixel KL over
the class dimension averaged over the labelled pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "task_loss"]


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Distillation term T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch (or labelled-pixel) mean.

    ``mask`` (N, H, W) bool, for (N, K, H, W) logits: the pixels that count.
    """
    t = float(temperature)
    if student.ndim == 4:  # dense: KL over the class dimension at every pixel
        log_p = F.log_softmax(student / t, dim=1)
        log_q = F.log_softmax(teacher / t, dim=1)
        kl = (log_q.exp() * (log_q - log_p)).sum(1)  # (N, H, W)
        if mask is not None:
            return t * t * (kl * mask).sum() / mask.sum().clamp_min(1)
        return t * t * kl.mean()
    if student.shape[-1] == 1:  # a single logit: binary distillation on sigmoid probabilities
        p_teacher = torch.sigmoid(teacher / t)
        return t * t * F.binary_cross_entropy_with_logits(student / t, p_teacher)
    log_p = F.log_softmax(student / t, dim=-1)
    log_q = F.log_softmax(teacher / t, dim=-1)
    return t * t * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def task_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Cross-entropy (per pixel for masks, skipping ``ignore_index``), or BCE-with-logits for one output."""
    if logits.ndim == 4:
        loss = F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index)
        return loss if bool((target != ignore_index).any()) else logits.sum() * 0.0  # all ignored: 0, not NaN
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    return F.cross_entropy(logits, target)
