"""Helpers shared by the bench scripts: timing, results files, the docs table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS_RESULTS = ROOT / "docs" / "results.md"


def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform()}  # fmt: skip


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_out_arg(parser) -> None:
    """``--out DIR``: where the results JSON/PNG go (default bench/results/; the tests give a temporary one)."""
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: bench/results)")


def write_results(name: str, data: dict[str, Any], out: Path = RESULTS) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    data = {"bench": name, "command": "python " + " ".join(sys.argv), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def update_docs_section(name: str, markdown: str) -> None:
    """Replace the section between the markers for ``name`` in docs/results.md (or append it)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = DOCS_RESULTS.read_text() if DOCS_RESULTS.exists() else "# Measured results\n\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS_RESULTS.write_text(text)
