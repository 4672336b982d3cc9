"""What a user runs into: bad output paths, overwrites, edited plans, unclear inputs -- one clear line each."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

import pytest

from deepshare_convert.cli.app import run


def _fails_one_line(capsys, argv, needle: str) -> str:
    """Run the CLI; it must exit 2 with a single `deepshare: error:` line containing ``needle``."""
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("deepshare: error:") and err.count("\n") == 1, err
    assert needle in err, err
    return err


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory nothing can be written into (simulated for root, who ignores mode bits)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and Path(os.path.abspath(dir)).is_relative_to(ro):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    yield ro


# ---- item 3: write failures are user errors, found before any work -------------------------------
@pytest.mark.parametrize("where", ["file", "under_file", "read_only"])
def test_convert_bad_output_is_one_line(capsys, tmp_path, read_only_dir, where):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    out = {"file": a_file, "under_file": a_file / "sub", "read_only": read_only_dir / "x"}[where]
    _fails_one_line(capsys, ["convert", "digits_cnn", "--budget", "10%", "-o", str(out)], str(out))


@pytest.mark.parametrize(
    "argv",
    [
        ["xor", "--quick"],
        ["retrain", "--recipe", "recipes/digits_demo.yaml"],
        ["demo"],
        ["snl", "digits_cnn", "--data", "digits", "--budget", "10%"],
    ],
    ids=["xor", "retrain", "demo", "snl"],
)
def test_long_commands_check_output_before_work(capsys, read_only_dir, monkeypatch, argv):
    """`xor --quick -o /read-only/x` used to train 71 s and then fail: now it fails at once."""
    import deepshare_convert.data as data
    import deepshare_convert.experiments.xor as xor

    def no_work(*a, **k):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(xor, "run_xor", no_work)
    monkeypatch.setattr(data, "load_dataset", no_work)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    _fails_one_line(capsys, [*argv, "-o", str(read_only_dir / "x")], "not writable")


def test_output_file_options_checked(capsys, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    _fails_one_line(capsys, ["export", "digits_cnn", "--onnx", str(a_file / "m.onnx")], "is a file")
    _fails_one_line(capsys, ["export", "digits_cnn", "--onnx", str(tmp_path)], "is an existing directory")
    _fails_one_line(capsys, ["calibrate", "--quick", "-o", str(a_file / "t.json")], "is a file")


def test_os_errors_are_user_errors(capsys):
    """A write that fails anyway (disk full, a race) is still one line, exit 2, not `internal error`."""
    from deepshare_convert.cli.errors import report

    for exc in (PermissionError(errno.EACCES, "Permission denied", "/x/y"),
                NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"),
                FileExistsError(errno.EEXIST, "File exists", "/f"),
                OSError(errno.EROFS, "Read-only file system", "/ro/x"),
                OSError(errno.ENOSPC, "No space left on device", "/full/x")):  # fmt: skip
        assert report(exc) == 2
        err = capsys.readouterr().err
        assert err.startswith("deepshare: error:") and exc.filename in err and err.count("\n") == 1


# ---- item 2: convert never overwrites silently; replacing is atomic ---------------------------------
def test_convert_refuses_non_empty_folder(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"drelus": 608}')
    _fails_one_line(capsys, ["convert", "digits_cnn", "--budget", "10%", "-o", str(out)], "--force")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_convert_force_replaces_whole_folder(capsys, tmp_path):
    from deepshare_convert.conversion.rewrite import load

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"drelus": 608}')
    assert run(["convert", "digits_cnn", "--budget", "10%", "-o", str(out), "--force", "--json"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "plan.json"]  # no stale results.json
    assert load(out).plan.budget == 614
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # no temp siblings left behind


def test_convert_into_empty_folder_is_fine(capsys, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert run(["convert", "digits_cnn", "--budget", "10%", "-o", str(out), "--json"]) == 0


@pytest.mark.parametrize("force", [False, True])
def test_concurrent_converts_never_mix_files(tmp_path, monkeypatch, force):
    """Two writers into one folder: without --force one is refused; with it, the last wins whole."""
    import threading

    import torch

    import deepshare_convert.conversion.rewrite as rw
    from deepshare_convert.errors import OutputError
    from deepshare_convert.models import load_model

    loaded = load_model("digits_cnn")
    spec = loaded.spec.to_dict()
    conv = {b: rw.convert(loaded.model, loaded.input_size, budget=b, spec=spec) for b in ("5%", "20%")}
    both_written = threading.Barrier(2, timeout=60)
    real_save = rw.save

    def save_then_wait(converted, out, plan=None):
        path = real_save(converted, out, plan)
        both_written.wait()  # both writers have passed the emptiness check and written their files
        return path

    monkeypatch.setattr(rw, "save", save_then_wait)
    out, errors = tmp_path / "shared", []

    def writer(budget):
        try:
            rw.save_new(conv[budget], out, force=force)
        except OutputError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=writer, args=(b,)) for b in conv]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == (0 if force else 1), errors
    monkeypatch.setattr(rw, "save", real_save)
    again = rw.load(out)  # weights and plan come from the same writer (load checks every mapping)
    winner = conv["5%" if again.plan.budget == conv["5%"].plan.budget else "20%"]
    x = torch.randn(4, *loaded.input_size)
    assert torch.equal(again.model(x), winner.model.eval()(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]


# ---- item 4: a hand-edited plan.json is refused, naming the field -----------------------------------
@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    from deepshare_convert.conversion.rewrite import convert, save_new
    from deepshare_convert.models import load_model

    loaded = load_model("digits_cnn")
    out = tmp_path_factory.mktemp("plan") / "conv"
    return save_new(convert(loaded.model, loaded.input_size, budget="10%", spec=loaded.spec.to_dict()), out)


def _edited(src: Path, dst: Path, edit) -> Path:
    import json
    import shutil

    shutil.copytree(src, dst)
    plan = json.loads((dst / "plan.json").read_text())
    edit(plan)
    (dst / "plan.json").write_text(json.dumps(plan))
    return dst


def _bump_prototypes(p):
    p["groups"][0]["prototypes"] += 1


def _bump_prototypes_and_count(p):  # a careful editor who also fixes the DReLU counts
    g = p["groups"][0]
    g["prototypes"] += 1
    g["drelus"] += g["shape"][1] * g["shape"][2]
    p["achieved_drelus"] += g["shape"][1] * g["shape"][2]


def _balanced_remap(p):  # consistent in itself, but not the mapping the weights were trained with
    from deepshare_convert.conversion.gates import balanced_mapping

    g = p["groups"][0]
    g["prototypes"] += 1
    g["mapping"] = balanced_mapping(g["shape"][0], g["prototypes"]).tolist()
    g.pop("drelus")
    p.pop("achieved_drelus")


def _set(path, value):
    def edit(p):
        node = p
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit,field",
    [
        (_bump_prototypes, "groups[0].mapping"),
        (_set(["groups", 0, "drelus"], 1), "groups[0].drelus"),
        (_bump_prototypes_and_count, "groups[0].mapping"),
        (_balanced_remap, "mapping"),
        (_set(["groups", 0, "mapping", 5], 99), "groups[0].mapping"),
        (_set(["groups", 0, "mapping", 5], -1), "groups[0].mapping"),
        (_set(["groups", 0, "prototypes"], 0), "groups[0].mapping"),  # a linear group maps nothing
        (_set(["groups", 0, "prototypes"], -1), "groups[0].prototypes"),
        (_set(["groups", 0, "prototypes"], 1000), "groups[0].prototypes"),
        (_set(["groups", 1, "shape"], [32, 8, 4]), "groups[1].shape"),
        (_set(["sites", 0, "relus"], 1), "sites[0].relus"),
        (_set(["total_relus"], 7000), "total_relus"),
        (_set(["achieved_drelus"], 1), "achieved_drelus"),
        (_set(["kept"], ["nosuch"]), "kept"),
        (_set(["groups", 0, "sites"], ["nosuch"]), "groups[0].sites"),
    ],
)
def test_edited_plan_is_refused(capsys, converted_dir, tmp_path, edit, field):
    from deepshare_convert.conversion.rewrite import load
    from deepshare_convert.errors import PlanError

    bad = _edited(converted_dir, tmp_path / "bad", edit)
    with pytest.raises(PlanError, match=re.escape(field)):
        load(bad)
    _fails_one_line(capsys, ["inspect", str(bad)], field)


def test_unedited_plan_still_loads(converted_dir):
    from deepshare_convert.conversion.rewrite import load

    assert load(converted_dir).plan.achieved <= 614


# ---- item 7: messages that say what is wrong -------------------------------------------------------
def test_inspect_missing_file_says_not_found(capsys, tmp_path):
    _fails_one_line(capsys, ["inspect", str(tmp_path / "nonexistent.pt")], "file not found")
    _fails_one_line(capsys, ["inspect", "./nosuch/model"], "file not found")
    _fails_one_line(capsys, ["inspect", "resnet2O"], "did you mean")  # a name stays a name


def test_inspect_of_a_weights_file_points_to_directory_or_weights(capsys, converted_dir, tmp_path):
    err = _fails_one_line(capsys, ["inspect", str(converted_dir / "model.safetensors")], str(converted_dir))
    assert "--trust-pickle" not in err
    loose = tmp_path / "w.safetensors"
    loose.write_bytes((converted_dir / "model.safetensors").read_bytes())
    err = _fails_one_line(capsys, ["inspect", str(loose)], "--weights")
    assert "--trust-pickle" not in err


@pytest.mark.parametrize("argv", [["inspect", "digits_cnn", "--weights", "{f}"], ["inspect", "{f}", "--trust-pickle"]])
def test_random_bytes_pt_is_one_clear_line(capsys, tmp_path, argv):
    bad = tmp_path / "rand.pt"
    bad.write_bytes(bytes(range(256)) * 8)
    err = _fails_one_line(capsys, [a.format(f=bad) for a in argv], "not a")
    assert "PyTorch 2.6" not in err and "weights_only" not in err and "MARK" not in err


def test_zip_without_torch_records_is_one_clear_line(capsys, tmp_path):
    import zipfile

    bad = tmp_path / "z.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("a/data.pkl", b"garbage")
    err = _fails_one_line(capsys, ["inspect", "digits_cnn", "--weights", str(bad)], "damaged")
    assert "hasRecord" not in err and "enhancement request" not in err


@pytest.mark.parametrize("budget,hint", [("0.5", "did you mean 0.5%"), ("2.5", "did you mean 2.5%")])
def test_fractional_budget_suggests_percent(capsys, tmp_path, budget, hint):
    _fails_one_line(capsys, ["convert", "digits_cnn", "--budget", budget, "-o", str(tmp_path / "o")], hint)


def _folder(root: Path, size, mode, classes=("a", "b")) -> str:
    from PIL import Image

    for split in ("train", "test"):
        for k, cls in enumerate(classes):
            for i in range(2):
                p = root / split / cls / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new(mode, size, (40 * k + i) if mode == "L" else (10, 20 + k, 30 + i)).save(p)
    return f"imagefolder:{root}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSHARE_CACHE", str(tmp_path / "cache"))


def test_private_infer_on_mismatched_data_names_both_shapes(capsys, cache, converted_dir, tmp_path):
    data = _folder(tmp_path / "rgb", (32, 32), "RGB")
    err = _fails_one_line(capsys, ["private-infer", str(converted_dir), "--data", data, "--batch-size", "2"], "1×8×8")
    assert "3×32×32" in err and "mean/std" not in err


def test_evaluate_on_mismatched_data_names_both_shapes(capsys, cache, tmp_path):
    data = _folder(tmp_path / "rgb", (32, 32), "RGB")
    err = _fails_one_line(capsys, ["evaluate", "digits_cnn", "--data", data], "1×8×8")
    assert "3×32×32" in err and "--input-size" in err


def test_evaluate_warns_when_classes_differ(capsys, cache, tmp_path):
    data = _folder(tmp_path / "gray", (8, 8), "L")
    assert run(["evaluate", "digits_cnn", "--data", data, "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "10 outputs" in captured.err and "2 classes" in captured.err
    assert json.loads(captured.out)["n"] == 4  # --json output stays clean


@pytest.mark.parametrize("flag,value,hint", [("--bandwidth", "10", "10Mbps"), ("--rtt", "1", "1ms")])
def test_latency_units_are_required(capsys, flag, value, hint):
    _fails_one_line(capsys, ["estimate-latency", "digits_cnn", flag, value], hint)


def test_latency_units_accept_bit_spellings():
    from deepshare_convert.mpc.units import parse_bandwidth, parse_duration

    assert parse_bandwidth("10Mbit") == parse_bandwidth("10Mbps") == parse_bandwidth("10 Mbit/s") == 1e7
    assert parse_bandwidth("1GB/s") == 8e9 and parse_duration("1ms") == parse_duration("1000us") == 1e-3
    assert parse_bandwidth(1e9) == 1e9 and parse_duration(0.001) == 0.001  # Python numbers: bit/s and s


# ---- a run killed after writing its settings, before its first checkpoint --------------------------
def _stale_partial_outputs(out: Path) -> None:
    """What a kill between the settings file and the first checkpoint can leave behind."""
    (out / "metrics.jsonl").write_text('{"epoch": 0, "loss": 99.0}\n')
    (out / "results.json").write_text('{"original_acc": -1.0}')


def test_snl_resume_before_first_checkpoint_starts_over(tmp_path):
    """The bench calls resume_snl whenever snl_run.json exists; it used to fail with `no checkpoint`."""
    from deepshare_convert.conversion.plan import write_json_atomic
    from deepshare_convert.snl import RUN_FILE, SNLConfig, resume_snl, run_snl

    settings = dict(model="digits_cnn", data="digits", budget="10%", max_steps=4, batch_size=64, limit=256,
                    test_limit=64, warmup_epochs=0)  # fmt: skip
    straight = run_snl(SNLConfig(**settings), tmp_path / "straight")
    killed = tmp_path / "killed"
    killed.mkdir()
    write_json_atomic(killed / RUN_FILE, SNLConfig(**settings).validate().to_dict())  # as run_snl writes it
    _stale_partial_outputs(killed)
    resumed = resume_snl(killed)
    untimed = lambda r: {k: v for k, v in r.results.items() if "wall" not in k}  # noqa: E731
    assert resumed.counts == straight.counts and untimed(resumed) == untimed(straight)
    lines = [(d / "metrics.jsonl").read_text().splitlines() for d in (killed, tmp_path / "straight")]
    assert len(lines[0]) == len(lines[1])  # the stale line is gone
    assert (killed / "checkpoint.pt").is_file()


def test_snl_cli_resume_before_first_checkpoint(tmp_path, capsys):
    from deepshare_convert.conversion.plan import write_json_atomic
    from deepshare_convert.snl import RUN_FILE, SNLConfig

    out = tmp_path / "killed"
    out.mkdir()
    write_json_atomic(out / RUN_FILE, SNLConfig(model="digits_cnn", data="digits", budget="90%", max_steps=2,
                                                batch_size=64, limit=128, test_limit=64).validate().to_dict())  # fmt: skip
    run(["snl", "--resume", str(out), "--json"])
    assert "no checkpoint" not in capsys.readouterr().err
    assert (out / "snl_counts.json").is_file()


def test_retrain_resume_before_first_checkpoint_starts_over(tmp_path):
    from deepshare_convert.recipes import dump_recipe, recipe_from_dict
    from deepshare_convert.training.retrain import RECIPE_FILE, resume, retrain

    recipe = recipe_from_dict(dict(
        name="tiny", seed=1, model={"name": "digits_cnn"}, data={"spec": "digits", "limit": 128, "test_limit": 64},
        conversion={"budget": "10%"},
        phases=[{"kind": "pretrain", "steps": 2, "batch_size": 64, "lr": {"start": 0.05}},
                {"kind": "finetune", "steps": 2, "batch_size": 64, "lr": {"start": 0.01}}],
    ))  # fmt: skip
    straight = retrain(recipe, tmp_path / "straight").results
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / RECIPE_FILE).write_text(dump_recipe(recipe))  # as retrain writes it
    _stale_partial_outputs(killed)
    resumed = resume(killed).results
    assert resumed == straight
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (killed / "model.safetensors").read_bytes() == a


# ---- item 8: ReLUs that leaf modules call as functions are counted -------------------------------
def _gated_model():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class GatedBlock(nn.Module):
        """Data-dependent control flow (fx cannot enter it) around functional ReLUs."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            if float(y.abs().sum()) >= 0:  # always true, but only at run time
                y = torch.relu(y) + F.relu(-y).relu()  # three functional ReLUs of 4x6x6
            return self.act(y)  # and one module ReLU

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.block = GatedBlock()
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.head(self.block(F.relu(self.stem(x))).flatten(1))

    return Net().eval()


def test_functional_relus_inside_leaves_are_counted():
    from deepshare_convert.conversion.census import census

    from .handmade import hook_count_relus

    model = _gated_model()
    c = census(model, (1, 6, 6), leaf_modules=["GatedBlock"])
    assert c.hidden_relus == 4 * 144  # 3 functional + 1 module ReLU, each 4x6x6
    assert c.total_relus == hook_count_relus(model, (1, 6, 6))
    assert {h["module"] for h in c.hidden} == {"block", "block.act"}


# ---- item 10: cosmetics ------------------------------------------------------------------------------
def test_xor_quick_is_the_same_with_and_without_config():
    from deepshare_convert.experiments.xor import load_xor_config

    root = Path(__file__).resolve().parents[1]
    built_in, shipped = load_xor_config(None, quick=True), load_xor_config(root / "recipes" / "xor.yaml", quick=True)
    assert (built_in.seeds, built_in.epochs) == (shipped.seeds, shipped.epochs)


def test_converted_files_share_one_mode(capsys, tmp_path):
    out = tmp_path / "c"
    assert run(["convert", "digits_cnn", "--budget", "10%", "-o", str(out), "--json"]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["plan.json"] == 0o644, modes


def test_convert_without_weights_says_they_are_random(capsys, tmp_path):
    assert run(["convert", "digits_cnn", "--budget", "10%", "-o", str(tmp_path / "c"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "random" in captured.err and "--weights" in captured.err
    json.loads(captured.out)  # stdout stays pure JSON


def test_non_tty_tables_keep_site_names(tmp_path):
    """Piped output used to be cut at 80 columns, long site names ending in an ellipsis."""
    import subprocess
    import sys

    def piped(**extra) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra)
        done = subprocess.run([sys.executable, "-m", "deepshare_convert.cli.app", "inspect", "resnet20"],
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    wide = piped()
    assert "layer3_2_relu2" in wide and "layer3.2.relu2" in wide and "…" not in wide
    assert "…" not in piped(COLUMNS="80")  # a narrow pipe wraps names, it does not cut them


def test_untraceable_top_level_does_not_suggest_leaf():
    """--leaf makes a *submodule* opaque; for the model's own forward it cannot help."""
    import torch
    import torch.nn as nn

    from deepshare_convert.conversion.census import census
    from deepshare_convert.errors import TraceError

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x)) if x.sum() > 0 else self.fc(x)

    with pytest.raises(TraceError) as info:
        census(Branchy(), (4,))
    assert "--leaf Branchy" not in str(info.value) and "submodule" in str(info.value)


def test_snl_progress_lines_are_whole_at_80_columns(monkeypatch):
    """The SNL log printed `lambda …` on a line of its own and the bar cut the count to `2400…`."""
    import io

    from rich.console import Console

    import deepshare_convert.cli.progress as progress
    from deepshare_convert.cli.snl_commands import SNLReporter

    buf = io.StringIO()
    monkeypatch.setattr(progress, "err_console", Console(file=buf, width=80, highlight=False))
    reporter = SNLReporter()
    reporter.start("search", total=4000)
    reporter.advance({"loss": 0.1234, "live": 2400, "budget": 614, "lambda": 1.2e-5})
    reporter.epoch({"kind": "search", "epoch": 12, "loss": 0.1234, "train_acc": 97.5, "test_acc": 96.25,
                    "live": 2400, "budget": 614, "lambda": 1.2e-5})  # fmt: skip
    reporter.stop()
    lines = buf.getvalue().splitlines()
    assert "…" not in buf.getvalue(), buf.getvalue()
    assert any("2,400/614" in ln and "1.20e-05" in ln for ln in lines), lines  # the epoch line, whole
    assert any("2,400/614" in ln and "1/4000" in ln for ln in lines), lines  # the bar and its counts, uncut
