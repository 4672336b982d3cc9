"""torch.fx tracing for conversion: the tracer, leaf modules, fused-module decomposition, shapes.

``trace`` turns any supported model into a GraphModule in which every activation of a
registered kind (:mod:`deepshare_convert.activations`) is one node: activation modules stay
single calls, timm's not-traceable leaves are traced through when they hide activations,
fused BN+act modules are split. ``propagate_shapes`` records each node's shape (ShapeProp
that names the failing node). Counting the sites is :mod:`.census`'s job.
"""


from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from ..activations import functional_forms, kind_of_module
from ..errors import TraceError, first_line
from .decompose import decompose_activations

__all__ = [
    "DeepShareTracer",
    "trace",
    "propagate_shapes",
    "example_input",
    "model_dtype",
    "register_leaf_module",
    "register_decomposer",
    "check_leaf_names",
]

_EXTRA_LEAVES: list[type[nn.Module]] = []


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Mark a module class as opaque to tracing (usable as a decorator)."""
    if cls not in _EXTRA_LEAVES:
        _EXTRA_LEAVES.append(cls)
    return cls


class DeepShareTracer(fx.Tracer):
    """fx tracer that honours timm's not-traceable registrations plus user leaves.

    ``expand`` lists leaf types to trace *through* anyway (they hide ReLUs that we
    want as sites).  The tracer remembers the module path being traced, so a
    failure can name it.
    """

    def __init__(
        self,
        leaf_modules: Sequence[type[nn.Module]] | Sequence[str] = (),
        expand: Sequence[type[nn.Module]] = (),
    ):
        timm_leaves, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(timm_functions) + _activation_functions())
        self.leaf_types = tuple(_EXTRA_LEAVES) + tuple(t for t in timm_leaves if t not in expand)
        self.leaf_names = tuple(n for n in leaf_modules if isinstance(n, str))
        self.leaf_types += tuple(t for t in leaf_modules if isinstance(t, type))
        self._module_path_stack: list[tuple[str, type]] = []
        self.failed_at: list[tuple[str, type]] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or type(m).__name__ in self.leaf_names:
            return True
        if kind_of_module(m) is not None:  # an activation module is one site, whatever its forward does
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        self._module_path_stack.append((self.path_of_module(m), type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module that failed
                self.failed_at = list(self._module_path_stack)
            raise
        finally:
            self._module_path_stack.pop()


_DECOMPOSERS: dict[type[nn.Module], Any] = {}


def register_decomposer(cls: type[nn.Module]):
    """Register ``fn(module) -> nn.Module`` that splits a fused module into traceable parts."""

    def wrap(fn):
        _DECOMPOSERS[cls] = fn
        return fn

    return wrap


def decompose_fused_modules(model: nn.Module) -> nn.Module:
    """Split fused norm+activation modules (timm's ``BatchNormAct2d``) into plain parts.

    Tracing *through* such a module would bake the train/eval branch of its
    batch norm into the graph, so it is replaced by ``Sequential(bn, drop, act)``
    with the same tensors.  Works on a copy; returns ``model`` itself if nothing
    needed splitting.
    """
    _register_timm_decomposers()
    if not _DECOMPOSERS or not any(isinstance(m, tuple(_DECOMPOSERS)) for m in model.modules()):
        return model
    import copy

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        fn = next((f for cls, f in _DECOMPOSERS.items() if type(m) is cls), None)
        if fn is not None and name:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, fn(m))
    return model


def _register_timm_decomposers() -> None:
    import sys

    if "timm" not in sys.modules:
        return
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return
    if BatchNormAct2d in _DECOMPOSERS:
        return

    @register_decomposer(BatchNormAct2d)
    def _split_batchnorm_act(m: nn.Module) -> nn.Module:
        from collections import OrderedDict

        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.weight, bn.bias = m.weight, m.bias
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, buf, getattr(m, buf))
        bn.train(m.training)
        return nn.Sequential(OrderedDict([("bn", bn), ("drop", m.drop), ("act", m.act)]))

    try:
        from timm.layers.pool2d_same import AvgPool2dSame
    except ImportError:
        return

    @register_decomposer(AvgPool2dSame)
    def _split_same_avg_pool(m: nn.Module) -> nn.Module:
        # dilated timm ResNets (DeepLab backbones) down-sample with it at stride 1, where TF "SAME"
        # padding is static (k - 1 zeros); other strides depend on the input size: left as a leaf
        return PaddedAvgPool(m) if tuple(m.stride) == (1, 1) else m


class PaddedAvgPool(nn.Module):
    """timm's ``AvgPool2dSame`` at stride 1 as ``F.pad`` (static zeros) + ``F.avg_pool2d``: traceable, and both
    calls are ops the MPC lowering knows (the timm module is a leaf whose forward pads first)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        (kh, kw), self.kernel_size = m.kernel_size, tuple(m.kernel_size)
        self.pads = ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)
        self.ceil_mode, self.count_include_pad = m.ceil_mode, m.count_include_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, self.pads)
        return nn.functional.avg_pool2d(x, self.kernel_size, 1, 0, self.ceil_mode, self.count_include_pad)


def _timm_notrace() -> tuple[list[type], list[Any]]:
    """timm's registries of not-traceable modules/functions (empty without timm)."""
    import sys

    if "timm" not in sys.modules:  # only models built by timm can need them
        return [], []
    try:
        from timm.layers import _fx as timm_fx

        return list(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())
    except (ImportError, AttributeError):
        return [], []


def _activation_functions() -> tuple:
    """Registered activation functions that are plain Python (not torch's): fx must record them as
    one call, not trace through them (torch's own functions are recorded already)."""
    import types

    return tuple(f for f in functional_forms() if isinstance(f, types.FunctionType)
                 and not (getattr(f, "__module__", "") or "").startswith("torch"))  # fmt: skip


def check_leaf_names(model: nn.Module, leaf_modules: Sequence[str]) -> None:
    """A ``--leaf`` that names no module class of ``model`` is a typo: say so instead of ignoring it."""
    classes = {type(m).__name__ for m in model.modules()}
    for name in leaf_modules:
        if name not in classes:
            import difflib

            near = difflib.get_close_matches(name, sorted(classes), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise TraceError(f"--leaf {name}: the model has no module of class {name!r}{hint}")


def trace(model: nn.Module, leaf_modules: Sequence[type[nn.Module]] | Sequence[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; a TraceError naming the failing module otherwise.

    Leaf modules registered by timm that contain ReLUs are traced through when
    they can be (their ReLUs become sites); one whose ``forward`` fx cannot
    trace stays a leaf, and the census reports its ReLUs as hidden. Activations with
    a ReLU decomposition (ReLU6, Hardtanh, LeakyReLU) come back as their ReLU sites
    (:mod:`.decompose`); a GraphModule that has any is decomposed on a copy.
    """
    if isinstance(model, fx.GraphModule):  # e.g. a .pt2 graph: its ReLU6s are split on a copy
        return decompose_activations(model, copy_first=True)
    model = decompose_fused_modules(model)
    timm_leaves, _ = _timm_notrace()
    expand = [t for t in timm_leaves if _contains_relu_of_type(model, t)]
    while True:
        tracer = DeepShareTracer(leaf_modules, expand)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:  # noqa: BLE001 - fx raises many types; all mean "not traceable"
            failed_at = tracer.failed_at or []
            stuck = [cls for _, cls in failed_at if cls in expand]
            if stuck:  # retry with that type back as a leaf
                expand.remove(stuck[-1])
                continue
            path, cls = failed_at[-1] if failed_at else ("", type(model))
            first = first_line(e, 160)
            if path:
                fix = f"mark it opaque with --leaf {cls.__name__}"
                name = f"module {path!r} ({cls.__name__})"
            else:  # --leaf only makes submodules opaque: the model's own forward must trace
                fix = ("--leaf cannot help with the model's own forward: move the untraceable part into a "
                       "submodule and pass --leaf for its class")  # fmt: skip
                name = f"the top-level module ({cls.__name__})"
            raise TraceError(f"torch.fx cannot trace {name}: {first} -- {fix}") from e
    return decompose_activations(fx.GraphModule(tracer.root, graph, type(model).__name__))


def _contains_relu_of_type(model: nn.Module, cls: type) -> bool:
    return any(
        isinstance(m, cls) and any(kind_of_module(s) is not None for s in m.modules()) for m in model.modules()
    )


class _ShapeProp(ShapeProp):
    """ShapeProp that names the failing node instead of printing a traceback to stderr."""

    current: str = ""

    def run_node(self, n: fx.Node):
        self.current = f"{n.name}" + (f" (module {n.target})" if n.op == "call_module" else "")
        result = fx.Interpreter.run_node(self, n)
        found = []

        def extract(obj):
            if isinstance(obj, torch.Tensor):
                found.append(True)
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (float32 for a parameter-free model)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def example_input(input_size: Sequence[int], model: nn.Module | None = None, batch: int = 1) -> torch.Tensor:
    """A fixed random input of the model's dtype (shape propagation needs real values)."""
    dtype = model_dtype(model) if model is not None else torch.float32
    return torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(0), dtype=dtype)


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run ShapeProp (writes ``node.meta['tensor_meta']``); TraceError names the node."""
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            prop.propagate(example)
    except Exception as e:  # noqa: BLE001
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        msg = first_line(root, 200)
        raise TraceError(
            f"shape propagation failed at node {prop.current} for input size "
            f"{tuple(example.shape[1:])}: {msg}"
        ) from e
