"""Passes that rewrite activation sites, in torch.fx's pass shape: requires -> call -> ensures.

The DeepShare rewrite (sites -> shared gates), the SNL mask pass (sites -> masked ReLUs)
and the feature taps of knowledge distillation all do the same surgery: replace an
activation node by a call of a new submodule on the node's input, keeping the meaning of
in-place activations for later readers. :class:`SiteRewrite` is that shared part on top of
``torch.fx.passes.infra.PassBase`` -- its ``__call__`` runs ``requires`` (preconditions:
the holder attributes are free), ``call`` (the surgery) and ``ensures`` (the graph lints;
a subclass adds its own count check) -- and :func:`swap_site` is the one node swap.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..activations import activation_input, is_inplace
from ..errors import PlanError

__all__ = ["SiteRewrite", "PassResult", "swap_site"]


class SiteRewrite(PassBase):
    """Base of the site-replacing passes: ``holders`` are the submodule names the pass adds."""

    holders: tuple[str, ...] = ()

    def requires(self, gm: fx.GraphModule) -> None:
        for attr in self.holders:
            if hasattr(gm, attr):
                raise PlanError(f"model already has an attribute {attr!r} (converted twice?)")

    def add_holders(self, gm: fx.GraphModule) -> None:
        for attr in self.holders:
            gm.add_module(attr, nn.Module())

    def ensures(self, gm: fx.GraphModule) -> None:
        gm.graph.lint()


def swap_site(gm: fx.GraphModule, node: fx.Node, target: str, modules: dict[str, nn.Module],
              extra_args: tuple = ()) -> fx.Node:  # fmt: skip
    """Replace activation ``node`` by a call of submodule ``target`` on its input (and ``extra_args``).

    An in-place activation also rewrote its input x: readers of x after it must now read
    the new value, or they would see the un-rectified tensor.
    """
    x = activation_input(node)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (x, *extra_args))
    if is_inplace(node, modules):
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for user in list(x.users):
            if user is not new and user not in extra_args and order[user] > order[node]:
                user.replace_input_with(x, new)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new
