"""Per-channel normalisation statistics: the published ones, and one pass over a new image set.

Known datasets use their published numbers (what pretrained models were
trained with); an image folder has none, so they are computed once from its
training split and cached with its pixels.
"""

from __future__ import annotations

import numpy as np

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
TINYIMAGENET_STATS = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
DIGITS_STATS = ((0.5,), (0.5,))


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of uint8 (N,H,W,C) images in [0, 1] units, chunked to bound memory."""
    c = x.shape[-1]
    s, ss, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        s += part.sum(0)
        ss += (part * part).sum(0)
        n += len(part)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean * mean, 0.0))
    return mean, np.where(std > 1e-4, std, 1.0)  # a constant channel: leave it unscaled (and dodge rounding noise)
