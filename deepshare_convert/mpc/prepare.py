"""The deployed model: what both parties run, made from any model the tracer understands.

:func:`prepare` gives a traced, eval-mode copy with gates in ``step`` mode (inference computes
the DReLU, not its GELU surrogate), every BatchNorm that follows a convolution folded into it
(a fold is free in plaintext, a BatchNorm on shares is a multiplication) and every weight on
CrypTen's fixed-point grid.  It is a plaintext model: the lowering, the plaintext reference
and both parties all start from it, so they agree on what "the model" is.

Kept apart from the lowering because it changes the model, while the lowering only reads it;
and apart from the launcher because the plaintext reference (and the tests' grid and folding
checks) need it without starting a party.  No crypten import.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..conversion.tracing import trace

__all__ = ["PRECISION_BITS", "prepare", "snap_to_grid", "snap_input", "fold_batchnorm", "strip_weights"]

PRECISION_BITS = 16  # CrypTen's default fixed-point precision (cfg.encoder.precision_bits)


def prepare(model: nn.Module, precision_bits: int | None = PRECISION_BITS, *,
            leaf_modules: Sequence[str] = ()) -> fx.GraphModule:  # fmt: skip
    """A traced, eval-mode copy with step gates, BatchNorm folded into preceding convs, and every
    floating parameter and buffer snapped to the fixed-point grid (multiples of 2^-precision_bits).

    Snapping makes the deployed model explicit: MPC encodes weights on that grid anyway, so
    the plaintext reference run on the snapped copy differs from MPC only by the protocol's
    own rounding (activation truncation), not by where each weight was rounded.
    ``precision_bits=None`` keeps the float weights. ``leaf_modules`` (class names) are traced
    as opaque calls, as ``--leaf`` does for the census; the lowering then names any it cannot run.
    """
    from ..conversion.gates import set_gate_mode

    gm = trace(model, leaf_modules) if not isinstance(model, fx.GraphModule) else model
    gm = copy.deepcopy(gm).eval()
    set_gate_mode(gm, "step")
    gm = fold_batchnorm(gm)
    if precision_bits is not None:
        snap_to_grid(gm, precision_bits)
    return gm


def snap_to_grid(module: nn.Module, precision_bits: int = PRECISION_BITS) -> nn.Module:
    """Round floating parameters and buffers of ``module`` (in place) to multiples of 2^-bits."""
    scale = float(2**precision_bits)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.round(t.double() * scale) / scale)
    return module


def snap_input(x: torch.Tensor, precision_bits: int = PRECISION_BITS) -> torch.Tensor:
    """The input as the client encodes it (round to the fixed-point grid)."""
    scale = float(2**precision_bits)
    return (torch.round(x.double() * scale) / scale).float()


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold ``conv -> bn`` (and ``linear -> bn1d``) pairs, in place on ``gm``; returns it.

    Only when the conv's output feeds nothing but the BatchNorm and each module is called
    once (a shared module cannot be folded for one call site).  Uses the eval-mode statistics.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    folded = False
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(modules.get(n.target), (nn.BatchNorm2d, nn.BatchNorm1d)):
            continue
        prev = n.args[0] if n.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        bn, lin = modules[n.target], modules.get(prev.target)
        if calls[n.target] != 1 or calls[prev.target] != 1 or not bn.track_running_stats:
            continue
        if isinstance(lin, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fused = fuse_conv_bn_eval(lin.eval(), bn.eval())
        elif isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(lin.eval(), bn.eval())
        else:
            continue
        parent, _, attr = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        n.replace_all_uses_with(prev)
        gm.graph.erase_node(n)
        folded = True
    if folded:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return gm


def strip_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with every floating parameter and buffer zeroed: the architecture only.

    This is what the input party receives in ``private`` mode: the graph, shapes, P counts and
    the gates' channel maps (balanced maps, fixed by C and P) -- never a weight, α or β.
    """
    skel = copy.deepcopy(gm)
    with torch.no_grad():
        for t in list(skel.parameters()) + list(skel.buffers()):
            if t.is_floating_point():
                t.zero_()
    return skel
