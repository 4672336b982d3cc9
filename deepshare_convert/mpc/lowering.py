"""fx graph -> MPC program: what each node does under two-party computation, and what it costs.

:func:`lower` classifies each node of a :func:`~.prepare.prepare`-d graph into an
:class:`MPCOp`: its handler, whether its value is secret-shared, and the work it puts on the
wire -- elements compared, elements opened by multiplications, elements revealed.  Two tables
decide this: node -> handler (``_MODULE_HANDLERS``, ``_FUNCTION_HANDLERS``, ``_METHOD_HANDLERS``;
activations come from the registry in :mod:`deepshare_convert.activations`) and handler -> cost
rule (:data:`~.cost_rules.COST_RULES`, in :mod:`.cost_rules`; the op and program types live in
:mod:`.program`).  Supporting a new op is one entry in each (plus the backend's handler that
executes it).

The backend dispatches on ``MPCOp.handler`` and the cost model sums the counts, so the two
cannot disagree about which nodes communicate.  Anything that cannot run on shares is refused
here, before a party starts, with a one-line error naming the node.  This module does not
import crypten, and knows nothing of the backend that will execute the program.

:func:`prepare` and :func:`snap_input` are re-exported from :mod:`.prepare` (their home) because
callers lower what they prepare and import both from here.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..activations import is_inplace as activation_inplace, kind_of
from ..conversion.census import owner_module
from ..conversion.gates import PrototypeGate, SharedGate
from ..conversion.tracing import example_input, propagate_shapes
from ..errors import DeepShareError
from ..snl.masks import MaskedReLU
from . import WEIGHT_MODES
from .cost_rules import COST_RULES, CostInput, interpolate_args
from .fixed_point import truncation_mode
from .prepare import prepare, snap_input
from .program import MPCOp, Program, node_inputs, node_shape, numel
from .truncation_rules import DEALT_PER_TRUNCATED, truncations

__all__ = ["MPCOp", "Program", "CostInput", "COST_RULES", "lower", "prepare", "snap_input", "WEIGHT_MODES",
           "interpolate_args"]


# ---- node -> handler tables ------------------------------------------------------------------
_MODULE_HANDLERS: tuple[tuple[type[nn.Module], str], ...] = (
    (PrototypeGate, "gate"),
    (SharedGate, "site"),
    (MaskedReLU, "masked_relu"),  # SNL: ReLU on the kept neurons (a public mask), identity elsewhere
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


def lower(gm: fx.GraphModule, input_shape: Sequence[int], weights_mode: str = "public",
          truncation: str | None = None) -> Program:  # fmt: skip
    """Classify every node of a :func:`~.prepare.prepare`-d graph for a batch of ``input_shape`` (N, C, ...).

    ``truncation``: ``"exact"`` or ``"local"`` (default :func:`~.fixed_point.truncation_mode`); under
    ``"exact"`` each op also counts its divisions (:mod:`.truncation_rules`).
    """
    truncation = truncation_mode(truncation)
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
        shape = node_shape(node)
        if node.op == "placeholder":
            secret[node] = True
            ops.append(MPCOp(node.name, "input", "", True, elements=numel(shape)))
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
            output_shape = node_shape(out)
            ops.append(MPCOp(node.name, "output", "", False, revealed=numel(output_shape), reveal_rounds=1,
                             elements=numel(output_shape)))  # fmt: skip
            continue
        inputs = node_inputs(node)
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
        op = MPCOp(node.name, handler, owner_module(node), handler != "shape", elements=numel(shape))
        if _is_inplace(node, modules) and inputs:
            op.inplace_of = inputs[0].name
        rule = COST_RULES.get(handler)
        cost_input = CostInput(node, modules, weights_mode, secret, numel(shape), masked)
        if rule is not None:
            rule(op, cost_input)
        if truncation == "exact":
            divisions = truncations(handler, cost_input)
            op.truncated, op.trunc_rounds = sum(divisions), len(divisions)
            op.dealt += DEALT_PER_TRUNCATED * op.truncated
        if op.inplace_of is not None:  # the node now names a new value: not opened yet
            masked.discard(inputs[0])
        secret[node] = op.secret
        ops.append(op)
    return Program(gm, ops, input_shape, output_shape, weights_mode, truncation)
