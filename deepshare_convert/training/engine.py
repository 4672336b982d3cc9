"""The one training loop of the project (retraining phases and the SNL search share it).

A :class:`Trainer` runs *phases*: a fixed number of epochs (or steps) with one
optimizer, a per-step learning-rate schedule, CE + optional KD from a teacher,
and :class:`PhaseHooks` for what differs between jobs (the gate-switch
schedule, SNL's mask penalty and lambda updates).  It owns the long-run safety:

* a checkpoint at the end of every epoch, written atomically;
* Ctrl-C finishes the current step, then saves a checkpoint at that step boundary
  (batch position, RNG, the epoch's running sums) and exits cleanly;
* resume restores model, optimizer, hook state and RNG, skips the batches
  already done, and continues bit-for-bit as an uninterrupted run would;
* a non-finite loss stops with one line naming phase, epoch and step, keeping
  the last good checkpoint;
* metrics go to ``metrics.jsonl``; under ``torchrun`` only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from .. import interrupts
from ..errors import DeepShareError
from ..evaluation import EvalResult, evaluate
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistContext
from .losses import kd_loss, task_loss
from .schedules import lr_at

__all__ = ["Trainer", "PhaseSpec", "PhaseHooks", "TrainingError", "Interrupted", "Reporter"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingError(DeepShareError):
    """Training cannot go on (e.g. a non-finite loss)."""


class Interrupted(DeepShareError):
    """Ctrl-C: progress was saved; ``--resume`` continues."""

    exit_code = 130


@dataclass
class PhaseSpec:
    """What the loop needs to know about one phase (recipes map onto this)."""

    name: str
    epochs: int | None = None
    steps: int | None = None
    lr_start: float = 0.1
    lr_end: float | None = None
    scheduler: str = "none"
    power: float = 0.9
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    decay_end: float = 1.0  # linear schedule: fraction of the phase at which lr reaches its end value
    eval_every: int | None = None  # also measure test accuracy every N steps (a curve, not only epoch ends)
    params: Callable[[nn.Module], Iterable[nn.Parameter]] | None = None
    # optimizer parameter groups instead of one; a group's "lr_scale" multiplies the scheduled lr
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None


class PhaseHooks:
    """Per-job behaviour inside the loop; every method is optional."""

    def on_phase_start(self, model: nn.Module) -> None: ...

    def before_step(self, model: nn.Module, step: int, total_steps: int, epoch: int, epochs: int) -> None: ...

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, steps_done: int) -> bool:
        """Return True to end the epoch now (SNL checking its budget every K steps);
        ``on_epoch_end`` still runs and decides whether the phase ends."""
        return False

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> bool:
        """Return True to end the phase early (e.g. SNL reached its budget)."""
        return False

    def on_phase_end(self, model: nn.Module) -> None: ...

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Reporter(Protocol):
    def start(self, name: str, total: int, done: int = 0) -> None: ...

    def advance(self, info: dict[str, Any]) -> None: ...

    def epoch(self, info: dict[str, Any]) -> None: ...

    def stop(self) -> None: ...


class _NullReporter:
    def start(self, name, total, done=0):
        pass

    def advance(self, info):
        pass

    def epoch(self, info):
        pass

    def stop(self):
        pass


@dataclass
class Trainer:
    """Runs phases on ``model`` with checkpoints under ``out``."""

    model: nn.Module
    train_loader: Any
    test_loader: Any | None
    out: Path
    dist: DistContext = field(default_factory=DistContext)
    reporter: Reporter = field(default_factory=_NullReporter)
    fail_at_step: int | None = None  # tests: a real SIGINT to this process when this global step starts
    checkpoints: bool = True  # False for seconds-long jobs (e.g. the XOR experiment)
    write_metrics: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # see training/device.py

    def __post_init__(self):
        self.out = Path(self.out)
        self.global_step = 0
        self.device = torch.device(self.device)

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def _save(self, phase_index: int, epoch: int, batch: int, optimizer, hooks: PhaseHooks, extra,
              sums: dict[str, Any] | None = None) -> None:  # fmt: skip
        if not self.dist.is_main or not self.checkpoints:
            return
        state = {
            "phase": phase_index,
            "epoch": epoch,
            "batch": batch,
            "global_step": self.global_step,
            "model": self._bare().state_dict(),
            "optimizer": optimizer.state_dict(),
            "hooks": hooks.state_dict(),
            "rng": rng_state(),
            "extra": extra or {},
            "epoch_sums": sums or {},  # the running loss/accuracy of a part-done epoch
        }
        save_checkpoint(self.checkpoint_path, state)

    def _bare(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main or not self.write_metrics:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- the loop ---------------------------------------------------------------------------
    def run_phase(
        self,
        phase_index: int,
        spec: PhaseSpec,
        hooks: PhaseHooks | None = None,
        teacher: nn.Module | None = None,
        resume: dict[str, Any] | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Train one phase; ``resume`` is a checkpoint dict of this phase. Returns final metrics."""
        hooks = hooks or PhaseHooks()
        self.model.to(self.device)  # before the optimizer is built on its parameters
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise TrainingError("the training loader is empty")
        epochs = spec.epochs or math.ceil(spec.steps / steps_per_epoch)
        total_steps = spec.steps or epochs * steps_per_epoch
        params = [p for p in (spec.params(self._bare()) if spec.params else self._bare().parameters()) if p.requires_grad]
        if spec.param_groups is not None:
            params = spec.param_groups(self._bare())
        optimizer = _make_optimizer(spec, params)
        start_epoch, start_batch, phase_step0, sums = 0, 0, self.global_step, None
        hooks.on_phase_start(self._bare())
        if resume is not None:
            self._bare().load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            hooks.load_state_dict(resume["hooks"])
            set_rng_state(resume["rng"])
            start_epoch, start_batch = resume["epoch"], resume["batch"]
            self.global_step = resume["global_step"]
            phase_step0 = resume["extra"].get("phase_step0", self.global_step)
            sums = resume.get("epoch_sums") or None
        if teacher is not None:
            teacher.to(self.device).eval()
        extra = dict(extra_state or {}, phase_step0=phase_step0)
        self.reporter.start(spec.name, total_steps, self.global_step - phase_step0)
        metrics: dict[str, Any] = {}
        with interrupts.deferred_sigint():  # Ctrl-C stops at a step boundary, never inside a step
            try:
                for epoch in range(start_epoch, epochs):
                    metrics = self._epoch(
                        phase_index, spec, hooks, teacher, optimizer, epoch, epochs, total_steps,
                        start_batch if epoch == start_epoch else 0, phase_step0, extra,
                        sums if epoch == start_epoch else None,
                    )  # fmt: skip
                    stop = hooks.on_epoch_end(self._bare(), epoch, metrics)
                    metrics.update(hooks.metrics(self._bare()))
                    self.log_metrics(metrics)
                    self.reporter.epoch(metrics)
                    self._save(phase_index, epoch + 1, 0, optimizer, hooks, extra)
                    if stop or self.global_step - phase_step0 >= total_steps:
                        break  # a Ctrl-C now is acted on at the next phase's first step boundary
                    if self._stop_requested():
                        self._interrupted(phase_index, spec, epoch + 1)
            finally:
                self.reporter.stop()
        hooks.on_phase_end(self._bare())
        return metrics

    def _epoch(self, phase_index, spec, hooks, teacher, optimizer, epoch, epochs, total_steps,
               skip, phase_step0, extra, sums=None) -> dict[str, Any]:  # fmt: skip
        model = self.model
        model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = sums or {}  # a resumed part-done epoch goes on from its saved running sums
        seen, correct, loss_sum = int(sums.get("seen", 0)), int(sums.get("correct", 0)), float(sums.get("loss_sum", 0.0))
        scored = int(sums.get("scored", seen))  # what train_acc divides by: examples, or labelled pixels
        ignore = getattr(self.train_loader, "ignore_index", None)  # segmentation: the unlabelled pixels' value
        lr = float(sums.get("lr", spec.lr_start))
        for batch_index, (x, y) in enumerate(self.train_loader):
            if batch_index < skip:
                continue  # resumed mid-epoch: these batches were done before the interruption
            step_in_phase = self.global_step - phase_step0
            if step_in_phase >= total_steps:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            try:
                if self.fail_at_step is not None and self.global_step == self.fail_at_step:
                    self.fail_at_step = None
                    interrupts.send_sigint()  # what Ctrl-C does, landing at this step's start
                lr = lr_at(step_in_phase, total_steps, spec.lr_start, spec.lr_end if spec.lr_end is not None
                           else spec.lr_start, spec.scheduler, spec.power, spec.decay_end)  # fmt: skip
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                hooks.before_step(self._bare(), step_in_phase, total_steps, epoch, epochs)
                logits = model(x)
                loss = spec.ce_weight * task_loss(logits, y, ignore) if spec.ce_weight else logits.new_zeros(())
                if teacher is not None:  # also run for its side effects (feature distillation's taps)
                    with torch.no_grad():
                        target = teacher(x)
                    if spec.kd_weight:
                        mask = (y != ignore) if logits.ndim == 4 and ignore is not None else None
                        loss = loss + spec.kd_weight * kd_loss(logits, target, spec.temperature, mask)
                penalty = hooks.extra_loss(self._bare())
                if penalty is not None:
                    loss = loss + penalty
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) in phase {phase_index} ({spec.name}), epoch {epoch}, "
                        f"step {self.global_step}; the last good checkpoint is kept at {self.checkpoint_path}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            except KeyboardInterrupt:  # a second Ctrl-C (or no handler): this step is half done, keep the last checkpoint
                raise Interrupted(
                    f"aborted in phase {phase_index} ({spec.name}), epoch {epoch}; resume from the last checkpoint "
                    f"with --resume {self.out}"
                ) from None
            self.global_step += 1
            n = y.shape[0]
            seen += n
            loss_sum += float(loss.detach()) * n
            batch_correct, batch_scored = _correct(logits.detach(), y, ignore)
            correct, scored = correct + batch_correct, scored + batch_scored
            self.reporter.advance({"loss": loss_sum / seen, "lr": lr})
            if spec.eval_every and (self.global_step - phase_step0) % spec.eval_every == 0:
                self._eval_point(phase_index, spec, epoch, hooks)
            if hooks.after_step(self._bare(), self.global_step - phase_step0):
                break  # the epoch ends now; a Ctrl-C is acted on after its checkpoint
            if self._stop_requested():  # the step is complete: save exactly here and stop
                sums = {"seen": seen, "correct": correct, "loss_sum": loss_sum, "lr": lr, "scored": scored}
                self._save(phase_index, epoch, batch_index + 1, optimizer, hooks, extra, sums)
                self._interrupted(phase_index, spec, epoch)
        self.dist.sync_buffers(self._bare())
        metrics = {
            "phase": phase_index,
            "kind": spec.name,
            "epoch": epoch,
            "step": self.global_step,
            "lr": lr,
            "loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(scored, 1),  # segmentation: pixel accuracy
            "epoch_seconds": round(time.perf_counter() - t0, 3),
        }
        if self.test_loader is not None and self.dist.is_main:
            metrics.update(_test_metrics(evaluate(self._bare(), self.test_loader, device=self.device)))
        self.dist.barrier()
        return metrics

    def _stop_requested(self) -> bool:
        """A Ctrl-C is pending here (or, under DDP, on any rank: all ranks stop at the same step)."""
        return self.dist.any(interrupts.requested())

    def _interrupted(self, phase_index: int, spec: PhaseSpec, epoch: int) -> None:
        interrupts.clear()
        raise Interrupted(
            f"interrupted in phase {phase_index} ({spec.name}), epoch {epoch}, step {self.global_step}; progress "
            f"saved -- resume with --resume {self.out}"
        )

    def _eval_point(self, phase_index: int, spec: PhaseSpec, epoch: int, hooks: PhaseHooks) -> None:
        """A mid-epoch test-accuracy point for the learning curve (metrics.jsonl, ``"eval": true``)."""
        if self.test_loader is None or not self.dist.is_main:
            return
        result = evaluate(self._bare(), self.test_loader, device=self.device)
        record = {"phase": phase_index, "kind": spec.name, "epoch": epoch, "step": self.global_step, "eval": True,
                  **_test_metrics(result), **hooks.metrics(self._bare())}  # fmt: skip
        self.log_metrics(record)


def _test_metrics(result: EvalResult) -> dict[str, float]:
    """``test_acc`` (top-1) for classification; ``test_miou`` and ``test_pixel_acc`` for segmentation."""
    if result.miou is not None:
        return {"test_miou": result.miou, "test_pixel_acc": result.pixel_acc, "test_loss": result.loss}
    return {"test_acc": result.top1, "test_loss": result.loss}


def _correct(logits: torch.Tensor, y: torch.Tensor, ignore: int | None = None) -> tuple[int, int]:
    """(correct, scored): examples, or labelled pixels for (N, K, H, W) logits."""
    if logits.ndim == 4:
        keep = y != ignore if ignore is not None else torch.ones_like(y, dtype=torch.bool)
        return int(((logits.argmax(1) == y) & keep).sum()), int(keep.sum())
    if logits.shape[-1] == 1:
        return int(((logits[:, 0] > 0).long() == y).sum()), len(y)
    return int((logits.argmax(-1) == y).sum()), len(y)


def _make_optimizer(spec: PhaseSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr_start, momentum=spec.momentum,
                               weight_decay=spec.weight_decay, nesterov=spec.nesterov and spec.momentum > 0)  # fmt: skip
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr_start, weight_decay=spec.weight_decay)
    raise TrainingError(f"unknown optimizer {spec.optimizer!r}")


def learning_curve(run_dir: str | Path, skip_kinds: tuple[str, ...] = ()) -> list[list[float]]:
    """[step, test top-1 (mIoU for segmentation)] at every measured point of a run (epoch ends and
    ``eval_every`` points), by step."""
    points: dict[int, float] = {}
    for line in (Path(run_dir) / METRICS).read_text().splitlines():
        m = json.loads(line) if line else {}
        key = "test_acc" if "test_acc" in m else "test_miou"
        if key in m and m.get("kind") not in skip_kinds:
            points[m["step"]] = round(m[key], 2)
    return [[step, acc] for step, acc in sorted(points.items())]


def read_resume_state(out: str | Path) -> dict[str, Any]:
    return load_checkpoint(Path(out) / CHECKPOINT)


def resume_state_or_restart(out: str | Path, partial: tuple[str, ...] = (METRICS, "results.json")) -> dict[str, Any] | None:
    """The run's last checkpoint, or None when it was stopped before writing one: then it starts over.

    A run killed between saving its settings and its first checkpoint has nothing to
    continue, yet callers (the bench, ``--resume``) see a run directory; the partial
    files it may have left (``partial``) are removed so the fresh start inherits nothing.
    """
    out = Path(out)
    if (out / CHECKPOINT).is_file():
        return read_resume_state(out)
    for name in partial:
        (out / name).unlink(missing_ok=True)
    return None
