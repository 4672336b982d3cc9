"""SNL: the masked-ReLU rewrite, the search on the digits CNN, counts -> convert, the SNL baseline, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deepshare_convert import census, load_model
from deepshare_convert.cli.app import run
from deepshare_convert.conversion.rewrite import load
from deepshare_convert.data import load_dataset, make_loader
from deepshare_convert.errors import DeepShareError, PlanError
from deepshare_convert.evaluation import evaluate
from deepshare_convert.snl import (
    MaskedReLU,
    SNLConfig,
    SNLSearch,
    binarise,
    kept_counts,
    mask_relus,
    masked_relus,
    resume_snl,
    run_snl,
)
from deepshare_convert.training.engine import Interrupted, PhaseSpec, Trainer

from .handmade import HANDMADE

# Settings of the digits search: the engine's lr (1e-3) and schedule, but lambda starts near the
# masks' gradient noise (SNL's 1e-5 suits long CIFAR runs), a small batch for more steps per
# second, and a budget check every 5 steps so the run stops as soon as it is within budget.
# SNL's own lambda rule (x1.1 on stalls, masks at the model's lr), as these tests were written against.
SEARCH = dict(data="digits", budget="10%", batch_size=32, lam=1e-2, warmup_epochs=2, check_every=5,
              max_epochs=60, finetune_epochs=2, seed=0, lambda_policy="faithful")  # fmt: skip
SEARCH_ARGS = ["--data", "digits", "--budget", "10%", "--lambda-policy", "faithful", "--batch-size", "32", "--lambda", "1e-2",
               "--warmup-epochs", "2", "--check-every", "5", "--max-epochs", "60", "--finetune-epochs", "2",
               "--seed", "0"]  # fmt: skip
DIGITS_RELUS = 6144


@pytest.fixture(autouse=True)
def _deterministic():
    """One thread: the models are tiny, and the CI cores are shared (overrides conftest's 2)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def digits_weights(tmp_path_factory) -> Path:
    """digits_cnn pretrained with the engine (the digits_demo recipe's pretrain phase, 8 epochs)."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")
    info, train, _ = load_dataset("digits")
    loader = make_loader(train, info, train=True, batch_size=64, seed=0)
    out = tmp_path_factory.mktemp("pretrain")
    spec = PhaseSpec("pretrain", epochs=8, lr_start=0.05, lr_end=5e-4, scheduler="cosine", weight_decay=5e-4)
    Trainer(loaded.model, loader, None, out).run_phase(0, spec)
    save_model(loaded.model, str(out / "digits.safetensors"))
    return out / "digits.safetensors"


@pytest.fixture(scope="session")
def snl_out(digits_weights, tmp_path_factory) -> Path:
    """One `deepshare snl` run at 10% with a 2-epoch finetune; the other tests read its files."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("snl") / "digits-10pct"
    assert run(["snl", "digits_cnn", "-w", str(digits_weights), *SEARCH_ARGS, "-o", str(out)]) == 0
    return out


def _counts(out: Path) -> dict:
    return json.loads((out / "snl_counts.json").read_text())


def _test_loader():
    info, _, test = load_dataset("digits")
    return make_loader(test, info, train=False, batch_size=256)


# ---- the rewrite ------------------------------------------------------------------------------------
def _assert_identity(model: nn.Module, input_size, binary: bool) -> None:
    model = model.double().eval()
    masked = mask_relus(model, input_size, binary=binary).eval()
    x = torch.randn(3, *input_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(masked(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "xor_mlp"])
@pytest.mark.parametrize("binary", [False, True])
def test_all_ones_masks_are_the_original_model(name, binary):
    loaded = load_model(name)
    _assert_identity(loaded.model, loaded.input_size, binary)


@pytest.mark.parametrize("key", sorted(HANDMADE))
def test_all_ones_masks_keep_inplace_and_reuse_semantics(key):
    cls, size = HANDMADE[key]
    _assert_identity(cls(), size, binary=False)


def test_masks_named_after_census_sites_and_original_untouched():
    loaded = load_model("digits_cnn")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    masked = mask_relus(loaded.model, loaded.input_size)
    sites = census(loaded.model, loaded.input_size).sites
    assert list(masked_relus(masked)) == [s.name for s in sites]
    assert [m.shape for m in masked_relus(masked).values()] == [s.shape for s in sites]
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert not any(isinstance(m, MaskedReLU) for m in loaded.model.modules())


def test_masked_relu_formula_binarise_and_count():
    m = MaskedReLU((4,))
    with torch.no_grad():
        m.mask.copy_(torch.tensor([1.0, 0.5, 0.01, -0.2]))
    x = torch.tensor([[-2.0, -2.0, -2.0, -2.0], [3.0, 3.0, 3.0, 3.0]])
    expected = torch.tensor([[0.0, -1.0, -1.98, -2.4], [3.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(m(x), expected)
    assert m.drelus_per_example() == 2  # 1.0 and 0.5 are > 1e-2; 0.01 is not
    m.binarise()
    assert m.binary and not list(m.parameters()) and m.keep.tolist() == [True, True, False, False]
    torch.testing.assert_close(m(x), torch.tensor([[0.0, 0.0, -2.0, -2.0], [3.0, 3.0, 3.0, 3.0]]))


def test_census_counts_live_then_kept_relus():
    loaded = load_model("digits_cnn")
    masked = mask_relus(loaded.model, loaded.input_size)
    with torch.no_grad():
        for m in masked_relus(masked).values():
            m.mask.view(-1)[::2] = 0.0  # every other neuron linear
    c = census(masked, loaded.input_size)
    assert c.total_relus == DIGITS_RELUS // 2 and {s.kind for s in c.sites} == {"snl"}
    assert not c.other_nonlinearities
    assert binarise(masked) == {s.name: s.relus // 2 for s in census(loaded.model, loaded.input_size).sites}
    assert census(masked, loaded.input_size).total_relus == DIGITS_RELUS // 2


def test_masking_a_converted_model_is_refused():
    from deepshare_convert.conversion.rewrite import convert

    loaded = load_model("digits_cnn")
    converted = convert(loaded.model, loaded.input_size, budget="10%")
    with pytest.raises(DeepShareError, match="already converted or linearised"):
        mask_relus(converted.model, loaded.input_size)


# ---- the lambda schedule ---------------------------------------------------------------------------------
def test_lambda_grows_only_after_warmup_when_the_count_stalls():
    masked = mask_relus(load_model("xor_mlp").model, (2,))  # 2 ReLUs
    hooks = SNLSearch(budget=0, lam=1.0, growth=2.0, warmup_epochs=2)
    hooks.on_phase_start(masked)
    mask = masked_relus(masked)["act"].mask
    lives = [2, 2, 2, 1, 1, 0]  # live count at the end of each epoch
    for epoch, live in enumerate(lives):
        hooks.after_step(masked, epoch + 1)
        with torch.no_grad():
            mask.copy_(torch.tensor([1.0 if i < live else 0.0 for i in range(2)]))
        stop = hooks.on_epoch_end(masked, epoch, {"epoch_seconds": 0.0})
        assert stop == (live == 0)
    # epochs 0, 1: warm-up; 2: stalled -> x2; 3: new minimum; 4: stalled -> x2; 5: budget reached
    assert hooks.lambdas == [1.0, 1.0, 1.0, 2.0, 2.0, 4.0] and hooks.lives == lives and hooks.reached
    restored = SNLSearch(budget=0)
    restored.load_state_dict(hooks.state_dict())
    assert restored.state_dict() == hooks.state_dict()


# ---- the search on the digits CNN -----------------------------------------------------------------------
def test_search_reaches_ten_percent_within_its_cap(snl_out):
    c = _counts(snl_out)
    total = census(load_model("digits_cnn").model, (1, 8, 8))
    assert c["reached"] is True and c["budget"] == 614 and c["total_relus"] == DIGITS_RELUS
    assert list(c["sites"]) == [s.name for s in total.sites]
    assert sum(c["sites"].values()) == c["kept"] <= 614
    assert c["epochs"] <= 60 and c["epochs"] == len(c["lambda_trajectory"]) == len(c["live_trajectory"])
    assert c["steps"] % 5 == 0  # stopped by the every-5-steps check
    assert len(set(c["sites"].values())) > 1  # per-site counts differ (the point of SNL)


def test_search_lowers_the_count_monotonically_in_trend(snl_out):
    lives, lams = _counts(snl_out)["live_trajectory"], _counts(snl_out)["lambda_trajectory"]
    assert lives[0] <= DIGITS_RELUS and lives[-1] <= 614
    rises = [b - a for a, b in zip(lives, lives[1:]) if b > a]
    assert len(rises) <= len(lives) // 5 and all(r <= 0.02 * DIGITS_RELUS for r in rises)
    dropping = [i for i, n in enumerate(lives) if n < DIGITS_RELUS]
    assert all(lives[i + 3] < lives[i] for i in dropping if i + 3 < len(lives))
    assert lams[0] == 1e-2 and all(b >= a for a, b in zip(lams, lams[1:]))


def test_snl_baseline_is_saved_loadable_counted_and_above_chance(snl_out):
    c, results = _counts(snl_out), json.loads((snl_out / "results.json").read_text())
    conv = load(snl_out)
    assert conv.plan.kind == "snl" and conv.plan.snl_kept == kept_counts(conv.model)
    assert census(conv.model, (1, 8, 8)).total_relus == c["kept"] == results["snl_relus"] == conv.plan.achieved
    acc = evaluate(conv.model, _test_loader()).top1
    assert acc == results["snl_acc"] and acc > 50.0  # chance is 10%
    assert results["original_acc"] > 95.0 and results["finetune_epochs"] == 2


def test_inspect_of_the_snl_model_counts_kept_relus(snl_out, capsys):
    assert run(["inspect", str(snl_out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_relus"] == _counts(snl_out)["kept"]
    assert [s["relus"] for s in d["sites"]] == list(_counts(snl_out)["sites"].values())


def test_rewrite_reaches_snl_plans_through_the_registry_without_importing_snl(snl_out):
    """No rewrite <-> snl import cycle (function-level imports count); a fresh `load` still replays SNL plans."""
    import ast
    import subprocess
    import sys

    import deepshare_convert.conversion.rewrite as rw

    tree = ast.parse(Path(rw.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "snl" in m]
    code = ("import sys; from deepshare_convert.conversion.rewrite import load; c = load(sys.argv[1]); "
            "print(c.plan.kind, sum(m.drelus_per_example() for m in c.model.snl_masks.children()))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(snl_out)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["snl", str(_counts(snl_out)["kept"])]


def test_loading_weights_that_keep_other_relus_fails(snl_out, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(snl_out, copy)
    plan = json.loads((copy / "plan.json").read_text())
    first = next(iter(plan["snl_kept"]))
    plan["snl_kept"][first] += 1
    plan["achieved_drelus"] += 1  # consistent in itself: only the weights can tell
    (copy / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=f"site '{first}' keeps"):
        load(copy)


def test_convert_allocator_snl_uses_the_counts(snl_out, capsys):
    counts = str(snl_out / "snl_counts.json")
    assert run(["convert", "digits_cnn", "--budget", "10%", "--allocator", "snl", "--snl-counts", counts,
                "-o", str(snl_out.parent / "conv-snl"), "--json"]) == 0  # fmt: skip
    snl_plan = json.loads(capsys.readouterr().out)
    assert run(["convert", "digits_cnn", "--budget", "10%", "-o", str(snl_out.parent / "conv-uni"), "--json"]) == 0
    uniform = json.loads(capsys.readouterr().out)
    protos = [g["prototypes"] for g in snl_plan["groups"]]
    assert protos != [g["prototypes"] for g in uniform["groups"]]
    assert snl_plan["achieved_drelus"] <= 614 and snl_plan["allocator"] == "snl"
    kept = _counts(snl_out)["sites"]  # the group with the most SNL ReLUs gets the most DReLUs
    demand = [sum(kept[s] for s in g["sites"]) for g in snl_plan["groups"]]
    drelus = [g["drelus"] for g in snl_plan["groups"]]
    assert drelus.index(max(drelus)) == demand.index(max(demand))


# ---- resume, caps, CLI --------------------------------------------------------------------------------------
def _error_lines(capsys) -> list[str]:
    """The error lines on stderr (progress bars share stderr; the error is one line of its own)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("deepshare: error:")]


def test_interrupted_search_resumes_bit_for_bit(snl_out, digits_weights, tmp_path):
    out = tmp_path / "resumed"
    config = SNLConfig(model="digits_cnn", weights=str(digits_weights), **SEARCH)
    with pytest.raises(Interrupted):
        run_snl(config, out, fail_at_step=200)
    assert json.loads((out / "results.json").read_text()).get("reached") is None  # still searching
    result = resume_snl(out)
    reference = _counts(snl_out)
    got = _counts(out)
    for key in ("sites", "lambda_trajectory", "live_trajectory", "epochs", "steps"):
        assert got[key] == reference[key], key
    assert result.results["snl_acc"] == json.loads((snl_out / "results.json").read_text())["snl_acc"]


def test_cap_before_budget_is_a_clear_error_and_resume_raises_the_cap(digits_weights, tmp_path, capsys):
    out = tmp_path / "capped"
    argv = ["snl", "digits_cnn", "-w", str(digits_weights), *SEARCH_ARGS, "--max-steps", "20", "-o", str(out)]
    assert run(argv) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "hit its cap (--max-epochs 60 / --max-steps 20)" in err[0]
    assert f"--resume {out}" in err[0]
    c = _counts(out)
    assert c["reached"] is False and c["steps"] == 20 and sum(c["sites"].values()) == c["kept"] > 614
    assert not (out / "plan.json").exists()  # no SNL model above the budget
    assert run(["snl", "--resume", str(out), "--max-steps", "30"]) == 2
    assert _counts(out)["steps"] == 30
    assert json.loads((out / "snl_run.json").read_text())["max_steps"] == 30


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["snl", "digits_cnn", "--data", "digits"], "needs MODEL, --data, --budget and -o OUT"),
        (["snl", "digits_cnn", "--data", "digits", "--budget", "12x", "-o", "{tmp}/a"], "is not a number"),
        (["snl", "digits_cnn", "--data", "nope", "--budget", "10%", "-o", "{tmp}/b"], "unknown dataset spec"),
        (["snl", "digits_cnn", "--data", "digits", "--budget", "10%", "--max-steps", "0", "-o", "{tmp}/c"],
         "--max-steps must be at least 1"),
        (["snl", "resnet20", "--data", "digits", "--budget", "10%", "-o", "{tmp}/d"],
         "cannot run on the 1x8x8 images of digits"),
        (["snl", "--resume", "{tmp}"], "not an SNL run directory"),
    ],
)
def test_cli_errors_are_one_line(argv, needle, tmp_path, capsys):
    assert run([a.format(tmp=tmp_path) for a in argv]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and needle in err[0], err


def test_resume_refuses_other_settings(snl_out, capsys):
    assert run(["snl", "--resume", str(snl_out), "--budget", "5%"]) == 2
    assert "--budget 5% differs from the run" in capsys.readouterr().err
