"""Ablations of paper Table 5 on the shared ResNet-20 / CIFAR-10 at one low budget.

    python bench/ablations.py [--quick] [--model resnet20] [--budget 8%] [--runs out/bench]

Rows (each one DeepShare retraining with the schedule of bench/cifar_runs.py, so the
full-method row is the same run as accuracy_vs_budget.py's at that budget):

* full method -- SNL allocation, layer sharing (group size 4), learned affine, GELU phase;
* no affine -- alpha = 1, beta = 0 frozen (``conversion.affine: frozen``);
* no layer sharing -- group size 1 (each layer computes its own prototypes' gates);
* no budget -- the same fraction of prototypes in every group (``allocator: uniform``);
* no GELU phase -- the GELU and switch epochs train with step gates from the start;
* no replicates -- a plain network whose only live channels are the prototypes
  (``conversion.replicates: none``, group size 1): the same DReLU count, no reuse.

The budget must leave one prototype channel for every single-layer group (ResNet-20:
9,088 DReLUs = 4.8%), which is why the default is 8% (15,073) and not the 2% of the
accuracy sweep.  ``--quick`` is a smoke run with the quick schedule.

Writes bench/results/ablations.json and .png and, in full mode, the table into
docs/results.md next to the paper's Table 5 (ResNet-18, CIFAR-100, 6K DReLUs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_runs import Schedule, final_accuracy, original_accuracy, require_shared, run_deepshare, run_snl_baseline  # noqa: E402
from common import RESULTS, ROOT, update_docs_section, write_results  # noqa: E402

NO_GELU = ["phases.0.kind=finetune", "phases.1.kind=finetune", "phases.1.kd.teacher=original",
           "phases.2.kd.teacher=original"]  # fmt: skip

# name, label, uses SNL counts, overrides, paper Table 5 accuracy (ResNet-18 / CIFAR-100 / 6K)
ROWS = [
    ("deepshare", "full method", True, [], 76.13),
    ("no_affine", "no affine transformation", True, ["conversion.affine=frozen"], 73.51),
    ("no_layer_sharing", "no layer sharing", True, ["conversion.group_size=1"], 73.39),
    ("no_budget", "no budget (uniform allocation)", False, [], 73.31),
    ("no_gelu", "no GELU phase", True, NO_GELU, 69.44),
    ("no_replicates", "no replicates (prototypes only)", True,
     ["conversion.group_size=1", "conversion.replicates=none"], 56.08),
]  # fmt: skip


def measure(model: str, budget: str, sched: Schedule, runs: Path) -> list[dict]:
    snl = run_snl_baseline(model, budget, sched, runs)
    counts = snl["counts_file"] if Path(snl["counts_file"]).is_file() else None
    rows = []
    for name, label, use_snl, overrides, paper in ROWS:
        r = run_deepshare(model, budget, sched, runs, name=name, snl_counts=counts if use_snl else None,
                          overrides=overrides)  # fmt: skip
        rows.append({"name": name, "label": label, "drelus": r["drelus"], "acc": final_accuracy(r["dir"], sched),
                     "acc_before_retraining": r.get("converted_acc_before_retraining"), "paper": paper,
                     "wall_s": r.get("bench_wall_seconds")})  # fmt: skip
        print(f"[{model} {budget}] {label}: {rows[-1]['acc']} ({r['drelus']:,} DReLUs)", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    from deepshare_convert.plots import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [r["label"] for r in rows][::-1]
    ax.barh(labels, [r["acc"] for r in rows][::-1], color=["#c44" if r["name"] == "deepshare" else "#58a"
                                                            for r in rows][::-1])  # fmt: skip
    for i, r in enumerate(rows[::-1]):
        ax.text(r["acc"] + 0.5, i, f"{r['acc']:.1f}", va="center")
    ax.set_xlabel("top-1 (%)")
    ax.set_title(title)
    ax.set_xlim(0, max(r["acc"] for r in rows) + 10)
    save_figure(fig, path)


def table(rows: list[dict]) -> str:
    full = rows[0]["acc"]
    lines = ["| row | DReLUs | top-1 | vs full | paper (R18 / C100 / 6K) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['drelus']:,} | {r['acc']:.2f} | {r['acc'] - full:+.2f} | {r['paper']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run with the quick schedule")
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    p.add_argument("--budget", default="8%")
    p.add_argument("--runs", default=str(ROOT / "out" / "bench"), help="run directories (resumable cache)")
    args = p.parse_args()
    require_shared()
    sched = Schedule.quick() if args.quick else Schedule()
    runs = Path(args.runs) / ("quick" if args.quick else "full")
    rows = measure(args.model, args.budget, sched, runs)
    orig_acc, relus = original_accuracy(args.model, sched)
    name = "ablations_quick" if args.quick else "ablations"
    write_results(name, {"model": args.model, "budget": args.budget, "schedule": vars(sched), "original_acc": orig_acc,
                         "original_relus": relus, "rows": rows})  # fmt: skip
    plot(rows, RESULTS / f"{name}.png", f"{args.model} / CIFAR-10, {args.budget} of {relus:,} ReLUs")
    md = table(rows)
    print(md)
    if not args.quick:
        ranked = " > ".join(r["label"] for r in sorted(rows, key=lambda r: -r["acc"]))
        update_docs_section("ablations", f"""## Ablations, {args.model} / CIFAR-10 at {args.budget} (bench/ablations.py)

Command: `python bench/ablations.py --model {args.model} --budget {args.budget}` (JSON + PNG in
`bench/results/ablations.*`). Same CPU schedule as the accuracy sweep (the full-method row is the same run);
original top-1 {orig_acc:.2f}% with {relus:,} ReLUs. The paper's column is its Table 5 (ResNet-18 on CIFAR-100
at 6K DReLUs, hundreds of epochs), for the order, not the values.

{md}

Order measured here: {ranked}.

![ablations](../bench/results/ablations.png)
""")


if __name__ == "__main__":
    main()
