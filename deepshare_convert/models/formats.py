"""Model files that carry their own architecture: torch.export ``.pt2`` and ONNX; TorchScript refused.

* ``.pt2`` (``torch.export.save``) is read with ``torch.export.load`` -- no pickled code runs --
  and becomes a plain :class:`torch.fx.GraphModule` of ATen ops (``ep.module()`` without its
  pytree calling convention and input guards, so ``.eval()``/``.train()`` and other batch
  sizes work). The input size is the exported example input's (or the signature's).
* ``.onnx`` goes through ``onnx2torch`` (the optional extra ``deepshare[onnx-import]``), which
  yields a GraphModule of ``nn`` modules; the input size is the graph input's shape.
* TorchScript archives (``torch.jit.save``) are recognised from their zip entries
  (``code/``, ``constants.pkl``) without loading them and refused in one line: their graphs are
  not torch.fx graphs, so nothing here could find or rewrite their activation sites.

Neither format says how inputs are normalised. A model saved with a ``deepshare.json`` entry
holding ``{"mean": [...], "std": [...]}`` -- an extra file of the ``.pt2``
(``torch.export.save(ep, f, extra_files={"deepshare.json": ...})``) or a ``metadata_props`` entry
of the ``.onnx`` -- is fed data normalised that way; otherwise the data's own statistics are used
(the CLI says so in a note). :func:`normalisation_json` writes that entry.

Exported graphs are frozen in eval mode (``aten.batch_norm`` with ``training=False``, BatchNorm
folded into convolutions by ``torch.onnx.export``), which is why retraining refuses these sources.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..errors import DeepShareError, first_line

__all__ = ["sniff_model_file", "load_pt2", "load_onnx", "torchscript_error", "normalisation_json", "EXPORTED_SOURCES",
           "METADATA_NAME", "Exported"]

EXPORTED_SOURCES = ("pt2", "onnx")  # sources whose architecture is the file itself
METADATA_NAME = "deepshare.json"  # the .pt2 extra file / ONNX metadata_props key with mean and std
_GUARD_MODULES = ("_guards_fn",)  # torch.export's input-guard submodule, called from the graph
_log = logging.getLogger(__name__)


@dataclass
class Exported:
    """A model read from a .pt2 / .onnx file: the GraphModule, its input size, its normalisation if recorded."""

    model: fx.GraphModule
    input_size: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def normalisation_json(mean: Sequence[float], std: Sequence[float]) -> str:
    """The ``deepshare.json`` entry that tells deepshare how a saved model's inputs are normalised."""
    return json.dumps({"mean": [float(v) for v in mean], "std": [float(v) for v in std]})


def _input_size(given: Sequence[int] | None, recorded: tuple[int, ...] | None, path) -> tuple[int, ...]:
    """The file's input size (C, H, W); ``--input-size`` may repeat it, or supply one it lacks."""
    if given is not None and recorded is not None and tuple(given) != recorded:
        raise DeepShareError(f"--input-size {','.join(map(str, given))} does not match {path}, whose input is "
                             f"{','.join(map(str, recorded))}")  # fmt: skip
    if given is None and recorded is None:
        raise DeepShareError(f"{path} records no fixed input size (beyond the batch); pass --input-size (e.g. 3,32,32)")
    return tuple(given or recorded)


def _normalisation(text: str | bytes | None, path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if not text:
        return None, None
    try:
        d = json.loads(text)
        mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
    except (ValueError, TypeError, KeyError) as e:
        raise DeepShareError(f"{path}: its {METADATA_NAME} entry is not {{\"mean\": [...], \"std\": [...]}} "
                             f"({first_line(e, 80)})") from None  # fmt: skip
    if len(mean) != len(std) or not mean or any(v <= 0 for v in std):
        raise DeepShareError(f"{path}: its {METADATA_NAME} entry needs one mean and one positive std per channel")
    return mean, std


def sniff_model_file(path: str | os.PathLike) -> str | None:
    """``"pt2"``, ``"torchscript"``, ``"onnx"`` or None (anything else: a pickle, weights, junk)."""
    p = Path(path)
    names: list[str] = []
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []
    parts = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if any(n in ("archive_format", "serialized_exported_program.json", "models/model.json") for n in parts):
        return "pt2"
    if any(n == "constants.pkl" or n.startswith("code/") for n in parts):
        return "torchscript"
    if "data.pkl" in parts:
        return None  # a torch.save archive, whatever its suffix: weights, or a pickled module
    suffix = p.suffix.lower()
    if suffix == ".pt2":
        return "pt2"  # a damaged one: load_pt2 says so in one line
    if suffix == ".onnx":
        return "onnx"
    return None


def torchscript_error(path: str | os.PathLike) -> DeepShareError:
    return DeepShareError(
        f"{path} is a TorchScript archive (torch.jit.save), which cannot be converted: its graph is not a torch.fx "
        "graph; save the model with torch.export.save(torch.export.export(model, (x,)), 'model.pt2'), export it "
        "to ONNX, or name the architecture and pass its state dict with --weights"
    )


# ---- torch.export ------------------------------------------------------------------------------
def load_pt2(path: str | os.PathLike, size: tuple[int, ...] | None) -> Exported:
    """The exported program in ``path`` as a plain GraphModule, its input size (no batch dim), its normalisation."""
    if not zipfile.is_zipfile(path):
        raise DeepShareError(f"{path} is not a readable torch.export archive: not a zip file (truncated, or "
                             "another format?)")  # fmt: skip
    try:
        with _quiet_torch_export():  # torch logs a traceback before trying its legacy reader
            extra = {METADATA_NAME: ""}
            ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - zip, JSON, schema or version errors of a damaged archive
        why = first_line(e, 160)
        if "warnings above" in why:  # torch's message points at the log lines silenced above
            why = "a damaged or incomplete archive, or one written by an incompatible torch version"
        raise DeepShareError(f"{path} is not a readable torch.export archive: {why}") from None
    user_inputs = list(ep.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise DeepShareError(f"{path} takes {len(user_inputs)} inputs; deepshare converts models of one image tensor")
    size = _input_size(size, _exported_size(ep), path)
    mean, std = _normalisation(extra.get(METADATA_NAME), path)
    gm = _plain_graph_module(ep.module(), path)
    _check_batch_generic(gm, size, path)
    return Exported(gm, size, mean, std)


@contextlib.contextmanager
def _quiet_torch_export():
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _exported_size(ep) -> tuple[int, ...] | None:
    example = getattr(ep, "example_inputs", None)
    if example:
        args, kwargs = example
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if len(tensors) == 1 and tensors[0].dim() >= 2:
            return tuple(int(d) for d in tensors[0].shape[1:])
    name = ep.graph_signature.user_inputs[0]
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name == name and isinstance(val, torch.Tensor):
            dims = val.shape[1:]
            if all(isinstance(d, int) for d in dims):
                return tuple(dims)
    return None


def _plain_graph_module(module: fx.GraphModule, path) -> fx.GraphModule:
    """``ep.module()`` as an ordinary GraphModule: positional input, one tensor out, no guards.

    The unlifted module refuses ``.eval()``/``.train()`` and checks the exported batch size
    before every call; the graph itself is kept node for node (names, metadata, parameters).
    """
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(module.graph, values)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in _GUARD_MODULES and not node.users:
            graph.erase_node(node)
    if isinstance(out, (tuple, list)):
        if len(out) != 1:
            raise DeepShareError(f"{path} returns {len(out)} outputs; deepshare converts models with one logits output")
        out = out[0]
    graph.output(out)
    graph.lint()
    gm = fx.GraphModule(module, graph, "ExportedModel")
    gm.eval()
    return gm


def _check_batch_generic(gm: fx.GraphModule, size: Sequence[int], path) -> None:
    """Evaluation runs batches: a graph exported at batch 1 that bakes that in is refused now, in one line."""
    try:
        with torch.no_grad():
            gm(torch.zeros((2, *size), dtype=_dtype(gm)))
    except Exception as e:  # noqa: BLE001 - any failure of the graph at batch 2
        raise DeepShareError(
            f"{path} does not run at batch size 2 ({first_line(e, 120)}); export it with a dynamic batch: "
            "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))"
        ) from None


def _dtype(gm: fx.GraphModule) -> torch.dtype:
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# ---- ONNX --------------------------------------------------------------------------------------
def load_onnx(path: str | os.PathLike, size: tuple[int, ...] | None) -> Exported:
    """The ONNX model in ``path`` converted by onnx2torch, its input size (no batch dim), its normalisation."""
    try:
        import onnx
    except ImportError:
        raise DeepShareError("reading .onnx models needs onnx and onnx2torch: pip install 'deepshare[onnx-import]'") from None
    try:
        from ..compat import import_onnx2torch

        onnx2torch = import_onnx2torch()
    except ImportError:
        raise DeepShareError("reading .onnx models needs onnx2torch: pip install 'deepshare[onnx-import]'") from None
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 - protobuf decode or checker errors of a damaged file
        raise DeepShareError(f"{path} is not a readable ONNX model: {first_line(e, 160)}") from None
    size = _input_size(size, _onnx_size(proto, path), path)
    meta = next((p.value for p in proto.metadata_props if p.key == METADATA_NAME), None)
    mean, std = _normalisation(meta, path)
    with _warnings_to_log(f"importing {path}"):
        _inline_identity_initializers(proto)
        gm = _onnx2torch(onnx2torch, proto, path)
        gm.eval()
        _standard_ops(gm, size)
        _batch_generic_reshapes(gm, size)
    return Exported(gm, size, mean, std)


def _batch_generic_reshapes(gm: fx.GraphModule, size: Sequence[int]) -> None:
    """``torch.reshape(x, (1, ...))`` that keeps the batch dimension -> ``(-1, ...)``, if that is what it does.

    The dynamo exporter writes the example's batch size into the graph's last Reshape (ResNet's
    ``x.view(1, 64)``), so the file runs one image at a time, and evaluation and retraining run
    batches. Rewritten only where the reshape's input has that batch dimension of 1 and the
    shape has no other -1, and kept only if the graph then gives each image of a batch of two
    the output it gives alone (else every rewrite is undone: the graph stays as the file says).
    """
    values = _node_values(gm, size)
    changed = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.reshape or not isinstance(node.args[1], tuple):
            continue
        shape, source = node.args[1], values.get(node.args[0])
        if shape[:1] == (1,) and -1 not in shape and isinstance(source, torch.Tensor) and source.dim() and \
                source.shape[0] == 1:  # fmt: skip
            changed.append((node, shape))
            node.args = (node.args[0], (-1, *shape[1:]))
    if not changed:
        return
    gm.recompile()
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0), dtype=_dtype(gm))
    try:
        with torch.no_grad():
            both, alone = gm(x), torch.cat([gm(x[:1]), gm(x[1:])])
        same = isinstance(both, torch.Tensor) and both.shape == alone.shape and torch.allclose(
            both, alone, rtol=1e-4, atol=1e-4 * float(alone.abs().max()))  # float noise of batching passes, mixing not
    except Exception:  # noqa: BLE001 - the rewritten graph does not run at batch 2
        same = False
    if not same:
        for node, shape in changed:
            node.args = (node.args[0], shape)
        gm.recompile()


@contextlib.contextmanager
def _warnings_to_log(what: str):
    """Warnings raised by third-party code in the block go to the debug log, not the user's terminal.

    onnx2torch's modules warn about deprecated torch idioms (e.g. slice.py's "non-tuple sequence
    for multidimensional indexing") when the graph first runs here; they say nothing the user can
    act on, so each distinct one is logged (``DEEPSHARE_DEBUG=1`` shows it) instead of printed.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for line in dict.fromkeys(f"{w.category.__name__}: {first_line(str(w.message), 200)} ({w.filename}:{w.lineno})"
                              for w in caught):  # fmt: skip
        _log.debug("%s: %s", what, line)


def _standard_ops(gm: fx.GraphModule, size: Sequence[int]) -> None:
    """onnx2torch's modules -> the torch calls they stand for, where their parameters are constants.

    The MPC lowering knows ``torch.add``, ``x[slices]``, ``F.pad``, ``adaptive_avg_pool2d``, ``torch.mean``
    and ``torch.reshape`` but not onnx2torch's ``OnnxBinaryMathOperation``, ``OnnxSlice``, ``OnnxPadDynamic``,
    ``OnnxGlobalAveragePool*``, ``OnnxReduceStaticAxes`` (ReduceMean) or ``OnnxReshape``; a Slice's
    starts/ends, a Pad's pads or a Reshape's shape are small subgraphs of
    constants, folded here by running the graph once. In place; anything else is left alone
    (the lowering then names it in one line).
    """
    import operator

    values = _node_values(gm, size)
    constant = _constant_nodes(gm)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        kind = type(modules.get(node.target)).__name__ if node.op == "call_module" else ""
        replacement = None
        if kind == "OnnxBinaryMathOperation" and len(node.args) == 2:
            fn = modules[node.target].math_op_function
            if fn in (torch.add, torch.sub, torch.mul, torch.div):
                replacement = (fn, tuple(node.args))
        elif kind.startswith("OnnxGlobalAveragePool") and len(node.args) == 1:
            replacement = (torch.nn.functional.adaptive_avg_pool2d, (node.args[0], 1))
        elif kind.startswith("OnnxReduceStaticAxes") and modules[node.target].operation_type == "ReduceMean":
            m = modules[node.target]  # the dynamo exporter's global average pool
            if m.axes:
                replacement = (torch.mean, (node.args[0], tuple(m.axes), m.keepdims))
        elif kind == "OnnxReshape" and node.args[1] in constant:
            shape = [int(v) for v in values[node.args[1]].flatten()]  # allowzero=0: a 0 copies that dimension
            if 0 not in shape:
                replacement = (torch.reshape, (node.args[0], tuple(shape)))
        elif kind == "OnnxSlice" and all(a in constant for a in node.args[1:]):
            index = _onnx_slices(*(values[a] for a in node.args[1:]), ndim=values[node.args[0]].dim())
            if index is not None:
                replacement = (operator.getitem, (node.args[0], index))
        elif kind == "OnnxPadDynamic" and all(a in constant for a in node.args[1:]):
            pads = _onnx_pads(values[node.args[1]])
            value = float(values[node.args[2]]) if len(node.args) > 2 and node.args[2] is not None else 0.0
            if modules[node.target].mode == "constant":
                replacement = (torch.nn.functional.pad, (node.args[0], pads, "constant", value))
        if replacement is not None:
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(*replacement)
            new.meta, values[new] = dict(node.meta), values[node]
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _node_values(gm: fx.GraphModule, size: Sequence[int]) -> dict[fx.Node, Any]:
    """Every node's value on one example input (the constants' values are what we need)."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Recorder(gm).run(torch.zeros(1, *size, dtype=_dtype(gm)))
    return values


def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that do not depend on the input (placeholders)."""
    varying: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in varying for a in node.all_input_nodes):
            varying.add(node)
    return {n for n in gm.graph.nodes if n not in varying and n.op != "output"}


def _onnx_slices(starts, ends, axes=None, steps=None, *, ndim: int) -> tuple | None:
    """ONNX Slice inputs -> a Python index (None for negative steps, which the lowering has no need of)."""
    starts, ends = [int(v) for v in starts.flatten()], [int(v) for v in ends.flatten()]
    axes = [int(v) % ndim for v in axes.flatten()] if axes is not None else list(range(len(starts)))
    steps = [int(v) for v in steps.flatten()] if steps is not None else [1] * len(starts)
    if any(step <= 0 for step in steps):
        return None
    index: list[slice] = [slice(None)] * ndim
    for axis, start, end, step in zip(axes, starts, ends, steps):
        index[axis] = slice(start, min(end, 2**62), step)  # ONNX writes "to the end" as INT64_MAX
    return tuple(index)


def _onnx_pads(pads) -> list[int]:
    """ONNX pads (all begins, then all ends, first axis first) -> F.pad's (last axis first, begin, end)."""
    pads = [int(v) for v in pads.flatten()]
    half = len(pads) // 2
    begins, ends = pads[:half], pads[half:]
    out: list[int] = []
    for axis in reversed(range(half)):
        out += [begins[axis], ends[axis]]
    while len(out) > 2 and out[-1] == 0 and out[-2] == 0:  # F.pad may omit leading unpadded axes
        out = out[:-2]
    return out


def _inline_identity_initializers(proto) -> None:
    """``Identity(initializer)`` -> a copy of the initializer under the output's name, in place.

    torch.onnx.export shares equal constants (e.g. two zero biases) through Identity nodes, and
    onnx2torch expects a convolution's weight and bias to be initializers.
    """
    import onnx

    inits = {i.name: i for i in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            proto.graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(node)
    if len(keep) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(keep)


def _onnx2torch(onnx2torch, proto, path) -> fx.GraphModule:
    """onnx2torch's GraphModule, with :mod:`.onnx_converters` for the operator versions it lacks.

    Opsets up to ``NEWEST_OPSET`` convert as written; a newer file is first stepped down by
    ``onnx.version_converter`` (which has adapters for the type-only changes of later opsets).
    A node that still has no converter is named in one line, with ``.pt2`` as the way around it.
    """
    from .onnx_converters import NEWEST_OPSET, first_unconvertible, register

    register()
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > NEWEST_OPSET:
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, NEWEST_OPSET)
        except Exception as e:  # noqa: BLE001 - no adapter for some operator
            raise DeepShareError(f"{path} is ONNX opset {opset}, newer than the {NEWEST_OPSET} deepshare reads, and onnx "
                                 f"cannot step it down ({first_line(e, 100)}); {_PT2_INSTEAD}") from None  # fmt: skip
    try:
        return onnx2torch.convert(proto)
    except Exception as e:  # noqa: BLE001 - an operator version without a converter, or a refused attribute
        error = e
    found = first_unconvertible(proto)
    if found is not None:
        node, op, version, why = found
        raise DeepShareError(f"cannot convert {path}: ONNX node {node!r} ({op} version {version}, opset {opset}): "
                             f"{first_line(why, 100)}; {_PT2_INSTEAD}") from None  # fmt: skip
    raise DeepShareError(f"onnx2torch cannot convert {path}: {first_line(error, 160)}; {_PT2_INSTEAD}") from None


_PT2_INSTEAD = ("export the model with torch.export instead: torch.export.save(torch.export.export(model, (x,)), "
                "'model.pt2'), then convert model.pt2")  # fmt: skip


def _onnx_size(proto, path) -> tuple[int, ...] | None:
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise DeepShareError(f"{path} takes {len(inputs)} inputs; deepshare converts models of one image tensor")
    dims = inputs[0].type.tensor_type.shape.dim
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if not values or any(v is None or v <= 0 for v in values):
        return None
    return tuple(values)
