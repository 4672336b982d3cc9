"""The compatibility module: torchvision and crypten import on this torch, lazily."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_package_import_does_not_touch_torchvision_or_crypten():
    code = (
        "import sys, deepshare_convert; from deepshare_convert.cli import app; "
        "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'crypten') if m in sys.modules))"
    )
    assert _run(code) == "[]"


def test_timm_imports_through_compat():
    code = (
        "from deepshare_convert.compat import import_timm, patch_torchvision\n"
        "timm = import_timm()\n"
        "m = timm.create_model('resnet18', pretrained=False, num_classes=3)\n"
        "import torchvision.transforms as T\n"
        "print(patch_torchvision() in ('native', 'schemas'), type(m).__name__)"
    )
    assert _run(code) == "True ResNet"


def test_crypten_imports_through_compat():
    code = (
        "from deepshare_convert.compat import import_crypten\n"
        "crypten = import_crypten()\n"
        "crypten.init()\n"
        "import torch\n"
        "x = crypten.cryptensor(torch.tensor([1.0, -2.0, 3.0]))\n"
        "print(x.relu().get_plain_text().tolist())"
    )
    assert _run(code) == "[1.0, 0.0, 3.0]"
