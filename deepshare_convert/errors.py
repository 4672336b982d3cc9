"""User-facing errors: each one becomes a single line and a non-zero exit in the CLI.

Library code raises these (never ``sys.exit``); the CLI maps them to messages.
"""

from __future__ import annotations

__all__ = [
    "DeepShareError",
    "ModelNotFoundError",
    "WeightsError",
    "TraceError",
    "DataError",
    "BudgetError",
    "PlanError",
    "OutputError",
    "first_line",
]


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of a (third-party) error, cut to ``limit`` characters: what a
    one-line message quotes. An empty message gives the exception's type name."""
    text = str(error).strip()
    lines = text.splitlines()
    fallback = type(error).__name__ if isinstance(error, BaseException) else ""
    return (lines[0] if lines else fallback)[:limit]


class DeepShareError(Exception):
    """Base class: the message is shown to the user as is, on one line."""

    exit_code = 2


class ModelNotFoundError(DeepShareError):
    """An unknown model name or entry point."""


class WeightsError(DeepShareError):
    """A missing, corrupt or mismatching weights file."""


class TraceError(DeepShareError):
    """torch.fx could not trace (or shape-propagate) the model."""


class DataError(DeepShareError):
    """A dataset spec that cannot be read."""


class BudgetError(DeepShareError):
    """A DReLU budget that cannot be parsed or met."""


class PlanError(DeepShareError):
    """A conversion plan that does not fit the model or weights it is applied to."""


class OutputError(DeepShareError):
    """An output path that cannot be written (a file, under a file, read-only) or is already taken."""
