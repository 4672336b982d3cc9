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

from .errors import PlanError
from .grouping import GroupShape

__all__ = ["Plan", "GroupPlan", "PLAN_FORMAT", "PLAN_FILE", "WEIGHTS_FILE", "write_json_atomic"]

PLAN_FORMAT = "deepshare-plan/1"
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
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
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {d.get('format')!r} (expected {PLAN_FORMAT})")
        d = dict(d)
        d.pop("achieved_drelus", None)
        if d.get("kind", "deepshare") not in PLAN_KINDS:
            raise PlanError(f"unsupported plan kind {d['kind']!r} (expected one of {', '.join(PLAN_KINDS)})")
        try:
            d["groups"] = [GroupPlan(**{k: v for k, v in g.items() if k != "drelus"}) for g in d["groups"]]
            return cls(**d)
        except TypeError as e:
            raise PlanError(f"malformed plan: {e}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PLAN_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Plan":
        path = Path(directory) / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"{directory} holds no {PLAN_FILE} (not a converted-model directory)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from None


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temp file beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
