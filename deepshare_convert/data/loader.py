"""Batches from an in-memory :class:`TensorSplit`: normalised, augmented a batch at a time, reproducible.

Why not a ``torch.utils.data`` dataset with per-sample transforms: the split is
already one tensor, so a batch is one index and one vectorised augmentation; and
the order and augmentation must not depend on ``num_workers`` or on the rank a
batch lands on, so both are derived from ``(seed, epoch, batch number)`` here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from ..errors import DataError
from .preprocess import normalise, to_float
from .specs import DatasetInfo, TensorSplit

_LIMIT_SEED = 0  # `limit` subsets do not depend on `seed`: quick evals stay comparable across runs


_Plan = list[tuple[int, torch.Tensor]]
"""One epoch's batches for one rank: (global batch number, example indices)."""


class TensorLoader:
    """Iterate ``(x, y)`` batches over a :class:`TensorSplit`: x float32 NCHW normalised, y int64.

    ``y`` is (N,) class labels, or (N, H, W) masks for a segmentation split
    (augmented jointly with the images: :func:`_augment_joint`).

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
        task: str = "classification",
        ignore_index: int | None = None,
        scale: tuple[float, float] = (1.0, 1.0),
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
        self.task, self.ignore_index, self.scale = task, ignore_index, scale
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
        x = to_float(self.split.images[idx])
        y = self.split.labels[idx]
        if self.task == "segmentation":
            y = y.long()  # masks are stored as uint8
        if self.augment:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, 1, number))
            if self.task == "segmentation":
                x, y = _augment_joint(x, y, self.scale, self.flip, self.ignore_index, g)
            else:
                x = _augment(x, self.crop_padding, self.flip, g)
        x = normalise(x, self._mean, self._std)
        return x, y


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


def _augment_joint(
    x: torch.Tensor, y: torch.Tensor, scale: tuple[float, float], flip: bool, ignore: int | None, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale by s in ``scale``, random crop back to (H, W), random flip: one warp for image and mask.

    The three steps compose into one affine map per example, so the whole batch
    is a single ``grid_sample`` (image bilinear, mask nearest) and the two stay
    aligned by construction.  Where the crop leaves the rescaled image (s < 1)
    the image is padded with 0 and the mask with ``ignore``.
    """
    b = x.shape[0]
    lo, hi = scale
    s = lo + (hi - lo) * torch.rand(b, generator=g)
    room = (1.0 - 1.0 / s).abs()  # how far the crop window may move, in [-1, 1] units
    tx = (2 * torch.rand(b, generator=g) - 1) * room
    ty = (2 * torch.rand(b, generator=g) - 1) * room
    sign = torch.ones(b)
    if flip:
        sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sign / s, tx
    theta[:, 1, 1], theta[:, 1, 2] = 1.0 / s, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Nearest-sample label + 1 so the zero padding reads 0, then make it ``ignore``.
    y1 = F.grid_sample((y + 1).unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    y1 = y1[:, 0].round().long()
    # The image is padded exactly where the label is: border sampling (no fade to black in the last
    # half pixel), then 0 outside.
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * (y1 != 0).unsqueeze(1)
    pad = -1 if ignore is None else ignore
    return x, torch.where(y1 == 0, torch.full_like(y1, pad), y1 - 1)


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
        task=info.task,
        ignore_index=info.ignore_index,
        scale=info.scale,
    )
