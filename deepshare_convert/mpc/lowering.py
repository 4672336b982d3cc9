"""fx graph -> MPC program: what each node does under two-party computation, and what it costs.

:func:`lower` classifies each node of a :func:`~.prepare.prepare`-d graph into an
:class:`MPCOp`: its handler, whether its value is secret-shared, and the work it puts on the
wire -- elements compared, elements opened by multiplications, elements revealed.  Two tables
decide this: node -> handler (``_MODULE_HANDLERS``, ``_FUNCTION_HANDLERS``, ``_METHOD_HANDLERS``;
activations come from the registry in :mod:`deepshare_convert.activations`) and handler -> cost
rule (:data:`COST_RULES`).  Supporting a new op is one entry in each (plus the backend's
handler that executes it).

The backend dispatches on ``MPCOp.handler`` and the cost model sums the counts, so the two
cannot disagree about which nodes communicate.  Anything that cannot run on shares is refused
here, before a party starts, with a one-line error naming the node.  This module does not
import crypten, and knows nothing of the backend that will execute the program.

:func:`prepare` and :func:`snap_input` are re-exported from :mod:`.prepare` (their home) because
callers lower what they prepare and import both from here.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from ..activations import is_inplace as activation_inplace, kind_of
from ..conversion.census import owner_module
from ..conversion.gates import PrototypeGate, SharedGate
from ..conversion.tracing import example_input, propagate_shapes
from ..errors import DeepShareError
from . import WEIGHT_MODES
from .prepare import prepare, snap_input
from .resample import RESAMPLE_MODES

__all__ = ["MPCOp", "Program", "CostInput", "COST_RULES", "lower", "prepare", "snap_input", "WEIGHT_MODES",
           "interpolate_args"]


# ---- node -> handler tables ------------------------------------------------------------------
_MODULE_HANDLERS: tuple[tuple[type[nn.Module], str], ...] = (
    (PrototypeGate, "gate"),
    (SharedGate, "site"),
    (nn.Conv2d, "conv2d"),
    (nn.Linear, "linear"),
    (nn.BatchNorm2d, "bn"),
    (nn.BatchNorm1d, "bn"),
    (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool2d, "adaptive_avgpool"),
    (nn.MaxPool2d, "maxpool"),
    (nn.Flatten, "flatten"),
    (nn.Upsample, "interpolate"),
    (nn.Identity, "identity"),
    (nn.Dropout, "identity"),
    (nn.Dropout2d, "identity"),
)
_FUNCTION_HANDLERS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg",
    torch.flatten: "flatten", torch.reshape: "reshape",
    operator.getitem: "getitem", F.pad: "pad", torch.cat: "cat", torch.concat: "cat",
    F.avg_pool2d: "avgpool", F.adaptive_avg_pool2d: "adaptive_avgpool", F.max_pool2d: "maxpool",
    F.conv2d: "conv2d", F.linear: "linear", torch.mean: "mean", torch.sum: "sum",
    F.dropout: "identity", getattr: "shape", F.interpolate: "interpolate",
}  # fmt: skip
_aten = torch.ops.aten  # torch.export (.pt2) graphs: the same operations as ATen overloads
_FUNCTION_HANDLERS.update({
    _aten.conv2d.default: "conv2d", _aten.linear.default: "linear",
    _aten.add.Tensor: "add", _aten.add_.Tensor: "add", _aten.sub.Tensor: "sub", _aten.mul.Tensor: "mul",
    _aten.neg.default: "neg", _aten.pad.default: "pad", _aten.cat.default: "cat",
    _aten.flatten.using_ints: "flatten", _aten.view.default: "reshape", _aten.reshape.default: "reshape",
    _aten.avg_pool2d.default: "avgpool", _aten.adaptive_avg_pool2d.default: "adaptive_avgpool",
    _aten.max_pool2d.default: "maxpool", _aten.mean.dim: "mean", _aten.slice.Tensor: "slice",
    _aten.dropout.default: "identity", _aten.contiguous.default: "identity",
    _aten.upsample_bilinear2d.vec: "interpolate", _aten.upsample_nearest2d.vec: "interpolate",
})  # fmt: skip
_METHOD_HANDLERS: dict[str, str] = {
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "neg": "neg", "mean": "mean", "sum": "sum",
    "view": "reshape", "reshape": "reshape", "flatten": "flatten", "contiguous": "identity",
    "permute": "shape_op", "transpose": "shape_op", "squeeze": "shape_op", "unsqueeze": "shape_op",
    "size": "shape", "dim": "shape",
}  # fmt: skip
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, _aten.add_.Tensor}
_INPLACE_METHODS = {"add_", "sub_", "mul_", "div_"}
# activations (ReLU, ...) come from the registry in deepshare_convert.activations: kind.mpc_handler


@dataclass
class MPCOp:
    """One graph node under MPC.  Counts are for the whole batch, per party.

    ``comparisons`` elements go through the secure comparison (one call per node that has
    any; ``compare_steps`` > 1 for a max-pool tree); ``opened`` elements are opened by
    Beaver-style multiplications in ``open_rounds`` rounds; ``revealed`` elements are sent
    to one party (the output).  ``macs`` is the linear-layer work, for the compute estimate.
    ``fixed`` names the model tensors this op multiplies by in ``private`` mode: each is
    masked once at setup (``W - b`` opened once per loaded model, see :mod:`.protocols`), so
    ``opened`` counts only the activation side.
    """

    node: str
    handler: str
    layer: str
    secret: bool
    inplace_of: str | None = None  # in-place op: later readers of this node see the result
    comparisons: int = 0
    compare_steps: int = 0
    opened: int = 0
    open_rounds: int = 0
    revealed: int = 0
    reveal_rounds: int = 0
    macs: int = 0
    elements: int = 0  # output elements (for tables)
    fixed: dict[str, int] = field(default_factory=dict)  # private mode: model tensors masked at setup -> elements

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Program:
    """The lowered graph: ops in topological order plus what the launcher needs to know."""

    gm: fx.GraphModule
    ops: list[MPCOp]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weights_mode: str
    # public weights prepared for the ring kernels (node -> RingWeight), filled by the first run
    kernels: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def op(self, name: str) -> MPCOp:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {o.node: o for o in self.ops}

    @property
    def comparisons(self) -> int:
        return sum(o.comparisons for o in self.ops)

    @property
    def fixed(self) -> dict[str, int]:
        """Every model tensor masked at setup (each once, even if several ops use it) -> elements."""
        out: dict[str, int] = {}
        for o in self.ops:
            out.update(o.fixed)
        return out

    @property
    def setup_opened(self) -> int:
        """Elements opened by the setup (``W - b`` for every fixed tensor, all in one round)."""
        return sum(self.fixed.values())


# ---- lowering --------------------------------------------------------------------------------
def _handler(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    kind = kind_of(node, modules)
    if kind is not None:
        if kind.mpc_handler is None:
            raise DeepShareError(f"cannot run node {node.name!r} ({_describe(node, modules)}) under MPC: activation "
                                 f"{kind.name!r} has no secure protocol here; convert the model first (its sites "
                                 "become shared DReLU gates) or keep it out of private inference")  # fmt: skip
        return kind.mpc_handler
    if node.op == "call_module":
        m = modules.get(node.target)
        for cls, name in _MODULE_HANDLERS:  # a subclass with its own forward (timm's *Same pads) is another op
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return name
        return None
    if node.op == "call_function":
        return _FUNCTION_HANDLERS.get(node.target)
    if node.op == "call_method":
        return _METHOD_HANDLERS.get(node.target)
    return None


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if kind_of(node, modules) is not None:
        return activation_inplace(node, modules)
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
    return node.op == "call_method" and node.target in _INPLACE_METHODS


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules.get(node.target)).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target}"


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(a, fx.Node) else a)
    return found


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def lower(gm: fx.GraphModule, input_shape: Sequence[int], weights_mode: str = "public") -> Program:
    """Classify every node of a :func:`~.prepare.prepare`-d graph for a batch of ``input_shape`` (N, C, ...)."""
    if weights_mode not in WEIGHT_MODES:
        raise DeepShareError(f"--weights-mode must be 'private' or 'public', got {weights_mode!r}")
    input_shape = tuple(int(d) for d in input_shape)
    propagate_shapes(gm, example_input(input_shape[1:], gm, batch=input_shape[0]))
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    secret: dict[fx.Node, bool] = {}
    masked: set[fx.Node] = set()  # values whose x - a is open already (with a gate's comparison, or for a product)
    ops: list[MPCOp] = []
    output_shape: tuple[int, ...] = ()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise DeepShareError(f"private inference needs a model with one input, this one has {len(placeholders)}")
    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            secret[node] = True
            ops.append(MPCOp(node.name, "input", "", True, elements=_numel(shape)))
            continue
        if node.op == "get_attr":
            is_param = node.target in params and params[node.target].is_floating_point()
            secret[node] = weights_mode == "private" and is_param
            ops.append(MPCOp(node.name, "attr", "", secret[node]))
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or not secret.get(out):
                raise DeepShareError("private inference needs a model that returns one tensor computed from its input")
            output_shape = _shape(out)
            ops.append(MPCOp(node.name, "output", "", False, revealed=_numel(output_shape), reveal_rounds=1,
                             elements=_numel(output_shape)))  # fmt: skip
            continue
        inputs = _node_inputs(node)
        any_secret = any(secret.get(a, False) for a in inputs)
        handler = _handler(node, modules)
        if not any_secret:  # plaintext at both parties (shape arithmetic, constants)
            secret[node] = False
            ops.append(MPCOp(node.name, "public", owner_module(node), False))
            continue
        if handler is None:
            raise DeepShareError(
                f"cannot run node {node.name!r} ({_describe(node, modules)}) under MPC: not supported on secret shares"
            )
        op = MPCOp(node.name, handler, owner_module(node), handler != "shape", elements=_numel(shape))
        if _is_inplace(node, modules) and inputs:
            op.inplace_of = inputs[0].name
        rule = COST_RULES.get(handler)
        if rule is not None:
            rule(op, CostInput(node, modules, weights_mode, secret, _numel(shape), masked))
        if op.inplace_of is not None:  # the node now names a new value: not opened yet
            masked.discard(inputs[0])
        secret[node] = op.secret
        ops.append(op)
    return Program(gm, ops, input_shape, output_shape, weights_mode)


# ---- handler -> cost rule -------------------------------------------------------------------
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
            op.opened, op.open_rounds = _numel(_shape(self.x)), 1
            if remember:
                self.masked.add(self.x)

    @property
    def x(self) -> fx.Node | None:
        """The first argument, when it is a node (the data input of most ops)."""
        args = self.node.args
        return args[0] if args and isinstance(args[0], fx.Node) else None


CostRule = Callable[[MPCOp, CostInput], None]


def _cost_relu(op: MPCOp, c: CostInput) -> None:
    # DReLU (one comparison per element) + the masked-bit product x*g, whose x - a opening
    # travels in the comparison's last message (no round of its own)
    op.comparisons, op.compare_steps, op.opened, op.open_rounds = c.elements, 1, c.elements, 0


def _cost_gate(op: MPCOp, c: CostInput) -> None:
    # one comparison call on the first P channels only; replication to C channels is local
    gate = c.modules[c.node.target]
    if gate.mode != "step":
        raise DeepShareError(f"gate {c.node.target!r} is in {gate.mode!r} mode; private inference needs 'step'")
    in_shape = _shape(c.x)
    op.comparisons, op.compare_steps = _numel((in_shape[0], gate.prototypes, *in_shape[2:])), 1
    op.elements = _numel(in_shape)
    if any(_is_site_of(u, c.node, c.x, c.modules) for u in c.x.users):
        # a site reads this gate's own input: its x - a opening rides in the comparison's last message
        op.opened = _numel(in_shape)
        c.masked.add(c.x)


def _is_site_of(user: fx.Node, gate: fx.Node, x: fx.Node, modules) -> bool:
    return (user.op == "call_module" and isinstance(modules.get(user.target), SharedGate)
            and len(user.args) > 1 and user.args[0] is x and user.args[1] is gate)  # fmt: skip


def _cost_site(op: MPCOp, c: CostInput) -> None:
    # public: y = α·(x·g) + β·x, one masked product.  private: α, β masked at setup, and the
    # dealer's (a, a·r, a·b_α, ...) make x·(α·g + β) one opening of x - a as well
    c.open_once(op, remember=c.weights_mode == "private")  # nothing to open when x went with its gate's comparison
    if c.weights_mode == "private":
        channels = c.modules[c.node.target].channels
        op.fixed = {f"{c.node.target}.alpha": channels, f"{c.node.target}.beta": channels}


def _cost_linear(op: MPCOp, c: CostInput) -> None:
    # conv2d / linear: local with a public weight; with a secret model weight (masked at setup)
    # one opening of x - a; with a secret computed weight a full Beaver product (x - a, W - b)
    w_shape, secret_w, fixed = _weight(c.node, c.modules, c.secret, c.weights_mode)
    op.macs = c.elements * _numel(w_shape[1:])
    if secret_w and fixed:
        c.open_once(op)
        op.fixed = {fixed: _numel(w_shape)}
    elif secret_w:
        op.opened, op.open_rounds = _numel(_shape(c.x)) + _numel(w_shape), 1


def _cost_bn(op: MPCOp, c: CostInput) -> None:
    if c.weights_mode == "private":  # per-channel secret scale masked at setup (the shift is an addition)
        c.open_once(op)
        op.fixed = {f"{c.node.target}:scale": c.modules[c.node.target].num_features}


def _cost_maxpool(op: MPCOp, c: CostInput) -> None:
    # a pairwise max tree: each step compares pairs, then selects with a product
    steps, pairs = _max_tree(_pool_window(c.node, c.modules))
    op.comparisons, op.compare_steps = c.elements * pairs, steps
    op.opened, op.open_rounds = c.elements * pairs, 0  # each step's product rides with its comparison


def _cost_mul(op: MPCOp, c: CostInput) -> None:
    # secret * secret is a Beaver product; by a public value it is local
    a, b = c.node.args[0], c.node.args[1]
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and c.secret.get(a) and c.secret.get(b):
        op.opened, op.open_rounds = _numel(_shape(a)) + _numel(_shape(b)), 1


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
    in_shape, out_shape = _shape(c.x), _shape(c.node)
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
        return dict(mode="bilinear", align_corners=_arg(node, 2, "align_corners"),
                    scale_factor=_arg(node, 3, "scale_factors"), recompute_scale_factor=None, antialias=False)  # fmt: skip
    if node.target is _aten.upsample_nearest2d.vec:  # (input, output_size, scale_factors)
        return dict(mode="nearest", align_corners=None, scale_factor=_arg(node, 2, "scale_factors"),
                    recompute_scale_factor=None, antialias=False)  # fmt: skip
    return dict(mode=_arg(node, 3, "mode", "nearest"), align_corners=_arg(node, 4, "align_corners"),
                scale_factor=_arg(node, 2, "scale_factor"), recompute_scale_factor=_arg(node, 5, "recompute_scale_factor"),
                antialias=bool(_arg(node, 6, "antialias", False)))  # fmt: skip


def _cost_avgpool(op: MPCOp, c: CostInput) -> None:
    # local (a sum and a public divisor, or a public separable map for ceil_mode / excluded padding)
    divisor = getattr(c.modules[c.node.target], "divisor_override", None) if c.node.op == "call_module" \
        else _arg(c.node, 6, "divisor_override")
    if divisor is not None:
        raise DeepShareError(f"cannot run node {c.node.name!r} under MPC: avg-pool with divisor_override")


def _cost_div(op: MPCOp, c: CostInput) -> None:
    # by a public value it is local; by a secret one there is no protocol here
    if isinstance(c.node.args[1], fx.Node) and c.secret.get(c.node.args[1]):
        raise DeepShareError(f"cannot run node {c.node.name!r} under MPC: division by a secret value")


COST_RULES: dict[str, CostRule] = {
    "relu": _cost_relu,
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
    w = _arg(node, 1, "weight")
    if not isinstance(w, fx.Node):
        raise DeepShareError(f"cannot run node {node.name!r} under MPC: weight is not a tensor of the model")
    is_secret = bool(secret.get(w))
    return _shape(w), is_secret, w.target if is_secret and w.op == "get_attr" else None


def _pool_window(node: fx.Node, modules) -> int:
    if node.op == "call_module":
        m = modules[node.target]
        k, dilation, ceil_mode = m.kernel_size, m.dilation, m.ceil_mode
    else:
        k, dilation, ceil_mode = _arg(node, 1, "kernel_size"), _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False)
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
