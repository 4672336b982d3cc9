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


def _clean_run(code: str) -> subprocess.CompletedProcess:
    """The venv's python with nothing inherited: no PYTHONPATH, no deepshare code run first."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env={},
                          cwd="/")  # fmt: skip


def test_ecosystem_imports_on_its_own_in_the_venv():
    """`make install` puts an import hook in the venv: a user's script imports timm, torchvision and onnx2torch
    first thing (the registry's torchvision alone dies with "operator torchvision::nms does not exist")."""
    out = _clean_run("import timm, torchvision, onnx2torch, sys; print('deepshare_convert.compat' in sys.modules)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"  # the remedy ran, through the hook
    model = _clean_run("import timm; print(type(timm.create_model('resnet18', pretrained=False)).__name__)")
    assert model.returncode == 0 and model.stdout.strip() == "ResNet", model.stderr[-2000:]


def test_hook_costs_nothing_until_torchvision_is_imported():
    """Start-up loads only the hook file; an availability check (find_spec) imports neither torch nor deepshare."""
    out = _clean_run("import importlib.util, sys; assert importlib.util.find_spec('torchvision') is not None; "
                     "print(sorted(m for m in ('torch', 'torchvision', 'deepshare_convert') if m in sys.modules), "
                     "any(type(f).__name__ == '_TorchvisionFinder' for f in sys.meta_path))")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] True"
