"""A registry of built-in architectures (timm's ``@register_model`` idea, made small).

Each entry knows how to build the model and its *default config*: the input size
it was designed for, the number of classes, and the input normalisation its
pretrained weights expect.  Data loading reads the normalisation from here, so a
pretrained model and its dataset agree without the user repeating it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import ModelNotFoundError

__all__ = ["ModelEntry", "register_model", "get_entry", "list_models", "close_matches"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    input_size: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    description: str = "",
):
    """Decorator: register ``factory(num_classes=...) -> nn.Module`` under ``name``."""

    def wrap(factory: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, factory, input_size, num_classes, mean, std, description)
        return factory

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def close_matches(name: str, candidates: list[str] | None = None) -> list[str]:
    return difflib.get_close_matches(name, candidates or list_models(), n=3, cutoff=0.5)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = close_matches(name)
        more = f"; did you mean {', '.join(hint)}?" if hint else f"; built-ins: {', '.join(list_models())}"
        raise ModelNotFoundError(
            f"unknown model {name!r}{more} (use timm:NAME for timm models or package.module:factory)"
        ) from None
