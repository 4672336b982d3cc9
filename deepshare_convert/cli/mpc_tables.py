"""Rich tables for the private-inference commands (kept apart from the commands so they stay thin)."""

from __future__ import annotations

from rich.table import Table

MODE_HIDES = {
    "private": "hides the client's input and output from the server, and the server's weights, α and β from "
    "the client (both see the architecture, shapes and P counts); the weights are masked once per loaded model "
    "(setup), each inference opens only activations",
    "public": "hides the client's input and output from the server; the weights, α and β are public to both "
    "parties (only the data is private)",
}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def private_run_table(run, model: str) -> Table:
    """Per-party measurements of a two-party run."""
    runs = len(run.parties[0].inferences) or 1
    how = f"{runs} inferences of {run.logits.shape[0] // runs}" if runs > 1 else f"batch {run.logits.shape[0]}"
    table = Table(title=f"private inference: {model}, {run.weights_mode} weights, {how}")
    for col in ("party", "holds", "setup MB", "setup rnd", "online MB", "online rnd", "wall ms", "comm ms", "comparisons"):
        table.add_column(col, justify="left" if col in ("party", "holds") else "right")
    holds = ("model" + (", weights secret-shared" if run.weights_mode == "private" else ""), "inputs; gets the output")
    for p in run.parties:
        table.add_row(str(p.rank), holds[p.rank], _mb(p.setup_bytes), str(p.setup_rounds), _mb(p.bytes), str(p.rounds),
                      _ms(p.wall_s), _ms(p.comm_s), f"{p.comparisons:,}")  # fmt: skip
    caption = [f"{run.weights_mode} mode {MODE_HIDES[run.weights_mode]}"]
    if runs > 1:
        caption.insert(0, f"one setup, then {runs} inferences one after another (online columns: their sum)")
    if run.plaintext is not None:
        what = (f"pixel labels {100 * run.pixel_agreement:.2f}% of {run.logits[:, 0].size:,}" if run.dense
                else f"top-1 {100 * run.top1_agreement:.1f}%")  # fmt: skip
        from ..mpc.fixed_point import WEIGHT_BITS

        caption.insert(0, f"agreement with plaintext (the deployed model: BN folded, weights on the 2^-{WEIGHT_BITS} "
                          f"grid): {what}, max logit error {run.max_logit_error:.2e}")  # fmt: skip
    table.caption = "\n".join(caption)
    return table


def estimate_table(est, original=None, measured: dict | None = None) -> Table:
    """Per-node predicted cost; with ``measured`` (node -> {bytes, rounds, seconds}) side by side."""
    title = (f"estimated private inference: {est.model}, {est.weights_mode} weights, batch {est.batch}, "
             f"{est.bandwidth_bps / 1e9:g} Gbps, RTT {est.rtt_s * 1e3:g} ms (cmp = comparisons, rnd = rounds, "
             f"ms = cpu + network)")  # fmt: skip
    table = Table(title=title, show_footer=True)
    table.add_column("node", footer="total", overflow="fold")
    table.add_column("op")
    table.add_column("cmp", justify="right", footer=f"{est.comparisons:,}")
    table.add_column("MB", justify="right", footer=_mb(est.bytes))
    table.add_column("rnd", justify="right", footer=str(est.rounds))
    table.add_column("cpu ms", justify="right", footer=_ms(est.compute_s))
    table.add_column("ms", justify="right", footer=_ms(est.latency_s))
    if measured is not None:
        tot_b = sum(v["bytes"] for v in measured.values())
        tot_r = sum(v["rounds"] for v in measured.values())
        tot_s = sum(v["seconds"] for v in measured.values())
        table.add_column("MB meas.", justify="right", footer=_mb(tot_b))
        table.add_column("rnd meas.", justify="right", footer=str(tot_r))
        table.add_column("ms loopb.", justify="right", footer=_ms(tot_s))
    for n in est.nodes:
        row = [n.node, n.handler, f"{n.comparisons:,}" if n.comparisons else "", _mb(n.bytes) if n.bytes else "",
               str(n.rounds) if n.rounds else "", _ms(n.compute_s), _ms(n.latency_s)]  # fmt: skip
        if measured is not None:
            m = measured.get(n.node, {"bytes": 0, "rounds": 0, "seconds": 0.0})
            row += [_mb(m["bytes"]) if m["bytes"] else "", str(m["rounds"]) if m["rounds"] else "", _ms(m["seconds"])]
        table.add_row(*row)
    lines = [f"online: network {_ms(est.network_s)} ms + compute {_ms(est.compute_s)} ms = {_ms(est.latency_s)} ms; "
             f"{est.weights_mode} mode {MODE_HIDES[est.weights_mode]}"]  # fmt: skip
    if est.setup_bytes or est.setup_rounds:
        lines.append(f"setup, once per loaded model (every weight's W - b opened): {_mb(est.setup_bytes)} MB, "
                     f"{est.setup_rounds} round, network {_ms(est.setup_network_s)} ms")  # fmt: skip
    if original is not None:
        lines.append(
            f"original (online): {_mb(original.bytes)} MB, {original.rounds} rounds, {_ms(original.latency_s)} ms -> "
            f"speedup {original.latency_s / est.latency_s:.2f}x "
            f"(network only {original.network_s / est.network_s:.2f}x; bytes {original.bytes / max(est.bytes, 1):.1f}x fewer)"
        )
    table.caption = "\n".join(lines)
    return table


def cost_table_table(table, path: str) -> Table:
    t = Table(title=f"MPC cost table ({path})")
    for col in ("operation", "bytes / element", "rounds / call"):
        t.add_column(col, justify="left" if col == "operation" else "right")
    t.add_row("comparison (DReLU)", f"{table.comparison_bytes:g}", str(table.comparison_rounds))
    t.add_row("opened element (products)", f"{table.open_bytes:g}", str(table.open_rounds))
    t.add_row("revealed element (output)", f"{table.reveal_bytes:g}", str(table.reveal_rounds))
    for name, ref in table.reference.items():
        t.add_row(f"[dim]{name}[/]", f"[dim]{ref['bytes_per_element']:g}[/]", f"[dim]{ref['rounds']}[/]")
    c = table.compute
    t.caption = (f"compute: {c.get('s_per_mac_public', 0) * 1e9:.2f} ns/MAC public, "
                 f"{c.get('s_per_mac_private', 0) * 1e9:.2f} ns/MAC private, "
                 f"{c.get('s_per_comparison', 0) * 1e6:.2f} µs/comparison; {table.source}")  # fmt: skip
    return t


def what_if_table(rows, est, budget: str) -> Table:
    """The same budget re-planned at each group size (``mpc.what_if``), network and compute-included latency."""
    table = Table(title=f"what if: budget {budget} re-planned at each group size ({est.weights_mode} weights, "
                        f"batch {est.batch}, {est.bandwidth_bps / 1e9:g} Gbps, RTT {est.rtt_s * 1e3:g} ms)")  # fmt: skip
    for col in ("group size", "cmp calls", "DReLUs", "MB", "rounds", "network ms", "+ compute ms", "speedup",
                "net speedup"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        g = f"{r.group_size}{' *' if r.own else ''}"
        if r.infeasible:
            table.add_row(g, *["-"] * 8)
            continue
        table.add_row(g, str(r.compare_calls), f"{r.drelus:,}", _mb(r.bytes), str(r.rounds), _ms(r.network_s),
                      _ms(r.latency_s), f"{r.speedup:.2f}x", f"{r.speedup_network:.2f}x")  # fmt: skip
    lines = ["each row: `convert --group-size G` with the plan's other settings, then this estimate (* the plan's G; "
             "for a MODEL, convert's default); a larger G means fewer gate layers (rounds) at the same DReLUs; "
             "accuracy is not in this table"]
    lines += [f"group size {r.group_size}: {r.infeasible}" for r in rows if r.infeasible]
    table.caption = "\n".join(lines)
    return table
