"""`timm:NAME --pretrained` goes through timm's own download and cache; offline it fails fast naming --weights.
Every command that builds an architecture without weights says so."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepshare_convert.cli.app import run

from .timm_cache import run_with_cached_resnet18

ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "deepshare_convert.cli.app", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=ROOT)  # fmt: skip


def _empty_caches(tmp_path: Path) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "host-unreachable"])  # fmt: skip
def test_pretrained_offline_fails_fast_naming_weights(tmp_path, offline):
    t0 = time.perf_counter()
    r = _cli(["inspect", "timm:resnet18", "--pretrained"], {**_empty_caches(tmp_path), **offline})
    elapsed = time.perf_counter() - t0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("deepshare: ")]
    assert r.returncode == 2, r.stderr
    assert len(errors) == 1 and errors[0].startswith("deepshare: error: ") and "--weights" in errors[0], r.stderr
    assert "not in the local cache" in errors[0]
    assert elapsed < 40  # imports included; the hub client alone retries for ~47 s when the host is unreachable


def test_pretrained_offline_uses_timms_cached_copy(tmp_path):
    """A copy in the hub cache (where timm.create_model(pretrained=True) put it) loads without a network."""
    r = run_with_cached_resnet18(tmp_path, """
        loaded = load_model("timm:resnet18", pretrained=True).model
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
        print("ok")
        """)  # fmt: skip
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_pretrained_is_for_timm_only_and_not_with_weights(capsys):
    assert run(["inspect", "digits_cnn", "--pretrained"]) == 2
    assert "for timm:NAME models only" in capsys.readouterr().err
    assert run(["inspect", "timm:resnet18", "--pretrained", "--weights", "w.pt"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["inspect", "digits_cnn"], ["evaluate", "digits_cnn", "--data", "digits", "--limit", "32"],
     ["estimate-latency", "digits_cnn"], ["inspect", "timm:resnet18"]],
    ids=["inspect", "evaluate", "estimate-latency", "timm"],
)  # fmt: skip
def test_commands_say_when_weights_are_random(argv, capsys):
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert "randomly initialised weights" in err and "--weights" in err
    if argv[1].startswith("timm:"):
        assert "--pretrained" in err


def test_no_random_note_with_weights(tmp_path, capsys):
    from safetensors.torch import save_model

    from deepshare_convert.models import load_model

    save_model(load_model("digits_cnn").model, str(tmp_path / "w.safetensors"))
    assert run(["inspect", "digits_cnn", "--weights", str(tmp_path / "w.safetensors")]) == 0
    assert "randomly" not in capsys.readouterr().err


def test_snl_and_retrain_say_when_weights_are_random(tmp_path, capsys):
    argv = ["snl", "digits_cnn", "--data", "digits", "--budget", "100%", "--max-steps", "1", "--limit", "64",
            "--test-limit", "32", "-o", str(tmp_path / "snl")]  # fmt: skip
    assert run(argv) == 0
    assert "digits_cnn has randomly initialised weights" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""
        name: r
        model: {name: digits_cnn}
        data: {spec: digits, limit: 64, test_limit: 32}
        conversion: {budget: 50%}
        phases:
          - {kind: finetune, steps: 1, batch_size: 32, lr: {start: 0.01}}
        """))
    assert run(["retrain", "--recipe", str(recipe), "-o", str(tmp_path / "run")]) == 0
    assert "digits_cnn has randomly initialised weights" in capsys.readouterr().err
