"""Handler -> cost rule: what each MPC op puts on the wire (elements compared, opened, revealed;
rounds; MACs for the compute estimate).

:func:`~.lowering.lower` calls the rule of each node's handler (:data:`COST_RULES`); the formulas
of each protocol are in :mod:`.protocols`.  A handler with no rule is local to each party.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..conversion.gates import SharedGate
from ..errors import DeepShareError
from .program import MPCOp, node_arg, node_shape, numel
from .resample import RESAMPLE_MODES

__all__ = ["CostInput", "COST_RULES", "interpolate_args"]

_aten = torch.ops.aten  # torch.export (.pt2) graphs name resampling by its ATen overloads


@dataclass(frozen=True)
class CostInput:
    """What a cost rule may read about one node (counts are for the whole batch, per party)."""

    node: fx.Node
    modules: dict[str, nn.Module]
    weights_mode: str
    secret: dict[fx.Node, bool]  # which nodes lowered so far hold secret-shared values
    elements: int  # the node's output elements
    masked: set = field(default_factory=set)  # values whose x - a is open already (rules add to it)

    def open_once(self, op: MPCOp, remember: bool = True) -> None:
        """Open the input x as ``x - a`` (one round) unless a gate or a fixed-weight product already did.

        ``remember``: later products of x may reuse this opening (the executor keeps it).
        """
        if self.x not in self.masked:
            op.opened, op.open_rounds = numel(node_shape(self.x)), 1
            if remember:
                self.masked.add(self.x)

    @property
    def x(self) -> fx.Node | None:
        """The first argument, when it is a node (the data input of most ops)."""
        args = self.node.args
        return args[0] if args and isinstance(args[0], fx.Node) else None


CostRule = Callable[[MPCOp, CostInput], None]

# Offline phase: correction elements the dealer sends the client (:mod:`.dealer`).  A comparison
# takes CrypTen's A2B adder circuit -- 13 binary AND triples per element, each triple's ``a & b``
# corrected -- and the B2A bit's arithmetic ``[r]``: 14 per compared element (tests/test_dealer.py
# checks it on the dealer's own pass).  Every other dealt product costs its output elements; the
# uniform masks (``a``, ``b``, the triples' operands) are seeded at both parties and cost nothing.
DEALT_PER_COMPARISON = 14


def _cost_relu(op: MPCOp, c: CostInput) -> None:
    # DReLU (one comparison per element) + the masked-bit product x*g, whose x - a opening
    # travels in the comparison's last message (no round of its own)
    op.comparisons, op.compare_steps, op.opened, op.open_rounds = c.elements, 1, c.elements, 0
    op.dealt = (DEALT_PER_COMPARISON + 1) * c.elements  # the comparison, then a·r for x·g


def _cost_masked_relu(op: MPCOp, c: CostInput) -> None:
    # SNL: the bool mask ``keep`` is public architecture, so only kept neurons are compared; each is a
    # ReLU costed as ``relu`` is (comparison + product riding in its last message), the rest identity
    op.comparisons = op.opened = _kept_elements(c.modules[c.node.target], c.node, node_shape(c.x))
    op.compare_steps, op.open_rounds = (1 if op.comparisons else 0), 0
    op.dealt = (DEALT_PER_COMPARISON + 1) * op.comparisons


def _kept_elements(mask: nn.Module, node: fx.Node, in_shape: tuple[int, ...]) -> int:
    """ReLUs a binarised SNL mask keeps over the batch (``keep.sum() * N``); a float mask is refused."""
    if not mask.binary:
        raise DeepShareError(f"cannot run node {node.name!r} under MPC: SNL mask {node.target!r} is still a float "
                             "mask (a search in progress); binarise it (snl.binarise, or let `deepshare snl` "
                             "finish) first")  # fmt: skip
    if tuple(mask.keep.shape) != tuple(in_shape[1:]):
        raise DeepShareError(f"cannot run node {node.name!r} under MPC: SNL mask of shape {tuple(mask.keep.shape)} "
                             f"for an input of shape {tuple(in_shape[1:])}")  # fmt: skip
    return int(mask.keep.sum()) * in_shape[0]


def _cost_gate(op: MPCOp, c: CostInput) -> None:
    # one comparison call on the first P channels only; replication to C channels is local
    gate = c.modules[c.node.target]
    if gate.mode != "step":
        raise DeepShareError(f"gate {c.node.target!r} is in {gate.mode!r} mode; private inference needs 'step'")
    in_shape = node_shape(c.x)
    op.elements = numel(in_shape)
    if gate.prototypes == 0:  # a linear group: no comparison, its sites are public-scale multiplies
        return
    op.comparisons, op.compare_steps = numel((in_shape[0], gate.prototypes, *in_shape[2:])), 1
    op.dealt = DEALT_PER_COMPARISON * op.comparisons
    if any(_is_site_of(u, c.node, c.x, c.modules) for u in c.x.users):
        # a site reads this gate's own input: its x - a opening rides in the comparison's last message
        op.opened = numel(in_shape)
        c.masked.add(c.x)


def _linear_site(node: fx.Node, modules) -> bool:
    """A site whose group has no prototype (P = 0): its gate is 0, so it is β·x."""
    gate = node.args[1] if len(node.args) > 1 else None
    return isinstance(gate, fx.Node) and getattr(modules.get(gate.target), "prototypes", None) == 0


def _is_site_of(user: fx.Node, gate: fx.Node, x: fx.Node, modules) -> bool:
    return (user.op == "call_module" and isinstance(modules.get(user.target), SharedGate)
            and len(user.args) > 1 and user.args[0] is x and user.args[1] is gate)  # fmt: skip


def _cost_site(op: MPCOp, c: CostInput) -> None:
    # public: y = α·(x·g) + β·x, one masked product.  private: α, β masked at setup, and the
    # dealer's (a, a·r, a·b_α, ...) make x·(α·g + β) one opening of x - a as well
    if _linear_site(c.node, c.modules):  # y = β·x: public β local (one truncation); secret β masked at setup
        if c.weights_mode == "private":
            c.open_once(op)
            op.fixed = {f"{c.node.target}.beta": c.modules[c.node.target].channels}
            op.dealt = numel(node_shape(c.x))  # fn(a, b_β)
        return
    c.open_once(op, remember=c.weights_mode == "private")  # nothing to open when x went with its gate's comparison
    x = numel(node_shape(c.x))
    op.dealt = x  # public: a·r
    if c.weights_mode == "private":
        channels = c.modules[c.node.target].channels
        op.fixed = {f"{c.node.target}.alpha": channels, f"{c.node.target}.beta": channels}
        op.dealt = 5 * x  # a·b_α, a·b_β, a·r, a·r·b_α, r·b_α


def _cost_linear(op: MPCOp, c: CostInput) -> None:
    # conv2d / linear: local with a public weight; with a secret model weight (masked at setup)
    # one opening of x - a; with a secret computed weight a full Beaver product (x - a, W - b)
    w_shape, secret_w, fixed = _weight(c.node, c.modules, c.secret, c.weights_mode)
    op.macs = c.elements * numel(w_shape[1:])
    if secret_w and fixed:
        c.open_once(op)
        op.fixed = {fixed: numel(w_shape)}
        op.dealt = c.elements  # fn(a, b)
    elif secret_w:
        op.opened, op.open_rounds = numel(node_shape(c.x)) + numel(w_shape), 1
        op.dealt = c.elements  # CrypTen's Beaver triple: its c


def _cost_bn(op: MPCOp, c: CostInput) -> None:
    if c.weights_mode == "private":  # per-channel secret scale masked at setup (the shift is an addition)
        c.open_once(op)
        op.fixed = {f"{c.node.target}:scale": c.modules[c.node.target].num_features}
        op.dealt = c.elements


def _cost_maxpool(op: MPCOp, c: CostInput) -> None:
    # a pairwise max tree: each step compares pairs, then selects with a product
    steps, pairs = _max_tree(_pool_window(c.node, c.modules))
    op.comparisons, op.compare_steps = c.elements * pairs, steps
    op.opened, op.open_rounds = c.elements * pairs, 0  # each step's product rides with its comparison
    op.dealt = (DEALT_PER_COMPARISON + 1) * op.comparisons  # each a ReLU


def _cost_mul(op: MPCOp, c: CostInput) -> None:
    # secret * secret is a Beaver product; by a public value it is local
    a, b = c.node.args[0], c.node.args[1]
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and c.secret.get(a) and c.secret.get(b):
        op.opened, op.open_rounds = numel(node_shape(a)) + numel(node_shape(b)), 1
        op.dealt = c.elements  # CrypTen's Beaver triple: its c


def _cost_interpolate(op: MPCOp, c: CostInput) -> None:
    # public separable coefficients (mpc/resample.py): local, with the two-party local truncation
    resample = interpolate_args(c.node, c.modules)
    if resample["mode"] not in RESAMPLE_MODES or resample["antialias"]:
        what = "antialias=True" if resample["antialias"] else f"mode {resample['mode']!r}"
        raise DeepShareError(f"cannot run node {c.node.name!r} under MPC: interpolate with {what} "
                             f"(supported: {', '.join(RESAMPLE_MODES)}, no antialias)")  # fmt: skip
    _cost_separable(op, c)


def _cost_separable(op: MPCOp, c: CostInput) -> None:
    """Compute only (the two matmuls by public matrices); nothing goes on the wire."""
    in_shape, out_shape = node_shape(c.x), node_shape(c.node)
    if len(in_shape) != 4:
        raise DeepShareError(f"cannot run node {c.node.name!r} under MPC: resampling of a {len(in_shape)}-d tensor")
    n, ch, h, w = in_shape
    op.macs = n * ch * (h * w * out_shape[3] + h * out_shape[3] * out_shape[2])


def interpolate_args(node: fx.Node, modules) -> dict[str, Any]:
    """mode, align_corners, scale_factor, recompute_scale_factor, antialias of an interpolate node."""
    if node.op == "call_module":
        m = modules[node.target]
        return dict(mode=m.mode, align_corners=m.align_corners, scale_factor=m.scale_factor,
                    recompute_scale_factor=m.recompute_scale_factor, antialias=False)  # fmt: skip
    if node.target is _aten.upsample_bilinear2d.vec:  # (input, output_size, align_corners, scale_factors)
        return dict(mode="bilinear", align_corners=node_arg(node, 2, "align_corners"),
                    scale_factor=node_arg(node, 3, "scale_factors"), recompute_scale_factor=None, antialias=False)  # fmt: skip
    if node.target is _aten.upsample_nearest2d.vec:  # (input, output_size, scale_factors)
        return dict(mode="nearest", align_corners=None, scale_factor=node_arg(node, 2, "scale_factors"),
                    recompute_scale_factor=None, antialias=False)  # fmt: skip
    return dict(mode=node_arg(node, 3, "mode", "nearest"), align_corners=node_arg(node, 4, "align_corners"),
                scale_factor=node_arg(node, 2, "scale_factor"),
                recompute_scale_factor=node_arg(node, 5, "recompute_scale_factor"),
                antialias=bool(node_arg(node, 6, "antialias", False)))  # fmt: skip


def _cost_avgpool(op: MPCOp, c: CostInput) -> None:
    # local (a sum and a public divisor, or a public separable map for ceil_mode / excluded padding)
    divisor = getattr(c.modules[c.node.target], "divisor_override", None) if c.node.op == "call_module" \
        else node_arg(c.node, 6, "divisor_override")
    if divisor is not None:
        raise DeepShareError(f"cannot run node {c.node.name!r} under MPC: avg-pool with divisor_override")


def _cost_div(op: MPCOp, c: CostInput) -> None:
    # by a public value it is local; by a secret one there is no protocol here
    if isinstance(c.node.args[1], fx.Node) and c.secret.get(c.node.args[1]):
        raise DeepShareError(f"cannot run node {c.node.name!r} under MPC: division by a secret value")


COST_RULES: dict[str, CostRule] = {
    "relu": _cost_relu,
    "masked_relu": _cost_masked_relu,
    "gate": _cost_gate,
    "site": _cost_site,
    "conv2d": _cost_linear,
    "linear": _cost_linear,
    "bn": _cost_bn,
    "maxpool": _cost_maxpool,
    "mul": _cost_mul,
    "div": _cost_div,
    "interpolate": _cost_interpolate,
    "avgpool": _cost_avgpool,
}
"""Handler -> the rule filling an op's counts (see :mod:`.protocols` for each formula).

A handler with no rule is local to each party (additions, pooling by a public divisor,
reshapes, slicing, ...): no communication.  A rule may refuse the node with a one-line error.
"""


def _weight(node: fx.Node, modules, secret: dict, mode: str) -> tuple[tuple[int, ...], bool, str | None]:
    """(weight shape, secret?, the name it is masked under at setup: a model tensor read directly, else None)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise DeepShareError(f"cannot run node {node.name!r} under MPC: conv padding_mode {m.padding_mode!r}")
        private = mode == "private"
        return tuple(m.weight.shape), private, f"{node.target}.weight" if private else None
    w = node_arg(node, 1, "weight")
    if not isinstance(w, fx.Node):
        raise DeepShareError(f"cannot run node {node.name!r} under MPC: weight is not a tensor of the model")
    is_secret = bool(secret.get(w))
    return node_shape(w), is_secret, w.target if is_secret and w.op == "get_attr" else None


def _pool_window(node: fx.Node, modules) -> int:
    if node.op == "call_module":
        m = modules[node.target]
        k, dilation, ceil_mode = m.kernel_size, m.dilation, m.ceil_mode
    else:
        k, dilation = node_arg(node, 1, "kernel_size"), node_arg(node, 4, "dilation", 1)
        ceil_mode = node_arg(node, 5, "ceil_mode", False)
    if dilation not in (1, (1, 1)) or ceil_mode:
        raise DeepShareError(f"cannot run node {node.name!r} under MPC: max-pool with dilation or ceil_mode")
    k = (k, k) if isinstance(k, int) else tuple(k)
    return k[0] * k[1]


def _max_tree(window: int) -> tuple[int, int]:
    """(steps, comparisons per output) of the pairwise max tree over a window of m elements."""
    steps = pairs = 0
    m = window
    while m > 1:
        pairs += m // 2
        m = m // 2 + m % 2
        steps += 1
    return steps, pairs
