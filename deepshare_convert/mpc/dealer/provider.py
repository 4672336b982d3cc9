"""CrypTen's tuple provider, answered from our :class:`~.randomness.Randomness`.

CrypTen's comparison (``_A2B``: an adder circuit of binary ANDs) and its Beaver products draw
their triples from ``crypten.mpc.get_default_provider()``; the default ("TFP") samples them at
party 0, which then reads every AND's operands from its openings.  :func:`use` registers a
provider that asks the current randomness instead, so the comparison's binary triples come from
the same dealer -- seeded at the parties, corrected for the client -- as our own masks.
"""

from __future__ import annotations

import contextlib

import torch

from ...compat import import_crypten
from .randomness import Randomness

__all__ = ["use", "NAME"]

NAME = "DEEPSHARE_DEALER"


def _meta(size) -> torch.Tensor:
    return torch.empty(tuple(size), device="meta")


def _provider_class():
    import_crypten()
    from crypten.mpc.primitives import ArithmeticSharedTensor as A, BinarySharedTensor as B
    from crypten.mpc.provider.provider import TupleProvider

    class DealerProvider(TupleProvider):
        NAME = NAME

        def __init__(self):
            super().__init__()
            self.randomness: Randomness | None = None

        @property
        def _r(self) -> Randomness:
            if self.randomness is None:
                raise RuntimeError("no dealer randomness installed for this run")
            return self.randomness

        def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
            a, b = self._r.ring(size0), self._r.ring(size1)
            size = getattr(torch, op)(_meta(size0), _meta(size1), *args, **kwargs).shape
            c = self._r.product(lambda u, v: getattr(torch, op)(u, v, *args, **kwargs), (a, b), size)
            return tuple(A.from_shares(t.share, precision=0) for t in (a, b, c))

        def square(self, size, device=None):
            r = self._r.ring(size)
            r2 = self._r.product(lambda u: u * u, (r,), size)
            return A.from_shares(r.share, precision=0), A.from_shares(r2.share, precision=0)

        def generate_binary_triple(self, size0, size1, device=None):
            a, b = self._r.bits(size0), self._r.bits(size1)
            c = self._r.binary_product(lambda u, v: u & v, (a, b), torch.broadcast_shapes(tuple(size0), tuple(size1)))
            return tuple(B.from_shares(t.share) for t in (a, b, c))

        def B2A_rng(self, size, device=None):
            ra, rb = self._r.random_bit(size)
            return A.from_shares(ra.share, precision=0), B.from_shares(rb.share)

        def wrap_rng(self, size, device=None):
            raise NotImplementedError("wrap_rng is for more than two parties")

    return DealerProvider


_instance = None


def _provider():
    global _instance
    if _instance is None:
        import crypten.mpc as mpc

        _instance = _provider_class()()
        getattr(mpc, "__SUPPORTED_PROVIDERS")[NAME] = _instance
    return _instance


@contextlib.contextmanager
def use(randomness: Randomness):
    """Within the block, every CrypTen triple comes from ``randomness`` (restores the provider after)."""
    from crypten.config import cfg

    provider = _provider()
    before, before_r = cfg.mpc.provider, provider.randomness
    cfg.mpc.provider, provider.randomness = NAME, randomness
    try:
        yield provider
    finally:
        cfg.mpc.provider, provider.randomness = before, before_r
