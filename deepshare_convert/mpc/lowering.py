"""fx graph -> MPC program: what each node does under two-party computation, and what it costs.

:func:`prepare` turns any model the tracer understands (original or converted) into the graph
both parties execute: gates in ``step`` mode (inference computes the DReLU, not its GELU
surrogate) and every BatchNorm that follows a convolution folded into it (a fold is free in
plaintext, a BatchNorm on shares is a multiplication).  :func:`lower` then classifies each
node into an :class:`MPCOp`: its handler, whether its value is secret-shared, and the work it
puts on the wire -- elements compared, elements opened by multiplications, elements revealed.

The executor dispatches on ``MPCOp.handler`` and the cost model sums the counts, so the two
cannot disagree about which nodes communicate.  Anything that cannot run on shares is refused
here, before a party starts, with a one-line error naming the node.  This module does not
import crypten.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from ..activations import is_inplace as activation_inplace
from ..activations import kind_of
from ..errors import DeepShareError
from ..gates import PrototypeGate, SharedGate
from ..tracing import example_input, owner_module, propagate_shapes, trace
from . import WEIGHT_MODES

__all__ = ["MPCOp", "Program", "prepare", "snap_to_grid", "snap_input", "lower", "fold_batchnorm", "strip_weights", "pack", "unpack", "WEIGHT_MODES"]


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
    F.dropout: "identity", getattr: "shape",
}  # fmt: skip
_METHOD_HANDLERS: dict[str, str] = {
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub",
    "mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "neg": "neg", "mean": "mean", "sum": "sum",
    "view": "reshape", "reshape": "reshape", "flatten": "flatten", "contiguous": "identity",
    "permute": "shape_op", "transpose": "shape_op", "squeeze": "shape_op", "unsqueeze": "shape_op",
    "size": "shape", "dim": "shape",
}  # fmt: skip
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul}
_INPLACE_METHODS = {"add_", "sub_", "mul_", "div_"}
# activations (ReLU, ...) come from the registry in deepshare_convert.activations: kind.mpc_handler


@dataclass
class MPCOp:
    """One graph node under MPC.  Counts are for the whole batch, per party.

    ``comparisons`` elements go through the secure comparison (one call per node that has
    any; ``compare_steps`` > 1 for a max-pool tree); ``opened`` elements are opened by
    Beaver-style multiplications in ``open_rounds`` rounds; ``revealed`` elements are sent
    to one party (the output).  ``macs`` is the linear-layer work, for the compute estimate.
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

    def op(self, name: str) -> MPCOp:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {o.node: o for o in self.ops}

    @property
    def comparisons(self) -> int:
        return sum(o.comparisons for o in self.ops)


# ---- preparation -----------------------------------------------------------------------------
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
    from ..rewrite import set_gate_mode

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
        for cls, name in _MODULE_HANDLERS:
            if isinstance(m, cls):
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
    """Classify every node of a :func:`prepare`-d graph for a batch of ``input_shape`` (N, C, ...)."""
    if weights_mode not in WEIGHT_MODES:
        raise DeepShareError(f"--weights-mode must be 'private' or 'public', got {weights_mode!r}")
    input_shape = tuple(int(d) for d in input_shape)
    propagate_shapes(gm, example_input(input_shape[1:], gm, batch=input_shape[0]))
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    secret: dict[fx.Node, bool] = {}
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
        _count(op, node, modules, weights_mode, secret, shape)
        secret[node] = op.secret
        ops.append(op)
    return Program(gm, ops, input_shape, output_shape, weights_mode)


def _count(op: MPCOp, node: fx.Node, modules, mode: str, secret: dict, shape: tuple[int, ...]) -> None:
    """Fill the communication counts of ``op`` (see the protocols module for each formula)."""
    h = op.handler
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    n = _numel(shape)
    if h == "relu":
        # DReLU (one comparison per element) + the masked-bit product x*g (opens x - a)
        op.comparisons, op.compare_steps, op.opened, op.open_rounds = n, 1, n, 1
    elif h == "gate":
        gate = modules[node.target]
        if gate.mode != "step":
            raise DeepShareError(f"gate {node.target!r} is in {gate.mode!r} mode; private inference needs 'step'")
        in_shape = _shape(x)
        op.comparisons, op.compare_steps = _numel((in_shape[0], gate.prototypes, *in_shape[2:])), 1
        op.elements = _numel(in_shape)
    elif h == "site":
        if mode == "public":  # α, β public: y = α·(x·g) + β·x, one masked product
            op.opened, op.open_rounds = n, 1
        else:  # α·g opens α - a (C elements; g's mask is reused), then Beaver x·s opens 2n
            op.opened, op.open_rounds = modules[node.target].channels + 2 * n, 2
    elif h in ("conv2d", "linear"):
        w_shape, secret_w = _weight(node, modules, secret, mode)
        op.macs = n * _numel(w_shape[1:])
        if secret_w:
            op.opened, op.open_rounds = _numel(_shape(x)) + _numel(w_shape), 1
    elif h == "bn":
        if mode == "private":  # per-channel secret scale: a Beaver product (shift is an addition)
            op.opened, op.open_rounds = n + modules[node.target].num_features, 1
    elif h == "maxpool":
        window = _pool_window(node, modules)
        steps, pairs = _max_tree(window)
        op.comparisons, op.compare_steps = n * pairs, steps
        op.opened, op.open_rounds = n * pairs, steps
    elif h == "mul":
        a, b = node.args[0], node.args[1]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and secret.get(a) and secret.get(b):
            op.opened, op.open_rounds = _numel(_shape(a)) + _numel(_shape(b)), 1
    elif h == "div":
        if isinstance(node.args[1], fx.Node) and secret.get(node.args[1]):
            raise DeepShareError(f"cannot run node {node.name!r} under MPC: division by a secret value")


def _weight(node: fx.Node, modules, secret: dict, mode: str) -> tuple[tuple[int, ...], bool]:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise DeepShareError(f"cannot run node {node.name!r} under MPC: conv padding_mode {m.padding_mode!r}")
        return tuple(m.weight.shape), mode == "private"
    w = _arg(node, 1, "weight")
    if not isinstance(w, fx.Node):
        raise DeepShareError(f"cannot run node {node.name!r} under MPC: weight is not a tensor of the model")
    return _shape(w), bool(secret.get(w))


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


# ---- transport -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ref:
    name: str


def pack(gm: fx.GraphModule) -> dict[str, Any]:
    """A picklable form of ``gm`` (torch 2.13 cannot pickle GraphModules: a str in its globals).

    The module tree travels as plain modules; the graph as (op, name, target, args, kwargs)
    rows whose node references become names.
    """
    root = nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b)
    rows = []
    for n in gm.graph.nodes:
        args = map_aggregate(n.args, lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a)
        kwargs = map_aggregate(n.kwargs, lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a)
        rows.append((n.op, n.name, n.target, args, kwargs))
    return {"root": root, "nodes": rows, "class_name": type(gm).__name__}


def unpack(packed: dict[str, Any]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs in packed["nodes"]:
        args = map_aggregate(args, lambda a: env[a.name] if isinstance(a, _Ref) else a)
        kwargs = map_aggregate(kwargs, lambda a: env[a.name] if isinstance(a, _Ref) else a)
        if op == "output":
            env[name] = graph.output(args[0])
        else:
            env[name] = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
    return fx.GraphModule(packed["root"], graph, packed["class_name"]).eval()
