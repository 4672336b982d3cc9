"""Private weights, setup once: ``W - b`` opened once per loaded model, then inferences open activations only.

Real two-party runs (two spawned processes over 127.0.0.1), one setup followed by several
inferences.  Measured bytes and rounds of each phase must equal the estimate exactly, the
outputs must agree with plaintext, and the client must still never hold a weight.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.test_mpc import _realistic, _weight_digests, inputs, model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")

OPEN_BYTES = 16  # per opened element (CrypTen's all_reduce: 8 B each way)
IMAGES = 3  # inferences after one setup

_RUNS: dict = {}


def digits_run():
    """The converted digits CNN (10%, random α, β): one setup, then IMAGES inferences of one image each."""
    from deepshare_convert.mpc.launcher import run_two_party

    if "digits" not in _RUNS:
        net, _, _ = model("digits_cnn", "10%")
        _RUNS["digits"] = run_two_party(net, inputs("digits_cnn", IMAGES), weights_mode="private", inventory=True,
                                        sequential=True, timeout=300)  # fmt: skip
    return _RUNS["digits"]


def test_sequential_inferences_agree_with_plaintext():
    r = digits_run()
    assert r.logits.shape[0] == IMAGES and r.top1_agreement == 1.0
    assert r.max_logit_error <= 1e-2
    assert np.ptp(r.plaintext, axis=1).min() > 0.05


def test_setup_and_every_online_phase_equal_the_estimate_exactly():
    from deepshare_convert.mpc.costs import estimate

    net, plan, size = model("digits_cnn", "10%")
    est = estimate(net, size, batch=1, weights_mode="private")
    for p in digits_run().parties:
        assert (p.setup_bytes, p.setup_rounds) == (est.setup_bytes, est.setup_rounds) == (p.setup["elements"] * OPEN_BYTES, 1)
        assert len(p.inferences) == IMAGES
        for run in p.inferences:
            assert (run["bytes"], run["rounds"]) == (est.bytes, est.rounds)
            assert run["comparisons"] == plan.achieved
        assert (p.bytes, p.rounds) == (IMAGES * est.bytes, IMAGES * est.rounds)
        per_node = {n.node: (n.bytes, n.rounds) for n in est.nodes}
        for node, m in p.per_node.items():  # the last inference, node by node
            assert per_node.get(node, (0, 0)) == (m["bytes"], m["rounds"]), node


def test_setup_opens_every_weight_once_and_later_inferences_open_no_weight():
    """Setup = 16 B per element of every weight, α, β; online each conv / linear opens its input only."""
    from deepshare_convert.conversion.gates import SharedGate
    from deepshare_convert.mpc.lowering import lower, prepare

    net, _, size = model("digits_cnn", "10%")
    gm = prepare(net)
    weights = sum(m.weight.numel() for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    weights += sum(2 * m.channels for m in gm.modules() if isinstance(m, SharedGate))
    program = lower(gm, (1, *size), "private")
    p0 = digits_run().parties[0]
    assert p0.setup["elements"] == program.setup_opened == weights
    last = p0.per_node
    for op in program.ops:
        if op.handler in ("conv2d", "linear"):
            x_elems = int(np.prod(op_input_shape(program, op.node)))
            assert last[op.node]["bytes"] == OPEN_BYTES * x_elems, op.node  # x - a only, no W - b
            assert last[op.node]["rounds"] == 1
    sites = [op for op in program.ops if op.handler == "site"]
    gates = [op for op in program.ops if op.handler == "gate"]
    for op in sites + gates:  # a site's x - a goes alone or with its gate's comparison (then the gate counts it)
        assert last[op.node]["bytes"] == OPEN_BYTES * op.opened + 432 * op.comparisons, op.node
    assert all(op.opened in (0, op.elements) and op.open_rounds == (op.opened > 0) for op in sites)
    # each site's x opened once, as in public mode (it was C + 2n elements in 2 rounds)
    assert sum(op.opened for op in sites + gates) == sum(op.elements for op in sites)
    first, second = p0.inferences[0], p0.inferences[1]
    assert first["bytes"] == second["bytes"] < OPEN_BYTES * weights  # below even one opening of the weights


def op_input_shape(program, node_name: str) -> tuple[int, ...]:
    node = next(n for n in program.gm.graph.nodes if n.name == node_name)
    return tuple(node.args[0].meta["tensor_meta"].shape)


def test_client_never_holds_weights_across_setup_and_inferences():
    r = digits_run()
    weights = _weight_digests("digits_cnn", "10%")
    server, client = (set(p.plaintext_digests) for p in r.parties)
    assert weights <= server, "the inventory must see the server's weights (else this test proves nothing)"
    assert not weights & client


def test_server_never_holds_inputs_or_outputs_across_inferences():
    from deepshare_convert.mpc.launcher import tensor_digest

    r = digits_run()
    x = inputs("digits_cnn", IMAGES).numpy()
    secret = {tensor_digest(x), tensor_digest(r.logits)} | {tensor_digest(x[i : i + 1]) for i in range(IMAGES)}
    assert not secret & set(r.parties[0].plaintext_digests)


class _Odd(nn.Module):
    """Fixed weights the ResNets do not have: a functional conv on a parameter used twice, an unfolded BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)
        self.short = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = self.bn(F.relu(self.conv(x)))  # after a ReLU: not folded, a per-channel secret scale
        y = F.relu(F.conv2d(y, self.w, padding=1)) + self.short(y)  # two products of y: one opening
        y = F.conv2d(y, self.w, padding=1)  # the same parameter again: masked once
        return self.fc(torch.flatten(F.avg_pool2d(y, 2), 1))


def test_functional_weights_shared_parameters_and_batchnorm_cost_exactly():
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party
    from deepshare_convert.mpc.lowering import lower, prepare

    torch.manual_seed(5)
    net = _realistic(_Odd(), (3, 8, 8), seed=5)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(6))
    r = run_two_party(net, x, weights_mode="private", sequential=True)
    assert r.top1_agreement == 1.0 and r.max_logit_error <= 1e-2
    program = lower(prepare(net), (1, 3, 8, 8), "private")
    assert sorted(program.fixed) == ["bn:scale", "conv.weight", "fc.weight", "short.weight", "w"]
    assert program.setup_opened == 4 * 3 * 9 + 4 + 4 * 4 * 9 + 4 * 4 + 3 * 64  # w counted once
    assert program.op("short").opened == 0 and program.op("conv2d").opened == 4 * 64  # y opened once for both
    est = estimate(net, (3, 8, 8), batch=1, weights_mode="private")
    for p in r.parties:
        assert (p.setup_bytes, p.setup_rounds) == (est.setup_bytes, est.setup_rounds) == (OPEN_BYTES * program.setup_opened, 1)
        assert [(i["bytes"], i["rounds"]) for i in p.inferences] == [(est.bytes, est.rounds)] * 2
        assert p.per_node["short"]["bytes"] == p.per_node["short"]["rounds"] == 0


def test_public_mode_has_no_setup():
    from deepshare_convert.mpc.costs import estimate

    net, _, size = model("digits_cnn", "10%")
    est = estimate(net, size, weights_mode="public")
    assert (est.setup_bytes, est.setup_rounds) == (0, 0)


def test_interpreter_refuses_private_run_without_setup():
    from deepshare_convert.errors import DeepShareError
    from deepshare_convert.mpc.executor import CrypTenInterpreter
    from deepshare_convert.mpc.lowering import lower, prepare

    net, _, size = model("digits_cnn", "10%")
    program = lower(prepare(net), (1, *size), "private")
    with pytest.raises(DeepShareError, match="not set up"):
        CrypTenInterpreter(program, 0)


def test_tables_show_setup_apart_from_online():
    from rich.console import Console

    from deepshare_convert.cli.mpc_tables import estimate_table, private_run_table
    from deepshare_convert.mpc.costs import estimate

    net, _, size = model("digits_cnn", "10%")
    est = estimate(net, size, weights_mode="private")
    console = Console(record=True, width=200)
    console.print(private_run_table(digits_run(), "digits"))
    console.print(estimate_table(est))
    text = console.export_text()
    assert f"one setup, then {IMAGES} inferences" in text and "setup MB" in text and "online MB" in text
    assert f"setup, once per loaded model (every weight's W - b opened): {est.setup_bytes / 1e6:,.2f} MB" in text
