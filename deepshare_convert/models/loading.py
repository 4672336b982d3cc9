"""Turn a MODEL argument (+ ``--weights`` etc.) into an ``nn.Module`` and a rebuildable spec.

MODEL forms, in the order they are tried:

* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False)``; nothing is downloaded unless
  ``pretrained=True`` (``--pretrained``): then timm fetches its published weights itself, through
  its cache; offline, a cached copy is used or the error names ``--weights`` at once;
* ``deeplabv3:BACKBONE`` / ``deeplabv3-os8:BACKBONE`` -- DeepLabV3 (ASPP head, :mod:`.deeplab`) on
  timm's ``BACKBONE`` features at output stride 16 / 8; ``pretrained=True`` loads timm's weights
  into the backbone only;
* ``package.module:factory`` -- a Python entry point returning an ``nn.Module``;
* an existing file -- by its contents: a torch.export archive (``.pt2``, read with
  ``torch.export.load``, no code runs), an ONNX model (``.onnx``, through ``onnx2torch``), a
  TorchScript archive (refused in one line: export it instead), else a full pickled
  ``nn.Module``, only with ``trust_pickle=True`` (unpickling runs code; a weights file needs an
  architecture and ``--weights``). ``.pt2`` and ``.onnx`` models take their input size from the
  file (see :mod:`.formats`);
* a built-in architecture name (see ``deepshare_convert.models.list_models()``).

Weights are always read with ``weights_only=True`` and ``map_location="cpu"``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ..errors import DeepShareError, ModelNotFoundError, WeightsError
from .deeplab import deeplab_spec_name, parse_deeplab_spec
from .registry import get_entry
from .timm_weights import timm_pretrained

__all__ = ["ModelSpec", "LoadedModel", "load_model", "load_weights", "load_state_dict_file", "takes_pretrained_backbone"]

Source = Literal["builtin", "timm", "deeplabv3", "entrypoint", "pickle", "converted", "pt2", "onnx"]
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ModelSpec:
    """Everything needed to rebuild an architecture (stored in conversion plans)."""

    source: Source
    name: str
    num_classes: int | None = None
    input_size: tuple[int, ...] | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size) if self.input_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        if d.get("input_size") is not None:
            d["input_size"] = tuple(d["input_size"])
        return cls(**d)

    @property
    def display(self) -> str:
        if self.source == "deeplabv3":
            return deeplab_spec_name(self.name, int(self.kwargs.get("output_stride", 16)))
        return {"timm": f"timm:{self.name}"}.get(self.source, self.name)


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    input_size: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def example_input(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn((batch, *self.input_size), generator=g, dtype=dtype)


def parse_input_size(text: str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """'3,32,32' -> (3, 32, 32); a one-line error for anything else."""
    if text is None or isinstance(text, tuple):
        return text
    try:
        dims = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise DeepShareError(f"--input-size {text!r} is not a list of positive integers like 3,32,32")
    return dims


def load_model(
    model: str,
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    input_size: str | tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    pretrained: bool = False,
) -> LoadedModel:
    """Build (and optionally load weights into) the model named by ``model``; eval mode."""
    size = parse_input_size(input_size)
    deeplab = parse_deeplab_spec(model)
    if pretrained and not (model.startswith("timm:") or deeplab or takes_pretrained_backbone(model)):
        raise WeightsError(f"--pretrained fetches timm's published weights, for timm:NAME models only (and the "
                           f"timm backbone of DeepLabV3 models); give {model} its weights with --weights FILE")  # fmt: skip
    if pretrained and weights is not None:
        raise WeightsError("give --pretrained or --weights, not both")
    if model.startswith("timm:"):
        loaded = _load_timm(model[5:], num_classes, size, pretrained)
    elif deeplab is not None:
        loaded = _load_deeplab(*deeplab, num_classes, size, pretrained)
    elif ":" in model and not Path(model).exists():
        loaded = _load_entrypoint(model, num_classes, size)
    elif Path(model).is_file():
        loaded = _load_file(model, trust_pickle, size)
    elif Path(model).is_dir():
        raise DeepShareError(
            f"{model} is a directory; converted-model directories are read with deepshare_convert.load"
        )
    elif _looks_like_path(model):
        raise ModelNotFoundError(f"file not found: {model} (MODEL is a built-in name, timm:NAME, "
                                 "package.module:factory, a converted-model directory or a model file)")  # fmt: skip
    else:
        entry = get_entry(model)
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        if pretrained:  # a built-in on a timm backbone (deeplabv3_mobilenetv2)
            kwargs["pretrained_backbone"] = True
        module = entry.factory(**kwargs)
        spec = ModelSpec("builtin", model, num_classes, size or entry.input_size)
        loaded = LoadedModel(module, spec, size or entry.input_size, entry.mean, entry.std)
    if weights is not None:
        load_weights(loaded.model, weights, strict=strict)
        loaded.spec.weights = str(weights)
    loaded.model.eval()
    return loaded


def _load_timm(name: str, num_classes: int | None, size: tuple[int, ...] | None, pretrained: bool = False) -> LoadedModel:
    from ..compat import import_timm

    timm = import_timm()
    if not timm.is_model(name):
        from .registry import close_matches

        hint = close_matches(name, timm.list_models())
        more = f"; did you mean {', '.join('timm:' + h for h in hint)}?" if hint else ""
        raise ModelNotFoundError(f"unknown timm model {name!r}{more}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    module = timm_pretrained(timm, name, kwargs) if pretrained else timm.create_model(name, pretrained=False, **kwargs)
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    default_size = tuple(cfg.get("input_size", (3, 224, 224)))
    spec = ModelSpec("timm", name, num_classes, size or default_size)
    mean, std = cfg.get("mean"), cfg.get("std")
    return LoadedModel(
        module, spec, size or default_size, tuple(mean) if mean else None, tuple(std) if std else None
    )


def takes_pretrained_backbone(model: str) -> bool:
    """A built-in whose factory can load timm's weights into its backbone (the DeepLabV3 built-ins)."""
    from .registry import list_models

    if model not in list_models():
        return False
    return "pretrained_backbone" in inspect.signature(get_entry(model).factory).parameters


def _load_deeplab(backbone: str, output_stride: int, num_classes: int | None, size: tuple[int, ...] | None,
                  pretrained: bool) -> LoadedModel:  # fmt: skip
    """``deeplabv3:BACKBONE``: the ASPP head on any timm backbone, with the built-in's defaults."""
    from .deeplab import DEEPLAB_DEFAULTS, deeplabv3

    classes = num_classes if num_classes is not None else DEEPLAB_DEFAULTS["num_classes"]
    module = deeplabv3(backbone, classes, output_stride, pretrained_backbone=pretrained)
    size = size or DEEPLAB_DEFAULTS["input_size"]
    spec = ModelSpec("deeplabv3", backbone, num_classes, size, kwargs={"output_stride": output_stride})
    return LoadedModel(module, spec, size, DEEPLAB_DEFAULTS["mean"], DEEPLAB_DEFAULTS["std"])


def _load_entrypoint(target: str, num_classes: int | None, size: tuple[int, ...] | None) -> LoadedModel:
    module_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelNotFoundError(f"cannot import {module_name!r} for entry point {target!r}: {e}") from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise ModelNotFoundError(f"{module_name!r} has no callable {attr!r}")
    kwargs = {}
    if num_classes is not None:
        if "num_classes" not in inspect.signature(factory).parameters:
            raise DeepShareError(f"entry point {target!r} takes no num_classes argument")
        kwargs["num_classes"] = num_classes
    module = factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise ModelNotFoundError(f"entry point {target!r} returned {type(module).__name__}, not an nn.Module")
    if size is None:
        raise DeepShareError(f"entry point {target!r} needs --input-size (e.g. 3,32,32)")
    return LoadedModel(module, ModelSpec("entrypoint", target, num_classes, size), size)


_FILE_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".safetensors", ".pkl", ".ckpt", ".onnx", ".pt2", ".json")


def _looks_like_path(model: str) -> bool:
    """A MODEL that is clearly meant as a file (a path or a weights suffix), not a built-in name."""
    return "/" in model or os.sep in model or model.startswith(".") or Path(model).suffix.lower() in _FILE_SUFFIXES


def _weights_not_model(path: str) -> DeepShareError:
    """A safetensors file given as MODEL holds weights only: say where the model is instead."""
    folder = Path(path).parent
    if (folder / "plan.json").is_file():
        return DeepShareError(f"{path} holds only the weights of the converted model in {folder}; "
                              f"pass the directory itself: {folder}")  # fmt: skip
    return DeepShareError(f"{path} is a weights file, not a model: name the architecture and pass it with "
                          f"--weights (e.g. resnet20 --weights {path})")  # fmt: skip


def _unreadable(path: str | os.PathLike, e: BaseException) -> WeightsError:
    """Why torch.load failed, in one line: PyTorch's own message is a paragraph meant for developers."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04"):
        return WeightsError(f"{path} is not a readable weights file: a damaged or incomplete torch.save archive")
    if head[:1] != b"\x80":  # every pickle since protocol 2 starts with PROTO
        return WeightsError(f"{path} is not a readable weights file: neither a torch.save archive nor a pickle "
                            "(truncated, or another format?)")  # fmt: skip
    text = str(e)
    reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    return WeightsError(f"{path} is not a readable weights file: a damaged pickle ({_short(Exception(reason))})")


def _load_file(path: str, trust_pickle: bool, size: tuple[int, ...] | None) -> LoadedModel:
    """A model file, by what it holds: torch.export, ONNX, TorchScript (refused) or a pickle."""
    from .formats import load_onnx, load_pt2, sniff_model_file, torchscript_error

    form = sniff_model_file(path)
    if form == "torchscript":
        raise torchscript_error(path)
    if form in ("pt2", "onnx"):
        got = (load_pt2 if form == "pt2" else load_onnx)(path, size)
        spec = ModelSpec(form, str(Path(path).resolve()), None, got.input_size)
        return LoadedModel(got.model, spec, got.input_size, got.mean, got.std)
    return _load_pickled_module(path, trust_pickle, size)


def _load_pickled_module(path: str, trust_pickle: bool, size: tuple[int, ...] | None) -> LoadedModel:
    if Path(path).suffix.lower() == ".safetensors":
        raise _weights_not_model(path)
    if not trust_pickle:
        raise DeepShareError(
            f"{path} is a file: a full pickled model loads only with --trust-pickle (unpickling runs "
            "code); for a weights file name the architecture and pass --weights"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise _unreadable(path, e) from None
    if not isinstance(obj, nn.Module):
        raise WeightsError(
            f"{path} holds a {type(obj).__name__}, not an nn.Module; pass it with --weights and an architecture"
        )
    cfg = getattr(obj, "pretrained_cfg", None) or getattr(obj, "default_cfg", None)  # timm models carry theirs
    cfg = cfg if isinstance(cfg, dict) else {}
    size = size or (tuple(int(d) for d in cfg["input_size"]) if cfg.get("input_size") else None)
    if size is None:
        raise DeepShareError(f"{path} holds a model that does not say its input size: pass --input-size "
                             "(e.g. 3,32,32), or save it with torch.export.save, which records it")  # fmt: skip
    mean, std = cfg.get("mean"), cfg.get("std")
    return LoadedModel(obj, ModelSpec("pickle", str(path), None, size), size,
                       tuple(mean) if mean else None, tuple(std) if std else None)  # fmt: skip


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict on the CPU, safely."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {path} not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {_short(e)}") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise WeightsError(
                f"{path} holds pickled objects other than tensors (a full model?); it is refused "
                "because unpickling runs code -- pass it as MODEL with --trust-pickle if you trust it"
            ) from None
        raise _unreadable(p, e) from None
    except Exception as e:  # noqa: BLE001 - zip/EOF/format errors of a corrupt file
        raise _unreadable(p, e) from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}, ...
        if isinstance(obj, dict) and not _is_flat_tensor_dict(obj):
            nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if nested is None:
                break
            obj = nested
    if not isinstance(obj, dict) or not _is_flat_tensor_dict(obj):
        raise WeightsError(f"{path} holds no state dict of tensors")
    out = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _is_flat_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a weights file into ``model``; a one-line WeightsError on any mismatch."""
    state = load_state_dict_file(path)
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch ({_few(mismatched)})")
    if strict and missing:
        problems.append(f"{len(missing)} missing ({_few(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if problems:
        raise WeightsError(f"weights {path} don't fit the model: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
