"""The on-disk cache of decoded datasets, so each image set is decoded once per machine.

Key strings and the ``.npz`` layout are a compatibility surface: caches written
by earlier versions under ``~/.cache/deepshare`` must keep being hit, so change
them only together with ``_CACHE_FORMAT``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the cached arrays change meaning


def cache_dir() -> Path:
    """Where decoded datasets are cached.

    ``$DEEPSHARE_CACHE``, else ``$XDG_CACHE_HOME/deepshare``, else ``~/.cache/deepshare``.
    """
    if env := os.environ.get("DEEPSHARE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepshare"


def _cached(key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``key`` from the cache, else ``build()`` and store it (atomically: temp file + ``os.replace``).

    An unreadable cache file is rebuilt; an unwritable cache dir only costs the
    next run another decode.
    """
    path = cache_dir() / f"{key}-v{_CACHE_FORMAT}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            log.warning("ignoring unreadable dataset cache %s (%s); decoding again", path, e)
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # uncompressed: pixels barely compress and loading stays fast
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is fine to share read-only
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("cached decoded dataset at %s", path)
    except OSError as e:
        log.warning("could not write dataset cache %s: %s", path, e)
    return arrays


def _folder_key(kind: str, root: Path, files: Sequence[Path]) -> str:
    """Cache key: the folder's path, how many images it holds and the newest mtime among them."""
    newest = max((p.stat().st_mtime_ns for p in files), default=0)
    digest = hashlib.sha1(f"{root.resolve()}|{len(files)}|{newest}".encode()).hexdigest()[:16]
    return f"{kind}-{digest}"
