"""Activations written as ReLU sites: the pass that runs right after tracing.

A registered activation kind with a ``decompose`` rule (ReLU6, Hardtanh, LeakyReLU; see
:mod:`deepshare_convert.activations`) is rewritten, call by call, into ordinary ReLU sites
and public affine maps. Done once in :func:`~.tracing.trace`, so every later pass -- the
census, the plan, DeepShare's shared gates, SNL masks, feature taps, the MPC lowering and
its cost model -- sees plain ReLUs and needs no rule of its own: a ReLU6 is two DReLU sites
(two comparisons per element), a LeakyReLU one. The new sites are named after the call
(``<node>_lo``/``<node>_hi``, ``<node>_relu``), attributed to its module, and carry the kind
they came from (``node.meta[ORIGIN_META]``, reported by the census as ``origin``).
"""

from __future__ import annotations

import copy

import torch.fx as fx

from ..activations import activation_input, is_inplace, kind_of

__all__ = ["decompose_activations", "has_decomposable"]


def _decomposable(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if (k := kind_of(n, modules)) is not None and k.decompose is not None]


def has_decomposable(gm: fx.GraphModule) -> bool:
    return bool(_decomposable(gm))


def decompose_activations(gm: fx.GraphModule, *, copy_first: bool = False) -> fx.GraphModule:
    """Rewrite every decomposable activation call of ``gm`` into ReLU sites; returns the graph module.

    In place on ``gm`` unless ``copy_first`` (then a deep copy is rewritten, and only if
    there is anything to rewrite: a graph without such calls comes back as it is).
    """
    if not has_decomposable(gm):
        return gm
    if copy_first:
        gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    for node in _decomposable(gm):
        _decompose_node(gm, node, modules)
    gm.graph.lint()
    gm.recompile()
    return gm


def _decompose_node(gm: fx.GraphModule, node: fx.Node, modules) -> None:
    kind = kind_of(node, modules)
    x = activation_input(node)
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(node):
        out = kind.decompose(node, modules)
    stack = dict(node.meta.get("nn_module_stack") or {})
    if node.op == "call_module":  # the new nodes belong to the activation module
        stack[str(node.target)] = (str(node.target), type(modules[node.target]))
    for new in set(gm.graph.nodes) - before:
        if stack:
            new.meta["nn_module_stack"] = stack
        if "stack_trace" in node.meta:
            new.meta["stack_trace"] = node.meta["stack_trace"]
    if is_inplace(node, modules):  # the call overwrote x: later readers of x read its result
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for user in list(x.users):
            if order[user] > order[node]:
                user.replace_input_with(x, out)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
