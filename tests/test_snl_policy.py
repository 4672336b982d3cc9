"""SNL lambda policies: the README's `deepshare snl` line reaches its budget in <= 60 epochs; `faithful` is SNL's rule."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch

from deepshare_convert.cli.app import run
from deepshare_convert.recipes import load_recipe
from deepshare_convert.training.retrain import retrain

ROOT = Path(__file__).resolve().parents[1]


def _readme_line(command: str) -> list[str]:
    """The README's `.venv/bin/deepshare COMMAND ...` line as argv (without the program)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f".venv/bin/deepshare {command} "):
            return shlex.split(line.split("#")[0])[1:]
    raise AssertionError(f"no `deepshare {command}` line in README.md")


def test_readme_snl_line_reaches_its_budget_within_60_epochs(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    argv = _readme_line("snl")
    weights = Path(argv[argv.index("--weights") + 1])
    monkeypatch.chdir(tmp_path)
    # the README's weights: what its `retrain --recipe recipes/digits_demo.yaml` line pretrains first
    recipe = load_recipe(ROOT / "recipes" / "digits_demo.yaml")
    recipe.phases = recipe.phases[:1]
    retrain(recipe, weights.parent)
    assert weights.is_file()
    assert run(argv) == 0
    out = Path(argv[argv.index("-o") + 1])
    counts = json.loads((out / "snl_counts.json").read_text())
    assert counts["reached"] and counts["kept"] <= counts["budget"] == 614
    assert counts["epochs"] <= 60
    results = json.loads((out / "results.json").read_text())
    assert results["masked_acc"] > 80  # the search pruned selectively, not by collapsing the model


def test_faithful_policy_with_explicit_settings_is_snl_rule_as_the_bench_runs_it():
    """bench/cifar_runs.py's settings resolve to SNL's rule: x1.1 only on stalls, one Adam group, its own checks."""
    from deepshare_convert.snl import SNLConfig, _mask_groups

    c = SNLConfig(model="resnet20", data="cifar10-jpg", budget="8%", lambda_policy="faithful", lam=1e-2,
                  warmup_epochs=0, check_every=20).validate()  # fmt: skip
    assert (c.lam, c.lam_growth, c.warmup_epochs, c.check_every, c.mask_lr_scale) == (1e-2, 1.1, 0, 20, 1.0)
    assert _mask_groups(c.mask_lr_scale) is None  # the optimizer is built exactly as before the policies
    fast = SNLConfig(model="digits_cnn", data="digits", budget="10%").validate()
    assert (fast.lambda_policy, fast.lam, fast.lam_growth, fast.mask_lr_scale, fast.check_every) == ("fast", 1e-3,
                                                                                                   1.25, 5.0, 1)


def test_old_run_files_resume_with_the_faithful_rule():
    from deepshare_convert.snl import SNLConfig

    old = SNLConfig(model="digits_cnn", data="digits", budget="10%", lambda_policy="faithful").validate().to_dict()
    for key in ("lambda_policy", "mask_lr_scale"):
        del old[key]
    again = SNLConfig.from_dict(old).validate()
    assert again.lambda_policy == "faithful" and again.mask_lr_scale == 1.0 and again.lam_growth == 1.1


def test_fast_grows_every_epoch_above_budget_faithful_only_on_stalls():
    import torch.nn as nn

    from deepshare_convert.snl import SNLSearch

    def lambdas(grow_while_above: bool, lives: list[int]) -> list[float]:
        hooks = SNLSearch(10, lam=1.0, growth=2.0, warmup_epochs=0, grow_while_above=grow_while_above)
        hooks.best, out = 100, []
        for epoch, live in enumerate(lives):
            hooks.live = lambda live=live: live  # noqa: E731 - the count this epoch ends with
            hooks.steps += 1
            hooks.on_epoch_end(nn.Identity(), epoch, {})
            out.append(hooks.lam)
        return out

    falling = [90, 80, 70]  # a new minimum every epoch: SNL never grows lambda
    assert lambdas(False, falling) == [1.0, 1.0, 1.0]
    assert lambdas(True, falling) == [2.0, 4.0, 8.0]
    assert lambdas(False, [90, 95, 80]) == [1.0, 2.0, 2.0]


def test_binarise_cost_is_noted():
    """A large soft -> binarised drop without a finetune gets one note naming the way back."""
    from deepshare_convert.cli.loading import NOTES
    from deepshare_convert.cli.snl_commands import _note_binarise_cost

    NOTES.clear()
    _note_binarise_cost({"masked_acc": 57.4, "binarised_acc": 10.7, "finetune_epochs": 0}, "OUT")
    _note_binarise_cost({"masked_acc": 57.4, "binarised_acc": 55.0, "finetune_epochs": 0}, "OUT")  # small: quiet
    _note_binarise_cost({"masked_acc": 57.4, "binarised_acc": 10.7, "finetune_epochs": 2}, "OUT")  # finetuned
    assert NOTES == ["note: binarising the masks cost 46.7 points (57.4% -> 10.7%); finetune with "
                     "`deepshare snl --resume OUT --finetune-epochs N`"]  # fmt: skip
    NOTES.clear()
