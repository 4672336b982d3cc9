"""Segmentation data: CamVid and ADE20K readers, their bad-input errors, joint augmentation, mIoU, training.

Synthetic sets are written by the tests (camvid:DIR / ade20k:DIR layouts); the
real CamVid comes from ../shared and is skipped when absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from deepshare_convert.cli.app import run
from deepshare_convert.data import CAMVID_CLASSES, SegmentationSplit, camvid_splits, load_dataset, make_loader
from deepshare_convert.data.loader import _augment_joint
from deepshare_convert.errors import DataError
from deepshare_convert.evaluation import evaluate
from deepshare_convert.evaluation.metrics import confusion_matrix, seg_scores
from deepshare_convert.training.losses import kd_loss, task_loss

from .conftest import SHARED, needs

CAMVID = SHARED / "data" / "camvid-240x180.tar.gz"
H, W = 16, 24
COLOURS = {0: (220, 40, 40), 1: (40, 200, 40), 3: (40, 40, 220)}  # class -> colour of the synthetic set


def tiny_fcn(num_classes: int = 11) -> nn.Module:
    """conv-ReLU-conv: K logits per pixel at input resolution (the tests' segmentation model)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSHARE_CACHE", str(tmp_path / "cache"))


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _scene(rng: np.random.Generator, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """Random rectangles of three colour-coded classes, a strip of ignore (11) at the bottom."""
    lab = np.zeros((h, w), np.uint8)
    for cls in (1, 3):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        lab[y : y + rng.integers(4, h // 2 + 4), x : x + rng.integers(4, w // 2 + 4)] = cls
    lab[-2:] = 11
    img = np.zeros((h, w, 3), np.uint8)
    for cls, colour in COLOURS.items():
        img[lab == cls] = colour
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255)
    return img, lab


def _camvid_dir(root: Path, counts=(16, 4, 8), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), counts):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = _scene(rng)
            Image.fromarray(img.astype(np.uint8)).save(root / split / "images" / f"f{i:03d}.jpg", quality=95)
            _png(root / split / "labels" / f"f{i:03d}.png", lab)
    return root


def _ade_dir(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for sub in ("training", "validation"):
        for i in range(n):
            h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
            img = rng.integers(0, 256, (h, w, 3))
            lab = rng.integers(0, 151, (h, w))
            _png(root / "images" / sub / f"ADE_{sub}_{i:08d}.jpg", img)
            _png(root / "annotations" / sub / f"ADE_{sub}_{i:08d}.png", lab)
    return root


# ----------------------------------------------------------------------------- readers


@needs(CAMVID)
def test_camvid_reads_all_three_splits():
    info, splits = camvid_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 367, "val": 101, "test": 233}
    assert info.input_size == (3, 180, 240) and info.num_classes == 11 and info.classes == CAMVID_CLASSES
    assert info.task == "segmentation" and info.ignore_index == 11
    for s in splits.values():
        assert isinstance(s, SegmentationSplit)
        assert s.images.shape[1:] == (180, 240, 3) and s.images.dtype == torch.uint8
        assert s.labels.shape[1:] == (180, 240) and int(s.labels.max()) <= 11
    counts = torch.bincount(splits["train"].labels.flatten().long(), minlength=12)
    assert counts[:3].tolist() == [2655759, 3682975, 156038] and counts[11] == 628476  # the README's numbers
    _, train, test = load_dataset("camvid")
    assert (len(train), len(test)) == (367, 233)


def test_camvid_dir_and_loader_batches(tmp_path):
    root = _camvid_dir(tmp_path / "camvid")
    info, train, test = load_dataset(f"camvid:{root}")
    assert (len(train), len(test)) == (16, 8) and info.input_size == (3, H, W)
    assert set(torch.unique(train.labels).tolist()) <= {0, 1, 3, 11}
    x, y = next(iter(make_loader(test, info, train=False, batch_size=8)))
    assert x.shape == (8, 3, H, W) and y.shape == (8, H, W) and y.dtype == torch.int64
    assert torch.equal(y, test.labels.long())  # eval: no augmentation
    # The parent of an extracted camvid/ folder works too.
    _, train2, _ = load_dataset(f"camvid:{tmp_path}")
    assert torch.equal(train2.labels, train.labels)


def test_ade20k_resizes_and_maps_labels(tmp_path):
    root = _ade_dir(tmp_path / "ADEChallengeData2016")
    info, train, test = load_dataset(f"ade20k:{tmp_path}")  # the parent folder works
    assert info.num_classes == 150 and info.ignore_index == 255 and info.input_size == (3, 256, 256)
    assert train.labels.shape == (3, 256, 256) and len(test) == 3
    values = set(torch.unique(train.labels).tolist())
    assert values <= set(range(150)) | {255} and 255 in values and 149 in values
    # Label 0 -> ignore, v -> v - 1 (a pixel of a fixed image, after the shorter-side resize + centre crop).
    lab = np.asarray(Image.open(root / "annotations" / "training" / "ADE_training_00000000.png"))
    from deepshare_convert.data.segmentation import _ade_remap, _ade_resize

    _, expect = _ade_resize(np.zeros((*lab.shape, 3), np.uint8), _ade_remap(lab).astype(np.uint8))
    assert torch.equal(train.labels[0], torch.from_numpy(expect.copy()))


# ----------------------------------------------------------------------------- bad inputs


def _cli_error(capsys, data: str) -> str:
    code = run(["evaluate", "tests.test_segmentation_data:tiny_fcn", "--input-size", f"3,{H},{W}", "--data", data])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_label_size_mismatch_names_the_file(tmp_path, capsys):
    root = _camvid_dir(tmp_path / "cv")
    _png(root / "train" / "labels" / "f003.png", np.zeros((H + 1, W), np.uint8))
    assert "f003.png is 24x17 but its image" in _cli_error(capsys, f"camvid:{root}")


def test_label_values_out_of_range_name_the_file(tmp_path, capsys):
    root = _camvid_dir(tmp_path / "cv")
    bad = np.zeros((H, W), np.uint8)
    bad[0, 0], bad[1, 1] = 12, 200
    _png(root / "test" / "labels" / "f001.png", bad)
    err = _cli_error(capsys, f"camvid:{root}")
    assert "f001.png has values [12, 200] outside the classes 0..10" in err
    _png(root / "test" / "labels" / "f001.png", np.zeros((H, W, 3)))  # a colour PNG is not a class map
    assert "label image " in (err := _cli_error(capsys, f"camvid:{root}")) and "f001.png is mode RGB" in err


def test_empty_split_is_an_error(tmp_path, capsys):
    root = _camvid_dir(tmp_path / "cv", counts=(4, 0, 2))
    assert "no images in the val split" in _cli_error(capsys, f"camvid:{root}")


def test_ade20k_mismatched_folders(tmp_path, capsys):
    root = _ade_dir(tmp_path / "a")
    (root / "annotations" / "validation" / "ADE_validation_00000001.png").unlink()
    assert "ADE_validation_00000001.jpg has no label PNG" in _cli_error(capsys, f"ade20k:{root}")
    root = _ade_dir(tmp_path / "b")
    _png(root / "annotations" / "training" / "ADE_training_00000009.png", np.zeros((8, 8)))
    assert "label " in (err := _cli_error(capsys, f"ade20k:{root}")) and "ADE_training_00000009.png has no image" in err
    root = _ade_dir(tmp_path / "c")
    for p in (root / "annotations" / "validation").iterdir():
        p.unlink()
    (root / "annotations" / "validation").rmdir()
    assert "annotations/validation is missing" in _cli_error(capsys, f"ade20k:{root}")
    root = _ade_dir(tmp_path / "d")
    _png(root / "annotations" / "training" / "ADE_training_00000002.png", np.full((30, 30), 151))
    err = _cli_error(capsys, f"ade20k:{root}")
    assert "ADE_training_00000002.png" in err and "is 30x30 but its image" in err
    root = tmp_path / "e"
    for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    with pytest.raises(DataError, match="no images in the train split"):
        load_dataset(f"ade20k:{root}")


# ----------------------------------------------------------------------------- joint augmentation


def _coded(n: int = 6, h: int = 48, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels encode their label: 4x4 blocks of classes 0..10, value (20 * class + 10) / 255."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 11, (n, h // 4, w // 4), generator=g)
    y = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    x = ((20 * y + 10).float() / 255.0).unsqueeze(1).expand(n, 3, h, w).contiguous()
    return x, y


def test_joint_augmentation_keeps_image_and_label_aligned():
    x, y = _coded()
    # Scale 1: only flips, which must be exact and shared.
    xa, ya = _augment_joint(x, y, (1.0, 1.0), True, 11, torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(ya[i], y[i].flip(-1))) for i in range(len(y))]
    assert any(flipped) and not all(flipped)
    assert all(torch.allclose(xa[i], x[i].flip(-1) if f else x[i], atol=1e-5) for i, f in enumerate(flipped))
    # Random scale 0.5-2 + crop + flip: inside uniform label regions the image decodes to the label.
    agree, total, padded = 0, 0, 0
    for seed in range(4):
        xa, ya = _augment_joint(x, y, (0.5, 2.0), True, 11, torch.Generator().manual_seed(seed))
        decoded = ((xa[:, 0] * 255 - 10) / 20).round().long()
        lab = ya.float().unsqueeze(1)
        uniform = (nn.functional.max_pool2d(lab, 3, 1, 1) == -nn.functional.max_pool2d(-lab, 3, 1, 1))[:, 0]
        uniform[:, [0, -1]] = uniform[:, :, [0, -1]] = False  # the frame's edge: neighbours out of view
        inner = uniform & (ya != 11)
        agree += int((decoded[inner] == ya[inner]).sum())
        total += int(inner.sum())
        pad = ya == 11  # only padding can be "ignore" here: the image is 0 exactly there
        padded += int(pad.sum())
        assert torch.equal(xa[:, 0] == 0, pad)
    assert total > 10_000 and agree / total > 0.999 and padded > 0, (agree, total)


def test_train_loader_augments_jointly_and_eval_does_not(tmp_path):
    root = _camvid_dir(tmp_path / "cv")
    info, train, _ = load_dataset(f"camvid:{root}")
    loader = make_loader(train, info, train=True, batch_size=16, mean=(0.0,) * 3, std=(1.0,) * 3, seed=3)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, H, W) and y.shape == (16, H, W)
    assert not torch.equal(y.sort(0).values, train.labels.long().sort(0).values)  # augmented
    # Where labelled, colours still say the class (red 0, green 1, blue 3), up to interpolation at edges.
    colour_class = torch.tensor([0, 1, 3])[x.argmax(1)]
    known = (y != 11) & (x.amax(1) > 0.5)
    assert (colour_class[known] == y[known]).float().mean() > 0.9


# ----------------------------------------------------------------------------- metric and losses


def test_miou_pixel_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    conf = confusion_matrix(pred, target, 4, 255)  # class 3: in neither labels nor predictions
    assert conf.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = seg_scores(conf)
    assert s.iou[:3] == pytest.approx([100 / 3, 100 / 3, 100.0]) and math.isnan(s.iou[3])
    assert s.miou == pytest.approx(100 * 5 / 9) and s.pixel_acc == pytest.approx(60.0)

    class Loader(list):
        ignore_index = 255

    logits = nn.functional.one_hot(pred, 4).permute(2, 0, 1).float()[None] * 5.0
    model = nn.Identity()
    r = evaluate(model, Loader([(logits, target[None])]))
    assert r.miou == pytest.approx(100 * 5 / 9) and r.pixel_acc == pytest.approx(60.0) and r.n == 1
    labelled = target != 255
    ce = nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[labelled], target[labelled])
    assert r.loss == pytest.approx(float(ce), rel=1e-5)


def test_dense_losses_skip_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 5, 4, 6, generator=g)
    y = torch.randint(0, 5, (2, 4, 6), generator=g)
    y[0, :2] = 255
    keep = y != 255
    ps, pt = s.permute(0, 2, 3, 1)[keep], t.permute(0, 2, 3, 1)[keep]  # (pixels, K)
    expect = 16 * nn.functional.kl_div(
        torch.log_softmax(ps / 4, -1), torch.log_softmax(pt / 4, -1), log_target=True, reduction="batchmean"
    )
    assert float(kd_loss(s, t, 4.0, keep)) == pytest.approx(float(expect), rel=1e-5)
    assert float(task_loss(s, y, 255)) == pytest.approx(float(nn.functional.cross_entropy(ps, y[keep])), rel=1e-5)
    assert float(task_loss(s, torch.full_like(y, 255), 255)) == 0.0  # all ignored: zero, not NaN


# ----------------------------------------------------------------------------- training


def _miou_of_fresh_model(root: Path) -> float:
    torch.manual_seed(0)
    info, _, test = load_dataset(f"camvid:{root}")
    return evaluate(tiny_fcn(), make_loader(test, info, train=False, batch_size=8)).miou


def test_retrain_on_segmentation_improves_miou(tmp_path, capsys):
    from deepshare_convert.recipes import Recipe
    from deepshare_convert.training.engine import learning_curve
    from deepshare_convert.training.retrain import retrain

    torch.set_num_threads(1)
    root = _camvid_dir(tmp_path / "cv")
    recipe = Recipe.model_validate(dict(
        name="seg", seed=0, data={"spec": f"camvid:{root}"},
        model={"name": "tests.test_segmentation_data:tiny_fcn", "input_size": [3, H, W]},
        conversion={"budget": "25%"},
        phases=[
            {"kind": "pretrain", "steps": 60, "batch_size": 8, "optimizer": {"name": "adam"}, "lr": {"start": 0.02},
             "eval_every": 30},
            {"kind": "gelu", "steps": 20, "batch_size": 8, "optimizer": {"name": "adam"}, "lr": {"start": 0.01},
             "kd": {"teacher": "original"}},
            {"kind": "switch", "steps": 20, "batch_size": 8, "optimizer": {"name": "adam"}, "lr": {"start": 0.01},
             "kd": {"teacher": "previous-phase"}},
            {"kind": "finetune", "steps": 20, "batch_size": 8, "optimizer": {"name": "adam"}, "lr": {"start": 0.01},
             "kd": {"teacher": "previous-phase"}},
        ],
    ))  # fmt: skip
    r = retrain(recipe, tmp_path / "run").results
    before = _miou_of_fresh_model(root)
    assert r["original_miou"] > before + 20, (before, r)
    assert {"final_miou", "converted_miou_before_retraining"} <= set(r) and not any(k.endswith("_acc") for k in r)
    assert r["final_miou"] > r["converted_miou_before_retraining"] + 10, r  # retraining recovers mIoU
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("test_miou" in m and "test_acc" not in m for m in lines)
    assert len(learning_curve(tmp_path / "run")) >= 3
    # evaluate on the converted run directory: mIoU, pixel accuracy and per-class IoU, as JSON and as a table
    assert run(["evaluate", str(tmp_path / "run"), "--data", f"camvid:{root}", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["miou"] == pytest.approx(r["final_miou"]) and set(d["iou"]) == set(CAMVID_CLASSES)
    assert d["iou"]["Pole"] is None and d["pixel_acc"] > 50
    assert run(["evaluate", str(tmp_path / "run"), "--data", f"camvid:{root}"]) == 0
    out = capsys.readouterr().out
    assert "per-class IoU" in out and "mIoU" in out and "Sky" in out


def test_snl_on_segmentation_runs_and_keeps_miou(tmp_path):
    from deepshare_convert.snl import SNLConfig, run_snl

    torch.set_num_threads(1)
    root = _camvid_dir(tmp_path / "cv")
    torch.manual_seed(0)
    weights = tmp_path / "fcn.pt"
    # a briefly trained original (the SNL teacher)
    from deepshare_convert.training.engine import PhaseSpec, Trainer

    info, train, test = load_dataset(f"camvid:{root}")
    model = tiny_fcn()
    Trainer(model, make_loader(train, info, train=True, batch_size=8), None, tmp_path / "pre",
            checkpoints=False, write_metrics=False).run_phase(
        0, PhaseSpec("pretrain", steps=60, optimizer="adam", lr_start=0.02))  # fmt: skip
    torch.save(model.state_dict(), weights)
    config = SNLConfig(model="tests.test_segmentation_data:tiny_fcn", data=f"camvid:{root}", budget="50%",
                       weights=str(weights), input_size=[3, H, W], max_epochs=60, finetune_epochs=3, batch_size=8, lam=0.05)
    r = run_snl(config, tmp_path / "snl").results
    assert r["original_miou"] > _miou_of_fresh_model(root) + 20
    assert r["reached"] and r["snl_miou"] > _miou_of_fresh_model(root) + 20, r
    assert "snl_miou" in r and not any(k.endswith("_acc") for k in r)
    assert r["snl_relus"] <= r["budget"]
