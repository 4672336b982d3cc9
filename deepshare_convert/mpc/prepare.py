"""The deployed model: what both parties run, made from any model the tracer understands.

:func:`prepare` gives a traced, eval-mode copy with gates in ``step`` mode (inference computes
the DReLU, not its GELU surrogate), every BatchNorm that follows a convolution folded into it
(a fold is free in plaintext, a BatchNorm on shares is a multiplication) and every weight on
the coefficient grid of :mod:`.fixed_point`.  It is a plaintext model: the lowering, the plaintext reference
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
from .fixed_point import ACTIVATION_BITS, WEIGHT_BITS

__all__ = ["PRECISION_BITS", "prepare", "reference", "plain_affine_batchnorm", "snap_to_grid", "snap_input",
           "fold_batchnorm", "strip_weights"]

PRECISION_BITS = WEIGHT_BITS  # the grid model coefficients are snapped to (mpc/fixed_point.py)


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

    gm = trace(model, leaf_modules)  # a GraphModule as it is, but ReLU6/LeakyReLU as ReLU sites
    gm = copy.deepcopy(gm).eval()
    set_gate_mode(gm, "step")
    gm = fold_batchnorm(gm)
    plain_affine_batchnorm(gm)
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


def snap_input(x: torch.Tensor, precision_bits: int = ACTIVATION_BITS) -> torch.Tensor:
    """The input as the client encodes it (round to the activation grid)."""
    scale = float(2**precision_bits)
    return (torch.round(x.double() * scale) / scale).float()


def reference(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plaintext answer MPC is held to: ``gm`` (a :func:`prepare`-d model) on the encoded input, in float64.

    Not float32: its rounding near |x| ~ 8 is about one unit of the activation grid, as large as
    the protocol's own.  ``gm`` itself is left as it is (a float64 copy runs).
    """
    with torch.no_grad():
        return copy.deepcopy(gm).double()(snap_input(x).double()).float()


def plain_affine_batchnorm(module: nn.Module) -> nn.Module:
    """Rewrite every eval-mode affine BatchNorm left after folding as ``x·weight + bias`` (mean 0, var 1, eps 0).

    The same function, but its scale is then a parameter that :func:`snap_to_grid` puts on the
    coefficient grid, so MPC multiplies by exactly the scale the plaintext reference uses (not
    by ``weight / sqrt(var + eps)`` rounded on shares).
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_var is not None:
                std = torch.sqrt(m.running_var.double() + m.eps)
                scale = m.weight.double() / std
                m.bias.copy_(m.bias.double() - m.running_mean.double() * scale)
                m.weight.copy_(scale)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.eps = 0.0
    return module


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold ``conv -> bn`` (and ``linear -> bn1d``) pairs, in place on ``gm``; returns it.

    Only when the conv's output feeds nothing but the BatchNorm and each module is called
    once (a shared module cannot be folded for one call site).  Uses the eval-mode statistics.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    _fold_aten_batchnorm(gm)
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


def _fold_aten_batchnorm(gm: fx.GraphModule) -> None:
    """Fold ``aten.conv2d -> aten.batch_norm(training=False)`` of a torch.export graph, in place.

    The function-form twin of the module fold above: the convolution's weight (and bias) are
    ``get_attr`` tensors used by that convolution alone; the folded weight replaces the
    convolution's parameter and the folded bias becomes a new parameter beside it.
    """
    aten = torch.ops.aten
    folded = False
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not aten.batch_norm.default or len(n.args) < 8:
            continue
        conv, bn_w, bn_b, mean, var, training, _, eps = n.args[:8]
        if training or not isinstance(conv, fx.Node) or conv.target is not aten.conv2d.default or len(conv.users) != 1:
            continue
        w_node = conv.args[1]
        b_node = conv.args[2] if len(conv.args) > 2 else conv.kwargs.get("bias")
        attrs = [a for a in (w_node, b_node, bn_w, bn_b, mean, var) if a is not None]
        if any(not isinstance(a, fx.Node) or a.op != "get_attr" for a in attrs) or len(w_node.users) != 1:
            continue
        if b_node is not None and len(b_node.users) != 1:
            continue
        w = gm.get_parameter(w_node.target) if _is_param(gm, w_node.target) else None
        if w is None or mean is None or var is None:
            continue
        with torch.no_grad():
            scale = torch.rsqrt(_attr(gm, var).double() + eps)
            if bn_w is not None:
                scale = scale * _attr(gm, bn_w).double()
            bias = -_attr(gm, mean).double() * scale
            if bn_b is not None:
                bias = bias + _attr(gm, bn_b).double()
            if b_node is not None:
                bias = bias + _attr(gm, b_node).double() * scale
            w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        owner, _, attr = w_node.target.rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        bias_name = f"{attr}_bn_bias"
        holder.register_parameter(bias_name, nn.Parameter(bias.to(w.dtype), requires_grad=False))
        with gm.graph.inserting_before(conv):
            b_new = gm.graph.get_attr(f"{owner}.{bias_name}" if owner else bias_name)
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[2] = b_new
        conv.args = tuple(args)
        conv.kwargs = {k: v for k, v in conv.kwargs.items() if k != "bias"}
        n.replace_all_uses_with(conv)
        gm.graph.erase_node(n)
        folded = True
    if folded:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()


def _attr(gm: fx.GraphModule, target: fx.Node) -> torch.Tensor:
    t = gm
    for part in target.target.split("."):
        t = getattr(t, part)
    return t


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


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
