"""Resampling and pooling as public separable linear maps: ``Y = A_h · X · A_wᵀ`` per channel.

Bilinear / bicubic / nearest ``F.interpolate`` and adaptive average pooling mix pixels with
coefficients that depend only on the (public, static) shapes, never on the data, so on
secret shares they are local: each party multiplies its share by the public matrices. The
matrices are read off PyTorch itself (the op applied to a basis of one-hot rows, one axis at a
time), so they reproduce its coordinate conventions (``align_corners``, ``scale_factor``,
``nearest`` vs ``nearest-exact``) exactly instead of re-deriving them. A matrix whose rows each
pick one pixel (nearest, or upsampling a 1x1 map) is a gather: no arithmetic, no truncation.

No crypten import: the lowering and the tests use the matrices in plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["RESAMPLE_MODES", "interpolate_matrices", "adaptive_pool_matrices", "avg_pool_matrices", "as_selection",
           "apply_separable"]

# interpolation modes that act on each spatial axis separately (PyTorch computes them so; antialiased
# downsampling does not factor this way and is refused by the lowering)
RESAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")


def _axis_matrix(n_in: int, op) -> torch.Tensor:
    """(n_out, n_in): ``op`` applied to the n_in one-hot columns of a (n_in, 1, n_in, 1) batch."""
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1)
    out = op(basis)  # (n_in, 1, n_out, 1)
    return out[:, 0, :, 0].t().contiguous()


def interpolate_matrices(in_hw: Sequence[int], out_hw: Sequence[int], mode: str, align_corners: bool | None = None,
                         scale_factor=None, recompute_scale_factor: bool | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(A_h, A_w) with ``F.interpolate(x, ...) == A_h @ x @ A_wᵀ`` on the last two axes (float64)."""
    if scale_factor is not None and not recompute_scale_factor:
        sf = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else tuple(scale_factor)
        sizes = [dict(scale_factor=(float(sf[0]), 1.0)), dict(scale_factor=(float(sf[1]), 1.0))]
    else:  # the output size decides (PyTorch recomputes the scale from it)
        sizes = [dict(size=(int(out_hw[0]), 1)), dict(size=(int(out_hw[1]), 1))]
    extra = {} if mode.startswith("nearest") else dict(align_corners=bool(align_corners))
    mats = [_axis_matrix(int(n), lambda b, s=s: F.interpolate(b, mode=mode, **s, **extra))
            for n, s in zip(in_hw, sizes)]  # fmt: skip
    return mats[0], mats[1]


def adaptive_pool_matrices(in_hw: Sequence[int], out_hw: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_h, A_w) of ``F.adaptive_avg_pool2d`` from ``in_hw`` to ``out_hw`` (uneven bins included)."""
    return tuple(_axis_matrix(int(n), lambda b, o=int(o): F.adaptive_avg_pool2d(b, (o, 1)))
                 for n, o in zip(in_hw, out_hw))  # type: ignore[return-value]  # fmt: skip


def avg_pool_matrices(in_hw: Sequence[int], kernel_size, stride, padding, ceil_mode: bool = False,
                      count_include_pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(A_h, A_w) of ``F.avg_pool2d`` (ceil_mode and excluded padding too: PyTorch's divisor is a
    product of one count per axis, so the pool factors; ``divisor_override`` does not)."""
    k, s, p = (_pair(v) for v in (kernel_size, stride if stride else kernel_size, padding))
    return tuple(_axis_matrix(int(n), lambda b, i=i: F.avg_pool2d(b, (k[i], 1), (s[i], 1), (p[i], 0), ceil_mode,
                                                                  count_include_pad))
                 for i, n in enumerate(in_hw))  # type: ignore[return-value]  # fmt: skip


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def as_selection(a: torch.Tensor) -> torch.Tensor | None:
    """The column each row picks, when every row of ``a`` is one-hot (a gather); else None."""
    if not bool(((a == 0) | (a == 1)).all()) or not bool((a.sum(1) == 1).all()):
        return None
    return a.argmax(1)


def apply_separable(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """``A_h @ x @ A_wᵀ`` on the last two axes (plaintext reference of what the parties compute)."""
    return a_h.to(x.dtype) @ x @ a_w.to(x.dtype).t()
