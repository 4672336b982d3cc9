"""How close prototype inputs come to zero: a converted model's exposure to gate flips under fixed point.

Under private inference a prototype's input carries the fixed-point error of every truncation
before it (a few units of 2^-ACTIVATION_BITS, *ulps*).  Where ``|x|`` is within that error of 0 its
DReLU may come out the other way, and every channel the prototype serves -- its replicas at each
site of the group -- takes the flipped gate: one flip of a prototype is many wrong gates.

:class:`MarginCounter` streams the leader inputs of every group's prototypes over real images and
keeps, per group, the count of prototype elements within ``k`` ulps of 0 (``k`` in
:data:`THRESHOLDS`), the gate elements those serve, the images with at least one, and quantiles of
``|x|`` in ulps.  ``served_within[k] / images`` is the number of gate elements per inference that
would flip if every element within ``k`` ulps did: an upper bound on the flips at an error of
``k`` ulps, which :mod:`..mpc` measures between 1 and ~10 ulps on the bench models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..mpc.fixed_point import ACTIVATION_BITS

__all__ = ["THRESHOLDS", "GroupMargins", "MarginCounter"]

THRESHOLDS = (1, 4, 16, 64)  # ulps of 2^-ACTIVATION_BITS
ULP = 2.0**-ACTIVATION_BITS
_SAMPLE = 4096  # |x| values kept per group and batch for the quantiles


@dataclass
class GroupMargins:
    index: int
    prototypes: int
    sites: int
    elements: int = 0  # prototype elements seen (over all images)
    within: dict[int, int] = field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))
    served_within: dict[int, int] = field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))
    images_within: dict[int, int] = field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))
    sample: list[torch.Tensor] = field(default_factory=list, repr=False)

    def quantiles(self) -> dict[str, float | None]:
        """Quantiles of |x| in ulps (from a sample of every batch)."""
        if not self.sample:
            return {"p0.1": None, "p1": None, "p50": None}
        t = torch.cat(self.sample)
        q = torch.quantile(t, torch.tensor([0.001, 0.01, 0.5], dtype=t.dtype))
        return {"p0.1": float(q[0]), "p1": float(q[1]), "p50": float(q[2])}


class MarginCounter:
    """Fed ``(gate module, leader input, sites of the group)`` per forward pass; see the module doc."""

    def __init__(self, seed: int = 0):
        self.groups: dict[int, GroupMargins] = {}
        self.images = 0
        self._any: dict[int, torch.Tensor] = {}  # per threshold: images of the current batch with an element within
        self._images_any = dict.fromkeys(THRESHOLDS, 0)
        self.generator = torch.Generator().manual_seed(seed)

    def start_batch(self, n: int) -> None:
        self._flush()
        self.images += n
        self._any = {k: torch.zeros(n, dtype=torch.bool) for k in THRESHOLDS}

    def add(self, index: int, gate, x: torch.Tensor, sites: int) -> None:
        if gate.prototypes == 0:
            return
        g = self.groups.setdefault(index, GroupMargins(index, gate.prototypes, sites))
        ulps = x[:, : gate.prototypes].detach().double().abs() / ULP
        ulps = ulps.flatten(2) if ulps.dim() > 2 else ulps.unsqueeze(-1)  # (B, P, positions)
        served = torch.bincount(gate.mapping, minlength=gate.prototypes).double() * sites  # gates per prototype
        g.elements += ulps.numel()
        for k in THRESHOLDS:
            hit = ulps <= k
            g.within[k] += int(hit.sum())
            g.served_within[k] += int((hit.sum((0, 2)).double() * served).sum())
            per_image = hit.flatten(1).any(1)
            g.images_within[k] += int(per_image.sum())
            if k in self._any:
                self._any[k] |= per_image
        flat = ulps.flatten()
        pick = torch.randint(flat.numel(), (min(_SAMPLE, flat.numel()),), generator=self.generator)
        g.sample.append(flat[pick].float())

    def _flush(self) -> None:
        for k, hits in self._any.items():
            self._images_any[k] += int(hits.sum())
        self._any = {}

    def report(self) -> dict[str, Any]:
        """Per group and in total: elements within k ulps per inference, gates they serve, images with any."""
        self._flush()
        n = max(self.images, 1)
        groups = []
        for g in sorted(self.groups.values(), key=lambda g: g.index):
            groups.append({"group": g.index, "prototypes": g.prototypes, "sites": g.sites,
                           "elements_per_inference": g.elements / n, "abs_ulps": g.quantiles(),
                           "within_per_inference": {k: g.within[k] / n for k in THRESHOLDS},
                           "gates_served_per_inference": {k: g.served_within[k] / n for k in THRESHOLDS},
                           "images_with_any_within": {k: g.images_within[k] / n for k in THRESHOLDS}})  # fmt: skip
        total = {k: sum(g.served_within[k] for g in self.groups.values()) / n for k in THRESHOLDS}
        return {"ulp": ULP, "thresholds_ulps": list(THRESHOLDS), "images": self.images,
                "gates_served_within_per_inference": total,
                "images_with_any_within": {k: self._images_any[k] / n for k in THRESHOLDS},
                "groups": groups}  # fmt: skip
