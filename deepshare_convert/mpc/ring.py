"""Exact convolution / matmul mod 2^64 of an int64 share by a public integer weight: the fastest kernel.

Two exact kernels compute the same integers (two's-complement wrap-around = arithmetic mod 2^64):

* ``int64``: torch's int64 kernel on the share directly.  One pass; on torch 2.13 / x86 it runs
  at 1.0-2.0x a float64 conv of the same layer, and does not use a second thread.
* ``float64``: signed b-bit chunks ``x_k`` of the share, ``fn(x, w) = sum_k fn(x_k, w) << (k*b)``.
  Each chunk's product is an integer of magnitude ``< 2^(b-1) * L1(w)`` (``L1`` = the largest
  per-output sum of ``|w|``, a bound on every partial sum too), exact in float64 whenever that
  is ``<= 2^53`` whatever the summation order: ``b = 54 - bits(L1)``, two chunks when
  ``L1 < 2^22`` (every BN-folded ResNet-18 layer at CrypTen's 2^16 scale).  Two float64 passes
  plus the splitting: slower than ``int64`` on one thread, faster on two for wide layers.

Which one wins depends on the op and the thread count.  On one thread (each party's default)
the choice is fixed from bench/conv_shares.py: ``int64`` for convolutions, ``float64`` for
matmuls.  With more threads the first call for a (shape, weight, threads) key times both and
remembers the faster (:func:`ring_conv2d`, :func:`ring_linear`).  The answer is the same
integers either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fixed_point import WEIGHT_SCALE, encode_weight

__all__ = ["KERNELS", "RingWeight", "chunked", "ring_conv2d", "ring_linear", "split_signed"]

RING_BITS = 64
_EXACT = 53  # float64 holds every integer of magnitude <= 2^53
KERNELS = ("int64", "float64")
_CHOSEN: dict[tuple, str] = {}  # (op, shapes, kwargs, threads) -> the faster kernel, timed once
# On one thread (each party's default) the choice is fixed, so no inference pays for timing it:
# bench/conv_shares.py measures the int64 conv faster than two float64 passes at every
# ResNet-18 layer, and the float64 matmul ~4x faster than the int64 one.
_ONE_THREAD = {"conv2d": "int64", "linear": "float64"}

Bilinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _l1_bits(w: torch.Tensor) -> int:
    """bits(max over outputs of sum |w|): bounds every partial sum of a product with unit inputs."""
    if w.numel() == 0:
        return 0
    return int(w.reshape(w.shape[0], -1).abs().sum(1).max().item()).bit_length()


def split_signed(x: torch.Tensor, b: int) -> list[torch.Tensor]:
    """Signed b-bit chunks c_k (|c_k| <= 2^(b-1)) with x = sum_k c_k << (k*b)  (mod 2^64)."""
    n = -(-RING_BITS // b)
    out, rest = [], x
    for k in range(n):
        width = min(b, RING_BITS - k * b)  # the top chunk: any representative mod 2^width
        lo = torch.bitwise_right_shift(torch.bitwise_left_shift(rest, RING_BITS - width), RING_BITS - width)
        out.append(lo)
        if k < n - 1:
            rest = torch.bitwise_right_shift(rest - lo, b)  # exact: rest - lo is a multiple of 2^b (mod 2^64)
    return out


def chunked(x: torch.Tensor, wf: torch.Tensor, l1_bits: int, fn: Bilinear) -> torch.Tensor | None:
    """fn(x, w) mod 2^64 through float64 products of signed chunks (``wf`` = w as float64).

    None when the weight is too large for chunks of at least 8 bits.
    """
    b = min(_EXACT + 1 - l1_bits, RING_BITS)
    if b < 8:
        return None
    out = None
    for k, part in enumerate(split_signed(x, b)):
        y = fn(part.double(), wf).long()  # exact integers: no rounding needed
        y = torch.bitwise_left_shift(y, k * b) if k else y
        out = y if out is None else out.add_(y)
    return out


@dataclass
class RingWeight:
    """A public integer weight prepared once per layer: its float64 copy and L1 bound."""

    w: torch.Tensor  # int64
    wf: torch.Tensor  # float64, same values
    l1_bits: int

    @classmethod
    def of(cls, w: torch.Tensor) -> RingWeight:
        return cls(w, w.double(), _l1_bits(w))

    @classmethod
    def encode(cls, weight: torch.Tensor, scale: int = WEIGHT_SCALE) -> RingWeight:
        """A float weight on the coefficient grid (:mod:`.fixed_point`; CrypTen's rule round(w * scale))."""
        return cls.of(encode_weight(weight, scale))

    @property
    def chunks(self) -> int:
        """float64 products per call (0: too large, the int64 kernel only)."""
        b = _EXACT + 1 - self.l1_bits
        return -(-RING_BITS // b) if b >= 8 else 0


def _run(key: tuple, kernels: dict[str, Callable[[], torch.Tensor]], kernel: str | None) -> torch.Tensor:
    """Run ``kernel`` (or the one remembered for ``key``); the first time, time every kernel (best of 3).

    The kernels take turns so that a burst of load elsewhere does not decide the choice.
    """
    name = kernel or _CHOSEN.get(key) or (_ONE_THREAD[key[0]] if torch.get_num_threads() == 1 else None)
    if name in kernels:
        return kernels[name]()
    if len(kernels) == 1:
        return next(iter(kernels.values()))()
    out = next(iter(kernels.values()))()  # warm-up, and the answer (every kernel gives the same integers)
    times = dict.fromkeys(kernels, float("inf"))
    for _ in range(3):
        for name, f in kernels.items():
            tic = time.perf_counter()
            f()
            times[name] = min(times[name], time.perf_counter() - tic)
    _CHOSEN[key] = min(times, key=times.get)
    return out


def _kernels(rw: RingWeight, share: torch.Tensor, fn: Bilinear, int_fn: Callable[[], torch.Tensor]):
    ks = {"int64": int_fn}
    if rw.chunks:
        ks["float64"] = lambda: chunked(share, rw.wf, rw.l1_bits, fn)
    return ks


def ring_conv2d(share: torch.Tensor, w: torch.Tensor | RingWeight, kernel: str | None = None, **kwargs) -> torch.Tensor:
    """conv2d(share, w) mod 2^64 for an int64 share and a public int64 weight, exactly.

    ``kernel`` forces ``int64`` or ``float64`` (tests, benches); by default the faster one.
    """
    rw = w if isinstance(w, RingWeight) else RingWeight.of(w)

    def fn(u, v):
        return torch.conv2d(u, v, **kwargs)

    ks = _kernels(rw, share, fn, lambda: torch.conv2d(share, rw.w, **kwargs))
    key = ("conv2d", tuple(share.shape), tuple(rw.w.shape), repr(sorted(kwargs.items())), torch.get_num_threads())
    return _run(key, ks, kernel if kernel in ks else (None if kernel is None else "int64"))


def ring_linear(share: torch.Tensor, w: torch.Tensor | RingWeight, kernel: str | None = None) -> torch.Tensor:
    """share @ w.T mod 2^64 (w: (out, in)), exactly; ``kernel`` as for :func:`ring_conv2d`."""
    rw = w if isinstance(w, RingWeight) else RingWeight.of(w)
    ks = _kernels(rw, share, lambda u, v: torch.matmul(u, v.t()), lambda: torch.matmul(share, rw.w.t()))
    key = ("linear", tuple(share.shape), tuple(rw.w.shape), torch.get_num_threads())
    return _run(key, ks, kernel if kernel in ks else (None if kernel is None else "int64"))
