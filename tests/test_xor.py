"""Paper Sec. 5: with ONE comparison, only DeepShare (trained with the GELU phase) solves the checkerboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepshare_convert.cli.app import run
from deepshare_convert.experiments.xor import build, checkerboard, run_xor

EPOCHS, SEEDS = 400, 5


@pytest.fixture(scope="module")
def results():
    return {m: [run_xor(m, s, epochs=EPOCHS) for s in range(SEEDS)] for m in ("mlp", "snl", "deepshare")}


def test_deepshare_with_gelu_solves_most_seeds(results):
    accs = [r.accuracy for r in results["deepshare"]]
    assert sum(a >= 98 for a in accs) > SEEDS / 2, accs


@pytest.mark.parametrize("method", ["mlp", "snl"])
def test_one_relu_networks_cannot(results, method):
    """Corollary 1: one ReLU (plus any linear neurons) gives at most two lines -- below 90% on every seed."""
    accs = [r.accuracy for r in results[method]]
    assert max(accs) < 90, accs
    assert min(accs) > 45  # they do train: better than a constant guess on a balanced task


def test_every_network_has_one_comparison():
    from deepshare_convert import census

    for method in ("mlp", "snl", "deepshare"):
        c = census(build(method, 0), (2,))
        if method == "snl":  # torch.relu on one neuron of four
            assert c.total_relus == 1 and c.sites[0].kind == "function"
        else:
            assert c.total_relus == 1


def test_checkerboard_labels_balanced():
    x, y = checkerboard(10_000, 0)
    assert abs(float(y.float().mean()) - 0.5) < 0.02
    assert bool(((x[:, 0] * x[:, 1] < 0).long() == y).all())


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "xor"
    code = run(["xor", "--set", "epochs=3", "--set", "seeds=1", "-o", str(out)])
    assert code == 0
    data = json.loads((out / "xor.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"mlp", "snl", "ds-no-gelu", "deepshare"}
    png = Path(out / "xor_maps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "deepshare" in capsys.readouterr().out


def test_cli_single_method(tmp_path):
    assert run(["xor", "--set", "epochs=2", "--set", "seeds=1", "--set", "methods=[deepshare]", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "xor_maps.png").is_file()
