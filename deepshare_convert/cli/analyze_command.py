"""``deepshare analyze``: gate correlations (ED aligned vs shuffled) and a converted model's affine.

Kept in its own file and added to the app by :func:`register`, like the SNL and MPC commands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import console
from .loading import load_model_or_out

from .options import (  # isort: skip (one compact list, see pyproject)
    InputSizeOpt, JsonOpt, LeafOpt, ModelOrOutArg, NumClassesOpt, PretrainedOpt, TrustPickleOpt, WeightsOpt,
    batch_size_opt, check_out_dir,
)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)


def analyze(
    model: ModelOrOutArg,
    data: Annotated[str, typer.Option("--data", help="Dataset spec whose test split is analysed: digits, "
                                      "cifar10-jpg, imagefolder:DIR, cifar10:DIR, ...")],
    num_images: Annotated[int, typer.Option("--num-images", help="Test images to analyse (a fixed subset; "
                                            "the paper uses 4096).")] = 4096,
    out: Annotated[Optional[str], typer.Option("--out", "-o", callback=check_out_dir, help="Write analysis.json, "
                                               "ed_boxplot.png, ed_counts.json (original model) or affine.png "
                                               "(converted model) here.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the within-channel spatial shuffle.")] = 0,
    suggest: Annotated[Optional[str], typer.Option("--suggest", metavar="BUDGET", help="Also suggest prototypes "
                                                   "per group for this DReLU budget (12k, 2.5%), proportional to "
                                                   "ED (original models).")] = None,
    group_size: Annotated[int, typer.Option(help="Group size the --suggest allocation assumes (as in "
                                            "convert).")] = 2,
    batch_size: Annotated[int, batch_size_opt("Images per forward pass.")] = 128,
    weights: WeightsOpt = None,
    input_size: InputSizeOpt = None,
    num_classes: NumClassesOpt = None,
    leaf: LeafOpt = None,
    trust_pickle: TrustPickleOpt = False,
    pretrained: PretrainedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Gate correlations per site: effective dimension / d of the DReLU gates across channels at aligned
    positions vs after shuffling positions within each channel (paper Fig. 2); for a converted OUT/ also
    how often shared gates agree with each channel's own DReLU and the learned (beta, alpha) (Fig. 10).
    """
    from ..analysis import analyze as run_analysis, dataset_batches, suggest_prototypes
    from ..errors import DeepShareError
    from .progress import progress_bar

    if num_images < 1:
        raise typer.BadParameter("--num-images must be at least 1")
    if batch_size < 1:
        raise typer.BadParameter("--batch-size must be at least 1")
    loaded = load_model_or_out(model, weights, input_size, num_classes, trust_pickle, pretrained, leaf)
    with console.status(f"reading {data}", spinner="dots"):
        loader = dataset_batches(loaded, data, num_images=num_images, batch_size=batch_size)
    with progress_bar() as bar:
        task = bar.add_task("analysing", total=num_images)
        report = run_analysis(loaded.model, loaded.input_size, (x for x, _ in loader), seed=seed, leaf=leaf or (),
                              name=loaded.spec.display, data=data,
                              progress=lambda n: bar.update(task, completed=n))  # fmt: skip
    result = report.to_dict()
    if suggest:
        if report.converted:
            raise DeepShareError("--suggest needs an original model, not a converted OUT/")
        result["suggestion"] = {"budget": suggest, "group_size": group_size,
                                "groups": suggest_prototypes(report, suggest, group_size)}  # fmt: skip
    files = _write(report, result, out) if out else []
    if as_json:
        print(json.dumps({**result, "files": files}, indent=2))
        return
    from .tables import analysis_table, suggestion_table

    console.print(analysis_table(result))
    if suggest:
        console.print(suggestion_table(result["suggestion"]["groups"], suggest))
    if report.margins is not None:
        m = report.margins
        near = ", ".join(f"{m['gates_served_within_per_inference'][k]:,.1f} within {k}" for k in (1, 4, 16))
        bits = round(-math.log2(m["ulp"]))
        console.print(f"flip exposure (gates whose prototype input is within k ulps of 0, 1 ulp = 2^-{bits}), per "
                      f"inference: {near}; images with any within 4 ulps: "
                      f"{100 * m['images_with_any_within'][4]:.1f}%")  # fmt: skip
    console.print(f"{report.num_images} images in {report.seconds:.1f} s" + (f"; wrote {', '.join(files)}" if files else ""))


def _write(report, result: dict, out: str) -> list[str]:
    """analysis.json, the box plots, and the (beta, alpha) scatter or the ED counts for convert."""
    from ..analysis import write_ed_counts
    from ..conversion.plan import write_json_atomic
    from ..plots import affine_scatter, ed_boxplots

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "analysis.json", result)
    files = [root / "analysis.json", ed_boxplots(report, root / "ed_boxplot.png")]
    if report.converted:
        files.append(affine_scatter(report, root / "affine.png"))
    else:
        files.append(write_ed_counts(report, root / "ed_counts.json"))
    return [str(f) for f in files]
