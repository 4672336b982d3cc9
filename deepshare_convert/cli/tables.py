"""Rich tables for command output (kept apart from the commands so they stay thin)."""

from __future__ import annotations

from rich.table import Table

from ..conversion.census import Census
from ..conversion.plan import Plan


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def census_table(c: Census) -> Table:
    title = f"ReLU census: {c.model} @ {_shape(c.input_size)}"
    table = Table(title=title, show_footer=True)
    table.add_column("#", justify="right", footer="")
    table.add_column("site", footer="total", overflow="fold")
    table.add_column("module", overflow="fold")
    table.add_column("kind")
    table.add_column("shape")
    table.add_column("ReLUs", justify="right", footer=f"{c.total_relus:,}")
    table.add_column("share", justify="right", footer="100%" if c.total_relus else "")
    total = max(c.total_relus, 1)
    for i, s in enumerate(c.sites):
        kind = s.kind + (" (in-place)" if s.inplace else "") + (f" ({s.origin})" if s.origin else "")
        table.add_row(str(i), s.name, s.module, kind, _shape(s.shape), f"{s.relus:,}", f"{100 * s.relus / total:.1f}%")
    for h in c.hidden:
        table.add_row("-", "(hidden)", h["module"], "inside a leaf", "", f"{h['relus']:,}", f"{100 * h['relus'] / total:.1f}%")
    if c.other_nonlinearities:
        ops = sorted({o.op for o in c.other_nonlinearities})
        table.caption = f"also {len(c.other_nonlinearities)} other nonlinearities, not converted: {', '.join(ops)}"
    return table


def plan_table(plan: Plan) -> Table:
    name = plan.model.get("name", "model")
    table = Table(title=f"DeepShare plan: {name} @ {_shape(plan.input_size)}, budget {plan.budget:,} "
                  f"({plan.allocator}, group size {plan.group_size})", show_footer=True)
    table.add_column("group", justify="right", footer="total")
    table.add_column("sites", overflow="fold")
    table.add_column("shape")
    table.add_column("C", justify="right")
    table.add_column("P", justify="right")
    table.add_column("ReLUs before", justify="right", footer=f"{plan.total_relus:,}")
    table.add_column("DReLUs", justify="right", footer=f"{plan.achieved:,}")
    for g in plan.groups:
        table.add_row(str(g.index), ", ".join(g.sites), _shape(g.shape), str(g.channels), str(g.prototypes),
                      f"{g.relus:,}", f"{g.drelus:,}")
    for name in plan.kept:
        site = next(s for s in plan.sites if s["name"] == name)
        table.add_row("kept", name, _shape(site["shape"]), "", "", f"{site['relus']:,}", f"{site['relus']:,}")
    if plan.hidden_relus:
        table.add_row("hidden", "(inside leaf modules)", "", "", "", f"{plan.hidden_relus:,}", f"{plan.hidden_relus:,}")
    table.caption = (f"{plan.total_relus:,} ReLUs -> {plan.achieved:,} DReLUs "
                     f"({plan.reduction:.1f}x fewer; budget {plan.budget:,})")
    return table


def results_table(results: dict) -> Table:
    table = Table(title=f"retraining results: {results.get('recipe', '')} on {results.get('data', '')}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("ReLUs of the original", results.get("total_relus"), "{:,}"),
        ("DReLUs after conversion", results.get("drelus"), "{:,}"),
        ("budget", results.get("budget"), "{:,}"),
        ("top-1 original", results.get("original_acc"), "{:.2f}%"),
        ("top-1 converted, before retraining", results.get("converted_acc_before_retraining"), "{:.2f}%"),
        ("top-1 after retraining", results.get("final_acc"), "{:.2f}%"),
        ("mIoU original", results.get("original_miou"), "{:.2f}%"),
        ("mIoU converted, before retraining", results.get("converted_miou_before_retraining"), "{:.2f}%"),
        ("mIoU after retraining", results.get("final_miou"), "{:.2f}%"),
    ]
    for label, value, fmt in rows:
        if value is not None:
            table.add_row(label, fmt.format(value))
    return table


def xor_table(runs: list[dict], methods: list[str]) -> Table:
    table = Table(title="XOR / 2x2 checkerboard, one comparison per network (test accuracy %)")
    for col in ("method", "mean", "min", "max", "seeds >= 98%", "seeds < 90%"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method in methods:
        accs = [r["accuracy"] for r in runs if r["method"] == method]
        table.add_row(method, f"{sum(accs) / len(accs):.1f}", f"{min(accs):.1f}", f"{max(accs):.1f}",
                      f"{sum(a >= 98 for a in accs)}/{len(accs)}", f"{sum(a < 90 for a in accs)}/{len(accs)}")
    return table


def demo_summary_table(s: dict) -> Table:
    table = Table(title=f"deepshare demo: {s['demo']} ({s['recipe']})")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("converted", justify="right")
    p, e = s["private"], s["estimate"]
    rows = [
        ("ReLU / DReLU comparisons per image", f"{s['relus_original']:,}", f"{s['drelus_converted']:,}"),
        ("test top-1 (%)", f"{s['accuracy_original']:.2f}",
         f"{s['accuracy_converted_before_retraining']:.2f} -> {s['accuracy_after_retraining']:.2f} (retrained)"),
        (f"2PC top-1 agreement with plaintext ({s['private_images']} images)",
         f"{p['original']['top1_agreement']:.0%}", f"{p['converted']['top1_agreement']:.0%}"),
        ("2PC max logit error", f"{p['original']['max_logit_error']:.1e}", f"{p['converted']['max_logit_error']:.1e}"),
        ("2PC bytes (party 0, measured)", f"{p['original']['parties'][0]['bytes']:,}",
         f"{p['converted']['parties'][0]['bytes']:,}"),
        ("2PC rounds (measured)", str(p["original"]["parties"][0]["rounds"]), str(p["converted"]["parties"][0]["rounds"])),
        ("offline bytes, dealer -> client (measured = est.)", *(_offline(p[k]) for k in ("original", "converted"))),
        ("est. network latency / image @1Gbps, 1ms", f"{e['original']['network_s'] * 1e3:.1f} ms",
         f"{e['converted']['network_s'] * 1e3:.1f} ms ({s['speedup_network']:.1f}x faster)"),
        ("est. latency incl. compute", f"{e['original']['latency_s'] * 1e3:.1f} ms",
         f"{e['converted']['latency_s'] * 1e3:.1f} ms ({s['speedup_latency']:.1f}x faster)"),
    ]  # fmt: skip
    curve = s.get("curve") or []
    if curve:
        lowest = min(acc for _, acc in curve)
        shown = curve[:: max(1, len(curve) // 8)][:8] + ([curve[-1]] if len(curve) > 8 else [])
        points = " ".join(f"{step}:{acc:.0f}" for step, acc in dict.fromkeys(map(tuple, shown)))
        rows.insert(2, ("top-1 during retraining (step:%)", "", f"lowest {lowest:.1f}; {points}"))
    for row in rows:
        table.add_row(*row)
    return table


def _offline(run: dict) -> str:
    """The separate dealer's corrections, measured (with the estimate when they differ), or who dealt instead."""
    o = run.get("offline")
    if run.get("dealer") != "separate" or o is None:
        return f"- (dealer {run.get('dealer', 'simulated')}: not private)"
    same = "" if o["bytes"] == o["bytes_expected"] else f" (est. {o['bytes_expected']:,})"
    return f"{o['bytes']:,}{same}"


def _num(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def analysis_table(report: dict) -> Table:
    """Per site: d, median ED/d aligned vs shuffled; for a converted model agreement and (beta, alpha) stats."""
    converted = report["converted"]
    table = Table(title=f"gate analysis: {report['model']} on {report['data']} (N = {report['num_images']}), "
                        "ED/d median [q1-q3]")  # fmt: skip
    cols = ["site", "d", "aligned ED/d", "shuffled ED/d"]
    if converted:
        cols += ["P", "agree", "agree repl.", "affine agree", "|α|<0.1", "proto α +/-", "repl. spread°"]
    for col in cols:
        table.add_column(col, justify="left" if col == "site" else "right")
    for s in report["sites"]:
        aligned = f"{_num(s['aligned_median'])} [{_num(s['aligned_q1'])}-{_num(s['aligned_q3'])}]"
        row = [s["module"] or s["name"], str(s["d"]), aligned, _num(s["shuffled_median"])]
        if converted:
            signs = "-" if s["prototypes_positive"] is None else f"{s['prototypes_positive']}/{s['prototypes_negative']}"
            row += [str(s["prototypes"]) if s["leader"] else "(shared)", _num(s["agreement"]),
                    _num(s["replicate_agreement"]), _num(s["affine_agreement"]), f"{s['near_linear']:.0%}",
                    signs, _num(s["replicate_spread_deg"], "{:.0f}")]  # fmt: skip
        table.add_row(*row)
    return table


def suggestion_table(groups: list[dict], budget: str) -> Table:
    table = Table(title=f"suggested prototypes per group for {budget} (ED-proportional)")
    for col in ("group", "sites", "C", "H*W", "P", "DReLUs"):
        table.add_column(col, justify="left" if col == "sites" else "right")
    for g in groups:
        table.add_row(str(g["group"]), ", ".join(g["sites"]), str(g["channels"]), str(g["spatial"]),
                      str(g["prototypes"]), f"{g['drelus']:,}")  # fmt: skip
    return table
