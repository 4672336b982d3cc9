"""Private-inference cost of ResNet-18-CIFAR at the paper's three budgets vs the original.

    python bench/pi_latency.py [--quick | --only private:6k ...] [--bandwidth 1Gbps] [--rtt 1ms]

For the original model and DeepShare conversions at 49.9K / 12.9K / 6K DReLUs (batch 1) with
layer-sharing group sizes 1, 2 and 4 (``group_size``; a budget below one prototype per gate at
some G is an ``infeasible`` row; the model names without ``@g`` are G = 2), in both weight
modes: bytes, rounds, estimated latency (compute + bytes/bandwidth + rounds*RTT, from
deepshare_convert/mpc/cost_table.json) and the speedup over the original, next to the paper's
Table 6.  In private mode the weights are masked once per loaded model (setup bytes
and rounds, reported apart); bytes, rounds, latency and speedups are one inference's online
phase.  Measured two-party loopback runs (setup and online bytes, rounds, wall time,
agreement): every configuration, or with --quick the original and 6K in public mode only, or
with --only the listed MODE:MODEL rows, MODEL being original, 6k (G = 2) or 6k@g4 (estimates are
always computed for every row).

Correlated randomness comes from a separate dealer process (mpc/dealer): its corrections to the
client are the offline phase, estimated (``est_offline_bytes``) and measured
(``measured_offline_bytes``) apart from the online figures.  ``--simulated-too`` also runs each
measured row with the party-0 (simulated, not private) dealer in the same invocation, so the two
wall times sit side by side (``measured_wall_s`` / ``measured_wall_s_simulated``).

``--truncation`` measures only ResNet-18-CIFAR 6K (G = 2), both weight modes, once with today's
local truncation and once with the exact one (mpc/truncation.py) in the same invocation: bytes,
rounds, offline bytes (estimate = measurement in every inference) and the median wall time of 5
inferences after one setup, side by side (~3 min on 2 cores).

Writes bench/results/pi_latency.json and .png (pi_latency_quick.* with --quick,
pi_latency_only.json with --only, pi_latency_truncation.json with --truncation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from deepshare_convert import load_model  # noqa: E402
from deepshare_convert.conversion.rewrite import convert  # noqa: E402
from deepshare_convert.errors import DeepShareError  # noqa: E402
from deepshare_convert.models.batchnorm import recalibrate_batchnorm  # noqa: E402
from deepshare_convert.mpc.costs import CostTable, estimate  # noqa: E402
from deepshare_convert.mpc.units import parse_bandwidth, parse_duration  # noqa: E402

from common import add_out_arg, write_results  # noqa: E402

BUDGETS = ("49.9k", "12.9k", "6k")
GROUP_SIZES = (2, 1, 4)  # 2 first: the rows named by the budget alone (the plot, the paper's comparison)
PAPER_TABLE6 = {  # latency speedup over the original ResNet-18 (paper Table 6)
    "DeepShare": {"49.9k": 4.78, "12.9k": 6.76, "6k": 7.64},
    "AutoReP": {"49.9k": 4.92, "12.9k": 7.30, "6k": 8.01},
}


def _bn_from_data(model: nn.Module, input_size) -> nn.Module:
    """Untrained weights, BatchNorm statistics from random data: O(1) activations, sane logits."""
    return recalibrate_batchnorm(model, input_size, batch=32, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="measure only the original and 6K, public mode")
    ap.add_argument("--only", nargs="+", metavar="MODE:MODEL", help="measure only these rows, e.g. private:6k")
    ap.add_argument("--bandwidth", default="1Gbps")
    ap.add_argument("--rtt", default="1ms")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the existing JSON")
    ap.add_argument("--simulated-too", action="store_true",
                    help="also measure every measured row with the simulated (party-0) dealer, for the wall time")
    ap.add_argument("--truncation", action="store_true",
                    help="only ResNet-18 6K, both weight modes, local vs exact truncation side by side")
    add_out_arg(ap)
    args = ap.parse_args()
    valid = {f"{m}:{n}" for m in ("public", "private") for n in ("original", *_names())}
    if args.only and not set(args.only) <= valid:
        ap.error(f"--only takes rows among {', '.join(sorted(valid))}")
    if args.replot:
        import json

        data = json.loads((args.out / "pi_latency.json").read_text())
        print(_plot(data["rows"], args.out / "pi_latency.png", args.bandwidth, args.rtt))
        return
    bw, rtt = parse_bandwidth(args.bandwidth), parse_duration(args.rtt)
    table = CostTable.load()

    torch.manual_seed(0)
    loaded = load_model("resnet18_cifar")
    original = _bn_from_data(loaded.model, loaded.input_size)
    if args.truncation:
        _truncation_rows(args, original, loaded, table, bw, rtt)
        return
    models = {"original": original}
    drelus = {"original": None}
    groups = {"original": None}
    infeasible = {}
    for g in GROUP_SIZES:
        for b in BUDGETS:
            name = _name(b, g)
            groups[name] = g
            try:
                conv = convert(original, loaded.input_size, budget=b, group_size=g, spec=loaded.spec.to_dict())
            except DeepShareError as e:  # below one prototype per gate at this group size
                infeasible[name] = str(e)
                continue
            models[name], drelus[name] = conv.model, conv.plan.achieved
    x = torch.randn((1, *loaded.input_size), generator=torch.Generator().manual_seed(1))

    rows = []
    for mode in ("public", "private"):
        for name, why in infeasible.items():
            rows.append({"model": name, "weights_mode": mode, "group_size": groups[name], "infeasible": why})
            print(f"{mode:7s} {name:8s} infeasible: {why}", flush=True)
        base = estimate(original, loaded.input_size, weights_mode=mode, table=table, bandwidth=bw, rtt=rtt)
        for name, net in models.items():
            est = base if name == "original" else estimate(net, loaded.input_size, weights_mode=mode, table=table,
                                                           bandwidth=bw, rtt=rtt)  # fmt: skip
            row = {
                "model": name, "weights_mode": mode, "group_size": groups[name], "drelus": drelus[name] or base.comparisons,
                "est_bytes": est.bytes, "est_rounds": est.rounds, "est_compute_s": est.compute_s,
                "est_network_s": est.network_s, "est_latency_s": est.latency_s,
                "est_setup_bytes": est.setup_bytes, "est_setup_rounds": est.setup_rounds,
                "est_offline_bytes": est.offline_bytes, "est_offline_messages": est.offline_messages,
                "speedup": base.latency_s / est.latency_s, "speedup_network": base.network_s / est.network_s,
                "paper_deepshare": PAPER_TABLE6["DeepShare"].get(name), "paper_autorep": PAPER_TABLE6["AutoReP"].get(name),
            }  # fmt: skip
            if _measured(args, mode, name):
                from deepshare_convert.mpc.launcher import run_two_party

                t0 = time.perf_counter()
                r = run_two_party(net, x, weights_mode=mode, timeout=900)
                p0 = r.parties[0]
                row.update(measured_bytes=p0.bytes, measured_rounds=p0.rounds, measured_wall_s=p0.wall_s,
                           measured_setup_bytes=p0.setup_bytes, measured_setup_rounds=p0.setup_rounds,
                           measured_setup_wall_s=p0.setup.get("wall_s", 0.0),
                           measured_comm_s=p0.comm_s, comparisons=p0.comparisons, max_logit_error=r.max_logit_error,
                           top1_agreement=r.top1_agreement, run_s=time.perf_counter() - t0,
                           bytes_deviation=(est.bytes - p0.bytes) / p0.bytes,
                           rounds_deviation=(est.rounds - p0.rounds) / p0.rounds, dealer=r.dealer,
                           measured_offline_bytes=r.offline_bytes, measured_offline_messages=r.offline_messages,
                           measured_offline_s=r.parties[1].inferences[0]["offline_s"],
                           measured_deal_s=r.dealer_report["inferences"][0]["deal_s"])  # fmt: skip
                if args.simulated_too:
                    sim = run_two_party(net, x, weights_mode=mode, timeout=900, dealer="simulated")
                    q0 = sim.parties[0]
                    assert (q0.bytes, q0.rounds) == (p0.bytes, p0.rounds), "the dealer changed the online phase"
                    row.update(measured_wall_s_simulated=q0.wall_s, top1_agreement_simulated=sim.top1_agreement)
            rows.append(row)
            print(_line(row), flush=True)

    at6k = {r["weights_mode"]: r["est_rounds"] for r in rows if r["model"] == "6k@g4"}
    print(f"rounds at 6K with group size 4 (the accuracy bench's ResNet-20 setting at 4%/2%): "
          f"public {at6k.get('public')}, private online {at6k.get('private')} (issue target <= 49)")
    # --quick / --only never overwrite the full results
    name = "pi_latency_quick" if args.quick else ("pi_latency_only" if args.only else "pi_latency")
    path = write_results(name, {"quick": args.quick, "only": args.only, "bandwidth_bps": bw, "rtt_s": rtt, "batch": 1,
                                        "cost_table": table.source, "rows": rows}, args.out)  # fmt: skip
    png = _plot(rows, args.out / f"{name}.png", args.bandwidth, args.rtt)
    print(f"wrote {path} and {png}")


REPEATS = 5  # --truncation: inferences per configuration (after one setup), for a median wall time


def _truncation_rows(args, original: nn.Module, loaded, table: CostTable, bw: float, rtt: float) -> None:
    """ResNet-18 6K (G = 2): local and exact truncation, estimated and measured, in both weight modes."""
    from deepshare_convert.mpc.launcher import run_two_party

    conv = convert(original, loaded.input_size, budget="6k", group_size=2, spec=loaded.spec.to_dict())
    x = torch.randn((1, *loaded.input_size), generator=torch.Generator().manual_seed(1))
    rows = []
    for mode in ("public", "private"):
        for trunc in ("local", "exact"):
            est = estimate(conv.model, loaded.input_size, weights_mode=mode, table=table, bandwidth=bw, rtt=rtt,
                           truncation=trunc)  # fmt: skip
            # the same image REPEATS times after one setup: every inference measured, the median wall reported
            r = run_two_party(conv.model, x.repeat(REPEATS, 1, 1, 1), weights_mode=mode, timeout=900, sequential=True,
                              truncation=trunc)  # fmt: skip
            runs = r.parties[0].inferences
            walls = sorted(i["wall_s"] for i in runs)
            row = {"model": "6k", "weights_mode": mode, "truncation": trunc, "drelus": conv.plan.achieved,
                   "est_bytes": est.bytes, "est_rounds": est.rounds, "est_offline_bytes": est.offline_bytes,
                   "est_network_s": est.network_s, "est_latency_s": est.latency_s,
                   "measured_bytes": [i["bytes"] for i in runs], "measured_rounds": [i["rounds"] for i in runs],
                   "measured_offline_bytes": r.offline_bytes // REPEATS, "measured_wall_s": walls[len(walls) // 2],
                   "measured_walls_s": [i["wall_s"] for i in runs], "max_logit_error": r.max_logit_error,
                   "top1_agreement": r.top1_agreement, "dealer": r.dealer}  # fmt: skip
            assert all((i["bytes"], i["rounds"]) == (est.bytes, est.rounds) for i in runs), f"estimate != measured: {row}"
            assert r.offline_bytes == REPEATS * est.offline_bytes, row
            rows.append(row)
            print(f"{mode:7s} {trunc:5s} online {est.bytes / 1e6:7.2f} MB {est.rounds:4d} rounds (= measured), offline "
                  f"{est.offline_bytes / 1e6:6.2f} MB (= measured), network {est.network_s * 1e3:6.1f} ms, total "
                  f"{est.latency_s * 1e3:6.1f} ms (est.), loopback wall {row['measured_wall_s']:5.2f} s (median of "
                  f"{REPEATS}), max logit err {r.max_logit_error:.1e}", flush=True)  # fmt: skip
    path = write_results("pi_latency_truncation", {"bandwidth_bps": bw, "rtt_s": rtt, "batch": 1,
                                                   "cost_table": table.source, "rows": rows}, args.out)  # fmt: skip
    print(f"wrote {path}")


def _name(budget: str, group_size: int) -> str:
    return budget if group_size == 2 else f"{budget}@g{group_size}"


def _names() -> list[str]:
    return [_name(b, g) for g in GROUP_SIZES for b in BUDGETS]


def _measured(args, mode: str, name: str) -> bool:
    if args.only:
        return f"{mode}:{name}" in args.only
    return not args.quick or (mode == "public" and name in ("original", "6k"))


def _line(r: dict) -> str:
    s = (f"{r['weights_mode']:7s} {r['model']:8s} DReLUs {r['drelus']:>8,}  setup {r['est_setup_bytes'] / 1e6:7.2f} MB "
         f"{r['est_setup_rounds']} rnd  online est {r['est_bytes'] / 1e6:8.2f} MB "
         f"{r['est_rounds']:4d} rounds  net {r['est_network_s'] * 1e3:7.1f} ms  total {r['est_latency_s'] * 1e3:8.1f} ms"
         f"  speedup {r['speedup']:5.2f}x (net {r['speedup_network']:5.2f}x)")  # fmt: skip
    if "measured_bytes" in r:
        s += (f" | measured setup {r['measured_setup_bytes'] / 1e6:7.2f} MB {r['measured_setup_rounds']} rnd, online "
              f"{r['measured_bytes'] / 1e6:8.2f} MB {r['measured_rounds']:4d} rounds "
              f"{r['measured_wall_s'] * 1e3:7.0f} ms, logit err {r['max_logit_error']:.1e}; offline "
              f"{r['measured_offline_bytes'] / 1e6:.2f} MB (est {r['est_offline_bytes'] / 1e6:.2f})")  # fmt: skip
        if "measured_wall_s_simulated" in r:
            s += (f"; wall {r['measured_wall_s'] * 1e3:.0f} ms (dealer) vs "
                  f"{r['measured_wall_s_simulated'] * 1e3:.0f} ms (simulated)")
    return s


def _plot(rows: list[dict], path: Path, bandwidth: str, rtt: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.16
    xs = range(len(BUDGETS))
    series = [
        ("paper: DeepShare", [PAPER_TABLE6["DeepShare"][b] for b in BUDGETS]),
        ("paper: AutoReP", [PAPER_TABLE6["AutoReP"][b] for b in BUDGETS]),
    ]
    for mode in ("public", "private"):
        by = {r["model"]: r for r in rows if r["weights_mode"] == mode and "infeasible" not in r}
        series.append((f"ours, {mode}: network", [by[b]["speedup_network"] for b in BUDGETS]))
        series.append((f"ours, {mode}: + compute", [by[b]["speedup"] for b in BUDGETS]))
    for i, (label, vals) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], vals, width, label=label)
    ax.set_xticks(list(xs), [f"{b.upper()} DReLUs" for b in BUDGETS])
    ax.set_ylabel("latency speedup over original")
    ax.set_title(f"ResNet-18-CIFAR, batch 1, {bandwidth} / {rtt} RTT (estimated)")
    ax.set_ylim(0, 1.3 * max(max(v) for _, v in series))
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
