"""One training engine: the loop, KD loss, schedules, checkpoints, DDP, and the phases."""

from .engine import Interrupted, PhaseHooks, PhaseSpec, Trainer, TrainingError

__all__ = ["Interrupted", "PhaseHooks", "PhaseSpec", "Trainer", "TrainingError"]
