"""``ruff check`` passes on the package, the tests and the bench scripts (configuration: pyproject.toml)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it is in the dev extra: pip install -e '.[dev]')")  # fmt: skip
def test_ruff_check():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "deepshare_convert", "tests", "bench"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"ruff check found problems (fix them or see [tool.ruff] in pyproject.toml):\n" \
                                 f"{proc.stdout}{proc.stderr}"
