"""Ctrl-C at any point of a retraining run, then --resume: bit-identical to a run never interrupted.

A real SIGINT is sent from inside a forward pass (after some BatchNorm layers already
moved their running statistics), which is where a Ctrl-C usually lands.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from deepshare_convert.recipes import recipe_from_dict
from deepshare_convert.training.engine import Interrupted
from deepshare_convert.training.retrain import resume, retrain

from .test_progressive import _small_progressive
from .test_retrain import SMALL

BN_PER_STEP = 4  # the digits CNN's BatchNorm layers (student or original: a teacher runs in eval mode)


class _CtrlCInForward:
    """Sends SIGINT to this process during training step ``step``'s forward, after two BN layers ran."""

    def __init__(self, step: int):
        self.calls, self.at = 0, step * BN_PER_STEP + 2

    def __call__(self, module, args, output):
        if isinstance(module, nn.BatchNorm2d) and module.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGINT)


def _interrupted_then_resumed(recipe, out: Path, step: int) -> dict:
    handle = nn.modules.module.register_module_forward_hook(_CtrlCInForward(step))
    try:
        with pytest.raises(Interrupted, match="progress saved -- resume with --resume"):
            retrain(recipe, out)
    finally:
        handle.remove()
    return resume(out).results


def _same_run(a: Path, b: Path) -> None:
    """Every weights file, results.json and metrics.jsonl (but wall times) equal."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        differ = [k for k in x if not torch.equal(x[k], y[k])]
        assert not differ, f"{name}: {len(differ)} of {len(x)} tensors differ, e.g. {differ[:3]}"
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())

    def metrics(run: Path) -> list[dict]:
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in lines]

    assert metrics(a) == metrics(b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    torch.set_num_threads(2)  # as conftest's per-test fixture sets it: the thread count changes float sums
    out = tmp_path_factory.mktemp("straight") / "run"
    retrain(recipe_from_dict(SMALL), out)
    return out


# SMALL: 8 steps an epoch; pretrain 0-15, gelu 16-31, switch 32-47, finetune 48-57
@pytest.mark.parametrize("step", [5, 15, 20, 37, 52], ids=["pretrain", "pretrain-last-step", "gelu", "switch",
                                                          "finetune"])  # fmt: skip
def test_ctrl_c_in_each_phase_resumes_bit_identical(straight, tmp_path, step):
    _interrupted_then_resumed(recipe_from_dict(SMALL), tmp_path / "b", step)
    _same_run(straight, tmp_path / "b")


def test_ctrl_c_in_progressive_phase_resumes_bit_identical(tmp_path):
    recipe = recipe_from_dict(_small_progressive())  # pretrain 0-15, progressive 16-31 (eval every 10), finetune
    retrain(recipe, tmp_path / "a")
    _interrupted_then_resumed(recipe, tmp_path / "b", 22)
    _same_run(tmp_path / "a", tmp_path / "b")


def test_ctrl_c_during_setup_stops_at_the_first_step_resumably(straight, tmp_path, monkeypatch):
    """A Ctrl-C before any training (while data and model load) still leaves something to resume."""
    import deepshare_convert.training.retrain as module

    real = module.load_dataset

    def load_then_ctrl_c(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(module, "load_dataset", load_then_ctrl_c)
    with pytest.raises(Interrupted, match=r"phase 0 \(pretrain\), epoch 0, step 1; progress saved"):
        retrain(recipe_from_dict(SMALL), tmp_path / "b")
    monkeypatch.setattr(module, "load_dataset", real)
    resume(tmp_path / "b")
    _same_run(straight, tmp_path / "b")


def test_sigkill_after_conversion_before_next_checkpoint_resumes_bit_identical(straight, tmp_path):
    """Killed after plan.json was written but before the first checkpoint of the phase that follows pretrain:
    the last checkpoint is in pretrain, so the conversion (and its converted top-1) is redone."""
    import shutil

    _killed = tmp_path / "b"
    handle = nn.modules.module.register_module_forward_hook(_CtrlCInForward(5))
    try:
        with pytest.raises(Interrupted):
            retrain(recipe_from_dict(SMALL), _killed)
    finally:
        handle.remove()
    shutil.copy(straight / "plan.json", _killed / "plan.json")  # what the killed run had written
    resume(_killed)
    _same_run(straight, _killed)
