"""The cost model: bytes, rounds and latency of private inference, per node, without running it.

Every node of the lowered graph (:mod:`.lowering`) says how many elements it compares, opens
and reveals.  ``cost_table.json`` turns those counts into bytes and rounds -- numbers measured
on CrypTen itself by :func:`~.calibrate.calibrate`, not taken from a paper -- and into compute
seconds (calibrated on the machine that ran it).  This module needs no MPC framework (the seam
:mod:`.backend` promises); unit parsing lives in :mod:`.units`, the measuring party in :mod:`.calibrate`.  Then

    latency = compute + bytes * 8 / bandwidth + rounds * RTT

per node and in total, and the speedup of a converted model over its original under the
same settings (the metric of DeepShare's Table 6).  In ``private`` mode the weights are masked
once per loaded model (the setup: ``setup_bytes`` / ``setup_rounds``, every fixed tensor's
``W - b`` opened in one round); ``bytes`` / ``rounds`` / latency are one inference's online
phase, which is what repeats.  Bytes are CrypTen's per-party count
(each party logs what it sends plus what it receives; for two parties that is also the
total traffic on the link), so predicted and measured numbers compare one to one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import DeepShareError
from .lowering import MPCOp, Program, lower
from .prepare import prepare

__all__ = ["CostTable", "NodeCost", "Estimate", "estimate", "estimate_program", "TABLE_PATH"]

TABLE_PATH = Path(__file__).with_name("cost_table.json")
TABLE_FORMAT = "deepshare-mpc-costs/1"


@dataclass
class CostTable:
    """Per-operation costs (per party, as CrypTen counts them) and compute throughputs."""

    comparison_bytes: float  # per element compared
    comparison_rounds: int  # per comparison call
    open_bytes: float  # per element opened (Beaver / masked products)
    open_rounds: int  # per opening
    reveal_bytes: float  # per element revealed to one party
    reveal_rounds: int
    compute: dict[str, float] = field(default_factory=dict)  # seconds per MAC / element
    reference: dict[str, Any] = field(default_factory=dict)  # CrypTen's own ops, for the docs
    source: str = ""
    format: str = TABLE_FORMAT

    @classmethod
    def load(cls, path: str | Path | None = None) -> CostTable:
        path = Path(path) if path else TABLE_PATH
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DeepShareError(f"no cost table at {path}: run `deepshare calibrate`") from None
        except json.JSONDecodeError as e:
            raise DeepShareError(f"{path} is not valid JSON: {e}") from None
        if data.get("format") != TABLE_FORMAT:
            raise DeepShareError(f"{path} is not a {TABLE_FORMAT} cost table")
        return cls(**data)

    def save(self, path: str | Path | None = None) -> Path:
        from ..conversion.plan import write_json_atomic

        path = Path(path) if path else TABLE_PATH
        write_json_atomic(path, asdict(self))
        return path

    def node_bytes(self, op: MPCOp) -> int:
        return round(op.comparisons * self.comparison_bytes + (op.opened + op.truncated) * self.open_bytes
                     + op.revealed * self.reveal_bytes)  # fmt: skip

    def setup_cost(self, program: Program) -> tuple[int, int]:
        """(bytes, rounds) of the setup: every fixed tensor's ``W - b`` opened, all in one round."""
        n = program.setup_opened
        return round(n * self.open_bytes), (self.open_rounds if n else 0)

    def node_rounds(self, op: MPCOp) -> int:
        return (op.compare_steps * self.comparison_rounds + (op.open_rounds + op.trunc_rounds) * self.open_rounds
                + op.reveal_rounds * self.reveal_rounds)  # fmt: skip

    def node_compute(self, op: MPCOp, weights_mode: str) -> float:
        c = self.compute
        return (
            op.macs * c.get(f"s_per_mac_{weights_mode}", 0.0)
            + op.comparisons * c.get("s_per_comparison", 0.0)
            + (op.opened + op.truncated) * c.get("s_per_opened", 0.0)
        )


@dataclass
class NodeCost:
    node: str
    layer: str
    handler: str
    comparisons: int
    bytes: int
    rounds: int
    compute_s: float
    latency_s: float


@dataclass
class Estimate:
    model: str
    weights_mode: str
    batch: int
    bandwidth_bps: float
    rtt_s: float
    nodes: list[NodeCost]
    setup_bytes: int = 0  # once per loaded model (private mode: W - b of every fixed tensor)
    setup_rounds: int = 0
    offline_bytes: int = 0  # dealer -> client per inference (corrections; mpc/dealer), exact from the lowering
    offline_messages: int = 0

    @property
    def offline_network_s(self) -> float:
        """The dealer's message at this bandwidth: offline, it can travel before the input exists."""
        return self.offline_bytes * 8 / self.bandwidth_bps

    @property
    def setup_network_s(self) -> float:
        return self.setup_bytes * 8 / self.bandwidth_bps + self.setup_rounds * self.rtt_s

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    @property
    def rounds(self) -> int:
        return sum(n.rounds for n in self.nodes)

    @property
    def comparisons(self) -> int:
        return sum(n.comparisons for n in self.nodes)

    @property
    def compute_s(self) -> float:
        return sum(n.compute_s for n in self.nodes)

    @property
    def network_s(self) -> float:
        """Communication latency only: bytes / bandwidth + rounds * RTT."""
        return self.bytes * 8 / self.bandwidth_bps + self.rounds * self.rtt_s

    @property
    def latency_s(self) -> float:
        return self.compute_s + self.network_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "weights_mode": self.weights_mode, "batch": self.batch,
            "bandwidth_bps": self.bandwidth_bps, "rtt_s": self.rtt_s, "comparisons": self.comparisons,
            "bytes": self.bytes, "rounds": self.rounds, "compute_s": self.compute_s, "network_s": self.network_s,
            "latency_s": self.latency_s, "setup_bytes": self.setup_bytes, "setup_rounds": self.setup_rounds,
            "setup_network_s": self.setup_network_s, "offline_bytes": self.offline_bytes,
            "offline_messages": self.offline_messages, "offline_network_s": self.offline_network_s,
            "nodes": [asdict(n) for n in self.nodes],
        }  # fmt: skip


def estimate_program(program: Program, table: CostTable | None = None, *, bandwidth: float = 1e9,
                     rtt: float = 1e-3, name: str = "model") -> Estimate:  # fmt: skip
    """Cost of every communicating or computing node of a lowered program."""
    table = table or CostTable.load()
    nodes = []
    for op in program.ops:
        b, r = table.node_bytes(op), table.node_rounds(op)
        c = table.node_compute(op, program.weights_mode)
        if b or r or c:
            nodes.append(NodeCost(op.node, op.layer, op.handler, op.comparisons, b, r, c,
                                  c + b * 8 / bandwidth + r * rtt))  # fmt: skip
    return Estimate(name, program.weights_mode, program.input_shape[0], bandwidth, rtt, nodes,
                    *table.setup_cost(program), program.offline_elements * 8, 1)  # fmt: skip


def estimate(model: nn.Module, input_size: Sequence[int], *, batch: int = 1, weights_mode: str = "public",
             table: CostTable | None = None, bandwidth: float = 1e9, rtt: float = 1e-3, name: str = "model",
             leaf_modules: Sequence[str] = (), truncation: str | None = None) -> Estimate:  # fmt: skip
    """Estimate private inference of ``model`` on a batch of ``input_size`` (C, H, W) inputs."""
    program = lower(prepare(model, leaf_modules=leaf_modules), (batch, *input_size), weights_mode, truncation)
    return estimate_program(program, table, bandwidth=bandwidth, rtt=rtt, name=name)
