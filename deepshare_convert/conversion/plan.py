"""The conversion plan: a JSON record that replays a conversion onto a fresh model.

Like Torch-Pruning's replayable history, the plan says *what* was done
(which sites, which groups, how many prototypes, which channel mapping), and
``model.safetensors`` holds the trained numbers.  ``load(OUT)`` rebuilds the
architecture from the plan's model spec, replays the rewrite and loads the
weights -- no pickles anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..activations import get_activation
from ..errors import PlanError
from .grouping import GroupShape
from .settings import ConversionSettings

__all__ = ["Plan", "GroupPlan", "PLAN_FORMAT", "PLAN_FILE", "WEIGHTS_FILE", "write_json_atomic", "save_tensors_atomic"]

PLAN_FORMAT = "deepshare-plan/1"
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
FILE_MODE = 0o644  # every file of a run alike (safetensors alone would write 0600)
PLAN_KINDS = ("deepshare", "snl")  # shared-gate conversion | SNL-linearised baseline (deepshare_convert.snl)


@dataclass
class GroupPlan(GroupShape):
    index: int
    sites: list[str]
    shape: list[int]
    prototypes: int
    mapping: list[int]

    @property
    def drelus(self) -> int:
        return self.prototypes * self.spatial


@dataclass
class Plan:
    model: dict[str, Any]
    input_size: list[int]
    total_relus: int
    budget_requested: str
    budget: int
    allocator: str
    group_size: int
    gate: str
    gamma: float
    sites: list[dict[str, Any]]
    groups: list[GroupPlan]
    kept: list[str] = field(default_factory=list)
    hidden_relus: int = 0
    leaf_modules: list[str] = field(default_factory=list)
    kind: str = "deepshare"  # "snl": an SNL-linearised model (no groups; ``snl_kept`` ReLUs per site)
    snl_kept: dict[str, int] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    def settings(self):
        """The :class:`~deepshare_convert.conversion.settings.ConversionSettings` this plan was made with
        (``keep`` as the resolved site names; re-running them on the same model gives this plan)."""
        return ConversionSettings(budget=self.budget_requested, allocator=self.allocator, group_size=self.group_size,
                                  gate=self.gate if self.gate in ("step", "gelu") else "step", gamma=self.gamma,
                                  keep=list(self.kept), leaf_modules=list(self.leaf_modules))  # fmt: skip

    # --- derived numbers -------------------------------------------------------------------
    @property
    def kept_relus(self) -> int:
        return sum(s["relus"] for s in self.sites if s["name"] in set(self.kept))

    @property
    def gate_drelus(self) -> int:
        return sum(g.drelus for g in self.groups)

    @property
    def achieved(self) -> int:
        """Comparisons per example after conversion: gates + kept ReLUs + SNL's kept ReLUs + hidden ReLUs."""
        return self.gate_drelus + self.kept_relus + sum(self.snl_kept.values()) + self.hidden_relus

    @property
    def reduction(self) -> float:
        return self.total_relus / max(self.achieved, 1)

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["achieved_drelus"] = self.achieved
        d["groups"] = [dict(asdict(g), drelus=g.drelus) for g in self.groups]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {d.get('format')!r} (expected {PLAN_FORMAT})")
        d = dict(d)
        recorded = d.pop("achieved_drelus", None)
        if d.get("kind", "deepshare") not in PLAN_KINDS:
            raise PlanError(f"unsupported plan kind {d['kind']!r} (expected one of {', '.join(PLAN_KINDS)})")
        try:
            drelus = [g.get("drelus") for g in d["groups"]]  # recorded counts, to catch edits of P alone
            d["groups"] = [GroupPlan(**{k: v for k, v in g.items() if k != "drelus"}) for g in d["groups"]]
            plan = cls(**d)
        except (TypeError, AttributeError, KeyError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from None
        plan.check(recorded_drelus=drelus, recorded_achieved=recorded)
        return plan

    def check(self, *, recorded_drelus: list[Any] | None = None, recorded_achieved: Any = None) -> None:
        """Refuse a plan that contradicts itself (a hand edit): every count must follow from the shapes.

        Each message names the offending field, e.g. ``groups[0].mapping``, so the edit is easy
        to find; that the plan fits the *weights* is checked when they are loaded.
        """
        try:
            _check_plan(self, recorded_drelus or [], recorded_achieved)
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PLAN_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Plan:
        path = Path(directory) / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"{directory} holds no {PLAN_FILE} (not a converted-model directory)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from None


def _bad(field_name: str, why: str) -> PlanError:
    return PlanError(f"plan.json field {field_name} {why} (was the plan edited by hand?)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_mapping(where: str, m: list, channels: int, p: int) -> None:
    """C entries in [0, P), prototypes to themselves; none for a linear group (P = 0)."""
    if p == 0:
        if m:
            raise _bad(f"{where}.mapping", f"has {len(m)} entries; a linear group (prototypes=0) maps nothing")
        return
    if len(m) != channels:
        raise _bad(f"{where}.mapping", f"has {len(m)} entries for {channels} channels")
    wrong = next((c for c, v in enumerate(m) if not _is_int(v) or not 0 <= v < p), None)
    if wrong is not None:
        raise _bad(f"{where}.mapping", f"sends channel {wrong} to {m[wrong]!r}, outside the {p} prototypes")
    wrong = next((c for c in range(p) if m[c] != c), None)
    if wrong is not None:
        raise _bad(f"{where}.mapping", f"sends prototype {wrong} to {m[wrong]} (with prototypes={p}, "
                   f"channels 0..{p - 1} must map to themselves)")  # fmt: skip


def _check_plan(plan: Plan, recorded_drelus: list[Any], recorded_achieved: Any) -> None:
    """The consistency rules of :meth:`Plan.check`, one ``_bad`` per broken field."""
    sites = {}
    for i, s in enumerate(plan.sites):
        n = get_activation(s.get("activation", "relu")).comparisons_per_element  # plans before the registry: relu
        for dim in s["shape"]:
            n *= dim
        if s["relus"] != n:
            raise _bad(f"sites[{i}].relus", f"is {s['relus']}, but its shape {s['shape']} has {n} comparisons")
        sites[s["name"]] = s
    total = sum(s["relus"] for s in plan.sites) + plan.hidden_relus
    if plan.total_relus != total:
        raise _bad("total_relus", f"is {plan.total_relus}, but the sites and hidden ReLUs add up to {total}")
    for name in plan.kept:
        if name not in sites:
            raise _bad("kept", f"names {name!r}, which is not one of the plan's sites")
    for i, g in enumerate(plan.groups):
        where = f"groups[{i}]"
        if g.index != i:
            raise _bad(f"{where}.index", f"is {g.index}, expected {i}")
        if not g.sites or any(name not in sites for name in g.sites):
            missing = next((n for n in g.sites if n not in sites), None)
            raise _bad(f"{where}.sites", f"names {missing!r}, which is not one of the plan's sites" if missing
                       else "is empty")  # fmt: skip
        for name in g.sites:
            if list(sites[name]["shape"]) != list(g.shape):
                raise _bad(f"{where}.shape", f"is {list(g.shape)}, but site {name!r} has shape {sites[name]['shape']}")
        channels, p = g.channels, g.prototypes
        if not _is_int(p) or not 0 <= p <= channels:
            raise _bad(f"{where}.prototypes", f"is {p!r}; it must be 0..{channels} (0: a linear group)")
        _check_mapping(where, g.mapping, channels, p)
        if i < len(recorded_drelus) and recorded_drelus[i] is not None and recorded_drelus[i] != g.drelus:
            raise _bad(f"{where}.drelus", f"is {recorded_drelus[i]}, but prototypes={p} at {g.spatial} "
                       f"positions make {g.drelus}")  # fmt: skip
    for name, n in plan.snl_kept.items():
        if name not in sites:
            raise _bad("snl_kept", f"names {name!r}, which is not one of the plan's sites")
        if not _is_int(n) or not 0 <= n <= sites[name]["relus"]:
            raise _bad(f"snl_kept.{name}", f"is {n!r}; the site has {sites[name]['relus']} ReLUs")
    if recorded_achieved is not None and recorded_achieved != plan.achieved:
        raise _bad("achieved_drelus", f"is {recorded_achieved}, but the groups, kept and hidden ReLUs make "
                   f"{plan.achieved}")  # fmt: skip


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temp file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(model: Any, path: str | os.PathLike) -> None:
    """Write ``model``'s tensors as safetensors beside ``path``, then rename (mode 644, like the JSON)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_model(model, str(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
