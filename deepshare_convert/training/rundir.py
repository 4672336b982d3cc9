"""A training run's output directory: the chores every resumable job shares.

The retrain run (:mod:`.retrain`) and the SNL job (:mod:`..snl.job`) both write into one
directory that ``--resume`` continues::

    OUT/checkpoint.pt    the engine's last checkpoint (the resume point)
    OUT/metrics.jsonl    one line per epoch (written by the engine's Trainer)
    OUT/results.json     what the run has measured so far, merged note by note

:class:`RunDir` holds those chores once: the paths, refusing to start over a run,
``results.json`` notes (written as soon as a number is known, so an interrupted run keeps
them and its resume starts from them) and the resume point (the last checkpoint, or a
clean restart when the run stopped before writing one).  Under ``torchrun`` only the
writer (rank 0) writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..conversion.plan import save_tensors_atomic, write_json_atomic
from ..errors import DeepShareError
from ..outputs import check_output_dir
from .engine import CHECKPOINT, METRICS, resume_state_or_restart

__all__ = ["RunDir", "RESULTS_FILE"]

RESULTS_FILE = "results.json"


class RunDir:
    """One run's directory: ``path / name`` for its files, ``results`` and :meth:`note` for
    ``results.json``, :meth:`resume_state` for ``--resume``.

    ``writer=False`` (a data-parallel rank other than 0) keeps ``results`` in memory only.
    """

    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.results: dict[str, Any] = {}

    @classmethod
    def new(cls, path: str | Path, *, advice: str) -> RunDir:
        """The directory of a run from scratch: a usable output directory (checked before any work)
        holding no run yet; otherwise ``"{path} already holds a run; " + advice`` (``{out}`` there is the path)."""
        path = check_output_dir(path)
        if (path / CHECKPOINT).exists():
            raise DeepShareError(f"{path} already holds a run; " + advice.format(out=path))
        return cls(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    # ---- results.json ------------------------------------------------------------------------
    def load_results(self, **first: Any) -> dict[str, Any]:
        """Start ``results`` with ``first``, then what ``results.json`` holds (a resumed run keeps what it
        measured before; a fresh one has no file).  Call it after :meth:`resume_state`, which may clear it."""
        self.results = dict(first)
        if self.results_file.is_file():
            self.results.update(json.loads(self.results_file.read_text()))
        return self.results

    def note(self, **values: Any) -> None:
        """Record results as soon as they are known (a resumed run keeps them)."""
        self.results.update(values)
        self.write_results()

    def write_results(self) -> None:
        if self.writer:
            write_json_atomic(self.results_file, self.results)

    # ---- weights and resuming -------------------------------------------------------------------
    def save_tensors(self, model: nn.Module, name: str) -> None:
        """``model``'s tensors as ``path / name`` (safetensors, written atomically; by the writer only)."""
        if self.writer:
            save_tensors_atomic(model, self.path / name)

    def resume_state(self, partial: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The last checkpoint's state; None when the run stopped before its first checkpoint.

        Then it starts over, and what the stopped run may have left is removed first:
        ``metrics.jsonl``, ``results.json`` and the job's own ``partial`` files
        (see :func:`.engine.resume_state_or_restart`).
        """
        return resume_state_or_restart(self.path, partial=(METRICS, RESULTS_FILE, *partial))
