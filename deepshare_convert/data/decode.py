"""Image files -> uint8 (N, H, W, C) arrays: decoding in worker processes, then sorting and stacking.

Decoding is the only slow step of a first load (60k JPEGs for CIFAR-10), so it
runs in forked processes overlapped with reading; everything after it is cheap
bookkeeping that fixes the order (class, file name) the cache stores.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np

from ..errors import DataError
from .specs import Progress

log = logging.getLogger(__name__)

_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_CHUNK = 1024  # images per decoding task


class _DecodeError(Exception):
    """A file that is not a readable image (plain, so it crosses process boundaries)."""


def _decode_one(name: str, src: bytes | str, rgb: bool, label: bool = False) -> np.ndarray:
    """Decode one image to uint8 (H, W, C); grayscale stays 1-channel unless ``rgb``.

    ``label``: a segmentation mask, one class index per pixel (an 8-bit gray or
    palette PNG, read as stored, never colour-converted), returned as (H, W, 1).
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if label:
                if im.mode not in ("L", "P"):
                    raise _DecodeError(f"label image {name} is mode {im.mode}, not 8-bit class indices (L or P)")
            elif rgb or im.mode != "L":
                im = im if im.mode == "RGB" else im.convert("RGB")
            arr = np.asarray(im)
    except _DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise _DecodeError(f"cannot decode image {name}: {e}") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


def _decode_chunk(chunk: list[tuple[str, bytes | str]], rgb: bool, label: bool = False) -> list[np.ndarray]:
    return [_decode_one(name, src, rgb, label) for name, src in chunk]


def _decode_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1  # spawned workers would re-import torch; not worth it
    return max(1, min(cpus, 8))


def _decode_images(
    items: Iterable[tuple[str, bytes | str]],
    total: int | None,
    *,
    rgb: bool,
    progress: Progress | None,
    workers: int | None = None,
    label: bool = False,
) -> list[np.ndarray]:
    """Decode ``(name, bytes-or-path)`` items in order, in forked worker processes when there are cores.

    Chunks are submitted while ``items`` is still being produced, so reading a
    tarball overlaps with decoding it.  PIL holds the GIL for much of a small
    JPEG, so threads do not help; processes do (CIFAR-10: ~10 s instead of ~16 s
    on 2 cores).  A few thousand images are not worth forking for.
    """
    it = iter(items)
    chunks = iter(lambda: list(islice(it, _CHUNK)), [])
    if workers is None:
        workers = 1 if total is not None and total < 2 * _CHUNK else _decode_workers()
    out: list[np.ndarray] = []

    def report() -> None:
        if progress is not None:
            progress(len(out), total)

    try:
        if workers <= 1:
            for chunk in chunks:
                out += _decode_chunk(chunk, rgb, label)
                report()
            return out
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            futures: list[Future] = [pool.submit(_decode_chunk, chunk, rgb, label) for chunk in chunks]
            for fut in futures:
                out += fut.result()
                report()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on error, do not decode the rest first
        return out
    except _DecodeError as e:
        raise DataError(str(e).splitlines()[0]) from None


# ----------------------------------------------------------------------------- sources: folders and tarballs


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXTS and p.is_file())


def _decode_files(
    entries: list[tuple[str, str, Path]], rgb: bool, progress: Progress | None
) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    """Decode ``(split, class, path)`` entries into ``{split: [(class, name, image)]}``."""
    images = _decode_images(((str(p), str(p)) for _, _, p in entries), len(entries), rgb=rgb, progress=progress)
    files: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    for (split, cls, p), img in zip(entries, images):
        files[split].append((cls, str(p), img))
    return files


def _decode_tarball(path: Path, progress: Progress | None) -> dict[str, np.ndarray]:
    """Decode ``{train,test}/<class>/<file>`` images from a .tar.gz (any leading folders are ignored)."""
    names: list[tuple[str, str, str]] = []  # (split, class, member name), in tar order

    def members() -> Iterator[tuple[str, bytes]]:
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    parts = m.name.split("/")
                    if not m.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
                        continue
                    if Path(parts[-1]).suffix.lower() not in _IMAGE_EXTS:
                        continue
                    f = tf.extractfile(m)
                    if f is None:
                        continue
                    names.append((parts[-3], parts[-2], m.name))
                    yield m.name, f.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot read {path}: {e}") from None

    log.info("decoding %s (first use; cached afterwards)", path)
    images = _decode_images(members(), total=None, rgb=True, progress=progress)
    files = {"train": [], "test": []}
    for (split, cls, name), img in zip(names, images):
        files[split].append((cls, name, img))
    return _assemble(files, str(path))


def _assemble(files: dict[str, list[tuple[str, str, np.ndarray]]], where: str) -> dict[str, np.ndarray]:
    """Sort (class, file) entries, map classes to sorted indices, stack same-size images."""
    train_only = {c for c, _, _ in files["train"]}
    classes = sorted(train_only or {c for c, _, _ in files["test"]})  # a test-only folder: its own classes
    if not classes:
        raise DataError(f"no images found in {where} (want train/<class>/<image> and/or test/<class>/<image>)")
    extra = sorted({c for c, _, _ in files["test"]} - set(classes))
    if extra:
        raise DataError(f"test classes {extra[:3]} in {where} have no training images")
    index = {c: i for i, c in enumerate(classes)}
    color = any(img.shape[2] == 3 for entries in files.values() for _, _, img in entries)
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, entries in files.items():
        entries.sort(key=lambda e: (e[0], e[1]))
        if entries:
            out[f"{split}_x"] = _stack([img for _, _, img in entries], [n for _, n, _ in entries], where, color)
        out[f"{split}_y"] = np.array([index[c] for c, _, _ in entries], dtype=np.int64)
    shape = next(out[f"{s}_x"].shape[1:] for s in files if f"{s}_x" in out)
    for split in files:  # a split the folder does not have: empty, of the other's image shape
        out.setdefault(f"{split}_x", np.zeros((0, *shape), dtype=np.uint8))
    return out


def _stack(images: list[np.ndarray], names: list[str], where: str, color: bool) -> np.ndarray:
    if not images:
        raise DataError(f"no images found in {where}")
    if color:  # gray among colour images: promote gray to RGB
        images = [np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img for img in images]
    shape = images[0].shape
    for img, name in zip(images, names):
        if img.shape != shape:
            raise DataError(
                f"images in {where} differ in size: {names[0]} is {shape[1]}x{shape[0]}, "
                f"{name} is {img.shape[1]}x{img.shape[0]}; resize them to one size first"
            )
    return np.stack(images)


def _classes(arrays: dict[str, np.ndarray]) -> list[str]:
    return [str(c) for c in arrays["classes"]]
