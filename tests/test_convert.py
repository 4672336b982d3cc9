"""The shared-gate rewrite: exact identity, layer sharing, budgets, the XOR construction, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from deepshare_convert import census, load_model
from deepshare_convert.conversion.budget import allocate, parse_budget
from deepshare_convert.conversion.gates import PrototypeGate, SharedGate, balanced_mapping, set_gate_mode
from deepshare_convert.conversion.grouping import group_sites
from deepshare_convert.conversion.rewrite import convert, load, save
from deepshare_convert.errors import BudgetError, DeepShareError, PlanError

from .handmade import HANDMADE
from .test_census import TIMM_MODELS


def _full_identity(model: nn.Module, input_size, atol=1e-10):
    """P = C everywhere, step gate, alpha=1, beta=0, no layer sharing -> outputs unchanged."""
    model = model.double().eval()
    total = census(model, input_size).total_relus
    converted = convert(model, input_size, budget=total, group_size=1)
    assert all(g.prototypes == g.channels for g in converted.plan.groups)
    x = torch.randn(3, *input_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = model(x), converted.model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    return converted


@pytest.mark.parametrize("name", ["resnet18_cifar", "wrn22_8", "resnet20", "resnet56", "digits_cnn", "xor_mlp"])
def test_exact_identity_builtins(name):
    loaded = load_model(name)
    _full_identity(loaded.model, loaded.input_size)


@pytest.mark.parametrize("name", [m for m, has_relu, _ in TIMM_MODELS if has_relu])
def test_exact_identity_timm(name):
    loaded = load_model(f"timm:{name}", input_size="3,32,32", num_classes=10)
    _full_identity(loaded.model, loaded.input_size, atol=1e-8)


@pytest.mark.parametrize("key", sorted(HANDMADE))
def test_exact_identity_handmade(key):
    cls, size = HANDMADE[key]
    _full_identity(cls(), size)


class InplaceAlias(nn.Module):
    """relu_(x) rewrites x itself: `y + x` afterwards is 2*relu(x)."""

    def forward(self, x):
        y = torch.relu_(x)
        return y + x


def test_inplace_semantics_preserved():
    x = torch.randn(2, 4, 3, 3)
    converted = convert(InplaceAlias(), (4, 3, 3), budget=36, group_size=1).model
    torch.testing.assert_close(converted(x.clone()), 2 * torch.relu(x))


def test_original_model_untouched():
    loaded = load_model("resnet20")
    model = loaded.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, loaded.input_size, budget="10k")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (PrototypeGate, SharedGate)) for m in model.modules())


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1, bias=False)
        self.b = nn.Conv2d(3, 3, 1, bias=False)
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.r2(self.b(self.r1(self.a(x))))


def test_layer_sharing_follower_uses_leader_gate():
    """Group size 2, P = C: the second site multiplies its input by DReLU of the *first* site's input."""
    torch.manual_seed(0)
    model = TwoLayer().eval()
    converted = convert(model, (2, 4, 4), budget=48, group_size=2)
    (group,) = converted.plan.groups
    assert group.sites == ["r1", "r2"] and group.prototypes == 3
    x = torch.randn(5, 2, 4, 4)
    a = model.a(x)
    h = a * (a >= 0)  # leader: its own gate
    b = model.b(h)
    expected = b * (a >= 0)  # follower: the leader's gate, not its own
    torch.testing.assert_close(converted.model(x), expected)
    assert not torch.allclose(expected, torch.relu(b))  # the check can tell the difference


def test_prototypes_and_mapping_hand_computed():
    """P = 1 of C = 3 at one site: every channel is gated by channel 0, through its own alpha, beta."""
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU())
    converted = convert(model, (1, 2, 2), budget=4, group_size=1)
    assert converted.plan.groups[0].mapping == [0, 0, 0]
    shared = converted.model.deepshare_sites.get_submodule("_1")
    with torch.no_grad():
        shared.alpha.copy_(torch.tensor([1.0, -2.0, 0.5]))
        shared.beta.copy_(torch.tensor([0.0, 1.0, 0.25]))
    x = torch.randn(4, 1, 2, 2)
    z = model[0](x)
    g = (z[:, :1] >= 0).float()
    expected = z * (torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1) * g + torch.tensor([0.0, 1.0, 0.25]).view(1, 3, 1, 1))
    torch.testing.assert_close(converted.model(x), expected)


@pytest.mark.parametrize("c,p", [(16, 1), (16, 3), (16, 16), (64, 7), (5, 2)])
def test_balanced_mapping(c, p):
    pi = balanced_mapping(c, p)
    assert pi[:p].tolist() == list(range(p))
    served = torch.bincount(pi[p:], minlength=p) if c > p else torch.zeros(p, dtype=torch.long)
    assert served.max() - served.min() <= 1 and int(served.sum()) == c - p


@pytest.mark.parametrize(
    "text,total,expected",
    [("12k", None, 12_000), ("12K", None, 12_000), ("1.5M", None, 1_500_000), ("6000", None, 6000),
     ("2.5%", 491_520, 12_288), (" 49.9k ", None, 49_900), ("100%", 1000, 1000), (7, None, 7)],
)  # fmt: skip
def test_parse_budget(text, total, expected):
    assert parse_budget(text, total) == expected


@pytest.mark.parametrize("text,total", [("0", None), ("-5k", None), ("12q", None), ("", None), ("abc", None),
                                        ("2M", 1000), ("0%", 100), ("101%", 100), ("5%", None)])  # fmt: skip
def test_parse_budget_errors(text, total):
    with pytest.raises(BudgetError):
        parse_budget(text, total)


@pytest.mark.parametrize("allocator", ["uniform", "proportional", "equal", "snl"])
@pytest.mark.parametrize("budget", ["2%", "6k", "12.9k", "49.9k"])
@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_allocators_respect_budget(allocator, budget, group_size):
    loaded = load_model("resnet18_cifar")
    c = census(loaded.model, loaded.input_size)
    groups = group_sites(c.sites, group_size)
    b = parse_budget(budget, c.total_relus)
    snl = {s.name: (i * 37) % 500 + 10 for i, s in enumerate(c.sites)} if allocator == "snl" else None
    protos = allocate(groups, b, allocator, snl)
    used = sum(p * g.spatial for g, p in zip(groups, protos))
    assert all(1 <= p <= g.channels for g, p in zip(groups, protos))
    assert used <= b
    # greedy fill: no group could take one more channel within the budget
    assert all(p == g.channels or g.spatial > b - used for g, p in zip(groups, protos))


def test_allocators_differ():
    loaded = load_model("resnet20")
    c = census(loaded.model, loaded.input_size)
    groups = group_sites(c.sites, 2)
    uni = allocate(groups, 15_000, "uniform")
    snl = allocate(groups, 15_000, "snl", {s.name: (4000 if s.name.startswith("layer3") else 100) for s in c.sites})
    assert uni != snl
    assert snl[-1] / groups[-1].channels > uni[-1] / groups[-1].channels  # SNL's counts moved budget to layer3


def test_equal_allocator_spends_alike_per_group():
    """``equal`` gives every group the same DReLUs (up to one channel), so cheap deep channels get a larger share."""
    loaded = load_model("resnet20")
    groups = group_sites(census(loaded.model, loaded.input_size).sites, 2)
    protos = allocate(groups, 15_000, "equal")
    spent = [p * g.spatial for g, p in zip(groups, protos)]
    deep = [s for g, s in zip(groups, spent) if g.spatial == 64]
    assert max(deep) - min(deep) <= 64 and min(deep) > 15_000 / len(groups) - 2 * 64
    assert protos[-1] / groups[-1].channels > 0.4 > allocate(groups, 15_000, "proportional")[-1] / groups[-1].channels


def test_budget_below_minimum_and_kept():
    loaded = load_model("resnet20")
    with pytest.raises(BudgetError, match="buys no prototype channel"):
        convert(loaded.model, loaded.input_size, budget=10)
    with pytest.raises(DeepShareError, match="matches no activation site"):
        convert(loaded.model, loaded.input_size, budget="10k", keep=["nosuchsite"])


@pytest.mark.parametrize("budget,group_size", [("25k", 2), ("30k", 1), ("15%", 3)])
def test_census_equals_plan(budget, group_size):
    loaded = load_model("resnet20")
    converted = convert(loaded.model, loaded.input_size, budget=budget, group_size=group_size, keep=["relu"])
    plan = converted.plan
    c = census(converted.model, loaded.input_size)
    assert c.total_relus == plan.achieved == sum(g.prototypes * g.spatial for g in plan.groups) + 16_384
    assert plan.achieved <= plan.budget
    assert [s.kind for s in c.sites].count("gate") == len(plan.groups)
    assert "relu" in [s.name for s in c.sites if s.kind == "module"]  # the kept ReLU stays


def test_xor_one_gate_construction():
    """Paper Sec. 5: one prototype, one replicate with alpha=-2, beta=1 solves the 2x2 checkerboard."""
    model = load_model("xor_mlp").model
    converted = convert(model, (2,), budget=1, group_size=1)
    assert converted.plan.achieved == 1 and converted.plan.groups[0].mapping == [0, 0]
    m = converted.model
    with torch.no_grad():
        m.fc1.weight.copy_(torch.eye(2))
        m.fc1.bias.zero_()
        site = next(iter(m.deepshare_sites.children()))
        site.alpha.copy_(torch.tensor([1.0, -2.0]))
        site.beta.copy_(torch.tensor([0.0, 1.0]))
        m.fc2.weight.copy_(torch.tensor([[0.0, 1.0]]))
        m.fc2.bias.zero_()
    x = torch.rand(10_000, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = (torch.sign(x[:, 0]) != torch.sign(x[:, 1]))
    with torch.no_grad():
        pred = m(x)[:, 0] > 0
    assert torch.equal(pred, labels)


def test_gate_modes_and_switch_mask():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    m = convert(model, (3,), budget=2, group_size=1).model
    x = torch.randn(6, 3)
    z = model[0](x)
    g_step = (z[:, [0, 1, 0, 1]] >= 0).float()
    g_gelu = torch.special.ndtr(z[:, [0, 1, 0, 1]] * 2.0)
    gate = m.deepshare_gates.g0
    gate.gamma = 2.0
    set_gate_mode(m, "gelu")
    torch.testing.assert_close(m(x), z * g_gelu)
    set_gate_mode(m, "mixed")
    site = next(iter(m.deepshare_sites.children()))
    site.switched.copy_(torch.tensor([False, True, True, False]))
    mixed = torch.where(site.switched, g_step, g_gelu)
    torch.testing.assert_close(m(x), z * mixed)
    # gradients reach the prototype through the GELU gate, never through the step gate
    x.requires_grad_(True)
    set_gate_mode(m, "step")
    assert m(x).sum().backward() is None and x.grad is not None


def test_save_load_round_trip(tmp_path):
    loaded = load_model("digits_cnn")
    converted = convert(loaded.model, loaded.input_size, budget="10%", spec=loaded.spec.to_dict())
    with torch.no_grad():  # make the affine parameters non-trivial so the weights matter
        for p in converted.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save(converted, tmp_path / "out")
    again = load(tmp_path / "out")
    x = torch.randn(8, *loaded.input_size)
    torch.testing.assert_close(again.model(x), converted.model.eval()(x), rtol=0, atol=0)
    assert again.plan.to_dict() == converted.plan.to_dict()
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["achieved_drelus"] == converted.plan.achieved <= plan["budget"]


def test_load_errors(tmp_path):
    loaded = load_model("digits_cnn")
    a = convert(loaded.model, loaded.input_size, budget="10%", spec=loaded.spec.to_dict())
    b = convert(loaded.model, loaded.input_size, budget="20%", spec=loaded.spec.to_dict())
    save(a, tmp_path / "a")
    save(b, tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "mixed.safetensors")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(PlanError, match="does not fit") as e:
        load(tmp_path / "a")
    assert "\n" not in str(e.value)
    with pytest.raises(PlanError, match="no plan.json"):
        load(tmp_path)
    (tmp_path / "b" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(PlanError, match="not a readable"):
        load(tmp_path / "b")


@pytest.mark.parametrize("mode", ["step", "gelu", "mixed"])
def test_shared_gate_gradients_match_autograd(mode, monkeypatch):
    """The memory-saving backward of SharedGate equals plain autograd, for inputs and parameters."""
    from deepshare_convert.conversion import gates

    model = nn.Sequential(nn.Conv2d(2, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.ReLU()).double()
    m = convert(model, (2, 3, 3), budget=18, group_size=2).model
    set_gate_mode(m, mode)
    for site in m.deepshare_sites.children():
        site.switched.copy_(torch.tensor([False, True] * 3))
        with torch.no_grad():
            site.alpha.normal_()
            site.beta.normal_()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    params = [x] + list(m.parameters())

    def grads():
        return torch.autograd.grad(m(x).square().sum(), params)

    custom = grads()
    monkeypatch.setattr(gates._SharedGateFn, "apply", lambda x, g, a, b: x * torch.addcmul(b, a, g))
    plain = grads()
    for c, p in zip(custom, plain):
        torch.testing.assert_close(c, p)
    assert any(c.abs().sum() > 0 for c in custom[-4:])


def test_top_level_api(tmp_path):
    """The documented entry points: deepshare_convert.convert / save / load / estimate_latency."""
    import deepshare_convert as ds

    loaded = ds.load_model("digits_cnn")
    conv = ds.convert(loaded.model, loaded.input_size, budget="10%", spec=loaded.spec.to_dict())
    ds.save(conv, tmp_path / "out")
    again = ds.load(tmp_path / "out")
    x = loaded.example_input(2)
    torch.testing.assert_close(again.model(x), conv.model.eval()(x), rtol=0, atol=0)
    assert ds.estimate_latency(again.model, loaded.input_size).comparisons == conv.plan.achieved
    assert callable(ds.retrain) and "convert" in ds.__all__


def test_one_settings_object_for_cli_recipes_convert_and_plan():
    """ConversionSettings is what convert() takes, what a recipe's conversion section is, and what a plan gives back."""
    from deepshare_convert.conversion.rewrite import build_plan
    from deepshare_convert.conversion.settings import ConversionSettings, settings_from
    from deepshare_convert.models import load_model
    from deepshare_convert.recipes import Conversion

    loaded = load_model("digits_cnn")
    s = settings_from(budget="30%", allocator="equal", group_size=1, keep=["features.12"])
    plan = build_plan(loaded.model, loaded.input_size, s)
    assert plan.settings().budget == "30%" and plan.settings().allocator == "equal"
    again = build_plan(loaded.model, loaded.input_size, plan.settings())
    assert again.to_dict() == plan.to_dict()  # a plan's settings rebuild the same plan
    assert build_plan(loaded.model, loaded.input_size, budget="30%", allocator="equal", group_size=1,
                      keep=["features.12"]).to_dict() == plan.to_dict()  # keyword form, same object behind  # fmt: skip
    recipe_part = Conversion(budget="30%", allocator="equal", group_size=1, keep=["features.12"], init="data")
    assert isinstance(recipe_part, ConversionSettings)
    assert build_plan(loaded.model, loaded.input_size, recipe_part).to_dict() == plan.to_dict()
    with pytest.raises(DeepShareError, match="not both"):
        build_plan(loaded.model, loaded.input_size, s, budget="5%")


@pytest.mark.parametrize("given, message", [
    (dict(group_size=0), "--group-size must be at least 1, got 0"),
    (dict(gate="ste"), "--gate must be 'step' or 'gelu', got 'ste'"),
    (dict(allocator="greedy"), "unknown allocator 'greedy'; choose one of uniform, proportional, equal, snl"),
    (dict(gamma=-1), "--gamma must be above 0, got -1"),
])  # fmt: skip
def test_settings_errors_are_one_line(given, message):
    from deepshare_convert.conversion.settings import settings_from

    with pytest.raises(DeepShareError) as e:
        settings_from(budget="1k", **given)
    assert str(e.value) == message


def test_allocator_registry():
    """A registered allocator is usable by name everywhere (convert, recipes, CLI help) at once."""
    from deepshare_convert.conversion import budget
    from deepshare_convert.conversion.settings import settings_from

    budget.register_allocator("first-heavy")(lambda groups, counts: [len(groups) - i for i in range(len(groups))])
    try:
        assert "first-heavy" in budget.allocator_names()
        assert settings_from(budget="1k", allocator="first-heavy").allocator == "first-heavy"
    finally:
        budget._ALLOCATORS.pop("first-heavy")


def test_shared_gate_pass_checks_before_and_after():
    """apply_plan is a torch.fx pass (requires -> call -> ensures): a second run is refused up front."""
    from torch.fx.passes.infra.pass_base import PassBase

    from deepshare_convert.conversion.rewrite import SharedGatePass, build_plan
    from deepshare_convert.conversion.tracing import example_input, propagate_shapes, trace

    loaded = load_model("digits_cnn")
    plan = build_plan(loaded.model, loaded.input_size, budget="10%")
    gm = trace(loaded.model)
    propagate_shapes(gm, example_input(loaded.input_size, gm))
    p = SharedGatePass(plan)
    assert isinstance(p, PassBase)
    result = p(gm)
    assert result.modified and census(result.graph_module, loaded.input_size).total_relus == plan.achieved
    with pytest.raises(PlanError, match="is not a ReLU of this model"):  # its sites are gates now
        p(result.graph_module)
