"""Activation kinds: what an activation site is, defined once.

Every pass that asks "is this node an activation we count, convert or run on shares?"
asks this registry: the census (tracing), the rewrite (convert, SNL masks, feature taps)
and the MPC lowering. A kind declares

* how torch.fx shows it: module types, functions, ``Tensor`` methods, and which of those
  write in place (an in-place site rewrites its input, so the rewrite must re-point later
  readers);
* its channel axis (prototypes are chosen along it);
* how many secure comparisons one element costs in the original network (ReLU 1; a
  clipped activation such as ReLU6 = x·DReLU(x) − (x−6)·DReLU(x−6) would be 2);
* its gate decomposition: ``"drelu"`` means y = x·DReLU(x), so a replicate channel can reuse
  a prototype's DReLU (DeepShare) and a mask can keep or drop it (SNL); ``None`` means the
  kind is counted but not converted;
* its MPC handler (the lowering/executor op name), or ``None``: not runnable on shares,
  which the lowering reports in one line.

The design follows timm's ``create_act`` table and Torch-Pruning's per-layer handlers: adding
an activation is one :func:`register_activation` call, not an edit in every pass.
"""

from __future__ import annotations

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
]


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
