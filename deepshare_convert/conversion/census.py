"""The ReLU census: activation sites of a traced graph, hidden ones inside leaves, the rest.

An *activation site* is one call of a registered activation kind in the traced graph
(:mod:`deepshare_convert.activations`; for ReLU: an ``nn.ReLU`` module call -- one instance
called twice is two sites --, ``F.relu``, ``torch.relu``, the in-place variants and
``Tensor.relu()``).  Every other pass (grouping, budgets, the rewrite, MPC costs) works on
these sites, so the census is the single source of truth for "how many ReLUs does this
model have".
"""


from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..activations import ORIGIN_META, functional_forms, is_inplace, kind_of, kind_of_module
from ..errors import TraceError
from .tracing import example_input, propagate_shapes, trace

__all__ = [
    "ActivationSite",
    "OtherNonlinearity",
    "Census",
    "census",
    "find_sites",
    "find_other_nonlinearities",
    "is_activation_node",
    "owner_module",
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
_ATEN_OTHER = ("relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "mish", "hardswish", "hardswish_",
               "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
               "selu", "softplus", "softmax", "_softmax", "max_pool1d", "max_pool2d", "max_pool3d",
               "max_pool2d_with_indices", "adaptive_max_pool2d", "clamp", "clamp_", "clip", "maximum", "minimum")
OTHER_FUNCTIONS |= {  # the same operations in torch.export graphs (every overload of each ATen op)
    getattr(packet, overload)
    for packet in (getattr(torch.ops.aten, name, None) for name in _ATEN_OTHER) if packet is not None
    for overload in packet.overloads()
}  # fmt: skip
OTHER_METHODS = {"sigmoid", "tanh", "softmax", "clamp", "clamp_", "clip", "sigmoid_", "tanh_"}
_ACTIVATION_WORDS = ("relu", "gelu", "silu", "swish", "mish", "sigmoid", "tanh", "elu", "softmax")



@dataclass
class ActivationSite:
    """One activation call in the graph.

    ``relus`` counts its secure comparisons per example (elements x the kind's comparisons
    per element; for ReLU, its elements); ``shape`` excludes the batch dimension.
    ``kind`` is how fx calls it, ``activation`` which registered kind it is; ``origin`` the
    kind it was decomposed from ("relu6", "hardtanh", "leaky_relu"; "" for a call as written).
    """

    name: str
    module: str
    kind: str  # "module" | "function" | "method"
    shape: tuple[int, ...]
    relus: int
    inplace: bool = False
    activation: str = "relu"
    origin: str = ""

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
                                    is_inplace(node, modules), activation.name,
                                    node.meta.get(ORIGIN_META, "")))  # fmt: skip
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
