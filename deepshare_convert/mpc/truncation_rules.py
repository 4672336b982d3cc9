"""Handler -> the truncations its executor handler performs: what the exact truncation puts on the wire.

Under ``truncation = "exact"`` (:mod:`.truncation`) every division of a share by a public integer is
one opening of its elements (16 B each, CrypTen's per-party count) in one round, and 2 dealt
correction elements each.  Which handlers divide, and how often, follows their executor code
(:mod:`.executor`, :mod:`.local_ops`, :mod:`.protocols`): a rule returns the element count of each
division in the order they happen (sequential: one round each).  The tests hold every rule to the
measured bytes and rounds; a handler without a rule divides nothing (comparisons, gate products,
reshapes, sums, integer products).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from .cost_rules import CostInput, interpolate_args
from .program import node_arg, node_shape, numel
from .resample import adaptive_pool_matrices, as_selection, avg_pool_matrices, interpolate_matrices

__all__ = ["TRUNCATION_RULES", "truncations", "DEALT_PER_TRUNCATED"]

DEALT_PER_TRUNCATED = 2  # the dealer's corrections per truncated element: [r div d] and [msb(r)]


def _output(c: CostInput) -> list[int]:
    """One division of the node's output (a product by a weight, a site, a BatchNorm scale)."""
    return [c.elements]


def _public_integer(v) -> bool | None:
    """True for a public integer factor (no truncation), False for a float one, None for a secret."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, float):
        return False
    if isinstance(v, fx.Node):
        meta = v.meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", torch.float32)
        return not dtype.is_floating_point
    return False


def _mul(c: CostInput) -> list[int]:
    a, b = c.node.args[0], c.node.args[1] if len(c.node.args) > 1 else c.node.kwargs.get("other")
    if isinstance(a, fx.Node) and c.secret.get(a) and isinstance(b, fx.Node) and c.secret.get(b):
        return [c.elements]  # CrypTen's Beaver product, then its division by the scale
    public = b if isinstance(a, fx.Node) and c.secret.get(a) else a
    return [] if _public_integer(public) else [c.elements]


def _div(c: CostInput) -> list[int]:
    d = c.node.args[1]
    if isinstance(d, (int, float)) and not isinstance(d, bool) and float(d) == 1.0:
        return []
    return [c.elements]  # by an integer: the division itself; by a float: a product on the constant grid


def _add(c: CostInput) -> list[int]:
    alpha = c.node.kwargs.get("alpha", 1)
    if alpha == 1 or _public_integer(alpha):
        return []
    b = c.node.args[1] if len(c.node.args) > 1 else c.node.kwargs["other"]
    return [numel(node_shape(b))] if isinstance(b, fx.Node) else []


def _separable(c: CostInput, mats: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    """One division per axis that is not a gather (``protocols.public_separable``, h first, then w)."""
    n, ch, h, w = node_shape(c.x)
    oh, ow = mats[0].shape[0], mats[1].shape[0]
    out = []
    if as_selection(mats[0]) is None:
        out.append(n * ch * oh * w)
    if as_selection(mats[1]) is None:
        out.append(n * ch * oh * ow)
    return out


def _interpolate(c: CostInput) -> list[int]:
    r = interpolate_args(c.node, c.modules)
    in_hw, out_hw = node_shape(c.x)[-2:], node_shape(c.node)[-2:]
    return _separable(c, interpolate_matrices(in_hw, out_hw, r["mode"], r["align_corners"], r["scale_factor"],
                                              r["recompute_scale_factor"]))  # fmt: skip


def _pool_args(c: CostInput) -> tuple:
    if c.node.op == "call_module":
        m = c.modules[c.node.target]
        return m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad
    return (node_arg(c.node, 1, "kernel_size"), node_arg(c.node, 2, "stride"), node_arg(c.node, 3, "padding", 0),
            node_arg(c.node, 4, "ceil_mode", False), node_arg(c.node, 5, "count_include_pad", True))  # fmt: skip


def _avgpool(c: CostInput) -> list[int]:
    k, s, p, ceil, incl = _pool_args(c)
    if ceil or (not incl and p not in (0, (0, 0), [0, 0])):
        return _separable(c, avg_pool_matrices(node_shape(c.x)[-2:], k, s, p, ceil, incl))
    k = (k, k) if isinstance(k, int) else tuple(k)
    return [c.elements] if k[0] * k[1] > 1 else []


def _adaptive_avgpool(c: CostInput) -> list[int]:
    h, w = node_shape(c.x)[-2:]
    oh, ow = node_shape(c.node)[-2:]
    if (oh, ow) != (1, 1) and (h % oh or w % ow):
        return _separable(c, adaptive_pool_matrices((h, w), (oh, ow)))
    return [c.elements] if (h // oh) * (w // ow) > 1 else []


def _mean(c: CostInput) -> list[int]:
    return [c.elements] if numel(node_shape(c.x)) > c.elements else []


TRUNCATION_RULES: dict[str, Callable[[CostInput], list[int]]] = {
    "conv2d": _output,
    "linear": _output,
    "bn": _output,
    "site": _output,
    "mul": _mul,
    "div": _div,
    "add": _add,
    "interpolate": _interpolate,
    "avgpool": _avgpool,
    "adaptive_avgpool": _adaptive_avgpool,
    "mean": _mean,
}


def truncations(handler: str, c: CostInput) -> list[int]:
    """The element counts of the node's divisions, in order (empty: it divides nothing)."""
    rule = TRUNCATION_RULES.get(handler)
    return rule(c) if rule is not None else []
