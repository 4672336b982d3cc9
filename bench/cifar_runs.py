"""The CIFAR-10 runs behind accuracy_vs_budget.py and ablations.py: DeepShare and the SNL baseline.

One schedule for every run, so that rows differ only in what they claim to differ:

* **DeepShare** is ``recipes/resnet20_cifar10.yaml`` (Adam, batch 32, KD) with the
  bench's overrides: the budget, the allocator (``snl`` from the SNL run at the same
  budget, as in the paper), ``group_size``, and a short schedule on a fixed train
  subset (``Schedule``).  An ablation adds its own overrides.
* **SNL** is the SNL search (lambda from 1e-2 so it reaches the budget within a CPU
  budget; see docs/snl.md) followed by SNL's own finetune (SGD, cosine) for as many
  epochs as DeepShare trains in all its phases.  Its per-site counts are the
  DeepShare budget allocation.

Every run lives in its own directory under ``--runs`` (default ``out/bench``); a
finished run is read back rather than redone, and an interrupted one resumes from
its checkpoint, so a long bench can be stopped and started again.  Final accuracies
are re-measured on ``test_limit`` test images (all 10,000 in full mode) with the
saved model, the same way for both methods.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT

SHARED = Path(os.environ.get("DEEPSHARE_SHARED", ROOT.parent / "shared"))
RECIPE = ROOT / "recipes" / "resnet20_cifar10.yaml"
WEIGHTS = {"resnet20": SHARED / "models" / "resnet20-12fca82f.th", "resnet56": SHARED / "models" / "resnet56-4bfd9763.th"}
DATA = "cifar10-jpg"


@dataclass
class Schedule:
    """Training length shared by all runs of one bench invocation."""

    limit: int = 5000  # train subset
    run_test_limit: int = 2000  # per-epoch accuracy inside runs
    test_limit: int | None = None  # final accuracy (None: the whole test set)
    gelu_epochs: int = 4
    switch_epochs: int = 2
    finetune_epochs: int = 2
    snl_max_epochs: int = 20
    snl_max_steps: int | None = None
    snl_lambda: float = 1e-2
    batch_size: int = 32
    group_size: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_epochs(self) -> int:
        return self.gelu_epochs + self.switch_epochs + self.finetune_epochs

    def scaled(self, factor: int) -> "Schedule":
        """The same schedule with every phase (and so SNL's finetune) ``factor`` times longer."""
        from dataclasses import replace

        return replace(self, gelu_epochs=self.gelu_epochs * factor, switch_epochs=self.switch_epochs * factor,
                       finetune_epochs=self.finetune_epochs * factor)  # fmt: skip

    @classmethod
    def quick(cls) -> "Schedule":
        return cls(limit=256, run_test_limit=256, test_limit=500, gelu_epochs=1, switch_epochs=1, finetune_epochs=1,
                   snl_max_epochs=2, snl_max_steps=16, snl_lambda=5e-2)  # fmt: skip


def _slug(budget: str) -> str:
    return budget.replace("%", "pct").replace(".", "p")


def _done(out: Path, key: str) -> dict[str, Any] | None:
    path = out / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        if key in results:
            return results
    return None


def run_snl_baseline(model: str, budget: str, sched: Schedule, runs: Path) -> dict[str, Any]:
    """SNL search + finetune at ``budget``; returns its results (plus the counts file path)."""
    from deepshare_convert.snl import SNLConfig, resume_snl, run_snl

    out = runs / model / f"snl_{_slug(budget)}"
    results = _done(out, "snl_acc")
    if results is None:
        config = SNLConfig(model=model, weights=str(WEIGHTS[model]), data=DATA, budget=budget,
                           batch_size=sched.batch_size, limit=sched.limit, test_limit=sched.run_test_limit,
                           lam=sched.snl_lambda, warmup_epochs=0, max_epochs=sched.snl_max_epochs,
                           max_steps=sched.snl_max_steps, check_every=20, finetune_epochs=sched.total_epochs)  # fmt: skip
        print(f"[{model}] SNL at {budget} -> {out}", flush=True)
        t0 = time.perf_counter()
        result = resume_snl(out) if (out / "snl_run.json").is_file() else run_snl(config, out)
        results = dict(result.results, bench_wall_seconds=round(time.perf_counter() - t0, 1))
        if not result.reached:
            results["snl_acc"] = None
    results["counts_file"] = str(out / "snl_counts.json")
    results["dir"] = str(out)
    return results


def run_deepshare(model: str, budget: str, sched: Schedule, runs: Path, *, name: str = "deepshare",
                  snl_counts: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """One DeepShare retraining from the shared recipe with the bench schedule and ``overrides``."""
    from deepshare_convert.training.retrain import resume, retrain

    out = runs / model / f"{name}_{_slug(budget)}"
    results = _done(out, "final_acc")
    if results is None:
        sets = [
            f"model.name={model}", f"model.weights={WEIGHTS[model]}", f"conversion.budget={budget}",
            f"conversion.group_size={sched.group_size}", f"data.limit={sched.limit}",
            f"data.test_limit={sched.run_test_limit}", f"phases.0.epochs={sched.gelu_epochs}",
            f"phases.1.epochs={sched.switch_epochs}", f"phases.2.epochs={sched.finetune_epochs}",
            "phases.1.switch_granularity=step",
        ]  # fmt: skip
        if snl_counts:
            sets += ["conversion.allocator=snl", f"conversion.snl_counts={snl_counts}"]
        sets += overrides or []
        print(f"[{model}] {name} at {budget} -> {out}", flush=True)
        t0 = time.perf_counter()
        result = resume(out) if (out / "checkpoint.pt").is_file() else retrain(RECIPE, out, overrides=sets)
        results = dict(result.results, bench_wall_seconds=round(time.perf_counter() - t0, 1))
    results["dir"] = str(out)
    return results


def final_accuracy(run_dir: str | Path, sched: Schedule) -> float:
    """Top-1 of a saved converted/SNL model on the bench's test images (same loader for every method)."""
    from deepshare_convert.data import load_dataset, make_loader
    from deepshare_convert.evaluate import evaluate
    from deepshare_convert.rewrite import load

    conv = load(run_dir)
    info, _, test = load_dataset(DATA)
    loader = make_loader(test, info, train=False, batch_size=500, mean=conv.mean, std=conv.std,
                         limit=sched.test_limit)  # fmt: skip
    return round(evaluate(conv.model, loader).top1, 2)


def original_accuracy(model: str, sched: Schedule) -> tuple[float, int]:
    """Top-1 and ReLU count of the pretrained model."""
    from deepshare_convert.data import load_dataset, make_loader
    from deepshare_convert.evaluate import evaluate
    from deepshare_convert.models import load_model
    from deepshare_convert.tracing import census

    loaded = load_model(model, weights=str(WEIGHTS[model]))
    info, _, test = load_dataset(DATA)
    loader = make_loader(test, info, train=False, batch_size=500, mean=loaded.mean or info.mean,
                         std=loaded.std or info.std, limit=sched.test_limit)  # fmt: skip
    return round(evaluate(loaded.model, loader).top1, 2), census(loaded.model, loaded.input_size).total_relus


def require_shared() -> None:
    missing = [p for p in [SHARED / "data" / "cifar10-jpg.tar.gz", WEIGHTS["resnet20"]] if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {missing[0]} not found (this bench needs ../shared beside the repository)")
