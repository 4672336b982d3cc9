"""Groups with zero prototypes: budgets below one prototype per group make whole groups linear (β·x).

Conversion (plan, census, save/load), the forward pass, calibration, retraining, ONNX export, and a
real two-party run whose linear groups cost no comparison (measured = estimate).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepshare_convert.conversion.budget import allocate, one_per_group
from deepshare_convert.conversion.gates import PrototypeGate, SharedGate
from deepshare_convert.conversion.plan import Plan
from deepshare_convert.conversion.rewrite import GATES_ATTR, SITES_ATTR, convert, load, save
from deepshare_convert.errors import BudgetError, PlanError
from deepshare_convert.models import load_model


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return load_model("resnet20")


@pytest.mark.parametrize("budget", ["1%", "0.5%"])
def test_budgets_below_one_prototype_per_group_convert(resnet20, budget):
    conv = convert(resnet20.model, resnet20.input_size, budget=budget)
    plan = conv.plan
    protos = [g.prototypes for g in plan.groups]
    assert plan.budget < one_per_group(plan.groups) and 0 in protos and any(protos)
    assert plan.achieved == sum(g.drelus for g in plan.groups) <= plan.budget
    assert plan.achieved > plan.budget - max(g.spatial for g in plan.groups)  # the greedy fill spent the rest
    from deepshare_convert.conversion.census import census

    assert census(conv.model, resnet20.input_size).total_relus == plan.achieved
    linear = [g for g in plan.groups if g.prototypes == 0]
    assert all(g.mapping == [] for g in linear)


def test_budgets_at_or_above_the_minimum_keep_a_prototype_everywhere(resnet20):
    """The old allocation is untouched where it was feasible: linear groups only below the minimum."""
    from deepshare_convert.conversion.census import census
    from deepshare_convert.conversion.grouping import group_sites

    groups = group_sites(census(resnet20.model, resnet20.input_size).sites, 2, set())
    least = one_per_group(groups)
    assert min(allocate(groups, least, "uniform")) == 1
    assert min(allocate(groups, least - 1, "uniform")) == 0


def test_a_linear_site_is_beta_times_x_and_survives_save_load(tmp_path, resnet20):
    conv = convert(resnet20.model, resnet20.input_size, budget="0.5%", spec=resnet20.spec.to_dict())
    gates, sites = getattr(conv.model, GATES_ATTR), getattr(conv.model, SITES_ATTR)
    g = next(g for g in conv.plan.groups if g.prototypes == 0)
    gate: PrototypeGate = gates.get_submodule(f"g{g.index}")
    site: SharedGate = sites.get_submodule(g.sites[0])
    assert gate.linear and torch.equal(site.beta.detach(), torch.ones(site.channels))  # starts as the identity
    with torch.no_grad():
        site.beta.copy_(torch.linspace(0.1, 0.9, site.channels))
    x = torch.randn(2, *g.shape)
    with torch.no_grad():
        assert torch.equal(site(x, gate(x)), x * site.beta.view(1, -1, 1, 1))
    assert torch.count_nonzero(gate(x)) == 0
    save(conv, tmp_path / "o")
    again = load(tmp_path / "o")
    images = torch.randn(3, *resnet20.input_size)
    conv.model.eval()
    with torch.no_grad():
        assert torch.equal(again.model(images), conv.model(images))


def test_plan_validation_of_linear_groups(tmp_path, resnet20):
    conv = convert(resnet20.model, resnet20.input_size, budget="0.5%", spec=resnet20.spec.to_dict())
    save(conv, tmp_path / "o")
    path = tmp_path / "o" / "plan.json"
    data = json.loads(path.read_text())
    i = next(i for i, g in enumerate(data["groups"]) if g["prototypes"] == 0)
    data["groups"][i]["mapping"] = [0] * data["groups"][i]["shape"][0]
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=rf"groups\[{i}\]\.mapping.*linear group"):
        Plan.read(path.parent)
    data["groups"][i]["mapping"], data["groups"][i]["prototypes"] = [], -1
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"must be 0\.\."):
        Plan.read(path.parent)


def test_a_budget_that_buys_no_prototype_is_one_line(resnet20):
    with pytest.raises(BudgetError, match="buys no prototype channel .*smallest group needs 64 DReLUs"):
        convert(resnet20.model, resnet20.input_size, budget=63)


def test_calibration_fits_beta_of_a_linear_group(resnet20):
    from deepshare_convert.conversion.fitting import fit_sharing

    conv = convert(resnet20.model, resnet20.input_size, budget="0.5%")
    images = torch.randn(16, *resnet20.input_size)
    fit_sharing(conv.model, conv.plan, images)
    g = next(g for g in conv.plan.groups if g.prototypes == 0)
    for name in g.sites:
        beta = getattr(conv.model, SITES_ATTR).get_submodule(name).beta.detach()
        assert 0.0 <= float(beta.min()) and float(beta.max()) <= 1.0 and float(beta.std()) > 0  # share of positives
    assert all(g.mapping == [] for g in conv.plan.groups if g.prototypes == 0)


def test_retraining_with_linear_groups_learns(tmp_path):
    """Digits at 80 DReLUs (one prototype per group would be 144): the phases still recover accuracy."""
    from deepshare_convert.training.retrain import retrain

    from .test_retrain import DIGITS

    r = retrain(DIGITS, tmp_path / "run", overrides=["conversion.budget=80"], quick=True).results
    plan = load(tmp_path / "run").plan
    assert 0 in [g.prototypes for g in plan.groups] and r["drelus"] <= 80
    assert r["final_acc"] > r["converted_acc_before_retraining"] + 20 and r["final_acc"] > 70


def test_onnx_export_of_linear_groups(tmp_path, resnet20):
    pytest.importorskip("onnxruntime")
    from deepshare_convert.export_onnx import export_onnx

    conv = convert(resnet20.model, resnet20.input_size, budget="0.5%")
    report = export_onnx(conv.model, resnet20.input_size, tmp_path / "m.onnx")
    gated = sum(1 for g in conv.plan.groups if g.prototypes)
    assert report.op_counts["GreaterOrEqual"] == gated < len(conv.plan.groups)


def _digits_with_a_linear_group():
    torch.manual_seed(0)
    loaded = load_model("digits_cnn")
    conv = convert(loaded.model, loaded.input_size, budget=100)
    assert [g.prototypes for g in conv.plan.groups].count(0) >= 1
    return loaded, conv


@pytest.mark.parametrize("weights_mode", ["public", "private"])
def test_a_linear_group_costs_no_comparison_in_a_two_party_run(weights_mode):
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party

    loaded, conv = _digits_with_a_linear_group()
    est = estimate(conv.model, loaded.input_size, batch=2, weights_mode=weights_mode)
    linear = {f"{GATES_ATTR}.g{g.index}" for g in conv.plan.groups if g.prototypes == 0}
    assert linear and not any(n.comparisons for n in est.nodes if n.layer in linear)
    assert sum(n.comparisons for n in est.nodes) == conv.plan.achieved * 2
    run = run_two_party(conv.model, torch.randn(2, *loaded.input_size), weights_mode=weights_mode)
    party = run.parties[0]
    assert (party.bytes, party.rounds, party.comparisons) == (est.bytes, est.rounds, conv.plan.achieved * 2)
    assert run.offline_bytes == run.offline_expected
    assert run.top1_agreement == 1.0 and float(np.abs(run.logits - run.plaintext).max()) < 1e-3
