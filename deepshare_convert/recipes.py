"""Training recipes: a pydantic schema for YAML files, with overrides and validation up front.

A recipe says where the model comes from, what data to train on, how to convert
it (when it starts unconverted), and a list of phases (``gelu`` -> ``switch`` ->
``finetune``, paper Alg. 1).  Unknown keys are errors that name the key's path,
so a typo never silently changes an experiment.  ``--set a.b.0.c=value``
overrides any value; the resolved recipe is saved next to the outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .conversion.settings import ConversionSettings
from .errors import DeepShareError

__all__ = [
    "Recipe",
    "Phase",
    "load_recipe",
    "apply_overrides",
    "RecipeError",
]


class RecipeError(DeepShareError):
    """A recipe file or override that does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSource(_Strict):
    name: Optional[str] = Field(None, description="MODEL spec: built-in name, timm:NAME or package.module:factory")
    weights: Optional[str] = Field(None, description="weights of the original (teacher) model")
    converted: Optional[str] = Field(None, description="a converted-model directory (skips `conversion`)")
    num_classes: Optional[int] = None
    input_size: Optional[list[int]] = None

    @model_validator(mode="after")
    def _one_source(self):
        if not self.name and not self.converted:
            raise ValueError("give model.name (with optional weights) or model.converted")
        return self


class DataSection(_Strict):
    spec: str = Field(..., description="dataset spec, e.g. digits, cifar10-jpg, cifar100:DIR")
    limit: Optional[int] = Field(None, gt=0, description="train on the first N examples (fixed subset)")
    test_limit: Optional[int] = Field(None, gt=0, description="evaluate on the first N test examples")
    eval_batch_size: int = Field(256, gt=0)
    workers: int = Field(0, ge=0)


class Conversion(ConversionSettings):
    """The conversion settings ``deepshare convert`` takes, plus what only retraining uses."""

    affine: Literal["learned", "frozen"] = Field(
        "learned", description="ablation: frozen keeps alpha=1, beta=0 (replicates copy the gate as is)")
    replicates: Literal["shared", "none"] = Field(
        "shared", description="ablation: none switches replicate channels off (prototypes only; group_size 1)")
    init: Literal["naive", "data"] = Field(
        "naive", description="naive: pi(c) = (c - P) mod P, alpha = 1, beta = 0; data: pi and (alpha, beta) "
        "fitted to the original network's gates on calibration images (deepshare_convert.conversion.fitting)")
    calibration_images: int = Field(256, gt=0, description="train images used by init: data and order: distortion")

    @model_validator(mode="after")
    def _replicates_need_own_gates(self):
        if self.replicates == "none" and self.group_size != 1:
            raise ValueError("replicates: none needs group_size: 1 (a shared site has no prototypes of its own)")
        return self


class Optimizer(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False


class LearningRate(_Strict):
    start: float = Field(..., gt=0)
    end: Optional[float] = Field(None, ge=0)
    scheduler: Literal["linear", "cosine", "poly", "none"] = "none"
    power: float = 0.9
    decay_end: float = Field(1.0, gt=0, le=1, description="linear: fraction of the phase at which lr reaches "
                             "end (the paper's Table 7 uses 0.75)")

    @model_validator(mode="after")
    def _end(self):
        if self.end is None:
            object.__setattr__(self, "end", self.start)
        return self


class KD(_Strict):
    teacher: Literal["original", "previous-phase", "gelu-phase", "none"] = Field(
        "none", description="original model, the model at the end of the previous phase, or of the "
        "last GELU phase (the paper's teacher for switch and finetune)"
    )
    temperature: float = Field(4.0, gt=0)
    weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    feature_weight: float = Field(0.0, ge=0, description="per-site feature distillation (normalised MSE of every "
                                  "site's output to the original ReLU's); needs teacher: original")

    @model_validator(mode="after")
    def _features_from_original(self):
        if self.feature_weight > 0 and self.teacher != "original":
            raise ValueError("feature_weight needs teacher: original (its ReLU outputs are the targets)")
        return self


class Progressive(_Strict):
    ramp_end: float = Field(0.6, ge=0, le=1, description="fraction of the phase by which every channel is shared "
                            "(0: abrupt conversion, every channel shared from the first step)")
    order: Literal["together", "distortion"] = Field(
        "together", description="together: all channels ramp at once; distortion: least distorted channels first")
    window: float = Field(0.25, gt=0, le=1, description="distortion: each channel's ramp, as a fraction of ramp_end")
    easing: Literal["linear", "quadratic"] = Field(
        "linear", description="t against ramp progress u: linear t = u, or quadratic t = 1 - (1 - u)^2 (slows "
        "down as t nears 1, where accuracy is most sensitive)")


class Phase(_Strict):
    kind: Literal["pretrain", "gelu", "switch", "finetune", "progressive"]
    epochs: Optional[int] = Field(None, gt=0)
    steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    lr: LearningRate
    kd: KD = Field(default_factory=KD)
    augment: bool = True
    switch_granularity: Literal["epoch", "step"] = Field(
        "epoch", description="switch: advance the switched fraction once per epoch (paper) or every step"
    )
    gate: Optional[Literal["step", "ste", "gelu"]] = Field(
        None, description="gate of a progressive (default ste) or finetune (default step) phase; ste = step "
        "forward, gamma*phi(gamma*x) backward")
    gamma: Optional[float] = Field(None, gt=0, description="sharpness of the GELU / ste surrogate in this phase "
                                   "(default: conversion.gamma)")
    progressive: Optional[Progressive] = Field(None, description="schedule of a progressive phase")
    eval_every: Optional[int] = Field(None, gt=0, description="also measure test accuracy every N steps")

    @model_validator(mode="after")
    def _length(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        if self.progressive is not None and self.kind != "progressive":
            raise ValueError("progressive settings belong to a phase of kind progressive")
        allowed = {"progressive": ("step", "ste", "gelu"), "finetune": ("step", "ste")}.get(self.kind, ())
        if self.gate is not None and self.gate not in allowed:
            raise ValueError(f"gate {self.gate!r} does not apply to a {self.kind} phase")
        return self


class Recipe(_Strict):
    name: str = "recipe"
    description: str = ""
    seed: int = 0
    model: ModelSource
    data: DataSection
    conversion: Optional[Conversion] = None
    phases: list[Phase] = Field(..., min_length=1)
    quick: dict[str, Any] = Field(default_factory=dict, description="overrides applied by --quick")

    @model_validator(mode="after")
    def _consistent(self):
        converts = [p for p in self.phases if p.kind != "pretrain"]
        if converts and self.model.converted is None and self.conversion is None:
            raise ValueError("phases after pretrain need `conversion` (or model.converted)")
        kinds = [p.kind for p in self.phases]
        if "pretrain" in kinds and kinds.index("pretrain") != 0:
            raise ValueError("a pretrain phase must come first")
        if self.phases[0].kd.teacher == "previous-phase":
            raise ValueError("the first phase has no previous phase to distil from")
        for i, phase in enumerate(self.phases):
            if phase.kd.teacher == "gelu-phase" and "gelu" not in kinds[:i]:
                raise ValueError(f"phases.{i}.kd.teacher is gelu-phase but no gelu phase comes before it")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {path!r}"
    return f"{source}: {path}: {first['msg']}"


def _set_path(data: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            try:
                node = node[int(key)]
            except (ValueError, IndexError):
                raise RecipeError(f"{source}: {'.'.join(keys[: i + 1])!r} is not an index of the list") from None
            continue
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        try:
            index = int(last)
            if index == len(node):  # one past the end appends (e.g. --set 'phases.2={kind: finetune, ...}')
                node.append(value)
            else:
                node[index] = value
        except (ValueError, IndexError):
            raise RecipeError(f"{source}: {dotted!r} is not an index of the list") from None
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any], source: str = "--set") -> dict:
    """``["phases.0.epochs=2", "data.limit=500"]`` (values parsed as YAML) -> new dict."""
    data = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o, source) for o in overrides]
    for key, value in items:
        _set_path(data, key, value, source)
    return data


def _split_override(text: str, source: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"{source} {text!r} is not KEY=VALUE (e.g. phases.0.epochs=2)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_recipe(path: str | Path, overrides: list[str] | None = None, quick: bool = False) -> Recipe:
    """Read, override and validate a recipe; a one-line RecipeError on any problem."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys")
    return recipe_from_dict(data, overrides, quick, source=str(path))


def recipe_from_dict(data: dict, overrides: list[str] | None = None, quick: bool = False,
                     source: str = "recipe") -> Recipe:  # fmt: skip
    if quick:
        data = apply_overrides(data, data.get("quick") or {}, source=f"{source} (quick)")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
