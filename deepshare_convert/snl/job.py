"""An SNL run: its settings (``snl_run.json``), the search and the finetune, ``--resume``.

:func:`run_snl` starts a run into ``OUT``, :func:`resume_snl` continues one; both hand the
work to a :class:`_Job` (teacher, masked student, loaders, trainer) that writes its files
through :class:`~..training.rundir.RunDir`.  The files are listed in :mod:`deepshare_convert.snl`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..conversion.census import census
from ..conversion.plan import PLAN_FILE, WEIGHTS_FILE, write_json_atomic
from ..conversion.tracing import check_leaf_names, example_input
from ..errors import BudgetError, DeepShareError, PlanError, first_line
from ..evaluation.metrics import task_key
from ..interrupts import deferred_sigint
from ..training.device import resolve_device
from ..training.engine import PhaseHooks, PhaseSpec, Reporter, Trainer
from ..training.rundir import RunDir
from .masks import THRESHOLD, binarise, kept_counts, mask_relus
from .plan import snl_plan
from .search import LAMBDA_POLICIES, SNLSearch, _mask_groups, _SearchReporter

__all__ = ["SNLConfig", "SNLResult", "run_snl", "resume_snl", "RUN_FILE", "COUNTS_FILE", "COUNTS_FORMAT"]

RUN_FILE = "snl_run.json"
COUNTS_FILE = "snl_counts.json"
COUNTS_FORMAT = "deepshare-snl-counts/1"
SEARCH_WEIGHTS = "search.safetensors"
DEFAULT_MAX_EPOCHS = 200
SEARCH, FINETUNE = 0, 1  # phase indices in the engine's checkpoints


@dataclass
class SNLConfig:
    """Everything a run needs; saved as ``OUT/snl_run.json`` so ``--resume`` continues it.

    Caps: ``max_epochs`` and/or ``max_steps`` (whichever comes first; neither
    means ``DEFAULT_MAX_EPOCHS``).  Only the caps and ``finetune_epochs`` may
    change on resume.
    """

    model: str
    data: str
    budget: str
    weights: str | None = None
    num_classes: int | None = None
    input_size: list[int] | None = None
    leaf_modules: list[str] = field(default_factory=list)
    pretrained: bool = False
    trust_pickle: bool = False  # never saved: a resumed run asks for --trust-pickle again
    max_epochs: int | None = None
    max_steps: int | None = None
    finetune_epochs: int = 0
    seed: int = 0
    batch_size: int = 128
    limit: int | None = None
    test_limit: int | None = None
    eval_batch_size: int = 256
    check_every: int | None = None
    lambda_policy: str = "fast"
    lam: float | None = None  # None: the policy's (see LAMBDA_POLICIES); so are growth, warm-up, mask lr
    lam_growth: float | None = None
    warmup_epochs: int | None = None
    mask_lr_scale: float | None = None
    threshold: float = THRESHOLD
    lr: float = 1e-3
    finetune_lr: float = 1e-3
    temperature: float = 4.0
    augment: bool = True

    RESUMABLE = ("max_epochs", "max_steps", "finetune_epochs")

    def validate(self) -> SNLConfig:
        """One-line errors for settings that cannot run; fills the default cap."""
        positive = {"max_epochs": self.max_epochs, "max_steps": self.max_steps, "batch_size": self.batch_size,
                    "limit": self.limit, "test_limit": self.test_limit, "check_every": self.check_every}  # fmt: skip
        for name, value in positive.items():
            if value is not None and value < 1:
                raise DeepShareError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.finetune_epochs < 0:
            raise DeepShareError(f"--finetune-epochs must be 0 or more, got {self.finetune_epochs}")
        if self.lambda_policy not in LAMBDA_POLICIES:
            raise DeepShareError(f"--lambda-policy must be one of {', '.join(LAMBDA_POLICIES)}, "
                                 f"got {self.lambda_policy!r}")  # fmt: skip
        for key, value in LAMBDA_POLICIES[self.lambda_policy].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not (self.lam > 0 and self.lam_growth >= 1 and self.threshold >= 0 and self.warmup_epochs >= 0
                and self.mask_lr_scale > 0):  # fmt: skip
            raise DeepShareError("SNL needs lambda > 0, growth >= 1, threshold >= 0 and warm-up epochs >= 0")
        if self.max_epochs is None and self.max_steps is None:
            self.max_epochs = DEFAULT_MAX_EPOCHS
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("trust_pickle")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SNLConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DeepShareError(f"{RUN_FILE} has an unknown setting {unknown[0]!r} (written by another version?)")
        d = dict(d)
        if "lambda_policy" not in d:  # written before the policies: it ran SNL's own schedule
            d.update(lambda_policy="faithful", mask_lr_scale=1.0)
        return cls(**d)

    def cap_text(self) -> str:
        caps = [f"--max-epochs {self.max_epochs}" if self.max_epochs else "",
                f"--max-steps {self.max_steps}" if self.max_steps else ""]  # fmt: skip
        return " / ".join(c for c in caps if c)


@dataclass
class SNLResult:
    """Where the run wrote its files, the per-site counts, and every number it measured."""

    out: Path
    counts: dict[str, int]
    results: dict[str, Any]

    @property
    def reached(self) -> bool:
        return bool(self.results.get("reached"))


def run_snl(config: SNLConfig, out: str | Path, *, reporter: Reporter | None = None,
            fail_at_step: int | None = None, device: str | torch.device = "auto") -> SNLResult:  # fmt: skip
    """Run the search (and the finetune, with ``finetune_epochs``) into ``out`` from scratch.

    ``device`` is where the training loops run (not saved: a run may resume on another device).
    """
    device = resolve_device(device)  # a GPU that is not there fails before anything is written
    config.validate()
    run_dir = RunDir.new(out, advice="continue it with --resume {out}, or choose another -o")
    if config.weights is not None and Path(config.weights).is_file():
        config.weights = str(Path(config.weights).resolve())  # a resume from elsewhere still finds them
    with deferred_sigint():  # a Ctrl-C during setup stops at the first step boundary, resumably
        job = _Job(config, run_dir, reporter, fail_at_step, device)  # checks model, data and budget before writing anything
        write_json_atomic(run_dir / RUN_FILE, config.to_dict())
        return job.run(None)


def resume_snl(out: str | Path, *, changes: dict[str, Any] | None = None, reporter: Reporter | None = None,
               fail_at_step: int | None = None, device: str | torch.device = "auto") -> SNLResult:  # fmt: skip
    """Continue the run in ``out`` from its last checkpoint; ``changes`` may raise the caps.

    A setting other than the caps that differs from the run's is an error: the
    checkpoint only makes sense with the data, budget and seed it was made with.
    """
    out = Path(out)
    path = out / RUN_FILE
    if not path.is_file():
        raise DeepShareError(f"{out} holds no {RUN_FILE}: not an SNL run directory")
    config = SNLConfig.from_dict(json.loads(path.read_text()))
    config.trust_pickle = bool((changes or {}).get("trust_pickle"))
    for key, value in (changes or {}).items():
        if key == "trust_pickle":
            continue
        if key == "weights" and value is not None and Path(value).is_file():
            value = str(Path(value).resolve())
        if value is None or value == getattr(config, key):
            continue
        if key not in SNLConfig.RESUMABLE:
            flag = {"lam": "lambda"}.get(key, key).replace("_", "-")
            raise DeepShareError(f"--{flag} {value} differs from the run in {out} "
                                 f"({getattr(config, key)}); on --resume only --max-epochs, --max-steps and "
                                 "--finetune-epochs may change")  # fmt: skip
        setattr(config, key, value)
    config.validate()
    run_dir = RunDir(out)
    state = run_dir.resume_state(partial=(COUNTS_FILE, PLAN_FILE, WEIGHTS_FILE))  # None: no checkpoint yet
    with deferred_sigint():
        job = _Job(config, run_dir, reporter, fail_at_step, device)  # no checkpoint yet (killed early): state None, a fresh start
        write_json_atomic(path, config.to_dict())
        return job.run(state)


class _Job:
    """One SNL run: the original (teacher), the masked student, loaders and the trainer."""

    def __init__(self, config: SNLConfig, run_dir: RunDir, reporter: Reporter | None, fail_at_step: int | None,
                 device: str | torch.device = "auto"):  # fmt: skip
        from ..conversion.budget import parse_budget
        from ..data import load_dataset, require_split
        from ..models import load_model

        self.config, self.run_dir, self.out, self.reporter = config, run_dir, run_dir.path, reporter
        self.device = resolve_device(device)
        torch.manual_seed(config.seed)
        self.info, self.train_split, self.test_split = load_dataset(config.data)
        require_split(self.train_split, "train", config.data)
        require_split(self.test_split, "test", config.data)
        size = tuple(config.input_size) if config.input_size else self.info.input_size
        if tuple(size) != tuple(self.info.input_size):
            raise DeepShareError(f"--input-size {','.join(map(str, size))} does not match {config.data}'s images "
                                 f"({','.join(map(str, self.info.input_size))})")  # fmt: skip
        self.loaded = load_model(config.model, weights=config.weights, num_classes=config.num_classes,
                                 input_size=tuple(size), trust_pickle=config.trust_pickle,
                                 pretrained=config.pretrained)  # fmt: skip
        check_leaf_names(self.loaded.model, config.leaf_modules)
        self.input_size = tuple(self.loaded.input_size)
        self.original = self.loaded.model.eval()
        self._check_classes()
        self.mean, self.std = self.loaded.mean or self.info.mean, self.loaded.std or self.info.std
        self.census = census(self.original, self.input_size, name=self.loaded.spec.display,
                             leaf_modules=config.leaf_modules)  # fmt: skip
        self.budget = parse_budget(config.budget, self.census.total_relus)
        if self.budget <= self.census.hidden_relus:
            raise BudgetError(f"budget {self.budget:,} does not cover the {self.census.hidden_relus:,} ReLUs "
                              "hidden inside leaf modules (SNL cannot mask them)")  # fmt: skip
        self.model = mask_relus(self.original, self.input_size, threshold=config.threshold,
                                leaf_modules=config.leaf_modules)  # fmt: skip
        self.trainer = Trainer(self.model, self._loader(self.train_split, train=True),
                               self._loader(self.test_split, train=False), self.out,
                               fail_at_step=fail_at_step, device=self.device)  # fmt: skip
        run_dir.load_results()  # a resumed run keeps what it measured before

    @property
    def results(self) -> dict[str, Any]:
        return self.run_dir.results

    def _check_classes(self) -> None:
        """The model must take the data's images and have one output per class (a clear error now, not mid-run)."""
        try:
            with torch.no_grad():
                out = self.original(example_input(self.input_size, self.original, batch=2))
                outputs = out.shape[1] if self.info.segmentation and out.ndim == 4 else out.shape[-1]
        except RuntimeError as e:
            size = "x".join(map(str, self.input_size))
            first = first_line(e, 160)
            raise DeepShareError(
                f"{self.config.model} cannot run on the {size} images of {self.config.data}: {first}"
            ) from None
        classes = self.info.num_classes
        if outputs != classes and not (outputs == 1 and classes == 2):
            raise DeepShareError(f"{self.config.model} has {outputs} outputs but {self.config.data} has {classes} "
                                 f"classes; pass --num-classes {classes} with weights trained for it")  # fmt: skip

    def _loader(self, split, *, train: bool):
        from ..data import make_loader

        c = self.config
        return make_loader(split, self.info, train=train, batch_size=c.batch_size if train else c.eval_batch_size,
                           mean=self.mean, std=self.std, augment=c.augment if train else False,
                           limit=c.limit if train else c.test_limit, seed=c.seed)  # fmt: skip

    def accuracy(self, model: nn.Module) -> float:
        from ..evaluation import evaluate

        return evaluate(model, self.trainer.test_loader, device=self.device).score

    def note(self, **values: Any) -> None:
        """Record results as soon as they are known (a resumed run keeps them); ``*_acc`` is ``*_miou``
        for segmentation data."""
        self.run_dir.note(**{task_key(k, self.info.task): v for k, v in values.items()})

    # ---- the two phases ------------------------------------------------------------------------------
    def run(self, state: dict[str, Any] | None) -> SNLResult:
        if state is None:
            self.note(model=self.loaded.spec.display, data=self.config.data, total_relus=self.census.total_relus,
                      budget=self.budget, original_acc=self.accuracy(self.original))  # fmt: skip
        phase = state["phase"] if state else SEARCH
        if phase == SEARCH:
            counts = self.search(state)
            state = None
        else:
            counts = json.loads((self.out / COUNTS_FILE).read_text())["sites"]
        if not self.results["reached"]:
            return SNLResult(self.out, counts, self.results)
        return self.linearise(counts, state)

    def search(self, state: dict[str, Any] | None) -> dict[str, int]:
        c = self.config
        hooks = SNLSearch(self.budget - self.census.hidden_relus, lam=c.lam, growth=c.lam_growth,
                          warmup_epochs=c.warmup_epochs, check_every=c.check_every,
                          grow_while_above=c.lambda_policy == "fast")  # fmt: skip
        t0 = time.perf_counter()
        if state is not None and self._search_over(state, hooks):
            self.model.load_state_dict(state["model"])  # it ended before the interruption: nothing to rerun
            self.trainer.global_step = state["global_step"]
        else:
            if self.reporter is not None:
                self.trainer.reporter = _SearchReporter(self.reporter, hooks)
            spec = PhaseSpec(name="snl-search", epochs=c.max_epochs, steps=c.max_steps, lr_start=c.lr,
                             scheduler="none", optimizer="adam", ce_weight=1.0, kd_weight=1.0,
                             temperature=c.temperature, param_groups=_mask_groups(c.mask_lr_scale))  # fmt: skip
            self.trainer.run_phase(SEARCH, spec, hooks, self.original, resume=state)
        wall = self.results.get("search_wall_seconds", 0.0) + time.perf_counter() - t0
        return self._finish_search(hooks, wall)

    def _search_over(self, state: dict[str, Any], hooks: SNLSearch) -> bool:
        """Did the checkpointed search already end (budget reached, or a cap met)?"""
        hooks.load_state_dict(state["hooks"])
        c = self.config
        steps_done = state["global_step"] - state["extra"].get("phase_step0", 0)
        epochs_done = state["epoch"] if state["batch"] == 0 else -1  # -1: mid-epoch, that epoch is not done
        return (hooks.reached or bool(c.max_steps and steps_done >= c.max_steps)
                or bool(c.max_epochs and epochs_done >= c.max_epochs))  # fmt: skip

    def _finish_search(self, hooks: SNLSearch, wall: float) -> dict[str, int]:
        counts = kept_counts(self.model)
        kept = sum(counts.values())
        summary = {
            "format": COUNTS_FORMAT, "model": self.loaded.spec.to_dict(), "data": self.config.data,
            "input_size": list(self.input_size), "budget_requested": str(self.config.budget), "budget": self.budget,
            "total_relus": self.census.total_relus, "hidden_relus": self.census.hidden_relus, "kept": kept,
            "reached": hooks.reached, "epochs": len(hooks.lives), "steps": hooks.steps,
            "lambda_trajectory": hooks.lambdas, "live_trajectory": hooks.lives, "final_lambda": hooks.lam,
            "threshold": self.config.threshold, "seed": self.config.seed, "cap": self.config.cap_text(),
            "search_train_seconds": round(hooks.train_seconds, 3), "search_wall_seconds": round(wall, 3),
            "sites": counts, "site_relus": {s.name: s.relus for s in self.census.sites},
            "site_shapes": {s.name: list(s.shape) for s in self.census.sites},
        }  # fmt: skip
        write_json_atomic(self.out / COUNTS_FILE, summary)
        self.run_dir.save_tensors(self.model, SEARCH_WEIGHTS)
        self.note(reached=hooks.reached, kept_after_search=kept + self.census.hidden_relus,
                  search_epochs=summary["epochs"], search_steps=hooks.steps, final_lambda=hooks.lam,
                  search_wall_seconds=summary["search_wall_seconds"], masked_acc=self.accuracy(self.model),
                  cap=self.config.cap_text())  # fmt: skip
        return counts

    def linearise(self, counts: dict[str, int], state: dict[str, Any] | None) -> SNLResult:
        """Binarise, finetune (optionally), save as a plan + safetensors, and check the census."""
        c = self.config
        binarise(self.model)
        if state is None:
            self.note(binarised_acc=self.accuracy(self.model))
        t0 = time.perf_counter()
        if c.finetune_epochs:
            spec = PhaseSpec(name="snl-finetune", epochs=c.finetune_epochs, lr_start=c.finetune_lr, lr_end=0.0,
                             scheduler="cosine", optimizer="sgd", momentum=0.9, weight_decay=5e-4, ce_weight=1.0,
                             kd_weight=1.0, temperature=c.temperature)  # fmt: skip
            self.trainer.reporter = self.reporter or self.trainer.reporter
            self.trainer.run_phase(FINETUNE, spec, PhaseHooks(), self.original, resume=state)
        elif state is not None:
            self.model.load_state_dict(state["model"])
        plan = snl_plan(self.census, kept_counts(self.model), spec=self.loaded.spec.to_dict(), budget=self.budget,
                        budget_requested=c.budget, leaf_modules=c.leaf_modules)  # fmt: skip
        from ..conversion.rewrite import save

        self.model.cpu().eval()  # saved and counted on the CPU, whatever device trained it
        save(self.model, self.out, plan=plan)
        counted = census(self.model, self.input_size, leaf_modules=c.leaf_modules).total_relus
        if counted != plan.achieved or counted > self.budget:
            raise PlanError(f"internal: the linearised model counts {counted:,} ReLUs, plan {plan.achieved:,}, "
                            f"budget {self.budget:,}")  # fmt: skip
        self.note(snl_acc=self.accuracy(self.model), snl_relus=counted, finetune_epochs=c.finetune_epochs,
                  finetune_wall_seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
        return SNLResult(self.out, counts, self.results)
