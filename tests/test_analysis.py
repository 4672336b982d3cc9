"""Gate analysis: ED on constructed data, the shuffle, converted-model statistics, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from deepshare_convert.cli.app import run

from deepshare_convert.analysis import (  # isort: skip (one compact list, see pyproject)
    GateCovariance, affine_summary, analyze, analyze_dataset, ed_counts, effective_dimension, shuffle_positions,
    suggest_prototypes, write_ed_counts,
)  # fmt: skip
from deepshare_convert.errors import DataError, DeepShareError
from deepshare_convert.model_or_out import load_any
from deepshare_convert.models import LoadedModel

from .conftest import CIFAR10_JPG, RESNET20_WEIGHTS, needs


def _fair(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2, (n, d), generator=torch.Generator().manual_seed(seed)).bool()


def _ed(gates: torch.Tensor, batch: int = 1000) -> float:
    """Normalised ED of (N, d) gates at one position, added in batches (the streaming path)."""
    cov = GateCovariance(gates.shape[1], 1)
    for chunk in gates.split(batch):
        cov.add(chunk.unsqueeze(-1))
    return float(cov.normalised_ed()[0])


# ---- effective dimension on constructed data ------------------------------------------------
def test_independent_fair_gates_have_full_dimension():
    assert _ed(_fair(40_000, 16)) == pytest.approx(1.0, abs=0.01)


def test_identical_channels_have_dimension_one():
    d = 12
    assert _ed(_fair(5_000, 1).expand(-1, d)) * d == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("k", [2, 5])
def test_independent_blocks_of_identical_channels_count_as_blocks(k):
    blocks = _fair(40_000, k, seed=k).repeat_interleave(4, dim=1)  # k blocks of 4 identical channels
    assert _ed(blocks) * blocks.shape[1] == pytest.approx(k, rel=0.01)


def test_effective_dimension_is_exact_on_known_spectra_and_nan_when_constant():
    assert float(effective_dimension(torch.eye(7))) == pytest.approx(7.0, abs=1e-12)
    assert float(effective_dimension(torch.diag(torch.tensor([3.0, 1.0])))) == pytest.approx(16 / 10, abs=1e-12)
    assert math.isnan(float(effective_dimension(torch.zeros(3, 3))))


def test_streaming_equals_one_batch():
    gates = _fair(3_000, 6).view(300, 6, 10)  # 300 examples, 6 channels, 10 positions
    one, many = GateCovariance(6, 10), GateCovariance(6, 10)
    one.add(gates)
    for chunk in gates.split(7):
        many.add(chunk)
    assert torch.allclose(one.covariance(), many.covariance(), atol=1e-14)


# ---- the shuffle --------------------------------------------------------------------------------
def test_shuffle_keeps_every_channel_marginal_exactly():
    gates = torch.rand(8, 5, 37, generator=torch.Generator().manual_seed(1))
    shuffled = shuffle_positions(gates, torch.Generator().manual_seed(2))
    assert torch.equal(shuffled.sort(-1).values, gates.sort(-1).values)  # same values in every (example, channel)
    assert not torch.equal(shuffled, gates)
    again = shuffle_positions(gates, torch.Generator().manual_seed(2))
    assert torch.equal(shuffled, again)  # seeded: deterministic


def test_shuffle_destroys_alignment():
    """Channels equal to one spatial pattern: ED 1 aligned, far higher once positions are shuffled."""
    n, d, p = 2_000, 8, 64
    gates = _fair(n * p, 1).view(n, 1, p).expand(n, d, p)
    aligned, shuffled, g = GateCovariance(d, p), GateCovariance(d, p), torch.Generator().manual_seed(0)
    for chunk in gates.split(250):
        aligned.add(chunk)
        shuffled.add(shuffle_positions(chunk, g))
    assert float(aligned.normalised_ed().max()) * d == pytest.approx(1.0, abs=1e-9)
    assert float(shuffled.normalised_ed().median()) > 0.9


# ---- models -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_any("digits_cnn")


def _converted(digits, budget: str, group_size: int) -> LoadedModel:
    from deepshare_convert.conversion.rewrite import convert

    c = convert(digits.model, digits.input_size, budget=budget, group_size=group_size)
    return LoadedModel(c.model, digits.spec, digits.input_size, digits.mean, digits.std), c.plan


def test_original_report_has_one_entry_per_site(digits):
    r = analyze_dataset(digits, "digits", num_images=96, batch_size=32)
    assert [s.name for s in r.sites] == ["features_2", "features_5", "features_8", "features_12"]
    assert not r.converted and r.num_images == 96
    for s in r.sites:
        summary = s.summary()
        assert 0 < summary["aligned_median"] <= 1 and 0 < summary["shuffled_median"] <= 1
        assert len(s.aligned) == len(s.shuffled) == s.spatial


def test_converted_at_full_budget_agrees_everywhere(digits):
    model, _ = _converted(digits, "100%", group_size=1)
    r = analyze_dataset(model, "digits", num_images=64, batch_size=32)
    assert r.converted
    for s in r.sites:
        assert s.agreement == 1.0 and s.affine_agreement == 1.0 and s.replicate_agreement is None
        summary = s.summary()
        assert summary["near_linear"] == 0 and summary["prototypes_positive"] == s.channels
        assert summary["replicate_spread_deg"] is None


def test_converted_report_flags_prototypes_and_replicates(digits):
    model, plan = _converted(digits, "30%", group_size=2)
    r = analyze_dataset(model, "digits", num_images=64, batch_size=32)
    by_name = {s.name: s for s in r.sites}
    for g in plan.groups:
        lead = by_name[g.leader]
        assert lead.leader and sum(lead.prototype) == g.prototypes
        for name in g.sites[1:]:
            assert not by_name[name].leader and not any(by_name[name].prototype)
    for s in r.sites:
        assert 0 < s.agreement < 1 and 0 < s.replicate_agreement < 1
        assert s.summary()["replicate_spread_deg"] == 0.0  # untrained: every replicate at (beta, alpha) = (0, 1)


def test_flip_exposure_counts_prototype_inputs_near_zero_exactly(digits):
    """The margins equal a direct count: prototype inputs within k ulps, times the gates each one serves."""
    from deepshare_convert.analysis import analyze
    from deepshare_convert.analysis.margins import THRESHOLDS, ULP
    from deepshare_convert.conversion.gates import PrototypeGate

    model, plan = _converted(digits, "30%", group_size=2)
    images = torch.randn(24, *digits.input_size, generator=torch.Generator().manual_seed(0)) * 1e-5  # near 0
    seen = {}
    gates = {name: m for name, m in model.model.named_modules() if isinstance(m, PrototypeGate)}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach().double()))
             for name, m in gates.items()]  # fmt: skip
    with torch.no_grad():
        model.model.eval()(images)
    for h in hooks:
        h.remove()
    r = analyze(model.model, digits.input_size, [images[:16], images[16:]])
    m = r.to_dict()["margins"]
    for g, got in zip(plan.groups, m["groups"]):
        gate = gates[f"deepshare_gates.g{g.index}"]
        ulps = seen[f"deepshare_gates.g{g.index}"][:, : g.prototypes].abs() / ULP
        served = torch.bincount(gate.mapping, minlength=g.prototypes).double() * len(g.sites)
        for k in THRESHOLDS:
            hit = (ulps <= k).flatten(2).sum((0, 2)).double()
            assert got["within_per_inference"][k] == pytest.approx(float(hit.sum()) / 24)
            assert got["gates_served_per_inference"][k] == pytest.approx(float((hit * served).sum()) / 24)
    totals = [m["gates_served_within_per_inference"][k] for k in THRESHOLDS]
    assert totals == sorted(totals) and totals[-1] > 0  # inputs this small do come near 0
    assert 0 < m["images_with_any_within"][64] <= 1


def test_affine_summary_reads_fig10():
    alpha = [1.0, -1.0, -2.0, 0.05, 1.0, 0.0]
    beta = [0.0, 1.0, 1.0, 0.3, 0.0, 1.0]
    proto = [True, True, True, False, False, False]
    s = affine_summary(alpha, beta, proto)
    assert s["prototypes_positive"] == 1 and s["prototypes_negative"] == 2
    assert s["near_linear"] == pytest.approx(2 / 6)
    assert s["replicate_spread_deg"] > 30
    assert affine_summary([1.0, 1.0], [0.0, 0.0], [False, False])["replicate_spread_deg"] == 0.0


class _Forms(nn.Module):
    """The same two ReLUs as a module (in place or not) or as functions: one analysis."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.form = form
        self.act = nn.ReLU(inplace=form == "inplace")

    def forward(self, x):
        relu = torch.relu if self.form == "function" else self.act
        return relu(self.conv2(relu(self.conv1(x)))).mean((2, 3))


def test_inplace_and_functional_sites_record_the_input_before_the_relu():
    images = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reports = {form: analyze(_Forms(form), (1, 8, 8), images) for form in ("module", "inplace", "function")}
    aligned = {form: [s.aligned for s in r.sites] for form, r in reports.items()}
    assert len(aligned["module"]) == 2 and not any(math.isnan(v) for v in aligned["inplace"][0])
    assert aligned["module"] == aligned["inplace"] == aligned["function"]


# ---- bad inputs ---------------------------------------------------------------------------------
def test_model_without_sites_is_one_line_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(DeepShareError, match="no activation sites"):
        analyze(model, (1, 8, 8), [torch.zeros(2, 1, 8, 8)])


def test_no_images_is_an_error(digits):
    with pytest.raises(DataError, match="no images"):
        analyze(digits.model, digits.input_size, [])


@pytest.mark.parametrize("argv, needle", [
    (["analyze", "digits_cnn", "--data", "digits"], "--num-images 4096 is more than the 360 test images of digits"),
    (["analyze", "digits_cnn"], "missing option '--data'"),
    (["analyze", "digits_cnn", "--data", "nowhere"], "unknown dataset spec 'nowhere'"),
    (["analyze", "digits_cnn", "--data", "digits", "--num-images", "0"], "--num-images must be at least 1"),
    (["analyze", "digits_cnn", "--data", "cifar10-jpg", "--num-images", "8"], "the model takes"),
])  # fmt: skip
def test_cli_errors_are_one_line(capsys, argv, needle):
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("deepshare: error:") and err.count("\n") == 1, err
    assert needle in err, err


# ---- from analysis to conversion ----------------------------------------------------------------
def test_suggestion_matches_convert_with_the_counts_file(digits, tmp_path):
    from deepshare_convert.conversion.rewrite import build_plan
    from deepshare_convert.conversion.settings import settings_from

    r = analyze_dataset(digits, "digits", num_images=96, batch_size=32)
    groups = suggest_prototypes(r, "20%")
    assert all(1 <= g["prototypes"] <= g["channels"] for g in groups)
    counts = write_ed_counts(r, tmp_path / "ed_counts.json")
    settings = settings_from(budget="20%", allocator="snl", snl_counts=str(counts))
    plan = build_plan(digits.model, digits.input_size, settings)
    assert [g.prototypes for g in plan.groups] == [g["prototypes"] for g in groups]
    assert set(ed_counts(r)) == {s.name for s in r.sites}
    assert suggest_prototypes(r, 0.2) == groups  # a fraction is the same budget


# ---- the command ---------------------------------------------------------------------------------
def test_cli_end_to_end_on_digits(capsys, tmp_path):
    out = tmp_path / "an"
    assert run(["analyze", "digits_cnn", "--data", "digits", "--num-images", "128", "-o", str(out),
                "--suggest", "10%", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 128 and len(result["sites"]) == 4 and result["suggestion"]["groups"]
    assert {p.name for p in out.iterdir()} == {"analysis.json", "ed_boxplot.png", "ed_counts.json"}
    assert run(["convert", "digits_cnn", "-b", "30%", "-o", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert run(["analyze", str(tmp_path / "c"), "--data", "digits", "--num-images", "64", "-o", str(out / "c")]) == 0
    printed = capsys.readouterr().out
    assert "agree" in printed and "features_2" in printed
    assert (out / "c" / "affine.png").is_file() and not (out / "c" / "ed_counts.json").exists()


@needs(RESNET20_WEIGHTS)
@needs(CIFAR10_JPG)
def test_shuffling_raises_ed_on_pretrained_resnet20_first_stage():
    """The paper's observation on the shipped ResNet-20: aligned gates span fewer dimensions."""
    loaded = load_any("resnet20", weights=str(RESNET20_WEIGHTS))
    r = analyze_dataset(loaded, "cifar10-jpg", num_images=128, batch_size=64)
    first = [s for s in r.sites if s.module == "relu" or s.module.startswith("layer1.")]
    assert len(first) == 7
    for s in first:
        m = s.summary()
        assert m["shuffled_median"] > m["aligned_median"] + 0.05, (s.module, m)
