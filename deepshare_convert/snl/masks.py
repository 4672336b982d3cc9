"""SNL's masked activation and the fx pass that puts one at every activation site.

:class:`MaskedReLU` computes ``m * relu(x) + (1 - m) * x`` with a learnable mask ``m``
(a bool ``keep`` once binarised); :func:`mask_relus` mirrors :func:`~..rewrite.apply_plan`:
one mask per census site, named after it, under the submodule ``snl_masks``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..activations import get_activation
from ..conversion.census import census, find_sites
from ..conversion.passes import PassResult, SiteRewrite, swap_site
from ..conversion.tracing import example_input, model_dtype, propagate_shapes, register_leaf_module, trace
from ..errors import DeepShareError, PlanError

__all__ = ["MaskedReLU", "mask_relus", "masked_relus", "kept_counts", "binarise", "THRESHOLD", "MASKS_ATTR"]

THRESHOLD = 1e-2  # a mask above this is a live ReLU (SNL's threshold)
MASKS_ATTR = "snl_masks"


# ---- the masked activation ----------------------------------------------------------------------
@register_leaf_module
class MaskedReLU(nn.Module):
    """SNL's per-neuron choice between ReLU and identity: ``m * relu(x) + (1 - m) * x``.

    During the search ``mask`` is a learnable float tensor of the site's shape
    (init 1).  :meth:`binarise` freezes it into the bool buffer ``keep``
    (``mask > threshold``): a buffer, so no optimizer can move it and the saved
    weights hold exactly which ReLUs stay.  A leaf for tracing; it reports its
    comparisons through ``drelus_per_example``, so the census of a linearised
    model counts its kept ReLUs (site kind ``snl``).
    """

    site_kind = "snl"

    def __init__(self, shape: Sequence[int], *, binary: bool = False, threshold: float = THRESHOLD,
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.threshold = float(threshold)
        if binary:
            self.register_buffer("keep", torch.ones(self.shape, dtype=torch.bool))
        else:
            self.mask = nn.Parameter(torch.ones(self.shape, dtype=dtype))

    @property
    def binary(self) -> bool:
        return "keep" in self._buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return torch.where(self.keep, torch.relu(x), x)
        return self.mask * torch.relu(x) + (1 - self.mask) * x

    def live(self) -> torch.Tensor:
        """Which neurons are ReLUs: the frozen ``keep``, or ``mask > threshold`` during the search."""
        return self.keep if self.binary else self.mask.detach() > self.threshold

    def drelus_per_example(self, spatial: int | None = None) -> int:
        """Comparisons per example: one per live neuron (``spatial`` is unused; gates need it)."""
        return int(self.live().sum())

    def binarise(self) -> None:
        """Freeze the mask: live neurons keep their ReLU, the others become linear for good."""
        if self.binary:
            return
        keep = self.live().clone()
        del self.mask
        self.register_buffer("keep", keep)

    def extra_repr(self) -> str:
        state = "kept" if self.binary else "live"
        return f"shape={self.shape}, {state}={self.drelus_per_example()}/{math.prod(self.shape)}"


# ---- the rewrite: ReLU sites -> masked ReLUs -------------------------------------------------------
def mask_relus(model: nn.Module, input_size: Sequence[int], *, leaf_modules: Sequence[str] = (),
               binary: bool = False, threshold: float = THRESHOLD) -> fx.GraphModule:  # fmt: skip
    """Trace a copy of ``model`` and put a :class:`MaskedReLU` (all ones) at every activation site.

    Mirrors :func:`~deepshare_convert.conversion.rewrite.apply_plan`: the caller's model is
    untouched, and :class:`MaskPass` does the surgery with its own pre- and post-conditions.
    """
    gm = trace(copy.deepcopy(model), leaf_modules)
    gm.eval()
    propagate_shapes(gm, example_input(input_size, gm))
    return MaskPass(input_size, leaf_modules, binary=binary, threshold=threshold)(gm).graph_module


class MaskPass(SiteRewrite):
    """SNL's site pass: every activation site -> ``snl_masks.<site name>`` (a MaskedReLU).

    Requires an original model (no gates or masks yet) whose sites all have the x*DReLU(x)
    form. Ensures the census of the result shows the same sites, each mask counting every
    neuron live -- with all masks at 1 the graph computes what the model did.
    """

    holders = (MASKS_ATTR,)

    def __init__(self, input_size: Sequence[int], leaf_modules: Sequence[str] = (), *, binary: bool = False,
                 threshold: float = THRESHOLD):  # fmt: skip
        self.input_size, self.leaf_modules = input_size, leaf_modules
        self.binary, self.threshold = binary, threshold
        self.sites = []

    def requires(self, gm: fx.GraphModule) -> None:
        self.sites = find_sites(gm)
        if any(s.kind in ("gate", MaskedReLU.site_kind) for s in self.sites):
            raise DeepShareError("the model is already converted or linearised; SNL starts from the original model")
        if not self.sites:
            raise DeepShareError("the model has no ReLU activation sites to linearise")
        odd = next((s for s in self.sites if not get_activation(s.activation).convertible), None)
        if odd is not None:
            raise DeepShareError(f"SNL masks activations of the form x*DReLU(x); site {odd.name!r} is a "
                                 f"{odd.activation!r} activation")  # fmt: skip
        if hasattr(gm, MASKS_ATTR):
            raise PlanError(f"model already has an attribute {MASKS_ATTR!r} (masked twice?)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.add_holders(gm)
        holder = getattr(gm, MASKS_ATTR)
        modules = dict(gm.named_modules())
        nodes = {n.name: n for n in gm.graph.nodes}
        dtype = model_dtype(gm)
        for site in self.sites:
            holder.add_module(site.name, MaskedReLU(site.shape, binary=self.binary, threshold=self.threshold,
                                                   dtype=dtype))  # fmt: skip
            swap_site(gm, nodes[site.name], f"{MASKS_ATTR}.{site.name}", modules)
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        _check_masked(gm, self.input_size, self.sites, self.leaf_modules)


def _check_masked(gm: fx.GraphModule, input_size, sites, leaf_modules) -> None:
    """Post-condition: one live mask per original site, same shapes, nothing else left."""
    after = census(gm, input_size, leaf_modules=leaf_modules).sites
    masked = [s for s in after if s.kind == MaskedReLU.site_kind]
    if len(masked) != len(after) or [s.shape for s in masked] != [s.shape for s in sites]:
        raise PlanError("internal: the masked model's sites differ from the original's")
    if sum(s.relus for s in masked) != sum(s.relus for s in sites):
        raise PlanError("internal: a fresh mask does not count every neuron of its site")


def masked_relus(model: nn.Module) -> dict[str, MaskedReLU]:
    """The masks of a masked model, by site name (the original model's census names)."""
    holder = getattr(model, MASKS_ATTR, None)
    if holder is None:
        raise DeepShareError("the model has no SNL masks (build it with snl.mask_relus)")
    return dict(holder.named_children())


def kept_counts(model: nn.Module) -> dict[str, int]:
    """Live (search) or kept (binarised) ReLUs per site, in census order."""
    return {name: m.drelus_per_example() for name, m in masked_relus(model).items()}


def binarise(model: nn.Module) -> dict[str, int]:
    """Freeze every mask at ``m > threshold`` (SNL's Alg. 1 line 11); returns the kept counts."""
    for m in masked_relus(model).values():
        m.binarise()
    return kept_counts(model)

