"""Accuracy of the deployed model (BN folded, weights snapped) on coarser and coarser coefficient grids.

    python bench/weight_grid.py [--limit 2000] [--segmentation RUN_DIR] [--bits 16,12,11,10,8]

Private inference runs the model ``mpc.prepare.prepare`` makes: every weight on the 2^-WEIGHT_BITS grid
(mpc/fixed_point.py).  The plaintext reference carries the same weights, so the grid never shows up
as a disagreement between MPC and plaintext -- only as a change of the model itself.  This measures
that change: top-1 of the shared pretrained CIFAR-10 ResNet-20 and ResNet-56 on the first ``--limit``
test images of the shared JPEG copy, and with ``--segmentation`` the test mIoU of a CamVid run
directory (e.g. ``out/bench-seg/full/deepshare_3pct`` from bench/segmentation.py) on all 233 frames.

Writes bench/results/weight_grid.json; docs/private_inference.md ("Accuracy") quotes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_runs import SHARED  # noqa: E402
from common import add_out_arg, write_results  # noqa: E402

CIFAR = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def _scores(model, loader, grids: list[int | None], metric: str) -> dict[str, float]:
    from deepshare_convert.evaluation import evaluate
    from deepshare_convert.mpc.prepare import prepare

    out = {}
    for bits in grids:
        r = evaluate(prepare(model, precision_bits=bits), loader)
        out["float" if bits is None else f"2^-{bits}"] = round(float(getattr(r, metric)), 2)
        print(f"  {'float' if bits is None else f'2^-{bits}'}: {metric} {out[list(out)[-1]]}", flush=True)
    return out


def cifar_rows(grids: list[int | None], limit: int) -> list[dict[str, Any]]:
    from deepshare_convert.data import load_dataset, make_loader
    from deepshare_convert.models import load_model

    rows = []
    for name, file in CIFAR.items():
        loaded = load_model(name, weights=str(SHARED / "models" / file))
        info, _, test = load_dataset("cifar10-jpg")
        loader = make_loader(test, info, train=False, batch_size=250, mean=loaded.mean, std=loaded.std, limit=limit)
        print(f"{name} (CIFAR-10, first {limit} test images)", flush=True)
        rows.append({"model": name, "metric": "top1", "images": limit, "scores": _scores(loaded.model, loader, grids, "top1")})
    return rows


def segmentation_row(run_dir: str, grids: list[int | None]) -> dict[str, Any]:
    from deepshare_convert.conversion.rewrite import load
    from deepshare_convert.data import load_dataset, make_loader
    from deepshare_convert.models import load_model

    ref = load_model("deeplabv3_mobilenetv2")  # the built-in's normalisation
    info, _, test = load_dataset("camvid")
    loader = make_loader(test, info, train=False, batch_size=16, mean=ref.mean, std=ref.std)
    print(f"{run_dir} (CamVid, all test frames)", flush=True)
    return {"model": run_dir, "metric": "miou", "scores": _scores(load(run_dir).model.eval(), loader, grids, "miou")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=2000, help="CIFAR-10 test images (default 2000)")
    p.add_argument("--bits", default="16,12,11,10,8", help="coefficient grids to try, as fractional bits")
    p.add_argument("--segmentation", default=None, help="a CamVid run directory (bench/segmentation.py's)")
    add_out_arg(p)
    args = p.parse_args()
    grids: list[int | None] = [None] + [int(b) for b in args.bits.split(",")]
    rows = cifar_rows(grids, args.limit)
    if args.segmentation:
        rows.append(segmentation_row(args.segmentation, grids))
    write_results("weight_grid", {"grids": ["float" if g is None else g for g in grids], "rows": rows}, args.out)


if __name__ == "__main__":
    main()
