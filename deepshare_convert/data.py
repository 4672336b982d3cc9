"""Datasets as in-memory tensors, and a fast batch-wise loader over them.

Why in memory: every dataset the toolkit targets (8x8 digits, CIFAR-10/100,
tiny-imagenet) fits in RAM as uint8, and the experiments run on small CPU
machines.  Decoding a JPEG per sample per epoch through PIL would dominate the
run time, so images are decoded **once**, cached as an ``.npz`` outside the
repository, and augmentation is done a whole batch at a time in torch.

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
(folders), so an edited source is decoded again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import pickle
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from .errors import DataError

__all__ = [
    "KNOWN_SPECS",
    "DatasetInfo",
    "TensorSplit",
    "TensorLoader",
    "Loaded",
    "load_dataset",
    "check_input_fits",
    "make_loader",
    "cache_dir",
]

log = logging.getLogger(__name__)

KNOWN_SPECS = ("digits", "cifar10-jpg", "imagefolder:DIR", "cifar10:DIR", "cifar100:DIR", "tinyimagenet:DIR")

Progress = Callable[[int, int | None], None]
"""``progress(done, total)``: called while images are decoded (first load only); ``total`` may be None."""

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
TINYIMAGENET_STATS = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
DIGITS_STATS = ((0.5,), (0.5,))

_CACHE_FORMAT = 1  # bump when the cached arrays change meaning
_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_CHUNK = 1024  # images per decoding task
_LIMIT_SEED = 0  # `limit` subsets do not depend on `seed`: quick evals stay comparable across runs


# ----------------------------------------------------------------------------- containers


@dataclass
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    ``mean``/``std`` are the dataset's own per-channel statistics (in [0, 1]
    pixel units); a pretrained model may expect others, which is why
    :func:`make_loader` accepts overrides.  ``crop_padding`` and ``flip`` are the
    training augmentation policy (random crop with that much zero padding,
    random horizontal flip).
    """

    name: str
    num_classes: int
    input_size: tuple[int, ...]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    crop_padding: int = 4
    flip: bool = True


@dataclass
class TensorSplit:
    """A whole split in memory.

    ``images`` is (N, H, W, C): uint8 for image datasets (a quarter of the
    memory of float, and what the files hold), float32 in [0, 1] for digits.
    ``labels`` is int64 (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise DataError(
                f"bad split: images {tuple(self.images.shape)} (want N,H,W,C), labels {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


Loaded = tuple[DatasetInfo, TensorSplit, TensorSplit]
"""What :func:`load_dataset` returns: ``(info, train, test)``."""

# ----------------------------------------------------------------------------- spec parsing


def check_input_fits(input_size: Sequence[int], info: DatasetInfo, data: str, *, hint: str = "") -> None:
    """The model's input shape must be the data's image shape: a clear line now, not a mean/std or conv error."""
    if tuple(input_size) != tuple(info.input_size):
        shape = "×".join
        raise DataError(f"the model takes {shape(map(str, input_size))} inputs, {data} images are "
                        f"{shape(map(str, info.input_size))}{hint}")  # fmt: skip


def load_dataset(spec: str, *, progress: Progress | None = None) -> Loaded:
    """Read the dataset named by ``spec`` into memory: ``(info, train, test)``.

    The first load of an image dataset decodes every file (about 10 s for
    CIFAR-10 on 2 cores, reported through ``progress`` and :mod:`logging`);
    later loads read the cache in well under a second.
    """
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "digits" and not arg:
        return _load_digits()
    if kind == "cifar10-jpg":
        return _load_cifar10_jpg(_user_path(arg) if arg else _find_cifar10_tarball(), progress)
    loaders = {
        "imagefolder": _load_imagefolder,
        "cifar10": _load_cifar_pickles_10,
        "cifar100": _load_cifar_pickles_100,
        "tinyimagenet": _load_tinyimagenet,
    }
    if kind in loaders:
        if not arg:
            hint = " (or cifar10-jpg for the shared JPEG tarball)" if kind == "cifar10" else ""
            raise DataError(f"dataset spec {spec!r} needs a directory: {kind}:DIR{hint}")
        return loaders[kind](_user_path(arg), progress)
    raise DataError(f"unknown dataset spec {spec!r}; known: {', '.join(KNOWN_SPECS)}")


def _user_path(arg: str) -> Path:
    return Path(arg).expanduser()


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"dataset directory {path} not found")
    return path


def _info(name: str, classes: list[str], first_image: torch.Tensor, stats, **policy) -> DatasetInfo:
    h, w, c = first_image.shape
    mean, std = stats
    return DatasetInfo(name, len(classes), (c, h, w), tuple(mean), tuple(std), list(classes), **policy)


def _splits(arrays: dict[str, np.ndarray]) -> tuple[TensorSplit, TensorSplit]:
    def split(prefix: str) -> TensorSplit:
        x = torch.from_numpy(np.ascontiguousarray(arrays[f"{prefix}_x"]))
        y = torch.from_numpy(np.asarray(arrays[f"{prefix}_y"], dtype=np.int64))
        return TensorSplit(x, y)

    return split("train"), split("test")


# ----------------------------------------------------------------------------- digits


def _load_digits() -> Loaded:
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
    name = "cifar10-jpg.tar.gz"
    candidates: list[Path] = []
    if env := os.environ.get("DEEPSHARE_SHARED"):
        shared = Path(env).expanduser()
        candidates += [shared / "data" / name, shared / name]
    root = Path(__file__).resolve().parent.parent  # project root = parent of the package dir
    candidates += [root.parent / "shared" / "data" / name, root / "shared" / "data" / name]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise DataError(f"CIFAR-10 tarball not found (looked in {looked}); set DEEPSHARE_SHARED or use cifar10-jpg:PATH")


def _load_cifar10_jpg(path: Path, progress: Progress | None) -> Loaded:
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
    classes = sorted({c for c, _, _ in files["train"]})
    if not classes:
        raise DataError(f"no training images found in {where} (want train/<class>/<image>)")
    extra = sorted({c for c, _, _ in files["test"]} - set(classes))
    if extra:
        raise DataError(f"test classes {extra[:3]} in {where} have no training images")
    index = {c: i for i, c in enumerate(classes)}
    color = any(img.shape[2] == 3 for entries in files.values() for _, _, img in entries)
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, entries in files.items():
        entries.sort(key=lambda e: (e[0], e[1]))
        out[f"{split}_x"] = _stack([img for _, _, img in entries], [n for _, n, _ in entries], where, color)
        out[f"{split}_y"] = np.array([index[c] for c, _, _ in entries], dtype=np.int64)
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


# ----------------------------------------------------------------------------- image folders


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXTS and p.is_file())


def _folder_key(kind: str, root: Path, files: Sequence[Path]) -> str:
    """Cache key: the folder's path, how many images it holds and the newest mtime among them."""
    newest = max((p.stat().st_mtime_ns for p in files), default=0)
    digest = hashlib.sha1(f"{root.resolve()}|{len(files)}|{newest}".encode()).hexdigest()[:16]
    return f"{kind}-{digest}"


def _decode_files(
    entries: list[tuple[str, str, Path]], rgb: bool, progress: Progress | None
) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    """Decode ``(split, class, path)`` entries into ``{split: [(class, name, image)]}``."""
    images = _decode_images(((str(p), str(p)) for _, _, p in entries), len(entries), rgb=rgb, progress=progress)
    files: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    for (split, cls, p), img in zip(entries, images):
        files[split].append((cls, str(p), img))
    return files


def _load_imagefolder(root: Path, progress: Progress | None) -> Loaded:
    _require_dir(root)
    entries: list[tuple[str, str, Path]] = []
    for split in ("train", "test"):
        split_dir = _require_dir(root / split)
        for cls_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            entries += [(split, cls_dir.name, p) for p in _list_images(cls_dir)]
    if not entries:
        raise DataError(f"no images found in {root} (want train/<class>/<image> and test/<class>/<image>)")

    def build() -> dict[str, np.ndarray]:
        log.info("decoding %d images in %s (first use; cached afterwards)", len(entries), root)
        arrays = _assemble(_decode_files(entries, rgb=False, progress=progress), str(root))
        arrays["mean"], arrays["std"] = _channel_stats(arrays["train_x"])
        return arrays

    arrays = _cached(_folder_key("imagefolder", root, [p for _, _, p in entries]), build)
    train, test = _splits(arrays)
    stats = (tuple(float(v) for v in arrays["mean"]), tuple(float(v) for v in arrays["std"]))
    return _info(root.name or "imagefolder", _classes(arrays), train.images[0], stats, **_policy(train)), train, test


def _policy(train: TensorSplit) -> dict:
    """Augmentation for a generic image set: pad 1/8 of the side (4 at 32px, 8 at 64px), flip."""
    return {"crop_padding": max(1, train.images.shape[1] // 8), "flip": True}


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of uint8 (N,H,W,C) images in [0, 1] units, chunked to bound memory."""
    c = x.shape[-1]
    s, ss, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        s += part.sum(0)
        ss += (part * part).sum(0)
        n += len(part)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean * mean, 0.0))
    return mean, np.where(std > 1e-4, std, 1.0)  # a constant channel: leave it unscaled (and dodge rounding noise)


# ----------------------------------------------------------------------------- tiny-imagenet


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


# ----------------------------------------------------------------------------- official CIFAR pickles


def _load_cifar_pickles_10(path: Path, progress: Progress | None = None) -> Loaded:
    folder = _cifar_folder(path, "cifar-10-batches-py", "data_batch_1")
    train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = [_unpickle(folder / "test_batch")]
    names = _label_names(folder / "batches.meta", b"label_names", 10)
    return _from_pickles("cifar10", train, test, b"labels", names, CIFAR10_STATS)


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


# ----------------------------------------------------------------------------- decoding


class _DecodeError(Exception):
    """A file that is not a readable image (plain, so it crosses process boundaries)."""


def _decode_one(name: str, src: bytes | str, rgb: bool) -> np.ndarray:
    """Decode one image to uint8 (H, W, C); grayscale stays 1-channel unless ``rgb``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if rgb or im.mode != "L":
                im = im if im.mode == "RGB" else im.convert("RGB")
            arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise _DecodeError(f"cannot decode image {name}: {e}") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


def _decode_chunk(chunk: list[tuple[str, bytes | str]], rgb: bool) -> list[np.ndarray]:
    return [_decode_one(name, src, rgb) for name, src in chunk]


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
                out += _decode_chunk(chunk, rgb)
                report()
            return out
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            futures: list[Future] = [pool.submit(_decode_chunk, chunk, rgb) for chunk in chunks]
            for fut in futures:
                out += fut.result()
                report()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on error, do not decode the rest first
        return out
    except _DecodeError as e:
        raise DataError(str(e).splitlines()[0]) from None


# ----------------------------------------------------------------------------- cache


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


# ----------------------------------------------------------------------------- loader


_Plan = list[tuple[int, torch.Tensor]]
"""One epoch's batches for one rank: (global batch number, example indices)."""


class TensorLoader:
    """Iterate ``(x, y)`` batches over a :class:`TensorSplit`: x float32 NCHW normalised, y int64.

    Deterministic by construction: the epoch's order comes from
    ``(seed, epoch)`` and each batch's augmentation from ``(seed, epoch, batch
    number)``, so the same batches come out whatever ``num_workers`` is and on
    whichever rank a batch lands.  Call :meth:`set_epoch` before each epoch (as
    with ``DistributedSampler``) to get a new order.

    With ``world_size > 1`` rank ``r`` takes batches ``r, r + world_size, ...``
    of the shared order, and trailing batches that cannot go to every rank are
    dropped, so all ranks run the same number of steps (and their shards are
    disjoint).  Evaluate on one rank for exact full-set numbers.
    """

    def __init__(
        self,
        split: TensorSplit,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        augment: bool,
        crop_padding: int,
        flip: bool,
        limit: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ):
        channels = split.images.shape[-1]
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad shard: rank {rank} of world size {world_size}")
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"mean/std have {len(mean)}/{len(std)} values but the images have {channels} channels")
        self.split = split
        self.batch_size = batch_size
        self.shuffle, self.augment = shuffle, augment
        self.crop_padding, self.flip = crop_padding, flip
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.epoch = 0
        self.indices = _limit_indices(len(split), limit)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation of epoch ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._chunk(torch.arange(len(self.indices))))

    @property
    def num_samples(self) -> int:
        """Examples per epoch on this rank."""
        return sum(len(idx) for _, idx in self._chunk(torch.arange(len(self.indices))))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self._plan()
        if self.num_workers <= 0:
            for number, idx in plan:
                yield self._batch(number, idx)
            return
        ds = _PlannedBatches(self, plan)
        yield from torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers)

    def _plan(self) -> _Plan:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, 0))
            order = order[torch.randperm(len(order), generator=g)]
        return self._chunk(order)

    def _chunk(self, order: torch.Tensor) -> _Plan:
        chunks = list(order.split(self.batch_size))
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        per_rank = len(chunks) // self.world_size
        numbers = range(self.rank, per_rank * self.world_size, self.world_size)
        return [(b, chunks[b]) for b in numbers]

    def _batch(self, number: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.split.images[idx].permute(0, 3, 1, 2)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, 1, number))
            x = _augment(x, self.crop_padding, self.flip, g)
        x = ((x - self._mean) / self._std).contiguous()
        return x, self.split.labels[idx]


class _PlannedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of a fixed plan, so ``DataLoader`` workers can build batches in parallel."""

    def __init__(self, loader: TensorLoader, plan: _Plan):
        self.loader, self.plan = loader, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader._batch(*self.plan[i])


def _seed(*parts: int) -> int:
    """Mix integers into one well-spread 63-bit seed (``seed + epoch`` would make (1, 0) == (0, 1))."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]) >> 1


def _limit_indices(n: int, limit: int | None) -> torch.Tensor:
    if limit is None or limit >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(_LIMIT_SEED)
    return torch.randperm(n, generator=g)[:limit]


def _augment(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding, then random horizontal flip, per example."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(b, generator=g) < 0.5)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x


def make_loader(
    split: TensorSplit,
    info: DatasetInfo,
    *,
    train: bool,
    batch_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool | None = None,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> TensorLoader:
    """A :class:`TensorLoader` with the usual train/test defaults.

    ``augment`` and ``shuffle`` default to ``train``.  ``mean``/``std`` override
    the dataset's statistics: a pretrained model expects the normalisation it
    was trained with (the shared CIFAR-10 ResNets, for instance, want ImageNet
    stats), not necessarily the dataset's.  ``limit`` keeps a fixed random
    subset of ``limit`` examples (independent of ``seed``, so quick runs stay
    comparable).
    """
    return TensorLoader(
        split,
        batch_size=batch_size,
        mean=info.mean if mean is None else mean,
        std=info.std if std is None else std,
        shuffle=train if shuffle is None else shuffle,
        augment=train if augment is None else augment,
        crop_padding=info.crop_padding,
        flip=info.flip,
        limit=limit,
        seed=seed,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )
