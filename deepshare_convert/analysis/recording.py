"""Which gates a model has, and a forward pass that hands each site's input to a callback.

An original model is traced with the conversion tracer and its sites are the census's
activation sites of a kind with a DReLU form: the input of each is what its gate compares.
A converted model (an fx graph with :class:`~deepshare_convert.conversion.gates.SharedGate`
sites) is read from its graph: every site node names its group's gate node, and the leader
is the site that feeds the gate.  Recording runs the graph through an :class:`fx.Interpreter`
so functional and in-place activations are seen too; the callback gets the input *before*
the node runs (an in-place ReLU would overwrite it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..activations import get_activation
from ..conversion.census import find_sites
from ..conversion.rewrite import GATES_ATTR, SITES_ATTR
from ..conversion.tracing import example_input, propagate_shapes, trace
from ..errors import DeepShareError

__all__ = ["SiteInfo", "GraphSites", "graph_sites", "record"]


@dataclass
class SiteInfo:
    """One gated site; ``group``, ``leader`` and ``prototypes`` only for a converted model."""

    name: str
    module: str
    node: str
    group: int | None = None
    leader: bool = False
    prototypes: int | None = None


@dataclass
class GraphSites:
    graph: fx.GraphModule
    sites: list[SiteInfo]
    gates: dict[str, int]  # gate node name -> group index (converted models)
    converted: bool


def graph_sites(model: nn.Module, input_size: Sequence[int], leaf: Sequence[str] = ()) -> GraphSites:
    """The sites to analyse; one-line error if there are none."""
    if isinstance(model, fx.GraphModule) and hasattr(model, GATES_ATTR) and hasattr(model, SITES_ATTR):
        found = _converted_sites(model)
    else:
        gm = trace(model, leaf)
        propagate_shapes(gm, example_input(input_size, gm))
        sites = [s for s in find_sites(gm) if s.kind in ("module", "function", "method")
                 and get_activation(s.activation).convertible]  # fmt: skip
        found = GraphSites(gm, [SiteInfo(s.name, s.module, s.name) for s in sites], {}, False)
    if not found.sites:
        raise DeepShareError("the model has no activation sites with a DReLU gate to analyse")
    return found


def _converted_sites(gm: fx.GraphModule) -> GraphSites:
    """Sites, groups and leaders of a converted graph, read from its nodes."""
    gate_prefix, site_prefix = f"{GATES_ATTR}.", f"{SITES_ATTR}."
    gates: dict[str, int] = {}
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(site_prefix):
            continue
        gate_node = node.args[1]
        index = int(str(gate_node.target).removeprefix(gate_prefix + "g"))
        gates[gate_node.name] = index
        leader = node.args[0] is gate_node.args[0]
        module = gm.get_submodule(str(gate_node.target))
        name = str(node.target).removeprefix(site_prefix)
        sites.append(SiteInfo(name, name, node.name, index, leader, module.prototypes))
    return GraphSites(gm, sites, gates, True)


class _Recorder(fx.Interpreter):
    """Runs the graph; hands the first argument of watched nodes to ``callback`` before they run."""

    def __init__(self, gm: fx.GraphModule, watched: dict[str, tuple[str, object]],
                 callback: Callable[[str, object, torch.Tensor], None]):  # fmt: skip
        super().__init__(gm)
        self.watched, self.callback = watched, callback

    def run_node(self, n: fx.Node):
        what = self.watched.get(n.name)
        if what is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.callback(what[0], what[1], args[0])
        return super().run_node(n)


@torch.no_grad()
def record(found: GraphSites, images: torch.Tensor, callback: Callable[[str, object, torch.Tensor], None]) -> None:
    """One forward of ``images``: ``callback("gate", group, x)`` and ``callback("site", SiteInfo, x)``."""
    watched: dict[str, tuple[str, object]] = {s.node: ("site", s) for s in found.sites}
    watched.update({node: ("gate", index) for node, index in found.gates.items()})
    gm = found.graph
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        _Recorder(gm, watched, callback).run(images)
    finally:
        for m, training in modes.items():
            m.training = training
