"""The conversion settings: one validated object for the CLI, recipes, ``convert()`` and the plan.

Before this, ``--budget/--allocator/--group-size/...`` were declared four times (CLI options,
the recipe schema, ``build_plan`` and ``convert`` keyword arguments) with validation spread
over the passes. Now ``deepshare convert`` builds a :class:`ConversionSettings`, a recipe's
``conversion:`` section *is* one (plus the training-only fields of
:class:`deepshare_convert.recipes.Conversion`), ``build_plan``/``convert`` take one, and
:meth:`deepshare_convert.conversion.plan.Plan.settings` gives back the settings a plan was made with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import DeepShareError
from .budget import check_allocator, read_snl_counts

__all__ = ["ConversionSettings", "settings_from"]

class ConversionSettings(BaseModel):
    """What a conversion needs besides the model: budget, allocation, sharing and gate."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    budget: str = Field(description="DReLU budget: 12k, 1.5M, 6000 or 2.5% of the model's ReLUs")
    allocator: str = Field("uniform", description="budget.py's allocator registry: uniform, proportional, equal, snl")
    snl_counts: Optional[str] = Field(None, description="snl_counts.json from `deepshare snl` (allocator snl)")
    group_size: int = Field(2, ge=1, description="consecutive same-shape sites sharing one gate (1: no layer sharing)")
    gate: Literal["step", "gelu"] = Field("step", description="gate mode of the converted model")
    gamma: float = Field(1.0, gt=0, description="GELU gate sharpness: Phi(gamma*x)")
    keep: list[str] = Field(default_factory=list, description="sites (name, module path or regex) left as ReLUs")
    leaf_modules: list[str] = Field(default_factory=list, description="module classes tracing keeps opaque")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("allocator")
    @classmethod
    def _known_allocator(cls, v: str) -> str:
        try:
            return check_allocator(v)
        except DeepShareError as e:
            raise ValueError(str(e)) from None

    def snl_count_map(self, override: Mapping[str, int] | None = None) -> Mapping[str, int] | None:
        """The SNL counts: an in-memory mapping if given, else read from ``snl_counts``."""
        if override is not None:
            return override
        if self.snl_counts is None:
            return None
        return read_snl_counts(self.snl_counts)


_FLAGS = {"group_size": "--group-size", "snl_counts": "--snl-counts", "leaf_modules": "--leaf"}


def settings_from(**given: Any) -> ConversionSettings:
    """Validated settings from keyword arguments (None means "the default"); one-line errors.

    The message names the CLI flag, since that is where most settings come from.
    """
    try:
        return ConversionSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        flag = _FLAGS.get(field, "--" + field.replace("_", "-"))
        if first["type"] == "extra_forbidden":
            raise DeepShareError(f"unknown conversion setting {field!r}") from None
        raise DeepShareError(_message(first, flag)) from None


def _message(error: dict[str, Any], flag: str) -> str:
    ctx, got = error.get("ctx") or {}, error.get("input")
    kind = error["type"]
    if kind == "greater_than_equal":
        return f"{flag} must be at least {ctx['ge']}, got {got}"
    if kind == "greater_than":
        return f"{flag} must be above {ctx['gt']:g}, got {got}"
    if kind == "literal_error":
        return f"{flag} must be {ctx['expected']}, got {got!r}"
    msg = str(error["msg"]).removeprefix("Value error, ")
    return msg if msg.startswith("unknown") else f"{flag}: {msg}"
