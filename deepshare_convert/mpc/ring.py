"""Exact linear algebra mod 2^64 on int64 shares, through float64 kernels.

CPU int64 convolution / matmul has no fast kernel (~15-20x slower than float64 here), and a
share is a uniform 64-bit integer, so one float64 product cannot hold it.  Every bilinear op
``fn`` (conv2d, matmul) is computed as ``fn(x, w) = sum_k fn(x_k, w) << (k*b)  (mod 2^64)``
over *signed* b-bit chunks ``x_k`` of the share: each chunk's product is an integer of
magnitude at most ``2^(b-1) * L1(w)`` (``L1`` = the largest per-output sum of ``|w|``, which
bounds every partial sum too), so it is exact in float64 whenever that is ``<= 2^53``, in any
summation order.  Chunks are stacked along the batch dimension: one kernel call per weight.

* public weights (:class:`RingWeight`): ``b = 54 - bits(L1)``; two chunks when
  ``L1 < 2^22``, which :func:`weight_frac_bits` arranges per layer by choosing the weight's
  fixed-point scale.
* two ring operands (:func:`ring_bilinear`, the private-weight products): the weight is split
  too, into signed limbs ``w_j``, and limb ``j`` only needs its product mod ``2^(64 - j*bw)``,
  so it takes fewer share chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "RingWeight", "ring_apply", "ring_bilinear", "ring_conv2d", "ring_linear", "split_signed",
    "weight_frac_bits", "TWO_CHUNK_L1_BITS",
]  # fmt: skip

RING_BITS = 64
_EXACT = 53  # float64 holds every integer of magnitude <= 2^53
TWO_CHUNK_L1_BITS = _EXACT + 1 - 32  # L1(w) < 2^22: 32-bit chunks, two per share

Bilinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _l1_bits(w: torch.Tensor) -> int:
    """bits(max over outputs of sum |w|): the bound on every partial sum of a unit input."""
    if w.numel() == 0:
        return 0
    l1 = w.reshape(w.shape[0], -1).abs().sum(1).max() if w.dim() > 1 else w.abs().max()
    return int(l1.item()).bit_length()


def split_signed(x: torch.Tensor, b: int, bits: int = RING_BITS) -> list[torch.Tensor]:
    """Signed b-bit chunks c_k (|c_k| <= 2^(b-1)) with x = sum c_k << (k*b)  (mod 2^bits)."""
    out, rest = [], x
    for k in range(-(-bits // b)):
        if k == -(-bits // b) - 1:  # the top chunk: any representative mod 2^(bits - k*b)
            top = bits - k * b
            out.append(torch.bitwise_right_shift(torch.bitwise_left_shift(rest, 64 - top), 64 - top))
            break
        lo = torch.bitwise_right_shift(torch.bitwise_left_shift(rest, 64 - b), 64 - b)
        out.append(lo)
        rest = torch.bitwise_right_shift(rest - lo, b)
    return out


def ring_apply(x: torch.Tensor, wf: torch.Tensor, l1_bits: int, fn: Bilinear, bits: int = RING_BITS):
    """fn(x, w) mod 2^bits for int64 x and a float64 integer weight ``wf`` with L1 < 2^l1_bits.

    Returns None when the weight is too large for chunks of at least 8 bits (caller falls back).
    """
    b = min(_EXACT + 1 - l1_bits, bits)
    if b < 8:
        return None
    chunks = split_signed(x, b, bits)
    n = x.shape[0]
    y = fn(torch.cat(chunks, 0).double(), wf).long()  # exact integers: no rounding needed
    out = y[:n]
    for k in range(1, len(chunks)):
        out = out + torch.bitwise_left_shift(y[k * n : (k + 1) * n], k * b)
    return out


@dataclass
class RingWeight:
    """A public integer weight prepared once per layer: float64 copy and its L1 bound."""

    w: torch.Tensor  # int64
    wf: torch.Tensor  # float64, same values
    l1_bits: int
    frac_bits: int  # the weight's fixed-point scale is 2^frac_bits

    @classmethod
    def of(cls, w: torch.Tensor, frac_bits: int = 0) -> RingWeight:
        return cls(w, w.double(), _l1_bits(w), frac_bits)

    @classmethod
    def encode(cls, weight: torch.Tensor, max_frac_bits: int, min_frac_bits: int = 10) -> RingWeight:
        """Round a float weight at the per-layer scale of :func:`weight_frac_bits`."""
        f = weight_frac_bits(weight, max_frac_bits, min_frac_bits)
        return cls.of(torch.round(weight.detach().double() * 2.0**f).long(), f)

    @property
    def chunks(self) -> int:
        b = _EXACT + 1 - self.l1_bits
        return -(-RING_BITS // b) if b >= 8 else 0


def weight_frac_bits(weight: torch.Tensor, max_frac_bits: int, min_frac_bits: int = 10) -> int:
    """The largest weight scale 2^f (f <= max) whose encoded L1 stays < 2^22, i.e. two chunks per share.

    Below ``min_frac_bits`` the weight would lose precision; then keep ``max_frac_bits``
    (three chunks).  The result is truncated by 2^f, so activations keep their own scale.
    """
    w = weight.detach().double()
    for f in range(max_frac_bits, min_frac_bits - 1, -1):
        if _l1_bits(torch.round(w * 2.0**f).long()) <= TWO_CHUNK_L1_BITS:
            return f
    return max_frac_bits


def ring_conv2d(share: torch.Tensor, w: torch.Tensor | RingWeight, **kwargs) -> torch.Tensor:
    """conv2d(share, w) mod 2^64 for an int64 share and a public int64 weight, exactly."""
    rw = w if isinstance(w, RingWeight) else RingWeight.of(w)
    out = ring_apply(share, rw.wf, rw.l1_bits, lambda u, v: torch.conv2d(u, v, **kwargs))
    return out if out is not None else torch.conv2d(share, rw.w, **kwargs)


def ring_linear(share: torch.Tensor, w: torch.Tensor | RingWeight) -> torch.Tensor:
    """share @ w.T mod 2^64 (w: (out, in)), exactly."""
    rw = w if isinstance(w, RingWeight) else RingWeight.of(w)
    out = ring_apply(share, rw.wf.t(), rw.l1_bits, torch.matmul)
    return out if out is not None else torch.matmul(share, rw.w.t())


@dataclass
class RingLimbs:
    """A full-ring int64 operand split once into signed limbs (float64) for :func:`ring_bilinear`."""

    limbs: list[torch.Tensor]
    l1_bits: list[int]
    bw: int


def _limb_plan(fan_in: int) -> int:
    """The limb width minimising the number of float64 kernel units for this fan-in."""
    k_bits = max(fan_in, 1).bit_length()
    best, best_units = 16, None
    for bw in range(8, 33):
        units, ok = 0, True
        for j in range(-(-RING_BITS // bw)):
            b = min(_EXACT + 1 - (bw - 1 + k_bits), RING_BITS - j * bw)
            if b < 8:
                ok = False
                break
            units += -(-(RING_BITS - j * bw) // b)
        if ok and (best_units is None or units < best_units):
            best, best_units = bw, units
    return best


def split_limbs(w: torch.Tensor, fan_in: int) -> RingLimbs:
    bw = _limb_plan(fan_in)
    limbs = split_signed(w, bw)
    return RingLimbs([t.double() for t in limbs], [_l1_bits(t) for t in limbs], bw)


def ring_bilinear(x: torch.Tensor, w: torch.Tensor | RingLimbs, fn: Bilinear, fan_in: int) -> torch.Tensor:
    """fn(x, w) mod 2^64 for two uniform int64 ring operands (fn bilinear, batch along dim 0)."""
    rl = w if isinstance(w, RingLimbs) else split_limbs(w, fan_in)
    out = None
    for j, (limb, l1) in enumerate(zip(rl.limbs, rl.l1_bits)):
        bits = RING_BITS - j * rl.bw
        y = ring_apply(x, limb, l1, fn, bits)
        if y is None:  # cannot happen with the limb plan; the exact int64 kernel as a safety net
            y = fn(x, limb.long())
        y = torch.bitwise_left_shift(y, j * rl.bw) if j else y
        out = y if out is None else out.add_(y)
    return out
