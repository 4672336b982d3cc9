"""Model loading shared by every command module, and the notes printed when a command ends.

Command modules (``app.py``, ``mpc_commands.py``, ``snl_commands.py``) import from here, never
from each other: ``app.py`` is the one entry module and imports them, so nothing imports it back.
"""

from __future__ import annotations

from .console import console

NOTES: list[str] = []  # shown on stderr by app.run when the command ends well (an error stays one line)


def load_model_or_out(model, weights=None, input_size=None, num_classes=None, trust_pickle=False, pretrained=False,
                      leaf=None):  # fmt: skip
    """A model from any MODEL form, converted-model directories (OUT/) included.

    Every model-loading command takes the same options and calls this, so one command line
    works across them. Notes (stderr, at the end) when an architecture is built with random
    weights (no --weights, no --pretrained): every number computed from it then means nothing.
    """
    from ..model_or_out import load_any

    loaded = load_any(model, weights=weights, input_size=input_size, num_classes=num_classes,
                      trust_pickle=trust_pickle, pretrained=pretrained, leaf=leaf,
                      status=lambda message: console.status(message, spinner="dots"))  # fmt: skip
    note_random_weights(loaded.spec, weights is not None or pretrained)
    return loaded


def note_no_normalisation(loaded) -> None:
    """One stderr note when a .pt2 / .onnx file does not say how its inputs are normalised."""
    from ..models.formats import EXPORTED_SOURCES, METADATA_NAME

    if loaded.spec.source in EXPORTED_SOURCES and loaded.mean is None:
        NOTES.append(f"note: {loaded.spec.name} records no input normalisation ({METADATA_NAME}); data is "
                     "normalised with its own mean/std (see docs/models.md to record the model's)")  # fmt: skip


def note_random_weights(spec, has_weights: bool) -> None:
    """One stderr note when a built-in or timm architecture has no trained weights."""
    if isinstance(spec, str):  # a MODEL argument not built here (snl, recipes): judge it by its form
        from ..models import ModelSpec, list_models

        source = "timm" if spec.startswith("timm:") else "builtin" if spec in list_models() else "other"
        spec = ModelSpec(source, spec.removeprefix("timm:"))
    if not has_weights and spec.source in ("builtin", "timm", "deeplabv3"):
        from ..models.loading import takes_pretrained_backbone

        pretrained = spec.source in ("timm", "deeplabv3") or takes_pretrained_backbone(spec.name)
        how = "--weights FILE" + (" or --pretrained" if pretrained else "")
        NOTES.append(f"note: no weights given: {spec.display} has randomly initialised weights (give {how})")
