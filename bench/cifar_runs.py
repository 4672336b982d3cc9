"""The CIFAR-10 runs behind accuracy_vs_budget.py and ablations.py: DeepShare and the SNL baseline.

Fair accounting: every method gets the same **total optimizer steps** on the same data.

* **SNL** is the SNL search (lambda from 1e-2 so it reaches the budget within a CPU
  budget; see docs/snl.md) followed by SNL's own finetune (SGD, cosine) for
  ``Schedule.total_epochs`` epochs.  Its total -- search steps + finetune steps -- is
  the step budget of every DeepShare run at that budget.
* **DeepShare** is ``recipes/resnet20_cifar10.yaml`` (progressive sharing, straight-
  through step gates, KD from the original) with the bench's overrides: the budget,
  ``group_size``, the train subset, and phase lengths in steps that add up to SNL's
  total.  A run that uses SNL's per-site counts as its allocation (``snl_counts``,
  the paper's Sec. 3.2) has already spent the search's steps, so it trains only for
  the rest.  An ablation adds its own overrides (or another recipe).

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

from deepshare_convert.training.engine import learning_curve

from common import ROOT

SHARED = Path(os.environ.get("DEEPSHARE_SHARED", ROOT.parent / "shared"))
RECIPE = ROOT / "recipes" / "resnet20_cifar10.yaml"
PAPER_RECIPE = ROOT / "recipes" / "resnet20_cifar10_paper.yaml"
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
    snl_lambda: float | None = 1e-2
    snl_lr: float = 1e-3  # SNL search's Adam lr (the quick smoke run raises it so that its search ends in 16 steps)
    snl_policy: str = "faithful"  # the lambda schedule the CPU numbers were measured with; full data uses "fast"
    batch_size: int = 32
    group_size: int = 4  # DeepShare's layer-sharing group size, unless group_sizes names the budget
    group_sizes: dict[str, int] = field(default_factory=lambda: {"8%": 2})  # measured better at 8% (docs/results.md)
    progressive_share: float = 0.7  # DeepShare: fraction of the steps in the progressive phase (rest: finetune)
    eval_every: int | None = 78  # DeepShare: a test-accuracy point every half epoch (5,000 images, batch 32)
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # where every run trains (--device); not part of a run's identity

    def group_for(self, budget: str) -> int:
        """Layer-sharing group size at ``budget``: smaller groups once the budget affords them."""
        return self.group_sizes.get(budget, self.group_size)

    @property
    def total_epochs(self) -> int:
        return self.gelu_epochs + self.switch_epochs + self.finetune_epochs

    def scaled(self, factor: int) -> Schedule:
        """The same schedule with every phase (and so SNL's finetune) ``factor`` times longer."""
        from dataclasses import replace

        return replace(self, gelu_epochs=self.gelu_epochs * factor, switch_epochs=self.switch_epochs * factor,
                       finetune_epochs=self.finetune_epochs * factor)  # fmt: skip

    @classmethod
    def full_data(cls) -> Schedule:
        """All 50,000 training images, batch 128 (a GPU schedule: 391 steps per epoch), SNL's fast lambda policy
        (measured to reach 8% in 5 full-data epochs, docs/snl.md), a test point every half epoch."""
        return cls(limit=None, batch_size=128, snl_policy="fast", snl_lambda=None, snl_max_epochs=30, eval_every=195)

    @classmethod
    def quick(cls) -> Schedule:
        return cls(limit=256, run_test_limit=256, test_limit=500, gelu_epochs=1, switch_epochs=1, finetune_epochs=1,
                   snl_max_epochs=2, snl_max_steps=16, snl_lambda=5e-2, snl_lr=0.08, eval_every=4)  # fmt: skip


def _yaml(value: Any) -> str:
    """A --set value: None is YAML's null."""
    return "null" if value is None else str(value)


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
    from deepshare_convert.snl import SNLConfig

    out = runs / model / f"snl_{_slug(budget)}"
    results = _done(out, "snl_acc")
    if results is None:
        config = SNLConfig(model=model, weights=str(WEIGHTS[model]), data=DATA, budget=budget,
                           batch_size=sched.batch_size, limit=sched.limit, test_limit=sched.run_test_limit,
                           lambda_policy=sched.snl_policy, lam=sched.snl_lambda, lr=sched.snl_lr, warmup_epochs=0,
                           max_epochs=sched.snl_max_epochs,
                           max_steps=sched.snl_max_steps, check_every=20, finetune_epochs=sched.total_epochs)  # fmt: skip
        print(f"[{model}] SNL at {budget} -> {out}", flush=True)
        results = snl_run_or_resume(config, out, sched.device, "snl_acc")
    results["counts_file"] = str(out / "snl_counts.json")
    results["dir"] = str(out)
    if (out / "metrics.jsonl").is_file():
        results["steps"] = trained_steps(out)
        results["curve"] = learning_curve(out)
        results["train_seconds"] = train_seconds(out)
    return results


def snl_run_or_resume(config, out: Path, device: str, score_key: str) -> dict[str, Any]:
    """Run SNL into ``out`` (or resume it there); its results with the bench's wall time, ``score_key``
    None when the search did not reach the budget (no finetuned model to score)."""
    from deepshare_convert.snl import resume_snl, run_snl

    t0 = time.perf_counter()
    result = resume_snl(out, device=device) if (out / "snl_run.json").is_file() else run_snl(config, out, device=device)
    results = dict(result.results, bench_wall_seconds=round(time.perf_counter() - t0, 1))
    if not result.reached:
        results[score_key] = None
    return results


def train_seconds(run_dir: str | Path) -> float:
    """Wall seconds a run spent training (its epochs' ``epoch_seconds`` in metrics.jsonl), so that a run
    read back from the cache reports its time too."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return round(sum(x.get("epoch_seconds", 0.0) for x in lines), 1)


def trained_steps(run_dir: str | Path) -> int:
    """Optimizer steps a run took in all (its last global step in metrics.jsonl)."""
    steps = [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return max(steps, default=0)


def phase_steps(recipe: Path, total: int, sched: Schedule) -> list[int]:
    """Split ``total`` steps over the recipe's phases: all to a single phase, progressive/finetune by
    ``progressive_share``, the paper's gelu/switch/finetune in the bench's epoch ratio (4:2:2)."""
    import yaml

    kinds = [p["kind"] for p in yaml.safe_load(recipe.read_text())["phases"]]
    if len(kinds) == 1:
        split = [1.0]
    elif kinds == ["progressive", "finetune"]:
        split = [sched.progressive_share, 1 - sched.progressive_share]
    else:
        weights = {"gelu": sched.gelu_epochs, "switch": sched.switch_epochs, "finetune": sched.finetune_epochs}
        w = [weights.get(k, 1) for k in kinds]
        split = [x / sum(w) for x in w]
    steps = [int(total * f) for f in split]
    steps[-1] += total - sum(steps)
    return steps


def run_deepshare(model: str, budget: str, sched: Schedule, runs: Path, *, steps: int, name: str = "deepshare",
                  snl_counts: str | None = None, overrides: list[str] | None = None,
                  recipe: Path = RECIPE) -> dict[str, Any]:  # fmt: skip
    """One DeepShare retraining of ``steps`` optimizer steps in all, from ``recipe`` plus ``overrides``."""
    from deepshare_convert.training.retrain import resume, retrain

    out = runs / model / f"{name}_{_slug(budget)}"
    results = _done(out, "final_acc")
    sets = [
        f"model.name={model}", f"model.weights={WEIGHTS[model]}", f"conversion.budget={budget}",
        f"conversion.group_size={sched.group_for(budget)}", f"data.limit={_yaml(sched.limit)}",
        f"data.test_limit={sched.run_test_limit}",
    ]  # fmt: skip
    if snl_counts:
        sets += ["conversion.allocator=snl", f"conversion.snl_counts={snl_counts}"]
    sets += overrides or []  # before the phase lengths: an override may add a phase
    for i, n in enumerate(phase_steps(recipe, steps, sched)):
        sets += [f"phases.{i}.epochs=null", f"phases.{i}.steps={n}", f"phases.{i}.batch_size={sched.batch_size}"]
        if sched.eval_every:
            sets.append(f"phases.{i}.eval_every={sched.eval_every}")
    if results is None:
        print(f"[{model}] {name} at {budget}, {steps:,} steps -> {out}", flush=True)
        t0 = time.perf_counter()
        result = (resume(out, device=sched.device) if (out / "checkpoint.pt").is_file()
                  else retrain(recipe, out, overrides=sets, device=sched.device))  # fmt: skip
        results = dict(result.results, bench_wall_seconds=round(time.perf_counter() - t0, 1))
    results.update(dir=str(out), steps=trained_steps(out), curve=learning_curve(out), train_seconds=train_seconds(out),
                   recipe=str(recipe.relative_to(ROOT)), overrides=sets)  # fmt: skip
    return results


def final_accuracy(run_dir: str | Path, sched: Schedule) -> float:
    """Top-1 of a saved converted/SNL model on the bench's test images (same loader for every method)."""
    from deepshare_convert.conversion.rewrite import load
    from deepshare_convert.data import load_dataset, make_loader
    from deepshare_convert.evaluation import evaluate

    conv = load(run_dir)
    info, _, test = load_dataset(DATA)
    loader = make_loader(test, info, train=False, batch_size=500, mean=conv.mean, std=conv.std,
                         limit=sched.test_limit)  # fmt: skip
    return round(evaluate(conv.model, loader, device=sched.device).top1, 2)


def original_accuracy(model: str, sched: Schedule) -> tuple[float, int]:
    """Top-1 and ReLU count of the pretrained model."""
    from deepshare_convert.conversion.census import census
    from deepshare_convert.data import load_dataset, make_loader
    from deepshare_convert.evaluation import evaluate
    from deepshare_convert.models import load_model

    loaded = load_model(model, weights=str(WEIGHTS[model]))
    info, _, test = load_dataset(DATA)
    loader = make_loader(test, info, train=False, batch_size=500, mean=loaded.mean or info.mean,
                         std=loaded.std or info.std, limit=sched.test_limit)  # fmt: skip
    top1 = evaluate(loaded.model, loader, device=sched.device).top1
    return round(top1, 2), census(loaded.model, loaded.input_size).total_relus


def require_shared() -> None:
    missing = [p for p in [SHARED / "data" / "cifar10-jpg.tar.gz", WEIGHTS["resnet20"]] if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {missing[0]} not found (this bench needs ../shared beside the repository)")
