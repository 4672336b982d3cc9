"""``analyze``: per-site gate correlation (ED/d aligned vs shuffled) and, for a converted model,
how well shared gates match each channel's own DReLU and what (beta, alpha) the sites learned.

The converted-model numbers read the paper's Supp. E (Fig. 10) as statistics:

* ``agreement`` -- over all channels of a site, how often the gate it receives (its
  prototype's DReLU, through pi) equals the DReLU of its own input: how much of the original
  gating the prototypes carry.  ``replicate_agreement`` counts replicates only (every
  channel of a non-leader site is one); ``affine_agreement`` compares the effective gate
  ``alpha*g + beta``, rounded at 1/2, instead (a replicate with alpha < 0 uses the
  complement of its prototype's gate).
* ``near_linear`` -- fraction of channels with |alpha| < 0.1, barely gated ("linear-like");
  ``prototypes_positive/negative`` -- the sign split of the prototypes' alpha (the paper sees
  two sign-symmetric clusters); ``replicate_spread_deg`` -- the circular standard deviation of
  the replicates' angle atan2(alpha, beta) (0 when they all sit at the initial (0, 1)).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..conversion.rewrite import GATES_ATTR, SITES_ATTR
from ..errors import DataError, DeepShareError
from .effective_dim import GateCovariance, shuffle_positions
from .margins import MarginCounter
from .recording import GraphSites, SiteInfo, graph_sites, record

__all__ = ["SiteReport", "AnalysisReport", "analyze", "analyze_dataset", "dataset_batches", "affine_summary", "NEAR_LINEAR"]

NEAR_LINEAR = 0.1  # |alpha| below this: the channel is barely gated


@dataclass
class SiteReport:
    """Everything measured at one site; per-position ED/d lists feed the box plots."""

    name: str
    module: str
    shape: tuple[int, ...]
    aligned: list[float]
    shuffled: list[float]
    group: int | None = None
    leader: bool = False
    prototypes: int | None = None
    agreement: float | None = None
    replicate_agreement: float | None = None
    affine_agreement: float | None = None
    alpha: list[float] | None = None
    beta: list[float] | None = None
    prototype: list[bool] | None = None

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> int:
        return math.prod(self.shape[1:])

    def summary(self) -> dict[str, Any]:
        a, s = _quartiles(self.aligned), _quartiles(self.shuffled)
        out = {"d": self.channels, "positions": len(self.aligned),
               "aligned_median": a[1], "aligned_q1": a[0], "aligned_q3": a[2], "shuffled_median": s[1],
               "degenerate_positions": sum(math.isnan(v) for v in self.aligned)}  # fmt: skip
        if self.alpha is not None:
            out.update(agreement=self.agreement, replicate_agreement=self.replicate_agreement,
                       affine_agreement=self.affine_agreement,
                       **affine_summary(self.alpha, self.beta, self.prototype))  # fmt: skip
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "module": self.module, "shape": list(self.shape), "group": self.group,
             "leader": self.leader, "prototypes": self.prototypes, **self.summary(),
             "ed_aligned": _finite(self.aligned), "ed_shuffled": _finite(self.shuffled)}  # fmt: skip
        if self.alpha is not None:
            d.update(alpha=self.alpha, beta=self.beta, prototype=self.prototype)
        return d


@dataclass
class AnalysisReport:
    model: str
    data: str
    num_images: int
    seed: int
    converted: bool
    sites: list[SiteReport] = field(default_factory=list)
    seconds: float = 0.0
    margins: dict[str, Any] | None = None  # converted models: prototype inputs near 0 (:mod:`.margins`)

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "data": self.data, "num_images": self.num_images, "seed": self.seed,
             "converted": self.converted, "seconds": round(self.seconds, 2),
             "sites": [s.to_dict() for s in self.sites]}  # fmt: skip
        if self.margins is not None:
            d["margins"] = self.margins
        return d


def _finite(values: Sequence[float]) -> list[float | None]:
    """NaN (a position where every channel is constant) is ``null`` in JSON."""
    return [None if math.isnan(v) else round(v, 6) for v in values]


def _quartiles(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    t = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if t.numel() == 0:
        return None, None, None
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return tuple(float(v) for v in q)  # type: ignore[return-value]


def affine_summary(alpha: Sequence[float], beta: Sequence[float], prototype: Sequence[bool]) -> dict[str, Any]:
    """Fig. 10 as numbers: near-linear fraction, prototype sign split, replicate angular spread."""
    a, b = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    is_proto = torch.tensor(prototype, dtype=torch.bool)
    out: dict[str, Any] = {"near_linear": float((a.abs() < NEAR_LINEAR).double().mean())}
    pa = a[is_proto]
    out["prototypes_positive"] = int((pa > 0).sum()) if pa.numel() else None
    out["prototypes_negative"] = int((pa < 0).sum()) if pa.numel() else None
    ra, rb = a[~is_proto], b[~is_proto]
    out["replicate_spread_deg"] = _circular_std_deg(torch.atan2(ra, rb)) if ra.numel() else None
    return out


def _circular_std_deg(theta: torch.Tensor) -> float:
    """sqrt(-2 ln R) in degrees, R the mean resultant length: 0 when all angles agree."""
    r = float(torch.hypot(theta.cos().mean(), theta.sin().mean()))
    return math.degrees(math.sqrt(max(0.0, -2.0 * math.log(min(max(r, 1e-12), 1.0)))))


class _Accumulator:
    """The streamed state of one analysis: covariances per site, agreement counts per channel."""

    def __init__(self, found: GraphSites, seed: int):
        self.found = found
        self.generator = torch.Generator().manual_seed(seed)
        self.aligned: dict[str, GateCovariance] = {}
        self.shuffled: dict[str, GateCovariance] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.shared: dict[int, torch.Tensor] = {}
        self.agree: dict[str, torch.Tensor] = {}
        self.affine_agree: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}
        self.margins = MarginCounter(seed)
        self.group_sites = collections.Counter(s.group for s in found.sites if s.group is not None)

    def __call__(self, kind: str, what: object, x: torch.Tensor) -> None:
        if kind == "gate":
            gate = self.found.graph.get_submodule(f"{GATES_ATTR}.g{what}")
            self.margins.add(int(what), gate, x, self.group_sites[int(what)])
            if gate.prototypes == 0:  # a linear group: every channel receives the gate 0
                self.shared[int(what)] = torch.zeros_like(_flat(x >= 0))
                return
            proto = _flat(x[:, : gate.prototypes] >= 0)
            self.shared[int(what)] = proto.index_select(1, gate.mapping)  # pi: the gate each channel receives
            return
        site: SiteInfo = what  # type: ignore[assignment]
        own = _flat(x >= 0)
        if site.name not in self.aligned:
            self.shapes[site.name] = tuple(x.shape[1:]) if x.dim() > 2 else (x.shape[1], 1)
            self.aligned[site.name] = GateCovariance(own.shape[1], own.shape[2])
            self.shuffled[site.name] = GateCovariance(own.shape[1], own.shape[2])
        self.aligned[site.name].add(own)
        self.shuffled[site.name].add(shuffle_positions(own, self.generator))
        if self.found.converted:
            self._agreement(site, own)

    def _agreement(self, site: SiteInfo, own: torch.Tensor) -> None:
        g = self.shared[site.group]
        module = self.found.graph.get_submodule(f"{SITES_ATTR}.{site.name}")
        alpha, beta = module.alpha.detach().double(), module.beta.detach().double()
        on, off = (alpha + beta >= 0.5)[None, :, None], (beta >= 0.5)[None, :, None]
        effective = torch.where(g, on, off)
        _add(self.agree, site.name, own == g)
        _add(self.affine_agree, site.name, own == effective)
        self.seen[site.name] = self.seen.get(site.name, 0) + own.shape[0] * own.shape[2]

    def site_report(self, site: SiteInfo) -> SiteReport:
        r = SiteReport(site.name, site.module, self.shapes[site.name], self.aligned[site.name].normalised_ed().tolist(),
                       self.shuffled[site.name].normalised_ed().tolist(), site.group, site.leader, site.prototypes)  # fmt: skip
        if self.found.converted:
            module = self.found.graph.get_submodule(f"{SITES_ATTR}.{site.name}")
            per_channel = self.agree[site.name] / self.seen[site.name]
            proto = [site.leader and c < site.prototypes for c in range(r.channels)]
            replicas = per_channel[~torch.tensor(proto)]
            r.agreement = float(per_channel.mean())
            r.replicate_agreement = float(replicas.mean()) if replicas.numel() else None
            r.affine_agreement = float((self.affine_agree[site.name] / self.seen[site.name]).mean())
            r.alpha, r.beta = module.alpha.detach().tolist(), module.beta.detach().tolist()
            r.prototype = proto
        return r


def _add(store: dict[str, torch.Tensor], name: str, hits: torch.Tensor) -> None:
    """Per-channel running count of the True entries of (B, C, positions) ``hits``."""
    counts = hits.sum((0, 2), dtype=torch.float64)
    store[name] = store[name] + counts if name in store else counts


def _flat(gates: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) bool -> (B, C, positions); an (N, C) activation has one position."""
    return gates.flatten(2) if gates.dim() > 2 else gates.unsqueeze(-1)


def analyze(model: nn.Module, input_size: Sequence[int], batches: Iterable[torch.Tensor], *, seed: int = 0,
            leaf: Sequence[str] = (), name: str = "", data: str = "",
            progress: Callable[[int], None] | None = None) -> AnalysisReport:  # fmt: skip
    """Stream ``batches`` of images through ``model`` and report every site (see the module doc)."""
    start = time.perf_counter()
    found = graph_sites(model, input_size, leaf)
    acc = _Accumulator(found, seed)
    n = 0
    for images in batches:
        acc.margins.start_batch(images.shape[0])
        record(found, images, acc)
        n += images.shape[0]
        if progress is not None:
            progress(n)
    if n == 0:
        raise DataError("no images to analyse")
    report = AnalysisReport(name or type(model).__name__, data, n, seed, found.converted,
                            [acc.site_report(s) for s in found.sites],
                            margins=acc.margins.report() if found.converted else None)  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def dataset_batches(loaded, data: str, *, num_images: int = 4096, batch_size: int = 128):
    """A loader over a fixed subset of ``num_images`` test images of ``data``, checked first (one-line errors).

    ``loaded`` is a :class:`~deepshare_convert.models.LoadedModel`: its normalisation is used.
    """
    from ..data import check_input_fits, load_dataset, make_loader

    if num_images < 1:
        raise DeepShareError(f"--num-images must be at least 1, got {num_images}")
    if batch_size < 1:
        raise DeepShareError(f"--batch-size must be at least 1, got {batch_size}")
    info, _, test = load_dataset(data)
    if len(test) == 0:
        raise DataError(f"{data} has no test images to analyse")
    if num_images > len(test):
        raise DataError(f"--num-images {num_images} is more than the {len(test)} test images of {data}; "
                        f"pass --num-images {len(test)} or fewer")  # fmt: skip
    check_input_fits(loaded.input_size, info, data)
    return make_loader(test, info, train=False, batch_size=batch_size, mean=loaded.mean, std=loaded.std,
                       limit=num_images)  # fmt: skip


def analyze_dataset(loaded, data: str, *, num_images: int = 4096, batch_size: int = 128, seed: int = 0,
                    leaf: Sequence[str] = (), progress: Callable[[int], None] | None = None) -> AnalysisReport:  # fmt: skip
    """:func:`analyze` on a fixed subset of ``num_images`` test images of dataset ``data``."""
    loader = dataset_batches(loaded, data, num_images=num_images, batch_size=batch_size)
    return analyze(loaded.model, loaded.input_size, (x for x, _ in loader), seed=seed, leaf=leaf,
                   name=loaded.spec.display, data=data, progress=progress)  # fmt: skip
