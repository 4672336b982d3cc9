"""The CLI: JSON output, one-line errors with non-zero exits, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepshare_convert.cli.app import run

from .conftest import CIFAR10_JPG, RESNET20_WEIGHTS, needs


def _json(capsys, argv):
    assert run(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_paper_counts(capsys):
    assert _json(capsys, ["inspect", "resnet18_cifar", "--json"])["total_relus"] == 491_520
    assert _json(capsys, ["inspect", "resnet18_cifar", "--json", "--input-size", "3,64,64"])["total_relus"] == 1_966_080
    assert _json(capsys, ["inspect", "wrn22_8", "--json"])["total_relus"] == 1_359_872


@needs(RESNET20_WEIGHTS)
def test_inspect_shared_resnet20(capsys):
    d = _json(capsys, ["inspect", "resnet20", "--weights", str(RESNET20_WEIGHTS), "--json"])
    assert d["total_relus"] == 188_416 and len(d["sites"]) == 19


def test_inspect_table(capsys):
    assert run(["inspect", "digits_cnn"]) == 0
    out = capsys.readouterr().out
    assert "6,144" in out and "features_2" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["inspect", "resnet2O"], "did you mean"),
        (["inspect", "resnet20", "--weights", "/nope.pt"], "not found"),
        (["inspect", "resnet20", "--input-size", "3,a"], "--input-size"),
        (["inspect", "timm:not_a_model_xyz"], "unknown timm model"),
        (["evaluate", "digits_cnn", "--data", "nosuch"], "unknown dataset"),
    ],
)
def test_errors_are_one_line(capsys, argv, needle):
    code = run(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_usage_error_exit_code(capsys):
    assert run(["inspect"]) == 2
    assert run(["nosuchcommand"]) == 2


def test_models_lists_builtins(capsys):
    names = {m["name"] for m in _json(capsys, ["models", "--json"])}
    assert {"resnet18_cifar", "wrn22_8", "resnet20", "resnet56", "digits_cnn", "xor_mlp"} <= names


def test_console_script_subprocess(tmp_path):
    """The installed entry point: exit code and stderr of a real process."""
    exe = [sys.executable, "-m", "deepshare_convert.cli.app"]
    ok = subprocess.run([*exe, "inspect", "xor_mlp", "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["total_relus"] == 2
    bad = subprocess.run([*exe, "inspect", "nosuch"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("deepshare: error: unknown model")


@needs(RESNET20_WEIGHTS)
@needs(CIFAR10_JPG)
def test_evaluate_shared_resnet20_on_shared_cifar10(capsys):
    """The third-party weights load strictly and score what their README says (81.0%)."""
    d = _json(capsys, ["evaluate", "resnet20", "--weights", str(RESNET20_WEIGHTS), "--data", "cifar10-jpg", "--json"])
    assert d["n"] == 10_000
    assert 80.5 < d["top1"] < 81.5


def test_cli_reference_is_current():
    """docs/cli.md is generated from the app; regenerate with python -m deepshare_convert.cli.reference."""
    from pathlib import Path

    from deepshare_convert.cli.reference import render

    committed = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert committed == render(), "docs/cli.md is stale: python -m deepshare_convert.cli.reference > docs/cli.md"
