"""torch.fx tracing, shape propagation and the ReLU census.

An *activation site* is one call of a registered activation kind in the traced graph
(:mod:`deepshare_convert.activations`; for ReLU: an ``nn.ReLU`` module call -- one instance
called twice is two sites --, ``F.relu``, ``torch.relu``, the in-place variants and
``Tensor.relu()``).  Every other pass (grouping, budgets, the rewrite, MPC costs) works on
these sites, so the census is the single source of truth for "how many ReLUs does this
model have".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from .activations import functional_forms, is_inplace, kind_of, kind_of_module
from .errors import TraceError, first_line

__all__ = [
    "DeepShareTracer",
    "ActivationSite",
    "OtherNonlinearity",
    "Census",
    "trace",
    "propagate_shapes",
    "find_sites",
    "census",
    "register_leaf_module",
    "is_activation_node",
]

OTHER_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
OTHER_FUNCTIONS = {
    F.relu6, F.hardtanh, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.softplus, F.softmax,
    torch.softmax, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool2d,
    torch.max_pool2d, torch.clamp, torch.clip, torch.maximum, torch.minimum,
}  # fmt: skip
OTHER_METHODS = {"sigmoid", "tanh", "softmax", "clamp", "clamp_", "clip", "sigmoid_", "tanh_"}
_ACTIVATION_WORDS = ("relu", "gelu", "silu", "swish", "mish", "sigmoid", "tanh", "elu", "softmax")

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
    trace stays a leaf, and the census reports its ReLUs as hidden.
    """
    if isinstance(model, fx.GraphModule):
        return model
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
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


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


@dataclass
class ActivationSite:
    """One activation call in the graph.

    ``relus`` counts its secure comparisons per example (elements x the kind's comparisons
    per element; for ReLU, its elements); ``shape`` excludes the batch dimension.
    ``kind`` is how fx calls it, ``activation`` which registered kind it is.
    """

    name: str
    module: str
    kind: str  # "module" | "function" | "method"
    shape: tuple[int, ...]
    relus: int
    inplace: bool = False
    activation: str = "relu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @property
    def channels(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def spatial(self) -> int:
        """Elements per channel (H*W for 4-D activations, 1 for (N, C))."""
        return _numel(self.shape[1:]) if self.shape else 0


@dataclass
class OtherNonlinearity:
    name: str
    module: str
    op: str
    shape: tuple[int, ...]
    elements: int
    note: str = "not converted"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class Census:
    model: str
    input_size: tuple[int, ...]
    sites: list[ActivationSite]
    other_nonlinearities: list[OtherNonlinearity] = field(default_factory=list)
    hidden: list[dict[str, Any]] = field(default_factory=list)

    @property
    def site_relus(self) -> int:
        """ReLUs at graph sites: what conversion can replace."""
        return sum(s.relus for s in self.sites)

    @property
    def hidden_relus(self) -> int:
        """ReLUs inside leaf modules fx could not trace through (they stay ReLUs)."""
        return sum(h["relus"] for h in self.hidden)

    @property
    def total_relus(self) -> int:
        return self.site_relus + self.hidden_relus

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "total_relus": self.total_relus,
            "site_relus": self.site_relus,
            "sites": [s.to_dict() for s in self.sites],
            "other_nonlinearities": [o.to_dict() for o in self.other_nonlinearities],
            "hidden_relus": self.hidden,
        }


def is_activation_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Is ``node`` a call of a registered activation kind (an activation site)?"""
    return kind_of(node, modules) is not None


def _other_op(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if kind_of(node, modules) is not None:  # a site
        return None
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or hasattr(m, "drelus_per_example"):  # counted as sites
            return None
        if isinstance(m, OTHER_MODULE_TYPES):
            return type(m).__name__
        name = type(m).__name__.lower()
        if not list(m.children()) and any(w in name for w in _ACTIVATION_WORDS):
            return type(m).__name__
        return None
    if node.op == "call_function" and node.target in OTHER_FUNCTIONS:
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and node.target in OTHER_METHODS:
        return f"Tensor.{node.target}"
    return None


def owner_module(node: fx.Node) -> str:
    """The module path a node belongs to (its own target for module calls)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return ""


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape[1:])


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def find_sites(gm: fx.GraphModule) -> list[ActivationSite]:
    """Activation sites in topological order; needs shapes from :func:`propagate_shapes`."""
    modules = dict(gm.named_modules())
    sites = []
    for node in gm.graph.nodes:
        gate = _gate_site(node, modules)
        if gate is not None:
            sites.append(gate)
            continue
        activation = kind_of(node, modules)
        if activation is None:
            continue
        shape = _shape(node)
        if shape is None:
            raise TraceError(f"no shape recorded for activation node {node.name!r}; run shape propagation first")
        kind = {"call_module": "module", "call_function": "function", "call_method": "method"}[node.op]
        comparisons = _numel(shape) * activation.comparisons_per_element
        sites.append(ActivationSite(node.name, owner_module(node), kind, shape, comparisons,
                                    is_inplace(node, modules), activation.name))  # fmt: skip
    return sites


def _gate_site(node: fx.Node, modules: dict[str, nn.Module]) -> ActivationSite | None:
    """A converted model's comparison module (it has ``drelus_per_example``).

    A group gate compares its P prototype channels; any other such module (an SNL
    mask, kind ``site_kind``) reports how many of its input's neurons it compares.
    """
    module = modules.get(node.target) if node.op == "call_module" else None
    if module is None or not hasattr(module, "drelus_per_example"):
        return None
    in_shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if in_shape is None:
        raise TraceError(f"no shape recorded for gate node {node.name!r}")
    if not hasattr(module, "prototypes"):
        drelus = int(module.drelus_per_example(_numel(in_shape[1:])))
        return ActivationSite(node.name, str(node.target), getattr(module, "site_kind", "gate"), in_shape, drelus)
    shape = (module.prototypes, *in_shape[1:])
    return ActivationSite(node.name, str(node.target), "gate", shape, _numel(shape))


def find_other_nonlinearities(gm: fx.GraphModule) -> list[OtherNonlinearity]:
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        op = _other_op(node, modules)
        if op is None:
            continue
        shape = _shape(node) or ()
        out.append(OtherNonlinearity(node.name, owner_module(node), op, shape, _numel(shape)))
    return out



class _HiddenReLUs(torch.overrides.TorchFunctionMode):
    """Counts ReLUs that leaf modules run, module ReLUs by path and functional ones by leaf.

    A leaf is opaque to fx, so a ``torch.relu`` it calls (perhaps behind an ``if``) is no
    graph node; this mode sees every functional ReLU call during the census forward and
    attributes those made inside a leaf (and outside an ``nn.ReLU``, which is counted by
    its own hook with its precise path) to that leaf.
    """

    def __init__(self):
        super().__init__()
        self.found: list[dict[str, Any]] = []
        self.functional: dict[str, int] = {}
        self.leaves: list[str] = []  # the leaf being run (a stack: leaves may call leaves)
        self.in_relu_module = 0
        self.forms = functional_forms()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = self.forms.get(func)
        if kind is not None and self.leaves and not self.in_relu_module and isinstance(out, torch.Tensor):
            leaf = self.leaves[-1]
            n = int(out[0].numel()) * kind.comparisons_per_element
            self.functional[leaf] = self.functional.get(leaf, 0) + n
        return out

    def entries(self) -> list[dict[str, Any]]:
        return self.found + [{"module": leaf, "relus": n, "note": "functional ReLU inside a leaf module"}
                             for leaf, n in self.functional.items()]  # fmt: skip


def _hook_hidden_relus(gm: fx.GraphModule, counter: _HiddenReLUs) -> list[Any]:
    """Hooks that feed ``counter``: leaf entry/exit, and each ``nn.ReLU`` inside a leaf."""
    handles = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = gm.get_submodule(node.target)
        if kind_of_module(leaf) is not None or hasattr(leaf, "drelus_per_example"):  # counted as sites
            continue

        def enter(mod, inp, path=node.target):
            counter.leaves.append(path)

        def leave(mod, inp, out):
            counter.leaves.pop()

        handles += [leaf.register_forward_pre_hook(enter), leaf.register_forward_hook(leave)]
        for sub_name, sub in leaf.named_modules():
            kind = kind_of_module(sub) if sub_name else None
            if kind is not None:
                path = f"{node.target}.{sub_name}"

                def relu_in(mod, inp):
                    counter.in_relu_module += 1

                def relu_out(mod, inp, out, path=path, per=kind.comparisons_per_element):
                    counter.in_relu_module -= 1
                    counter.found.append({"module": path, "relus": int(out[0].numel()) * per,
                                          "note": "inside a leaf module"})  # fmt: skip

                handles += [sub.register_forward_pre_hook(relu_in), sub.register_forward_hook(relu_out)]
    return handles


def census(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    name: str | None = None,
    leaf_modules: Sequence[type[nn.Module]] | Sequence[str] = (),
    example: torch.Tensor | None = None,
) -> Census:
    """Trace ``model`` and count its ReLUs at ``input_size`` (no batch dimension)."""
    gm = trace(model, leaf_modules)
    if example is None:
        example = example_input(input_size, model)
    modes = {m: m.training for m in gm.modules()}  # submodules are shared with the caller's model
    gm.eval()
    counter = _HiddenReLUs()
    handles = _hook_hidden_relus(gm, counter)
    try:
        with counter:
            propagate_shapes(gm, example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return Census(
        name or type(model).__name__,
        tuple(input_size),
        find_sites(gm),
        find_other_nonlinearities(gm),
        counter.entries(),
    )

