"""Accuracy vs DReLU budget on CIFAR-10: DeepShare vs the SNL baseline vs the original (paper Fig. 1).

    python bench/accuracy_vs_budget.py [--quick] [--models resnet20,resnet56]
                                       [--budgets 8%,4%,2%] [--resnet56-budgets 2%]
                                       [--scale N] [--runs out/bench]

For each model (the shared pretrained ResNet-20 / ResNet-56) and each budget: the SNL
search + finetune (the baseline), then DeepShare retrained from the same pretrained
weights for the same total number of optimizer steps (search included; see
bench/cifar_runs.py for the accounting).  The full mode trains on a fixed 5,000-image
subset of the shared CIFAR-10 (a CPU budget: about 12 min per DeepShare run and 10 min
per SNL run for ResNet-20 on one thread; ResNet-56 costs about 3x) and reports top-1 on
all 10,000 test images, plus each run's learning curve (test top-1 on 2,000 images every
half epoch) and its lowest point.  ``--quick`` is a smoke run
(256 images, one epoch per phase, two budgets) whose numbers mean nothing.  ``--scale N``
trains every run N times longer (DeepShare's phases and SNL's finetune alike) into its
own results file and docs section: does the gap between the methods move with training?

Budgets are percentages of the model's ReLUs.  DeepShare shares each gate across groups
of 4 consecutive same-shape layers (``group_size``), so that one prototype channel per
group fits the 2% budget (ResNet-20: 2,688 DReLUs at the minimum); at 8% groups of 2
(minimum 5,056), measured better there (``Schedule.group_sizes``).

Writes bench/results/accuracy_vs_budget.json and .png (a Pareto plot: ReLU count, log
scale, vs top-1), ``*_curves.png`` (top-1 against optimizer steps for both methods at
the lowest budget) and, in full mode, the table into docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_runs import Schedule, final_accuracy, original_accuracy, require_shared, run_deepshare, run_snl_baseline  # noqa: E402
from common import ROOT, add_out_arg, update_docs_section, write_results  # noqa: E402


def measure(models: list[str], budgets: dict[str, list[str]], sched: Schedule, runs: Path) -> list[dict]:
    rows = []
    for model in models:
        orig_acc, relus = original_accuracy(model, sched)
        rows.append({"model": model, "method": "original", "budget": "100%", "relus": relus, "acc": orig_acc})
        for budget in budgets[model]:
            snl = run_snl_baseline(model, budget, sched, runs)
            snl_acc = final_accuracy(snl["dir"], sched) if snl.get("snl_acc") is not None else None
            rows.append({"model": model, "method": "SNL", "budget": budget, "relus": snl.get("snl_relus"),
                         "acc": snl_acc, "wall_s": snl.get("bench_wall_seconds"), "train_s": snl.get("train_seconds"),
                         "reached": snl_acc is not None,
                         "steps": snl["steps"], "search_steps": snl.get("search_steps"), "curve": snl["curve"],
                         "min_acc": min((a for _, a in snl["curve"]), default=None)})  # fmt: skip
            rows.append(deepshare_row(model, budget, sched, runs, steps=snl["steps"]))
            print(f"[{model}] {budget}: SNL {snl_acc} ({rows[-2]['relus']}) | DeepShare {rows[-1]['acc']} "
                  f"({rows[-1]['relus']})", flush=True)  # fmt: skip
    return rows


def deepshare_row(model: str, budget: str, sched: Schedule, runs: Path, *, steps: int) -> dict:
    """DeepShare at ``budget`` for ``steps`` optimizer steps (SNL's total), as a results row."""
    ds = run_deepshare(model, budget, sched, runs, steps=steps)
    return {"model": model, "method": "DeepShare", "budget": budget, "relus": ds["drelus"],
            "acc": final_accuracy(ds["dir"], sched), "acc_run_test": ds.get("final_acc"),
            "acc_before_retraining": ds.get("converted_acc_before_retraining"),
            "wall_s": ds.get("bench_wall_seconds"), "train_s": ds["train_seconds"], "steps": ds["steps"],
            "curve": ds["curve"], "min_acc": min((a for _, a in ds["curve"]), default=None), "recipe": ds["recipe"],
            "overrides": ds["overrides"]}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    from deepshare_convert.plots import _plt, save_figure

    plt = _plt()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method, style in [("DeepShare", "o-"), ("SNL", "s--")]:
            pts = sorted((r["relus"], r["acc"]) for r in rows if r["model"] == model and r["method"] == method
                         and r["acc"] is not None)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        orig = next(r for r in rows if r["model"] == model and r["method"] == "original")
        ax.axhline(orig["acc"], color="gray", ls=":", label=f"original ({orig['relus']:,} ReLUs)")
        ax.set_xscale("log")
        ax.set_xlabel("DReLUs (log scale)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{model}, CIFAR-10")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_curves(rows: list[dict], path: Path, batch_size: int = 32) -> None:
    """Test top-1 against optimizer steps, both methods, at each model's lowest budget."""
    from deepshare_convert.plots import _plt, save_figure

    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["method"] != "original"]
        budget = min(mine, key=lambda r: float(r["budget"].rstrip("%")) if r["budget"].endswith("%") else 0)["budget"]
        for r in mine:
            if r["budget"] == budget and r.get("curve"):
                steps, accs = zip(*r["curve"])
                ax.plot(steps, accs, "o-" if r["method"] == "DeepShare" else "s--", ms=3,
                        label=f"{r['method']} ({r['relus'] or 0:,} ReLUs): final {r['acc']}")  # fmt: skip
                if r["method"] == "SNL" and r.get("search_steps"):
                    ax.axvline(r["search_steps"], color="gray", ls=":", lw=1)
                    ax.text(r["search_steps"], 92, " SNL search ends", color="gray", fontsize=8)
        ax.set_xlabel(f"optimizer steps (batch {batch_size})")
        ax.set_ylabel("test top-1 (%, 2,000 images)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{model}, CIFAR-10, {budget} of the ReLUs")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


def _minutes(row: dict) -> str:
    return f"{row['train_s'] / 60:.1f}" if row.get("train_s") else "—"


def table(rows: list[dict], sched: Schedule) -> str:
    lines = ["| model | budget | DReLUs DeepShare / SNL | steps DeepShare / SNL | train min DeepShare / SNL "
             "| DeepShare top-1 (lowest) | SNL top-1 | DeepShare − SNL | original |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows):
        orig = next(r for r in rows if r["model"] == model and r["method"] == "original")
        for budget in dict.fromkeys(r["budget"] for r in rows if r["model"] == model and r["method"] != "original"):
            ds = next(r for r in rows if r["model"] == model and r["budget"] == budget and r["method"] == "DeepShare")
            snl = next(r for r in rows if r["model"] == model and r["budget"] == budget and r["method"] == "SNL")
            gap = f"{ds['acc'] - snl['acc']:+.2f}" if snl["acc"] is not None else "—"
            snl_acc = f"{snl['acc']:.2f}" if snl["acc"] is not None else "not reached"
            lines.append(f"| {model} | {budget} | {ds['relus']:,} / {snl['relus'] or 0:,} | {ds['steps']:,} / "
                         f"{snl['steps']:,} | {_minutes(ds)} / {_minutes(snl)} | {ds['acc']:.2f} ({ds['min_acc']}) | {snl_acc} "
                         f"| {gap} | {orig['acc']:.2f} ({orig['relus']:,}) |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny subset, one epoch per phase, two budgets")
    p.add_argument("--models", default="resnet20,resnet56", help="comma-separated: resnet20, resnet56")
    p.add_argument("--budgets", default="8%,4%,2%", help="comma-separated budgets (percent of the ReLUs or counts)")
    p.add_argument("--resnet56-budgets", default=None, help="ResNet-56's budgets, if not --budgets (it costs 3x)")
    p.add_argument("--scale", type=int, default=1, help="train every run N times longer (own results file)")
    p.add_argument("--runs", default=str(ROOT / "out" / "bench"), help="run directories (resumable cache)")
    p.add_argument("--full-data", action="store_true", help="all 50,000 training images, batch 128, SNL's fast "
                   "lambda policy (a GPU schedule; own results file and docs section)")
    p.add_argument("--device", default="cpu", help="where the runs train: cpu (default), cuda, auto")
    p.add_argument("--rows-from", type=Path, default=None, help="re-make the table, plots and docs section from a "
                   "results JSON this bench wrote (e.g. on a GPU machine) instead of training")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the docs/results.md section")
    add_out_arg(p)
    args = p.parse_args()
    base = Schedule.full_data() if args.full_data else Schedule()
    sched = Schedule.quick() if args.quick else base.scaled(args.scale)
    sched.device = args.device
    models = ["resnet20"] if args.quick else args.models.split(",")
    budgets = {m: ["8%", "3%"] if args.quick else args.budgets.split(",") for m in models}
    if args.resnet56_budgets and not args.quick:
        budgets["resnet56"] = args.resnet56_budgets.split(",")
    suffix = ("_fulldata" if args.full_data else "") + (f"_x{args.scale}" if args.scale > 1 else "")
    runs = Path(args.runs) / ("quick" if args.quick else "full" + suffix)
    if args.rows_from:
        recorded = json.loads(args.rows_from.read_text())
        rows, command, machine = recorded["rows"], recorded.get("command"), recorded.get("machine")
        acc_note = recorded.get("acc_note")  # e.g. which test images the recorded accuracies count
    else:
        require_shared()
        rows, command, machine, acc_note = measure(models, budgets, sched, runs), None, None, None
    name = "accuracy_vs_budget_quick" if args.quick else "accuracy_vs_budget" + suffix
    extra = {"measured_by": command, "measured_on": machine, "acc_note": acc_note} if command else {}
    write_results(name, {"schedule": vars(sched), "rows": rows, **extra}, args.out)
    plot(rows, args.out / f"{name}.png")
    plot_curves(rows, args.out / f"{name}_curves.png", sched.batch_size)
    md = table(rows, sched)
    print(md)
    if not args.quick and not args.no_docs:
        update_docs_section("accuracy_vs_budget" + suffix, _docs(md, sched, args, name, acc_note))


def _docs(md: str, sched: Schedule, args, name: str, acc_note: str | None = None) -> str:
    scale = f" --scale {args.scale}" if args.scale > 1 else ""
    scale += f" --resnet56-budgets {args.resnet56_budgets}" if args.resnet56_budgets else ""
    scale += f" --full-data --device {args.device}" if args.full_data else ""
    groups = ", ".join(f"{g} at {b}" for b, g in sched.group_sizes.items())
    longer = f", every phase {args.scale}x longer" if args.scale > 1 else ""
    if sched.limit is None:
        title = f"full data{longer}"
        where = (f"A GPU schedule (measured on the machine named in the JSON): every run trains on all 50,000 "
                 f"training images of the shared CIFAR-10 with batch {sched.batch_size}. SNL searches with its fast "
                 f"λ policy (the `deepshare snl` default)")  # fmt: skip
        cost = '"train min" sums each run\'s epoch times (several runs shared one GPU, so a rough cost)'
    else:
        title = f"CPU subset{longer}" if longer else "CPU subset"
        where = (f"A CPU schedule: every run trains on the same fixed {sched.limit:,}-image subset of the shared "
                 f"CIFAR-10 with batch {sched.batch_size}. SNL searches from λ = {sched.snl_lambda:g}")
        cost = ('"train min" sums each run\'s epoch times (one thread per run, usually two runs side by side on '
                "this 2-core machine, so a rough cost, not a benchmark)")
    return f"""## Accuracy vs DReLU budget, CIFAR-10, {title} (bench/accuracy_vs_budget.py)

Command: `python bench/accuracy_vs_budget.py --models {args.models} --budgets {args.budgets}{scale}` (JSON +
Pareto PNG in `bench/results/{name}.*`). {where} and then finetunes for {sched.total_epochs} epochs; DeepShare
(`recipes/resnet20_cifar10.yaml`: equal DReLUs per layer group, π and affine fitted on 256 train images, one
progressive phase that shares every channel over its first 30% (quadratic easing) and then trains the converted
network, straight-through step gates γ = 4, KD from the original, Adam with one cosine decay; layer-sharing group
size {groups}, {sched.group_size} otherwise) trains for exactly as many optimizer steps as SNL's search and finetune
together. {acc_note or "Top-1 on all 10,000 test images"}; "lowest" is the lowest test top-1 (2,000 images) measured during
DeepShare's training, every half epoch. {cost}. The paper trains for hundreds of full-data epochs; these numbers
compare the methods at equal training, not the paper's absolute accuracy.

{md}

![accuracy vs budget](../bench/results/{name}.png)

![accuracy against steps](../bench/results/{name}_curves.png)
"""


if __name__ == "__main__":
    main()
