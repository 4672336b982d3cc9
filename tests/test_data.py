"""Datasets and loaders: every SPEC form on tiny fakes, the real CIFAR-10 tarball when present,
the loader's determinism/augmentation/sharding, and evaluation."""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from deepshare_convert import data
from deepshare_convert.data import DatasetInfo, TensorSplit, load_dataset, make_loader
from deepshare_convert.errors import DataError, DeepShareError
from deepshare_convert.evaluation import EvalResult, evaluate

from .conftest import CIFAR10_JPG, needs


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache: every test gets its own."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("DEEPSHARE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _no_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data.decode, "_decode_images", fail)  # where the readers' decoding looks it up


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_split(digits):
    info, train, test = digits
    assert info.name == "digits" and info.num_classes == 10 and info.input_size == (1, 8, 8)
    assert info.classes == [str(i) for i in range(10)] and not info.flip
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.images.shape == (len(train), 8, 8, 1) and train.images.dtype == torch.float32
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert train.labels.dtype == torch.int64
    assert test.labels.bincount().min() >= 35  # stratified


def test_digits_split_is_deterministic(digits):
    _, train, test = digits
    _, train2, test2 = load_dataset("digits")
    assert torch.equal(train.images, train2.images) and torch.equal(test.labels, test2.labels)


# ----------------------------------------------------------------------------- loader


def test_loader_shapes_and_default_normalisation(digits):
    info, train, test = digits
    loader = make_loader(test, info, train=False, batch_size=64)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 6 and loader.num_samples == 360
    x, y = batches[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert batches[-1][0].shape[0] == 360 - 5 * 64
    raw = test.images[:64].permute(0, 3, 1, 2)
    assert torch.allclose(x, (raw - 0.5) / 0.5)  # digits default stats (0.5,)/(0.5,)
    assert torch.equal(torch.cat([y for _, y in batches]), test.labels)  # test order kept


def test_loader_dataset_stats_give_zero_mean(digits):
    info, train, _ = digits
    mean, std = float(train.images.mean()), float(train.images.std())
    xs = torch.cat([x for x, _ in make_loader(train, info, train=False, batch_size=500, mean=(mean,), std=(std,))])
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-3


def test_augmentation_changes_train_batches_only(digits):
    info, train, test = digits
    plain = _batches(make_loader(train, info, train=True, batch_size=128, shuffle=False, augment=False))
    augmented = _batches(make_loader(train, info, train=True, batch_size=128, shuffle=False))
    assert not torch.equal(plain[0][0], augmented[0][0])
    assert torch.equal(plain[0][1], augmented[0][1])
    test_loader = make_loader(test, info, train=False, batch_size=128)
    assert _same(_batches(test_loader), _batches(test_loader))
    unaugmented = make_loader(test, info, train=True, batch_size=128, shuffle=False, augment=False)
    assert _same(_batches(test_loader), _batches(unaugmented))


def test_augment_is_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(16, 2, 12, 10)
    x[:, :, 4:8, 3:5] = torch.rand(16, 2, 4, 2, generator=g)  # content 3+ pixels from every border
    flipped = data._augment(x, 0, True, g)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))
    assert any(not torch.equal(f, o) for f, o in zip(flipped, x))
    cropped = data._augment(x, 2, False, g)
    assert cropped.shape == x.shape
    assert torch.allclose(cropped.sum((1, 2, 3)), x.sum((1, 2, 3)))  # shifted, nothing lost
    assert any(not torch.equal(c, o) for c, o in zip(cropped, x))


def test_same_seed_same_batches_and_epochs_differ(digits):
    info, train, _ = digits

    def run(seed=0, epoch=0, **kw):
        loader = make_loader(train, info, train=True, batch_size=256, seed=seed, **kw)
        loader.set_epoch(epoch)
        return _batches(loader)

    first = run()
    assert _same(first, run())
    assert not torch.equal(first[0][1], run(epoch=1)[0][1])
    assert not torch.equal(first[0][1], run(seed=1)[0][1])
    assert _same(first, run(num_workers=1))  # worker processes build the very same batches


def test_limit_is_fixed_and_mixed(digits):
    info, train, _ = digits
    loader = make_loader(train, info, train=False, batch_size=32, limit=100)
    assert loader.num_samples == 100 and len(loader) == 4
    labels = torch.cat([y for _, y in loader])
    assert len(labels.unique()) == 10
    other = make_loader(train, info, train=True, batch_size=32, limit=100, seed=5)
    assert sorted(torch.cat([y for _, y in other]).tolist()) == sorted(labels.tolist())
    assert make_loader(train, info, train=False, batch_size=32, limit=10**6).num_samples == len(train)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_gives_disjoint_equal_shards(world_size):
    n = 1000
    split = TensorSplit(torch.zeros(n, 2, 2, 1), torch.arange(n))  # labels double as example ids
    info = DatasetInfo("ids", n, (1, 2, 2), (0.0,), (1.0,), [str(i) for i in range(n)], crop_padding=0, flip=False)
    shards = []
    for rank in range(world_size):
        loader = make_loader(split, info, train=True, batch_size=64, rank=rank, world_size=world_size)
        loader.set_epoch(3)
        ids = [y for _, y in loader]
        assert len(ids) == len(loader) == 16 // world_size
        shards.append(torch.cat(ids).tolist())
    union = [i for s in shards for i in s]
    assert len(union) == len(set(union))
    assert min(len(s) for s in shards) >= (len(loader) - 1) * 64
    with pytest.raises(DataError):
        make_loader(split, info, train=True, batch_size=64, rank=world_size, world_size=world_size)


# ----------------------------------------------------------------------------- image folders


def _png(path: Path, size=(6, 5), color=(10, 20, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _imagefolder(root: Path) -> Path:
    for split, n in (("train", 3), ("test", 2)):
        for k, cls in enumerate(["dog", "cat"]):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", color=(10 * k, 50 + i, 200))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder(tmp_path, monkeypatch):
    root = _imagefolder(tmp_path / "pets")
    info, train, test = load_dataset(f"imagefolder:{root}")
    assert info.classes == ["cat", "dog"] and info.num_classes == 2 and info.input_size == (3, 5, 6)
    assert train.images.shape == (6, 5, 6, 3) and train.images.dtype == torch.uint8 and len(test) == 4
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[0, 0, 0].tolist() == [10, 50, 200] and train.images[4, 2, 3].tolist() == [0, 51, 200]
    assert info.mean[2] == pytest.approx(200 / 255) and info.std[2] == 1.0  # constant channel: std 1, not 0
    _no_decoding(monkeypatch)
    _, train2, _ = load_dataset(f"imagefolder:{root}")
    assert torch.equal(train.images, train2.images)


def test_imagefolder_with_only_a_test_split_serves_evaluation_not_training(tmp_path):
    """Evaluation and private inference read test images only; training says in one line what is missing."""
    from deepshare_convert.data import require_split
    from deepshare_convert.training.retrain import retrain

    for k, cls in enumerate(["dog", "cat"]):
        _png(tmp_path / "only" / "test" / cls / "0.png", size=(8, 8), color=40 * k, mode="L")
    spec = f"imagefolder:{tmp_path / 'only'}"
    info, train, test = load_dataset(spec)
    assert len(train) == 0 and len(test) == 2 and info.classes == ["cat", "dog"] and info.input_size == (1, 8, 8)
    x, y = next(iter(make_loader(test, info, train=False, batch_size=2)))
    assert x.shape == (2, 1, 8, 8) and y.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"has no train images \(want train/<class>/<image>"):
        require_split(train, "train", spec)
    from .test_retrain import DIGITS

    with pytest.raises(DataError, match="has no train images"):
        retrain(DIGITS, tmp_path / "run", overrides=[f"data.spec={spec}"])


def test_imagefolder_grayscale_stays_one_channel(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(tmp_path / split / cls / "0.png", size=(4, 4), color=128, mode="L")
    info, train, _ = load_dataset(f"imagefolder:{tmp_path}")
    assert info.input_size == (1, 4, 4) and train.images.shape == (2, 4, 4, 1)
    x, _ = next(iter(make_loader(train, info, train=True, batch_size=2)))
    assert x.shape == (2, 1, 4, 4)


def test_imagefolder_sizes_must_match(tmp_path):
    root = _imagefolder(tmp_path / "pets")
    _png(root / "train" / "dog" / "big.png", size=(7, 7))
    with pytest.raises(DataError, match="differ in size") as e:
        load_dataset(f"imagefolder:{root}")
    assert "\n" not in str(e.value)


def test_corrupt_image_is_a_data_error(tmp_path):
    root = _imagefolder(tmp_path / "pets")
    (root / "train" / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_dataset(f"imagefolder:{root}")


def test_parallel_decoding_matches_serial():
    blobs = []
    for i in range(40):
        buf = io.BytesIO()
        Image.new("RGB", (3, 2), (i, 2 * i, 3 * i)).save(buf, format="PNG")
        blobs.append((f"{i}.png", buf.getvalue()))
    serial = data._decode_images(blobs, len(blobs), rgb=True, progress=None, workers=1)
    seen = []
    parallel = data._decode_images(iter(blobs), None, rgb=True, progress=lambda d, t: seen.append(d), workers=2)
    assert len(serial) == 40 and all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    assert seen[-1] == 40


def test_decoding_error_in_worker_is_a_data_error():
    blobs = [(f"{i}.png", b"junk") for i in range(3)]
    with pytest.raises(DataError, match="cannot decode image 0.png"):
        data._decode_images(blobs, None, rgb=True, progress=None, workers=2)


def test_not_a_tarball(tmp_path):
    bad = tmp_path / "cifar10-jpg.tar.gz"
    bad.write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"cifar10-jpg:{bad}")


# ----------------------------------------------------------------------------- official CIFAR pickles


def _cifar_batch(n: int, label_key: bytes, num_classes: int, offset: int) -> dict:
    chw = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    chw[:, 0], chw[:, 1], chw[:, 2] = 10, 20, 30  # one value per channel: catches CHW/HWC mix-ups
    chw[:, 0, 0, 1] = np.arange(n) + offset  # top row, second column: catches H/W mix-ups
    return {b"data": chw.reshape(n, -1), label_key: [(i + offset) % num_classes for i in range(n)]}


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def test_cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", _cifar_batch(4, b"labels", 10, 4 * (i - 1)))
    _dump(folder / "test_batch", _cifar_batch(3, b"labels", 10, 0))
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    for arg in (folder, tmp_path):  # the folder itself or its parent
        info, train, test = load_dataset(f"cifar10:{arg}")
        assert info.name == "cifar10" and info.classes[3] == "c3" and info.input_size == (3, 32, 32)
        assert train.images.shape == (20, 32, 32, 3) and len(test) == 3
        assert train.images[0, 5, 5].tolist() == [10, 20, 30]
        assert train.images[:, 0, 1, 0].tolist() == list(range(20))
        assert train.labels.tolist() == [i % 10 for i in range(20)]
        assert info.mean == data.CIFAR10_STATS[0]


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _dump(folder / "train", _cifar_batch(5, b"fine_labels", 100, 0))
    _dump(folder / "test", _cifar_batch(2, b"fine_labels", 100, 7))
    _dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    info, train, test = load_dataset(f"cifar100:{tmp_path}")
    assert info.num_classes == 100 and info.classes[99] == "f99" and info.mean == data.CIFAR100_STATS[0]
    assert len(train) == 5 and test.labels.tolist() == [7, 8]


def test_cifar_pickle_without_labels_is_a_data_error(tmp_path):
    _dump(tmp_path / "train", {b"data": np.zeros((1, 3072), np.uint8)})
    _dump(tmp_path / "test", {b"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(DataError, match="fine_labels"):
        load_dataset(f"cifar100:{tmp_path}")


# ----------------------------------------------------------------------------- tiny-imagenet


def test_tinyimagenet(tmp_path, monkeypatch):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # wnids.txt is not sorted; classes are
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        for i in range(2):
            _png(root / "train" / w / "images" / f"{w}_{i}.JPEG", size=(64, 64), color=(k, i, 0))
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    _png(root / "train" / "n01" / "images" / "n01_gray.JPEG", size=(64, 64), color=77, mode="L")
    rows = []
    for i, w in enumerate(["n03", "n01"]):
        _png(root / "val" / "images" / f"val_{i}.JPEG", size=(64, 64))
        rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")

    info, train, test = load_dataset(f"tinyimagenet:{tmp_path}")
    assert info.classes == ["n01", "n02", "n03"] and info.input_size == (3, 64, 64) and info.crop_padding == 8
    assert train.images.shape == (7, 64, 64, 3) and train.labels.bincount().tolist() == [3, 2, 2]
    assert sorted(test.labels.tolist()) == [0, 2]
    _no_decoding(monkeypatch)
    load_dataset(f"tinyimagenet:{root}")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("foo", "unknown dataset spec 'foo'; known: digits, cifar10-jpg, imagefolder:DIR"),
        ("cifar10", "needs a directory: cifar10:DIR (or cifar10-jpg"),
        ("digits:/x", "unknown dataset spec"),
        ("imagefolder:", "needs a directory"),
        ("imagefolder:/no/such/dir", "dataset directory /no/such/dir not found"),
        ("cifar10:/no/such/dir", "dataset directory /no/such/dir not found"),
        ("cifar100:/no/such/dir", "dataset directory /no/such/dir not found"),
        ("tinyimagenet:/no/such/dir", "dataset directory /no/such/dir not found"),
        ("cifar10-jpg:/no/such/file.tar.gz", "/no/such/file.tar.gz not found"),
    ],
)
def test_bad_specs_are_one_line_data_errors(spec, message):
    with pytest.raises(DataError) as e:
        load_dataset(spec)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, DeepShareError)


def test_registered_reader_is_a_spec(monkeypatch, digits):
    """A new dataset is one decorated function: it is dispatched to and listed among the known specs."""
    monkeypatch.setattr(data.specs, "_READERS", dict(data.specs._READERS))
    seen = []

    @data.register_reader("fake")
    def _read(path, progress):
        seen.append(path)
        return digits

    assert load_dataset("fake:~/x") is digits and seen == [Path("~/x").expanduser()]
    with pytest.raises(DataError, match=r"needs a directory: fake:DIR"):
        load_dataset("fake")
    with pytest.raises(DataError, match=r"known: digits, .*, tinyimagenet:DIR, camvid, ade20k:DIR, fake:DIR$"):
        load_dataset("nope")


def test_wrong_folder_kinds(tmp_path):
    with pytest.raises(DataError, match="not a cifar-10-batches-py folder"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="no wnids.txt"):
        load_dataset(f"tinyimagenet:{tmp_path}")
    with pytest.raises(DataError, match="no images found .*and/or test/"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_missing_default_tarball(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSHARE_SHARED", str(tmp_path))
    monkeypatch.setattr(data.specs, "__file__", str(tmp_path / "pkg" / "data" / "specs.py"))
    with pytest.raises(DataError, match="set DEEPSHARE_SHARED or use cifar10-jpg:PATH"):
        load_dataset("cifar10-jpg")


def test_loader_argument_errors(digits):
    info, train, _ = digits
    with pytest.raises(DataError, match="channels"):
        make_loader(train, info, train=False, batch_size=8, mean=(0.5, 0.5, 0.5), std=(1, 1, 1))
    with pytest.raises(DataError, match="batch size"):
        make_loader(train, info, train=False, batch_size=0)
    with pytest.raises(DataError, match="limit"):
        make_loader(train, info, train=False, batch_size=8, limit=0)


# ----------------------------------------------------------------------------- the real CIFAR-10 tarball


@needs(CIFAR10_JPG)
def test_cifar10_jpg_tarball_and_cache(monkeypatch, _cache, record_property):
    monkeypatch.setenv("DEEPSHARE_SHARED", str(CIFAR10_JPG.parent.parent))
    seen = []
    info, train, test = load_dataset("cifar10-jpg", progress=lambda done, total: seen.append(done))
    assert seen[-1] == 60000 and seen == sorted(seen)
    assert len(train) == 50000 and len(test) == 10000
    assert info.num_classes == 10 and info.classes[0] == "airplane" and info.classes[-1] == "truck"
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == torch.uint8
    assert train.labels.bincount().tolist() == [5000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    mean = train.images.float().mean((0, 1, 2)) / 255
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=0.01)
    assert len(list(_cache.glob("cifar10-jpg-*.npz"))) == 1 and not list(_cache.glob("*.tmp"))

    _no_decoding(monkeypatch)  # the second load must read the cache: decoding again fails the test
    start = time.perf_counter()
    info2, train2, test2 = load_dataset(f"cifar10-jpg:{CIFAR10_JPG}")
    record_property("cached_load_seconds", round(time.perf_counter() - start, 2))  # a figure, not a pass/fail bound
    assert info2 == info and torch.equal(train2.labels, train.labels) and torch.equal(test2.images, test.images)


# ----------------------------------------------------------------------------- evaluate


class _OneHotOfInput(nn.Module):
    """Reads the label the loader hid in the input: a perfect classifier."""

    def forward(self, x):
        return F.one_hot(x[:, 0].long(), 10).float()


def _label_loader(labels: torch.Tensor, batch: int = 16):
    return [(labels[i : i + batch, None].float(), labels[i : i + batch]) for i in range(0, len(labels), batch)]


def test_evaluate_perfect_and_constant_models(digits):
    _, _, test = digits
    loader = _label_loader(test.labels)
    seen = []
    result = evaluate(_OneHotOfInput(), loader, progress=lambda done, total: seen.append((done, total)))
    assert isinstance(result, EvalResult) and result.top1 == 100.0 and result.n == len(test)
    assert result.loss == pytest.approx(float(F.cross_entropy(torch.eye(10), torch.arange(10))))
    assert seen[-1] == (len(loader), len(loader))

    constant = nn.Linear(1, 10)
    nn.init.zeros_(constant.weight), nn.init.zeros_(constant.bias)
    constant.train()
    result = evaluate(constant, loader)
    assert result.top1 == pytest.approx(100 * float((test.labels == 0).float().mean()))
    assert 5 < result.top1 < 15 and result.loss == pytest.approx(np.log(10))
    assert constant.training  # mode restored


def test_evaluate_binary_and_empty():
    y = torch.tensor([0, 1, 1, 0])
    x = torch.tensor([[-2.0], [3.0], [1.0], [-1.0]])
    result = evaluate(nn.Identity(), [(x, y)])
    assert result.top1 == 100.0 and result.n == 4
    assert result.loss == pytest.approx(float(F.binary_cross_entropy_with_logits(x[:, 0], y.float())))
    assert evaluate(nn.Identity(), [(-x, y)]).top1 == 0.0
    empty = evaluate(nn.Identity(), [])
    assert empty.n == 0 and np.isnan(empty.top1)


def test_evaluate_digits_loader_end_to_end(digits):
    info, _, test = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    result = evaluate(model, make_loader(test, info, train=False, batch_size=100, limit=200))
    assert result.n == 200 and 0.0 <= result.top1 <= 100.0 and result.loss > 0
