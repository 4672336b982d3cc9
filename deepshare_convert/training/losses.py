"""Losses shared by every training job: cross-entropy plus knowledge distillation.

``loss = ce_weight * CE(student, y) + kd_weight * T^2 * KL(p_teacher^T || p_student^T)``

The T^2 factor keeps the KD gradient scale independent of the temperature
(Hinton et al.); SNL and DeepShare use T = 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "task_loss"]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Distillation term T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    t = float(temperature)
    if student.shape[-1] == 1:  # a single logit: binary distillation on sigmoid probabilities
        p_teacher = torch.sigmoid(teacher / t)
        return t * t * F.binary_cross_entropy_with_logits(student / t, p_teacher)
    log_p = F.log_softmax(student / t, dim=-1)
    log_q = F.log_softmax(teacher / t, dim=-1)
    return t * t * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or BCE-with-logits for a one-output (binary) model."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    return F.cross_entropy(logits, target)
