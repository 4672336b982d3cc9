"""Datasets as in-memory tensors, and a fast batch-wise loader over them.

Why in memory: every dataset the toolkit targets (8x8 digits, CIFAR-10/100,
tiny-imagenet) fits in RAM as uint8, and the experiments run on small CPU
machines.  Decoding a JPEG per sample per epoch through PIL would dominate the
run time, so images are decoded **once**, cached as an ``.npz`` outside the
repository, and augmentation is done a whole batch at a time in torch.

One module per concern:

* :mod:`.specs` -- ``DatasetInfo``/``TensorSplit`` and the SPEC -> reader registry (``load_dataset``);
* :mod:`.readers` -- one registered reader per SPEC (the list of SPECs is documented there);
* :mod:`.segmentation` -- the segmentation readers (``camvid``, ``ade20k:DIR``): image + label-PNG pairs;
* :mod:`.decode` -- image files -> arrays, decoded in worker processes;
* :mod:`.cache` -- the on-disk cache of decoded arrays and its keys;
* :mod:`.stats` -- per-channel normalisation statistics;
* :mod:`.loader` -- ``TensorLoader``/``make_loader``: batching, augmentation, seeding, sharding.

This package re-exports what the rest of the code base (and the tests) import.
"""

from __future__ import annotations

# Importing the readers registers them, in the order the "known:" list shows (segmentation's
# camvid, ade20k:DIR last).  Private names are re-exported for the tests that call them.
from . import (
    readers as _readers,  # noqa: F401
    segmentation as _segmentation,  # noqa: F401
)
from .cache import _CACHE_FORMAT, _cached, cache_dir  # noqa: F401
from .decode import _decode_images  # noqa: F401
from .loader import TensorLoader, _augment, make_loader  # noqa: F401
from .readers import _find_cifar10_tarball  # noqa: F401
from .segmentation import CAMVID_CLASSES, camvid_splits  # noqa: F401
from .specs import (
    DatasetInfo,
    Loaded,
    Progress,  # noqa: F401
    SegmentationSplit,
    TensorSplit,
    check_input_fits,
    known_specs,
    load_dataset,
    register_reader,  # noqa: F401
    require_split,
)
from .stats import CIFAR10_STATS, CIFAR100_STATS, DIGITS_STATS, TINYIMAGENET_STATS, _channel_stats  # noqa: F401

__all__ = [
    "KNOWN_SPECS",
    "DatasetInfo",
    "TensorSplit",
    "SegmentationSplit",
    "TensorLoader",
    "Loaded",
    "load_dataset",
    "check_input_fits",
    "require_split",
    "make_loader",
    "cache_dir",
]

KNOWN_SPECS = known_specs()
"""The built-in SPEC forms, for messages; :func:`known_specs` also lists readers registered later."""
