"""``deepshare retrain``: run a recipe's phases end to end, resumably.

Layout of the output directory (it *is* a converted-model directory at the end)::

    OUT/recipe.yaml          the resolved recipe (overrides applied)
    OUT/plan.json            the conversion plan (written as soon as it exists)
    OUT/model.safetensors    the final converted model
    OUT/pretrained.safetensors  original weights trained by a `pretrain` phase
    OUT/phases/phaseN.safetensors  weights at the end of each phase (teachers)
    OUT/checkpoint.pt        the last checkpoint (resume point)
    OUT/metrics.jsonl        one line per epoch
    OUT/results.json         accuracies and DReLU counts
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..conversion.census import census
from ..conversion.gates import set_gate_mode
from ..conversion.plan import WEIGHTS_FILE, Plan
from ..conversion.rewrite import apply_plan, convert, save
from ..data import load_dataset, make_loader, require_split
from ..errors import DeepShareError
from ..evaluation import evaluate
from ..evaluation.metrics import task_key
from ..interrupts import deferred_sigint
from ..models import ModelSpec, load_model
from ..recipes import Phase, Recipe, dump_recipe, load_recipe
from .ablation import apply_ablation
from .device import resolve_device
from .distributed import DistContext, init_from_env, wrap_ddp
from .engine import PhaseSpec, Reporter, Trainer
from .phases import hooks_for
from .rundir import RunDir

__all__ = ["retrain", "resume", "RetrainResult"]

RECIPE_FILE = "recipe.yaml"
PRETRAINED = "pretrained.safetensors"


@dataclass
class RetrainResult:
    out: Path
    results: dict[str, Any]


def _phase_spec(phase: Phase, teacher: nn.Module | None) -> PhaseSpec:
    return PhaseSpec(
        name=phase.kind, epochs=phase.epochs, steps=phase.steps, lr_start=phase.lr.start, lr_end=phase.lr.end,
        scheduler=phase.lr.scheduler, power=phase.lr.power, optimizer=phase.optimizer.name,
        momentum=phase.optimizer.momentum, weight_decay=phase.optimizer.weight_decay,
        nesterov=phase.optimizer.nesterov, ce_weight=phase.kd.ce_weight,
        kd_weight=phase.kd.weight if teacher is not None else 0.0, temperature=phase.kd.temperature,
        decay_end=phase.lr.decay_end, eval_every=phase.eval_every,
    )  # fmt: skip


def _load_tensors(model: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_model as st_load

    if not path.is_file():
        raise DeepShareError(f"{path} is missing; the run directory is incomplete")
    st_load(model, str(path), strict=False)
    return model


_FROZEN = {
    "pt2": "a torch.export (.pt2) graph is frozen in eval mode (aten.batch_norm uses its running statistics, "
           "dropout is off)",
    "onnx": "an ONNX graph is frozen in eval mode (torch.onnx.export folds BatchNorm into the convolutions)",
}  # fmt: skip


def _refuse_exported(m) -> None:
    """Retraining needs a trainable graph: .pt2 / .onnx sources (or OUT/ converted from one) are refused, one line."""
    from ..models.formats import sniff_model_file

    if m.converted:
        plan_file = Path(m.converted) / "plan.json"
        source = Plan.read(Path(m.converted)).model.get("source") if plan_file.is_file() else None
        name = m.converted
    else:
        source = sniff_model_file(m.name) if m.name and Path(m.name).is_file() else None
        name = m.name
    if source in _FROZEN:
        raise DeepShareError(f"cannot retrain {name}: {_FROZEN[source]}; retrain the eager model (its architecture "
                             "with --weights) and convert that, or use the converted model without retraining")  # fmt: skip


class _Run:
    """State of one retraining run (kept small: everything else is rebuilt on resume)."""

    def __init__(self, recipe: Recipe, out: Path, reporter: Reporter | None, fail_at_step: int | None,
                 device: str | torch.device = "auto"):  # fmt: skip
        self.recipe, self.out = recipe, out
        self.device = resolve_device(device)
        self.dist: DistContext = init_from_env()
        _refuse_exported(recipe.model)
        self.run_dir = RunDir(out, writer=self.dist.is_main)
        torch.manual_seed(recipe.seed)
        self.info, self.train_split, self.test_split = load_dataset(recipe.data.spec)
        require_split(self.train_split, "train", recipe.data.spec)  # a test-only image folder: one line
        require_split(self.test_split, "test", recipe.data.spec)
        m = recipe.model
        if m.converted:
            self._from_converted(Path(m.converted))
        else:
            size = tuple(m.input_size) if m.input_size else None
            self.loaded = load_model(m.name, weights=m.weights, num_classes=m.num_classes, input_size=size)
        self.mean, self.std = self.loaded.mean or self.info.mean, self.loaded.std or self.info.std
        self.original: nn.Module = self.loaded.model
        self.student: nn.Module | None = None
        self.plan: Plan | None = None
        self.reporter, self.fail_at_step = reporter, fail_at_step
        self.global_step = 0  # steps across phases: names where a run failed or stopped
        self.run_dir.load_results(recipe=recipe.name, data=recipe.data.spec)  # a resumed run keeps its results

    @property
    def results(self) -> dict[str, Any]:
        return self.run_dir.results

    def _from_converted(self, directory: Path) -> None:
        from ..conversion.rewrite import load as load_converted

        conv = load_converted(directory)
        spec = conv.plan.model
        name = ModelSpec(spec.get("source", "builtin"), spec["name"]).display  # timm:NAME for timm models
        self.loaded = load_model(name, weights=spec.get("weights"), num_classes=spec.get("num_classes"),
                                 input_size=tuple(conv.plan.input_size))  # fmt: skip
        self.plan = conv.plan
        self.student = conv.model
        self.has_original_weights = spec.get("weights") is not None

    # ---- pieces ------------------------------------------------------------------------------
    def loader(self, split, *, train: bool, batch_size: int, augment: bool = True):
        d = self.recipe.data
        return make_loader(
            split, self.info, train=train, batch_size=batch_size, mean=self.mean, std=self.std,
            augment=augment if train else False, limit=d.limit if train else d.test_limit, seed=self.recipe.seed,
            num_workers=d.workers, rank=self.dist.rank if train else 0, world_size=self.dist.world_size if train else 1,
        )  # fmt: skip

    def test_loader(self):
        return self.loader(self.test_split, train=False, batch_size=self.recipe.data.eval_batch_size)

    def calibration_images(self) -> torch.Tensor:
        """The first N train images, unaugmented (the same on every rank and on resume)."""
        n = self.recipe.conversion.calibration_images if self.recipe.conversion else 256
        loader = make_loader(self.train_split, self.info, train=False, batch_size=n, mean=self.mean, std=self.std,
                             augment=False, limit=n)  # fmt: skip
        return next(iter(loader))[0]

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.test_loader(), device=self.device).score

    def note(self, **values: Any) -> None:
        """Record results as soon as they are known (a resumed run keeps them); ``*_acc`` is ``*_miou``
        for segmentation data."""
        self.run_dir.note(**{task_key(k, self.info.task): v for k, v in values.items()})

    def ensure_converted(self) -> None:
        if self.student is not None:
            return
        c = self.recipe.conversion
        input_size = self.loaded.input_size
        if self.plan is None:
            spec = self.loaded.spec.to_dict()
            if (self.out / PRETRAINED).is_file():
                spec["weights"] = str(self.out / PRETRAINED)
            converted = convert(self.original, input_size, c, spec=spec)  # the recipe's settings, as `convert` takes them
            self.plan, self.student = converted.plan, converted.model
            if c.init == "data":
                from ..conversion.fitting import fit_sharing

                self.note(sharing_fit=fit_sharing(self.student, self.plan, self.calibration_images()))
            if self.dist.is_main:
                self.plan.save(self.out)
        else:
            self.student = apply_plan(self.original, self.plan)
        if c is not None:
            apply_ablation(self.student, self.plan, affine=c.affine, replicates=c.replicates)

    def teacher_for(self, index: int, phase: Phase) -> nn.Module | None:
        kind = phase.kd.teacher
        if kind == "none" or (phase.kd.weight == 0 and phase.kd.feature_weight == 0):
            return None
        if kind == "original":
            if phase.kd.feature_weight > 0 and phase.kind != "pretrain":
                from .features import tapped_teacher

                return tapped_teacher(self.original, self.plan)
            teacher = copy.deepcopy(self.original).eval()
            return teacher
        source = index - 1
        if kind == "gelu-phase":
            source = max(i for i, p in enumerate(self.recipe.phases[:index]) if p.kind == "gelu")
        previous = self.recipe.phases[source]
        model = self.original if previous.kind == "pretrain" else self.student
        teacher = _load_tensors(copy.deepcopy(model), self.out / "phases" / f"phase{source}.safetensors")
        if previous.kind != "pretrain":
            set_gate_mode(teacher, {"gelu": "gelu"}.get(previous.kind, "step"))
        return teacher.eval()

    # ---- the run ------------------------------------------------------------------------------
    def run(self, state: dict[str, Any] | None) -> dict[str, Any]:
        phases = self.recipe.phases
        start = state["phase"] if state else 0
        if (self.out / PRETRAINED).is_file() and phases[0].kind == "pretrain" and start > 0:
            _load_tensors(self.original, self.out / PRETRAINED)
        if state is None and phases[0].kind != "pretrain":
            self.note(original_acc=self.accuracy(self.original))
        for index, phase in enumerate(phases):
            if index < start:
                if phase.kind != "pretrain":
                    self.ensure_converted()
                continue
            if phase.kind == "pretrain":
                model = self.original
            else:
                fresh = self.student is None and self.plan is None
                self.ensure_converted()
                model = self.student
                if fresh:  # converted just now (also when resuming from a pretrain checkpoint)
                    set_gate_mode(model, "step")
                    self.note(converted_acc_before_retraining=self.accuracy(model))
            self._run_phase(index, phase, model, state if index == start else None)
            if phase.kind == "pretrain":
                self.run_dir.save_tensors(self.original, PRETRAINED)
                self.note(original_acc=self.accuracy(self.original))
        return self.finish()

    def _run_phase(self, index: int, phase: Phase, model: nn.Module, state) -> None:
        teacher = self.teacher_for(index, phase)
        trainer = Trainer(
            wrap_ddp(model, self.dist), self.loader(self.train_split, train=True, batch_size=phase.batch_size,
                                                    augment=phase.augment),
            self.test_loader(), self.out, dist=self.dist, fail_at_step=self.fail_at_step, device=self.device,
        )  # fmt: skip
        if self.reporter is not None:
            trainer.reporter = self.reporter
        trainer.global_step = state["global_step"] if state is not None else self.global_step
        progressive = phase.progressive.model_dump() if phase.progressive else None
        hooks = hooks_for(phase.kind, phase.switch_granularity, gate=phase.gate, gamma=phase.gamma,
                          progressive=progressive, calibration=self.calibration_images)  # fmt: skip
        if teacher is not None and phase.kd.feature_weight > 0 and phase.kind != "pretrain":
            from .features import FeatureDistillation

            hooks = FeatureDistillation(hooks, teacher, phase.kd.feature_weight)
        trainer.run_phase(index, _phase_spec(phase, teacher), hooks, teacher, resume=state)
        self.fail_at_step, self.global_step = trainer.fail_at_step, trainer.global_step
        self.run_dir.save_tensors(model, f"phases/phase{index}.safetensors")
        self.dist.barrier()

    def finish(self) -> dict[str, Any]:
        if self.student is None:  # a pretrain-only recipe
            return self.results
        set_gate_mode(self.student, "step")
        self.student.cpu().eval()  # saved, traced and counted on the CPU, whatever device trained it
        if self.dist.is_main:
            save(self.student, self.out, plan=self.plan)
        if self.dist.enabled:  # data-parallel replicas must have ended identical
            self.results["replica_checksums"] = self.dist.gather_floats(_checksum(self.student))
        drelus = census(self.student, self.plan.input_size).total_relus
        self.note(final_acc=self.accuracy(self.student), drelus=drelus, total_relus=self.plan.total_relus,
                  budget=self.plan.budget)  # fmt: skip
        return self.results


def _checksum(model: nn.Module) -> float:
    """A weight fingerprint: sum of |w| * (1 + position) over all parameters and buffers."""
    total = 0.0
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        flat = t.detach().double().flatten().cpu()
        total += float((flat.abs() * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum())
    return total


def retrain(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    quick: bool = False,
    reporter: Reporter | None = None,
    fail_at_step: int | None = None,
    device: str | torch.device = "auto",
) -> RetrainResult:
    """Run a recipe from scratch into ``out`` (an existing checkpoint there is an error).

    ``device`` (``auto``, ``cpu``, ``cuda[:N]``) is where the training loop runs; it is not part of the
    run, so a run started on a GPU resumes on a CPU and the other way round.
    """
    device = resolve_device(device)  # a GPU that is not there fails before anything is written
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, quick)
    out = RunDir.new(out, advice="use --resume {out} or another --out").path
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(dump_recipe(recipe))
    with deferred_sigint():  # a Ctrl-C during setup stops at the first step boundary, resumably
        run = _Run(recipe, out, reporter, fail_at_step, device)
        return RetrainResult(out, run.run(None))


def resume(out: str | Path, *, reporter: Reporter | None = None, fail_at_step: int | None = None,
           device: str | torch.device = "auto") -> RetrainResult:  # fmt: skip
    """Continue the run in ``out`` from its last checkpoint, with its resolved recipe.

    A run stopped before its first checkpoint starts over from the saved recipe.
    """
    out = Path(out)
    recipe = load_recipe(out / RECIPE_FILE)
    state = RunDir(out).resume_state(partial=("plan.json", WEIGHTS_FILE))  # None: stopped before a checkpoint
    with deferred_sigint():
        run = _Run(recipe, out, reporter, fail_at_step, device)
        if state is not None and run.plan is None and _converted_before(recipe, state) and (out / "plan.json").is_file():
            run.plan = Plan.read(out)
        return RetrainResult(out, run.run(state))


def _converted_before(recipe: Recipe, state: dict[str, Any]) -> bool:
    """Was the conversion part of the checkpointed progress?

    A run stopped in (or at the end of) a pretrain phase may have written plan.json
    (and its data-fitted sharing) after that checkpoint; the conversion is then redone,
    as the uninterrupted run did it, so its results (e.g. the converted top-1) are kept.
    """
    return any(p.kind != "pretrain" for p in recipe.phases[: state["phase"] + 1])
