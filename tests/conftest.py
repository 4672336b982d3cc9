"""Shared fixtures: paths to ../shared and small hand-made models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEEPSHARE_SHARED", ROOT.parent / "shared"))
RESNET20_WEIGHTS = SHARED / "models" / "resnet20-12fca82f.th"
RESNET56_WEIGHTS = SHARED / "models" / "resnet56-4bfd9763.th"
CIFAR10_JPG = SHARED / "data" / "cifar10-jpg.tar.gz"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")
