"""Two-party protocols on top of CrypTen's arithmetic shares (``ArithmeticSharedTensor``).

CrypTen's ReLU is ``x * (x >= 0)``: a comparison (A2B, an adder circuit, and a 1-bit B2A that
opens ``z = bit XOR r`` for a random bit ``r`` whose arithmetic sharing ``[r]`` it then
discards) followed by a Beaver multiplication that opens ``x - a`` *and* ``g - b`` (2n
elements).  We keep the comparison exactly as CrypTen does it, but keep ``[r]`` and ``z``:

    g = DReLU(x) = 1 - (r XOR z) = (1 - z) + (2z - 1)·r        (z public, r a shared bit)
    x·g          = x·(1 - z) + (2z - 1)·(x·r)

and ``x·r`` needs only ``x - a`` opened, with a dealer triple ``(a, c = a·r)``: ``r`` is
already the random mask of the second operand, so there is no ``g - b`` to open.  This halves
the bytes of every gate product, and it composes with DeepShare: a group's ``z`` and ``[r]``
are replicated to all C channels by local indexing and serve every site of the group.

In ``public`` mode α and β are plaintext, so ``y = α·(x·g) + β·x`` costs one opening of
``x - a`` per site (n elements, one round).  In ``private`` mode ``α·g`` opens only ``α - a'``
(C elements; g's mask is reused again) and ``x·(α·g + β)`` is a Beaver product (2n).

Correlated randomness comes from :class:`Dealer`, simulated the way CrypTen's default
"trusted first party" provider simulates it: party 0 samples and shares with pseudo-random
zero sharings, no communication counted.  In a deployment this is the offline phase (a
dealer or OT/HE preprocessing); the counted bytes and rounds are the online phase, as for
every CrypTen number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..compat import import_crypten

__all__ = ["Dealer", "MaskedBit", "drelu", "gate_product", "relu", "public_affine", "private_site",
           "public_conv2d", "public_linear", "ring_conv2d", "maxpool2d", "public_separable"]  # fmt: skip

RING_BITS = 64


def _ast():
    import_crypten()
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

    return ArithmeticSharedTensor, BinarySharedTensor


class Dealer:
    """Correlated randomness for the online phase (party 0 samples, as CrypTen's TFP does).

    Every party makes the same calls in the same order; only party 0's tensors carry values.
    """

    def __init__(self, rank: int, seed: int | None = None):
        self.rank = rank
        self.comparisons = 0  # elements compared so far (counted where the comparison runs)
        self.gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "big"))

    def _ring(self, size) -> torch.Tensor:
        return torch.randint(-(2**63), 2**63 - 1, tuple(size), dtype=torch.long, generator=self.gen)

    def share(self, plain: torch.Tensor | None, size):
        A, _ = _ast()
        if self.rank == 0:
            return A(plain, precision=0, src=0)
        return A(None, size=tuple(size), precision=0, src=0)

    def random_bit(self, size):
        """(r plaintext at the dealer or None, [r] arithmetic, <r> binary)."""
        A, B = _ast()
        r = torch.randint(0, 2, tuple(size), dtype=torch.long, generator=self.gen) if self.rank == 0 else None
        r_a = self.share(r, size)
        r_b = B(r, src=0) if self.rank == 0 else B(None, size=tuple(size), src=0)
        return r, r_a, r_b

    def bit_triple(self, a_size, r: torch.Tensor | None, r_size):
        """([a], [a·r]) for uniform a of ``a_size`` broadcast against the bit tensor r."""
        a = self._ring(a_size) if self.rank == 0 else None
        out_size = torch.broadcast_shapes(tuple(a_size), tuple(r_size))
        c = (a * r) if self.rank == 0 else None
        return self.share(a, a_size), self.share(c, out_size)


@dataclass
class MaskedBit:
    """A DReLU bit as ``g = (1 - z) + (2z - 1)·r``: z public, r a dealer bit ([r] shared)."""

    z: torch.Tensor  # public 0/1, long
    r_shared: object  # ArithmeticSharedTensor of r (precision 0)
    r_plain: torch.Tensor | None  # the dealer's r (party 0 only)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.z.shape)

    def replicate(self, mapping: torch.Tensor | None, dim: int = 1) -> MaskedBit:
        """Channel c takes the bit of prototype mapping[c]: local indexing of shares."""
        if mapping is None:
            return self
        r = self.r_shared.shallow_copy()
        r.share = self.r_shared.share.index_select(dim, mapping)
        plain = self.r_plain.index_select(dim, mapping) if self.r_plain is not None else None
        return MaskedBit(self.z.index_select(dim, mapping), r, plain)


def drelu(x, dealer: Dealer) -> MaskedBit:
    """DReLU(x) = (x >= 0): CrypTen's comparison (same messages as ``_ltz``), keeping its mask."""
    import_crypten()
    from crypten.mpc.primitives.converters import _A2B

    dealer.comparisons += x.nelement()
    xb = _A2B(x)
    xb.share = xb.share >> (RING_BITS - 1)
    bit = xb & 1
    r, r_a, r_b = dealer.random_bit(bit.size())
    z = (bit ^ r_b).reveal()  # the B2A opening: msb XOR r (uniform)
    # msb(x) = r XOR z  =>  DReLU = 1 - msb = 1 - z - (1 - 2z)·r
    return MaskedBit(z & 1, r_a, r)


def _x_times_r(x, bit: MaskedBit, dealer: Dealer):
    """[x·r] with one opening of x - a (the bit r is the dealer's own mask)."""
    a, c = dealer.bit_triple(x.size(), bit.r_plain, bit.shape)
    eps = _open(x.share - a.share)
    out = c.shallow_copy()
    out.share = c.share + eps * bit.r_shared.share
    out.encoder = x.encoder
    return out


def _open(share: torch.Tensor) -> torch.Tensor:
    """Open a masked value to both parties (CrypTen's all_reduce: counted n elements each way)."""
    import crypten.communicator as comm

    return comm.get().all_reduce(share)


def gate_product(x, bit: MaskedBit, dealer: Dealer):
    """[x·g] for a DReLU bit g given as a MaskedBit of x's shape: opens x - a only."""
    xr = _x_times_r(x, bit, dealer)
    out = x.shallow_copy()
    out.share = x.share * (1 - bit.z) + xr.share * (2 * bit.z - 1)
    return out


def relu(x, dealer: Dealer):
    """ReLU(x) = x·DReLU(x): one comparison per element + one masked product."""
    return gate_product(x, drelu(x, dealer), dealer)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def public_affine(xg, x, alpha: torch.Tensor, beta: torch.Tensor):
    """α·(x·g) + β·x with public per-channel α, β: local, one truncation."""
    scale = x.encoder.scale
    a = _channel_view(torch.round(alpha.double() * scale).long(), x.dim())
    b = _channel_view(torch.round(beta.double() * scale).long(), x.dim())
    out = x.shallow_copy()
    out.share = xg.share * a + x.share * b
    return out.div_(scale)


def private_site(x, bit: MaskedBit, alpha, beta, dealer: Dealer):
    """x·(α·g + β) with secret α, β (C,): α·g opens α - a' (C elements), then a Beaver x·s."""
    nd = x.dim()
    alpha_v = alpha.view((1, -1) + (1,) * (nd - 2))
    beta_v = beta.view((1, -1) + (1,) * (nd - 2))
    a, c = dealer.bit_triple(alpha_v.size(), bit.r_plain, bit.shape)
    eps = _open(alpha_v.share - a.share)
    alpha_r = c.share + eps * bit.r_shared.share  # [α·r] at α's scale
    s = alpha_v.shallow_copy()
    s.share = alpha_v.share * (1 - bit.z) + alpha_r * (2 * bit.z - 1) + beta_v.share
    return x.mul(s)  # Beaver product (opens x - a and s - b), then truncation


def public_conv2d(x, weight: torch.Tensor, bias: torch.Tensor | None, **kwargs):
    """Convolution with plaintext weights on shares: local (each party convolves its share).

    Computed as :func:`ring_conv2d` (exact mod 2^64, through float64 convolutions), then the
    usual local truncation by the weight scale.
    """
    scale = x.encoder.scale
    w = torch.round(weight.detach().double() * scale).long()
    out = x.shallow_copy()
    out.share = ring_conv2d(x.share, w, **kwargs)
    out = out.div_(scale)
    return out + _channel_view(bias, out.dim()) if bias is not None else out


_FLOAT64_EXACT_BITS = 52


def ring_conv2d(share: torch.Tensor, w: torch.Tensor, **kwargs) -> torch.Tensor:
    """conv2d(share, w) mod 2^64 for int64 tensors, exactly, via float64 convolutions.

    CPU int64 convolution has no fast kernel (~15x slower than float64 here).  Split the share
    into unsigned b-bit chunks, b chosen so that every chunk's convolution is below 2^52 in
    magnitude (exact in float64): b = 52 - bits(max|w|) - bits(fan-in).  Then
    conv(share) = sum_k conv(chunk_k) << (k*b)  (mod 2^64).  Falls back to the int64 kernel
    when the weights are too large for chunks of at least 8 bits.
    """
    fan_in = w[0].numel()
    w_bits = int(w.abs().max().item()).bit_length() if w.numel() else 0
    b = _FLOAT64_EXACT_BITS - w_bits - max(fan_in - 1, 1).bit_length()
    if b < 8:
        return torch.conv2d(share, w, **kwargs)
    b = min(b, 32)
    chunks = -(-64 // b)
    wf = w.double()
    mask = (1 << b) - 1
    out = None
    for k in range(chunks):
        part = torch.bitwise_and(torch.bitwise_right_shift(share, k * b), mask).double()
        y = torch.conv2d(part, wf, **kwargs).round_().long()
        y = torch.bitwise_left_shift(y, k * b) if k else y
        out = y if out is None else out.add_(y)
    return out


def public_linear(x, weight: torch.Tensor, bias: torch.Tensor | None):
    out = x.matmul(weight.t())
    return out + bias if bias is not None else out


def public_separable(x, a_h: torch.Tensor, a_w: torch.Tensor):
    """``A_h · x · A_wᵀ`` on the last two axes of shares, public matrices: local to each party.

    An axis whose matrix only picks pixels (see :func:`.resample.as_selection`) is a gather of
    shares; any other is an integer matmul by the coefficients on the fixed-point grid followed
    by CrypTen's truncation by the scale, which for two parties is local (each party divides its
    own share, ``ArithmeticSharedTensor.div_``): no communication either way.
    """
    from .resample import as_selection

    out = x.shallow_copy()
    scale = x.encoder.scale
    for axis, a in ((-2, a_h), (-1, a_w)):
        pick = as_selection(a)
        if pick is not None:
            out.share = out.share.index_select(out.share.dim() + axis, pick)
            continue
        coef = torch.round(a.double() * scale).long()
        share = out.share
        out.share = (share.transpose(-1, -2) @ coef.t()).transpose(-1, -2) if axis == -2 else share @ coef.t()
        # truncate after each axis: the local truncation fails with probability ~|v|/2^64, so v must stay
        # at scale 2^32 (as after a public convolution), never 2^48
        out = out.div_(scale)
    out.share = out.share.contiguous()
    return out


def maxpool2d(x, kernel_size, stride, padding, dealer: Dealer):
    """Max over each window by a pairwise tree: max(u, v) = v + ReLU(u - v)."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    s = k if stride is None or stride == [] else ((stride, stride) if isinstance(stride, int) else tuple(stride))
    p = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if any(p):  # pad with a very negative public value (max ignores it)
        x = x.pad((p[1], p[1], p[0], p[0]), value=-(2.0**20))
    h_out = (x.size(2) - k[0]) // s[0] + 1
    w_out = (x.size(3) - k[1]) // s[1] + 1
    windows = [
        x.share[:, :, i : i + s[0] * (h_out - 1) + 1 : s[0], j : j + s[1] * (w_out - 1) + 1 : s[1]]
        for i in range(k[0])
        for j in range(k[1])
    ]
    cur = x.shallow_copy()
    cur.share = torch.stack(windows, dim=0)
    while cur.size(0) > 1:
        m = cur.size(0)
        u, v = cur.shallow_copy(), cur.shallow_copy()
        u.share, v.share = cur.share[: m // 2], cur.share[m // 2 : 2 * (m // 2)]
        best = v + relu(u - v, dealer)
        if m % 2:
            best.share = torch.cat([best.share, cur.share[2 * (m // 2) :]], dim=0)
        cur = best
    out = cur.shallow_copy()
    out.share = cur.share[0]
    return out
