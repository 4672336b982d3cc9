"""SNL's binarised MaskedReLU under two-party inference: agreement, exact counts, the cost model, OUT/ dirs.

The digits CNN (untrained, BatchNorm statistics from data) with SNL masks at its four sites, binarised
to fixed random patterns: one site keeps nothing, one everything, two a part.  The two-party runs are
real (two spawned processes over gloo), one per weights mode, shared through a module cache.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepshare_convert import census, load_model
from deepshare_convert.errors import DeepShareError
from deepshare_convert.models.batchnorm import recalibrate_batchnorm
from deepshare_convert.snl import kept_counts, mask_relus, masked_relus

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")

BATCH = 4
KEEP = (0.0, 0.3, 1.0, 0.5)  # per site, the chance a neuron stays a ReLU: all off, partial, all on, partial
MODES = ["public", "private"]


def _original() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    loaded = load_model("digits_cnn")
    return recalibrate_batchnorm(loaded.model, loaded.input_size, batch=64, seed=0), tuple(loaded.input_size)


def _binarised(model: nn.Module, size) -> nn.Module:
    """SNL masks at every site, binarised to the KEEP patterns (bool ``keep`` buffers)."""
    gm = mask_relus(model, size, binary=True)
    g = torch.Generator().manual_seed(1)
    masks = masked_relus(gm)
    assert len(masks) == len(KEEP)
    for m, p in zip(masks.values(), KEEP):
        m.keep.copy_(torch.rand(m.shape, generator=g) < p)
    return gm


_CACHE: dict = {}


def snl():
    """(original, SNL model, input size, inputs), built once."""
    if "model" not in _CACHE:
        orig, size = _original()
        x = torch.randn((BATCH, *size), generator=torch.Generator().manual_seed(2))
        _CACHE["model"] = (orig, _binarised(orig, size), size, x)
    return _CACHE["model"]


def run(mode: str):
    from deepshare_convert.mpc.launcher import run_two_party

    if mode not in _CACHE:
        _, net, _, x = snl()
        _CACHE[mode] = run_two_party(net, x, weights_mode=mode, timeout=300)
    return _CACHE[mode]


def kept() -> int:
    return sum(kept_counts(snl()[1]).values())


def test_masks_are_mixed():
    counts, shapes = list(kept_counts(snl()[1]).values()), [m.shape for m in masked_relus(snl()[1]).values()]
    full = [int(np.prod(s)) for s in shapes]
    assert counts[0] == 0 and counts[2] == full[2] and 0 < counts[1] < full[1] and 0 < counts[3] < full[3]


# ---- agreement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_two_party_inference_agrees_with_plaintext(mode):
    from deepshare_convert.mpc.prepare import prepare, reference

    orig, net, _, x = snl()
    r = run(mode)
    clear = reference(prepare(net), x).numpy()
    np.testing.assert_array_equal(r.plaintext, clear)
    assert (r.logits.argmax(1) == clear.argmax(1)).all(), "top-1 differs on some example"
    assert np.abs(r.logits - clear).max() <= 1e-2
    assert np.ptp(clear, axis=1).min() > 0.05, "degenerate logits would make top-1 agreement vacuous"
    # the masks matter: the SNL model is neither the original nor the fully linear network
    assert np.abs(clear - reference(prepare(orig), x).numpy()).max() > 0.05
    assert r.weights_mode == mode and r.parties[0].bytes == r.parties[1].bytes > 0


# ---- counts and the cost model -----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_comparisons_counted_equal_kept_relus(mode):
    r = run(mode)
    assert r.parties[0].comparisons == r.parties[1].comparisons == r.comparisons_expected == kept() * BATCH


@pytest.mark.parametrize("mode", MODES)
def test_measured_bytes_and_rounds_equal_the_estimate(mode):
    from deepshare_convert.mpc.costs import estimate

    _, net, size, _ = snl()
    est = estimate(net, size, batch=BATCH, weights_mode=mode)
    p0 = run(mode).parties[0]
    assert est.comparisons == kept() * BATCH
    assert (est.bytes, est.rounds) == (p0.bytes, p0.rounds)
    assert (est.setup_bytes, est.setup_rounds) == (p0.setup_bytes, p0.setup_rounds)
    per_node = {n.node: (n.bytes, n.rounds) for n in est.nodes}
    for node, m in p0.per_node.items():
        assert per_node.get(node, (0, 0)) == (m["bytes"], m["rounds"]), node


def test_each_site_costs_its_kept_relus():
    """All off: nothing; all on: exactly the original's ReLU; partial: kept x (comparison + product)."""
    from deepshare_convert.mpc.costs import CostTable, estimate

    orig, net, size, _ = snl()
    table = CostTable.load()
    est = {n.node: n for n in estimate(net, size, batch=BATCH).nodes}
    plain = {n.node: n for n in estimate(orig, size, batch=BATCH).nodes}
    for (site, m), p in zip(masked_relus(net).items(), KEEP):
        node = est.get(f"snl_masks_{site}")
        k = int(m.keep.sum()) * BATCH
        if p == 0.0:
            assert node is None
            continue
        assert (node.comparisons, node.rounds) == (k, table.comparison_rounds)
        assert node.bytes == round(k * (table.comparison_bytes + table.open_bytes))
        if p == 1.0:
            assert (node.bytes, node.rounds) == (plain[site].bytes, plain[site].rounds)


def test_a_float_mask_is_refused_in_one_line():
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party

    orig, _, size, x = snl()
    searching = mask_relus(orig, size)  # float masks: a search in progress
    for call in (lambda: estimate(searching, size), lambda: run_two_party(searching, x[:1])):
        with pytest.raises(DeepShareError, match="binarise") as e:
            call()
        assert "\n" not in str(e.value) and "snl_masks" in str(e.value)


# ---- an SNL output directory -------------------------------------------------------------------
@pytest.fixture(scope="module")
def snl_out(tmp_path_factory):
    """An SNL run's model files (plan.json of kind snl + model.safetensors), as `deepshare snl` writes them."""
    from deepshare_convert.conversion.rewrite import save
    from deepshare_convert.snl import snl_plan

    orig, net, size, _ = snl()
    plan = snl_plan(census(orig, size), kept_counts(net), spec=load_model("digits_cnn").spec.to_dict(),
                    budget=kept(), budget_requested=str(kept()))  # fmt: skip
    out = tmp_path_factory.mktemp("snl") / "out"
    save(net, out, plan=plan)
    return out


def test_cli_estimate_latency_on_an_snl_dir(snl_out, capsys):
    from deepshare_convert.cli.app import run as cli

    assert cli(["estimate-latency", str(snl_out), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    est, orig = out["estimate"], out["original"]
    assert est["comparisons"] == kept()
    assert orig["comparisons"] == census(snl()[0], snl()[2]).total_relus
    assert out["speedup_network"] > 1


def test_party_one_rebuilds_the_same_program_from_plan_and_masks(snl_out):
    """--rank 1 in private mode reads plan.json and the masks (public), no weight: same plan hash as party 0."""
    from deepshare_convert.model_or_out import load_any
    from deepshare_convert.mpc.handshake import plan_digest
    from deepshare_convert.mpc.lowering import lower
    from deepshare_convert.mpc.prepare import prepare, strip_weights
    from deepshare_convert.serving.artifacts import architecture_only

    cm = architecture_only(str(snl_out))
    arch, size = cm.model, cm.input_size
    server = load_any(str(snl_out)).model
    for name, m in masked_relus(arch).items():
        assert torch.equal(m.keep, masked_relus(snl()[1])[name].keep)
    shape = (1, *size)
    client = plan_digest(lower(strip_weights(prepare(arch)), shape, "private"))
    assert client == plan_digest(lower(prepare(server), shape, "private"))


def test_segmentation_model_costs_under_snl():
    """bench/segmentation.py's cost() path: DeepLabV3-MobileNetV2 at 3x48x64 with binarised masks."""
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.snl import binarise

    loaded = load_model("deeplabv3_mobilenetv2", input_size=(3, 48, 64))
    gm = mask_relus(loaded.model, (3, 48, 64))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in masked_relus(gm).values():
            m.mask.copy_((torch.rand(m.shape, generator=g) < 0.1).float())
    counts = binarise(gm)
    est = estimate(gm, (3, 48, 64))
    assert est.comparisons == sum(counts.values()) > 0
    assert est.comparisons < 0.2 * census(loaded.model, (3, 48, 64)).total_relus
