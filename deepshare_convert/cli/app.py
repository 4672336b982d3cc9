"""``deepshare`` commands.  Heavy imports live inside command bodies so ``--help`` is instant."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..conversion.budget import allocator_names  # light: budget.py imports no torch
from . import analyze_command, errors as cli_errors, mpc_commands, serve_commands, snl_commands
from .console import console, err_console
from .loading import NOTES, load_model_or_out, note_no_normalisation, note_random_weights

from .options import (  # isort: skip (one compact list, see pyproject)
    DeviceOpt, InputSizeOpt, JsonOpt, LeafOpt, ModelArg, NumClassesOpt, PretrainedOpt, TrustPickleOpt, WeightsOpt,
    batch_size_opt, check_out_dir, polish_help,
)  # fmt: skip

app = typer.Typer(
    name="deepshare",
    help="Make pretrained CNNs cheap under private inference: ReLU census, DeepShare conversion, "
    "retraining, and two-party inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ---- commands -------------------------------------------------------------------------------
@app.command()
def inspect(
    model: ModelArg,
    weights: WeightsOpt = None,
    input_size: InputSizeOpt = None,
    num_classes: NumClassesOpt = None,
    leaf: LeafOpt = None,
    trust_pickle: TrustPickleOpt = False,
    pretrained: PretrainedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """ReLU census of MODEL via torch.fx: every activation site, its shape and ReLU count.

    MODEL may also be a converted-model directory (from `deepshare convert`): then the
    census counts the DReLUs of its gates.
    """
    from ..conversion.census import census

    loaded = load_model_or_out(model, weights, input_size, num_classes, trust_pickle, pretrained, leaf)
    result = census(loaded.model, loaded.input_size, name=loaded.spec.display, leaf_modules=leaf or ())
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    from .tables import census_table

    console.print(census_table(result))


@app.command()
def convert(
    model: ModelArg,
    budget: Annotated[str, typer.Option("--budget", "-b", help="DReLU budget: 12k, 1.5M, 6000 or 2.5% of the "
                                        "model's ReLUs.", show_default=False)],
    out: Annotated[Optional[str], typer.Option("--out", "-o", callback=check_out_dir, help="Output directory.",
                                               show_default="out/MODEL-BUDGET")] = None,
    allocator: Annotated[str, typer.Option(help=f"{' | '.join(allocator_names())}.")] = "uniform",
    snl_counts: Annotated[Optional[str], typer.Option("--snl-counts", help="snl_counts.json from "
                                                      "`deepshare snl` (for --allocator snl).")] = None,
    group_size: Annotated[int, typer.Option(help="Consecutive same-shape sites sharing one gate "
                                            "(1 disables layer sharing).")] = 2,
    gate: Annotated[str, typer.Option(help="Gate of the saved model: step (DReLU) or gelu.")] = "step",
    gamma: Annotated[float, typer.Option(help="GELU gate sharpness: Phi(gamma*x).")] = 1.0,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", metavar="SITE", help="Site name, module path or regex "
                                                      "to leave as a plain ReLU (repeatable).")] = None,
    weights: WeightsOpt = None,
    input_size: InputSizeOpt = None,
    num_classes: NumClassesOpt = None,
    leaf: LeafOpt = None,
    trust_pickle: TrustPickleOpt = False,
    pretrained: PretrainedOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory (atomically: "
                                        "written beside it, then renamed into place).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite MODEL with shared DReLU gates under a budget; save OUT/plan.json + model.safetensors.

    OUT must be new or empty unless --force: a converted model never lands among another run's files.
    """
    from ..conversion.budget import read_snl_counts
    from ..conversion.rewrite import convert as run_convert, save_new
    from ..conversion.settings import settings_from
    from ..outputs import check_fresh_dir

    settings = settings_from(budget=budget, allocator=allocator, snl_counts=snl_counts, group_size=group_size,
                             gate=gate, gamma=gamma, keep=keep, leaf_modules=leaf)  # fmt: skip
    if out:
        check_fresh_dir(out, force=force)
    counts = read_snl_counts(snl_counts) if snl_counts else None  # a bad file fails before the model loads
    loaded = load_model_or_out(model, weights, input_size, num_classes, trust_pickle, pretrained, leaf)
    out = str(check_fresh_dir(out or _default_out(loaded.spec.name, budget), force=force))
    with console.status("tracing, allocating and rewriting", spinner="dots"):
        converted = run_convert(loaded.model, loaded.input_size, settings, snl_counts=counts,
                                spec=loaded.spec.to_dict())  # fmt: skip
    target = save_new(converted, out, force=force)
    if as_json:
        print(json.dumps({"out": str(target), **converted.plan.to_dict()}, indent=2))
        return
    from .tables import plan_table

    console.print(plan_table(converted.plan))
    console.print(f"saved [bold]{target}/[/] (plan.json, model.safetensors)")


def _default_out(name: str, budget: str) -> str:
    import re

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.split(":")[-1].split("/")[-1])
    stem = re.sub(r"\.(pt2|onnx)$", "", stem, flags=re.IGNORECASE)  # out/r20-12k for r20.pt2
    return f"out/{stem}-{budget.replace('%', 'pct')}"


@app.command()
def retrain(
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe YAML (see recipes/).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", callback=check_out_dir, help="Output directory.",
                                               show_default="out/RECIPE-NAME")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe value: "
                                                      "phases.0.epochs=2 (repeatable).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Apply the recipe's `quick` overrides.")] = False,
    resume_dir: Annotated[Optional[str], typer.Option("--resume", help="Continue the run in this directory "
                                                      "from its last checkpoint.")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    fail_at_step: Annotated[Optional[int], typer.Option(hidden=True)] = None,
) -> None:
    """DeepShare retraining driven by a recipe (progressive sharing, or the paper's GELU -> switch -> finetune)."""
    from ..interrupts import deferred_sigint

    with deferred_sigint():  # a Ctrl-C even during the imports stops at a step boundary, resumably
        from ..training.retrain import resume, retrain as run_retrain
        from .progress import TrainingReporter

        reporter = TrainingReporter()
        if resume_dir:
            result = resume(resume_dir, reporter=reporter, fail_at_step=fail_at_step, device=device)
        else:
            if recipe is None:
                raise typer.BadParameter("give --recipe FILE (or --resume OUT)")
            from ..recipes import load_recipe

            resolved = load_recipe(recipe, set_ or [], quick)
            m = resolved.model
            if not m.converted and resolved.phases[0].kind != "pretrain":  # a pretrain phase trains them first
                note_random_weights(m.name, m.weights is not None)
            target = check_out_dir(out or f"out/{resolved.name}")
            (err_console if as_json else console).print(
                f"recipe [bold]{resolved.name}[/]: {len(resolved.phases)} phases -> {target}/")
            result = run_retrain(resolved, target, reporter=reporter, fail_at_step=fail_at_step, device=device)
    if as_json:
        print(json.dumps({"out": str(result.out), **result.results}, indent=2))
        return
    from .tables import results_table

    console.print(results_table(result.results))
    console.print(f"converted model in [bold]{result.out}/[/] (plan.json, model.safetensors, metrics.jsonl)")


@app.command()
def xor(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="Settings YAML "
                                                  "(recipes/xor.yaml); defaults are the paper's.")] = None,
    out: Annotated[str, typer.Option("--out", "-o", callback=check_out_dir, help="Output directory.")] = "out/xor",
    quick: Annotated[bool, typer.Option("--quick", help="Fewer seeds and epochs.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                      help="Override a setting: epochs=1000.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The paper's XOR experiment: four one-comparison networks on the 2x2 checkerboard."""
    from pathlib import Path

    from ..conversion.plan import write_json_atomic
    from ..experiments.xor import decision_map, load_xor_config, run_xor
    from ..plots import xor_maps
    from .progress import progress_bar
    from .tables import xor_table

    cfg = load_xor_config(config, quick, set_ or [])
    runs, maps = [], []
    with progress_bar() as bar:
        task = bar.add_task("xor", total=len(cfg.methods) * cfg.seeds)
        for method in cfg.methods:
            for seed in range(cfg.seeds):
                r = run_xor(method, seed, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                            n_train=cfg.n_train, n_test=cfg.n_test, gamma=cfg.gamma, hidden=cfg.hidden)  # fmt: skip
                runs.append({"method": method, "seed": seed, "accuracy": r.accuracy, "phases": r.phase_accuracy})
                if seed == 0:
                    maps.append((f"{method}: {r.accuracy:.1f}%", decision_map(r.model)))
                bar.advance(task)
    root = Path(out)
    summary = {"config": cfg.model_dump(), "runs": runs}
    write_json_atomic(root / "xor.json", summary)
    png = xor_maps(maps, root / "xor_maps.png")
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(xor_table(runs, cfg.methods))
    console.print(f"wrote {root / 'xor.json'} and {png} (decision maps of seed 0)")


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the built-in architectures."""
    from ..models import get_entry, list_models

    entries = [get_entry(n) for n in list_models()]
    if as_json:
        rows = [
            {"name": e.name, "input_size": list(e.input_size), "num_classes": e.num_classes,
             "description": e.description}
            for e in entries
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="built-in models")
    for col in ("name", "input", "classes", "description"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.name, "x".join(map(str, e.input_size)), str(e.num_classes), e.description)
    console.print(table)


@app.command()
def evaluate(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", help="Dataset spec: digits, cifar10-jpg, imagefolder:DIR, "
                                      "cifar10:DIR, cifar100:DIR, tinyimagenet:DIR, camvid, ade20k:DIR.")],
    weights: WeightsOpt = None,
    input_size: InputSizeOpt = None,
    num_classes: NumClassesOpt = None,
    leaf: LeafOpt = None,
    trust_pickle: TrustPickleOpt = False,
    pretrained: PretrainedOpt = False,
    batch_size: Annotated[int, batch_size_opt("Images per evaluation batch.")] = 256,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate on the first N test images only.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1 accuracy of MODEL on the test split of a dataset (mIoU, pixel accuracy and per-class IoU for
    segmentation data)."""
    from ..data import check_input_fits, load_dataset, make_loader, require_split
    from ..evaluation import evaluate as run_eval

    if batch_size < 1:
        raise typer.BadParameter("--batch-size must be at least 1")
    loaded = load_model_or_out(model, weights, input_size, num_classes, trust_pickle, pretrained, leaf)
    note_no_normalisation(loaded)
    with console.status(f"reading {data}", spinner="dots"):
        info, _, test = load_dataset(data)
    require_split(test, "test", data)
    check_input_fits(loaded.input_size, info, data, hint=_size_hint(model, info))
    _warn_if_classes_differ(loaded, info, data)
    loader = make_loader(
        test, info, train=False, batch_size=batch_size, mean=loaded.mean, std=loaded.std, limit=limit
    )
    from .progress import progress_bar

    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=len(loader))
        result = run_eval(loaded.model, loader, progress=lambda done, total: bar.update(task, completed=done))
    if info.segmentation:
        _print_segmentation(loaded.spec.display, data, info, result, as_json)
        return
    if as_json:
        print(json.dumps({"model": loaded.spec.display, "data": data, "top1": result.top1, "loss": result.loss,
                          "n": result.n}, indent=2))  # fmt: skip
        return
    console.print(
        f"[bold]{loaded.spec.display}[/] on {data} test ({result.n} images): "
        f"top-1 [bold green]{result.top1:.2f}%[/], loss {result.loss:.4f}"
    )


def _print_segmentation(name: str, data: str, info, result, as_json: bool) -> None:
    """mIoU, pixel accuracy and the per-class IoU table (NaN: a class in neither labels nor predictions)."""
    iou = dict(zip(info.classes, result.iou or []))
    if as_json:
        print(json.dumps({"model": name, "data": data, "task": "segmentation", "miou": result.miou,
                          "pixel_acc": result.pixel_acc, "loss": result.loss, "n": result.n,
                          "iou": {k: (None if v != v else v) for k, v in iou.items()}}, indent=2))  # fmt: skip
        return
    from rich.table import Table

    table = Table(title="per-class IoU", caption=f"{info.num_classes} classes; label {info.ignore_index} ignored")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for cls, v in iou.items():
        table.add_row(cls, "-" if v != v else f"{v:.2f}")
    console.print(table)
    console.print(
        f"[bold]{name}[/] on {data} test ({result.n} images): mIoU [bold green]{result.miou:.2f}%[/], "
        f"pixel accuracy {result.pixel_acc:.2f}%, loss {result.loss:.4f}"
    )


def _size_hint(model: str, info) -> str:
    """How to fix a size mismatch: a plain model may accept --input-size, a converted one may not."""
    from pathlib import Path

    if Path(model).is_dir():
        return " (a converted model keeps the input size it was converted at)"
    return f"; pass --input-size {','.join(map(str, info.input_size))} if the model accepts that size"


def _warn_if_classes_differ(loaded, info, data: str) -> None:
    """Top-1 against labels the model was not trained for reads as 0%: say so instead of scoring silently."""
    import torch

    from ..conversion.tracing import example_input

    with torch.no_grad():
        out = loaded.model(example_input(loaded.input_size, loaded.model))
    outputs = out.shape[1] if info.segmentation and out.ndim == 4 else out.shape[-1]
    if outputs != info.num_classes and not (outputs == 1 and info.num_classes == 2):
        err_console.print(f"warning: {loaded.spec.display} has {outputs} outputs but {data} has "
                          f"{info.num_classes} classes; top-1 compares output indices with class indices")  # fmt: skip


@app.command()
def demo(
    which: Annotated[str, typer.Argument(help="digits (built-in data, ~1 min) or cifar (shared ResNet-20 "
                                         "and CIFAR-10, --quick subset, a few minutes).")] = "digits",
    out: Annotated[str, typer.Option("--out", "-o", callback=check_out_dir, help="Output directory.")] = "out/demo",
    batch_size: Annotated[Optional[int], batch_size_opt("Test images in the two-party run (one batch).",
                                                         "digits 16, cifar 2")] = None,
    as_json: JsonOpt = False,
) -> None:
    """End to end: train -> convert -> retrain -> two-party inference -> latency, with a summary."""
    from ..experiments.demo import run_demo
    from .progress import TrainingReporter
    from .tables import demo_summary_table

    if batch_size is not None and batch_size < 1:
        raise typer.BadParameter("--batch-size must be at least 1")
    log_console = err_console if as_json else console
    summary = run_demo(which, out, reporter=TrainingReporter(), num_private=batch_size,
                       log=lambda msg: log_console.print(f"[bold]{msg}[/]"))  # fmt: skip
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(demo_summary_table(summary))
    console.print(f"wrote {out}/summary_{which}.json and {summary['png']} ({summary['seconds']:.0f} s)")


# commands that live in their own modules (private inference, SNL); they import nothing from here
mpc_commands.register(app)
serve_commands.register(app)
snl_commands.register(app)
analyze_command.register(app)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; returns the exit code (errors become one line on stderr)."""
    command = typer.main.get_command(app)
    polish_help(command)
    NOTES.clear()
    cli_errors.show_debug_log()
    try:
        result = command.main(args=argv, prog_name="deepshare", standalone_mode=False)
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        if isinstance(exc, SystemExit):
            return int(exc.code or 0)
        return cli_errors.report(exc)
    for note in dict.fromkeys(NOTES):
        err_console.print(note)
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()

