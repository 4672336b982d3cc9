"""Correlated randomness as each participant sees it: the same calls, in the same order, everywhere.

A protocol asks for uniform ring elements (Beaver masks ``a``, weight masks ``b``), uniform bits
(the comparison's ``r``, binary triples) and *products* of earlier values by name -- ``fn(a, r)``
for a function both sides know -- and gets back a :class:`Dealt`: its own share and, only where
the value was dealt in the clear, the plaintext.  Three views answer:

* :class:`SeededParty` (a server or a client, ``dealer = "separate"``): every uniform value is
  expanded from the seed it shares with the dealer, with no traffic; a product's share is the
  server's seed draw, and the client's is the *correction* ``c - PRG(seed_0)`` the dealer sent.
  Neither party ever holds a plaintext (``Dealt.plain`` is None).
* :class:`DealingView` (the dealer): expands *both* seeds, so it knows every value, computes
  each product and records the client's correction.  It never sees an opening.
* :class:`SimulatedDealer` (``dealer = "simulated"``): party 0 samples everything and shares it,
  as CrypTen's trusted-first-party provider does.  For measurement only: party 0 then knows every
  mask and can unmask the client's input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...errors import DeepShareError
from .prg import Stream

__all__ = ["Dealt", "Randomness", "SeededParty", "DealingView", "SimulatedDealer", "Corrections", "DEALER_MODES"]

DEALER_MODES = ("separate", "simulated")


@dataclass
class Dealt:
    """One participant's part of a dealt value: its share (int64) and, where it was dealt, the value."""

    share: torch.Tensor
    plain: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Dealt:
        """A local, share-wise map (indexing, a view): applies to the share and to the value alike."""
        return Dealt(fn(self.share), None if self.plain is None else fn(self.plain))


def _size(size) -> tuple[int, ...]:
    return tuple(int(d) for d in size)


class Randomness(ABC):
    """The dealer's randomness at one participant (see the module docstring for the three views)."""

    mode = "separate"
    holds_plaintext = False  # True where this process learns dealt values in the clear

    def __init__(self):
        self.comparisons = 0  # elements compared so far (counted where the comparison runs)
        self.dealt_digests: set[str] | None = None  # threat-model tests: digests of every uniform value dealt in the clear

    def _record(self, plain: torch.Tensor | None) -> None:
        if self.dealt_digests is not None and plain is not None:
            from ..holdings import tensor_digest

            self.dealt_digests.add(tensor_digest(plain))

    @abstractmethod
    def ring(self, size) -> Dealt:
        """A uniform element of Z/2^64 per position, additively shared."""

    @abstractmethod
    def bits(self, size, bitlength: int = 64) -> Dealt:
        """Uniform ``bitlength``-bit values, XOR-shared."""

    @abstractmethod
    def product(self, fn: Callable[..., torch.Tensor], operands: Sequence[Dealt], size) -> Dealt:
        """An additive sharing of ``fn(*values)`` (of shape ``size``) for earlier dealt ``operands``."""

    @abstractmethod
    def binary_product(self, fn: Callable[..., torch.Tensor], operands: Sequence[Dealt], size) -> Dealt:
        """An XOR sharing of ``fn(*values)`` (e.g. ``a & b`` of a binary triple)."""

    def random_bit(self, size) -> tuple[Dealt, Dealt]:
        """A uniform bit r as (arithmetic [r], binary <r>): the comparison's B2A mask."""
        rb = self.bits(size, 1)
        return self.product(lambda r: r, (rb,), size), rb


class Corrections:
    """The client's queue of one inference's corrections (``c - PRG(seed_0)``), read in the order dealt."""

    def __init__(self, flat: torch.Tensor):
        self.flat, self.used = flat, 0

    def take(self, size) -> torch.Tensor:
        size = _size(size)
        n = int(torch.Size(size).numel())
        if self.used + n > self.flat.numel():
            raise DeepShareError(f"the dealer sent {self.flat.numel()} correction elements, the run needs more: "
                                 "the dealer runs another program")  # fmt: skip
        out = self.flat[self.used : self.used + n].view(size)
        self.used += n
        return out

    def finish(self) -> None:
        if self.used != self.flat.numel():
            raise DeepShareError(f"the dealer sent {self.flat.numel()} correction elements, the run used {self.used}: "
                                 "the dealer runs another program")  # fmt: skip


class SeededParty(Randomness):
    """A party of the three-process protocol: values from its seed, products from the dealer's corrections."""

    def __init__(self, rank: int, seed: bytes):
        super().__init__()
        self.rank, self.stream = rank, Stream(seed)
        self.corrections: Corrections | None = None  # the client's, one inference's worth (set per run)

    def ring(self, size) -> Dealt:
        return Dealt(self.stream.ring(_size(size)))

    def bits(self, size, bitlength: int = 64) -> Dealt:
        return Dealt(self.stream.bits(_size(size), bitlength))

    def _correlated(self, size) -> Dealt:
        if self.rank == 0:
            return Dealt(self.stream.ring(_size(size)))
        if self.corrections is None:
            raise DeepShareError("no corrections from the dealer for this run")
        return Dealt(self.corrections.take(size))

    def product(self, fn, operands, size) -> Dealt:
        return self._correlated(size)

    def binary_product(self, fn, operands, size) -> Dealt:
        return self._correlated(size)


class DealingView(Randomness):
    """The dealer's side: both seeds, so every value in the clear; each product's client correction recorded."""

    holds_plaintext = True

    def __init__(self, seed0: bytes, seed1: bytes):
        super().__init__()
        self.s0, self.s1 = Stream(seed0), Stream(seed1)
        self.out: list[torch.Tensor] = []  # the client's corrections, in order

    def ring(self, size) -> Dealt:
        size = _size(size)
        v = self.s0.ring(size) + self.s1.ring(size)  # int64 addition wraps: the ring Z/2^64
        self._record(v)
        return Dealt(v, v)

    def bits(self, size, bitlength: int = 64) -> Dealt:
        size = _size(size)
        v = self.s0.bits(size, bitlength) ^ self.s1.bits(size, bitlength)
        self._record(v)
        return Dealt(v, v)

    def _value(self, fn, operands, size) -> torch.Tensor:
        v = fn(*(o.plain for o in operands)).long()
        if tuple(v.shape) != _size(size):
            raise DeepShareError(f"dealt product of shape {tuple(v.shape)} where the protocol expects {_size(size)}")
        return v

    def product(self, fn, operands, size) -> Dealt:
        v = self._value(fn, operands, size)
        self.out.append((v - self.s0.ring(v.shape)).flatten())
        return Dealt(v, v)

    def binary_product(self, fn, operands, size) -> Dealt:
        v = self._value(fn, operands, size)
        self.out.append((v ^ self.s0.ring(v.shape)).flatten())
        return Dealt(v, v)

    def take_corrections(self) -> torch.Tensor:
        """Everything recorded since the last call, as one flat int64 tensor (one message to the client)."""
        flat = torch.cat(self.out) if self.out else torch.zeros(0, dtype=torch.long)
        self.out = []
        return flat


class SimulatedDealer(Randomness):
    """Party 0 samples and shares every value (CrypTen's TFP): no traffic, and no privacy against party 0."""

    mode = "simulated"

    def __init__(self, rank: int, seed: int | None = None):
        import os

        super().__init__()
        self.rank = rank
        self.holds_plaintext = rank == 0
        self.gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "big"))

    def _share(self, plain: torch.Tensor | None, size, binary: bool = False) -> Dealt:
        from crypten.mpc.primitives import ArithmeticSharedTensor as A, BinarySharedTensor as B

        if binary:
            t = B(plain, src=0) if self.rank == 0 else B(None, size=_size(size), src=0)
        else:
            t = A(plain, precision=0, src=0) if self.rank == 0 else A(None, size=_size(size), precision=0, src=0)
        return Dealt(t.share, plain)

    def ring(self, size) -> Dealt:
        v = torch.randint(-(2**63), 2**63 - 1, _size(size), dtype=torch.long, generator=self.gen) if self.rank == 0 else None
        self._record(v)
        return self._share(v, size)

    def bits(self, size, bitlength: int = 64) -> Dealt:
        v = None
        if self.rank == 0:
            hi = 2 if bitlength == 1 else 2**63 - 1
            lo = 0 if bitlength == 1 else -(2**63)
            v = torch.randint(lo, hi, _size(size), dtype=torch.long, generator=self.gen)
        self._record(v)
        return self._share(v, size, binary=True)

    def product(self, fn, operands, size) -> Dealt:
        return self._share(fn(*(o.plain for o in operands)).long() if self.rank == 0 else None, size)

    def binary_product(self, fn, operands, size) -> Dealt:
        return self._share(fn(*(o.plain for o in operands)).long() if self.rank == 0 else None, size, binary=True)
