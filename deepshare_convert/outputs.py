"""Output paths: checked before any work starts, so a bad ``-o`` costs seconds, not a training run.

Every command that writes calls :func:`check_output_dir` (or :func:`check_output_file`)
on its target first; the check creates nothing, it only probes the nearest existing
ancestor with a temp file, which is the one test that root, ACLs and read-only mounts
all answer truthfully.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import OutputError

__all__ = ["check_output_dir", "check_output_file", "check_fresh_dir", "publish_dir"]


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


def check_fresh_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """``path`` must be writable and absent or empty, unless ``force`` (then it will be replaced whole)."""
    target = check_output_dir(path)
    if not force and target.is_dir() and any(target.iterdir()):
        held = ", ".join(sorted(p.name for p in target.iterdir())[:3])
        raise OutputError(f"output directory {target} is not empty (holds {held}, ...); "
                          "pass --force to replace it, or choose another -o")  # fmt: skip
    return target


def publish_dir(staged: Path, target: Path, *, force: bool = False) -> None:
    """Move a fully written ``staged`` directory to ``target`` by rename, so readers see all or nothing.

    Without ``force`` an existing non-empty ``target`` (perhaps filled by a concurrent writer
    since it was checked) is an error; with ``force`` it is moved aside and deleted, retried
    if another writer slips in between.  Either way ``target`` ends up as one writer's files.
    """
    import shutil

    for _ in range(10):
        try:
            os.rename(staged, target)  # atomic; replaces an absent or empty directory
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not force:
                raise OutputError(f"output directory {target} was filled by another writer meanwhile; "
                                  "pass --force to replace it, or choose another -o") from None  # fmt: skip
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        try:
            os.rename(target, aside / "old")
        except FileNotFoundError:
            pass  # another writer moved it first
        shutil.rmtree(aside, ignore_errors=True)
    raise OutputError(f"output directory {target} keeps changing under concurrent writers; try again")
