"""Model tensors on shares: the private-mode setup (weights masked once), the public weights encoded once
for the ring kernels, and sharing a tensor or the input.

Everything here runs once per loaded model or once per run, before or around the interpreter's
per-node work in :mod:`.executor`.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from . import protocols as P
from .dealer.randomness import Randomness
from .fixed_point import ACTIVATION_BITS, WEIGHT_BITS
from .lowering import Program
from .ring import RingWeight

__all__ = ["bn_affine", "setup_weights", "ring_weight", "prepare_public_weights", "share_model_tensor", "share_input"]


def bn_affine(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm: y = x·scale + shift."""
    scale = m.weight.detach() / torch.sqrt(m.running_var + m.eps) if m.affine else 1 / torch.sqrt(m.running_var + m.eps)
    shift = (m.bias.detach() if m.affine else 0) - m.running_mean * scale
    return scale, shift


def setup_weights(program: Program, rank: int, dealer: Randomness) -> dict[str, P.FixedMask]:
    """The setup phase of ``private`` mode: share every fixed model tensor once and open its ``W - b``.

    Party 0 shares the real tensors; party 1 holds only zeroed placeholders (the weightless
    skeleton) and contributes sizes.  All openings go in one round; the masks serve every
    later :func:`run_program` with the same ``dealer``.
    """
    if program.weights_mode != "private" or not program.fixed:
        return {}
    with torch.no_grad():
        shared = {name: share_model_tensor(_model_tensor(program.gm, name), rank, WEIGHT_BITS) for name in program.fixed}
    return P.mask_weights(shared, dealer)


def ring_weight(program: Program, name: str, w: torch.Tensor) -> RingWeight:
    cached = program.kernels.get(name)
    if cached is None or cached[0] is not w or cached[1] != w._version:  # a new or changed weight is re-encoded
        cached = (w, w._version, RingWeight.encode(w))
        program.kernels[name] = cached
    return cached[2]


def prepare_public_weights(program: Program) -> int:
    """Encode every public conv / linear module weight for the ring kernels now (setup), not in the first run.

    Returns the number of weights prepared (0 in ``private`` mode: those are masked instead).
    """
    if program.weights_mode != "public":
        return 0
    count = 0
    with torch.no_grad():
        for n in program.gm.graph.nodes:
            if n.op == "call_module" and program.op(n.name).handler in ("conv2d", "linear"):
                w = getattr(program.gm.get_submodule(n.target), "weight", None)
                if isinstance(w, torch.Tensor):
                    ring_weight(program, n.name, w)
                    count += 1
    return count


def _model_tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """A fixed tensor by its lowering name: an attribute path, or ``module:scale`` (an unfolded BatchNorm)."""
    if name.endswith(":scale"):
        return bn_affine(gm.get_submodule(name.removesuffix(":scale")))[0]
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def share_model_tensor(t: torch.Tensor, rank: int, bits: int = ACTIVATION_BITS):
    """A model tensor secret-shared by party 0 (party 1 passes its zero placeholder: size only).

    At the activation grid for a tensor that is added to activations (a bias), at ``WEIGHT_BITS``
    for one that multiplies them (the products then truncate by the weight scale).
    """
    from crypten.mpc.primitives import ArithmeticSharedTensor

    t = t.detach().float()
    if rank == 0:
        return ArithmeticSharedTensor(t, precision=bits, src=0)
    return ArithmeticSharedTensor(None, size=t.shape, precision=bits, src=0)


def share_input(x: torch.Tensor | None, shape, rank: int):
    """The input, secret-shared by party 1; party 0 contributes only the (public) shape."""
    from crypten.mpc.primitives import ArithmeticSharedTensor

    if rank == 1:
        return ArithmeticSharedTensor(x.float(), precision=ACTIVATION_BITS, src=1)
    return ArithmeticSharedTensor(None, size=tuple(shape), precision=ACTIVATION_BITS, src=1)
