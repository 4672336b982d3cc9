"""CamVid segmentation: DeepShare vs SNL on DeepLabV3-MobileNetV2 at equal optimizer steps (issue 13).

    python bench/segmentation.py [--quick] [--budgets 3%,1%] [--runs out/bench-seg] [--device cpu]

1. **Original**: ``recipes/deeplabv3_mobilenetv2_camvid.yaml``'s pretrain phase alone trains
   ``deeplabv3_mobilenetv2`` from scratch on the shared CamVid (240x180, 11 classes; nothing is
   downloaded, so no ImageNet backbone).
2. For each budget (a percentage of the original's comparisons; a ReLU6 element counts two):
   **SNL** (search from those weights, then its own finetune) and **DeepShare** (the recipe's
   progressive phase from the same weights) for exactly as many optimizer steps as SNL's search and
   finetune together, as in bench/cifar_runs.py.
3. Every model is scored on the CamVid test split (233 images in full mode) by the same loader: mIoU,
   pixel accuracy and per-class IoU; and costed for two-party inference of one 3x180x240 image by
   the cost model (``deepshare estimate-latency``'s ``estimate``: bytes, rounds, latency at 1 Gbps /
   1 ms RTT, public weights).

Full mode (batch 8, all 367 train images: 46 steps an epoch): 16 pretrain epochs, then at each budget
an SNL search of at most 6 epochs (it stops at the budget) plus 4 finetune epochs, and DeepShare for the
same steps.  On this 2-core machine (one thread; a training step of batch 8 measured at 1.0 s for the
original and 1.7 s for SNL's masked model on a quiet core, 2.7 s for the original with the cores shared by
other jobs) expect about an hour (measured: 60 min, 2026-11-26, one thread, the other core busy) and up to
two and a half when both cores are shared.  ``--limit``,
``--pretrain-epochs`` and ``--snl-max-epochs`` make a reduced run (its own results file, no docs section).
``--device cuda`` runs the same schedule on a GPU (``--scale N`` makes every run N times
longer).  ``--quick`` is a smoke run (8 train / 4 test images, a few steps per run) whose numbers mean
nothing.  Runs live under ``--runs`` and are read back (or resumed) rather than redone.

Writes bench/results/segmentation[_quick].json, a figure of example predictions (image / ground truth /
original / DeepShare, CamVid palette) and, in full mode, a docs/results.md section.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_runs import SHARED, _done, _slug, snl_run_or_resume, train_seconds, trained_steps  # noqa: E402
from common import ROOT, add_out_arg, update_docs_section, write_results  # noqa: E402

RECIPE = ROOT / "recipes" / "deeplabv3_mobilenetv2_camvid.yaml"
MODEL = "deeplabv3_mobilenetv2"
DATA = "camvid"
SIZE = (3, 180, 240)
# CamVid's usual colours (SegNet), in class order; the ignore label (11) is black.
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0)]  # fmt: skip


@dataclass
class Schedule:
    """Training lengths shared by every run of one invocation (``device`` is not part of a run's identity)."""

    limit: int | None = None  # train subset (None: all 367)
    test_limit: int | None = None  # final scores (None: all 233 test images)
    run_test_limit: int | None = 101  # mIoU measured inside the runs (per epoch)
    batch_size: int = 8
    pretrain_epochs: int = 16
    snl_max_epochs: int = 6  # 3 reach 3% (366K kept) but not 1% (137K of 126K): 1% needs a 4th or 5th
    snl_max_steps: int | None = None
    snl_policy: str = "fast"  # lambda x1.25 after each epoch above the budget, masks at 5x the lr (docs/snl.md)
    snl_lambda: float | None = None  # None: the policy's start (1e-3)
    snl_lr: float = 2e-3  # Adam; the masks move 5x faster, about 1e-2 a step, so a search fits in 2-3 epochs
    snl_finetune_epochs: int = 4
    eval_batch_size: int = 16
    calibration_images: int = 32
    device: str = "cpu"

    def scaled(self, factor: int) -> Schedule:
        return replace(self, pretrain_epochs=self.pretrain_epochs * factor, snl_max_epochs=self.snl_max_epochs * factor,
                       snl_finetune_epochs=self.snl_finetune_epochs * factor)  # fmt: skip

    @classmethod
    def quick(cls) -> Schedule:
        return cls(limit=8, test_limit=4, run_test_limit=4, batch_size=4, pretrain_epochs=1, snl_max_epochs=1,
                   snl_max_steps=4, snl_lambda=1.0, snl_lr=0.1, snl_finetune_epochs=1, eval_batch_size=4,
                   calibration_images=4)  # fmt: skip


# ----------------------------------------------------------------------------- the runs
def _recipe(sched: Schedule) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(RECIPE.read_text())
    data.pop("quick", None)
    data["data"].update(limit=sched.limit, test_limit=sched.run_test_limit, eval_batch_size=sched.eval_batch_size)
    data["conversion"]["calibration_images"] = sched.calibration_images
    for phase in data["phases"]:
        phase["batch_size"] = sched.batch_size
    return data


def _retrain(data: dict[str, Any], out: Path, key: str, sched: Schedule) -> dict[str, Any]:
    """Run (or resume, or read back) one retraining from a recipe dict."""
    from deepshare_convert.recipes import recipe_from_dict
    from deepshare_convert.training.retrain import resume, retrain

    results = _done(out, key)
    if results is None:
        t0 = time.perf_counter()
        result = (resume(out, device=sched.device) if (out / "checkpoint.pt").is_file()
                  else retrain(recipe_from_dict(data, source=str(RECIPE)), out, device=sched.device))  # fmt: skip
        results = dict(result.results, bench_wall_seconds=round(time.perf_counter() - t0, 1))
    return dict(results, dir=str(out), steps=trained_steps(out), train_seconds=train_seconds(out))


def run_original(sched: Schedule, runs: Path) -> dict[str, Any]:
    """The recipe's pretrain phase alone: the original trained from scratch."""
    data = _recipe(sched)
    data["phases"] = data["phases"][:1]
    data["phases"][0]["epochs"] = sched.pretrain_epochs
    print(f"original: {sched.pretrain_epochs} pretrain epochs -> {runs / 'original'}", flush=True)
    results = _retrain(data, runs / "original", "original_miou", sched)
    results["weights"] = str(runs / "original" / "pretrained.safetensors")
    return results


def run_snl(weights: str, budget: str, sched: Schedule, runs: Path) -> dict[str, Any]:
    from deepshare_convert.snl import SNLConfig

    out = runs / f"snl_{_slug(budget)}"
    results = _done(out, "snl_miou")
    if results is None:
        config = SNLConfig(model=MODEL, weights=weights, data=DATA, budget=budget, batch_size=sched.batch_size,
                           limit=sched.limit, test_limit=sched.run_test_limit, eval_batch_size=sched.eval_batch_size,
                           lambda_policy=sched.snl_policy, lam=sched.snl_lambda, lr=sched.snl_lr, warmup_epochs=0,
                           max_epochs=sched.snl_max_epochs, max_steps=sched.snl_max_steps,
                           finetune_epochs=sched.snl_finetune_epochs)  # fmt: skip
        print(f"SNL at {budget} -> {out}", flush=True)
        results = snl_run_or_resume(config, out, sched.device, "snl_miou")
    return dict(results, dir=str(out), steps=trained_steps(out), train_seconds=train_seconds(out))


def run_deepshare(weights: str, budget: str, steps: int, sched: Schedule, runs: Path) -> dict[str, Any]:
    """The recipe's DeepShare phase(s) from the trained original, ``steps`` optimizer steps in all."""
    data = _recipe(sched)
    data["phases"] = [p for p in data["phases"] if p["kind"] != "pretrain"]
    data["model"]["weights"] = weights
    data["conversion"]["budget"] = budget
    n = len(data["phases"])
    for i, phase in enumerate(data["phases"]):  # split evenly; the last phase takes the remainder
        phase.update(epochs=None, steps=steps // n + (steps % n if i == n - 1 else 0))
    out = runs / f"deepshare_{_slug(budget)}"
    print(f"DeepShare at {budget}, {steps:,} steps -> {out}", flush=True)
    return _retrain(data, out, "final_miou", sched)


# ----------------------------------------------------------------------------- scoring
def _test_loader(sched: Schedule, mean, std):
    from deepshare_convert.data import load_dataset, make_loader

    info, _, test = load_dataset(DATA)
    return make_loader(test, info, train=False, batch_size=sched.eval_batch_size, mean=mean, std=std,
                       limit=sched.test_limit)  # fmt: skip


def score(model, sched: Schedule, mean, std) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU on the bench's test images (one loader for every model)."""
    from deepshare_convert.evaluation import evaluate

    r = evaluate(model, _test_loader(sched, mean, std), device=sched.device)
    model.cpu()
    return {"miou": round(r.miou, 2), "pixel_acc": round(r.pixel_acc, 2), "iou": [round(v, 2) for v in r.iou]}


def cost(model) -> dict[str, Any]:
    """Two-party inference of one image by the cost model (public weights, 1 Gbps, 1 ms RTT)."""
    from deepshare_convert.mpc.costs import estimate

    e = estimate(model.cpu().eval(), SIZE, batch=1, weights_mode="public")
    return {"comparisons": e.comparisons, "bytes": e.bytes, "rounds": e.rounds, "latency_s": round(e.latency_s, 2),
            "network_s": round(e.network_s, 2)}  # fmt: skip


def private_agreement(model, sched: Schedule, mean, std, frames: int) -> dict[str, Any]:
    """Real two-party inference (CrypTen, both parties on this machine, public weights) of the first ``frames``
    test images at 3x180x240, one after another after one setup: pixel agreement with plaintext per frame, and
    the measured bytes / rounds per image next to the cost model's.
    """
    from deepshare_convert.mpc.launcher import run_two_party

    x, _ = next(iter(_test_loader(replace(sched, test_limit=frames, eval_batch_size=frames), mean, std)))
    model = model.cpu().eval()
    r = run_two_party(model, x, weights_mode="public", sequential=True, timeout=300 + 60 * frames)
    same = (r.logits.argmax(1) == r.plaintext.argmax(1)).reshape(frames, -1).mean(1)
    est = cost(model)
    party = r.parties[0]
    return {"frames": frames, "pixel_agreement": [round(float(a) * 100, 4) for a in same],
            "at_least_99_9": int((same >= 0.999).sum()), "max_logit_error": r.max_logit_error,
            "bytes_per_image": party.bytes // frames, "rounds_per_image": party.rounds // frames,
            "equals_estimate": (party.bytes, party.rounds) == (est["bytes"] * frames, est["rounds"] * frames),
            "wall_s_per_image": round(party.wall_s / frames, 2)}  # fmt: skip


def _load_original(weights: str):
    from deepshare_convert.models import load_model

    return load_model(MODEL, weights=weights)


def measure(budgets: list[str], sched: Schedule, runs: Path, private: int = 0) -> list[dict[str, Any]]:
    from deepshare_convert.conversion.census import census
    from deepshare_convert.conversion.rewrite import load

    orig = run_original(sched, runs)
    loaded = _load_original(orig["weights"])
    mean, std = loaded.mean, loaded.std
    total = census(loaded.model, SIZE).total_relus
    rows = [{"method": "original", "budget": "100%", "relus": total, "steps": orig["steps"],
             "train_s": orig["train_seconds"], "dir": orig["dir"], **score(loaded.model, sched, mean, std),
             "cost": cost(loaded.model)}]  # fmt: skip
    for budget in budgets:
        snl = run_snl(orig["weights"], budget, sched, runs)
        row = {"method": "SNL", "budget": budget, "relus": snl.get("snl_relus"), "steps": snl["steps"],
               "search_steps": snl.get("search_steps"), "reached": snl.get("snl_miou") is not None,
               "train_s": snl["train_seconds"], "dir": snl["dir"]}  # fmt: skip
        if row["reached"]:
            model = load(snl["dir"]).model
            row.update(score(model, sched, mean, std), cost=cost(model))  # kept ReLUs only (public masks)
            if private:
                row["private"] = private_agreement(model, sched, mean, std, private)
        rows.append(row)
        ds = run_deepshare(orig["weights"], budget, snl["steps"], sched, runs)
        model = load(ds["dir"]).model
        rows.append({"method": "DeepShare", "budget": budget, "relus": ds["drelus"], "steps": ds["steps"],
                     "train_s": ds["train_seconds"], "dir": ds["dir"],
                     "miou_before_retraining": ds.get("converted_miou_before_retraining"),
                     **score(model, sched, mean, std), "cost": cost(model)})  # fmt: skip
        if private:
            rows[-1]["private"] = private_agreement(model, sched, mean, std, private)
        print(f"{budget}: SNL {row.get('miou')} ({row['relus']}) | DeepShare {rows[-1]['miou']} ({rows[-1]['relus']})",
              flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- figure and tables
def _colour(mask) -> Any:
    import numpy as np

    palette = np.array(PALETTE, dtype=np.uint8)
    return palette[np.clip(mask, 0, len(PALETTE) - 1)]


def figure(rows: list[dict], sched: Schedule, path: Path, examples: int = 3) -> None:
    """image / ground truth / original / DeepShare (lowest budget) on the first test images."""
    import torch

    from deepshare_convert.conversion.rewrite import load
    from deepshare_convert.plots import _plt, save_figure

    orig = next(r for r in rows if r["method"] == "original")
    ds = [r for r in rows if r["method"] == "DeepShare"][-1]
    loaded = _load_original(str(Path(orig["dir"]) / "pretrained.safetensors"))
    models = [("original", loaded.model.eval()), (f"DeepShare {ds['budget']}", load(ds["dir"]).model.eval())]
    loader = _test_loader(replace(sched, test_limit=examples, eval_batch_size=examples), loaded.mean, loaded.std)
    x, y = next(iter(loader))
    from deepshare_convert.data import load_dataset

    raw = load_dataset(DATA)[2].images[: len(x)].numpy()
    with torch.no_grad():
        preds = [(name, m(x).argmax(1).numpy()) for name, m in models]
    plt = _plt()
    fig, axes = plt.subplots(len(x), 2 + len(preds), figsize=(3.2 * (2 + len(preds)), 2.5 * len(x)), squeeze=False)
    for i in range(len(x)):
        panels = [("image", raw[i]), ("ground truth", _colour(y[i].numpy()))]
        panels += [(name, _colour(p[i])) for name, p in preds]
        for ax, (title, img) in zip(axes[i], panels):
            ax.imshow(img)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title)
    save_figure(fig, path)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| method | budget | comparisons | saved | steps | train min | test mIoU | pixel acc | 2PC MB / rounds / s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    total = rows[0]["relus"]
    for r in rows:
        relus = r["relus"] or 0
        c = r.get("cost")
        pi = f"{_mb(c['bytes'])} / {c['rounds']} / {c['latency_s']:.1f}" if c else "—"
        miou = f"{r['miou']:.2f}" if r.get("miou") is not None else "not reached"
        acc = f"{r['pixel_acc']:.2f}" if r.get("pixel_acc") is not None else "—"
        mins = f"{r['train_s'] / 60:.1f}" if r.get("train_s") else "—"
        saved = f"{total / relus:.0f}x" if relus else "—"
        lines.append(f"| {r['method']} | {r['budget']} | {relus:,} | {saved} | {r['steps']:,} | "
                     f"{mins} | {miou} | {acc} | {pi} |")  # fmt: skip
    return "\n".join(lines)


def private_table(rows: list[dict]) -> str:
    """Two-party runs: pixel agreement with plaintext per frame, and measured cost = the estimate."""
    lines = ["Two-party inference of the first test frames (3×180×240, CrypTen, both parties on this machine, "
             "public weights; agreement = pixels whose private label equals plaintext's):", "",
             "| method | budget | frames | frames ≥ 99.9% | mean agreement | lowest | measured MB / rounds per image "
             "= estimate | wall s per image |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        p = r.get("private")
        if not p:
            continue
        agree = p["pixel_agreement"]
        lines.append(f"| {r['method']} | {r['budget']} | {p['frames']} | {p['at_least_99_9']} | "
                     f"{sum(agree) / len(agree):.3f}% | {min(agree):.3f}% | {_mb(p['bytes_per_image'])} / "
                     f"{p['rounds_per_image']} {'yes' if p['equals_estimate'] else 'NO'} | "
                     f"{p['wall_s_per_image']} |")  # fmt: skip
    return "\n".join(lines)


def class_table(rows: list[dict]) -> str:
    from deepshare_convert.data.segmentation import CAMVID_CLASSES

    scored = [r for r in rows if r.get("iou")]
    head = "| class | " + " | ".join(f"{r['method']} {r['budget']}" for r in scored) + " |"
    lines = [head, "|---|" + "---:|" * len(scored)]
    for k, name in enumerate(CAMVID_CLASSES):
        cells = ["—" if r["iou"][k] != r["iou"][k] else f"{r['iou'][k]:.1f}" for r in scored]  # NaN: absent
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 train / 4 test images, a few steps per run")
    p.add_argument("--budgets", default="3%,1%", help="comma-separated budgets (percent of the comparisons)")
    p.add_argument("--scale", type=int, default=1, help="every run N times longer (own results file)")
    p.add_argument("--limit", type=int, default=None, help="reduced run: train on the first N images (own results "
                   "file, no docs section)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="reduced run: the original's epochs")
    p.add_argument("--snl-max-epochs", type=int, default=None, help="reduced run: cap of SNL's search (a subset "
                   "needs more epochs for the same search steps)")
    p.add_argument("--runs", default=str(ROOT / "out" / "bench-seg"), help="run directories (resumable cache)")
    p.add_argument("--device", default="cpu", help="where the runs train: cpu (default), cuda, auto")
    p.add_argument("--private", type=int, default=None, help="two-party inference of each converted model on the "
                   "first N test frames (default: 16 in full mode, 0 in --quick)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the docs/results.md section")
    add_out_arg(p)
    args = p.parse_args()
    if not (SHARED / "data" / "camvid-240x180.tar.gz").is_file():
        raise SystemExit(f"error: {SHARED / 'data' / 'camvid-240x180.tar.gz'} not found (needs ../shared)")
    sched = Schedule.quick() if args.quick else Schedule().scaled(args.scale)
    sched.device = args.device
    reduced = not args.quick and (args.limit, args.pretrain_epochs, args.snl_max_epochs) != (None, None, None)
    if reduced:
        sched.limit = args.limit
        sched.pretrain_epochs = args.pretrain_epochs or sched.pretrain_epochs
        sched.snl_max_epochs = args.snl_max_epochs or sched.snl_max_epochs
    budgets = args.budgets.split(",")
    suffix = "_quick" if args.quick else (f"_x{args.scale}" if args.scale > 1 else "")
    suffix += f"_reduced_n{sched.limit}_e{sched.pretrain_epochs}_s{sched.snl_max_epochs}" if reduced else ""
    runs = Path(args.runs) / ("quick" if args.quick else "full" + suffix)
    t0 = time.perf_counter()
    private = args.private if args.private is not None else (0 if args.quick else 16)
    rows = measure(budgets, sched, runs, private)
    name = "segmentation" + suffix
    from deepshare_convert.data.segmentation import CAMVID_CLASSES

    write_results(name, {"schedule": vars(sched), "budgets": budgets, "rows": rows, "classes": CAMVID_CLASSES,
                         "wall_s": round(time.perf_counter() - t0, 1)}, args.out)  # fmt: skip
    figure(rows, sched, args.out / f"{name}.png")
    md, per_class = table(rows), class_table(rows)
    if private:
        per_class += "\n\n" + private_table(rows)
    print(md + "\n\n" + per_class)
    if not args.quick and not reduced and not args.no_docs:
        update_docs_section(name, _docs(md, per_class, sched, args, name))


def _docs(md: str, per_class: str, sched: Schedule, args, name: str) -> str:
    scale = f" --scale {args.scale}" if args.scale > 1 else ""
    return f"""## CamVid segmentation: DeepShare vs SNL, DeepLabV3-MobileNetV2 (bench/segmentation.py)

Command: `python bench/segmentation.py --budgets {args.budgets}{scale} --device {args.device}` (JSON in
`bench/results/{name}.json`; docs/segmentation.md). The original `deeplabv3_mobilenetv2` is trained from scratch
({sched.pretrain_epochs} epochs, batch {sched.batch_size}, all 367 train images at 240×180, no ImageNet weights),
then converted at each budget (a percentage of its comparisons, a ReLU6 element counting two): SNL searches
(λ policy `{sched.snl_policy}`, Adam lr {sched.snl_lr:g}, at most {sched.snl_max_epochs} epochs) and
finetunes {sched.snl_finetune_epochs} epochs; DeepShare (`recipes/deeplabv3_mobilenetv2_camvid.yaml`'s progressive
phase, γ = 4, KD from the original) trains for exactly as many optimizer steps. Scores on the CamVid test split
({sched.test_limit or 233} images, label 11 ignored); "2PC" is the cost model's estimate for one 3×180×240 image
(public weights, 1 Gbps, 1 ms RTT); SNL's masks are public architecture, so its rows pay a comparison for each
kept ReLU and nothing for a linearised neuron (docs/snl.md, "Private inference").
"saved" is the original's comparisons over the model's.

{md}

Per-class IoU (%):

{per_class}

The example figure (image / ground truth / original / DeepShare) is written to `bench/results/{name}.png` and not
committed: it shows CamVid frames (CC BY-NC 4.0), which the data's licence note keeps out of the project.
"""


if __name__ == "__main__":
    main()
