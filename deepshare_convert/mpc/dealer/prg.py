"""A seeded cryptographic PRG: the stream a party and the dealer both expand from one shared seed.

ChaCha20 (from ``cryptography``) over a 32-byte seed.  Not ``torch.Generator``: Mersenne Twister
is predictable from its outputs, and the other party sees outputs of this stream masked only by
small activations (``x - a`` with ``|x| << 2^64`` shows the top bits of ``a``).
"""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["Stream", "SEED_BYTES"]

SEED_BYTES = 32


class Stream:
    """Uniform ring elements and bits drawn in order from ``seed``: same seed, same calls, same values."""

    def __init__(self, seed: bytes):
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
        self._cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
        self.drawn = 0  # bytes drawn so far (tests compare the parties' and the dealer's positions)

    def _bytes(self, n: int) -> bytes:
        self.drawn += n
        return self._cipher.update(bytes(n))

    def ring(self, size) -> torch.Tensor:
        """Uniform elements of Z/2^64 as int64 (two's complement), of shape ``size``."""
        size = tuple(int(d) for d in size)
        n = int(np.prod(size, dtype=np.int64)) if size else 1
        return torch.from_numpy(np.frombuffer(self._bytes(8 * n), dtype=np.int64).copy()).view(size)

    def bits(self, size, bitlength: int = 64) -> torch.Tensor:
        """Uniform ``bitlength``-bit values (64: every bit of an int64; 1: a 0/1 tensor)."""
        if bitlength == 64:
            return self.ring(size)
        if bitlength != 1:
            raise ValueError(f"bits of length 1 or 64, got {bitlength}")
        size = tuple(int(d) for d in size)
        n = int(np.prod(size, dtype=np.int64)) if size else 1
        return torch.from_numpy((np.frombuffer(self._bytes(n), dtype=np.uint8) & 1).astype(np.int64)).view(size)
