"""The segmentation recipes validate, and the CamVid one runs end to end with --quick through the CLI."""

from __future__ import annotations

import json

import pytest

from deepshare_convert.recipes import load_recipe

from .conftest import ROOT, SHARED, needs

CAMVID = SHARED / "data" / "camvid-240x180.tar.gz"


@pytest.mark.parametrize("name,classes,size", [("deeplabv3_mobilenetv2_camvid", 11, None),
                                               ("deeplabv3_mobilenetv2_ade20k", 150, [3, 256, 256])])  # fmt: skip
@pytest.mark.parametrize("quick", [False, True])
def test_segmentation_recipes_validate(name, classes, size, quick):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml", quick=quick)
    assert r.model.name == "deeplabv3_mobilenetv2" and r.model.num_classes == classes and r.model.input_size == size
    assert r.conversion.budget == "3%" and r.conversion.gamma == 4.0  # the paper's gamma for segmentation
    kinds = [p.kind for p in r.phases]
    if name.endswith("camvid"):
        assert kinds == ["pretrain", "progressive"] and r.model.weights is None  # from scratch: nothing downloaded
    else:
        assert kinds == ["gelu", "switch", "finetune"] and r.data.spec.startswith("ade20k:")
        assert all(p.kd.teacher == "none" for p in r.phases)  # no KD in the paper's segmentation runs
        if not quick:
            assert [p.epochs for p in r.phases] == [190, 100, 100] and {p.batch_size for p in r.phases} == {8}


@needs(CAMVID)
def test_camvid_recipe_quick_runs_end_to_end(tmp_path, capsys):
    from deepshare_convert.cli.app import run as cli

    out = tmp_path / "camvid"
    code = cli(["retrain", "--recipe", str(ROOT / "recipes" / "deeplabv3_mobilenetv2_camvid.yaml"), "-o", str(out),
                "--quick", "--device", "cpu", "--json"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["total_relus"] == 12_554_176 and 0 < results["drelus"] <= results["budget"] == 376_625
    assert 0 <= results["original_miou"] <= 100 and 0 <= results["final_miou"] <= 100
    assert (out / "pretrained.safetensors").is_file() and (out / "model.safetensors").is_file()
