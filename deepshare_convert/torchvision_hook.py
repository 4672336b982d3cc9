"""An import hook that applies :func:`deepshare_convert.compat.torchvision_remedy` on every ``import torchvision``.

Why: the package registry has torchvision 0.28.0 for torch 2.13 only as a build linked against
CUDA torch; beside the CPU torch its compiled ops library does not load, and torchvision's
``_meta_registrations`` (run by ``import torchvision``) dies with "operator torchvision::nms does
not exist".  timm and onnx2torch import torchvision, so a user's own script in the venv died on
``import timm``.  A CPU build that matches (``torchvision==0.28.0+cpu``) lives only on
download.pytorch.org, which this project cannot reach (measured: pip finds 0.15.1-0.29.2 on the
registry, all the same kind of build; the PyTorch index does not resolve).  deepshare's own
imports went through ``compat`` already; this hook does the same for everyone else.

How: ``make install`` writes ``deepshare-torchvision-hook.pth`` into the venv's site-packages
(``python -m deepshare_convert.torchvision_hook --install``).  Python runs its one line at start-up;
it loads *this file by path* (stdlib only, about a millisecond: the package itself and torch are
not imported at start-up) and puts a finder first on ``sys.meta_path``.  The finder answers only
for ``torchvision``: it returns the normal spec with a loader that first applies the remedy
(loading the compiled library if it works, else defining the two op schemas), then runs
torchvision's own code -- which imports torch first anyway.  A mere ``find_spec("torchvision")``
(availability checks) does nothing; the remedy is idempotent and defines nothing beside a working
library, which would abort the process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["install", "pth_line", "write_pth", "PTH_NAME"]

PTH_NAME = "deepshare-torchvision-hook.pth"


class _RemedyLoader:
    """torchvision's own loader, preceded by the remedy (no importlib.abc base: importing it costs
    ~25 ms at every start-up, through importlib.resources)."""

    def __init__(self, loader, package_dir: str):
        self.loader, self.package_dir = loader, package_dir

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        from deepshare_convert.compat import torchvision_remedy

        torchvision_remedy(self.package_dir)
        self.loader.exec_module(module)


class _TorchvisionFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or spec.origin is None:
            return spec
        if importlib.util.find_spec("deepshare_convert") is None:  # deepshare uninstalled: leave torchvision be
            return spec
        spec.loader = _RemedyLoader(spec.loader, os.path.dirname(spec.origin))
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    # by name: the .pth loads this file by path, a module apart from deepshare_convert.torchvision_hook
    if not any(type(f).__name__ == _TorchvisionFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def pth_line(path: str | None = None) -> str:
    """The ``.pth`` line: load this file by path (if it still exists) and install the finder."""
    path = os.path.abspath(path or __file__)
    return ("import os, importlib.util as u; p = " + repr(path) + "; s = os.path.exists(p) and "
            "u.spec_from_file_location('deepshare_torchvision_hook', p); m = s and u.module_from_spec(s); "
            "m and (s.loader.exec_module(m) or m.install())")  # fmt: skip


def write_pth(site_dir: str | None = None) -> str:
    """Write the ``.pth`` file into ``site_dir`` (default: this interpreter's site-packages); returns its path."""
    import sysconfig

    target = os.path.join(site_dir or sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(target, "w") as f:
        f.write("# written by `make install` (deepshare_convert/torchvision_hook.py): `import torchvision` works "
                "beside the CPU torch\n" + pth_line() + "\n")  # fmt: skip
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m deepshare_convert.torchvision_hook --install")
    print(f"deepshare: wrote {write_pth()}")
