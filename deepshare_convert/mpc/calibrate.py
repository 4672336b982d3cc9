"""``deepshare calibrate``: measure the cost table (``cost_table.json``) on CrypTen itself.

Two local parties run micro-benchmarks (a comparison, a gate product, a reveal, CrypTen's own
ops, a public and a private convolution) at two sizes; bytes and rounds come from CrypTen's
counters (the per-element slope), compute throughputs from wall time minus time in
communication.  Not to be confused with :mod:`..conversion.fitting`, which fits a converted
model's map and affine to data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import DeepShareError
from .costs import CostTable

__all__ = ["calibrate"]


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
