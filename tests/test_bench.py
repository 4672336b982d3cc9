"""Every bench script's --quick mode runs (smoke test) and writes its results file.

The scripts write into ``--out tmp_path``: running the tests never touches bench/results/ (tracked).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CIFAR10_JPG, RESNET20_WEIGHTS, needs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,result",
    [("overhead.py", "overhead_quick.json"), ("pi_latency.py", "pi_latency_quick.json"),
     ("conv_shares.py", "conv_shares_quick.json"),
     ("snl_search.py", "snl_search_quick.json"), ("xor.py", "xor_quick.json")],
)  # fmt: skip
def test_bench_quick(script, result, tmp_path):
    path = tmp_path / result
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(path.read_text())
    assert data["bench"] == result[:-5] and data["command"].endswith("--quick")
    if script == "xor.py":
        assert list(data["summary"]) == ["mlp", "snl", "ds-no-gelu", "deepshare"]
        assert {r["method"] for r in data["runs"]} == set(data["summary"])
        assert (path.parent / "xor_quick.png").is_file()


@pytest.fixture(scope="module")
def cifar_runs(tmp_path_factory):
    """One run cache for both CIFAR scripts: the ablations' full-method row reuses the sweep's run."""
    return tmp_path_factory.mktemp("bench-runs")


@needs(CIFAR10_JPG)
@needs(RESNET20_WEIGHTS)
@pytest.mark.parametrize("script", ["accuracy_vs_budget.py", "ablations.py"])
def test_cifar_bench_quick(script, cifar_runs, tmp_path):
    """Quick CIFAR-10 benches: every method/row ran, under its budget, and wrote JSON + PNG."""
    name = script[:-3] + "_quick"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--runs", str(cifar_runs),
                           "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").is_file()
    rows = data["rows"]
    if script == "accuracy_vs_budget.py":
        assert [(r["method"], r["budget"]) for r in rows] == [
            ("original", "100%"), ("SNL", "8%"), ("DeepShare", "8%"), ("SNL", "3%"), ("DeepShare", "3%")]
        assert rows[0]["relus"] == 188_416 and rows[0]["acc"] > 70
        budgets = {"8%": 15_073, "3%": 5_652}
        assert all(r["relus"] <= budgets[r["budget"]] for r in rows if r["method"] == "DeepShare")
        for snl, ds in [(rows[1], rows[2]), (rows[3], rows[4])]:  # equal total optimizer steps, search included
            assert ds["steps"] == snl["steps"] > snl["search_steps"] > 0
            assert ds["recipe"] == "recipes/resnet20_cifar10.yaml" and ds["curve"] and snl["curve"]
            assert ds["min_acc"] == min(a for _, a in ds["curve"])
            assert ds["train_s"] > 0 and snl["train_s"] > 0  # wall time per run, also when read from the cache
        assert (tmp_path / f"{name}_curves.png").is_file()
    else:
        assert [r["name"] for r in rows] == ["deepshare", "abrupt", "no_ste", "no_kd", "naive_init", "linear_easing",
                                             "proportional", "snl_alloc", "paper"]  # fmt: skip
        assert all(r["train_s"] > 0 for r in rows)
        assert all(r["drelus"] <= 15_073 for r in rows)
        assert all(0 <= r["acc"] <= 100 for r in rows)
        full = rows[0]["steps"]
        assert all(r["steps"] == full for r in rows if r["name"] != "snl_alloc")
        assert 0 < rows[-2]["steps"] < full  # the SNL allocation's search steps count against it


def test_accuracy_bench_remakes_a_recorded_run(tmp_path):
    """``--rows-from``: the table, plots and JSON of rows measured elsewhere (the GPU full-data run), no training."""
    recorded = ROOT / "bench" / "results" / "accuracy_vs_budget_fulldata.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy_vs_budget.py"), "--models", "resnet20",
                           "--budgets", "8%,4%,2%", "--full-data", "--rows-from", str(recorded), "--out", str(tmp_path),
                           "--no-docs"], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "accuracy_vs_budget_fulldata.json").read_text())
    assert data["rows"] == json.loads(recorded.read_text())["rows"] and data["schedule"]["limit"] is None
    assert "| resnet20 | 2% | 3,712 / 3,699 | 8,228 / 8,228 |" in proc.stdout  # equal steps, search counted
    assert (tmp_path / "accuracy_vs_budget_fulldata_curves.png").is_file()


@needs(CIFAR10_JPG)
@needs(RESNET20_WEIGHTS)
def test_compare_bits_quick(tmp_path):
    """Sub-ring comparisons: exact while |x| < 2^(L-17), rounds 2 + ceil(log2 k), CrypTen's 8 at k = 64."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_bits.py"), "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "compare_bits_quick.json").read_text())
    rows = {(r["bits"], r["drop"]): r for r in data["rows"]}
    measured = {(r["bits"], r["drop"]): r for r in data["crypten"]}  # two real CrypTen parties
    for key, (rounds, nbytes) in {(64, 0): (8, 432), (32, 0): (7, 368), (24, 8): (6, 304)}.items():
        assert (measured[key]["rounds"], measured[key]["bytes_per_element"]) == (rounds, nbytes)
        assert (rows[key]["rounds"], rows[key]["bytes_per_element"]) == (rounds, nbytes)  # the formula = CrypTen
        assert measured[key]["wrong_outside_window"] == 0
    full = rows[(64, 0)]
    assert (full["rounds"], full["bytes_per_element"], full["flips"]) == (8, 432, 0)  # the calibrated comparison
    assert full["max_abs"] < 2.0**15  # so the 32-bit sub-ring cannot wrap: exact
    assert rows[(32, 0)]["flips"] == 0 and rows[(32, 0)]["top1"] == full["top1"] and rows[(32, 0)]["rounds"] == 7
    assert rows[(24, 8)]["rounds"] == 6 and 0 < rows[(24, 8)]["flip_rate"] < 1e-2


CAMVID = ROOT.parent / "shared" / "data" / "camvid-240x180.tar.gz"


@needs(CAMVID)
def test_segmentation_bench_quick(tmp_path):
    """CamVid bench smoke run: original, SNL and DeepShare at two budgets, equal steps, scores, costs, figure."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "segmentation.py"), "--runs", str(tmp_path / "runs"),
                           "--out", str(tmp_path), "--quick"], capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "segmentation_quick.json").read_text())
    assert (tmp_path / "segmentation_quick.png").is_file() and len(data["classes"]) == 11
    rows = data["rows"]
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("original", "100%"), ("SNL", "3%"), ("DeepShare", "3%"), ("SNL", "1%"), ("DeepShare", "1%")]
    total = rows[0]["relus"]
    assert total == 12_554_176  # MobileNetV2's ReLU6 elements count two comparisons each, at 3x180x240
    for snl, ds in [(rows[1], rows[2]), (rows[3], rows[4])]:
        assert ds["steps"] == snl["steps"] > snl["search_steps"] > 0  # equal optimizer steps, search included
        assert ds["relus"] <= total * float(ds["budget"].rstrip("%")) / 100
        assert ds["cost"]["comparisons"] == ds["relus"] and ds["cost"]["bytes"] < rows[0]["cost"]["bytes"]
        if snl["reached"]:  # SNL rows are costed too: a comparison per kept ReLU (the masks are public)
            assert snl["cost"]["comparisons"] == snl["relus"] and snl["cost"]["bytes"] < rows[0]["cost"]["bytes"]
    for r in rows:
        if r.get("miou") is not None:
            assert 0 <= r["miou"] <= 100 and len(r["iou"]) == 11
    assert rows[0]["cost"]["comparisons"] == total and rows[0]["cost"]["rounds"] > rows[2]["cost"]["rounds"]
