"""onnx2torch converters for the ONNX operator versions onnx2torch 1.5 lacks, so opsets 7-21 load.

Why: onnx2torch 1.5 stops at opset 17 for many operators, while torch 2.13's ``torch.onnx.export``
writes opset 20 by default (both exporters) and model hubs ship opsets 18-21.  A missing version
makes the whole file unreadable ("Converter is not implemented (... 'Constant', version=19)"),
and ``onnx.version_converter`` cannot step back over Pad-18 or ConstantOfShape-20.  onnx2torch
keeps a registry of converters per (operator, since-version); we add the missing entries.

Most new versions only widened the type lists (bfloat16, float8, int4) and keep the semantics of
the version before; those delegate to onnx2torch's converter for that version (``_SAME``, checked
against the ONNX operator changelog: equal attributes, inputs and defaults).  Where a version
changed semantics the converter here handles the change, or refuses the non-default case with a
message (turned into one line naming the node by :func:`first_unconvertible`):

* Pad-18/19/21: an ``axes`` input (pads for those axes only); Pad-19's ``wrap`` mode is refused.
* ReduceX-18 (ReduceMax/Min-20): ``axes`` moved from an attribute to an input (must be constant);
  ``noop_with_empty_axes``.
* Split-18: ``num_outputs`` without a ``split`` input: chunks of ceil(n / num_outputs), the last smaller.
* Reshape-19/21 (and the exporters' ``allowzero=1``): a 0 in the shape is a literal 0 there.
* AveragePool-19 ``dilations``, BatchNormalization-7 ``spatial``, Resize-18/19 ``antialias`` /
  ``axes`` / ``keep_aspect_ratio_policy`` / ``half_pixel_symmetric``: refused unless the default.

:func:`register` adds them once (the ONNX loader calls it before its first conversion).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

from ..errors import first_line

__all__ = ["register", "first_unconvertible", "NEWEST_OPSET"]

NEWEST_OPSET = 21  # the newest opset every converter here and in onnx2torch covers

# (operator, since-version): the onnx2torch version with the same semantics (types widened only)
_SAME = {
    ("ArgMax", 1): 11, ("ArgMin", 1): 11,  # 11 also accepts negative axes
    ("Cast", 6): 9, ("Cast", 19): 13, ("Cast", 21): 13,  # 19's `saturate` only concerns float8 targets
    ("Constant", 1): 9, ("Constant", 19): 13, ("Constant", 21): 13,
    ("ConstantOfShape", 20): 9, ("ConstantOfShape", 21): 9,
    ("DepthToSpace", 1): 11,  # 1 has no `mode`: DCR, 11's default
    ("Dropout", 7): 10,
    ("Equal", 19): 13, ("GreaterOrEqual", 16): 12, ("LessOrEqual", 16): 12,
    ("Flatten", 1): 9, ("Flatten", 21): 13,
    ("Gemm", 7): 9,
    ("Identity", 19): 16, ("Identity", 21): 16,
    ("IsInf", 20): 10, ("IsNaN", 9): 13, ("IsNaN", 20): 13,
    ("Max", 6): 8, ("Mean", 6): 8, ("Min", 6): 8, ("Sum", 6): 8,  # 8 adds broadcasting: a superset
    ("MaxPool", 1): 8,  # 8 adds `storage_order` and the Indices output
    ("NonZero", 9): 13,
    ("ScatterND", 18): 16,  # 18 adds max/min reductions, which onnx2torch's converter refuses itself
    ("Shape", 19): 15, ("Shape", 21): 15,
    ("Transpose", 21): 13, ("Unsqueeze", 21): 13,
}  # fmt: skip
# versions that added an attribute onnx2torch's older converter would ignore: (operator, version):
# (that older version, {attribute: which values it may have}); absent attributes read as None
_RESIZE_18 = {"antialias": lambda v: v in (None, 0), "axes": lambda v: v is None,
              "keep_aspect_ratio_policy": lambda v: v in (None, "stretch")}  # fmt: skip
_GUARDED = {
    ("AveragePool", 19): (11, {"dilations": lambda v: v is None or all(int(d) == 1 for d in v)}),
    ("BatchNormalization", 7): (9, {"spatial": lambda v: v in (None, 1)}),
    ("Resize", 18): (13, _RESIZE_18),
    ("Resize", 19): (13, {**_RESIZE_18, "coordinate_transformation_mode": lambda v: v != "half_pixel_symmetric"}),
}
_REDUCE_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSumSquare")  # fmt: skip


def _delegate(op: str, version: int):
    from onnx2torch.node_converters.registry import get_converter

    older = get_converter(op, version)

    def convert(node, graph):
        return older(node, graph)

    return convert


def _guarded(op: str, version: int, allowed: dict):
    older = _delegate(op, version)

    def convert(node, graph):
        for name, ok in allowed.items():
            value = node.attributes.get(name)
            value = value.decode() if isinstance(value, bytes) else value
            if not ok(value):
                raise NotImplementedError(f"attribute {name}={value!r} is not supported")
        return older(node, graph)

    return convert


def _given(node, index: int) -> str | None:
    """The name of optional input ``index``, None where it is absent or empty."""
    names = node.input_values
    return names[index] if len(names) > index and names[index] else None


def _constant_list(name: str, graph, what: str) -> list[int]:
    from onnx2torch.utils.common import get_const_value

    try:
        value = get_const_value(name, graph)
    except KeyError:
        raise NotImplementedError(f"{what} computed at run time is not supported (only constant {what})") from None
    return [int(v) for v in (value.flatten().tolist() if isinstance(value, torch.Tensor) else list(value))]


def _mapping(node, inputs):
    from onnx2torch.utils.common import OnnxMapping

    return OnnxMapping(inputs=tuple(inputs), outputs=node.output_values)


# ---- Pad-18/19/21: an optional `axes` input -------------------------------------------------
@cache
def _pad_class():
    from onnx2torch.node_converters.pad import OnnxPadDynamic

    class OnnxPadAxes(OnnxPadDynamic):
        """ONNX Pad with ``axes``: ``pads`` holds begins then ends for those axes only."""

        def __init__(self, mode: str, axes: list[int]):
            super().__init__(mode=mode)
            self.axes = list(axes)

        def forward(self, input_tensor, pads, constant_value=0.0):
            rank = input_tensor.dim()
            full = [0] * (2 * rank)
            n = len(self.axes)
            for i, axis in enumerate(self.axes):
                full[axis % rank], full[rank + axis % rank] = int(pads[i]), int(pads[n + i])
            return super().forward(input_tensor, torch.tensor(full), constant_value)

    return OnnxPadAxes


def _pad18(node, graph):
    from onnx2torch.node_converters.pad import _onnx_to_torch_mode
    from onnx2torch.utils.common import OperationConverterResult

    mode = node.attributes.get("mode", "constant")
    mode = _onnx_to_torch_mode(mode.decode() if isinstance(mode, bytes) else mode)  # `wrap`: NotImplementedError
    axes = _given(node, 3)
    if axes is None:  # the opset-13 form
        return _delegate("Pad", 13)(node, graph)
    inputs = [node.input_values[0], node.input_values[1]] + ([node.input_values[2]] if _given(node, 2) else [])
    module = _pad_class()(mode, _constant_list(axes, graph, "Pad axes"))
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node, inputs))


# ---- ReduceX-18: `axes` is an input ---------------------------------------------------------
@cache
def _reduce_class():
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes

    class OnnxReduceStaticAxes18(OnnxReduceStaticAxes):
        """onnx2torch's reduction with its axes made non-negative first (its Max/Min/Prod path
        reduces one axis at a time and shifts the later ones, which is only right for axes >= 0)."""

        def forward(self, input_tensor):
            if self.axes:
                self.axes = sorted({a % input_tensor.dim() for a in self.axes})
            return super().forward(input_tensor)

    return OnnxReduceStaticAxes18


class OnnxReduceNoAxes(nn.Module):
    """ReduceX over no axes (``noop_with_empty_axes=1``, empty axes): nothing is summed, but the
    element-wise part of the reduction still applies (onnxruntime and ONNX's reference agree:
    ReduceSumSquare gives x**2, ReduceL1 |x|), so only Max/Mean/Min/Prod/Sum are the identity."""

    _ELEMENTWISE = {"ReduceL1": torch.abs, "ReduceL2": torch.abs, "ReduceLogSum": torch.log,
                    "ReduceSumSquare": torch.square}  # fmt: skip

    def __init__(self, operation_type: str):
        super().__init__()
        self.operation_type = operation_type

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        fn = self._ELEMENTWISE.get(self.operation_type)
        return input_tensor if fn is None else fn(input_tensor)


def _reduce18(node, graph):
    from onnx2torch.utils.common import OperationConverterResult

    keepdims = node.attributes.get("keepdims", 1)
    name = _given(node, 1)
    axes = _constant_list(name, graph, f"{node.operation_type} axes") if name else []
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        module: nn.Module = OnnxReduceNoAxes(node.operation_type)
    else:  # no axes (or an empty list): reduce over all of them
        module = _reduce_class()(operation_type=node.operation_type, axes=axes or None, keepdims=keepdims)
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node, node.input_values[:1]))


# ---- Split-18: `num_outputs` ----------------------------------------------------------------
@cache
def _split_class():
    from onnx2torch.node_converters.split import OnnxSplit13

    class OnnxSplit18(OnnxSplit13):
        """Split-18 into ``num_outputs`` chunks of ceil(n / num_outputs), the last one smaller."""

        def forward(self, input_tensor, split=None):
            if split is not None:
                return super().forward(input_tensor, split)
            size = math.ceil(input_tensor.shape[self.axis] / self.num_splits)
            return torch.split(input_tensor, size, dim=self.axis)

    return OnnxSplit18


def _split18(node, graph):
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    if _given(node, 1):
        return _delegate("Split", 13)(node, graph)
    module = _split_class()(num_splits=len(node.output_values), axis=node.attributes.get("axis", 0))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


# ---- Reshape-19/21: allowzero ---------------------------------------------------------------
class OnnxReshapeAllowZero(nn.Module):
    """Reshape with ``allowzero=1``: a 0 in the target shape is a dimension of size 0 (torch's own rule)."""

    def forward(self, input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(input_tensor, [int(v) for v in shape.tolist()])


def _reshape19(node, graph):
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    module: nn.Module = OnnxReshape()  # allowzero=0: a 0 copies the input's dimension
    if node.attributes.get("allowzero", 0) == 1:
        try:  # a constant shape without zeros reads the same either way (what the exporters write)
            literal = 0 in _constant_list(node.input_values[1], graph, "shape")
        except NotImplementedError:
            literal = True
        if literal:
            module = OnnxReshapeAllowZero()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


# ---- Slice-1 ----------------------------------------------------------------------------------
class OnnxSlice1(nn.Module):
    """Slice-1: starts/ends/axes are attributes, steps are 1; ONNX clamps out-of-range bounds and
    counts negative ones from the end, as Python slicing does."""

    def __init__(self, starts, ends, axes=None):
        super().__init__()
        self.starts, self.ends = [int(v) for v in starts], [int(v) for v in ends]
        self.axes = [int(v) for v in axes] if axes is not None else list(range(len(self.starts)))

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        index = [slice(None)] * input_tensor.dim()
        for axis, start, end in zip(self.axes, self.starts, self.ends):
            index[axis % input_tensor.dim()] = slice(start, end)
        return input_tensor[tuple(index)]


def _slice1(node, graph):
    """Slice-1 (opsets 7-9). onnx2torch registers its converter under the key 9, which its registry
    never looks up (opset 9 resolves to since-version 1), and that module fails when it runs."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    a = node.attributes
    module = OnnxSlice1(a["starts"], a["ends"], a.get("axes", None))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


@cache
def register() -> int:
    """Add the converters to onnx2torch's registry (once, and none it already has); returns how many were added."""
    from onnx2torch.node_converters.registry import add_converter, get_converter

    table: dict[tuple[str, int], object] = {key: _delegate(key[0], old) for key, old in _SAME.items()}
    table.update({key: _guarded(key[0], old, allowed) for key, (old, allowed) in _GUARDED.items()})
    table.update({("Pad", v): _pad18 for v in (18, 19, 21)})
    table.update({(op, 18): _reduce18 for op in _REDUCE_18})
    table.update({("ReduceMax", 20): _reduce18, ("ReduceMin", 20): _reduce18})
    table.update({("Split", 18): _split18, ("Reshape", 19): _reshape19, ("Reshape", 21): _reshape19})
    table[("Slice", 1)] = _slice1
    added = 0
    for (op, version), converter in table.items():
        try:  # a later onnx2torch release may bring its own: keep that one
            get_converter(op, version)
            continue
        except NotImplementedError:
            pass
        add_converter(operation_type=op, version=version)(converter)
        added += 1
    return added


def first_unconvertible(proto) -> tuple[str, str, int, str] | None:
    """The first node onnx2torch cannot convert: (node name, operator, since-version, why), or None.

    onnx2torch's own error names the operator but not the node, and not which of a converter's
    conditions failed; this re-runs the lookup and the converter node by node to say so.
    """
    from onnx import defs
    from onnx2torch.node_converters.registry import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    register()
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    model = safe_shape_inference(proto)
    graph = OnnxGraph(model.graph)
    for name, node in graph.nodes.items():
        opset = opsets.get(node.domain or "", 0)
        try:
            version = defs.get_schema(node.operation_type, opset, node.domain or "").since_version
        except Exception:  # noqa: BLE001 - an operator onnx does not define (a custom domain)
            version = opset
        try:
            converter = get_converter(node.operation_type, opset, node.domain or "")
        except NotImplementedError:
            return name, node.operation_type, version, "no converter for this operator version"
        try:
            converter(node, graph)
        except Exception as e:  # noqa: BLE001 - any converter's refusal
            return name, node.operation_type, version, first_line(e, 160)
    return None
