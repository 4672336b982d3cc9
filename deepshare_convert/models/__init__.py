"""Built-in architectures and the one way every command loads a model."""

from . import cifar_resnet, deeplab, small, snl_nets  # noqa: F401  (register the built-ins)
from .loading import LoadedModel, ModelSpec, load_model, load_state_dict_file, load_weights
from .registry import ModelEntry, get_entry, list_models, register_model

__all__ = [
    "LoadedModel",
    "ModelEntry",
    "ModelSpec",
    "get_entry",
    "list_models",
    "load_model",
    "load_state_dict_file",
    "load_weights",
    "register_model",
]
