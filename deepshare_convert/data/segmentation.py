"""Segmentation datasets: image + label-PNG pairs, checked, decoded once and cached like the image sets.

``camvid`` / ``camvid:DIR``
    CamVid at 240x180 (the SegNet split: 367 train, 101 val, 233 test), by
    default ``<project root>/../shared/data/camvid-240x180.tar.gz`` (or
    ``$DEEPSHARE_SHARED/data/...``); DIR is an extracted copy
    (``DIR/{train,val,test}/{images/NAME.jpg,labels/NAME.png}``, or its parent).
    11 classes, label 11 = unlabelled (the ignore index).  ``load_dataset``
    gives train and test; :func:`camvid_splits` also gives val.  CamVid
    (Brostow et al., 2008) is licensed CC BY-NC 4.0: never commit it.
``ade20k:DIR``
    the ADEChallengeData2016 folder (or its parent):
    ``images/{training,validation}/*.jpg`` and ``annotations/{...}/*.png``;
    150 classes, annotation 0 = "other" is ignored (stored as 255) and 1..150
    become 0..149.  Never downloaded.  Its images vary in size, so every pair
    is brought to one size by a fixed policy: the shorter side is resized to
    :data:`ADE20K_SIZE` (image bilinear, label nearest), then the centre
    ``ADE20K_SIZE`` square is cut out.  validation is the test split.

Every label is checked against its image (same size) and the class range; a
bad file is a one-line :class:`DataError` naming it.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .cache import _cached, _folder_key
from .decode import _decode_images, _list_images
from .specs import DatasetInfo, Loaded, Progress, SegmentationSplit, _require_dir, find_shared_file, register_reader
from .stats import _channel_stats

log = logging.getLogger(__name__)

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]  # fmt: skip
CAMVID_IGNORE = 11
CAMVID_SPLITS = ("train", "val", "test")
CAMVID_TARBALL = "camvid-240x180.tar.gz"
ADE20K_CLASSES = 150
ADE20K_IGNORE = 255
ADE20K_SIZE = 256
SEG_SCALE = (0.5, 2.0)  # random rescale range of the training augmentation

_Src = tuple[str, "bytes | str"]  # (name shown in errors, bytes or a path)
_Pairs = dict[str, list[tuple[_Src, _Src]]]  # split -> [(image, label)], sorted by name


# ----------------------------------------------------------------------------- pairing and checks


def _pair(split: str, images: dict[str, _Src], labels: dict[str, _Src], where: str) -> list[tuple[_Src, _Src]]:
    """Match images and labels by file stem: a missing partner or an empty split is an error naming the file."""
    if not images:
        raise DataError(f"no images in the {split} split of {where}")
    for stem, (name, _) in sorted(images.items()):
        if stem not in labels:
            raise DataError(f"image {name} has no label PNG ({split} split of {where})")
    for stem, (name, _) in sorted(labels.items()):
        if stem not in images:
            raise DataError(f"label {name} has no image ({split} split of {where})")
    return [(images[s], labels[s]) for s in sorted(images)]


def _decode_pairs(
    pairs: _Pairs,
    num_classes: int,
    ignore: int,
    progress: Progress | None,
    *,
    remap: Callable[[np.ndarray], np.ndarray] | None = None,
    resize: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Decode, check and stack every split: ``{split}_x`` (N,H,W,3) uint8, ``{split}_y`` (N,H,W) uint8.

    ``remap`` turns stored label values into classes / ignore (ADE20K's 0 -> 255,
    v -> v - 1); ``resize`` brings a checked pair to the common size.
    """
    out: dict[str, np.ndarray] = {}
    for split, items in pairs.items():
        imgs = _decode_images([i for i, _ in items], len(items), rgb=True, progress=progress)
        labs = _decode_images([lab for _, lab in items], len(items), rgb=False, progress=progress, label=True)
        xs, ys = [], []
        for (img_src, lab_src), img, lab in zip(items, imgs, labs):
            lab = lab[:, :, 0]
            if lab.shape != img.shape[:2]:
                raise DataError(f"label {lab_src[0]} is {lab.shape[1]}x{lab.shape[0]} but its image {img_src[0]} is "
                                f"{img.shape[1]}x{img.shape[0]}")  # fmt: skip
            if remap is not None:
                lab = remap(lab)
            bad = np.unique(lab[(lab >= num_classes) & (lab != ignore)])
            if bad.size:
                raise DataError(f"label {lab_src[0]} has values {bad[:5].tolist()} outside the classes "
                                f"0..{num_classes - 1} and the ignore label {ignore}")  # fmt: skip
            if resize is not None:
                img, lab = resize(img, lab)
            if xs and img.shape != xs[0].shape:
                raise DataError(f"images differ in size: {items[0][0][0]} is {xs[0].shape[1]}x{xs[0].shape[0]}, "
                                f"{img_src[0]} is {img.shape[1]}x{img.shape[0]}")  # fmt: skip
            xs.append(img)
            ys.append(lab.astype(np.uint8))
        out[f"{split}_x"], out[f"{split}_y"] = np.stack(xs), np.stack(ys)
    return out


def _seg_info(name: str, classes: list[str], arrays: dict[str, np.ndarray], ignore: int) -> DatasetInfo:
    _, h, w, c = arrays["train_x"].shape
    mean = tuple(float(v) for v in arrays["mean"])
    std = tuple(float(v) for v in arrays["std"])
    return DatasetInfo(name, len(classes), (c, h, w), mean, std, list(classes), crop_padding=0, flip=True,
                       task="segmentation", ignore_index=ignore, scale=SEG_SCALE)  # fmt: skip


def _split(arrays: dict[str, np.ndarray], prefix: str) -> SegmentationSplit:
    return SegmentationSplit(torch.from_numpy(np.ascontiguousarray(arrays[f"{prefix}_x"])),
                             torch.from_numpy(np.ascontiguousarray(arrays[f"{prefix}_y"])))  # fmt: skip


def _with_stats(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays["mean"], arrays["std"] = _channel_stats(arrays["train_x"])
    return arrays


# ----------------------------------------------------------------------------- CamVid


def _find_camvid_tarball() -> Path:
    return find_shared_file(CAMVID_TARBALL, "CamVid tarball", "camvid:DIR")


def _camvid_tar_pairs(path: Path) -> _Pairs:
    """``.../{split}/{images,labels}/NAME`` members of the tarball, read into memory (11 MB)."""
    found: dict[tuple[str, str], dict[str, _Src]] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                parts = m.name.split("/")
                if not m.isfile() or len(parts) < 3 or parts[-3] not in CAMVID_SPLITS:
                    continue
                if parts[-2] not in ("images", "labels") or (f := tf.extractfile(m)) is None:
                    continue
                found.setdefault((parts[-3], parts[-2]), {})[Path(parts[-1]).stem] = (m.name, f.read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return {s: _pair(s, found.get((s, "images"), {}), found.get((s, "labels"), {}), str(path)) for s in CAMVID_SPLITS}


def _camvid_dir_pairs(root: Path) -> _Pairs:
    pairs: _Pairs = {}
    for split in CAMVID_SPLITS:
        images = {p.stem: (str(p), str(p)) for p in _list_images(_require_dir(root / split / "images"))}
        labels = {p.stem: (str(p), str(p)) for p in _list_images(_require_dir(root / split / "labels"))}
        pairs[split] = _pair(split, images, labels, str(root))
    return pairs


def camvid_splits(path: Path | None = None, progress: Progress | None = None) -> tuple[DatasetInfo, dict]:
    """CamVid's info and its ``train``/``val``/``test`` :class:`SegmentationSplit` s (decoded once, cached)."""
    path = _find_camvid_tarball() if path is None else path
    if path.is_dir():
        root = path / "camvid" if (path / "camvid" / "train").is_dir() and not (path / "train").is_dir() else path
        pairs = _camvid_dir_pairs(root)
        files = [Path(src) for items in pairs.values() for i, lab in items for _, src in (i, lab)]
        key = _folder_key("camvid", root, files)
    elif path.is_file():
        st = path.stat()
        key = f"{path.name.removesuffix('.tar.gz')}-{st.st_size}-{st.st_mtime_ns}"
        pairs = None
    else:
        raise DataError(f"dataset file {path} not found")

    def build() -> dict[str, np.ndarray]:
        log.info("decoding CamVid from %s (first use; cached afterwards)", path)
        found = pairs if pairs is not None else _camvid_tar_pairs(path)
        return _with_stats(_decode_pairs(found, len(CAMVID_CLASSES), CAMVID_IGNORE, progress))

    arrays = _cached(key, build)
    info = _seg_info("camvid", CAMVID_CLASSES, arrays, CAMVID_IGNORE)
    return info, {s: _split(arrays, s) for s in CAMVID_SPLITS}


@register_reader("camvid", arg="DIR", optional=True)
def _load_camvid(path: Path | None, progress: Progress | None) -> Loaded:
    info, splits = camvid_splits(path, progress)
    return info, splits["train"], splits["test"]


# ----------------------------------------------------------------------------- ADE20K


def _ade_remap(lab: np.ndarray) -> np.ndarray:
    """0 ("other") -> ignore, 1..150 -> 0..149; values above 150 stay out of range (and are reported)."""
    return np.where(lab == 0, ADE20K_IGNORE, lab.astype(np.int64) - 1)


def _ade_resize(img: np.ndarray, lab: np.ndarray, size: int = ADE20K_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Shorter side to ``size`` (image bilinear, label nearest), then the centre ``size`` x ``size`` square."""
    from PIL import Image

    h, w = lab.shape
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top : top + size, left : left + size], lab[top : top + size, left : left + size]


@register_reader("ade20k")
def _load_ade20k(path: Path, progress: Progress | None) -> Loaded:
    root = _require_dir(path)
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016" / "images").is_dir():
        root = root / "ADEChallengeData2016"
    pairs: _Pairs = {}
    for split, sub in (("train", "training"), ("test", "validation")):
        img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise DataError(f"{path} is not an ADEChallengeData2016 folder: {d} is missing")
        images = {p.stem: (str(p), str(p)) for p in _list_images(img_dir)}
        labels = {p.stem: (str(p), str(p)) for p in _list_images(ann_dir)}
        pairs[split] = _pair(split, images, labels, str(root))
    files = [Path(src) for items in pairs.values() for i, lab in items for _, src in (i, lab)]

    def build() -> dict[str, np.ndarray]:
        log.info("decoding ADE20K in %s (first use; cached afterwards)", root)
        arrays = _decode_pairs(pairs, ADE20K_CLASSES, ADE20K_IGNORE, progress, remap=_ade_remap, resize=_ade_resize)
        return _with_stats(arrays)

    arrays = _cached(_folder_key(f"ade20k{ADE20K_SIZE}", root, files), build)
    info = _seg_info("ade20k", [str(i) for i in range(ADE20K_CLASSES)], arrays, ADE20K_IGNORE)
    return info, _split(arrays, "train"), _split(arrays, "test")
