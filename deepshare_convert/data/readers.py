"""One reader per dataset SPEC; each registers itself with :func:`.specs.register_reader`.

Nothing here downloads anything.  A dataset is selected by a SPEC string:

``digits``
    scikit-learn's built-in 8x8 digits (1x8x8, values in [0, 1]), a fixed
    stratified 80/20 split (``random_state=0``).
``cifar10-jpg`` / ``cifar10-jpg:PATH``
    the CIFAR-10 JPEG tarball (``train/<class>/*.jpg``, ``test/<class>/*.jpg``),
    by default ``<project root>/../shared/data/cifar10-jpg.tar.gz`` or
    ``$DEEPSHARE_SHARED/data/cifar10-jpg.tar.gz``.  PATH may also be the
    extracted folder.
``imagefolder:DIR``
    ``DIR/train/<class>/*.png|jpg|...`` and ``DIR/test/<class>/...``; all
    images must have the same size.
``cifar10:DIR`` / ``cifar100:DIR``
    the official python-pickle folders (``cifar-10-batches-py``,
    ``cifar-100-python``) or their parent.  These are read with :mod:`pickle`
    because that is their official format: pickle can run code, so only point
    at copies of the official archives you trust.
``tinyimagenet:DIR``
    the ``tiny-imagenet-200`` folder (or its parent); ``val`` is the test split.

Decoded image datasets are cached under ``$DEEPSHARE_CACHE`` (else
``$XDG_CACHE_HOME/deepshare``, else ``~/.cache/deepshare``) and the cache is
keyed by the source's size/mtime (tarball) or path/file count/newest mtime
(folders), so an edited source is decoded again (see :mod:`.cache`).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError
from .cache import _cached, _folder_key
from .decode import _assemble, _classes, _decode_files, _decode_tarball, _list_images
from .specs import Loaded, Progress, TensorSplit, _info, _require_dir, _splits, find_shared_file, register_reader
from .stats import CIFAR10_STATS, CIFAR100_STATS, DIGITS_STATS, TINYIMAGENET_STATS, _channel_stats

log = logging.getLogger(__name__)

# Registration order below is the order of the "known:" list in the unknown-spec error.


# ----------------------------------------------------------------------------- digits


@register_reader("digits", arg=None)
def _load_digits(path: None = None, progress: Progress | None = None) -> Loaded:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]  # (N, 8, 8, 1) in [0, 1]
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=labels)
    arrays = {"train_x": images[tr], "train_y": labels[tr], "test_x": images[te], "test_y": labels[te]}
    train, test = _splits(arrays)
    classes = [str(i) for i in range(10)]
    # Digits are not mirror-symmetric (2 vs 5...), so no flip; a 1-pixel shift is enough at 8x8.
    info = _info("digits", classes, train.images[0], DIGITS_STATS, crop_padding=1, flip=False)
    return info, train, test


# ----------------------------------------------------------------------------- cifar10-jpg tarball


def _find_cifar10_tarball() -> Path:
    return find_shared_file("cifar10-jpg.tar.gz", "CIFAR-10 tarball", "cifar10-jpg:PATH")


@register_reader("cifar10-jpg", arg="PATH", optional=True)
def _load_cifar10_jpg(path: Path | None, progress: Progress | None) -> Loaded:
    if path is None:
        path = _find_cifar10_tarball()
    if path.is_dir():  # an extracted copy is just an image folder
        info, train, test = _load_imagefolder(path, progress)
        info.name, info.mean, info.std = "cifar10-jpg", *CIFAR10_STATS
        return info, train, test
    if not path.is_file():
        raise DataError(f"dataset file {path} not found")
    st = path.stat()
    key = f"{path.name.removesuffix('.tar.gz')}-{st.st_size}-{st.st_mtime_ns}"
    arrays = _cached(key, lambda: _decode_tarball(path, progress))
    train, test = _splits(arrays)
    return _info("cifar10-jpg", _classes(arrays), train.images[0], CIFAR10_STATS), train, test


# ----------------------------------------------------------------------------- image folders


@register_reader("imagefolder")
def _load_imagefolder(root: Path, progress: Progress | None) -> Loaded:
    _require_dir(root)
    entries: list[tuple[str, str, Path]] = []
    splits = [split for split in ("train", "test") if (root / split).is_dir()]  # a test-only folder is fine
    for split in splits:
        for cls_dir in sorted(d for d in (root / split).iterdir() if d.is_dir()):
            entries += [(split, cls_dir.name, p) for p in _list_images(cls_dir)]
    if not entries:
        raise DataError(f"no images found in {root} (want train/<class>/<image> and/or test/<class>/<image>)")

    def build() -> dict[str, np.ndarray]:
        log.info("decoding %d images in %s (first use; cached afterwards)", len(entries), root)
        arrays = _assemble(_decode_files(entries, rgb=False, progress=progress), str(root))
        arrays["mean"], arrays["std"] = _channel_stats(arrays["train_x"] if len(arrays["train_x"]) else arrays["test_x"])
        return arrays

    arrays = _cached(_folder_key("imagefolder", root, [p for _, _, p in entries]), build)
    train, test = _splits(arrays)
    some = train if len(train) else test
    stats = (tuple(float(v) for v in arrays["mean"]), tuple(float(v) for v in arrays["std"]))
    return _info(root.name or "imagefolder", _classes(arrays), some.images[0], stats, **_policy(some)), train, test


def _policy(train: TensorSplit) -> dict:
    """Augmentation for a generic image set: pad 1/8 of the side (4 at 32px, 8 at 64px), flip."""
    return {"crop_padding": max(1, train.images.shape[1] // 8), "flip": True}


# ----------------------------------------------------------------------------- official CIFAR pickles


@register_reader("cifar10", hint=" (or cifar10-jpg for the shared JPEG tarball)")
def _load_cifar_pickles_10(path: Path, progress: Progress | None = None) -> Loaded:
    folder = _cifar_folder(path, "cifar-10-batches-py", "data_batch_1")
    train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = [_unpickle(folder / "test_batch")]
    names = _label_names(folder / "batches.meta", b"label_names", 10)
    return _from_pickles("cifar10", train, test, b"labels", names, CIFAR10_STATS)


@register_reader("cifar100")
def _load_cifar_pickles_100(path: Path, progress: Progress | None = None) -> Loaded:
    folder = _cifar_folder(path, "cifar-100-python", "train")
    train, test = [_unpickle(folder / "train")], [_unpickle(folder / "test")]
    names = _label_names(folder / "meta", b"fine_label_names", 100)
    return _from_pickles("cifar100", train, test, b"fine_labels", names, CIFAR100_STATS)


def _cifar_folder(path: Path, official: str, marker: str) -> Path:
    _require_dir(path)
    for folder in (path, path / official):
        if (folder / marker).is_file():
            return folder
    raise DataError(f"{path} is not a {official} folder (no {marker})")


def _unpickle(path: Path) -> dict:
    # The official CIFAR archives are python pickles; we read only files the user points at.
    if not path.is_file():
        raise DataError(f"dataset file {path} not found")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad data file
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _label_names(meta: Path, key: bytes, n: int) -> list[str]:
    if not meta.is_file():
        return [str(i) for i in range(n)]
    names = _unpickle(meta).get(key) or []
    return [x.decode() if isinstance(x, bytes) else str(x) for x in names] or [str(i) for i in range(n)]


def _from_pickles(
    name: str, train: list[dict], test: list[dict], label_key: bytes, classes: list[str], stats
) -> Loaded:
    def split(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        try:
            data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored as flat CHW rows; we keep HWC
        except KeyError as e:
            raise DataError(f"{name} batch lacks the key {e.args[0]!r}; is this the official python version?") from None
        except (ValueError, TypeError) as e:
            raise DataError(f"{name} batch is not in the official format: {e}") from None
        return images, labels

    (trx, try_), (tex, tey) = split(train), split(test)
    tr, te = _splits({"train_x": trx, "train_y": try_, "test_x": tex, "test_y": tey})
    return _info(name, classes, tr.images[0], stats), tr, te


# ----------------------------------------------------------------------------- tiny-imagenet


@register_reader("tinyimagenet")
def _load_tinyimagenet(path: Path, progress: Progress | None) -> Loaded:
    root = _require_dir(path)
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200" / "wnids.txt").is_file():
        root = root / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file():
        raise DataError(f"{path} is not a tiny-imagenet-200 folder (no wnids.txt)")
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    entries = [("train", w, p) for w in wnids for p in _list_images(root / "train" / w / "images")]
    entries += [("test", w, root / "val" / "images" / f) for f, w in _val_annotations(root)]
    missing = next((p for split, _, p in entries if split == "test" and not p.is_file()), None)
    if missing is not None:
        raise DataError(f"tiny-imagenet validation image {missing} not found")

    def build() -> dict[str, np.ndarray]:
        log.info("decoding %d tiny-imagenet images in %s (first use; cached afterwards)", len(entries), root)
        return _assemble(_decode_files(entries, rgb=True, progress=progress), str(root))

    arrays = _cached(_folder_key("tinyimagenet", root, [p for _, _, p in entries]), build)
    if _classes(arrays) != wnids:
        raise DataError(f"tiny-imagenet in {root}: some classes in wnids.txt have no training images")
    train, test = _splits(arrays)
    info = _info("tinyimagenet", wnids, train.images[0], TINYIMAGENET_STATS, crop_padding=8, flip=True)
    return info, train, test


def _val_annotations(root: Path) -> list[tuple[str, str]]:
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"tiny-imagenet annotations {ann} not found")
    rows = []
    for line in ann.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 2:
            rows.append((cols[0], cols[1]))
    return rows
