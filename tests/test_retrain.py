"""Three-phase retraining: accuracy recovery on digits, the switch order, resume, NaN, recipes, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from deepshare_convert.conversion.gates import PrototypeGate, SharedGate
from deepshare_convert.conversion.rewrite import convert, load
from deepshare_convert.errors import DeepShareError
from deepshare_convert.recipes import RecipeError, load_recipe, recipe_from_dict
from deepshare_convert.training.engine import Interrupted, TrainingError
from deepshare_convert.training.phases import SwitchPhase
from deepshare_convert.training.retrain import resume, retrain

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "recipes" / "digits_demo.yaml"


def test_digits_three_phases_recover_accuracy(tmp_path, record_property):
    """10% of the ReLUs: accuracy collapses at conversion, the phases bring it back within 3 points."""
    t0 = time.perf_counter()
    r = retrain(DIGITS, tmp_path / "run").results
    elapsed = time.perf_counter() - t0
    assert r["original_acc"] > 97
    assert r["converted_acc_before_retraining"] < 50
    assert r["final_acc"] >= r["original_acc"] - 3
    assert r["drelus"] <= r["budget"] == 614 and r["total_relus"] == 6144
    record_property("retrain_seconds", round(elapsed, 1))  # the demo's run time: recorded, not asserted (machine-bound)
    converted = load(tmp_path / "run")  # the output is a converted-model directory
    assert converted.plan.achieved == r["drelus"]
    assert all(m.mode == "step" for m in converted.model.modules() if isinstance(m, (PrototypeGate, SharedGate)))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines].count("switch") == 6 and lines[-1]["kind"] == "finetune"


def test_switch_order_last_channel_first():
    """Supp. B: within each site, channels switch from the last one backwards; all are steps at the end."""
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.ReLU())
    m = convert(model, (1, 2, 2), budget=12, group_size=1).model
    hooks = SwitchPhase("epoch")
    hooks.on_phase_start(m)
    sites = [s for s in m.modules() if isinstance(s, SharedGate)]
    assert all(s.mode == "mixed" for s in sites)
    history = []
    for epoch in range(4):
        hooks.before_step(m, 0, 40, epoch, 4)
        history.append([s.switched.tolist() for s in sites])
    for masks in zip(*history):  # per site, over epochs
        counts = [sum(mask) for mask in masks]
        assert counts == sorted(counts) and counts[-1] == len(masks[0])
        for mask in masks:  # switched channels form a suffix: the last channels go first
            n = sum(mask)
            assert mask == [False] * (len(mask) - n) + [True] * n
    assert history[0][0] == [False] * 6 + [True] * 2  # 8 channels, 1/4 of the way: last 2
    hooks.on_phase_end(m)
    assert all(s.mode == "step" and bool(s.switched.all()) for s in sites)
    assert all(g.mode == "step" for g in m.modules() if isinstance(g, PrototypeGate))


SMALL = dict(
    name="small", seed=3, model={"name": "digits_cnn"}, data={"spec": "digits", "limit": 512},
    conversion={"budget": "10%"},
    phases=[
        {"kind": "pretrain", "epochs": 2, "batch_size": 64, "lr": {"start": 0.05}},
        {"kind": "gelu", "epochs": 2, "batch_size": 64, "lr": {"start": 0.02, "end": 0.002, "scheduler": "linear"},
         "kd": {"teacher": "original"}},
        {"kind": "switch", "epochs": 2, "batch_size": 64, "lr": {"start": 0.01}, "kd": {"teacher": "previous-phase"}},
        {"kind": "finetune", "steps": 10, "batch_size": 64, "lr": {"start": 0.01, "end": 0.001, "scheduler": "cosine"}},
    ],
)  # fmt: skip


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("fail_at_step", [5, 19, 27])  # mid pretrain, mid gelu, inside switch
def test_resume_equals_uninterrupted(tmp_path, fail_at_step):
    recipe = recipe_from_dict(SMALL)
    straight = retrain(recipe, tmp_path / "a").results
    with pytest.raises(Interrupted, match="resume with --resume"):
        retrain(recipe, tmp_path / "b", fail_at_step=fail_at_step)
    resumed = resume(tmp_path / "b").results
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_acc"] == straight["final_acc"]


def test_existing_run_needs_resume(tmp_path):
    recipe = recipe_from_dict(SMALL)
    with pytest.raises(Interrupted):
        retrain(recipe, tmp_path / "b", fail_at_step=3)
    with pytest.raises(DeepShareError, match="--resume"):
        retrain(recipe, tmp_path / "b")


def test_nan_loss_stops_with_one_line(tmp_path):
    data = json.loads(json.dumps(SMALL))
    data["phases"][1]["lr"] = {"start": 1.0e12}
    with pytest.raises(TrainingError, match=r"non-finite loss .* phase 1 \(gelu\), epoch \d+, step \d+") as e:
        retrain(recipe_from_dict(data), tmp_path / "run")
    assert "\n" not in str(e.value)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()  # the last good checkpoint is kept


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["phases"][0].update(epochz=3), "unknown key 'phases.0.epochz'"),
        (lambda d: d.update(conversion=None), "need `conversion`"),
        (lambda d: d["phases"][1].update(kind="warmup"), "phases.1.kind"),
        (lambda d: d["phases"][1].update(steps=5), "exactly one of epochs or steps"),
        (lambda d: d["data"].update(spec=None), "data.spec"),
        (lambda d: d["phases"][0]["kd"].update(teacher="previous-phase") if "kd" in d["phases"][0]
         else d["phases"][0].update(kd={"teacher": "previous-phase"}), "no previous phase"),
    ],
)  # fmt: skip
def test_recipe_validation(mutate, message):
    data = json.loads(json.dumps(SMALL))
    mutate(data)
    with pytest.raises(RecipeError, match=message) as e:
        recipe_from_dict(data)
    assert "\n" not in str(e.value)


def test_overrides_and_quick(tmp_path):
    r = load_recipe(DIGITS, ["phases.1.epochs=2", "data.limit=100", "conversion.budget=5%"], quick=True)
    assert r.phases[1].epochs == 2 and r.phases[2].epochs == 3 and r.data.limit == 100
    assert r.conversion.budget == "5%"
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(DIGITS, ["phases.1.epochs"])
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(DIGITS, ["phases.9.epochs=1"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    if path.name == "xor.yaml":  # the XOR experiment's own settings (deepshare xor --config)
        from deepshare_convert.experiments.xor import load_xor_config

        assert load_xor_config(path).epochs == 5000 and load_xor_config(path, quick=True).epochs < 5000
        return
    load_recipe(path)
    load_recipe(path, quick=True)


def test_data_parallel_two_processes(tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks end with identical weights."""
    data = json.loads(json.dumps(SMALL))
    data["phases"] = data["phases"][:2]
    data["data"].pop("limit")
    data["phases"][0]["epochs"] = 4
    recipe = tmp_path / "ddp.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(data))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "deepshare_convert.cli.app", "retrain", "--recipe", str(recipe), "-o", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    checksums = results["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert results["final_acc"] > 50
