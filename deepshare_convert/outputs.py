"""Output paths: checked before any work starts, so a bad ``-o`` costs seconds, not a training run.

Every command that writes calls :func:`check_output_dir` (or :func:`check_output_file`)
on its target first; the check creates nothing, it only probes the nearest existing
ancestor with a temp file, which is the one test that root, ACLs and read-only mounts
all answer truthfully.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError

__all__ = ["check_output_dir", "check_output_file"]


def _existing_ancestor(path: Path) -> Path:
    """The deepest ancestor of ``path`` (itself included) that exists, file or directory."""
    probe = path
    while not (probe.exists() or probe.is_symlink()) and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_writable(directory: Path, target: Path) -> None:
    """Create and delete a temp file in ``directory``: the check that cannot be fooled."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".deepshare-write-check-")
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OutputError(f"cannot write {target}: {directory} is not writable ({reason.lower()})") from None
    os.close(fd)
    os.unlink(name)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail now, on one line, if ``path`` cannot be (or become) an output directory."""
    target = Path(path)
    absolute = Path(os.path.abspath(target))
    if absolute.exists() and not absolute.is_dir():
        raise OutputError(f"output directory {target} is an existing file; choose another -o")
    base = _existing_ancestor(absolute)
    if not base.is_dir():
        raise OutputError(f"cannot create output directory {target}: {base} is a file, not a directory")
    _probe_writable(base, target)
    return target


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail now, on one line, if ``path`` cannot be written as a file."""
    target = Path(path)
    absolute = Path(os.path.abspath(target))
    if absolute.is_dir():
        raise OutputError(f"output file {target} is an existing directory")
    if absolute.exists():
        if not os.access(absolute, os.W_OK):
            raise OutputError(f"cannot write {target}: the file is not writable")
        _probe_writable(absolute.parent, target)
        return target
    base = _existing_ancestor(absolute.parent)
    if not base.is_dir():
        raise OutputError(f"cannot create {target}: {base} is a file, not a directory")
    _probe_writable(base, target)
    return target
