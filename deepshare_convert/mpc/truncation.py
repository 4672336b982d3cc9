"""Fixed-point truncation on two-party shares that cannot wrap: a dealer pair opened against a biased value.

Why: every product on shares sits at a finer scale until it is divided by a public integer ``d``
(the weight scale 2^8 after a convolution, an average pool's window, ...).  CrypTen's two-party
division is SecureML's local one -- each party divides its own share -- which is off by about
``2^64 / d`` whenever the two shares wrap around the ring, with probability ``|x| / 2^64`` per
element (``x`` the value before the division, as a ring integer; the shares are uniform).  At the
grids of :mod:`.fixed_point` that is ``|y|·2^-32`` per element of a layer's output ``y``: about 2.7
expected failures per 10,000 inferences of ResNet-18-CIFAR at 6K DReLUs (1.1·10^6 truncated elements,
Σ|y| ≈ 1.1·10^6), and a full CamVid frame truncates some 2·10^7 (one in 64 came back with a logit
error of 4·10^9).

The protocol here (``truncation = "exact"``, :func:`divide`) has **no failure probability** while
``|x| <= 2^62 - d``.  Per truncated element the dealer supplies, like every other correlated value
(party 0's share a draw of its seed, party 1's the dealer's correction; :mod:`.dealer.randomness`):
a uniform ``r`` in Z/2^64 (seeded, no correction), ``[r div d]`` (``r`` read as unsigned) and
``[msb(r)]`` (the top bit, arithmetically shared).  Then, with ``K = d·floor(2^62 / d)``:

1. ``x' = x + K`` lies in ``[0, 2^63)`` (party 0 adds the public bias to its share);
2. the parties open ``c = x' + r mod 2^64`` -- uniform, since ``r`` is: nothing is learnt (one
   round; 8 B per element each way, 16 B in CrypTen's per-party count, as any opening);
3. as integers ``x' = c - r + w·2^64`` with the wrap ``w = msb(r)·(1 - msb(c))`` *exactly*: if
   ``msb(r) = 0`` then ``x' + r < 2^64`` (no wrap); if ``msb(r) = 1`` and it wrapped then
   ``c = x' + r - 2^64 < 2^63``, and if it did not then ``c >= r >= 2^63`` -- because ``x' < 2^63``;
4. with ``2^64 = Q·d + S``: ``x' div d = (c div d) - (r div d) + w·Q + floor(e / d)``, where
   ``e = (c mod d) - (r mod d) + w·S`` lies in ``(-d, 2d)``; the parties compute the first three
   terms (``w·Q = (1 - msb(c))·Q·[msb(r)]``, public coefficient, local) and drop the last;
5. subtract the public ``K / d``.

So the result is ``floor(x / d) + t`` with ``t`` in {0, 1} for a power of two (``S = 0``, ``e`` in
``(-d, d)``): within one unit of the grid of ``x / d``, as the local truncation is when it does not
fail; ``t`` in {-1, 0, 1} for other divisors (avg-pool windows of 9, means): within two units.
Cost per truncated element: 16 B online, one round per truncation (all elements of one division
in one message), and 2 dealt correction elements offline (16 B); the uniform ``r`` costs nothing.

Where it comes from: the masked-opening truncation of Catrina & de Hoogh ("Improved primitives for
secure multiparty integer computation", SCN 2010), with the wrap of the opening obtained exactly
from the two top bits because the value is biased into the lower half of the ring -- the
"positive value, known MSB" trick of Escudero et al. ("Improved primitives for MPC over mixed
arithmetic-binary circuits", CRYPTO 2020) and of SIRNN (Rathee et al., S&P 2021).  The dealer
supplies the pair ``(r, r >> f)`` and the bit that a dealer-free protocol would build from edaBits.

Every truncation of a two-party run goes through crypten's ``ArithmeticSharedTensor.div_`` by an
integer -- this package's ``share.div_(WEIGHT_SCALE)`` and crypten's own after its Beaver products
and average pools alike -- so :func:`exact` routes that one call (:func:`~deepshare_convert.compat.crypten_integer_division`)
while a program runs: no truncation can be missed.  ``truncation = "local"`` keeps crypten's.
"""

from __future__ import annotations

import contextlib

import torch

from ..compat import crypten_integer_division
from .dealer.randomness import Randomness

__all__ = ["exact", "active", "divide", "udiv", "bias"]

RING = 2**64

_ACTIVE: list[Randomness] = []  # the dealer of the innermost exact() block


def _signed(v: int) -> int:
    """A ring element (0 <= v < 2^64) as the int64 that represents it."""
    v %= RING
    return v - RING if v >= 2**63 else v


def udiv(v: torch.Tensor, d: int) -> torch.Tensor:
    """``v div d`` for int64 ``v`` read as an unsigned 64-bit integer (the result as a ring element)."""
    q, s = divmod(RING, d)
    neg = v < 0  # unsigned v + 2^64 = v + Q·d + S, so its quotient is Q + floor((v + S) / d)
    out = torch.div(torch.where(neg, v + s, v), d, rounding_mode="floor")
    return out + neg.long() * _signed(q)


def bias(d: int) -> int:
    """``K = d·floor(2^62 / d)``: added before the opening so that ``x + K`` lies in ``[0, 2^63)``."""
    return d * (2**62 // d)


def divide(x, d: int, dealer: Randomness) -> torch.Tensor:
    """This party's share of ``x / d`` (x an ArithmeticSharedTensor), by the protocol of the module docstring."""
    import crypten.communicator as comm

    if d == 1:
        return x.share
    if d < 1:
        raise ValueError(f"truncation by {d}: the divisor must be a positive integer")
    size = tuple(x.share.shape)
    r = dealer.ring(size)
    r_div = dealer.product(lambda v: udiv(v, d), (r,), size)
    r_msb = dealer.product(lambda v: (v < 0).long(), (r,), size)
    masked = x.share + r.share
    if x.rank == 0:
        masked = masked + bias(d)
    c = comm.get().all_reduce(masked)
    share = (c >= 0).long() * _signed(RING // d) * r_msb.share - r_div.share
    if x.rank == 0:
        share = share + udiv(c, d) - bias(d) // d
    return share


def active() -> bool:
    """Is an :func:`exact` block in force (protocols that pre-scale for the local truncation skip it)?"""
    return bool(_ACTIVE)


@contextlib.contextmanager
def exact(dealer: Randomness):
    """Within the block, every two-party division of a share by a public integer is :func:`divide`."""
    _ACTIVE.append(dealer)
    try:
        with crypten_integer_division(lambda x, d: divide(x, d, dealer)):
            yield
    finally:
        _ACTIVE.pop()
