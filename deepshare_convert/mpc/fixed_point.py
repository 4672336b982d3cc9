"""The fixed-point format on shares: activations at 2^-ACTIVATION_BITS, model coefficients at 2^-WEIGHT_BITS.

Why two scales rather than CrypTen's one (16 bits for everything):

* **Gate flips.**  A secret value carries the rounding of every truncation before it, tens of
  units of its grid after a deep network.  A prototype's pre-activation within that distance of
  zero may take the other side of the comparison on shares, and under DeepShare a flipped
  prototype moves every replicate channel that reads its gate (``α·x_c`` each), not just itself.
  With 16 bits a trained DeepLabV3-MobileNetV2 at 3% flipped a prototype on every full 180x240
  CamVid frame tried (97.8-99.6% of the label map equal to plaintext), with 22 bits on 8 of 88
  frame runs, with 24 on 2 of 72; the error shrinks with the activation grid, so activations get
  24 bits (docs/private_inference.md, *Accuracy*).
* **Truncation failures.**  A product ``x·w`` sits at scale ``2^(A+W)`` until the local two-party
  truncation (each party divides its own share) brings it back to ``2^A``.  That truncation is
  off by ``2^(64-W)`` units when the shares wrap, with probability about ``|x·w|·2^(A+W-64)``
  per element: ``A + W`` is a budget, ``PRODUCT_BITS``, kept at CrypTen's 32 so that large
  models fail no more often than they did.  Within it, coefficients need fewer bits than
  activations: the deployed model is snapped to the coefficient grid once
  (:func:`~.prepare.prepare`), so the plaintext reference carries the same weights and the grid
  moves only the model itself, by less than noise (ResNet-20/56 top-1 and the DeepLab's mIoU did
  not drop from 2^-16 down to 2^-8).  A model whose weights are all far below 2^-8 would need
  per-channel coefficient scales, which this format does not have yet.

Public constants that are not model weights -- the coefficients of separable maps (bilinear
upsampling, uneven pooling) and numbers written in the graph (a LeakyReLU's slope, ``x * 0.1``)
-- use 16 bits: the plaintext reference uses them exactly, and ``1/3`` or ``0.01`` need a fine
grid.  To stay within the budget their input is first truncated to ``PRODUCT_BITS -
CONSTANT_BITS`` fractional bits (local, one more unit of rounding at that grid).  A constant
already on the weight grid (``0.5``, ``2``) takes the weights' exact path instead.

Bytes and rounds do not depend on the scales (the ring is 2^64 either way).

**Truncation** (``TRUNCATION``, the setting :func:`truncation_mode` reads): ``"exact"`` divides every
product by the dealer-assisted protocol of :mod:`.truncation` (no failure while the value before the
division stays below 2^62 in the ring; one opening per truncating node), ``"local"`` keeps the local
truncation and its failure probability above.  ``$DEEPSHARE_TRUNCATION`` overrides the default for a
process and the parties it spawns; the plan hash carries the choice, so parties that differ refuse.
"""

from __future__ import annotations

import os

import torch

__all__ = ["TRUNCATION", "TRUNCATION_MODES", "truncation_mode",
           "ACTIVATION_BITS", "WEIGHT_BITS", "CONSTANT_BITS", "PRODUCT_BITS", "ACTIVATION_SCALE", "WEIGHT_SCALE",
           "CONSTANT_SCALE", "encode_weight", "on_weight_grid"]  # fmt: skip

ACTIVATION_BITS = 24
WEIGHT_BITS = 8
PRODUCT_BITS = ACTIVATION_BITS + WEIGHT_BITS  # the scale of a product before its truncation (CrypTen's: 16 + 16)
CONSTANT_BITS = 16
ACTIVATION_SCALE = 2**ACTIVATION_BITS
WEIGHT_SCALE = 2**WEIGHT_BITS
CONSTANT_SCALE = 2**CONSTANT_BITS
TRUNCATION_MODES = ("exact", "local")
TRUNCATION = "local"


def truncation_mode(mode: str | None = None) -> str:
    """``mode``, else ``$DEEPSHARE_TRUNCATION``, else :data:`TRUNCATION`; refused unless one of the modes."""
    mode = mode or os.environ.get("DEEPSHARE_TRUNCATION") or TRUNCATION
    if mode not in TRUNCATION_MODES:
        from ..errors import DeepShareError

        raise DeepShareError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")
    return mode


def on_weight_grid(t: torch.Tensor) -> bool:
    """Is every value a multiple of 2^-WEIGHT_BITS (then the weights' path multiplies by it exactly)?"""
    t = t.detach().double()
    return bool(torch.equal(torch.round(t * WEIGHT_SCALE) / WEIGHT_SCALE, t))


def encode_weight(t: torch.Tensor, scale: int = WEIGHT_SCALE) -> torch.Tensor:
    """A public coefficient tensor as ring integers: ``round(t * scale)`` (CrypTen's encoder rule)."""
    return torch.round(t.detach().double() * scale).long()
