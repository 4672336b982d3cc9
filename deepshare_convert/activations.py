"""Activation kinds: what an activation site is, defined once.

Every pass that asks "is this node an activation we count, convert or run on shares?"
asks this registry: the census (tracing), the rewrite (convert, SNL masks, feature taps)
and the MPC lowering. A kind declares

* how torch.fx shows it: module types, functions, ``Tensor`` methods, and which of those
  write in place (an in-place site rewrites its input, so the rewrite must re-point later
  readers);
* its channel axis (prototypes are chosen along it);
* how many secure comparisons one element costs in the original network (ReLU 1; a
  clipped activation such as ReLU6 = 6 − relu(6 − relu(x)) 2);
* its gate decomposition: ``"drelu"`` means y = x·DReLU(x), so a replicate channel can reuse
  a prototype's DReLU (DeepShare) and a mask can keep or drop it (SNL); ``None`` means the
  kind is counted but not converted;
* its MPC handler (the lowering/executor op name), or ``None``: not runnable on shares,
  which the lowering reports in one line;
* or a *decomposition into ReLU sites*: ``decompose(node, modules)`` writes the activation
  as ReLUs and public affine maps in front of ``node`` and returns the node holding its
  value. :func:`~deepshare_convert.conversion.tracing.trace` applies it to every such call
  right after tracing, so the census, plans, DeepShare, SNL and the MPC lowering only ever
  see ordinary ReLU sites (ReLU6 / Hardtanh: two, LeakyReLU: one; docs/conversion.md,
  "Activations beyond ReLU").

The design follows timm's ``create_act`` table and Torch-Pruning's per-layer handlers: adding
an activation is one :func:`register_activation` call, not an edit in every pass.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ActivationKind",
    "RELU",
    "register_activation",
    "unregister_activation",
    "activation_kinds",
    "get_activation",
    "kind_of",
    "kind_of_module",
    "is_inplace",
    "activation_input",
    "functional_forms",
    "RELU6",
    "HARDTANH",
    "LEAKY_RELU",
    "ORIGIN_META",
]

ORIGIN_META = "deepshare_origin"  # node.meta key: the kind a decomposed ReLU site came from


@dataclass(frozen=True)
class ActivationKind:
    """One activation family and everything a pass needs to know about it."""

    name: str
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    inplace_functions: tuple[Callable[..., Any], ...] = ()
    inplace_methods: tuple[str, ...] = ()
    channel_axis: int = 1
    comparisons_per_element: int = 1
    gate: str | None = "drelu"  # y = x * DReLU(x): shareable by prototypes and maskable by SNL
    mpc_handler: str | None = None
    # writes a call as ReLU sites + public affine maps before ``node``; returns the value's node
    decompose: Callable[[fx.Node, dict[str, nn.Module]], fx.Node] | None = None

    def matches(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), self.modules) if self.modules else False
        if node.op == "call_function":
            return node.target in self.functions
        if node.op == "call_method":
            return node.target in self.methods
        return False

    @property
    def convertible(self) -> bool:
        return self.gate == "drelu"


_REGISTRY: dict[str, ActivationKind] = {}


def register_activation(kind: ActivationKind) -> ActivationKind:
    """Add ``kind`` (a later registration of the same name replaces it); returns it."""
    _REGISTRY[kind.name] = kind
    return kind


def unregister_activation(name: str) -> None:
    _REGISTRY.pop(name, None)


def activation_kinds() -> tuple[ActivationKind, ...]:
    return tuple(_REGISTRY.values())


def get_activation(name: str) -> ActivationKind:
    """The registered kind called ``name`` (a plan naming an unknown kind is refused)."""
    from .errors import PlanError

    if name not in _REGISTRY:
        raise PlanError(f"activation kind {name!r} is not registered here (known: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def kind_of(node: fx.Node, modules: dict[str, nn.Module]) -> ActivationKind | None:
    """The activation kind of ``node``, or None for any other node."""
    for kind in _REGISTRY.values():
        if kind.matches(node, modules):
            return kind
    return None


def kind_of_module(module: nn.Module | None) -> ActivationKind | None:
    """The kind whose module types include ``module`` (tracing keeps such modules as one call)."""
    for kind in _REGISTRY.values():
        if kind.modules and isinstance(module, kind.modules):
            return kind
    return None


def is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Does this activation node overwrite its input (``nn.ReLU(inplace=True)``, ``relu_``, ``inplace=True``)?"""
    kind = kind_of(node, modules)
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return kind is not None and node.target in kind.inplace_methods
    return bool(node.kwargs.get("inplace", False)) or (kind is not None and node.target in kind.inplace_functions)


def activation_input(node: fx.Node) -> fx.Node:
    """The tensor an activation node acts on (its first argument or ``input=``)."""
    from .errors import PlanError

    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, fx.Node):
        raise PlanError(f"activation node {node.name!r} has no tensor input")
    return x


def functional_forms() -> dict[Callable[..., Any], ActivationKind]:
    """Every function (``Tensor`` methods included) that runs an activation, for a TorchFunctionMode."""
    forms: dict[Callable[..., Any], ActivationKind] = {}
    for kind in _REGISTRY.values():
        for f in kind.functions:
            forms[f] = kind
        for m in kind.methods:
            if hasattr(torch.Tensor, m):
                forms[getattr(torch.Tensor, m)] = kind
    return forms


_aten = torch.ops.aten  # the forms in torch.export graphs (``.pt2``): overloads and their packets
RELU = register_activation(ActivationKind(
    "relu",
    modules=(nn.ReLU,),
    functions=(F.relu, torch.relu, torch.relu_, F.relu_,
               _aten.relu.default, _aten.relu_.default, _aten.relu, _aten.relu_),
    methods=("relu", "relu_"),
    inplace_functions=(torch.relu_, F.relu_, _aten.relu_.default, _aten.relu_),
    inplace_methods=("relu_",),
    mpc_handler="relu",
))  # fmt: skip


# ---- activations decomposed into ReLU sites -------------------------------------------------------
def _bound(node: fx.Node, index: int, name: str, default: float) -> float:
    """A numeric argument of an activation call (positional ``index`` or keyword ``name``)."""
    from .errors import TraceError

    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(f"activation node {node.name!r}: {name} must be a number, got {value!r}")
    return float(value)


def _relu_site(node: fx.Node, x: fx.Node, suffix: str, origin: str) -> fx.Node:
    """A ``torch.relu`` site named ``<node>_<suffix>``, attributed to ``node``'s module."""
    relu = node.graph.create_node("call_function", torch.relu, (x,), name=f"{node.name}_{suffix}")
    relu.meta[ORIGIN_META] = origin
    return relu


def _clip_bounds(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float]:
    from .errors import TraceError

    if node.op == "call_module":
        m = modules[node.target]
        lo, hi = float(m.min_val), float(m.max_val)
    elif node.target is F.relu6 or node.target in _aten_forms("relu6", "relu6_"):
        lo, hi = 0.0, 6.0
    else:
        lo, hi = _bound(node, 1, "min_val", -1.0), _bound(node, 2, "max_val", 1.0)
    if not lo < hi:
        raise TraceError(f"activation node {node.name!r}: hardtanh needs min_val < max_val, got ({lo:g}, {hi:g})")
    return lo, hi


def _decompose_clip(origin: str):
    """Hardtanh(lo, hi) = hi - relu((hi - lo) - relu(x - lo)): ReLU6 is (0, 6).

    Two DReLU sites per element, ``<site>_lo`` (is x above lo?) and ``<site>_hi`` (is the
    lower-rectified value below hi?), each an ordinary ReLU that DeepShare shares and SNL
    masks; linearising either keeps a sensible function (relu(x), or min(x, hi) for lo = 0),
    linearising both gives x.
    """

    def decompose(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
        lo, hi = _clip_bounds(node, modules)
        x = activation_input(node)
        g = node.graph
        shifted = x if lo == 0 else g.call_function(operator.sub, (x, lo))
        lower = _relu_site(node, shifted, "lo", origin)
        upper = _relu_site(node, g.call_function(operator.sub, (hi - lo, lower)), "hi", origin)
        return g.call_function(operator.sub, (hi, upper))

    return decompose


def _decompose_leaky(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """LeakyReLU(a) = a*x + (1 - a)*relu(x) = x*(a + (1 - a)*DReLU(x)): one DReLU site, ``<site>_relu``.

    The site's shared gate keeps α = 1, β = 0 at P = C (exact identity); in effect the
    activation's gate affine is (1 - a)*α, a + (1 - a)*β. An SNL-linearised element is x.
    """
    if node.op == "call_module":
        slope = float(modules[node.target].negative_slope)
    else:
        slope = _bound(node, 1, "negative_slope", 0.01)
    x = activation_input(node)
    g = node.graph
    relu = _relu_site(node, x, "relu", "leaky_relu")
    return g.call_function(operator.add, (g.call_function(operator.mul, (x, slope)),
                                          g.call_function(operator.mul, (relu, 1.0 - slope))))  # fmt: skip


def _aten_forms(*names: str) -> tuple:
    """Every overload packet and default overload of the named ATen ops that exist here."""
    forms = []
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            forms += [packet, *(getattr(packet, o) for o in packet.overloads())]
    return tuple(forms)


RELU6 = register_activation(ActivationKind(
    "relu6",
    modules=(nn.ReLU6,),
    functions=(F.relu6, *_aten_forms("relu6", "relu6_")),
    inplace_functions=_aten_forms("relu6_"),
    comparisons_per_element=2,
    decompose=_decompose_clip("relu6"),
))  # fmt: skip
HARDTANH = register_activation(ActivationKind(  # after relu6: nn.ReLU6 is an nn.Hardtanh
    "hardtanh",
    modules=(nn.Hardtanh,),
    functions=(F.hardtanh, F.hardtanh_, *_aten_forms("hardtanh", "hardtanh_")),
    inplace_functions=(F.hardtanh_, *_aten_forms("hardtanh_")),
    comparisons_per_element=2,
    decompose=_decompose_clip("hardtanh"),
))  # fmt: skip
LEAKY_RELU = register_activation(ActivationKind(
    "leaky_relu",
    modules=(nn.LeakyReLU,),
    functions=(F.leaky_relu, F.leaky_relu_, *_aten_forms("leaky_relu", "leaky_relu_")),
    inplace_functions=(F.leaky_relu_, *_aten_forms("leaky_relu_")),
    decompose=_decompose_leaky,
))  # fmt: skip
