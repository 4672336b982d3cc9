"""Graph modules across the process boundary: :func:`pack` / :func:`unpack`.

The launcher spawns each party as a fresh process and sends it the (prepared, possibly
weightless) graph by pickling.  torch 2.13 cannot pickle an ``fx.GraphModule`` (a str in its
globals), so the graph travels as plain data and is rebuilt on the other side.  This is a
torch.fx workaround, not part of what a node costs or how a backend runs it, hence its own
module.  No crypten import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate

__all__ = ["canonical", "pack", "unpack"]


@dataclass(frozen=True)
class _Ref:
    name: str


@dataclass(frozen=True)
class _Op:
    """An ATen operator (torch.export graphs): OpOverloads do not pickle, their names do."""

    packet: str  # "conv2d"
    overload: str  # "default"


def _encode_target(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return _Op(target.__name__.split(".")[0], target._overloadname)
    return target


def _decode_target(target: Any) -> Any:
    return getattr(getattr(torch.ops.aten, target.packet), target.overload) if isinstance(target, _Op) else target


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
        rows.append((n.op, n.name, _encode_target(n.target), args, kwargs))
    return {"root": root, "nodes": rows, "class_name": type(gm).__name__}


def unpack(packed: dict[str, Any]) -> fx.GraphModule:
    """The eval-mode ``GraphModule`` that :func:`pack` was given, rebuilt node by node."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs in packed["nodes"]:
        args = map_aggregate(args, lambda a: env[a.name] if isinstance(a, _Ref) else a)
        kwargs = map_aggregate(kwargs, lambda a: env[a.name] if isinstance(a, _Ref) else a)
        if op == "output":
            env[name] = graph.output(args[0])
        else:
            env[name] = graph.create_node(op, _decode_target(target), tuple(args), dict(kwargs), name=name)
    return fx.GraphModule(packed["root"], graph, packed["class_name"]).eval()


def canonical(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as a spawned party holds it (packed and rebuilt): the form plan hashes are compared in, so a
    party that never crossed a process boundary (a ``query`` client) hashes what a server worker does."""
    return unpack(pack(gm))
