"""The shared-gate activation of DeepShare (paper Eq. 3 and Eq. 6).

For a group of activation sites that share one gate, with leader input
``x^lead`` (C channels, the first P of them *prototypes*) and a balanced map
``pi`` from every channel to a prototype::

    g      = G(x^lead[:, :P])                     # the only comparisons: P*H*W per example
    y^l_c  = x^l_c * (alpha^l_c * g[:, pi(c)] + beta^l_c)     for every site l of the group

Two modules implement it, so that the fx graph shows where comparisons happen:

* :class:`PrototypeGate` -- one per group, fed by the leader's input.  Computes
  the gate on the prototypes and replicates it to all C channels (replication
  is local indexing: free under MPC).
* :class:`SharedGate` -- one per site: the per-channel affine and the product.

Gate functions: ``step`` (DReLU: 1 if x >= 0 else 0, zero gradient, exactly as in
the paper), ``gelu`` (Phi(gamma*x), the Gaussian CDF, which lets gradients
reach the prototypes) and ``ste`` (the step forward, Phi(gamma*x)'s derivative
backward: a straight-through estimator, so the model that trains is the step
model and prototypes still learn from their replicates).  During the paper's
switch (mode ``mixed``) both step and GELU are computed and every site picks,
channel by channel, which one to use through its ``switched`` mask (Supp. B).

Progressive sharing (training only): a site with ``blending`` on computes
``x * ((1 - t_c) * DReLU(x_c) + t_c * (alpha_c * g_pi(c) + beta_c))`` with a
per-channel ``blend`` t_c in [0, 1]: t = 0 is the original ReLU, t = 1 the
shared gate.  The progressive phase moves every t to 1 (see training/phases.py),
so conversion never falls from the intact network to chance at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import DeepShareError
from .tracing import register_leaf_module

__all__ = ["PrototypeGate", "SharedGate", "balanced_mapping", "GATE_MODES", "step_gate", "gelu_gate", "ste_gate"]

GATE_MODES = ("step", "gelu", "mixed", "ste")


def balanced_mapping(channels: int, prototypes: int) -> torch.Tensor:
    """pi: prototypes map to themselves; replicate c maps to (c - P) mod P.

    Each prototype then serves floor((C-P)/P) or ceil((C-P)/P) replicates.  A *linear* group
    (P = 0) has no prototype to map to: its map is empty.
    """
    if not 0 <= prototypes <= channels:
        raise ValueError(f"need 0 <= prototypes <= channels, got P={prototypes}, C={channels}")
    if prototypes == 0:
        return torch.zeros(0, dtype=torch.long)
    c = torch.arange(channels)
    return torch.where(c < prototypes, c, (c - prototypes) % prototypes)


def step_gate(x: torch.Tensor) -> torch.Tensor:
    """DReLU: 1 where x >= 0.  A comparison: it carries no gradient."""
    return (x >= 0).to(x.dtype)


def gelu_gate(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Phi(gamma * x): the gate factor of GELU, sharpened by gamma."""
    return 0.5 * (1.0 + torch.erf(x * (gamma / math.sqrt(2.0))))


class _StraightThroughStep(torch.autograd.Function):
    """Forward: DReLU.  Backward: d/dx Phi(gamma*x) = gamma * phi(gamma*x), a smooth surrogate."""

    @staticmethod
    def forward(ctx, x, gamma):
        ctx.save_for_backward(x)
        ctx.gamma = gamma
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        g = ctx.gamma
        density = torch.exp(-0.5 * (g * x) ** 2) * (g / math.sqrt(2.0 * math.pi))
        return grad * density, None


def ste_gate(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """DReLU forward, gamma*phi(gamma*x) backward (straight-through with a Gaussian surrogate)."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return step_gate(x)
    return _StraightThroughStep.apply(x, float(gamma))


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) to broadcast over an ndim-dimensional activation."""
    return t.view((1, -1) + (1,) * (ndim - 2))


@register_leaf_module
class PrototypeGate(nn.Module):
    """Gate of one group: computed on the leader's first P channels, replicated by ``pi``.

    Output shape is the leader's shape (N, C, ...) in ``step``/``gelu`` mode and
    (N, 2C, ...) in ``mixed`` mode (step-replicated channels first, then GELU).  A linear group
    (P = 0: no comparison at all) gates with zeros, so each of its sites is ``beta * x``.
    """

    def __init__(self, channels: int, prototypes: int, mapping: torch.Tensor | None = None,
                 mode: str = "step", gamma: float = 1.0):  # fmt: skip
        super().__init__()
        mapping = balanced_mapping(channels, prototypes) if mapping is None else mapping.long()
        if prototypes == 0:
            if mapping.numel():
                raise ValueError("a linear group (P = 0) has an empty mapping")
        elif mapping.shape != (channels,) or int(mapping.max()) >= prototypes or int(mapping.min()) < 0:
            raise ValueError("mapping must send each of the C channels to a prototype in [0, P)")
        self.channels = channels
        self.prototypes = prototypes
        self.gamma = float(gamma)
        self.mode = mode
        self.register_buffer("mapping", mapping, persistent=True)
        self._identity = prototypes > 0 and bool(torch.equal(mapping, torch.arange(channels)))

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {value!r}")
        self._mode = value

    def _replicate(self, g: torch.Tensor) -> torch.Tensor:
        return g if self._identity else g.index_select(1, self.mapping)

    @property
    def linear(self) -> bool:
        """No prototype: every site of the group is ``beta * x``."""
        return self.prototypes == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prototypes == 0:
            return x.new_zeros((x.shape[0], 2 * x.shape[1], *x.shape[2:]) if self._mode == "mixed" else x.shape)
        proto = x[:, : self.prototypes]
        if self._mode == "step":
            return self._replicate(step_gate(proto))
        if self._mode == "gelu":
            return self._replicate(gelu_gate(proto, self.gamma))
        if self._mode == "ste":
            return self._replicate(ste_gate(proto, self.gamma))
        both = torch.cat([step_gate(proto), gelu_gate(proto, self.gamma)], dim=1)
        index = torch.cat([self.mapping, self.mapping + self.prototypes])
        return both.index_select(1, index)

    def drelus_per_example(self, spatial: int) -> int:
        return self.prototypes * spatial

    def extra_repr(self) -> str:
        return f"C={self.channels}, P={self.prototypes}, mode={self._mode}, gamma={self.gamma}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._identity = self.prototypes > 0 and bool(torch.equal(self.mapping, torch.arange(self.channels)))


class _SharedGateFn(torch.autograd.Function):
    """y = x * (alpha * g + beta), saving only x and the (group-shared) gate for backward.

    Plain autograd would also keep the per-site product ``alpha*g + beta`` (a full
    activation-sized tensor per site); recomputing it in backward brings the
    activation memory of a converted model back to that of the original.
    """

    @staticmethod
    def forward(ctx, x, gate, alpha, beta):
        ctx.save_for_backward(x, gate, alpha, beta)
        return x * torch.addcmul(beta, alpha, gate)

    @staticmethod
    def backward(ctx, grad):
        x, gate, alpha, beta = ctx.saved_tensors
        dims = [d for d in range(grad.dim()) if d != 1]
        grad_x = grad * torch.addcmul(beta, alpha, gate) if ctx.needs_input_grad[0] else None
        gx = grad * x
        grad_gate = gx * alpha if ctx.needs_input_grad[1] else None
        grad_alpha = (gx * gate).sum(dims, keepdim=True) if ctx.needs_input_grad[2] else None
        grad_beta = gx.sum(dims, keepdim=True) if ctx.needs_input_grad[3] else None
        return grad_x, grad_gate, grad_alpha, grad_beta


@register_leaf_module
class SharedGate(nn.Module):
    """y = x * (alpha * g + beta) per channel, with g the group's replicated gate.

    ``switched`` (bool per channel) selects the step gate over the GELU gate
    when the group runs in ``mixed`` mode; it is ignored otherwise.  ``blending``
    (off outside the progressive phase) mixes in the channel's own DReLU with
    weight ``1 - blend``; ``blend`` is not saved: the phase sets it every step and
    leaves it at 1 (no own comparisons) when it ends.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.alpha = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("switched", torch.zeros(channels, dtype=torch.bool), persistent=True)
        self.register_buffer("blend", torch.ones(channels), persistent=False)
        self.blending = False
        self.mode = "step"

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.mode == "mixed":
            c = torch.arange(self.channels, device=gate.device)
            gate = gate.index_select(1, torch.where(self.switched, c, c + self.channels))
        alpha = _channel_view(self.alpha, x.dim())
        beta = _channel_view(self.beta, x.dim())
        if self.blending:
            own = step_gate(x.detach())
            t = _channel_view(self.blend, x.dim())
            return x * (own + t * (torch.addcmul(beta, alpha, gate) - own))
        if torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
            return _SharedGateFn.apply(x, gate, alpha, beta)
        return x * torch.addcmul(beta, alpha, gate)

    def extra_repr(self) -> str:
        return f"C={self.channels}, mode={self.mode}"


def set_gate_mode(model: nn.Module, mode: str) -> None:
    """Put every gate of a converted model in ``step``, ``gelu`` or ``mixed`` mode."""
    if mode not in GATE_MODES:
        raise DeepShareError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, (PrototypeGate, SharedGate)):
            m.mode = mode
