"""Model loading: every MODEL form, every weights format, and one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from deepshare_convert import load_model
from deepshare_convert.errors import DeepShareError, ModelNotFoundError, WeightsError
from deepshare_convert.models import load_state_dict_file

from .conftest import RESNET20_WEIGHTS, RESNET56_WEIGHTS, needs


def _outputs(model, size=(3, 32, 32)):
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def digits_state():
    return load_model("digits_cnn").model.state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd},
        lambda sd: {"model": {"state_dict": sd}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 90.0},
    ],
    ids=["flat", "state_dict", "model", "nested2", "dataparallel", "checkpoint"],
)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".th", ".bin"])
def test_weights_formats(tmp_path, digits_state, wrap, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(wrap(digits_state), path)
    loaded = load_model("digits_cnn", weights=path)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, digits_state[k]), k


def test_safetensors(tmp_path, digits_state):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in digits_state.items()}, str(path))
    loaded = load_model("digits_cnn", weights=path)
    assert torch.equal(loaded.model.fc.weight, digits_state["fc.weight"])


def test_full_module_pickle_needs_trust(tmp_path):
    model = load_model("digits_cnn").model
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(DeepShareError, match="--trust-pickle"):
        load_model(str(path), input_size="1,8,8")
    with pytest.raises(WeightsError, match="other than tensors"):
        load_model("digits_cnn", weights=path)
    loaded = load_model(str(path), input_size="1,8,8", trust_pickle=True)
    assert torch.equal(_outputs(loaded.model, (1, 8, 8)), _outputs(model, (1, 8, 8)))


@pytest.mark.parametrize(
    "content,match",
    [(b"", "not a readable"), (b"garbage" * 10, "not a readable"), (b"PK\x03\x04broken", "not a readable")],
)
def test_corrupt_weights(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        load_state_dict_file(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match="safetensors"):
        load_state_dict_file(bad)


def test_missing_weights_file():
    with pytest.raises(WeightsError, match="not found"):
        load_model("digits_cnn", weights="/nope/w.pt")


def test_shape_mismatch_is_one_line(tmp_path, digits_state):
    digits_state["fc.weight"] = torch.zeros(3, 64)
    path = tmp_path / "w.pt"
    torch.save(digits_state, path)
    with pytest.raises(WeightsError, match=r"shape mismatch \(fc.weight: file \(3, 64\) vs model \(10, 64\)\)") as e:
        load_model("digits_cnn", weights=path)
    assert "\n" not in str(e.value)


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ModelNotFoundError, match="did you mean .*resnet20"):
        load_model("resnet2O")
    with pytest.raises(ModelNotFoundError, match="timm:resnet18"):
        load_model("timm:resnet18x")
    with pytest.raises(ModelNotFoundError, match="cannot import"):
        load_model("no_such_pkg.models:make")


def test_entrypoint(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def make(num_classes=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes), nn.ReLU())\n"
        "def not_a_model():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("mymodels:make", input_size="3,2,2", num_classes=5)
    assert loaded.spec.source == "entrypoint" and loaded.model[1].out_features == 5
    with pytest.raises(ModelNotFoundError, match="not an nn.Module"):
        load_model("mymodels:not_a_model", input_size="3,2,2")
    with pytest.raises(DeepShareError, match="--input-size"):
        load_model("mymodels:make")


def test_timm_model_and_num_classes():
    loaded = load_model("timm:resnet18", num_classes=7, input_size="3,32,32")
    assert loaded.model.fc.out_features == 7 and loaded.input_size == (3, 32, 32)
    assert loaded.spec.to_dict()["name"] == "resnet18"


@pytest.mark.parametrize("bad", ["3,x,32", "0,32,32", ""])
def test_bad_input_size(bad):
    with pytest.raises(DeepShareError, match="--input-size"):
        load_model("digits_cnn", input_size=bad)


@needs(RESNET20_WEIGHTS)
def test_shared_resnet20_loads_strictly():
    raw = torch.load(RESNET20_WEIGHTS, map_location="cpu", weights_only=True)["state_dict"]
    loaded = load_model("resnet20", weights=RESNET20_WEIGHTS)
    own = loaded.model.state_dict()
    assert {f"module.{k}" for k in own if not k.endswith("num_batches_tracked")} == set(raw)
    assert torch.equal(own["linear.weight"], raw["module.linear.weight"])


@needs(RESNET56_WEIGHTS)
def test_shared_resnet56_loads_and_wrong_depth_fails():
    load_model("resnet56", weights=RESNET56_WEIGHTS)
    with pytest.raises(WeightsError, match="unexpected"):
        load_model("resnet20", weights=RESNET56_WEIGHTS)
