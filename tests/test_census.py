"""The census must count every ReLU exactly, on built-ins, timm models and hand-made models."""

from __future__ import annotations

import pytest
import torch.nn as nn

from deepshare_convert import census, load_model
from deepshare_convert.conversion.tracing import trace
from deepshare_convert.errors import TraceError

from .handmade import HANDMADE, hook_count_relus

# (model, input size or None for the default, exact ReLUs) -- the paper's and the CIFAR ResNets' counts
BUILTIN_COUNTS = [
    ("resnet18_cifar", None, 491_520),
    ("resnet18_cifar", "3,64,64", 1_966_080),
    ("wrn22_8", None, 1_359_872),
    ("resnet20", None, 188_416),
    ("resnet32", None, 303_104),
    ("resnet44", None, 417_792),
    ("resnet56", None, 532_480),
    ("digits_cnn", None, 6_144),
    ("xor_mlp", None, 2),
]


@pytest.mark.parametrize("name,size,expected", BUILTIN_COUNTS)
def test_builtin_counts(name, size, expected):
    loaded = load_model(name, input_size=size)
    c = census(loaded.model, loaded.input_size)
    assert c.total_relus == expected
    assert c.total_relus == hook_count_relus(loaded.model, loaded.input_size)
    assert c.hidden == []


TIMM_MODELS = [
    # name, sites expected to be found, other nonlinearity expected (or None)
    ("resnet18", True, "MaxPool2d"),
    ("resnet50", True, "MaxPool2d"),
    ("wide_resnet50_2", True, "MaxPool2d"),
    ("regnetx_002", True, None),
    ("densenet121", True, "MaxPool2d"),
    ("vgg11", True, "MaxPool2d"),
    ("mobilenetv2_100", True, None),  # ReLU6: two ReLU sites each (tests/test_relu6.py)
    ("efficientnet_b0", False, "SiLU"),
]


@pytest.mark.parametrize("name,has_relu,other", TIMM_MODELS)
def test_timm_counts_match_hooks(name, has_relu, other):
    loaded = load_model(f"timm:{name}", input_size="3,32,32", num_classes=10)
    c = census(loaded.model, loaded.input_size)
    assert c.total_relus == hook_count_relus(loaded.model, loaded.input_size)
    assert (c.site_relus > 0) == has_relu
    if other:
        assert other in {o.op for o in c.other_nonlinearities}
    # site names are unique and stable across two traces
    again = census(loaded.model, loaded.input_size)
    assert [s.name for s in c.sites] == [s.name for s in again.sites]
    assert len({s.name for s in c.sites}) == len(c.sites)


def test_timm_norm_act_relus_become_sites():
    """timm's BatchNormAct2d hides its ReLU from fx; the census splits it so the ReLU is a site."""
    loaded = load_model("timm:densenet121", input_size="3,32,32", num_classes=10)
    c = census(loaded.model, loaded.input_size)
    assert c.hidden == [] and len(c.sites) == 121
    assert any(s.module.endswith("norm1.act") for s in c.sites)


def test_vgg_head_relus_reported_as_hidden():
    """vgg's ConvMlp has shape-dependent control flow: it stays a leaf and its ReLUs are listed."""
    loaded = load_model("timm:vgg11", input_size="3,32,32", num_classes=10)
    c = census(loaded.model, loaded.input_size)
    assert [h["module"] for h in c.hidden] == ["pre_logits.act1", "pre_logits.act2"]
    assert c.total_relus == c.site_relus + c.hidden_relus


@pytest.mark.parametrize("key", sorted(HANDMADE))
def test_handmade_counts(key):
    cls, size = HANDMADE[key]
    model = cls().eval()
    c = census(model, size)
    assert c.total_relus == hook_count_relus(model, size)


def test_site_details_functional():
    cls, size = HANDMADE["functional"]
    c = census(cls(), size)
    kinds = [s.kind for s in c.sites]
    assert kinds == ["function", "function", "method", "function", "function", "method"]
    assert [s.inplace for s in c.sites] == [False, False, False, True, True, True]
    assert c.sites[0].shape == (8, 8, 8) and c.sites[0].relus == 512
    assert c.sites[-1].shape == (5,) and c.sites[-1].relus == 5


def test_reused_module_is_several_sites():
    cls, size = HANDMADE["reused"]
    c = census(cls(), size)
    assert [s.module for s in c.sites] == ["act", "act", "act"]
    assert [s.relus for s in c.sites] == [6 * 64, 6 * 16, 4]


def test_container_module_paths():
    cls, size = HANDMADE["containers"]
    c = census(cls(), size)
    assert [s.module for s in c.sites] == ["acts.0", "acts.1", "acts.2", "heads.a.2"]


def test_census_json_shape():
    loaded = load_model("resnet20")
    d = census(loaded.model, loaded.input_size, name="resnet20").to_dict()
    assert d["model"] == "resnet20" and d["input_size"] == [3, 32, 32]
    assert d["total_relus"] == 188_416 == sum(s["relus"] for s in d["sites"])
    assert set(d["sites"][0]) == {"name", "module", "kind", "shape", "relus", "inplace", "activation", "origin"}
    assert d["sites"][0]["activation"] == "relu"


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.inner(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


def test_trace_error_names_module_and_suggests_leaf():
    with pytest.raises(TraceError, match=r"module 'inner' \(Branchy\).*--leaf Branchy"):
        trace(Untraceable())
    c = census(Untraceable(), (3, 4, 4), leaf_modules=["Branchy"])
    assert c.total_relus == 48


def test_shape_error_names_node_without_traceback(capfd):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(TraceError, match=r"at node _3 \(module 3\) for input size \(3, 8, 8\): mat1 and mat2"):
        census(model, (3, 8, 8))
    assert "Traceback" not in capfd.readouterr().err
