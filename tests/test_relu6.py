"""ReLU6 / Hardtanh / LeakyReLU: counted, converted, masked and run on shares as ReLU sites.

ReLU6 = 6 - relu(6 - relu(x)) is two DReLU sites (``<site>_lo``, ``<site>_hi``), LeakyReLU(a) =
a*x + (1 - a)*relu(x) one (``<site>_relu``); the decomposition runs right after tracing
(conversion/decompose.py), so every pass sees ordinary ReLU sites.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepshare_convert import census, load_model
from deepshare_convert.conversion.rewrite import convert
from deepshare_convert.errors import DeepShareError

from .handmade import hook_count_relus

SLOPES = (0.01, 0.2, -0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread (overrides conftest's 2): the models are small and the cores are shared."""
    torch.set_num_threads(1)
    yield


class Clipped(nn.Module):
    """Every form: nn.ReLU6 (in place, before a residual), F.relu6, nn.Hardtanh(0, 6), in-place
    F.hardtanh(x, 0, 6), a general Hardtanh, and LeakyReLU as module, function and in-place function."""

    def __init__(self, slopes=SLOPES, general: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.clip = nn.Hardtanh(0.0, 6.0)
        self.leak = nn.LeakyReLU(slopes[0], inplace=True)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)
        self.general = nn.Hardtanh(-1.0, 2.0) if general else nn.Identity()
        self.slopes = slopes
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn1(self.c1(x))
        y = self.act1(x)  # in place: x now holds y
        x = F.relu6(self.bn2(self.c2(y)) + x)
        x = self.leak(self.clip(x) * 0.5)
        x = F.hardtanh(self.bn3(self.c3(x)), 0.0, 6.0, inplace=True)
        x = F.leaky_relu(x - 1.0, self.slopes[1]) + F.leaky_relu_(x * 1.5 - 2.0, self.slopes[2])
        x = self.general(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _realistic(model: nn.Module, size, seed: int = 0, batch: int = 64) -> nn.Module:
    from deepshare_convert.models.batchnorm import recalibrate_batchnorm

    torch.manual_seed(seed)
    return recalibrate_batchnorm(model, size, batch=batch, seed=seed)


# ---- 1. the census -----------------------------------------------------------------------------------
def test_mobilenetv2_inspect_counts_two_comparisons_per_relu6_element(capsys):
    """`deepshare inspect timm:mobilenetv2_100 --input-size 3,224,224 --json` = a forward-hook count."""
    from deepshare_convert.cli.app import run

    assert run(["inspect", "timm:mobilenetv2_100", "--input-size", "3,224,224", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    loaded = load_model("timm:mobilenetv2_100", input_size="3,224,224")
    elements = sum(m.numel for m in _relu6_outputs(loaded.model, (3, 224, 224)))
    assert d["total_relus"] == 2 * elements == hook_count_relus(loaded.model, (3, 224, 224)) == 12_211_584
    assert d["other_nonlinearities"] == [] and d["hidden_relus"] == []
    sites = d["sites"]
    assert len(sites) == 70 and {s["origin"] for s in sites} == {"relu6"}
    assert [s["name"] for s in sites[:2]] == ["bn1_act_lo", "bn1_act_hi"]
    assert {s["module"] for s in sites[:2]} == {"bn1.act"} and sites[0]["relus"] == 32 * 112 * 112


class _Out:
    def __init__(self, numel):
        self.numel = numel


def _relu6_outputs(model, size):
    """Elements of every nn.ReLU6 output in one forward pass (the clip's elements, counted once)."""
    found = []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append(_Out(o[0].numel())))
             for m in model.modules() if isinstance(m, nn.ReLU6)]  # fmt: skip
    with torch.no_grad():
        model.eval()(torch.randn(1, *size))
    for h in hooks:
        h.remove()
    return found


def test_small_model_census_names_and_hook_count():
    model = Clipped().eval()
    c = census(model, (3, 6, 6))
    assert c.total_relus == hook_count_relus(model, (3, 6, 6)) == 13 * 8 * 36
    assert [s.name for s in c.sites] == ["act1_lo", "act1_hi", "relu6_lo", "relu6_hi", "clip_lo", "clip_hi",
                                         "leak_relu", "hardtanh_lo", "hardtanh_hi", "leaky_relu_relu",
                                         "leaky_relu__relu", "general_lo", "general_hi"]  # fmt: skip
    assert [s.origin for s in c.sites].count("leaky_relu") == 3
    assert {s.activation for s in c.sites} == {"relu"} and c.other_nonlinearities == []
    again = census(model, (3, 6, 6))
    assert [s.name for s in again.sites] == [s.name for s in c.sites]


def test_pt2_graph_aten_forms_in_place_included(tmp_path):
    """A torch.export graph calls aten.hardtanh_/relu6/leaky_relu_ (in place kept): same sites, same model."""
    from deepshare_convert.mpc.costs import estimate

    model = _realistic(Clipped(), (3, 6, 6))
    path = tmp_path / "clipped.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 6, 6),)), path)
    gm = load_model(str(path)).model
    c = census(gm, (3, 6, 6))
    assert c.total_relus == census(model, (3, 6, 6)).total_relus and c.other_nonlinearities == []
    conv = convert(gm, (3, 6, 6), budget=c.total_relus, group_size=1)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(conv.model(x), model(x.clone()), atol=1e-5)
    assert estimate(gm, (3, 6, 6)).bytes == estimate(model, (3, 6, 6)).bytes


def test_bad_hardtanh_bounds_are_one_line():
    class Bad(nn.Module):
        def forward(self, x):
            return F.hardtanh(x, 2.0, 1.0)

    with pytest.raises(DeepShareError, match=r"hardtanh needs min_val < max_val, got \(2, 1\)"):
        census(Bad(), (4,))


# ---- 2. identity at P = C ------------------------------------------------------------------------------
def _identity(model: nn.Module, size) -> float:
    model = model.double().eval()
    total = census(model, size).total_relus
    conv = convert(model, size, budget=total, group_size=1)
    assert conv.plan.achieved == total
    x = torch.randn(3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    with torch.no_grad():
        return float((conv.model(x) - model(x.clone())).abs().max())


def test_identity_at_p_equals_c_mobilenetv2():
    loaded = load_model("timm:mobilenetv2_100", input_size="3,32,32", num_classes=10)
    assert _identity(_realistic(loaded.model, (3, 32, 32), batch=8), (3, 32, 32)) <= 1e-10


@pytest.mark.parametrize("slopes", [SLOPES, (0.0, 0.3, 1.5)])
def test_identity_at_p_equals_c_every_form(slopes):
    assert _identity(_realistic(Clipped(slopes), (3, 6, 6)), (3, 6, 6)) <= 1e-10


def test_upper_gate_following_its_lower_gate_starts_with_the_clip_dropped():
    """Group size 2 puts a ReLU6's two sites in one group; the upper one starts at α = 0, β = 1."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1), nn.LeakyReLU(0.1)).double().eval()
    conv = convert(model, (3, 2, 2), budget="100%", group_size=2)
    assert [g.sites for g in conv.plan.groups] == [["_1_lo", "_1_hi"], ["_3_relu"]]
    assert conv.plan.achieved == 2 * 16  # the upper gate takes the lower gate's bits: no comparisons of its own
    sites = dict(conv.model.deepshare_sites.named_children())
    assert sites["_1_hi"].alpha.eq(0).all() and sites["_1_hi"].beta.eq(1).all()
    assert sites["_1_lo"].alpha.eq(1).all() and sites["_3_relu"].beta.eq(0).all()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64) * 8
    with torch.no_grad():
        expected = F.leaky_relu(model[2](torch.relu(model[0](x))), 0.1)  # ReLU6 -> ReLU, LeakyReLU exact
        assert torch.allclose(conv.model(x), expected, atol=1e-10)


# ---- 3. a real budget, plans, SNL ----------------------------------------------------------------------
def test_convert_at_a_budget_saves_and_reloads(tmp_path):
    from deepshare_convert.conversion.plan import Plan
    from deepshare_convert.conversion.rewrite import load, save

    loaded = load_model("timm:mobilenetv2_100", input_size="3,32,32", num_classes=10)
    model = _realistic(loaded.model, (3, 32, 32), batch=8)
    total = census(model, (3, 32, 32)).total_relus
    conv = convert(model, (3, 32, 32), budget="5%", spec=loaded.spec.to_dict())
    plan = conv.plan
    assert plan.total_relus == total and 0 < plan.achieved <= plan.budget == total // 20
    assert census(conv.model, (3, 32, 32)).total_relus == plan.achieved
    assert all(p.prototypes <= p.channels for p in plan.groups)
    save(conv, tmp_path / "out")
    Plan.read(tmp_path / "out")  # validation: relus = elements x 1 for every ReLU site of the decomposition
    back = load(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.model(x), conv.model(x), atol=1e-5)


def test_snl_masks_on_relu6_and_leaky_sites():
    from deepshare_convert.snl import SNLSearch, binarise, kept_counts, mask_relus, masked_relus

    model = _realistic(Clipped(general=False), (3, 6, 6)).double()
    masked = mask_relus(model, (3, 6, 6))
    masks = masked_relus(masked)
    assert list(masks) == [s.name for s in census(model, (3, 6, 6)).sites]
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * 3
    with torch.no_grad():
        assert torch.allclose(masked(x), model(x.clone()), atol=1e-10)  # all masks 1: the model
    # linearised elements are x: a leaky (one mask) and a ReLU6 (both its masks)
    probe = nn.Sequential(nn.ReLU6(), nn.LeakyReLU(0.2)).double()
    m = mask_relus(probe, (5,))
    v = torch.tensor([[-3.0, -0.5, 0.5, 4.0, 8.0]], dtype=torch.float64)
    with torch.no_grad():
        for mask in masked_relus(m).values():
            mask.mask.zero_()
        assert torch.allclose(m(v), v, atol=1e-12)
        masked_relus(m)["_1_relu"].mask.fill_(1.0)  # the leaky kept, the clip linear
        assert torch.allclose(m(v), F.leaky_relu(v, 0.2))
    # a few steps of the SNL search: the L1 penalty lowers the live count, binarised counts are the census's
    search = SNLSearch(budget=0, lam=1e-2)
    search.on_phase_start(masked)
    opt = torch.optim.Adam([mk.mask for mk in masks.values()], lr=0.1)
    y = torch.randint(0, 5, (4,))
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(masked(x), y) + search.extra_loss(masked)
        loss.backward()
        opt.step()
    kept = binarise(masked)
    assert sum(kept.values()) < census(model, (3, 6, 6)).total_relus
    assert census(masked, (3, 6, 6)).total_relus == sum(kept_counts(masked).values())


# ---- 4. two-party inference ------------------------------------------------------------------------------
needs_crypten = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")
MPC_SIZE, MPC_BATCH = (3, 6, 6), 4


def _margins(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per example, the smallest |input| of any comparison (gate prototypes or plain ReLU sites)."""
    from deepshare_convert.conversion.gates import PrototypeGate
    from deepshare_convert.mpc.lowering import prepare

    gm = prepare(net)
    mins = []

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target is torch.relu:
                mins.append(self.env[n.args[0]].abs().flatten(1).min(1).values)
            if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), PrototypeGate):
                p = self.module.get_submodule(n.target).prototypes
                mins.append(self.env[n.args[0]][:, :p].abs().flatten(1).min(1).values)
            return out

    with torch.no_grad():
        Probe(gm).run(x)
    return torch.stack(mins).min(0).values


@pytest.fixture(scope="module")
def mpc_nets():
    model = _realistic(Clipped(), MPC_SIZE, seed=1)
    conv = convert(model, MPC_SIZE, budget="40%")
    pool = torch.randn((16 * MPC_BATCH, *MPC_SIZE), generator=torch.Generator().manual_seed(1))
    order = torch.minimum(_margins(model, pool), _margins(conv.model, pool)).argsort(descending=True)
    return model, conv, pool[order[:MPC_BATCH].sort().values]


@needs_crypten
@pytest.mark.parametrize("which", ["original", "converted"])
def test_two_party_run_agrees_and_costs_what_the_model_says(mpc_nets, which, record_property):
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party

    model, conv, x = mpc_nets
    net = model if which == "original" else conv.model
    r = run_two_party(net, x, weights_mode="public", timeout=300)
    expected_cmp = (census(model, MPC_SIZE).total_relus if which == "original" else conv.plan.achieved) * MPC_BATCH
    assert r.parties[0].comparisons == r.parties[1].comparisons == expected_cmp
    assert r.top1_agreement == 1.0 and np.ptp(r.plaintext, axis=1).min() > 0.05
    record_property(which, {"max_logit_error": float(r.max_logit_error), "bytes": r.parties[0].bytes,
                            "rounds": r.parties[0].rounds})  # fmt: skip
    assert r.max_logit_error <= 1e-2
    est = estimate(net, MPC_SIZE, batch=MPC_BATCH, weights_mode="public")
    assert (est.bytes, est.rounds) == (r.parties[0].bytes, r.parties[0].rounds)
    assert est.comparisons == expected_cmp
