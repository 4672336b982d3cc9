"""Every command speaks the same CLI (options, batch name, --json, errors, help)."""

from __future__ import annotations

import json
import re

import pytest
import typer
import yaml

from deepshare_convert.cli.app import app, run

MODEL_COMMANDS = ("inspect", "convert", "evaluate", "estimate-latency", "export", "private-infer", "snl", "analyze")
MODEL_OPTIONS = {"--weights", "--input-size", "--num-classes", "--leaf", "--trust-pickle", "--pretrained"}


def _commands():
    root = typer.main.get_command(app)
    return {name: root.get_command(None, name) for name in root.list_commands(None)}


def _opts(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_command_takes_the_same_model_options(name):
    assert MODEL_OPTIONS <= _opts(_commands()[name]), MODEL_OPTIONS - _opts(_commands()[name])


def test_one_batch_option_name_and_json_everywhere():
    for name, cmd in _commands().items():
        opts = _opts(cmd)
        assert not opts & {"--batch", "--num", "-n", "--num-private"}, (name, opts)
        assert "--json" in opts, name
    for name in ("evaluate", "estimate-latency", "export", "private-infer", "snl", "demo"):
        assert "--batch-size" in _opts(_commands()[name]), name


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "digits_cnn", "--bogus"], "no such option: --bogus (see `deepshare inspect --help`)"),
    (["convert"], "missing argument 'MODEL'"),
    (["inspect", "digits_cnn", "--json", "true"], "unexpected extra argument"),
    (["evaluate", "digits_cnn", "--data", "digits", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["inspect", "digits_cnn", "--leaf", "Conv2D"], "--leaf Conv2D: the model has no module of class 'Conv2D'; "
                                                    "did you mean Conv2d?"),
])  # fmt: skip
def test_usage_errors_are_one_line(capsys, argv, needle):
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("deepshare: error:") and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize("name", ["convert", "retrain", "estimate-latency", "calibrate", "demo"])
def test_help_shows_defaults_and_plain_flags(capsys, monkeypatch, name):
    monkeypatch.setenv("COLUMNS", "200")
    assert run([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "{model}" not in out and "Output directory ." not in out
    assert not re.search(r"--json\s+<", out)
    if name in ("convert", "estimate-latency"):
        # typer >= 0.2x braces a required argument in usage: {MODEL}; the name itself is MODEL
        assert re.search(rf"deepshare {name} \[OPTIONS\] {{?MODEL}}?", out), out[:300]
    if name == "convert":
        assert re.search(r"Output directory\. \[default: \(?out/MODEL-BUDGET\)?\]", out)
    if name in ("estimate-latency", "calibrate"):
        assert re.search(r"\[default: \(?the package's cost_table\.json\)?\]", out)


def test_converted_dir_refuses_model_options(capsys, tmp_path):
    assert run(["convert", "digits_cnn", "--budget", "10%", "-o", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert run(["estimate-latency", str(tmp_path / "c"), "--weights", "w.pt"]) == 2
    assert "--weights does not apply to" in capsys.readouterr().err
    assert run(["inspect", str(tmp_path / "c"), "--input-size", "3,32,32"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert run(["estimate-latency", str(tmp_path / "c"), "--input-size", "1,8,8", "--batch-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["batch"] == 2


def test_leaf_reaches_the_mpc_lowering(capsys):
    """--leaf on estimate-latency traces the class as one call; the lowering then names it (no trace error)."""
    code = run(["estimate-latency", "resnet20", "--leaf", "BasicBlockA"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "module 'layer1.0' (BasicBlockA)) under MPC: not supported" in err, err


def test_export_and_private_infer_take_input_size_for_entry_points(capsys, tmp_path):
    """An entry-point model without a size: export needed --input-size and had no such option."""
    onnx = tmp_path / "m.onnx"
    assert run(["export", "deepshare_convert.models.small:digits_cnn", "--onnx", str(onnx)]) == 2
    assert "--input-size" in capsys.readouterr().err
    assert run(["export", "deepshare_convert.models.small:digits_cnn", "--input-size", "1,8,8",
                "--onnx", str(onnx), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["max_abs_error"] < 1e-4


def test_retrain_json(capsys, tmp_path):
    recipe = dict(
        name="tiny", seed=1, model={"name": "digits_cnn"}, data={"spec": "digits", "limit": 256},
        conversion={"budget": "10%"},
        phases=[{"kind": "pretrain", "epochs": 1, "batch_size": 64, "lr": {"start": 0.05}},
                {"kind": "finetune", "steps": 3, "batch_size": 64, "lr": {"start": 0.01}}],
    )  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run(["retrain", "--recipe", str(path), "-o", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # stdout is JSON only: progress and notes went to stderr
    assert out["out"] == str(tmp_path / "run") and out["drelus"] <= 614 and "final_acc" in out


def test_snl_takes_the_model_options(capsys, tmp_path):
    """snl had no --leaf/--input-size/--trust-pickle/--pretrained; a typo in --leaf fails before any training."""
    argv = ["snl", "digits_cnn", "--data", "digits", "--budget", "10%", "-o", str(tmp_path / "s")]
    assert run([*argv, "--leaf", "Conv2D"]) == 2
    assert "did you mean Conv2d?" in capsys.readouterr().err
    assert run([*argv, "--input-size", "3,32,32"]) == 2
    assert "does not match digits" in capsys.readouterr().err
    assert run([*argv, "--pretrained"]) == 2
    assert "timm:NAME models only" in capsys.readouterr().err
