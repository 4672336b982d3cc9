"""Pixels -> model input: the one preprocessing that evaluation, training and private queries share.

A private answer can only be compared with a plaintext one if both saw the same tensor, so the
loader (:class:`~.loader.TensorLoader`) and ``deepshare query`` (:mod:`...serving.inputs`) both
scale uint8 pixels with :func:`to_float` and normalise with :func:`normalise`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["normalise", "to_float"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) pixels -> (N, C, H, W) float32: uint8 scaled to [0, 1], other dtypes taken as they are."""
    x = images.permute(0, 3, 1, 2)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def normalise(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of an (N, C, H, W) batch, contiguous."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()
