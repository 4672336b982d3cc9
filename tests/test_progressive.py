"""The mechanisms of the progressive recipe: straight-through gates, blended sharing, data-fitted pi,
the progressive phase (census = plan at its end, resume), the lr schedule, and real training on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from deepshare_convert.conversion.census import census
from deepshare_convert.conversion.fitting import channel_distortion, fit_sharing
from deepshare_convert.conversion.gates import PrototypeGate, SharedGate, ste_gate, step_gate
from deepshare_convert.conversion.rewrite import convert, load
from deepshare_convert.recipes import RecipeError, recipe_from_dict
from deepshare_convert.training.engine import Interrupted
from deepshare_convert.training.phases import ProgressivePhase
from deepshare_convert.training.retrain import resume, retrain
from deepshare_convert.training.schedules import lr_at


def test_ste_gate_forward_is_step_backward_is_gaussian_density():
    x = torch.linspace(-3, 3, 41, dtype=torch.float64, requires_grad=True)
    y = ste_gate(x, 4.0)
    assert torch.equal(y, step_gate(x.detach()))
    y.sum().backward()
    expected = 4.0 * torch.exp(-0.5 * (4.0 * x.detach()) ** 2) / math.sqrt(2 * math.pi)
    assert torch.allclose(x.grad, expected)
    # d/dx Phi(gamma x): the surrogate is the GELU gate's own derivative
    z = x.detach().clone().requires_grad_(True)
    (0.5 * (1 + torch.erf(4.0 * z / math.sqrt(2)))).sum().backward()
    assert torch.allclose(x.grad, z.grad)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3)).double()  # fmt: skip
    model.eval()
    return model


def test_blending_at_zero_is_the_original_and_at_one_the_shared_gate():
    model = _tiny()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    conv = convert(model, x, budget=2 * 16, group_size=2).model.double().eval()
    sites = [m for m in conv.modules() if isinstance(m, SharedGate)]
    with torch.no_grad():
        for m in sites:
            m.alpha.uniform_(-1, 1)
            m.beta.uniform_(-1, 1)
        shared = conv(x)
        for m in sites:
            m.blending = True
            m.blend.zero_()
        assert torch.equal(conv(x), model(x))  # t = 0 everywhere: exactly the original ReLUs
        for m in sites:
            m.blend.fill_(1.0)
        assert torch.allclose(conv(x), shared)


def test_fit_sharing_keeps_prototypes_and_beats_the_naive_map():
    model = _tiny()
    images = torch.randn(64, 2, 4, 4, dtype=torch.float64)
    conv = convert(model, images, budget=2 * 16, group_size=2)
    gm = conv.model.double().eval()
    summary = fit_sharing(gm, conv.plan, images)
    assert summary["fitted_agreement"] >= summary["naive_agreement"]
    for g in conv.plan.groups:
        gate = next(m for n, m in gm.named_modules() if n.endswith(f"g{g.index}") and isinstance(m, PrototypeGate))
        assert gate.mapping.tolist() == g.mapping
        assert g.mapping[: g.prototypes] == list(range(g.prototypes))
        assert all(0 <= p < g.prototypes for p in g.mapping)
        lead = gm.get_submodule(f"deepshare_sites.{g.leader}")
        assert torch.equal(lead.alpha[: g.prototypes].detach(), torch.ones(g.prototypes, dtype=lead.alpha.dtype))
        assert torch.equal(lead.beta[: g.prototypes].detach(), torch.zeros(g.prototypes, dtype=lead.beta.dtype))
    d = channel_distortion(gm, images)  # leader prototypes reproduce their own ReLU exactly
    g0 = conv.plan.groups[0]
    assert torch.allclose(d[g0.leader][: g0.prototypes], torch.zeros(g0.prototypes, dtype=torch.float64))


def test_fit_sharing_at_full_budget_is_the_identity():
    model = _tiny()
    images = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    conv = convert(model, images, budget=6 * 16 * 2, group_size=1)  # P = C everywhere
    gm = conv.model.double().eval()
    fit_sharing(gm, conv.plan, images)
    with torch.no_grad():
        assert torch.equal(gm(images), model(images))


@pytest.mark.parametrize("order,easing", [("together", "linear"), ("distortion", "linear"), ("together", "quadratic")])
def test_progressive_schedule_reaches_every_channel(order, easing):
    model = _tiny()
    images = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    conv = convert(model, images, budget=2 * 16, group_size=1)
    gm = conv.model.double()
    hooks = ProgressivePhase("ste", 4.0, ramp_end=0.5, order=order, window=0.2, easing=easing,
                             calibration=lambda: images)  # fmt: skip
    hooks.on_phase_start(gm)
    sites = [m for m in gm.modules() if isinstance(m, SharedGate)]
    assert all(m.blending for m in sites)
    means = []
    for step in range(0, 100, 10):
        hooks.before_step(gm, step, 100, 0, 1)
        means.append(sum(float(m.blend.mean()) for m in sites) / len(sites))
    assert means == sorted(means) and means[0] < 1 and means[-1] == 1.0  # monotone, all shared by ramp_end
    assert float(sites[0].blend[:1].min()) == 1.0  # leader prototypes are shared from the start
    if order == "together":  # at 10% of the phase u = 0.2 of the ramp: t = 0.2 (linear) or 1 - 0.8^2 (quadratic)
        hooks.before_step(gm, 10, 100, 0, 1)
        assert float(sites[0].blend[-1]) == pytest.approx(0.2 if easing == "linear" else 0.36)
        hooks.before_step(gm, 99, 100, 0, 1)
    assert census(gm, (2, 4, 4)).total_relus == conv.plan.achieved == 2 * 16
    hooks.on_phase_end(gm)
    assert not any(m.blending for m in sites) and all(float(m.blend.min()) == 1.0 for m in sites)
    assert all(g.mode == "step" for g in gm.modules() if isinstance(g, PrototypeGate))


def test_linear_schedule_decays_over_the_whole_phase_unless_told():
    assert lr_at(50, 101, 1.0, 0.0, "linear") == pytest.approx(0.5)
    assert lr_at(100, 101, 1.0, 0.0, "linear") == 0.0
    assert lr_at(75, 101, 1.0, 0.0, "linear", decay_end=0.75) == 0.0  # the paper's convention: flat after 75%


PROGRESSIVE = dict(
    name="progressive", seed=1, model={"name": "digits_cnn"}, data={"spec": "digits"},
    conversion={"budget": "10%", "gamma": 4.0, "init": "data", "calibration_images": 128},
    phases=[
        {"kind": "pretrain", "epochs": 6, "batch_size": 64, "optimizer": {"weight_decay": 5e-4},
         "lr": {"start": 0.05, "end": 0.0005, "scheduler": "cosine"}},
        {"kind": "progressive", "epochs": 5, "batch_size": 64, "gate": "ste", "eval_every": 10,
         "optimizer": {"weight_decay": 5e-4}, "lr": {"start": 0.02, "end": 0.002, "scheduler": "cosine"},
         "kd": {"teacher": "original"}, "progressive": {"ramp_end": 0.6, "order": "distortion"}},
        {"kind": "finetune", "epochs": 2, "batch_size": 64, "gate": "ste", "optimizer": {"weight_decay": 5e-4},
         "lr": {"start": 0.005, "end": 0.0001, "scheduler": "linear"}, "kd": {"teacher": "original"}},
    ],
)  # fmt: skip


def test_progressive_recipe_keeps_accuracy_high_all_along(tmp_path):
    """Digits at 10%: the converted model never falls far (no collapse to chance) and ends near the original."""
    r = retrain(recipe_from_dict(PROGRESSIVE), tmp_path / "run").results
    assert r["original_acc"] > 97 and r["final_acc"] >= r["original_acc"] - 3
    assert r["sharing_fit"]["fitted_agreement"] > r["sharing_fit"]["naive_agreement"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    during = [m["test_acc"] for m in lines if m["kind"] in ("progressive", "finetune")]
    evals = [m for m in lines if m.get("eval")]
    assert len(evals) >= 10 and evals[0]["shared"] < evals[-1]["shared"] == 1.0
    assert min(during) > 40  # never near chance: the abrupt conversion starts this model at ~10-17%
    converted = load(tmp_path / "run")
    assert census(converted.model, converted.plan.input_size).total_relus == converted.plan.achieved == r["drelus"]
    assert not any(m.blending for m in converted.model.modules() if isinstance(m, SharedGate))


def _small_progressive() -> dict:
    data = json.loads(json.dumps(PROGRESSIVE))
    data["data"]["limit"] = 512
    data["phases"][0]["epochs"] = 2
    data["phases"][1]["epochs"] = 2
    data["phases"][2] = dict(data["phases"][2], epochs=None, steps=6)
    return data


@pytest.mark.parametrize("fail_at_step", [20, 27])  # inside the ramp, after it
def test_progressive_resume_equals_uninterrupted(tmp_path, fail_at_step):
    recipe = recipe_from_dict(_small_progressive())
    straight = retrain(recipe, tmp_path / "a").results
    with pytest.raises(Interrupted):
        retrain(recipe, tmp_path / "b", fail_at_step=fail_at_step)
    resumed = resume(tmp_path / "b").results
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_acc"] == straight["final_acc"]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["phases"][2].update(progressive={"ramp_end": 0.5}), "belong to a phase of kind progressive"),
        (lambda d: d["phases"][2].update(gate="gelu"), "does not apply to a finetune phase"),
        (lambda d: d["phases"][1]["progressive"].update(order="random"), "phases.1.progressive.order"),
        (lambda d: d["phases"][1]["progressive"].update(ramp_end=1.5), "phases.1.progressive.ramp_end"),
        (lambda d: d["conversion"].update(init="magic"), "conversion.init"),
        (lambda d: d["phases"][1]["lr"].update(decay_end=0), "phases.1.lr.decay_end"),
    ],
)  # fmt: skip
def test_progressive_recipe_validation(mutate, message):
    data = json.loads(json.dumps(PROGRESSIVE))
    mutate(data)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_paper_recipe_is_kept(tmp_path):
    from deepshare_convert.recipes import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    paper = load_recipe(root / "resnet20_cifar10_paper.yaml")
    assert [p.kind for p in paper.phases] == ["gelu", "switch", "finetune"]
    assert paper.phases[0].lr.decay_end == 0.75
    ours = load_recipe(root / "resnet20_cifar10.yaml")
    assert [p.kind for p in ours.phases] == ["progressive"] and ours.conversion.init == "data"
    assert ours.phases[0].kd.teacher == "original" and ours.phases[0].gate == "ste"


def test_feature_distillation_taps_the_original_sites():
    from deepshare_convert.training.engine import PhaseHooks
    from deepshare_convert.training.features import TAPS_ATTR, FeatureDistillation, tapped_teacher

    model = _tiny()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    conv = convert(model, x, budget=2 * 16, group_size=1)
    teacher = tapped_teacher(model, conv.plan)
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x))  # tapping changes nothing
    taps = getattr(teacher, TAPS_ATTR)
    assert sorted(n for n, _ in taps.named_children()) == sorted(s for g in conv.plan.groups for s in g.sites)
    student = conv.model.double()
    hooks = FeatureDistillation(PhaseHooks(), teacher, 2.0)
    hooks.on_phase_start(student)
    with torch.no_grad():
        teacher(x)
    student(x)
    loss = hooks.extra_loss(student)
    assert loss.item() > 0 and loss.requires_grad  # shared gates differ from the original ReLUs
    for m in student.modules():  # at t = 0 the student is the original: zero feature loss
        if isinstance(m, SharedGate):
            m.blending = True
            m.blend.zero_()
    with torch.no_grad():
        teacher(x)
        student(x)
    assert hooks.extra_loss(student).item() == 0.0
    hooks.on_phase_end(student)


def test_feature_distillation_recipe_trains(tmp_path):
    data = json.loads(json.dumps(PROGRESSIVE))
    data["phases"][1]["epochs"], data["phases"][2]["epochs"] = 3, 1
    for phase in data["phases"][1:]:
        phase["kd"]["feature_weight"] = 0.5
    r = retrain(recipe_from_dict(data), tmp_path / "run").results
    assert r["final_acc"] >= r["original_acc"] - 5 and r["drelus"] <= r["budget"]


def test_override_one_past_the_end_appends_a_phase():
    from deepshare_convert.recipes import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    r = load_recipe(root / "resnet20_cifar10.yaml",
                    ["phases.1={kind: finetune, steps: 5, gate: ste, lr: {start: 0.001}}"])  # fmt: skip
    assert [p.kind for p in r.phases] == ["progressive", "finetune"] and r.phases[1].steps == 5
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(root / "resnet20_cifar10.yaml", ["phases.3={kind: finetune}"])
