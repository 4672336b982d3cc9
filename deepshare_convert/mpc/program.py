"""The lowered program's data: one :class:`MPCOp` per graph node, the :class:`Program` they form, and
the small node helpers the lowering and the cost rules share.

Kept apart from :mod:`.lowering` (which classifies nodes) and :mod:`.cost_rules` (which counts
what each op puts on the wire) so that both read the same types without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx
from torch.fx.node import map_aggregate

__all__ = ["MPCOp", "Program", "numel", "node_shape", "node_inputs", "node_arg"]


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
    dealt: int = 0  # correction elements the dealer sends the client for this op (the offline phase)
    truncated: int = 0  # elements divided by the exact truncation (mpc/truncation.py), each opened once
    trunc_rounds: int = 0  # its openings (one per division; sequential within the node)

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
    truncation: str = "local"  # "exact" | "local" (mpc/fixed_point.py, mpc/truncation.py)
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
    def offline_elements(self) -> int:
        """Correction elements the dealer sends per run (8 bytes each; the offline phase)."""
        return sum(o.dealt for o in self.ops)

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


def numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def node_shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def node_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(a, fx.Node) else a)
    return found


def node_arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)
