"""``deepshare snl``: the SNL mask search (budgets for ``convert --allocator snl``) and the SNL baseline.

Kept in its own file and added to the app by :func:`register`, so the command's
options and output live beside each other and ``app.py`` stays thin.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from ..errors import DeepShareError
from .console import console
from .options import (
    DeviceOpt,
    InputSizeOpt,
    LeafOpt,
    NumClassesOpt,
    PretrainedOpt,
    TrustPickleOpt,
    batch_size_opt,
    check_out_dir,
)


def register(app: typer.Typer) -> None:
    app.command("snl")(snl)


def snl(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Built-in name, timm:NAME, "
                                                   "package.module:factory or a pickled nn.Module file (with "
                                                   "--trust-pickle); not with --resume.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Dataset spec: digits, cifar10-jpg, "
                                                "imagefolder:DIR, cifar10:DIR, ...")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="ReLUs to keep: 12k, 1.5M, 6000 "
                                                  "or 2.5% of the model's ReLUs.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", callback=check_out_dir, help="Output directory (the run's "
                                               "checkpoint, snl_counts.json and the SNL model).")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", metavar="FILE", help="Weights of the "
                                                   "original (pretrained) model; it is also the KD teacher.")] = None,
    input_size: InputSizeOpt = None,
    num_classes: NumClassesOpt = None,
    leaf: LeafOpt = None,
    trust_pickle: TrustPickleOpt = False,
    pretrained: PretrainedOpt = False,
    max_epochs: Annotated[Optional[int], typer.Option("--max-epochs", help="Search cap in epochs "
                                                      "(default 200 when no --max-steps).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Search cap in steps "
                                                     "(whichever cap comes first).")] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option("--finetune-epochs", help="Finetune the "
                                                           "binarised model for N epochs (default 0).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of masks, order and augmentation "
                                                "(default 0).")] = None,
    batch_size: Annotated[Optional[int], batch_size_opt("Training batch.", "128")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on a fixed subset of N examples.")] = None,
    test_limit: Annotated[Optional[int], typer.Option("--test-limit", help="Evaluate on N test examples.")] = None,
    check_every: Annotated[Optional[int], typer.Option("--check-every", help="Also check the budget every K "
                                                       "steps (stops mid-epoch; default: the policy's, 1 for fast).")] = None,
    lambda_policy: Annotated[Optional[str], typer.Option("--lambda-policy", help="fast (default: lambda 1e-3, "
                                                         "x1.25 after every epoch above budget, masks at 5x lr, "
                                                         "budget checked every step) or faithful (SNL's code: 1e-5, "
                                                         "x1.1 when the count stalls, after 5 epochs).")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Initial L1 weight of the masks "
                                                 "(default: the policy's).")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option("--warmup-epochs", help="Epochs before lambda may "
                                                         "grow (default: the policy's).")] = None,
    resume_dir: Annotated[Optional[str], typer.Option("--resume", help="Continue the run in this directory "
                                                      "from its last checkpoint (caps may be raised).")] = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    fail_at_step: Annotated[Optional[int], typer.Option(hidden=True)] = None,
) -> None:
    """SNL: learn which ReLUs to keep under a budget; write OUT/snl_counts.json and the SNL-linearised model.

    The counts feed `deepshare convert MODEL --allocator snl --snl-counts OUT/snl_counts.json`;
    the binarised (and, with --finetune-epochs, finetuned) model is saved as OUT/plan.json +
    OUT/model.safetensors, so `deepshare inspect OUT` counts its kept ReLUs.
    """
    from ..interrupts import deferred_sigint

    with deferred_sigint():  # a Ctrl-C even during the imports stops at a step boundary, resumably
        from ..snl import SNLConfig, resume_snl, run_snl

        given = {"model": model, "data": data, "budget": budget, "weights": weights, "num_classes": num_classes,
                 "max_epochs": max_epochs, "max_steps": max_steps, "finetune_epochs": finetune_epochs, "seed": seed,
                 "batch_size": batch_size, "limit": limit, "test_limit": test_limit, "check_every": check_every,
                 "lam": lam, "warmup_epochs": warmup_epochs,
                 "lambda_policy": lambda_policy, "input_size": _size_list(input_size),
                 "leaf_modules": leaf or None, "trust_pickle": trust_pickle or None,
                 "pretrained": pretrained or None}  # fmt: skip
        reporter = SNLReporter()
        if resume_dir:
            if out and out != resume_dir:
                raise DeepShareError(f"--resume {resume_dir} continues that directory; drop -o {out}")
            result = resume_snl(resume_dir, changes=given, reporter=reporter, fail_at_step=fail_at_step,
                                device=device)
        else:
            if not (model and data and budget and out):
                raise DeepShareError("deepshare snl needs MODEL, --data, --budget and -o OUT (or --resume OUT)")
            config = SNLConfig(**{k: v for k, v in given.items() if v is not None})
            from .loading import note_random_weights

            note_random_weights(model, weights is not None or pretrained)
            console.print(f"SNL search: [bold]{model}[/] on {data}, budget {budget} -> {out}/")
            result = run_snl(config, out, reporter=reporter, fail_at_step=fail_at_step, device=device)
    _report(result, as_json)


def _size_list(text: Optional[str]) -> Optional[list[int]]:
    from ..models.loading import parse_input_size

    size = parse_input_size(text)
    return None if size is None else list(size)


def _report(result, as_json: bool) -> None:
    counts_file = result.out / "snl_counts.json"
    summary = json.loads(counts_file.read_text())
    if as_json:
        print(json.dumps({"out": str(result.out), "sites": result.counts, **result.results}, indent=2))
    else:
        console.print(counts_table(summary))
        console.print(_summary_line(summary, result.results))
    if not result.reached:
        raise DeepShareError(
            f"the search hit its cap ({summary['cap']}) with {summary['kept'] + summary['hidden_relus']:,} ReLUs, "
            f"above the budget {summary['budget']:,}; counts so far are in {counts_file} (reached: false) -- "
            f"continue with `deepshare snl --resume {result.out} --max-epochs N`"
        )
    _note_binarise_cost(result.results, result.out)
    if not as_json:
        console.print(f"counts: [bold]{counts_file}[/] -> deepshare convert MODEL --allocator snl "
                      f"--snl-counts {counts_file} --budget B")  # fmt: skip
        console.print(f"SNL model: [bold]{result.out}/[/] (plan.json, model.safetensors)")


def _note_binarise_cost(results: dict[str, Any], out) -> None:
    """Binarising soft masks right after a short search can cost most of the accuracy (ResNet-20 at
    8%: 57.4% soft, 10.7% binarised); say so, and how to recover, instead of leaving a silent 10%."""
    from .loading import NOTES

    soft, hard = results.get("masked_acc", results.get("masked_miou")), results.get("binarised_acc",
                                                                                     results.get("binarised_miou"))
    if soft is not None and hard is not None and not results.get("finetune_epochs") and soft - hard > 5:
        NOTES.append(f"note: binarising the masks cost {soft - hard:.1f} points ({soft:.1f}% -> {hard:.1f}%); "
                     f"finetune with `deepshare snl --resume {out} --finetune-epochs N`")


def _summary_line(summary: dict[str, Any], results: dict[str, Any]) -> str:
    lams = summary["lambda_trajectory"]
    parts = [f"{summary['epochs']} epochs, {summary['steps']:,} steps, {summary['search_wall_seconds']:.1f} s",
             f"lambda {lams[0]:.2e} -> {summary['final_lambda']:.2e}" if lams else ""]  # fmt: skip
    metric = "miou" if "original_miou" in results else "acc"  # segmentation runs report mIoU
    accs = [(k, results.get(f"{k}_{metric}")) for k in ("original", "masked", "binarised", "snl")]
    acc = ", ".join(f"{k} {v:.2f}%" for k, v in accs if v is not None)
    label = "mIoU" if metric == "miou" else "accuracy"
    return "search: " + "; ".join(p for p in parts if p) + (f"\n{label}: {acc}" if acc else "")


def counts_table(summary: dict[str, Any]):
    """Kept ReLUs per site: where SNL decided the network needs its nonlinearity."""
    from rich.table import Table

    kept = summary["kept"] + summary["hidden_relus"]
    title = (f"SNL: {summary['model'].get('name', 'model')} -- {kept:,} of {summary['total_relus']:,} ReLUs kept "
             f"(budget {summary['budget']:,}, {'reached' if summary['reached'] else 'NOT reached'})")  # fmt: skip
    table = Table(title=title, show_footer=True)
    table.add_column("site", footer="total", overflow="fold")
    table.add_column("shape")
    table.add_column("ReLUs", justify="right", footer=f"{summary['total_relus']:,}")
    table.add_column("kept", justify="right", footer=f"{kept:,}")
    table.add_column("kept %", justify="right", footer=f"{100 * kept / max(summary['total_relus'], 1):.1f}%")
    for name, n in summary["sites"].items():
        relus = summary["site_relus"][name]
        shape = "x".join(map(str, summary["site_shapes"][name]))
        table.add_row(name, shape, f"{relus:,}", f"{n:,}", f"{100 * n / max(relus, 1):.1f}%")
    if summary["hidden_relus"]:
        h = summary["hidden_relus"]
        table.add_row("(hidden)", "", f"{h:,}", f"{h:,}", "100.0%")
    return table


class SNLReporter:
    """One progress bar per phase; the search's bar shows live ReLUs against the budget and lambda."""

    def __init__(self):
        self.progress = None
        self.task = None

    def start(self, name: str, total: int, done: int = 0) -> None:
        from rich.progress import TextColumn

        from .progress import progress_bar

        # the search stops when the budget is met, so its step total is a cap: no time-remaining column
        self.progress = progress_bar(TextColumn("{task.fields[info]}"), bar_width=20, remaining=False)
        self.progress.start()
        self.task = self.progress.add_task(name, total=total, completed=done, info="")

    def advance(self, info: dict[str, Any]) -> None:
        if self.progress is None:
            return
        text = f"loss {info['loss']:.3f}"
        if "live" in info:  # short enough to fit beside the bar at 80 columns (loss is in the epoch lines)
            text = f"ReLUs {info['live']:,}/{info['budget']:,} λ {info['lambda']:.1e}"
        self.progress.update(self.task, advance=1, info=text)

    def epoch(self, m: dict[str, Any]) -> None:
        if self.progress is None:
            return
        test = f" test {m['test_acc']:.2f}%" if "test_acc" in m else ""
        test = f" test mIoU {m['test_miou']:.2f}%" if "test_miou" in m else test
        live = f" ReLUs {m['live']:,}/{m['budget']:,} lambda {m['lambda']:.2e}" if "live" in m else ""
        self.progress.console.print(f"  {m['kind']} epoch {m['epoch']}: loss {m['loss']:.4f} "
                                    f"train {m['train_acc']:.2f}%{test}{live}", soft_wrap=True)  # fmt: skip

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
