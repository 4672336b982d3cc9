"""Per-step learning-rate schedules: lr(step) from ``start`` to ``end`` over a phase.

* ``linear`` -- linear decay reaching ``end`` at ``decay_end`` of the phase (1.0 by
  default: the whole phase); the paper's Table 7 convention is 0.75, flat after;
* ``cosine`` -- half-cosine from start to end;
* ``poly``   -- (1 - t)^power decay (DeepLab's PolyLR), floored at ``end``;
* ``none``   -- constant ``start``.
"""

from __future__ import annotations

import math

SCHEDULERS = ("linear", "cosine", "poly", "none")

__all__ = ["SCHEDULERS", "lr_at"]


def lr_at(step: int, total_steps: int, start: float, end: float, kind: str = "none", power: float = 0.9,
          decay_end: float = 1.0) -> float:  # fmt: skip
    """Learning rate for ``step`` in [0, total_steps)."""
    if kind == "none" or total_steps <= 1:
        return start
    t = min(max(step / (total_steps - 1), 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * min(t / max(decay_end, 1e-9), 1.0)
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "poly":
        return max(end, start * (1.0 - t) ** power)
    raise ValueError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
