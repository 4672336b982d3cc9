"""Model files that carry their architecture: torch.export .pt2, ONNX (onnx2torch); TorchScript refused."""

from __future__ import annotations

import json
import warnings
import zipfile

import pytest
import torch

from deepshare_convert import load_model
from deepshare_convert.cli.app import run
from deepshare_convert.conversion.census import census
from deepshare_convert.conversion.rewrite import convert, load, save
from deepshare_convert.errors import DeepShareError
from deepshare_convert.models.formats import METADATA_NAME, normalisation_json

from .conftest import CIFAR10_JPG, RESNET20_WEIGHTS, needs

R20_RELUS = 188_416
ONNX_OPSET = 17  # one opset here; tests/test_onnx_import.py covers the files torch writes at opsets 13-20


def _digits():
    return load_model("digits_cnn").model.eval()


def _resnet20():
    return load_model("resnet20", weights=RESNET20_WEIGHTS).model.eval()


def _save_pt2(model, size, path, extra=None):
    ep = torch.export.export(model, (torch.randn(1, *size),))
    torch.export.save(ep, str(path), extra_files=extra)
    return str(path)


def _save_onnx(model, size, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *size),), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})  # fmt: skip
    return str(path)


def _onnx_available():
    try:
        from deepshare_convert.compat import import_onnx2torch

        import_onnx2torch()
    except ImportError:
        return False
    return True


needs_onnx2torch = pytest.mark.skipif(not _onnx_available(), reason="onnx2torch (deepshare[onnx-import]) missing")
FORMATS = ["pt2", pytest.param("onnx", marks=needs_onnx2torch)]


def _save(form, model, size, path):
    return (_save_pt2 if form == "pt2" else _save_onnx)(model, size, path / f"m.{form}")


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("deepshare: error: "), err
    return err[0]


@pytest.mark.parametrize("form", FORMATS)
def test_digits_file_census_identity_and_round_trip(tmp_path, form):
    eager = _digits()
    path = _save(form, eager, (1, 8, 8), tmp_path)
    loaded = load_model(path)  # no --input-size: the file says 1x8x8
    assert loaded.input_size == (1, 8, 8)
    assert loaded.spec.to_dict()["source"] == form and loaded.spec.name == str((tmp_path / f"m.{form}").resolve())
    mine, theirs = census(loaded.model, (1, 8, 8)), census(eager, (1, 8, 8))
    assert mine.total_relus == theirs.total_relus and [s.shape for s in mine.sites] == [s.shape for s in theirs.sites]

    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    full = convert(loaded.model, (1, 8, 8), budget="100%", group_size=1, spec=loaded.spec.to_dict())
    assert all(g.prototypes == g.channels for g in full.plan.groups)  # P = C: the identity
    with torch.no_grad():
        err = (full.model.double()(x) - loaded.model.double()(x)).abs().max().item()
    assert err == 0.0, err  # float64: x * DReLU(x) is ReLU exactly

    loaded.model.float()
    conv = convert(loaded.model, (1, 8, 8), budget="50%", spec=loaded.spec.to_dict())
    assert conv.plan.achieved <= conv.plan.budget
    save(conv, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["model"]["source"] == form
    back = load(tmp_path / "out")  # re-reads the .pt2 / .onnx named in the plan
    with torch.no_grad():
        assert torch.equal(back.model(x.float()), conv.model(x.float()))
    assert census(back.model, (1, 8, 8)).total_relus == conv.plan.achieved


@needs(RESNET20_WEIGHTS)
@pytest.mark.parametrize("form", FORMATS)
def test_resnet20_file_census_convert_identity(tmp_path, form, capsys):
    eager = _resnet20()
    path = _save(form, eager, (3, 32, 32), tmp_path)
    assert run(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_relus"] == R20_RELUS  # as the eager ResNet-20
    out = tmp_path / "conv"
    assert run(["convert", path, "--budget", "12k", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["achieved_drelus"] <= 12_000
    assert run(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_relus"] <= 12_000

    loaded = load_model(path)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    full = convert(loaded.model, (3, 32, 32), budget="100%", group_size=1)
    with torch.no_grad():
        assert (full.model.double()(x) - loaded.model.double()(x)).abs().max().item() == 0.0  # P = C, float64
        # the file is the model (ONNX export folds BatchNorm into the convolutions: rounding only)
        assert (loaded.model(x) - eager.double()(x)).abs().max().item() < (1e-12 if form == "pt2" else 1e-4)


@needs(RESNET20_WEIGHTS)
@needs(CIFAR10_JPG)
def test_evaluate_pt2_with_recorded_normalisation(tmp_path, capsys):
    """The ResNet-20 weights expect ImageNet statistics: recorded in the .pt2, evaluate matches the eager model."""
    meta = {METADATA_NAME: normalisation_json((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    path = _save_pt2(_resnet20(), (3, 32, 32), tmp_path / "r20.pt2", extra=meta)
    assert load_model(path).mean == (0.485, 0.456, 0.406)
    args = ["--data", "cifar10-jpg", "--limit", "500", "--json"]
    assert run(["evaluate", path, *args]) == 0
    mine = json.loads(capsys.readouterr().out)["top1"]
    assert run(["evaluate", "resnet20", "--weights", str(RESNET20_WEIGHTS), *args]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == mine


def test_torchscript_refused_in_one_line(tmp_path, capsys):
    model = _digits()
    path = tmp_path / "ts.pt"
    torch.jit.trace(model, torch.randn(1, 1, 8, 8)).save(str(path))
    assert run(["inspect", str(path)]) == 2
    line = _one_error_line(capsys)
    assert "TorchScript" in line and "torch.export" in line and "--weights" in line
    with pytest.raises(DeepShareError, match="TorchScript"):  # even with --trust-pickle: it is not a pickle
        load_model(str(path), trust_pickle=True, input_size="1,8,8")


@pytest.mark.parametrize("name", ["junk.pt2", "junk.onnx", "junk.bin"])
def test_random_bytes_one_line(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())  # fmt: skip
    assert run(["inspect", str(path)]) == 2
    _one_error_line(capsys)


def test_damaged_pt2_one_line(tmp_path, capsys):
    good = _save_pt2(_digits(), (1, 8, 8), tmp_path / "good.pt2")
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / "bad.pt2", "w") as out:
        for name in z.namelist():
            if not name.endswith("model.json"):
                out.writestr(name, z.read(name))
    truncated = tmp_path / "cut.pt2"
    truncated.write_bytes((tmp_path / "good.pt2").read_bytes()[:2000])
    for path in (tmp_path / "bad.pt2", truncated):
        assert run(["inspect", str(path)]) == 2
        assert "not a readable torch.export archive" in _one_error_line(capsys)


def test_input_size_must_match_the_file(tmp_path, capsys):
    path = _save_pt2(_digits(), (1, 8, 8), tmp_path / "d.pt2")
    assert load_model(path, input_size="1,8,8").input_size == (1, 8, 8)
    assert run(["inspect", path, "--input-size", "1,16,16"]) == 2
    assert "whose input is 1,8,8" in _one_error_line(capsys)


@needs_onnx2torch
def test_damaged_onnx_one_line(tmp_path, capsys):
    good = _save_onnx(_digits(), (1, 8, 8), tmp_path / "good.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(open(good, "rb").read()[:500])
    assert run(["inspect", str(cut)]) == 2
    assert "not a readable ONNX model" in _one_error_line(capsys)


def test_onnx_without_onnx2torch_names_the_extra(tmp_path, monkeypatch, capsys):
    import deepshare_convert.compat as compat

    def missing():
        raise ImportError("No module named 'onnx2torch'")

    monkeypatch.setattr(compat, "import_onnx2torch", missing)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"whatever")
    assert run(["inspect", str(path)]) == 2
    assert "pip install 'deepshare[onnx-import]'" in _one_error_line(capsys)


def test_retraining_a_pt2_is_refused(tmp_path, capsys):
    path = _save_pt2(_digits(), (1, 8, 8), tmp_path / "d.pt2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: pt2
model: {{name: {path}}}
data: {{spec: digits}}
conversion: {{budget: 50%}}
phases:
  - {{kind: finetune, epochs: 1, batch_size: 64, lr: {{start: 0.01}}}}
""")
    assert run(["retrain", "--recipe", str(recipe), "-o", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    assert "cannot retrain" in line and "frozen in eval mode" in line


# ---- private inference of a converted .pt2 (ATen graph: conv2d, batch_norm folded, add, slice, pad, ...) ----
def test_pt2_prepare_folds_aten_batchnorm(tmp_path):
    from deepshare_convert.mpc.lowering import lower, prepare

    eager = _digits()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the fold has something to do
        for m in eager.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    loaded = load_model(_save_pt2(eager, (1, 8, 8), tmp_path / "d.pt2"))
    conv = convert(loaded.model, (1, 8, 8), budget="50%")
    deployed = prepare(conv.model, precision_bits=None)
    assert not [n for n in deployed.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert (deployed(x) - conv.model(x)).abs().max().item() < 1e-4
    assert lower(prepare(conv.model), (4, 1, 8, 8)).comparisons == 4 * conv.plan.achieved


@pytest.mark.parametrize("mode", ["public", "private"])
def test_pt2_two_party_run_agrees_with_plaintext(tmp_path, mode):
    from deepshare_convert.mpc.launcher import run_two_party

    loaded = load_model(_save_pt2(_digits(), (1, 8, 8), tmp_path / "d.pt2"))
    conv = convert(loaded.model, (1, 8, 8), budget="50%")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    run = run_two_party(conv.model, x, weights_mode=mode, timeout=300)
    assert run.top1_agreement == 1.0 and run.max_logit_error < 1e-2
    assert run.comparisons_expected == 4 * conv.plan.achieved == run.parties[0].comparisons


@needs(RESNET20_WEIGHTS)
@needs_onnx2torch
def test_onnx_resnet20_costs_what_the_eager_one_costs(tmp_path):
    """onnx2torch's Add / Slice / PadDynamic / GlobalAveragePool become torch calls the lowering knows:
    the converted .onnx ResNet-20 lowers to the eager model's exact bytes, rounds and comparisons."""
    from deepshare_convert.mpc.costs import estimate

    eager = _resnet20()
    loaded = load_model(_save_onnx(eager, (3, 32, 32), tmp_path / "r20.onnx"))
    assert not [n for n in loaded.model.graph.nodes if n.op == "call_module"
                and type(loaded.model.get_submodule(n.target)).__name__.startswith("Onnx")]  # fmt: skip
    got = estimate(convert(loaded.model, (3, 32, 32), budget="12k").model, (3, 32, 32))
    want = estimate(convert(eager, (3, 32, 32), budget="12k").model, (3, 32, 32))
    assert (got.bytes, got.rounds) == (want.bytes, want.rounds) == (8_184_912, 90)  # 100 before sites rode with their gates


@needs_onnx2torch
def test_onnx_two_party_run_agrees_with_plaintext(tmp_path):
    from deepshare_convert.mpc.launcher import run_two_party

    loaded = load_model(_save_onnx(_digits(), (1, 8, 8), tmp_path / "d.onnx"))
    conv = convert(loaded.model, (1, 8, 8), budget="50%")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    run = run_two_party(conv.model, x, timeout=300)
    assert run.top1_agreement == 1.0 and run.max_logit_error < 1e-2
    assert run.parties[0].comparisons == 4 * conv.plan.achieved


def test_onnx_slice_and_pad_constants_translate():
    from deepshare_convert.models.formats import _onnx_pads, _onnx_slices

    t = torch.tensor
    x = torch.arange(2 * 4 * 6 * 6).reshape(2, 4, 6, 6)
    index = _onnx_slices(t([0, 0]), t([2**63 - 1, 2**63 - 1]), t([2, 3]), t([2, 2]), ndim=4)
    assert torch.equal(x[index], x[:, :, ::2, ::2])
    assert _onnx_slices(t([5]), t([0]), t([1]), t([-1]), ndim=4) is None  # negative steps: left to the lowering
    # ONNX: begins of axes 0..3, then ends; F.pad: last axis first
    pads = _onnx_pads(t([0, 2, 0, 0, 0, 3, 0, 0]))
    assert pads == [0, 0, 0, 0, 2, 3] and torch.nn.functional.pad(x, pads).shape == (2, 9, 6, 6)


def test_trusted_pickle_takes_input_size_from_the_model(tmp_path, capsys):
    model = _digits()
    plain = tmp_path / "plain.pt"
    torch.save(model, plain)
    assert run(["inspect", str(plain), "--trust-pickle"]) == 2
    assert "--input-size" in _one_error_line(capsys)
    model.pretrained_cfg = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.25,)}  # as timm models carry it
    with_cfg = tmp_path / "cfg.pt"
    torch.save(model, with_cfg)
    loaded = load_model(str(with_cfg), trust_pickle=True)
    assert (loaded.input_size, loaded.mean, loaded.std) == ((1, 8, 8), (0.5,), (0.25,))


def test_torch_save_archive_named_pt2_is_treated_as_a_pickle(tmp_path, capsys):
    path = tmp_path / "weights.pt2"
    torch.save(_digits().state_dict(), path)
    assert run(["inspect", str(path)]) == 2
    assert "--weights" in _one_error_line(capsys)  # the weights-file advice, not "damaged torch.export archive"
