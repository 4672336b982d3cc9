"""`estimate-latency --what-if`: the same budget re-planned at group sizes 1, 2, 4.

A what-if row must be what `convert --group-size G` + `estimate-latency` gives (same planning
code), and the estimate of a row must be what two real parties measure (bytes and rounds).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")

BUDGET = "12k"  # ResNet-20 at 6K has no group-size-1 plan (one prototype per gate is 9,088 DReLUs)


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """ResNet-20 converted by the CLI at 6K DReLUs with group sizes 2 and 4."""
    from deepshare_convert.cli.app import run as cli

    root = tmp_path_factory.mktemp("whatif")
    paths = {}
    for g in (2, 4):
        paths[g] = str(root / f"r20-g{g}")
        assert cli(["convert", "resnet20", "--budget", BUDGET, "--group-size", str(g), "-o", paths[g], "--json"]) == 0
    return paths


def _estimate_json(capsys, *args) -> dict:
    from deepshare_convert.cli.app import run as cli

    capsys.readouterr()
    assert cli(["estimate-latency", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_what_if_row_equals_convert_then_estimate(outs, capsys):
    out2 = _estimate_json(capsys, outs[2], "--what-if", "--weights-mode", "private")
    rows = {r["group_size"]: r for r in out2["what_if"]}
    assert sorted(rows) == [1, 2, 4] and [g for g, r in rows.items() if r["own"]] == [2]
    out4 = _estimate_json(capsys, outs[4], "--weights-mode", "private")
    for g, out in ((2, out2), (4, out4)):  # the plan's own row and another group size's real conversion
        est, row = out["estimate"], rows[g]
        assert (row["bytes"], row["rounds"], row["drelus"], row["setup_bytes"]) == (
            est["bytes"], est["rounds"], est["comparisons"], est["setup_bytes"])  # fmt: skip
        assert row["latency_s"] == pytest.approx(est["latency_s"], rel=1e-12)
        assert row["speedup"] == pytest.approx(out["speedup"], rel=1e-12)
    # same budget, fewer gate layers: fewer comparison calls and rounds as G grows
    assert rows[1]["rounds"] > rows[2]["rounds"] > rows[4]["rounds"]
    assert rows[1]["compare_calls"] > rows[2]["compare_calls"] > rows[4]["compare_calls"]
    assert all(abs(r["drelus"] - 12000) < 12000 * 0.05 for r in rows.values())


def test_what_if_on_a_model_needs_a_budget(capsys):
    from deepshare_convert.cli.app import run as cli

    out = _estimate_json(capsys, "resnet20", "--what-if", "--budget", BUDGET)
    assert [r["group_size"] for r in out["what_if"]] == [1, 2, 4]
    assert all(r["speedup"] > 1 for r in out["what_if"])
    assert cli(["estimate-latency", "resnet20", "--what-if"]) != 0
    err = capsys.readouterr().err.strip()
    assert "needs --budget" in err and "\n" not in err


def test_an_infeasible_group_size_is_a_row_not_an_error(capsys):
    out = _estimate_json(capsys, "resnet20", "--what-if", "--budget", "50")  # less than one 8x8 channel
    assert all("buys no prototype" in r["infeasible"] and r["rounds"] is None for r in out["what_if"])
    out = _estimate_json(capsys, "resnet20", "--what-if", "--budget", "6k")  # G = 1: below the minimum, linear groups
    rows = {r["group_size"]: r for r in out["what_if"]}
    assert all(r["infeasible"] is None for r in rows.values()) and rows[4]["rounds"] < rows[2]["rounds"]


def test_budget_with_an_out_is_refused(outs, capsys):
    from deepshare_convert.cli.app import run as cli

    assert cli(["estimate-latency", outs[2], "--what-if", "--budget", "12k"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--budget is for an unconverted MODEL" in err and "\n" not in err


def _widest_margin(net, size, pool: int = 8) -> torch.Tensor:
    """Of ``pool`` random inputs, the one whose prototype inputs stay farthest from 0 (see tests/test_mpc.py)."""
    from deepshare_convert.conversion.gates import PrototypeGate

    xs = torch.randn((pool, *size), generator=torch.Generator().manual_seed(1))
    mins = []
    hooks = [m.register_forward_pre_hook(lambda m, a: mins.append(a[0][:, : m.prototypes].abs().flatten(1).min(1).values))
             for m in net.modules() if isinstance(m, PrototypeGate)]  # fmt: skip
    with torch.no_grad():
        net(xs)
    for h in hooks:
        h.remove()
    return xs[int(torch.stack(mins).min(0).values.argmax())][None]


def test_what_if_row_is_what_two_parties_measure():
    """The G = 4 row's bytes and rounds, measured on loopback by a real two-party run; outputs = plaintext."""
    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import convert
    from deepshare_convert.conversion.settings import settings_from
    from deepshare_convert.models.batchnorm import recalibrate_batchnorm
    from deepshare_convert.mpc.launcher import run_two_party
    from deepshare_convert.mpc.what_if import what_if

    torch.manual_seed(0)
    loaded = load_model("resnet20")
    model = recalibrate_batchnorm(loaded.model, loaded.input_size, batch=64, seed=0)  # O(1) activations, logits
    settings = settings_from(budget=BUDGET, group_size=2)
    row = next(r for r in what_if(model, loaded.input_size, settings, weights_mode="public") if r.group_size == 4)
    net = convert(model, loaded.input_size, settings.model_copy(update={"group_size": 4})).model
    run = run_two_party(net, _widest_margin(net, loaded.input_size), weights_mode="public", timeout=300)
    p0 = run.parties[0]
    assert (p0.bytes, p0.rounds, p0.comparisons) == (row.bytes, row.rounds, row.drelus)
    assert run.top1_agreement == 1.0 and run.max_logit_error < 1e-3


# ---- round depth: is any opening left that could share a round? -----------------------------------
class _TwoBranches(torch.nn.Module):
    """Two ReLUs of one input, independent of each other: 2 comparison calls, 1 on the critical path."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) + torch.relu(2 * y)


@pytest.mark.parametrize("mode", ["public", "private"])
def test_every_round_of_the_converted_resnets_is_on_the_dependency_chain(mode):
    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import convert
    from deepshare_convert.mpc.costs import CostTable
    from deepshare_convert.mpc.lowering import lower
    from deepshare_convert.mpc.prepare import prepare
    from deepshare_convert.mpc.rounds import independent_rounds, round_depth

    table = CostTable.load()
    loaded = load_model("resnet20")
    for g in (2, 4):
        net = convert(loaded.model, loaded.input_size, budget=BUDGET, group_size=g).model
        program = lower(prepare(net), (1, *loaded.input_size), mode)
        total = sum(table.node_rounds(o) for o in program.ops)
        assert round_depth(program, table) == total and independent_rounds(program, table) == 0
    two = lower(prepare(_TwoBranches()), (1, 3, 8, 8), mode)
    assert independent_rounds(two, table) == table.comparison_rounds  # the second branch's comparison
