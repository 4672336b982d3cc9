"""Run code offline against a timm hub cache that holds a (random) resnet18, as timm's own download leaves it.

Used by the ``--pretrained`` tests: the code sees ``reference`` (the resnet18 whose weights are cached) and must
print ``ok`` on success.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SEED_CACHE = """
import torch
from safetensors.torch import save_file
from huggingface_hub.constants import HF_HUB_CACHE
from deepshare_convert.compat import import_timm
from deepshare_convert.models import load_model
from pathlib import Path

timm = import_timm()
reference = timm.create_model("resnet18", pretrained=False)
snapshot = Path(HF_HUB_CACHE) / "models--timm--resnet18.a1_in1k"
(snapshot / "refs").mkdir(parents=True)
(snapshot / "refs" / "main").write_text("0" * 40)
(snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
save_file(reference.state_dict(), str(snapshot / "snapshots" / ("0" * 40) / "model.safetensors"))
"""


def run_with_cached_resnet18(tmp_path: Path, check: str) -> subprocess.CompletedProcess:
    """``check`` (Python source) after seeding an empty, offline hub cache under ``tmp_path``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))  # fmt: skip
    script = _SEED_CACHE + textwrap.dedent(check)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
