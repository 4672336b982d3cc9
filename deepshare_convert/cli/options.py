"""Option and argument aliases shared by every command (one definition, one help text)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def check_out_dir(value: Optional[str]) -> Optional[str]:
    """Option callback: a bad output directory fails at parse time, before any loading or training."""
    if value:
        from ..outputs import check_output_dir

        check_output_dir(value)
    return value


def check_out_file(value: Optional[str]) -> Optional[str]:
    """Option callback: a bad output file fails at parse time, before any loading or training."""
    if value:
        from ..outputs import check_output_file

        check_output_file(value)
    return value


ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="Built-in name (see `deepshare models`), timm:NAME, package.module:factory, a torch.export .pt2 "
        "or .onnx file, or a pickled nn.Module file (with --trust-pickle).",
        show_default=False,
    ),
]
ModelOrOutArg = Annotated[
    str,
    typer.Argument(metavar="MODEL", help="A converted-model directory (OUT/) or any MODEL form `deepshare inspect` "
                   "accepts.", show_default=False),
]  # fmt: skip
WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", "-w", metavar="FILE", help="State dict (.safetensors/.pt/.pth/.th/.bin) to load."),
]
InputSizeOpt = Annotated[
    Optional[str], typer.Option("--input-size", metavar="C,H,W", help="C,H,W without the batch, e.g. 3,32,32.")
]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", metavar="N", help="Classifier outputs.")]
TrustPickleOpt = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow unpickling a full nn.Module (this runs code from the file)."),
]
LeafOpt = Annotated[
    Optional[list[str]],
    typer.Option("--leaf", metavar="CLASS", help="Module class name that tracing must treat as opaque (repeatable)."),
]
PretrainedOpt = Annotated[
    bool,
    typer.Option("--pretrained", help="timm:NAME (and DeepLabV3's timm backbone) only: timm's published weights, "
                 "fetched and cached by timm (offline: its cached copy, else use --weights)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="Where training runs: auto (a GPU "
                                       "when torch sees one), cpu, cuda or cuda:N. Not saved with the run: "
                                       "--resume may use another.")]


def batch_size_opt(help: str, default_text: str | None = None):
    """``--batch-size``: the one name for "how many inputs at once" on every command."""
    return typer.Option("--batch-size", help=help, show_default=default_text or True)


def polish_help(command) -> None:
    """Help that reads like the rest of the CLI, whatever typer version renders it.

    Flags show no ``<bool>`` value (``--json``, not ``--json <bool>``: a value is rejected) and
    arguments are named in capitals (``MODEL``, not ``{model}``), on every command of ``command``.
    """
    for sub in [command, *getattr(command, "commands", {}).values()]:
        ctx = sub.context_class(sub, **sub.context_settings)
        for param in [*sub.params, sub.get_help_option(ctx)]:
            if param is None:
                continue
            if getattr(param, "is_flag", False):
                param.metavar = ""
            elif param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()
