"""ONNX files as torch 2.13 writes them (opsets 13-20, both exporters) load, convert and match the .pt2 route;
the converters added for onnx2torch agree with onnxruntime; an op without one fails in one line naming the node."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deepshare_convert import convert, inspect, load_model
from deepshare_convert.errors import DeepShareError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")
from onnx import TensorProto, helper  # noqa: E402

R20_RELUS = 188_416
EXPORTS = {  # how a user writes the file: torch.onnx.export(model, (x,), f, **kwargs)
    "default-opset": {"dynamo": False},  # opset 20 with torch 2.13
    "opset-18": {"dynamo": False, "opset_version": 18},
    "opset-13": {"dynamo": False, "opset_version": 13},
    "dynamo": {},  # torch's default exporter (onnxscript), opset 20
}


def _export_onnx(model, x, path, **kwargs) -> str:
    with warnings.catch_warnings():  # the exporters' own notes are the user's, not deepshare's
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return str(path)


def _export_pt2(model, x, path) -> str:
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(path))
    return str(path)


def _converted(path):
    loaded = load_model(path)
    torch.manual_seed(0)
    return loaded, convert(loaded.model, loaded.input_size, budget="12k", spec=loaded.spec.to_dict())


def _run(model, x):
    with torch.no_grad():  # a batch of 4, though the dynamo exporter wrote the example's batch of 1 into a Reshape
        return model(x)


@pytest.fixture(scope="module")
def resnet20_files(tmp_path_factory):
    from deepshare_convert.models.cifar_resnet import resnet20

    torch.manual_seed(0)
    model = resnet20().eval()  # random weights: the routes must agree whatever they are
    root = tmp_path_factory.mktemp("r20")
    x = torch.randn(1, 3, 32, 32)
    files = {name: _export_onnx(model, x, root / f"{name}.onnx", **kw) for name, kw in EXPORTS.items()}
    files["pt2"] = _export_pt2(model, torch.randn(2, 3, 32, 32), root / "r20.pt2")
    return model, files


@pytest.mark.parametrize("export", list(EXPORTS))
def test_resnet20_onnx_census_convert_and_pt2_agreement(resnet20_files, export):
    model, files = resnet20_files
    proto = onnx.load(files[export])
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == {"default-opset": 20, "opset-18": 18, "opset-13": 13, "dynamo": 20}[export]

    loaded, conv = _converted(files[export])
    assert loaded.input_size == (3, 32, 32)
    assert inspect(loaded.model, loaded.input_size).total_relus == R20_RELUS
    _, conv_pt2 = _converted(files["pt2"])
    assert conv.plan.achieved == conv_pt2.plan.achieved <= 12_000

    x = torch.randn(4, 3, 32, 32)
    assert (_run(loaded.model, x) - _run(model, x)).abs().max().item() <= 1e-4  # BatchNorm folded by the exporter
    err = (_run(conv.model, x) - _run(conv_pt2.model, x)).abs().max().item()
    assert err <= 1e-5, err


def test_timm_resnet18_default_opset_matches_torch(tmp_path):
    from deepshare_convert.compat import import_timm

    torch.manual_seed(0)
    model = import_timm().create_model("resnet18", pretrained=False).eval()
    path = _export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "r18.onnx", dynamo=False)
    assert next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")) == 20
    loaded, conv = _converted(path)
    _, conv_pt2 = _converted(_export_pt2(model, torch.randn(2, 3, 64, 64), tmp_path / "r18.pt2"))

    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        eager, mine = model(x), loaded.model(x)
        assert eager.abs().max() > 0.05  # a real signal, not random weights' near-zero logits
        assert (mine - eager).abs().max().item() <= 1e-5
        assert (conv.model(x) - conv_pt2.model(x)).abs().max().item() <= 1e-5
    assert conv.plan.achieved == conv_pt2.plan.achieved <= 12_000


# ---- the added converters against onnxruntime ----------------------------------------------------
def _model(nodes, opset, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ints(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


CASES = {
    "Pad-18 axes": lambda: _model(
        [helper.make_node("Pad", ["x", "pads", "v", "axes"], ["y"], mode="constant")], 18, [_vi("x", [1, 2, 3, 4])],
        [_vi("y", [1, 7, 3, 5])], [_ints("pads", [1, 2, 0, 3]), helper.make_tensor("v", TensorProto.FLOAT, [], [1.5]),
                           _ints("axes", [-1, 1])]),
    "Pad-19 reflect": lambda: _model(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")], 19, [_vi("x", [1, 2, 3, 4])],
        [_vi("y", [1, 2, 6, 7])], [_ints("pads", [0, 0, 1, 2, 0, 0, 2, 1])]),
    "ReduceMax-18 negative axes": lambda: _model(
        [helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0)], 18, [_vi("x", [2, 3, 4, 5])],
        [_vi("y", [2, 4])], [_ints("axes", [-1, 1])]),
    "ReduceMean-18 no axes": lambda: _model(
        [helper.make_node("ReduceMean", ["x"], ["y"], keepdims=1)], 18, [_vi("x", [2, 3, 4])], [_vi("y", [1, 1, 1])]),
    "ReduceSumSquare-18 noop": lambda: _model(
        [helper.make_node("ReduceSumSquare", ["x", "axes"], ["y"], noop_with_empty_axes=1)], 18,
        [_vi("x", [2, 3])], [_vi("y", [2, 3])], [_ints("axes", [])]),
    "ReduceL1-18 noop": lambda: _model(
        [helper.make_node("ReduceL1", ["x"], ["y"], noop_with_empty_axes=1)], 18, [_vi("x", [2, 3])],
        [_vi("y", [2, 3])]),
    "ReduceMean-18 axes keepdims=0": lambda: _model(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], 18, [_vi("x", [2, 3, 4, 5])],
        [_vi("y", [2, 3])], [_ints("axes", [2, -1])]),
    "Resize-19 nearest": lambda: _model(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", nearest_mode="floor",
                          coordinate_transformation_mode="asymmetric")], 19, [_vi("x", [1, 2, 3, 4])],
        [_vi("y", [1, 2, 6, 8])], [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])]),
    "AveragePool-19": lambda: _model(
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2])], 19, [_vi("x", [1, 2, 3, 4])],
        [_vi("y", [1, 2, 2, 3])]),
    "Split-18 num_outputs uneven": lambda: _model(
        [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)], 18, [_vi("x", [2, 7])],
        [_vi("a", [2, 3]), _vi("b", [2, 3]), _vi("c", [2, 1])]),
    "Reshape-19 allowzero": lambda: _model(
        [helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)], 19, [_vi("x", [2, 3, 4])], [_vi("y", [2, 12])],
        [_ints("s", [2, -1])]),
    "Reshape-21 zero copies": lambda: _model(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], 21, [_vi("x", [2, 3, 4])], [_vi("y", [2, 12])],
        [_ints("s", [0, 12])]),
    "Constant/Cast/Identity/Flatten-21": lambda: _model(
        [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", TensorProto.DOUBLE, [1], [2.0])),
         helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "cf"], ["m"]),
         helper.make_node("Identity", ["m"], ["i"]), helper.make_node("Flatten", ["i"], ["y"], axis=1)],
        21, [_vi("x", [2, 3, 4])], [_vi("y", [2, 12])]),
    "ConstantOfShape-20 Shape-19": lambda: _model(
        [helper.make_node("Shape", ["x"], ["s"], start=1),
         helper.make_node("ConstantOfShape", ["s"], ["z"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [3.0])),
         helper.make_node("Add", ["x", "z"], ["y"])], 20, [_vi("x", [2, 3, 4])], [_vi("y", [2, 3, 4])]),
    "Slice-1 BatchNormalization-7 (opset 7)": lambda: _model(
        [helper.make_node("Slice", ["x"], ["s"], starts=[1], ends=[3], axes=[3]),
         helper.make_node("BatchNormalization", ["s", "g", "b", "m", "v"], ["y"], epsilon=1e-5)], 7,
        [_vi("x", [1, 2, 3, 4])], [_vi("y", [1, 2, 3, 2])],
        [helper.make_tensor(n, TensorProto.FLOAT, [2], vals) for n, vals in
         (("g", [1.0, 2.0]), ("b", [0.5, -0.5]), ("m", [0.1, 0.2]), ("v", [1.0, 4.0]))]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_added_converter_agrees_with_onnxruntime(case):
    ort = pytest.importorskip("onnxruntime")
    from onnx2torch import convert as onnx2torch_convert

    from deepshare_convert.models.onnx_converters import register

    register()
    proto = CASES[case]()
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})
    with torch.no_grad():
        got = onnx2torch_convert(proto).eval()(torch.from_numpy(x))
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert [tuple(g.shape) for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)


# ---- what cannot be converted says so in one line --------------------------------------------
def _image_model(op_node, opset, tmp_path, out_shape):
    proto = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"), op_node], opset, [_vi("x", [1, 3, 8, 8])],
                   [_vi("y", out_shape)])  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    return str(path)


def test_operator_without_converter_names_node_version_and_pt2(tmp_path):
    path = _image_model(helper.make_node("Hardmax", ["r"], ["y"], name="the_hardmax"), 20, tmp_path, [1, 3, 8, 8])
    with pytest.raises(DeepShareError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message
    assert "'the_hardmax'" in message and "Hardmax version 13" in message and "opset 20" in message
    assert "torch.export.save" in message and ".pt2" in message


def test_refused_new_attribute_names_it(tmp_path):
    node = helper.make_node("AveragePool", ["r"], ["y"], name="dilated", kernel_shape=[2, 2], dilations=[2, 2])
    with pytest.raises(DeepShareError, match=r"'dilated' \(AveragePool version 19, opset 19\): attribute dilations"):
        load_model(_image_model(node, 19, tmp_path, [1, 3, 6, 6]))


# ---- import is silent --------------------------------------------------------------------------
def test_cli_inspect_and_convert_print_no_third_party_warnings(resnet20_files, tmp_path):
    """onnx2torch's deprecation warnings (slice.py) are logged, not printed: stderr has only deepshare's lines."""
    _, files = resnet20_files
    exe = [str(Path(sys.executable).with_name("deepshare"))]
    if not Path(exe[0]).exists():
        exe = [sys.executable, "-m", "deepshare_convert.cli.app"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    for args in (["inspect", files["default-opset"]], ["convert", files["default-opset"], "--budget", "12k", "-o",
                                                        str(tmp_path / "out")]):  # fmt: skip
        proc = subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "188,416" in proc.stdout
        foreign = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("deepshare")]
        assert foreign == [], foreign
    debug = subprocess.run([*exe, "inspect", files["default-opset"]], capture_output=True, text=True, timeout=300,
                           env={**env, "DEEPSHARE_DEBUG": "1"})  # fmt: skip
    assert debug.returncode == 0
    assert "deepshare: debug: " in debug.stderr and "UserWarning" in debug.stderr  # captured, shown on request
