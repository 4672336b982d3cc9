"""One loader for every MODEL form a command takes, converted-model directories (OUT/) included.

:func:`load_any` is the library side of the CLI's model loading: a built-in name, ``timm:NAME``,
a Python file or a checkpoint goes to :func:`deepshare_convert.models.load_model`; a directory
written by :func:`deepshare_convert.conversion.rewrite.save` is loaded as the converted model it holds.
It prints nothing: the CLI wraps it with a spinner and its random-weights note
(:mod:`deepshare_convert.cli.loading`).

It lives outside :mod:`deepshare_convert.models` because it needs :mod:`deepshare_convert.conversion.rewrite`,
which imports :mod:`deepshare_convert.models` (putting it there would be an import cycle).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .models import LoadedModel


def load_any(
    model: str,
    weights: str | None = None,
    input_size: str | tuple[int, ...] | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    pretrained: bool = False,
    leaf: Sequence[str] | None = None,
    status: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> LoadedModel:
    """A :class:`~deepshare_convert.models.LoadedModel` from any MODEL form, OUT/ directories included.

    A converted OUT/ carries its weights, classes and leaf modules: ``weights``, ``num_classes``,
    ``pretrained`` or ``leaf`` given with one is an error, and so is an ``input_size`` other than
    the one it was converted at.  ``leaf`` names are checked against the model's module classes.
    ``status(message)`` (a context manager, e.g. a console spinner) wraps the slow part.
    """
    from .conversion.tracing import check_leaf_names
    from .models import LoadedModel, ModelSpec, load_model

    status = status or (lambda message: contextlib.nullcontext())
    if Path(model).is_dir():
        from .conversion.rewrite import load as load_converted

        _refuse_for_converted(model, weights=weights, num_classes=num_classes, pretrained=pretrained, leaf=leaf)
        with status(f"loading converted model {model}"):
            conv = load_converted(model, trust_pickle=trust_pickle)
        size = tuple(conv.plan.input_size)
        _check_converted_size(model, input_size, size)
        spec = ModelSpec("converted", str(model), input_size=size)
        return LoadedModel(conv.model, spec, size, conv.mean, conv.std)
    with status(f"loading {model}"):
        loaded = load_model(
            model,
            weights=weights,
            input_size=input_size,
            num_classes=num_classes,
            trust_pickle=trust_pickle,
            pretrained=pretrained,
        )
    check_leaf_names(loaded.model, leaf or ())
    return loaded


def _refuse_for_converted(path: str, **given) -> None:
    """A converted OUT/ carries its weights, classes and leaf modules: an option that would change them is a mistake."""
    from .errors import DeepShareError

    for name, value in given.items():
        if value:
            flag = "--" + name.replace("_", "-")
            raise DeepShareError(f"{flag} does not apply to {path}: a converted model directory has its own "
                                 "(plan.json, model.safetensors)")  # fmt: skip


def _check_converted_size(path: str, input_size, size: tuple[int, ...]) -> None:
    from .errors import DeepShareError
    from .models.loading import parse_input_size

    given = parse_input_size(input_size)
    if given is not None and tuple(given) != size:
        raise DeepShareError(f"--input-size {','.join(map(str, given))} does not match {path}, converted at "
                             f"{','.join(map(str, size))}")  # fmt: skip
