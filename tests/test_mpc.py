"""Two-party CrypTen inference: agreement, exact comparison counts, the cost model, who holds what.

Every two-party run here is real: two spawned processes talking gloo over 127.0.0.1.  Runs are
shared between tests through module-scoped caches (each costs a few seconds, mostly process
start-up), so the whole file stays around a minute and a half on two cores.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepshare_convert.conversion.gates import SharedGate
from deepshare_convert.errors import DeepShareError
from deepshare_convert.models.batchnorm import recalibrate_batchnorm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")

CROSSCHECK_BYTES_PER_COMPARISON = 432  # CrypTen 0.4.1's DReLU, measured (the issue's number)


# ---- models ------------------------------------------------------------------------------------
def _realistic(model: nn.Module, input_size, seed: int) -> nn.Module:
    """Untrained weights, but BatchNorm statistics from data so activations and logits are O(1)."""
    return recalibrate_batchnorm(model, input_size, batch=64, seed=seed)


def _random_gates(gm: nn.Module, seed: int) -> nn.Module:
    """α, β away from their (1, 0) start, so the tests see the per-channel affine at work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, SharedGate):
                m.alpha.uniform_(0.5, 1.5, generator=g)
                m.beta.uniform_(-0.1, 0.1, generator=g)
    return gm


# ResNet-20 keeps the fresh conversion's α = 1, β = 0 (see _inputs: its gates cannot all have margins)
RANDOM_GATES = {"digits_cnn": True, "resnet20": False}


def _build(name: str, budget: str | None, seed: int = 0):
    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import convert

    torch.manual_seed(seed)
    loaded = load_model(name)
    model = _realistic(loaded.model, loaded.input_size, seed)
    if budget is None:
        return model, None, loaded.input_size
    conv = convert(model, loaded.input_size, budget=budget, spec=loaded.spec.to_dict())
    net = _random_gates(conv.model, seed + 1) if RANDOM_GATES[name] else conv.model
    return net, conv.plan, loaded.input_size


_MODELS: dict = {}
_RUNS: dict = {}
_INPUTS: dict = {}


def model(name: str, budget: str | None):
    key = (name, budget)
    if key not in _MODELS:
        _MODELS[key] = _build(name, budget)
    return _MODELS[key]


def gate_margins(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per example, the smallest |input| of any comparison (prototype or plain ReLU) in plaintext."""
    from deepshare_convert.conversion.gates import PrototypeGate

    mins = []
    hooks = [m.register_forward_pre_hook(lambda m, a: mins.append(a[0][:, : m.prototypes].abs().flatten(1).min(1).values))
             for m in net.modules() if isinstance(m, PrototypeGate)]  # fmt: skip
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(mins).min(0).values


def inputs(name: str, batch: int) -> torch.Tensor:
    """Test inputs.  With 16 fractional bits a gate input within ~1e-4 of zero may take the other
    side in MPC -- and in DeepShare a prototype's flip moves all its replicas.  So the examples
    are drawn (deterministically, from plaintext only) among those whose gate inputs keep the
    largest distance from zero; docs/private_inference.md discusses the effect.
    """
    key = (name, batch)
    if key not in _INPUTS:
        _, _, size = model(name, None)
        pool = torch.randn((8 * batch, *size), generator=torch.Generator().manual_seed(1))
        net, _, _ = model(name, "10%" if name == "digits_cnn" else "15k")
        order = gate_margins(net, pool).argsort(descending=True)
        _INPUTS[key] = pool[order[:batch].sort().values]
    return _INPUTS[key]


def run(name: str, budget: str | None, mode: str, batch: int):
    """Run (once per session) a two-party inference with plaintext inventories of both parties."""
    from deepshare_convert.mpc.launcher import run_two_party

    key = (name, budget, mode, batch)
    if key not in _RUNS:
        net, _, _ = model(name, budget)
        _RUNS[key] = run_two_party(net, inputs(name, batch), weights_mode=mode, inventory=True, timeout=300)
    return _RUNS[key]


DIGITS_BATCH = 8
CASES = [  # (model, budget, weights mode, batch)
    ("digits_cnn", "10%", "public", DIGITS_BATCH),
    ("digits_cnn", "10%", "private", DIGITS_BATCH),
    ("resnet20", "15k", "public", 2),
    ("resnet20", "15k", "private", 1),
]


# ---- agreement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,budget,mode,batch", CASES)
def test_two_party_inference_agrees_with_plaintext(name, budget, mode, batch):
    """Plaintext = the same deployed model in float64: BN folded, weights on the coefficient grid."""
    from deepshare_convert.mpc.prepare import prepare, reference

    r = run(name, budget, mode, batch)
    net, _, _ = model(name, budget)
    clear = reference(prepare(net), inputs(name, batch)).numpy()
    np.testing.assert_array_equal(r.plaintext, clear)  # the launcher compares with this, computed here
    assert r.logits.shape == clear.shape
    assert (r.logits.argmax(1) == clear.argmax(1)).all(), "top-1 differs on some example"
    assert np.abs(r.logits - clear).max() <= 1e-2
    assert np.ptp(clear, axis=1).min() > 0.05, "degenerate logits would make top-1 agreement vacuous"
    assert r.weights_mode == mode and r.parties[0].bytes == r.parties[1].bytes > 0


def test_two_threads_per_party_give_the_answer_of_one():
    """Each party on 2 threads (its ring kernels then timed and chosen per layer, as on a multi-core host)."""
    from deepshare_convert.mpc.launcher import run_two_party

    one = run("resnet20", "15k", "public", 2)
    net, _, _ = model("resnet20", "15k")
    two = run_two_party(net, inputs("resnet20", 2), weights_mode="public", threads=2, timeout=300)
    np.testing.assert_array_equal(two.plaintext, one.plaintext)
    assert (two.logits.argmax(1) == two.plaintext.argmax(1)).all()
    err1, err2 = (float(np.abs(r.logits - r.plaintext).max()) for r in (one, two))
    assert err2 <= max(2 * err1, 1e-4), (err1, err2)  # the same fixed-point error, not a wrong kernel's
    assert (two.parties[0].bytes, two.parties[0].rounds) == (one.parties[0].bytes, one.parties[0].rounds)


# ---- comparisons = the plan's DReLUs -----------------------------------------------------------
@pytest.mark.parametrize("name,budget,mode,batch", CASES)
def test_comparisons_counted_equal_plan_drelus(name, budget, mode, batch):
    r = run(name, budget, mode, batch)
    _, plan, _ = model(name, budget)
    assert r.parties[0].comparisons == r.parties[1].comparisons == plan.achieved * batch


@pytest.mark.parametrize("mode", ["public", "private"])
def test_bytes_move_by_exactly_one_comparison_per_drelu(mode):
    """Same architecture and sites, two budgets: bytes differ by exactly 432 B per extra DReLU."""
    from deepshare_convert.mpc.costs import CostTable

    small = run("digits_cnn", "10%", mode, DIGITS_BATCH)
    big = run("digits_cnn", "20%", mode, DIGITS_BATCH)
    extra = (model("digits_cnn", "20%")[1].achieved - model("digits_cnn", "10%")[1].achieved) * DIGITS_BATCH
    assert extra > 0
    assert big.parties[0].bytes - small.parties[0].bytes == CROSSCHECK_BYTES_PER_COMPARISON * extra
    assert CostTable.load().comparison_bytes == CROSSCHECK_BYTES_PER_COMPARISON
    assert big.parties[0].rounds == small.parties[0].rounds  # one comparison call per group either way


def test_original_model_runs_every_relu_as_a_comparison():
    from deepshare_convert.conversion.census import census

    net, _, size = model("digits_cnn", None)
    r = run("digits_cnn", None, "public", DIGITS_BATCH)
    assert r.parties[0].comparisons == census(net, size).total_relus * DIGITS_BATCH
    assert r.top1_agreement == 1.0 and r.max_logit_error <= 1e-2


# ---- the cost model ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,budget,mode,batch",
    [("digits_cnn", None, "public", DIGITS_BATCH), *CASES],
)
def test_estimator_within_two_percent_of_measured(name, budget, mode, batch):
    from deepshare_convert.mpc.costs import estimate

    net, _, size = model(name, budget)
    est = estimate(net, size, batch=batch, weights_mode=mode)
    measured = run(name, budget, mode, batch).parties[0]
    assert abs(est.bytes - measured.bytes) <= 0.02 * measured.bytes
    assert abs(est.rounds - measured.rounds) <= 0.02 * measured.rounds
    per_node = {n.node: n.bytes for n in est.nodes}
    for node, m in measured.per_node.items():  # and node by node
        assert per_node.get(node, 0) == m["bytes"], node


def test_converted_public_mode_is_cheaper_than_original():
    from deepshare_convert.mpc.costs import estimate

    conv, _, size = model("resnet20", "15k")
    orig, _, _ = model("resnet20", None)
    e_conv = estimate(conv, size, weights_mode="public")
    e_orig = estimate(orig, size, weights_mode="public")
    assert e_orig.bytes / e_conv.bytes > 5
    assert e_orig.network_s / e_conv.network_s > 3


# ---- who holds what ----------------------------------------------------------------------------
def _weight_digests(name: str, budget: str | None) -> set[str]:
    from deepshare_convert.mpc.launcher import tensor_digest
    from deepshare_convert.mpc.lowering import prepare

    net, _, _ = model(name, budget)
    folded = prepare(net)
    tensors = [t for t in list(folded.parameters()) + list(folded.buffers()) if t.is_floating_point()]
    tensors += [m.alpha for m in folded.modules() if isinstance(m, SharedGate)]
    tensors += [m.beta for m in folded.modules() if isinstance(m, SharedGate)]
    return {tensor_digest(t.detach().float()) for t in tensors if t.abs().sum() > 0}


@pytest.mark.parametrize("budget", ["10%", "100"])  # 100 DReLUs: below one prototype per group, a linear group
def test_private_mode_client_never_holds_weights_alpha_beta(budget):
    r = run("digits_cnn", budget, "private", DIGITS_BATCH)
    weights = _weight_digests("digits_cnn", budget)
    if budget == "100":
        assert 0 in [g.prototypes for g in model("digits_cnn", budget)[1].groups]
    server, client = (set(p.plaintext_digests) for p in r.parties)
    assert weights <= server, "the inventory must see the server's weights (else this test proves nothing)"
    assert not weights & client


def test_public_mode_client_does_hold_weights():
    """The contrast that makes the private-mode test meaningful: public mode does share them."""
    r = run("digits_cnn", "10%", "public", DIGITS_BATCH)
    assert _weight_digests("digits_cnn", "10%") <= set(r.parties[1].plaintext_digests)


@pytest.mark.parametrize("mode", ["public", "private"])
def test_server_never_holds_input_or_output(mode):
    from deepshare_convert.mpc.launcher import tensor_digest

    r = run("digits_cnn", "10%", mode, DIGITS_BATCH)
    x = inputs("digits_cnn", DIGITS_BATCH).numpy()
    secret = {tensor_digest(x), tensor_digest(r.logits)}
    server, client = (set(p.plaintext_digests) for p in r.parties)
    assert secret <= client, "the client holds its input and the output"
    assert not secret & server
    assert r.parties[0].output is None and r.parties[1].output is not None


# ---- lowering: folding and refusals ------------------------------------------------------------
def test_batchnorm_is_folded_and_outputs_unchanged():
    from deepshare_convert.mpc.fixed_point import WEIGHT_SCALE
    from deepshare_convert.mpc.lowering import prepare

    for name, budget in (("resnet20", None), ("digits_cnn", "10%")):
        net, _, size = model(name, budget)
        folded = prepare(net, precision_bits=None)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        x = torch.randn((2, *size))
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), atol=1e-4, rtol=1e-4)
        snapped = prepare(net)
        scaled = torch.cat([t.detach().flatten().double() * WEIGHT_SCALE for t in snapped.parameters()])
        assert torch.equal(scaled, scaled.round())  # on the coefficient grid


def test_unsupported_op_is_a_one_line_error_naming_the_node():
    from deepshare_convert.mpc.lowering import lower, prepare

    class Sig(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    with pytest.raises(DeepShareError) as e:
        lower(prepare(Sig()), (1, 4), "public")
    assert "'sigmoid'" in str(e.value) and "\n" not in str(e.value)


def test_gelu_gates_run_as_step_gates_under_mpc():
    import copy

    from deepshare_convert.conversion.gates import PrototypeGate, set_gate_mode
    from deepshare_convert.mpc.lowering import lower, prepare

    net, plan, size = model("digits_cnn", "10%")
    gelu = copy.deepcopy(net)
    set_gate_mode(gelu, "gelu")
    program = lower(prepare(gelu), (2, *size), "public")
    assert program.comparisons == 2 * plan.achieved
    assert all(m.mode == "step" for m in program.gm.modules() if isinstance(m, PrototypeGate))
    assert all(m.mode == "gelu" for m in gelu.modules() if isinstance(m, PrototypeGate))  # caller's copy untouched


def test_bad_weights_mode_is_refused():
    from deepshare_convert.mpc.launcher import run_two_party

    net, _, size = model("digits_cnn", None)
    with pytest.raises(DeepShareError, match="weights-mode"):
        run_two_party(net, torch.zeros((1, *size)), weights_mode="secret")


# ---- CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    from deepshare_convert.conversion.rewrite import Converted, save

    net, plan, _ = model("digits_cnn", "10%")
    return str(save(Converted(net, plan), tmp_path_factory.mktemp("mpc") / "digits-10pct"))


def test_cli_estimate_latency_json(digits_out, capsys):
    from deepshare_convert.cli.app import run as cli

    assert cli(["estimate-latency", digits_out, "--bandwidth", "100Mbps", "--rtt", "2ms", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    est, orig = out["estimate"], out["original"]
    assert est["comparisons"] == model("digits_cnn", "10%")[1].achieved
    assert est["bandwidth_bps"] == 1e8 and est["rtt_s"] == 0.002
    assert out["speedup"] == pytest.approx(orig["latency_s"] / est["latency_s"]) and out["speedup"] > 1


def test_cli_private_infer_on_digits(digits_out, capsys):
    from deepshare_convert.cli.app import run as cli

    assert cli(["private-infer", digits_out, "--data", "digits", "--batch-size", "4", "--weights-mode", "private", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights_mode"] == "private" and out["batch"] == 4
    assert out["top1_agreement"] == 1.0 and out["max_logit_error"] <= 1e-2
    assert out["comparisons"] == out["comparisons_expected"] == 4 * model("digits_cnn", "10%")[1].achieved
    assert out["dealer"] == "separate" and "warning" not in out  # three processes by default
    assert out["offline"]["bytes"] == out["offline"]["bytes_expected"] > 0 and out["offline"]["messages"] == 1


def test_cli_simulated_dealer_says_it_is_not_private(digits_out, capsys):
    from deepshare_convert.cli.app import run as cli

    assert cli(["private-infer", digits_out, "--data", "digits", "--batch-size", "2", "--dealer", "simulated"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "NOT private against the server" in text
    assert cli(["private-infer", digits_out, "--data", "digits", "--batch-size", "2", "--dealer", "ttp"]) != 0


def test_cli_errors_are_one_line(digits_out, capsys):
    from deepshare_convert.cli.app import run as cli

    assert cli(["estimate-latency", digits_out, "--bandwidth", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepshare: error: --bandwidth") and "\n" not in err


def test_calibration_reproduces_the_shipped_cost_table(tmp_path):
    """`deepshare calibrate` re-measures CrypTen; the package's table must be what it measures."""
    from deepshare_convert.mpc.calibrate import calibrate
    from deepshare_convert.mpc.costs import CostTable

    shipped = CostTable.load()
    fresh = calibrate(tmp_path / "t.json", quick=True)
    assert CostTable.load(tmp_path / "t.json") == fresh
    for field in ("comparison_bytes", "comparison_rounds", "open_bytes", "open_rounds", "reveal_bytes", "reveal_rounds"):
        assert getattr(fresh, field) == getattr(shipped, field), field
    assert fresh.reference["crypten_relu"] == {"bytes_per_element": 464, "rounds": 9}
    assert fresh.reference["crypten_mul"] == {"bytes_per_element": 32, "rounds": 1}
    assert all(v > 0 for v in fresh.compute.values())


class _Zoo(nn.Module):
    """One of every op the executor translates that the built-in ResNets do not exercise."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(16, 8, 1, bias=False)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        y = self.pool(self.bn(self.conv(x)).relu())  # Tensor.relu, max-pool 3x3/2 with padding
        y = torch.cat([y, torch.nn.functional.pad(y[:, :, ::1, ::1] * 0.5, (0, 0, 0, 0))], dim=1)
        y = torch.nn.functional.relu(self.conv2(y)) - y[:, :8] / 4
        y = torch.nn.functional.avg_pool2d(self.drop(y), 2)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 2), 1))


class _Constants(nn.Module):
    """Public numbers off the 2^-8 weight grid: an unfolded BatchNorm, a LeakyReLU's slope, ``x * 0.3``, ``x / 3``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.leak = nn.LeakyReLU(0.01)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        y = self.bn(torch.relu(self.conv(x)))  # after a ReLU, so it is not folded into the conv
        return self.fc((self.leak(y) * 0.3 + y / 3).flatten(1))


def test_public_constants_off_the_weight_grid_are_used_as_the_reference_uses_them():
    """Rounded to the weights' 2^-8 grid, 0.3 or 0.01 would be off by 0.3% or 17%: MPC would run another model."""
    from deepshare_convert.mpc.fixed_point import on_weight_grid
    from deepshare_convert.mpc.launcher import run_two_party
    from deepshare_convert.mpc.prepare import prepare

    torch.manual_seed(5)
    net = _realistic(_Constants(), (3, 8, 8), seed=5)
    bn = [m for m in prepare(net).modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 1 and on_weight_grid(bn[0].weight) and on_weight_grid(bn[0].bias) and bn[0].eps == 0
    assert torch.equal(bn[0].running_var, torch.ones(6)) and torch.equal(bn[0].running_mean, torch.zeros(6))
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(6))
    r = run_two_party(net, x, weights_mode="public")
    # measured 3.8e-6; with the constants on the weight grid, 6.2e-4
    assert np.ptp(r.plaintext, axis=1).min() > 0.05 and r.max_logit_error <= 1e-4, r.max_logit_error


def test_other_ops_run_and_cost_exactly():
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party

    torch.manual_seed(3)
    net = _realistic(_Zoo(), (3, 8, 8), seed=3)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    r = run_two_party(net, x, weights_mode="public")
    assert r.top1_agreement == 1.0 and r.max_logit_error <= 1e-2
    est = estimate(net, (3, 8, 8), batch=2, weights_mode="public")
    assert (est.bytes, est.rounds) == (r.parties[0].bytes, r.parties[0].rounds)
    # ReLUs: 2*8*8*8 + 2*8*4*4 elements; max-pool: 8 comparisons for each of 2*8*4*4 outputs
    assert r.parties[0].comparisons == 2 * 8 * 64 + 2 * 8 * 16 + 8 * 2 * 8 * 16
