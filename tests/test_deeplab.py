"""DeepLabV3 (segmentation): the model forms, census/convert/export, and real two-party inference.

The MPC path needs bilinear upsampling and pooling on shares (mpc/resample.py: public separable
maps, local to each party); a ReLU backbone (timm resnet18/resnet10t) at a small input keeps the
two-party runs to seconds. The MobileNetV2 built-in's ReLU6s are two ReLU sites each (activation kinds).
"""

from __future__ import annotations

import functools
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepshare_convert import load_model
from deepshare_convert.conversion.census import census
from deepshare_convert.conversion.rewrite import convert
from deepshare_convert.errors import DeepShareError
from deepshare_convert.models.batchnorm import recalibrate_batchnorm

from .timm_cache import run_with_cached_resnet18

HAS_CRYPTEN = importlib.util.find_spec("crypten") is not None
SMALL = (3, 32, 48)


def _relu_hook_count(model: nn.Module, input_size, cls: type[nn.Module] = nn.ReLU) -> int:
    """Independent count: elements out of every ``cls`` module (nn.ReLU) in one forward."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out[0].numel()))
             for m in model.modules() if type(m) is cls]  # fmt: skip
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return sum(seen)


# ---- the model -----------------------------------------------------------------------------------
def test_builtin_mobilenetv2_shapes_and_head_census():
    loaded = load_model("deeplabv3_mobilenetv2")
    assert loaded.input_size == (3, 180, 240) and loaded.mean == (0.485, 0.456, 0.406)
    with torch.no_grad():
        assert loaded.model(loaded.example_input()).shape == (1, 11, 180, 240)
    c = census(loaded.model, loaded.input_size)
    head = _relu_hook_count(loaded.model, loaded.input_size)
    relu6 = _relu_hook_count(loaded.model, loaded.input_size, nn.ReLU6)
    # the ASPP head at 12x15 (OS 16): four 256-channel branches, the 1x1 pooled branch, the projection
    assert head == 5 * 256 * 12 * 15 + 256
    assert c.total_relus == head + 2 * relu6 and relu6 > 0  # MobileNetV2's ReLU6: two comparisons each
    assert loaded.model.backbone.feature_info.reduction()[-1] == 16


def test_builtin_mobilenetv2_identity_at_p_equals_c_float64():
    loaded = load_model("deeplabv3_mobilenetv2", input_size="3,64,96")
    model = loaded.model.double().eval()
    size = (3, 64, 96)
    conv = convert(model, size, budget=census(model, size).total_relus, group_size=1)
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(conv.model(x), model(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("spec,stride", [("deeplabv3:resnet18", 16), ("deeplabv3-os8:resnet10t", 8)])
def test_any_timm_backbone_by_spec(spec, stride):
    from deepshare_convert.models import ModelSpec

    loaded = load_model(spec, input_size="3,32,48", num_classes=5)
    assert loaded.spec.source == "deeplabv3" and loaded.spec.kwargs == {"output_stride": stride}
    assert ModelSpec.from_dict(json.loads(json.dumps(loaded.spec.to_dict()))).display == spec
    assert loaded.model.backbone.feature_info.reduction()[-1] == stride
    with torch.no_grad():
        assert loaded.model(torch.randn(2, *SMALL)).shape == (2, 5, 32, 48)
    total = census(loaded.model, SMALL).total_relus
    assert total == _relu_hook_count(loaded.model, SMALL)


@pytest.mark.parametrize("spec,words", [("deeplabv3:resnet1800", "unknown timm backbone"),
                                        ("deeplabv3:", "name a timm backbone")])  # fmt: skip
def test_bad_deeplab_specs_are_one_line_errors(spec, words):
    with pytest.raises(DeepShareError, match=words) as e:
        load_model(spec)
    assert "\n" not in str(e.value)


def test_pretrained_is_refused_for_other_builtins_only():
    from deepshare_convert.errors import WeightsError

    with pytest.raises(WeightsError, match="DeepLabV3"):
        load_model("resnet20", pretrained=True)


def test_pretrained_backbone_from_timms_cache_offline(tmp_path):
    """--pretrained on a DeepLabV3 spec loads timm's weights into the backbone, via timm's cache (offline)."""
    r = run_with_cached_resnet18(tmp_path, """
        body = load_model("deeplabv3:resnet18", pretrained=True).model.backbone.state_dict()
        ref = reference.state_dict()
        assert len(body) > 50 and all(torch.equal(v, ref[k]) for k, v in body.items())
        print("ok")
        """)  # fmt: skip
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_cli_inspect_builtin_json(capsys):
    from deepshare_convert.cli.app import run as cli

    assert cli(["inspect", "deeplabv3_mobilenetv2", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["total_relus"] >= 5 * 256 * 12 * 15 + 256
    assert "randomly initialised" in captured.err and "--pretrained" in captured.err  # its backbone can have timm's


# ---- conversion and export -------------------------------------------------------------------------
def test_identity_at_p_equals_c_float64():
    loaded = load_model("deeplabv3:resnet10t", input_size="3,32,48")
    model = loaded.model.double().eval()
    total = census(model, SMALL).total_relus
    conv = convert(model, SMALL, budget=total, group_size=1)
    assert all(g.prototypes == g.channels for g in conv.plan.groups)
    x = torch.randn(2, *SMALL, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(conv.model(x), model(x), rtol=0, atol=1e-10)


def test_convert_save_load_round_trip(tmp_path):
    from deepshare_convert.conversion.rewrite import load, save

    loaded = load_model("deeplabv3:resnet10t", input_size="3,32,48", num_classes=4)
    conv = convert(loaded.model, SMALL, budget="10%", spec=loaded.spec.to_dict())
    out = save(conv, tmp_path / "seg")
    back = load(out)
    x = torch.randn(1, *SMALL)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x), conv.model(x))
    assert back.plan.achieved == conv.plan.achieved


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_converted_deeplab_exports_to_onnx(tmp_path):
    from deepshare_convert.export_onnx import export_onnx

    loaded = load_model("deeplabv3:resnet10t", input_size="3,32,48")
    conv = convert(loaded.model, SMALL, budget="10%", spec=loaded.spec.to_dict())
    report = export_onnx(conv.model, SMALL, tmp_path / "seg.onnx")
    assert report.max_abs_error <= 1e-4 and report.op_counts.get("Resize", 0) == 2


# ---- resampling as public linear maps (plaintext) ---------------------------------------------------
@pytest.mark.parametrize("mode,align", [("bilinear", False), ("bilinear", True), ("bicubic", False),
                                        ("nearest", None), ("nearest-exact", None)])  # fmt: skip
@pytest.mark.parametrize("how", [dict(size=(13, 9)), dict(size=(3, 4)), dict(scale_factor=2.5)])
def test_interpolate_is_the_separable_map(mode, align, how):
    from deepshare_convert.mpc.resample import apply_separable, as_selection, interpolate_matrices

    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    kw = {} if align is None else {"align_corners": align}
    y = F.interpolate(x, mode=mode, **how, **kw)
    a_h, a_w = interpolate_matrices((5, 7), y.shape[-2:], mode, align, how.get("scale_factor"))
    torch.testing.assert_close(apply_separable(x, a_h, a_w), y, rtol=0, atol=1e-12)
    if mode.startswith("nearest"):  # a gather of shares: no arithmetic, no truncation
        assert as_selection(a_h) is not None and as_selection(a_w) is not None


def test_uneven_adaptive_pool_is_the_separable_map():
    from deepshare_convert.mpc.resample import adaptive_pool_matrices, apply_separable

    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(apply_separable(x, *adaptive_pool_matrices((5, 7), (3, 2))),
                               F.adaptive_avg_pool2d(x, (3, 2)), rtol=0, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("k,s,p,ceil,incl", [(2, 2, 0, True, False), (3, 2, 1, False, False), (3, 2, 1, True, True),
                                        ((3, 2), (2, 1), 1, True, False)])  # fmt: skip
def test_uneven_avg_pool_is_the_separable_map(k, s, p, ceil, incl):
    from deepshare_convert.mpc.resample import apply_separable, avg_pool_matrices

    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    torch.testing.assert_close(apply_separable(x, *avg_pool_matrices((7, 10), k, s, p, ceil, incl)),
                               F.avg_pool2d(x, k, s, p, ceil, incl), rtol=0, atol=1e-12)  # fmt: skip


def test_antialiased_resize_is_refused_by_the_lowering():
    from deepshare_convert.mpc.lowering import lower, prepare

    class Down(nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=(2, 3), mode="bilinear", antialias=True)

    with pytest.raises(DeepShareError, match="antialias") as e:
        lower(prepare(Down()), (1, 3, 8, 8), "public")
    assert "\n" not in str(e.value)


def test_module_subclass_with_its_own_forward_is_refused():
    """timm's AvgPool2dSame pads before pooling: lowering it as a plain nn.AvgPool2d would be silently wrong."""
    from deepshare_convert.mpc.lowering import lower, prepare

    class PadFirst(nn.AvgPool2d):
        def forward(self, x):
            return super().forward(F.pad(x, (0, 1, 0, 1)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = PadFirst(2, 1)

        def forward(self, x):
            return self.pool(x)

    from deepshare_convert.conversion.tracing import register_leaf_module

    register_leaf_module(PadFirst)
    with pytest.raises(DeepShareError, match="'pool'.*not supported on secret shares"):
        lower(prepare(Net()), (1, 3, 8, 8), "public")


def test_dilated_timm_same_avg_pool_becomes_traceable_ops():
    from deepshare_convert.mpc.lowering import prepare

    loaded = load_model("deeplabv3:resnet10t", input_size="3,32,48")
    gm = prepare(loaded.model, precision_bits=None)
    assert not [m for m in gm.modules() if type(m).__module__.startswith("timm")]
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), loaded.model(x), rtol=1e-4, atol=1e-5)


# ---- real two-party inference -----------------------------------------------------------------------
@functools.cache
def _seg_model(budget: str | None):
    torch.manual_seed(0)
    loaded = load_model("deeplabv3:resnet10t", input_size="3,32,48")  # its avg-pools use ceil_mode, excluded pad
    net = recalibrate_batchnorm(loaded.model, SMALL, batch=16, seed=0)
    if budget is None:
        return net, None
    conv = convert(net, SMALL, budget=budget, spec=loaded.spec.to_dict())
    return conv.model, conv.plan


def _input_with_margin(converted: nn.Module) -> torch.Tensor:
    """Of 16 random images, the one whose gate inputs stay farthest from zero (as tests/test_mpc.py picks):
    a prototype within the 2^-16 grid of zero may take the other side in MPC and move all its replicas."""
    from .test_mpc import gate_margins

    pool = torch.randn((16, *SMALL), generator=torch.Generator().manual_seed(4))
    best = int(gate_margins(converted, pool).argmax())
    return pool[best : best + 1]


@pytest.mark.skipif(not HAS_CRYPTEN, reason="crypten not installed")
@pytest.mark.parametrize("budget", [None, "10%"])
def test_two_party_segmentation_agrees_and_costs_exactly(budget, record_property):
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party
    from deepshare_convert.mpc.prepare import prepare, reference

    net, plan = _seg_model(budget)
    x = _input_with_margin(_seg_model("10%")[0])
    r = run_two_party(net, x, weights_mode="public", timeout=300)
    clear = reference(prepare(net), x).numpy()
    assert r.logits.shape == clear.shape == (1, 11, 32, 48)
    error = np.abs(r.logits - clear).max()
    same = r.logits.argmax(1) == clear.argmax(1)
    top2 = np.sort(clear, axis=1)
    decided = top2[:, -1] - top2[:, -2] > 2 * error  # pixels MPC's rounding cannot flip
    record_property(f"budget_{budget}", {"max_logit_error": float(error), "agreement": float(same.mean()),
                                         "bytes": r.parties[0].bytes, "rounds": r.parties[0].rounds})  # fmt: skip
    assert error <= 1e-2 and decided.mean() >= 0.995
    assert same[decided].all(), "a pixel with a clear plaintext winner changed label"
    # near-ties sit on class boundaries (upsampled from 2x3 here); either label is right there, and MPC's
    # random truncation picks one: overall agreement is >= 99.9% only up to them (a few of 1,536 pixels)
    assert same.mean() >= 0.999 - (~decided).mean()
    assert np.ptp(clear, axis=1).min() > 1e-3, "flat logits would make the agreement vacuous"
    est = estimate(net, SMALL, batch=1, weights_mode="public")
    assert (est.bytes, est.rounds) == (r.parties[0].bytes, r.parties[0].rounds)
    relus = census(net, SMALL).total_relus if plan is None else plan.achieved
    maxpool = 8 * _relu_hook_count(net, SMALL, nn.MaxPool2d)  # the stem's 3x3 max-pool: a tree of 8 comparisons
    assert r.parties[0].comparisons == r.parties[1].comparisons == relus + maxpool


class _Resamplers(nn.Module):
    """nearest and align_corners=True upsampling, nn.Upsample, uneven adaptive and ceil-mode pools, on shares."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.pool = nn.AdaptiveAvgPool2d((3, 5))
        self.avg = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)

    def forward(self, x):
        y = self.avg(torch.relu(self.conv(x)))  # 6x7 -> 3x4
        a = F.interpolate(y, size=(9, 11), mode="bilinear", align_corners=True)
        b = F.interpolate(self.up(y), size=x.shape[-2:], mode="nearest")
        return torch.cat([self.pool(a), self.pool(b)], dim=1)


@pytest.mark.skipif(not HAS_CRYPTEN, reason="crypten not installed")
def test_other_resampling_runs_on_shares_without_communication():
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party
    from deepshare_convert.mpc.lowering import lower, prepare

    torch.manual_seed(5)
    net = _Resamplers().eval()
    x = torch.randn((2, 3, 6, 7), generator=torch.Generator().manual_seed(6))
    r = run_two_party(net, x, weights_mode="public", timeout=300)
    assert r.max_logit_error <= 1e-3
    est = estimate(net, (3, 6, 7), batch=2, weights_mode="public")
    assert (est.bytes, est.rounds) == (r.parties[0].bytes, r.parties[0].rounds)
    program = lower(prepare(net), (2, 3, 6, 7), "public")
    resampling = [o.node for o in program.ops if o.handler in ("interpolate", "adaptive_avgpool", "avgpool")]
    measured = r.parties[0].per_node
    assert len(resampling) == 6 and all(measured[n]["bytes"] == measured[n]["rounds"] == 0 for n in resampling)
