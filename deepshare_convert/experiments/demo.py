"""The end-to-end demo: train -> convert -> retrain -> two-party inference -> latency estimate.

``make demo`` runs it on the built-in digits CNN (no downloads, about a minute on
2 cores); ``make demo-cifar`` on the shared pretrained ResNet-20 and the shared
CIFAR-10 set (``--quick`` subset).  Every number in the summary is measured in
the run that prints it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..conversion.plan import write_json_atomic
from ..conversion.rewrite import load as load_converted
from ..data import load_dataset, make_loader
from ..errors import DeepShareError
from ..models import load_model
from ..recipes import load_recipe
from ..training.engine import Reporter, learning_curve
from ..training.retrain import PRETRAINED, retrain

__all__ = ["RECIPES_DIR", "run_demo"]

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEMOS = {"digits": ("digits_demo.yaml", False, 16), "cifar": ("resnet20_cifar10.yaml", True, 2)}


def _original(recipe, out: Path) -> torch.nn.Module:
    """The original model the run started from (pretrained by the recipe or given weights)."""
    m = recipe.model
    weights = out / PRETRAINED if (out / PRETRAINED).is_file() else m.weights
    return load_model(m.name, weights=weights, num_classes=m.num_classes).model.eval()


def _finished(run_dir: Path) -> dict[str, Any] | None:
    import json

    results = run_dir / "results.json"
    if results.is_file() and (run_dir / "model.safetensors").is_file():
        data = json.loads(results.read_text())
        return data if "final_acc" in data else None
    return None


def _test_images(recipe, loaded_mean, loaded_std, n: int) -> torch.Tensor:
    info, _, test = load_dataset(recipe.data.spec)
    loader = make_loader(test, info, train=False, batch_size=n, mean=loaded_mean, std=loaded_std, limit=n)
    x, _ = next(iter(loader))
    return x


def run_demo(which: str = "digits", out: str | Path = "out/demo", *, reporter: Reporter | None = None,
             num_private: int | None = None, quick: bool | None = None, log=print) -> dict[str, Any]:  # fmt: skip
    """Run the whole pipeline; returns (and writes) ``OUT/summary.json`` and ``OUT/summary.png``."""
    from ..mpc.costs import estimate
    from ..mpc.launcher import run_two_party

    if which not in DEMOS:
        raise DeepShareError(f"unknown demo {which!r}; choose {', '.join(DEMOS)}")
    recipe_file, default_quick, default_n = DEMOS[which]
    quick = default_quick if quick is None else quick
    n = num_private or default_n
    out = Path(out)
    run_dir = out / which
    t0 = time.perf_counter()
    recipe = load_recipe(RECIPES_DIR / recipe_file, quick=quick)
    finished = _finished(run_dir)
    if finished is not None:
        log(f"reusing the finished run in {run_dir} (delete it to retrain)")
        results = finished
    else:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        log(f"1/3 retraining with {recipe_file}{' (--quick)' if quick else ''} -> {run_dir}")
        results = retrain(recipe, run_dir, reporter=reporter).results
    t_train = time.perf_counter() - t0

    converted = load_converted(run_dir)
    original = _original(recipe, run_dir)
    x = _test_images(recipe, converted.mean, converted.std, n)
    log(f"2/3 two-party CrypTen inference on {n} test images (public weights), original and converted")
    private = {name: run_two_party(model, x, weights_mode="public")
               for name, model in (("original", original), ("converted", converted.model))}  # fmt: skip
    log("3/3 estimating private-inference latency at 1 Gbps / 1 ms RTT")
    size = tuple(converted.plan.input_size)
    est = {name: estimate(model, size, weights_mode="public", name=name)
           for name, model in (("original", original), ("converted", converted.model))}  # fmt: skip

    summary = {
        "demo": which,
        "recipe": recipe_file,
        "relus_original": results["total_relus"],
        "drelus_converted": results["drelus"],
        "accuracy_original": results["original_acc"],
        "accuracy_converted_before_retraining": results["converted_acc_before_retraining"],
        "accuracy_after_retraining": results["final_acc"],
        "private_images": n,
        "private": {k: v.to_dict() for k, v in private.items()},
        "estimate": {k: {f: v.to_dict()[f] for f in ("bytes", "rounds", "comparisons", "network_s", "compute_s", "latency_s")}
                     for k, v in est.items()},  # fmt: skip
        "curve": _curve(run_dir),
        "speedup_network": est["original"].network_s / est["converted"].network_s,
        "speedup_latency": est["original"].latency_s / est["converted"].latency_s,
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_training": round(t_train, 1),
    }
    write_json_atomic(out / f"summary_{which}.json", summary)
    summary["png"] = str(_plot(summary, out / f"summary_{which}.png"))
    return summary


def _curve(run_dir: Path) -> list[list[float]]:
    """[optimizer step, test top-1] of the converted model over retraining (pretraining left out)."""
    return learning_curve(run_dir, skip_kinds=("pretrain",)) if (run_dir / "metrics.jsonl").is_file() else []


def _plot(s: dict[str, Any], path: Path) -> Path:
    from ..plots import _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].bar(["original\nReLUs", "converted\nDReLUs"], [s["relus_original"], s["drelus_converted"]], color=["grey", "C0"])
    axes[0].set_yscale("log")
    axes[0].set_ylim(bottom=1)
    axes[0].set_title("comparisons per image")
    accs = [s["accuracy_original"], s["accuracy_converted_before_retraining"], s["accuracy_after_retraining"]]
    axes[1].bar(["original", "converted,\nbefore", "after\nretraining"], accs, color=["grey", "C3", "C0"])
    axes[1].set_ylim(0, 100)
    axes[1].set_title("test top-1 (%)")
    mb = [s["private"][k]["parties"][0]["bytes"] / 2**20 for k in ("original", "converted")]
    axes[2].bar(["original", "converted"], mb, color=["grey", "C0"])
    axes[2].set_title(f"2PC bytes for {s['private_images']} images (MB)")
    if s.get("curve"):
        steps, accs = zip(*s["curve"])
        axes[3].plot(steps, accs, "o-", ms=3, color="C0")
        axes[3].axhline(s["accuracy_original"], color="grey", ls=":", label="original")
        axes[3].set_xlabel("optimizer step")
        axes[3].set_ylim(0, 100)
        axes[3].legend(loc="lower right")
    axes[3].set_title("converted model's test top-1 during retraining")
    fig.suptitle(f"deepshare demo ({s['demo']}): {s['speedup_network']:.1f}x less network latency")
    return save_figure(fig, path)
