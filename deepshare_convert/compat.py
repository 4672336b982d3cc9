"""The only place that patches third-party packages for the torch we run on.

Two mismatches are known on the project's CPU machine (torch 2.13.0+cpu):

* **torchvision** from the registry is a CUDA build whose compiled ops library
  does not load beside the CPU torch, so ``import torchvision`` dies with
  "operator torchvision::nms does not exist" (torchvision registers fake kernels
  for ``nms``/``qnms`` at import and needs their schemas).  timm imports
  torchvision at import time, so timm needs it too (and so does onnx2torch).  Remedy: try the compiled
  library first; only if it fails, define the two schemas ourselves.  Defining
  them beside a working library aborts the process, hence the guard.
* **crypten 0.4.1** imports ``torch.onnx._internal.registration``, a module that
  moved to ``torch.onnx._internal.torchscript_exporter.registration`` in torch
  2.x.  Remedy: alias the old name in ``sys.modules`` before importing crypten.

Both are applied lazily, at most once, through :func:`import_timm` /
:func:`import_crypten` / :func:`import_onnx2torch`; nothing here runs at package import time.
The torchvision remedy also runs on any ``import torchvision`` in the venv ``make install``
builds (a user's own script included), through :mod:`.torchvision_hook`.

One more, of behaviour rather than of a version mismatch: crypten's two-party division of a share
by a public integer (``ArithmeticSharedTensor.div_``, which every fixed-point truncation goes
through -- after its own Beaver products too) is the local one, with no extension point (only
three or more parties reach ``protocol.truncate``).  :func:`crypten_integer_division` routes it,
inside a ``with`` block only, to a function of ours (:mod:`.mpc.truncation`).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import os
import sys
from functools import cache

__all__ = ["patch_torchvision", "torchvision_remedy", "patch_crypten", "import_timm", "import_crypten", "import_onnx2torch",
           "check_install", "crypten_integer_division"]  # fmt: skip

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


@cache
def patch_torchvision() -> str:
    """Make ``import torchvision`` work; returns which remedy was used.

    Returns ``"native"`` (nothing needed or the compiled library loaded),
    ``"schemas"`` (we defined the op schemas) or ``"absent"`` (no torchvision).
    """
    if "torchvision" in sys.modules:
        return "native"
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "absent"
    return torchvision_remedy(os.path.dirname(spec.origin))


def torchvision_remedy(package_dir: str) -> str:
    """The remedy itself, for the torchvision installed in ``package_dir`` (before its code runs):
    ``"native"`` or ``"schemas"``.  Also called by :mod:`.torchvision_hook` on every import of it."""
    import torch

    libs = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    for lib in libs:
        try:
            torch.ops.load_library(lib)
            return "native"
        except (OSError, RuntimeError):
            pass
    try:  # a schema may already exist (another package, or an earlier call, defined it): leave it be
        torch.ops.torchvision.nms  # noqa: B018
        return "native"
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
    for schema in _TORCHVISION_SCHEMAS:
        lib.define(schema)
    # keep the Library object alive: dropping it unregisters the schemas
    _LIBRARIES.append(lib)
    return "schemas"


_LIBRARIES: list = []


def import_timm():
    """Import timm after making torchvision importable."""
    patch_torchvision()
    return importlib.import_module("timm")


def import_onnx2torch():
    """Import onnx2torch (the optional ``onnx-import`` extra) after making torchvision importable."""
    patch_torchvision()
    return importlib.import_module("onnx2torch")


@cache
def patch_crypten() -> bool:
    """Alias the torch.onnx module crypten 0.4.1 expects; True if an alias was added."""
    old = "torch.onnx._internal.registration"
    if old in sys.modules or importlib.util.find_spec("torch") is None:
        return False
    try:
        importlib.import_module(old)
        return False
    except ImportError:
        pass
    try:
        new = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
    except ImportError:
        return False
    sys.modules[old] = new
    return True


def import_crypten():
    """Import crypten with its compatibility patch; a clear error if it is missing."""
    if importlib.util.find_spec("crypten") is None:
        from .errors import DeepShareError

        raise DeepShareError(
            "crypten is not installed: run `make install` (it installs crypten==0.4.1 with --no-deps)"
        )
    patch_torchvision()
    patch_crypten()
    return importlib.import_module("crypten")


@contextlib.contextmanager
def crypten_integer_division(divide):
    """Within the block, a two-party ``share.div_(d)`` by a public integer ``d`` calls ``divide(share, d)``.

    ``divide`` returns the new share tensor (the encoder is left as crypten leaves it).  Division by
    a float, or with more than two parties, stays crypten's own.  Restored on exit, nested blocks too.
    """
    import torch

    import_crypten()
    import crypten.communicator as comm
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor as A

    original = A.div_

    def div_(self, y):
        if isinstance(y, float) and int(y) == y:
            y = int(y)
        if torch.is_tensor(y) and not y.is_floating_point() and comm.get().get_world_size() == 2:
            if y.numel() and bool((y == y.flatten()[0]).all()):
                y = int(y.flatten()[0])  # one divisor for every element
            else:
                raise ValueError("division of a share by a tensor of different integers has no exact truncation")
        if isinstance(y, int) and not isinstance(y, bool) and comm.get().get_world_size() == 2:
            self.share = divide(self, y)
            return self
        return original(self, y)

    A.div_ = div_
    try:
        yield
    finally:
        A.div_ = original


def check_install() -> None:
    """Import every dependency the way the package does (used by `make`)."""
    import_timm()
    import_crypten()
    import rich  # noqa: F401
    import typer  # noqa: F401


if __name__ == "__main__":
    check_install()
    print("deepshare: all dependencies import")
