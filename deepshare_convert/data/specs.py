"""Dataset SPEC strings -> readers, and the containers every reader returns.

The dispatch is a registry so that a new dataset is one decorated function in
:mod:`.readers` (its spec, its argument and its line in the "known" list all
live beside it), not another branch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

Progress = Callable[[int, int | None], None]
"""``progress(done, total)``: called while images are decoded (first load only); ``total`` may be None."""


@dataclass
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    ``mean``/``std`` are the dataset's own per-channel statistics (in [0, 1]
    pixel units); a pretrained model may expect others, which is why
    :func:`make_loader` accepts overrides.  ``crop_padding`` and ``flip`` are the
    training augmentation policy (random crop with that much zero padding,
    random horizontal flip).

    ``task`` is ``"classification"`` (labels are one class per image) or
    ``"segmentation"`` (labels are one class per pixel; ``ignore_index`` marks
    unlabelled pixels, excluded from the loss and from mIoU, and ``scale`` is
    the random-rescale range of the joint image/label augmentation).
    """

    name: str
    num_classes: int
    input_size: tuple[int, ...]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    crop_padding: int = 4
    flip: bool = True
    task: str = "classification"
    ignore_index: int | None = None
    scale: tuple[float, float] = (1.0, 1.0)

    @property
    def segmentation(self) -> bool:
        return self.task == "segmentation"


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


class SegmentationSplit(TensorSplit):
    """A segmentation split: ``images`` (N, H, W, C) uint8 and ``labels`` the masks, (N, H, W) uint8.

    Masks stay uint8 in memory (an eighth of int64); the loader widens each batch.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels.ndim != 3 or self.labels.shape[1:] != self.images.shape[1:3]:
            raise DataError(
                f"bad segmentation split: images {tuple(self.images.shape)}, masks {tuple(self.labels.shape)} "
                "(want N,H,W,C and N,H,W)"
            )


Loaded = tuple[DatasetInfo, TensorSplit, TensorSplit]
"""What :func:`load_dataset` returns: ``(info, train, test)``."""

Reader = Callable[..., Loaded]
"""``read(path, progress)``: ``path`` is the spec's argument as a Path (``~`` expanded), None when it has none."""


@dataclass(frozen=True)
class _Entry:
    read: Reader
    arg: str | None  # placeholder shown in the known list ("DIR"); None: the spec takes no argument
    optional: bool  # the argument may be left out (the reader finds a default)
    hint: str  # appended to the "needs a directory" error


_READERS: dict[str, _Entry] = {}  # spec name (lower case) -> reader, in registration order


def register_reader(
    name: str, *, arg: str | None = "DIR", optional: bool = False, hint: str = ""
) -> Callable[[Reader], Reader]:
    """Make ``NAME`` (``NAME:ARG`` when ``arg``) a dataset spec read by the decorated function.

    Registration order is the order of the "known:" list in the unknown-spec error.
    """

    def decorate(read: Reader) -> Reader:
        if name != name.lower() or name in _READERS:
            raise ValueError(f"dataset reader {name!r} must be lower case and registered once")
        _READERS[name] = _Entry(read, arg, optional, hint)
        return read

    return decorate


def known_specs() -> tuple[str, ...]:
    """The spec forms users can write, as shown in errors: ``digits``, ``imagefolder:DIR``, ..."""
    return tuple(n if e.arg is None or e.optional else f"{n}:{e.arg}" for n, e in _READERS.items())


def load_dataset(spec: str, *, progress: Progress | None = None) -> Loaded:
    """Read the dataset named by ``spec`` into memory: ``(info, train, test)``.

    The first load of an image dataset decodes every file (about 10 s for
    CIFAR-10 on 2 cores, reported through ``progress`` and :mod:`logging`);
    later loads read the cache in well under a second.
    """
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    entry = _READERS.get(kind)
    if entry is None or (arg and entry.arg is None):
        raise DataError(f"unknown dataset spec {spec!r}; known: {', '.join(known_specs())}")
    if not arg and entry.arg is not None and not entry.optional:
        raise DataError(f"dataset spec {spec!r} needs a directory: {kind}:{entry.arg}{entry.hint}")
    return entry.read(Path(arg).expanduser() if arg else None, progress)


def check_input_fits(input_size: Sequence[int], info: DatasetInfo, data: str, *, hint: str = "") -> None:
    """The model's input shape must be the data's image shape: a clear line now, not a mean/std or conv error."""
    if tuple(input_size) != tuple(info.input_size):
        shape = "×".join
        raise DataError(f"the model takes {shape(map(str, input_size))} inputs, {data} images are "
                        f"{shape(map(str, info.input_size))}{hint}")  # fmt: skip


# ----------------------------------------------------------------------------- helpers for readers


def require_split(split: TensorSplit, which: str, spec: str) -> TensorSplit:
    """``split`` if it has images, else one line saying which ``spec`` lacks (an image folder may hold one split)."""
    if len(split) == 0:
        raise DataError(f"{spec} has no {which} images (want {which}/<class>/<image> in an image folder)")
    return split


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


def find_shared_file(name: str, what: str, instead: str) -> Path:
    """``name`` in the shared data folder: ``$DEEPSHARE_SHARED`` first, then ``../shared/data`` beside the project.

    Tests, benches and demos read the project's shared data from there and never download it;
    ``instead`` names the spec form a user can give in its place (e.g. ``camvid:DIR``).
    """
    import os

    candidates: list[Path] = []
    if env := os.environ.get("DEEPSHARE_SHARED"):
        shared = Path(env).expanduser()
        candidates += [shared / "data" / name, shared / name]
    root = Path(__file__).resolve().parents[2]  # project root = parent of the package dir (we are in data/)
    candidates += [root.parent / "shared" / "data" / name, root / "shared" / "data" / name]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise DataError(f"{what} not found (looked in {looked}); set DEEPSHARE_SHARED or use {instead}")

