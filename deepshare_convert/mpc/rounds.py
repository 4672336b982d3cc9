"""Round depth: the fewest rounds any schedule of a program's openings could take.

The executor runs the lowered graph node by node, so its rounds are the *sum* of every op's
rounds.  Openings that do not depend on each other could share a round; the fewest rounds any
merging could reach is the longest chain of data dependencies, each op weighted by its rounds
(:func:`round_depth`).  When sum = depth, every round waits on the one before it: no further
merge of independent openings is possible without a different protocol (docs/private_inference.md).
"""

from __future__ import annotations

from .costs import CostTable
from .program import Program, node_inputs as _node_inputs

__all__ = ["round_depth", "independent_rounds"]


def round_depth(program: Program, table: CostTable) -> int:
    """Longest dependency chain through the graph, each op weighted by its (table) rounds."""
    depth: dict[str, int] = {}
    current: dict[str, str] = {}  # a name -> the op whose value it now names (in-place ops rename)
    for node in program.gm.graph.nodes:
        op = program.op(node.name)
        before = max((depth[current.get(a.name, a.name)] for a in _node_inputs(node)), default=0)
        depth[node.name] = before + table.node_rounds(op)
        if op.inplace_of is not None:
            current[op.inplace_of] = node.name
    return max(depth.values(), default=0)


def independent_rounds(program: Program, table: CostTable) -> int:
    """Rounds the sequential schedule spends beyond the dependency bound (0: nothing left to merge)."""
    return sum(table.node_rounds(o) for o in program.ops) - round_depth(program, table)
