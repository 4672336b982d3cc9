"""The client's own files -> the model's input batch, preprocessed exactly as evaluation does.

A query names image files (JPEG, PNG, ...), folders of them, or ``.npy`` arrays.  Images are
decoded by the same decoder as the datasets (:func:`~..data.decode._decode_one`), resized to the
plan's input size only where they differ (bilinear), then scaled and normalised by
:mod:`..data.preprocess` -- the functions the loader uses -- so a private answer and
``deepshare evaluate`` see the same tensor.  A ``.npy`` of uint8 holds pixels, (H, W, C) or
(N, H, W, C), treated like decoded images; a float ``.npy`` of (C, H, W) or (N, C, H, W) is taken
as already preprocessed.  Every problem is one line naming the file, before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.decode import _IMAGE_EXTS, _decode_one, _DecodeError
from ..data.preprocess import normalise, to_float
from ..errors import DataError

__all__ = ["Inputs", "read_inputs", "list_inputs"]


@dataclass
class Inputs:
    """The batch (N, C, H, W), one name per image (``file`` or ``file[i]`` for an array's i-th), what was resized."""

    x: torch.Tensor
    names: list[str]
    resized: list[str]


def list_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files named, and the images / ``.npy`` files inside folders named (sorted); a clear error for none."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (*_IMAGE_EXTS, ".npy"))
            if not found:
                raise DataError(f"{p} holds no image files ({', '.join(sorted(_IMAGE_EXTS))}) and no .npy")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError("no input files given")
    return files


def _image(path: Path, size: tuple[int, int], channels: int) -> tuple[np.ndarray, bool]:
    """One image file -> uint8 (H, W, C) at ``size``; whether it was resized."""
    try:
        arr = _decode_one(str(path), str(path), rgb=False)
    except _DecodeError as e:
        raise DataError(str(e)) from None
    if arr.shape[2] != channels:
        raise DataError(f"{path} has {arr.shape[2]} channel(s); the model takes {channels}")
    if arr.shape[:2] == size:
        return arr, False
    from PIL import Image

    im = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
    out = np.asarray(im.resize((size[1], size[0]), Image.BILINEAR))
    return (out if out.ndim == 3 else out[:, :, None]), True


def _array(path: Path, input_size: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """A ``.npy``: (pixels as (N, H, W, C) uint8, False) or (preprocessed (N, C, H, W) float32, True)."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npy array: {e}") from None
    c, h, w = input_size
    if a.dtype == np.uint8:
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[1:] != (h, w, c):
            raise DataError(f"{path}: uint8 pixels must be (H, W, C) or (N, H, W, C) = ({h}, {w}, {c}), got {a.shape}")
        return a, False
    if a.dtype.kind != "f":
        raise DataError(f"{path}: a .npy must hold uint8 pixels or float inputs, not {a.dtype}")
    a = a[None] if a.ndim == 3 else a
    if a.ndim != 4 or a.shape[1:] != (c, h, w):
        raise DataError(f"{path}: float inputs must be (C, H, W) or (N, C, H, W) = ({c}, {h}, {w}), got {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{path}: holds NaN or infinite values")
    return a.astype(np.float32), True


def read_inputs(paths: Sequence[str | Path], input_size: Sequence[int], mean: Sequence[float] | None,
                std: Sequence[float] | None, *, limit: int | None = None) -> Inputs:  # fmt: skip
    """Read ``paths`` (files and folders) as one normalised batch for a model taking ``input_size`` (C, H, W)."""
    size = tuple(int(d) for d in input_size)
    if len(size) != 3:
        raise DataError(f"queries take images: the model's input is {size}, not (C, H, W)")
    files = list_inputs(paths)
    batches, names, resized = [], [], []
    for f in files:
        if f.suffix.lower() == ".npy":
            a, ready = _array(f, size)
            x = torch.from_numpy(a) if ready else _pixels(torch.from_numpy(a), mean, std, f)
            names.extend([str(f)] if len(a) == 1 else [f"{f}[{i}]" for i in range(len(a))])
        else:
            img, was = _image(f, size[1:], size[0])
            x = _pixels(torch.from_numpy(np.array(img))[None], mean, std, f)
            names.append(str(f))
            if was:
                resized.append(str(f))
        batches.append(x)
        if limit is not None and len(names) > limit:
            raise DataError(f"more than {limit} images in one query: split them, or raise the server's --max-images")
    return Inputs(torch.cat(batches), names, resized)


def _pixels(images: torch.Tensor, mean, std, where: Path) -> torch.Tensor:
    if mean is None or std is None:
        raise DataError(f"{where}: the model's input normalisation is unknown (not a built-in model): pass a float "
                        f".npy of preprocessed inputs instead")  # fmt: skip
    return normalise(to_float(images), mean, std)
