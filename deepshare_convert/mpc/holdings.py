"""What a process holds: digests of every tensor alive in it, for the threat-model tests.

Kept apart from the launcher so the dealer's randomness can digest what it deals without
importing the launcher (which imports the dealer).
"""

from __future__ import annotations

import gc
import hashlib

import numpy as np
import torch

__all__ = ["tensor_digest", "plaintext_inventory", "unmasked_openings"]


def tensor_digest(t: torch.Tensor | np.ndarray) -> str:
    """A content digest of a float tensor (dtype, shape and bytes)."""
    a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    h = hashlib.sha1(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def plaintext_inventory() -> list[str]:
    """Digests of every non-empty floating or integer tensor / array alive in this process.

    Integers too: a ring element (a mask, an activation encoded at 2^ACTIVATION_BITS) is an int64.
    """
    import warnings

    seen: set[str] = set()
    with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
    for obj in objects:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                is_tensor, is_array = isinstance(obj, torch.Tensor), isinstance(obj, np.ndarray)
            if is_tensor and obj.dtype != torch.bool and obj.numel() and obj.device.type == "cpu" \
                    and not obj.is_meta and not obj.is_complex():
                seen.add(tensor_digest(obj))
            elif is_array and obj.dtype.kind in "fi" and obj.size:
                seen.add(tensor_digest(obj))
        except Exception:  # noqa: BLE001,S112 - meta tensors, half-built objects: not plaintext data
            continue
    return sorted(seen)


def unmasked_openings(openings) -> list[str]:
    """What this process could recover from the openings it received: digests of ``ε + a`` per opening.

    ``a`` is the mask in the clear where this process holds it (a simulated dealer's party 0), else its
    own share of it -- the adversary's best guess.  ``ε + a`` is then the opened activation itself,
    or a value still masked by the other party's share.
    """
    return sorted({tensor_digest(o.eps + (o.a.plain if o.a.plain is not None else o.a.share)) for o in openings})
