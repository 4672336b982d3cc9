"""ONNX export of original or converted models, the shared gate lowered to standard ONNX ops.

Other private-inference frameworks read ONNX, so the gate must not be a custom op: in
``step`` mode a :class:`~deepshare_convert.conversion.gates.PrototypeGate` exports as
``Slice`` (the first P channels) -> ``GreaterOrEqual`` + ``Cast`` (the DReLU) -> ``Gather``
(replication by the channel map π), and each :class:`~deepshare_convert.conversion.gates.SharedGate` as
``Mul``/``Add`` (``x * (α·g + β)``).  We use the TorchScript exporter (``dynamo=False``):
the dynamo exporter needs onnxscript and handles the leaf modules less predictably.

Every export is checked: ``onnx.checker.check_model`` and onnxruntime against PyTorch on a
random batch (max abs error must be at most ``tol`` (1e-5 by default) times the largest output, or ``tol``
for outputs below 1).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import DeepShareError, first_line

__all__ = ["export_onnx", "ExportReport"]


@dataclass
class ExportReport:
    path: str
    opset: int
    nodes: int
    op_counts: dict[str, int] = field(default_factory=dict)
    max_abs_error: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def export_onnx(
    model: nn.Module,
    input_size: Sequence[int],
    path: str | os.PathLike,
    *,
    batch: int = 1,
    opset: int = 17,
    tol: float = 1e-5,
) -> ExportReport:
    """Export ``model`` (gates in step mode) for inputs of ``input_size`` (C, H, W); check it."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise DeepShareError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing): pip install '.[export]'") from None
    from .conversion.gates import set_gate_mode

    if opset < 12:
        raise DeepShareError(f"--opset {opset} is too old: the gate's GreaterOrEqual needs opset 12 or later")
    net = copy.deepcopy(model).eval().float()
    set_gate_mode(net, "step")
    x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python bools in the gates are expected
        try:
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], do_constant_folding=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            first = first_line(e, 200)
            raise DeepShareError(f"ONNX export failed: {first}") from e
        expected = net(x).numpy()
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise DeepShareError(f"{path} fails onnx.checker: {str(e).strip().splitlines()[0]}") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    err = float(abs(got - expected).max())
    scale = max(1.0, float(abs(expected).max()))  # float32 rounding grows with the outputs (logits of 100s)
    if not err <= tol * scale:
        raise DeepShareError(f"{path}: onnxruntime differs from PyTorch by {err:.2e} (> {tol:g} x {scale:.3g}, the "
                             "largest output)")  # fmt: skip
    counts = Counter(n.op_type for n in proto.graph.node)
    return ExportReport(str(path), opset, len(proto.graph.node), dict(counts), err)
