"""Which device a training job runs on: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda[:N]``.

Everything outside the training loop (tracing, census, conversion, saving, MPC) stays on the CPU:
the loop moves the model and each batch to the device, and the jobs bring the model back (``.cpu()``)
before anything traces or saves it, so a GPU run writes the same files a CPU run does.
"""

from __future__ import annotations

import torch

from ..errors import DeepShareError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``name`` as a torch.device, refusing in one line a GPU this torch cannot use."""
    text = str(name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeepShareError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise DeepShareError(f"device {name!r} is not supported for training (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeepShareError(f"device {name!r} asked for, but this torch build sees no CUDA GPU "
                                 f"(torch {torch.__version__}); use --device cpu")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeepShareError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
