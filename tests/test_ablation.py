"""Table 5 ablation switches: frozen affine and dropped replicates, on the model and through a recipe."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from deepshare_convert.conversion.gates import SharedGate
from deepshare_convert.conversion.rewrite import convert
from deepshare_convert.errors import PlanError
from deepshare_convert.recipes import RecipeError, recipe_from_dict
from deepshare_convert.training.ablation import apply_ablation, drop_replicates, freeze_affine
from deepshare_convert.training.retrain import retrain

from .test_retrain import SMALL


def _two_relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3))


def test_drop_replicates_is_a_thinner_plain_network():
    """Prototypes behave as plain ReLUs, replicates are dead: equal to the original with those channels zeroed."""
    model = _two_relu_net()
    conv = convert(model, (2, 2, 2), budget=16, group_size=1)  # 2 prototypes of 6 channels at each site
    assert [g.prototypes for g in conv.plan.groups] == [2, 2]
    drop_replicates(conv.model, conv.plan)
    mask = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.float).view(1, 6, 1, 1)
    thin = nn.Sequential(model[0], nn.ReLU(), _Mul(mask), model[2], nn.ReLU(), _Mul(mask), model[4], model[5])
    x = torch.randn(16, 2, 2, 2)
    torch.testing.assert_close(conv.model(x), thin(x))
    sites = [m for m in conv.model.modules() if isinstance(m, SharedGate)]
    assert not any(p.requires_grad for s in sites for p in (s.alpha, s.beta))


class _Mul(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_drop_replicates_needs_group_size_one():
    conv = convert(_two_relu_net(), (2, 2, 2), budget=8, group_size=2)
    with pytest.raises(PlanError, match="group_size 1"):
        drop_replicates(conv.model, conv.plan)
    with pytest.raises(RecipeError, match="group_size: 1"):
        recipe_from_dict({**SMALL, "conversion": {"budget": "10%", "replicates": "none"}})


def test_freeze_affine_resets_and_freezes():
    conv = convert(_two_relu_net(), (2, 2, 2), budget=8, group_size=2)
    sites = [m for m in conv.model.modules() if isinstance(m, SharedGate)]
    for s in sites:
        s.alpha.data.uniform_(0.5, 2)
        s.beta.data.uniform_(-1, 1)
    freeze_affine(conv.model)
    assert all(torch.equal(s.alpha, torch.ones(6)) and torch.equal(s.beta, torch.zeros(6)) for s in sites)
    assert not any(p.requires_grad for s in sites for p in (s.alpha, s.beta))
    with pytest.raises(PlanError, match="affine must be one of"):
        apply_ablation(conv.model, conv.plan, affine="fixed")


def test_recipe_frozen_affine_trains_everything_else(tmp_path):
    """Through retrain: alpha/beta stay exactly 1/0 while the convolutions move."""
    data = json.loads(json.dumps(SMALL))
    data["conversion"]["affine"] = "frozen"
    data["phases"] = data["phases"][:2]  # pretrain + gelu is enough to see what trains
    retrain(recipe_from_dict(data), tmp_path / "run")
    w = load_file(str(tmp_path / "run" / "model.safetensors"))
    alphas = [v for k, v in w.items() if k.endswith(".alpha")]
    betas = [v for k, v in w.items() if k.endswith(".beta")]
    assert alphas and all(torch.equal(a, torch.ones_like(a)) for a in alphas)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in betas)
    pretrained = load_file(str(tmp_path / "run" / "phases" / "phase0.safetensors"))
    conv_keys = [k for k in pretrained if k.endswith("weight") and pretrained[k].dim() == 4]
    assert any(not torch.equal(pretrained[k], w[k]) for k in conv_keys)
