"""The cost model: bytes, rounds and latency of private inference, per node, without running it.

Every node of the lowered graph (:mod:`.lowering`) says how many elements it compares, opens
and reveals.  ``cost_table.json`` turns those counts into bytes and rounds -- numbers measured
on CrypTen itself by :func:`calibrate`, not taken from a paper -- and into compute seconds
(calibrated on the machine that ran :func:`calibrate`).  Then

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
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import DeepShareError
from .lowering import MPCOp, Program, lower
from .prepare import prepare

__all__ = [
    "CostTable", "NodeCost", "Estimate", "estimate", "estimate_program", "calibrate",
    "parse_bandwidth", "parse_duration", "TABLE_PATH",
]  # fmt: skip

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


# ---- units -----------------------------------------------------------------------------------
_BW_UNITS = {"bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12,
             "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
             "b/s": 8, "kb/s": 8e3, "mb/s": 8e6, "gb/s": 8e9}  # fmt: skip
_TIME_UNITS = {"s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_bandwidth(text: str | float) -> float:
    """'1Gbps' / '100Mbit' / '1.5 GB/s' -> bits per second; a Python number is taken as bits per second.

    A string needs its unit: a bare '10' used to mean 10 bit/s beside an --rtt whose bare
    '1' meant 1 ms, so neither is guessed any more.
    """
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z/]*)\s*", text)
    unit = m.group(2).lower().removesuffix("/s") if m and m.group(2).lower().endswith("bit/s") else (
        m.group(2).lower() if m else None)  # fmt: skip
    if m and unit == "":
        raise DeepShareError(f"--bandwidth {text!r} needs a unit: {m.group(1)}Mbps, {m.group(1)}Gbps "
                             f"(bits per second) or {m.group(1)}MB/s (bytes)")  # fmt: skip
    if not m or unit not in _BW_UNITS or float(m.group(1)) <= 0:
        raise DeepShareError(f"--bandwidth {text!r} is not a bandwidth like 1Gbps, 100Mbit or 1GB/s")
    return float(m.group(1)) * _BW_UNITS[unit]


def parse_duration(text: str | float) -> float:
    """'1ms' / '0.5ms' / '20us' / '0.001s' -> seconds; a Python number is taken as seconds (a string needs a unit)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Zµ]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m and unit == "":
        raise DeepShareError(f"--rtt {text!r} needs a unit: {m.group(1)}ms, {m.group(1)}us or {m.group(1)}s")
    if not m or unit not in _TIME_UNITS:
        raise DeepShareError(f"--rtt {text!r} is not a duration like 1ms, 20us or 0.01s")
    return float(m.group(1)) * _TIME_UNITS[unit]


# ---- calibration -----------------------------------------------------------------------------
def _delta(comm, fn):
    before = comm.get().get_communication_stats()
    tic = time.perf_counter()
    fn()
    wall = time.perf_counter() - tic
    after = comm.get().get_communication_stats()
    return int(after["bytes"] - before["bytes"]), int(after["rounds"] - before["rounds"]), wall, after["time"] - before["time"]


def _median_delta(comm, fn, repeats: int = 5):
    """:func:`_delta` of the run with the median compute time, after one warm-up call.

    The warm-up also lets the ring kernels time their choice for this layer (:mod:`.ring`), and
    the median keeps a burst of load from other processes out of the table.
    """
    fn()
    runs = [_delta(comm, fn) for _ in range(repeats)]
    return sorted(runs, key=lambda r: r[2] - r[3])[repeats // 2]


def _calibration_party(backend, rank: int, sizes: tuple[int, int], conv: tuple[int, int, int]) -> dict[str, Any]:
    """Micro-benchmarks at one party (the launcher started ``backend``, CrypTen: these call it directly)."""
    import crypten
    import crypten.communicator as comm
    import torch
    from crypten.mpc.primitives import ArithmeticSharedTensor as A

    from . import protocols as P
    from .dealer.randomness import SimulatedDealer
    from .fixed_point import ACTIVATION_BITS, WEIGHT_BITS
    from .ring import RingWeight

    dealer = SimulatedDealer(rank, seed=1)  # compute timings only: who deals does not change the online phase
    g = torch.Generator().manual_seed(0)

    def shared(shape):
        if rank == 1:
            return A(torch.randn(shape, generator=g), precision=ACTIVATION_BITS, src=1)
        return A(None, size=shape, precision=ACTIVATION_BITS, src=1)

    out: dict[str, Any] = {}
    for n in sizes:
        x = shared((n,))
        comm.get().barrier()
        out[f"drelu_{n}"] = _delta(comm, lambda: P.drelu(x, dealer))
        bit = P.drelu(x, dealer)
        out[f"product_{n}"] = _delta(comm, lambda: P.gate_product(x, bit, dealer))
        out[f"reveal_{n}"] = _delta(comm, lambda: x.get_plain_text(dst=1))
        mx = crypten.cryptensor(torch.randn(n, generator=g), src=1)
        out[f"crypten_ltz_{n}"] = _delta(comm, lambda: mx._ltz())
        out[f"crypten_relu_{n}"] = _delta(comm, lambda: mx.relu())
        out[f"crypten_mul_{n}"] = _delta(comm, lambda: mx * mx)
    c, hw, k = conv
    x = shared((1, c, hw, hw))
    w = torch.randn(c, c, k, k, generator=g) * 0.05
    ws = A(w, precision=WEIGHT_BITS, src=0) if rank == 0 else A(None, size=w.shape, precision=WEIGHT_BITS, src=0)
    comm.get().barrier()
    rw = RingWeight.encode(w)  # prepared once per layer, as the executor does
    out["conv_public"] = _median_delta(comm, lambda: P.public_conv2d(x, rw, None, padding=k // 2))
    masks = P.mask_weights({"w": ws}, dealer)  # private mode: the weight masked once, as at setup
    out["conv_private"] = _median_delta(
        comm, lambda: P.fixed_product(x, masks["w"], lambda u, v: torch.conv2d(u, v, padding=k // 2), dealer))
    out["conv_macs"] = c * c * k * k * hw * hw
    return out


def calibrate(path: str | Path | None = None, *, quick: bool = False, save: bool = True) -> CostTable:
    """Measure the cost table on CrypTen (two local processes) and write ``cost_table.json``.

    Bytes and rounds come from CrypTen's own counters at two sizes (the per-element slope;
    a non-zero per-call intercept would be reported as an error, as the model has none).
    Compute throughputs are wall time minus time inside communication, on this machine.
    """
    from ..compat import import_crypten
    from .executor import CrypTenBackend
    from .launcher import spawn_two

    import_crypten()
    sizes = (2048, 8192) if quick else (4096, 32768)
    conv = (32, 16, 3) if quick else (64, 32, 3)
    r0, _ = spawn_two(_calibration_party, ((sizes, conv), (sizes, conv)), backend=CrypTenBackend(dealer="simulated"))
    n1, n2 = sizes

    def slope(key: str) -> tuple[float, int]:
        b1, rd1, _, _ = r0[f"{key}_{n1}"]
        b2, rd2, _, _ = r0[f"{key}_{n2}"]
        per = (b2 - b1) / (n2 - n1)
        if abs(b1 - per * n1) > 1e-6 * b1 or rd1 != rd2:
            raise DeepShareError(f"calibration: {key} bytes are not linear in the element count ({b1}, {b2})")
        return per, rd2

    def seconds(key: str, count: int) -> float:
        _, _, wall, comm_t = r0[key]
        return max(wall - comm_t, 0.0) / count

    cmp_b, cmp_r = slope("drelu")
    prod_b, prod_r = slope("product")
    rev_b, rev_r = slope("reveal")
    reference = {}
    for key in ("crypten_ltz", "crypten_relu", "crypten_mul"):
        b, r = slope(key)
        reference[key] = {"bytes_per_element": b, "rounds": r}
    reference["gate_product"] = {"bytes_per_element": prod_b, "rounds": prod_r}
    table = CostTable(
        comparison_bytes=cmp_b, comparison_rounds=cmp_r, open_bytes=prod_b, open_rounds=prod_r,
        reveal_bytes=rev_b, reveal_rounds=rev_r,
        compute={
            "s_per_mac_public": seconds("conv_public", r0["conv_macs"]),
            "s_per_mac_private": seconds("conv_private", r0["conv_macs"]),
            "s_per_comparison": seconds(f"drelu_{n2}", n2),
            "s_per_opened": seconds(f"product_{n2}", n2),
        },
        reference=reference,
        source=f"deepshare calibrate{' --quick' if quick else ''}, crypten {_crypten_version()}, "
        f"{time.strftime('%Y-%m-%d')}, one torch thread per party, loopback, conv: median of 5",
    )  # fmt: skip
    if save:
        table.save(path)
    return table


def _crypten_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crypten")
    except PackageNotFoundError:
        return "?"
