"""Data-driven sharing: choose the map pi and the affine (alpha, beta) from activations.

The naive map sends replicate c to prototype (c - P) mod P with alpha = 1, beta = 0:
a replicate then copies the gate of a channel it may not resemble at all.  Here
a few calibration images are run through the *intact* network (every site
blending at t = 0, which computes the original ReLUs exactly) and, per group:

* ``pi(c)`` is the prototype whose DReLU best predicts channel c's own DReLU
  over the group's sites, agreement weighted by |x_c| (a wrong gate on a large
  activation distorts more than on a small one);
* per site, ``(alpha_c, beta_c)`` is the |x|-weighted least-squares fit of
  ``DReLU(x_c) ~ alpha * DReLU(x_pi(c)) + beta`` (an anti-correlated channel
  gets alpha < 0, beta > 0: the complement of the prototype's gate).

Prototypes keep pi(c) = c, alpha = 1, beta = 0 on the leader site, so the
converted model stays exact where it was exact.  A linear group (no prototype) fits beta
alone: ``DReLU(x_c) ~ beta``, so its sites become ``beta_c * x_c``.  :func:`channel_distortion`
measures, per channel, how much switching that channel to the shared gate
would change its activation; the progressive phase can share the least
distorted channels first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .gates import PrototypeGate, SharedGate, step_gate
from .plan import Plan
from .rewrite import GATES_ATTR, SITES_ATTR

__all__ = ["fit_sharing", "channel_distortion", "site_inputs"]


@contextmanager
def _intact(model: nn.Module) -> Iterator[None]:
    """Every site blends at t = 0 (the original ReLUs) for the duration."""
    sites = [m for m in model.modules() if isinstance(m, SharedGate)]
    saved = [(m.blending, m.blend.clone()) for m in sites]
    for m in sites:
        m.blending = True
        m.blend.zero_()
    try:
        yield
    finally:
        for m, (blending, blend) in zip(sites, saved):
            m.blending = blending
            m.blend.copy_(blend)


@torch.no_grad()
def site_inputs(model: nn.Module, images: torch.Tensor, *, intact: bool = True) -> dict[str, torch.Tensor]:
    """Pre-activation input of every shared-gate site on ``images`` (the original network's if ``intact``)."""
    holder = getattr(model, SITES_ATTR)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0].detach()))
        for name, m in holder.named_children()
    ]
    was_training = model.training
    model.eval()
    try:
        if intact:
            with _intact(model):
                model(images)
        else:
            model(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return captured


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N * ...)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).double()


@torch.no_grad()
def fit_sharing(model: nn.Module, plan: Plan, images: torch.Tensor) -> dict[str, float]:
    """Set pi (in the gates and in ``plan``) and (alpha, beta) of every site from ``images``.

    Returns a summary: the |x|-weighted gate agreement of the naive and the fitted
    maps, averaged over all replicate channels.
    """
    inputs = site_inputs(model, images)
    gates = getattr(model, GATES_ATTR)
    sites = getattr(model, SITES_ATTR)
    naive_agree, fitted_agree, count = 0.0, 0.0, 0
    for g in plan.groups:
        if g.prototypes == 0:  # a linear group: only beta, the |x|-weighted share of each channel's positives
            for name in g.sites:
                x = _flat(inputs[name])
                _, beta = _weighted_fit(torch.zeros_like(x), step_gate(x), x.abs())
                sites.get_submodule(name).beta.copy_(beta.to(sites.get_submodule(name).beta.dtype))
            continue
        lead = _flat(inputs[g.leader])
        proto = step_gate(lead[: g.prototypes])  # (P, M)
        score = torch.zeros(g.channels, g.prototypes, dtype=torch.float64)
        per_site = []
        for name in g.sites:
            x = _flat(inputs[name])
            own, w = step_gate(x), x.abs()
            # |x|-weighted agreement of own gate c with prototype gate p, and of own with its complement
            agree = ((w * own) @ proto.T + (w * (1 - own)) @ (1 - proto).T) / w.sum(1, keepdim=True).clamp_min(1e-12)
            score += torch.maximum(agree, 1 - agree)
            per_site.append((name, own, w, agree))
        mapping = score.argmax(1)
        mapping[: g.prototypes] = torch.arange(g.prototypes)
        naive = torch.tensor(g.mapping)
        for name, own, w, agree in per_site:
            rows = torch.arange(g.channels)
            fitted_agree += float(torch.maximum(agree, 1 - agree)[rows, mapping][g.prototypes :].sum())
            naive_agree += float(agree[rows, naive][g.prototypes :].sum())
            count += g.channels - g.prototypes
            alpha, beta = _weighted_fit(proto[mapping], own, w)
            if name == g.leader:
                alpha[: g.prototypes], beta[: g.prototypes] = 1.0, 0.0
            site = sites.get_submodule(name)
            site.alpha.copy_(alpha.to(site.alpha.dtype))
            site.beta.copy_(beta.to(site.beta.dtype))
        gate: PrototypeGate = gates.get_submodule(f"g{g.index}")
        gate.mapping.copy_(mapping)
        gate._identity = bool(torch.equal(mapping, torch.arange(g.channels)))
        g.mapping = mapping.tolist()
    return {"naive_agreement": naive_agree / max(count, 1), "fitted_agreement": fitted_agree / max(count, 1)}


def _weighted_fit(g: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: argmin_{a,b} sum w (y - a g - b)^2; a degenerate row (g constant) gets a = 0, b = mean y."""
    sw = w.sum(1).clamp_min(1e-12)
    mg, my = (w * g).sum(1) / sw, (w * y).sum(1) / sw
    var = (w * (g - mg[:, None]) ** 2).sum(1) / sw
    cov = (w * (g - mg[:, None]) * (y - my[:, None])).sum(1) / sw
    alpha = torch.where(var > 1e-9, cov / var.clamp_min(1e-12), torch.zeros_like(var))
    return alpha, my - alpha * mg


@torch.no_grad()
def channel_distortion(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per site and channel: ||x (DReLU(x) - shared gate)||^2 / ||ReLU(x)||^2 on ``images``.

    0 means the shared gate already reproduces the channel's ReLU; the activations
    come from the intact network, the gates from the current map and affine.
    """
    sites = getattr(model, SITES_ATTR)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, (args[0], args[1])))
        for name, m in sites.named_children()
    ]
    was_training = model.training
    model.eval()
    try:
        with _intact(model):
            model(images.to(next(model.parameters()).device))  # the progressive phase calls this mid-training
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = {}
    for name, (x, gate) in captured.items():
        site = sites.get_submodule(name)
        if site.mode == "mixed":  # distortion is measured against the step half of a mixed gate
            gate = gate[:, : site.channels]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        shared = site.alpha.view(shape) * gate + site.beta.view(shape)
        own = step_gate(x)
        dims = [d for d in range(x.dim()) if d != 1]
        out[name] = ((x * (own - shared)) ** 2).sum(dims) / ((x * own) ** 2).sum(dims).clamp_min(1e-12)
    return out
