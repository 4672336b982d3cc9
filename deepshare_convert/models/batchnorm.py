"""BatchNorm statistics from data, for untrained models in tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["recalibrate_batchnorm"]


def recalibrate_batchnorm(model: nn.Module, input_size: Sequence[int], *, batch: int = 32, seed: int = 0,
                          inputs: torch.Tensor | None = None) -> nn.Module:  # fmt: skip
    """Reset every BatchNorm's running stats to those of one batch (random unless ``inputs``).

    Untrained weights with default running stats (mean 0, var 1) give activations that grow
    layer by layer; stats from a batch keep activations and logits O(1), which is what
    numerical checks (MPC agreement, fixed-point error) need.  Returns the model in eval mode.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one batch sets the stats exactly
            m.reset_running_stats()
    if inputs is None:
        inputs = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed))
    model.train()
    with torch.no_grad():
        model(inputs)
    return model.eval()
