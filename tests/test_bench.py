"""Every bench script's --quick mode runs (smoke test) and writes its results file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,result",
    [("overhead.py", "overhead_quick.json"), ("pi_latency.py", "pi_latency_quick.json"),
     ("snl_search.py", "snl_search_quick.json")],
)  # fmt: skip
def test_bench_quick(script, result):
    path = ROOT / "bench" / "results" / result
    path.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(path.read_text())
    assert data["bench"] == result[:-5] and data["command"].endswith("--quick")
