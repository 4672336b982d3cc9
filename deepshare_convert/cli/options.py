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
        help="Built-in name (see `deepshare models`), timm:NAME, package.module:factory, "
        "or a pickled nn.Module file (with --trust-pickle).",
        show_default=False,
    ),
]
WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", "-w", help="State dict (.safetensors/.pt/.pth/.th/.bin) to load."),
]
InputSizeOpt = Annotated[
    Optional[str], typer.Option("--input-size", help="C,H,W without the batch, e.g. 3,32,32.")
]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="Classifier outputs.")]
TrustPickleOpt = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow unpickling a full nn.Module (this runs code from the file)."),
]
LeafOpt = Annotated[
    Optional[list[str]],
    typer.Option("--leaf", help="Module class name that tracing must treat as opaque (repeatable)."),
]
PretrainedOpt = Annotated[
    bool,
    typer.Option("--pretrained", help="timm:NAME only: timm's published weights, fetched and cached by timm "
                 "(offline: its cached copy, else use --weights)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
