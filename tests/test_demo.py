"""A reduced `make demo`: the numbers in the summary are real."""

from __future__ import annotations

import json

from deepshare_convert.experiments.demo import run_demo


def test_reduced_demo_end_to_end(tmp_path):
    s = run_demo("digits", tmp_path, num_private=4, quick=True, log=lambda m: None)
    assert s["relus_original"] == 6144
    assert s["drelus_converted"] == 608 <= 614  # 10% budget
    assert s["accuracy_after_retraining"] > s["accuracy_converted_before_retraining"] + 50
    for name in ("original", "converted"):
        p = s["private"][name]
        assert p["top1_agreement"] == 1.0
        assert p["comparisons"] == p["comparisons_expected"]
    # A ReLU whose input lies within CrypTen's 2^-16 of zero may flip: it moves that one output by
    # at most 2^-16. A *prototype* that flips moves every replicate channel it gates by x_c * alpha_c,
    # so the converted model's bound is looser (0.19 seen on logits of magnitude ~11).
    assert s["private"]["original"]["max_logit_error"] < 1e-2
    assert s["private"]["converted"]["max_logit_error"] < 0.5
    assert s["private"]["converted"]["comparisons"] == 4 * 608
    assert s["private"]["converted"]["parties"][0]["bytes"] < s["private"]["original"]["parties"][0]["bytes"] / 5
    assert s["speedup_network"] > 1
    assert len(s["curve"]) >= 3 and all(0 <= acc <= 100 for _, acc in s["curve"])  # the retraining curve
    saved = json.loads((tmp_path / "summary_digits.json").read_text())
    assert saved["drelus_converted"] == 608
    assert (tmp_path / "summary_digits.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_cli_json_reuses_the_finished_run(tmp_path, capsys):
    """`deepshare demo --json --batch-size N`: stdout is the summary alone (a finished run is reused)."""
    from deepshare_convert.cli.app import run

    run_demo("digits", tmp_path, num_private=2, quick=True, log=lambda m: None)
    capsys.readouterr()
    assert run(["demo", "digits", "-o", str(tmp_path), "--batch-size", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["private_images"] == 3 and out["drelus_converted"] == 608
