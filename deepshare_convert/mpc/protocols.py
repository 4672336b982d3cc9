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
``x - a`` per site (n elements, one round).

In ``private`` mode every model tensor that multiplies an activation (conv / linear weights,
an unfolded BatchNorm's scale, α and β) is masked **once**, at setup (:func:`mask_weights`):
the dealer draws a uniform ring mask ``b`` for it, the parties open ``δ = W - b`` (all tensors
in one round) and keep ``[W]``, ``[b]`` and ``δ``.  Every later product ``x·W`` takes a triple
``(a, a·b)`` with a fresh ``a`` consistent with that fixed ``b`` and opens only ``ε = x - a``
(:func:`fixed_product`): ``x·W = ε·[W] + [a]·δ + [a·b]``.  A private site opens only ``x - a``
too (:func:`fixed_site`): with the gate's bit ``r`` the dealer also hands out ``a·r``,
``a·r·b_α`` and ``r·b_α``, so ``x·(α·g + β)`` needs no second opening.

Correlated randomness comes from a :class:`~.dealer.randomness.Randomness` (``dealer`` in every
function here): a protocol asks for uniform values (``dealer.ring``) and for products of earlier
ones by name (``dealer.product(fn, operands, size)``), and gets a :class:`~.dealer.randomness.Dealt`
share back -- never a plaintext at a party.  With the separate dealer (:mod:`.dealer`) both parties
expand uniform values from seeds and the client receives corrections for the products: the
offline phase, counted apart (``MPCOp.dealt``).  The counted bytes and rounds here are the online
phase, as for every CrypTen number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import import_crypten
from .dealer.provider import use as use_dealer
from .dealer.randomness import Dealt, Randomness
from .fixed_point import (
    ACTIVATION_BITS,
    CONSTANT_BITS,
    CONSTANT_SCALE,
    PRODUCT_BITS,
    WEIGHT_SCALE,
    encode_weight,
    on_weight_grid,
)
from .ring import RingWeight, ring_conv2d, ring_linear

__all__ = [
    "FixedMask", "MaskedBit", "Opening", "drelu", "drelu_and_open", "gate_product", "relu", "public_affine", "public_scale",
    "fixed_site", "fixed_product", "mask_weights", "open_masked", "public_conv2d", "public_linear", "ring_conv2d",
    "maxpool2d", "public_separable",
]  # fmt: skip

RING_BITS = 64


def _ast():
    import_crypten()
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

    return ArithmeticSharedTensor, BinarySharedTensor


def _arith(d: Dealt):
    """The ArithmeticSharedTensor (precision 0) of a dealt value's share."""
    A, _ = _ast()
    return A.from_shares(d.share, precision=0)


@dataclass
class MaskedBit:
    """A DReLU bit as ``g = (1 - z) + (2z - 1)·r``: z public, r a dealt bit (its arithmetic sharing)."""

    z: torch.Tensor  # public 0/1, long
    r: Dealt  # [r]: this party's share (the value only where it was dealt in the clear)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.z.shape)

    def replicate(self, mapping: torch.Tensor | None, dim: int = 1) -> MaskedBit:
        """Channel c takes the bit of prototype mapping[c]: local indexing of shares."""
        if mapping is None:
            return self
        return MaskedBit(self.z.index_select(dim, mapping), self.r.map(lambda t: t.index_select(dim, mapping)))


def _masked_msb(x, dealer: Randomness):
    """CrypTen's comparison up to its last message: (the binary share of msb(x) XOR r, [r]).

    The adder circuit's AND triples come from ``dealer`` too (:mod:`.dealer.provider`).
    """
    import_crypten()
    from crypten.mpc.primitives import BinarySharedTensor
    from crypten.mpc.primitives.converters import _A2B

    dealer.comparisons += x.nelement()
    with use_dealer(dealer):
        xb = _A2B(x)
    xb.share = xb.share >> (RING_BITS - 1)
    bit = xb & 1
    r_a, r_b = dealer.random_bit(bit.size())
    return bit ^ BinarySharedTensor.from_shares(r_b.share), r_a


def drelu(x, dealer: Randomness) -> MaskedBit:
    """DReLU(x) = (x >= 0): CrypTen's comparison (same messages as ``_ltz``), keeping its mask."""
    masked, r_a = _masked_msb(x, dealer)
    z = masked.reveal()  # the B2A opening: msb XOR r (uniform)
    # msb(x) = r XOR z  =>  DReLU = 1 - msb = 1 - z - (1 - 2z)·r
    return MaskedBit(z & 1, r_a)


def drelu_and_open(x, y, dealer: Randomness) -> tuple[MaskedBit, Opening]:
    """DReLU(x), and ``y - a`` opened in the comparison's last message (one round for both).

    ``y - a`` needs nothing from the comparison, so it travels with the B2A opening of
    ``msb ⊕ r``: each party sends both shares at once (an all-gather of the same bytes as the two
    openings) and XORs / adds them.  The product ``y·g`` of a ReLU or of the site that reads the
    gate's own input then costs no round of its own.
    """
    import crypten.communicator as comm

    masked, r_a = _masked_msb(x, dealer)
    a = dealer.ring(y.size())
    bits, diff = masked.share.flatten(), (y.share - a.share).flatten()
    s0, s1 = comm.get().all_gather(torch.cat([bits, diff]))  # both parties' shares
    n = bits.numel()
    z = (s0[:n] ^ s1[:n]).view(masked.share.shape)
    eps = (s0[n:] + s1[n:]).view(y.share.shape)
    opening = Opening(a, eps)
    if OPENINGS is not None:
        OPENINGS.append(opening)
    return MaskedBit(z & 1, r_a), opening


def _mul(u, v):
    return u * v


def _x_times_r(x, bit: MaskedBit, dealer: Randomness, opening: Opening | None = None):
    """[x·r] with one opening of x - a (the bit r is the dealer's own mask), or x's earlier ``opening``.

    The dealer's ``a·r`` is a product of two dealt values, asked for by name.
    """
    size = torch.broadcast_shapes(tuple(x.size()), bit.shape)
    if opening is None:
        a = dealer.ring(x.size())
        c = dealer.product(_mul, (a, bit.r), size)
        eps = _open(x.share - a.share)
    else:
        a, eps = opening.a, opening.eps
        c = dealer.product(_mul, (a, bit.r), size)
    out = x.shallow_copy()
    out.share = c.share + eps * bit.r.share
    return out


def _open(share: torch.Tensor) -> torch.Tensor:
    """Open a masked value to both parties (CrypTen's all_reduce: counted n elements each way)."""
    import crypten.communicator as comm

    return comm.get().all_reduce(share)


def gate_product(x, bit: MaskedBit, dealer: Randomness, opening: Opening | None = None):
    """[x·g] for a DReLU bit g given as a MaskedBit of x's shape: opens x - a only (or reuses ``opening``)."""
    xr = _x_times_r(x, bit, dealer, opening)
    out = x.shallow_copy()
    out.share = x.share * (1 - bit.z) + xr.share * (2 * bit.z - 1)
    return out


def relu(x, dealer: Randomness):
    """ReLU(x) = x·DReLU(x): one comparison per element + one masked product, whose x - a opening
    rides in the comparison's last message (no round of its own)."""
    bit, opening = drelu_and_open(x, x, dealer)
    return gate_product(x, bit, dealer, opening)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def public_affine(xg, x, alpha: torch.Tensor, beta: torch.Tensor):
    """α·(x·g) + β·x with public per-channel α, β (on the coefficient grid): local, one truncation."""
    a = _channel_view(encode_weight(alpha), x.dim())
    b = _channel_view(encode_weight(beta), x.dim())
    out = x.shallow_copy()
    out.share = xg.share * a + x.share * b
    return out.div_(WEIGHT_SCALE)


def public_scale(x, beta: torch.Tensor):
    """β·x per channel with a public β on the coefficient grid (a linear group's site): local, one truncation."""
    out = x.shallow_copy()
    out.share = x.share * _channel_view(encode_weight(beta), x.dim())
    return out.div_(WEIGHT_SCALE)


_CONSTANT_PRE = 2 ** max(ACTIVATION_BITS + CONSTANT_BITS - PRODUCT_BITS, 0)  # see _by_constant


def public_mul(x, t: torch.Tensor | float):
    """``x · t`` for a public float ``t`` (a BatchNorm scale, a constant in the graph): local, within the budget.

    On the weight grid (a snapped BatchNorm scale, ``0.5``) exactly, with one truncation; any other
    value on the finer constant grid (:func:`_by_constant`).  Not CrypTen's ``mul``, which encodes
    ``t`` at the activation scale and so holds the product at ``2^(2·ACTIVATION_BITS)`` before
    truncating (:mod:`.fixed_point`: a wrap is then far likelier).
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    if not on_weight_grid(t):
        c = encode_weight(t, CONSTANT_SCALE)
        return _by_constant(x, lambda share: share * c)
    out = x.shallow_copy()
    out.share = x.share * encode_weight(t)
    return out.div_(WEIGHT_SCALE)


def _by_constant(x, fn):
    """``fn(share)`` for a linear map with integer coefficients on the 2^-CONSTANT_BITS grid, truncated back.

    The local truncation fails with probability ~|v|/2^64: v stays at scale 2^PRODUCT_BITS, as after a
    convolution, because x is first truncated to PRODUCT_BITS - CONSTANT_BITS fractional bits.  The
    exact truncation (:mod:`.truncation`) has no such budget (v < 2^62 in the ring is enough), so under
    it x is not pre-truncated: one division, one opening, and one rounding less.
    """
    from .truncation import active

    pre = 1 if active() else _CONSTANT_PRE
    out = x.div(pre) if pre > 1 else x.shallow_copy()  # not div_: x's tensor stays as it is
    out.share = fn(out.share)
    return out.div_(CONSTANT_SCALE // pre)


@dataclass
class FixedMask:
    """A model tensor masked once at setup: ``[W]``, ``[b]``, the public ``δ = W - b``, ``b`` at the dealer."""

    weight: object  # [W], ArithmeticSharedTensor at the fixed-point scale
    mask: object  # [b], precision 0
    delta: torch.Tensor  # W - b in the ring, opened once (both parties)
    b: Dealt  # the mask as dealt (its value only where it was dealt in the clear)


def mask_weights(weights: dict, dealer: Randomness) -> dict[str, FixedMask]:
    """Setup: mask every ``name -> [W]`` with its own fixed ``b`` and open all ``W - b`` in one round.

    Each ``b`` is uniform in Z/2^64 and used for exactly one W, so each δ is uniform and says
    nothing about W; it is opened once per loaded model, never per inference.
    """
    if not weights:
        return {}
    masks = {name: dealer.ring(w.size()) for name, w in weights.items()}
    flat = torch.cat([(w.share - masks[name].share).flatten() for name, w in weights.items()])
    opened = _open(flat)
    out, start = {}, 0
    for name, w in weights.items():
        n = w.nelement()
        delta = opened[start : start + n].view(w.size())
        out[name] = FixedMask(w, _arith(masks[name]), delta, masks[name])
        start += n
    return out


@dataclass
class Opening:
    """An activation opened against a fresh dealt mask: ``ε = x - a`` public, ``a`` dealt (a share of it)."""

    a: Dealt
    eps: torch.Tensor


def open_masked(x, dealer: Randomness) -> Opening:
    """Open ``x - a`` for a fresh uniform ``a`` (n elements, one round).

    Every product of ``x`` with a setup-masked tensor can use the same opening (the dealer deals
    ``fn(a, b)`` for each fixed ``b``), so ``x`` is opened once however many such products read it.
    """
    a = dealer.ring(x.size())
    opening = Opening(a, _open(x.share - a.share))
    if OPENINGS is not None:
        OPENINGS.append(opening)
    return opening


OPENINGS: list[Opening] | None = None  # threat-model tests: every opening this process received, when a list


def fixed_product(x, fm: FixedMask, fn, dealer: Randomness, opening: Opening | None = None):
    """[fn(x, W)] for a bilinear ``fn`` (conv, matmul, broadcast mul) and a setup-masked W: opens x - a only.

    ``x·W = ε·[W] + [a]·δ + [a·b]`` with ``ε = x - a``; the dealer's ``c = fn(a, b)`` uses the
    fixed ``b`` and a fresh ``a`` (or the ``a`` of an ``opening`` of this same x).  One local
    truncation, as after CrypTen's Beaver product.
    """
    o = opening or open_masked(x, dealer)
    a, eps = o.a, o.eps
    share = fn(eps, fm.weight.share).add_(fn(a.share, fm.delta))
    c = dealer.product(fn, (a, fm.b), share.shape)
    out = x.shallow_copy()
    out.share = share.add_(c.share)
    return out.div_(WEIGHT_SCALE)


def fixed_site(x, bit: MaskedBit, alpha: FixedMask, beta: FixedMask, dealer: Randomness,
               opening: Opening | None = None):  # fmt: skip
    """x·(α·g + β) with secret, setup-masked α, β (C,): one opening of x - a (n elements), one round.

    With ``g = u + v·r`` (``u = 1 - z``, ``v = 2z - 1`` public) and ``x = ε + a``:
    ``y = u·[αx] + v·[αrx] + [βx]`` where ``[αx] = ε·[α] + δ_α·[a] + [a·b_α]``,
    ``[αr] = δ_α·[r] + [r·b_α]`` and ``[αrx] = ε·[αr] + δ_α·[a·r] + [a·r·b_α]``: the dealer knows
    ``a``, ``r`` and the fixed ``b``'s, so every product of secrets is a dealt share.
    """
    view = (1, -1) + (1,) * (x.dim() - 2)
    o = opening or open_masked(x, dealer)
    a, eps = o.a, o.eps
    size = tuple(x.size())
    b_a, b_b, r = alpha.b.map(lambda t: t.view(view)), beta.b.map(lambda t: t.view(view)), bit.r
    a_ba, a_bb, a_r = (dealer.product(_mul, pair, size) for pair in ((a, b_a), (a, b_b), (a, r)))
    a_r_ba = dealer.product(lambda u, v, w: u * v * w, (a, r, b_a), size)
    r_ba = dealer.product(_mul, (r, b_a), torch.broadcast_shapes(bit.shape, tuple(b_a.share.shape)))
    d_a, d_b = alpha.delta.view(view), beta.delta.view(view)
    xa = eps * alpha.weight.share.view(view) + d_a * a.share + a_ba.share
    xb = eps * beta.weight.share.view(view) + d_b * a.share + a_bb.share
    alpha_r = d_a * r.share + r_ba.share
    xar = eps * alpha_r + d_a * a_r.share + a_r_ba.share
    out = x.shallow_copy()
    out.share = xa * (1 - bit.z) + xar * (2 * bit.z - 1) + xb
    return out.div_(WEIGHT_SCALE)


def public_conv2d(x, weight, bias: torch.Tensor | None, **kwargs):
    """Convolution with plaintext weights on shares: local (each party convolves its share).

    ``weight`` is a float tensor or a :class:`~.ring.RingWeight` prepared once per layer.
    Computed exactly mod 2^64 by :func:`~.ring.ring_conv2d` (the faster exact kernel for this
    layer), then the usual local truncation by the weight scale.
    """
    rw = weight if isinstance(weight, RingWeight) else RingWeight.encode(weight)
    out = x.shallow_copy()
    out.share = ring_conv2d(x.share, rw, **kwargs)
    out = out.div_(WEIGHT_SCALE)
    return out + _channel_view(bias, out.dim()) if bias is not None else out


def public_linear(x, weight, bias: torch.Tensor | None):
    """``x @ W.T + b`` with a plaintext W: local, exact mod 2^64 (:func:`~.ring.ring_linear`), one truncation."""
    rw = weight if isinstance(weight, RingWeight) else RingWeight.encode(weight)
    out = x.shallow_copy()
    out.share = ring_linear(x.share, rw)
    out = out.div_(WEIGHT_SCALE)
    return out + bias if bias is not None else out


def public_separable(x, a_h: torch.Tensor, a_w: torch.Tensor):
    """``A_h · x · A_wᵀ`` on the last two axes of shares, public matrices: local to each party.

    An axis whose matrix only picks pixels (see :func:`.resample.as_selection`) is a gather of
    shares; any other is an integer matmul by the coefficients on the 2^-CONSTANT_BITS grid followed
    by CrypTen's truncation by that scale, which for two parties is local (each party divides its
    own share, ``ArithmeticSharedTensor.div_``): no communication either way.
    """
    from .resample import as_selection

    out = x.shallow_copy()
    for axis, a in ((-2, a_h), (-1, a_w)):
        pick = as_selection(a)
        if pick is not None:
            out.share = out.share.index_select(out.share.dim() + axis, pick)
            continue
        coef = encode_weight(a, CONSTANT_SCALE)
        if axis == -2:
            out = _by_constant(out, lambda share, c=coef: (share.transpose(-1, -2) @ c.t()).transpose(-1, -2))
        else:
            out = _by_constant(out, lambda share, c=coef: share @ c.t())
    out.share = out.share.contiguous()
    return out


def maxpool2d(x, kernel_size, stride, padding, dealer: Randomness):
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
