"""ONNX export: the shared gate lowered to standard ops, checked by onnx.checker and onnxruntime."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from deepshare_convert.conversion.gates import SharedGate
from deepshare_convert.errors import DeepShareError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx / onnxruntime not installed",
)


def _converted(name: str, budget: str):
    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import convert

    torch.manual_seed(0)
    loaded = load_model(name)
    conv = convert(loaded.model, loaded.input_size, budget=budget, spec=loaded.spec.to_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in conv.model.modules():
            if isinstance(m, SharedGate):
                m.alpha.uniform_(0.5, 1.5, generator=g)
                m.beta.uniform_(-0.1, 0.1, generator=g)
    return conv, loaded


@pytest.mark.parametrize("name,budget", [("digits_cnn", "10%"), ("resnet20", "15k")])
def test_converted_model_exports_to_standard_ops(tmp_path, name, budget):
    import onnx

    from deepshare_convert.export_onnx import export_onnx

    conv, loaded = _converted(name, budget)
    report = export_onnx(conv.model, loaded.input_size, tmp_path / "m.onnx", batch=2)
    assert report.max_abs_error <= 1e-5
    ops = report.op_counts
    # one comparison (GreaterOrEqual + Cast) per group; a Gather per group whose map is not the identity
    groups = len(conv.plan.groups)
    replicated = sum(1 for g in conv.plan.groups if g.prototypes < g.channels)
    assert ops.get("GreaterOrEqual") == groups and ops.get("Cast", 0) >= groups
    assert ops.get("Gather", 0) == replicated > 0
    domains = {n.domain for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert domains <= {""}, f"custom op domains in the graph: {domains}"


def test_exported_model_matches_on_other_inputs(tmp_path):
    """The check inside export_onnx uses one batch; the graph must hold for any input."""
    import onnxruntime as ort

    from deepshare_convert.export_onnx import export_onnx

    conv, loaded = _converted("digits_cnn", "10%")
    export_onnx(conv.model, loaded.input_size, tmp_path / "m.onnx", batch=3)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn((3, *loaded.input_size), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = conv.model.eval()(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() <= 1e-5


def test_original_model_exports(tmp_path):
    from deepshare_convert import load_model
    from deepshare_convert.export_onnx import export_onnx

    loaded = load_model("digits_cnn")
    report = export_onnx(loaded.model, loaded.input_size, tmp_path / "o.onnx")
    assert report.max_abs_error <= 1e-5 and "GreaterOrEqual" not in report.op_counts


def test_export_after_crypten_import(tmp_path):
    """compat.patch_crypten aliases a torch.onnx module: exporting afterwards must still work."""
    if importlib.util.find_spec("crypten") is None:
        pytest.skip("crypten not installed")
    from deepshare_convert.compat import import_crypten
    from deepshare_convert.export_onnx import export_onnx

    import_crypten()
    conv, loaded = _converted("digits_cnn", "10%")
    assert export_onnx(conv.model, loaded.input_size, tmp_path / "c.onnx").max_abs_error <= 1e-5


def test_bad_opset_is_one_line_error(tmp_path):
    from deepshare_convert.export_onnx import export_onnx

    conv, loaded = _converted("digits_cnn", "10%")
    with pytest.raises(DeepShareError, match="opset") as e:
        export_onnx(conv.model, loaded.input_size, tmp_path / "x.onnx", opset=9)
    assert "\n" not in str(e.value)


def test_cli_export(tmp_path, capsys):
    import json

    from deepshare_convert.cli.app import run as cli
    from deepshare_convert.conversion.rewrite import save

    conv, _ = _converted("digits_cnn", "10%")
    out = save(conv, tmp_path / "d")
    assert cli(["export", str(out), "--onnx", str(tmp_path / "d.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_error"] <= 1e-5 and (tmp_path / "d.onnx").is_file()
