"""The rewrite pass: activation sites -> shared gates, as a checked torch.fx pass.

``convert`` = trace -> shapes -> sites -> groups -> budgets -> :func:`apply_plan`.
``apply_plan`` is also what ``load`` replays, so a saved plan rebuilds the same
graph.  The pass checks its own post-conditions (``graph.lint()``, every planned
site replaced, the census of the result equal to the plan's DReLUs) and works
on a deep copy: the caller's model is never touched.
"""

from __future__ import annotations

import copy
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..activations import ORIGIN_META, activation_input, get_activation
from ..errors import DeepShareError, PlanError
from .budget import allocate, parse_budget
from .census import census, find_sites
from .gates import PrototypeGate, SharedGate, balanced_mapping
from .grouping import group_sites, select_kept
from .passes import PassResult, SiteRewrite, swap_site
from .plan import PLAN_FILE, WEIGHTS_FILE, GroupPlan, Plan
from .plan_kinds import registered_plan_kind
from .settings import ConversionSettings, settings_from
from .tracing import example_input, propagate_shapes, trace

__all__ = ["convert", "apply_plan", "build_plan", "ConversionSettings", "save", "save_new", "load", "Converted", "SharedGatePass"]

GATES_ATTR = "deepshare_gates"
SITES_ATTR = "deepshare_sites"


@dataclass
class Converted:
    model: fx.GraphModule
    plan: Plan
    mean: tuple[float, ...] | None = None  # input normalisation of the source model, if known
    std: tuple[float, ...] | None = None


def build_plan(
    model: nn.Module,
    input_size: Sequence[int],
    settings: ConversionSettings | None = None,
    *,
    snl_counts: Mapping[str, int] | None = None,
    spec: dict | None = None,
    **options: Any,
) -> Plan:
    """Census + grouping + budget allocation: everything but the graph surgery.

    ``settings`` (or the same fields as keyword ``options``: budget=, allocator=, group_size=,
    gate=, gamma=, keep=, leaf_modules=, snl_counts= a path) say what to do; ``snl_counts`` may
    also be an in-memory mapping, which wins over a path in the settings.
    """
    s = _settings(settings, options)
    c = census(model, input_size, leaf_modules=s.leaf_modules)
    if not c.sites:
        raise DeepShareError("the model has no ReLU activation sites to convert")
    unconvertible = _unconvertible(c.sites)
    if len(unconvertible) == len(c.sites):
        kinds = sorted({site.activation for site in c.sites})
        raise DeepShareError(f"the model's activation sites ({', '.join(kinds)}) have no x*DReLU(x) form to share")
    requested = parse_budget(s.budget, c.total_relus)
    kept = select_kept(c.sites, s.keep) | unconvertible
    groups = group_sites(c.sites, s.group_size, kept)
    fixed = c.hidden_relus + sum(site.relus for site in c.sites if site.name in kept)
    if requested <= fixed:
        raise DeepShareError(
            f"budget {requested:,} does not cover the {fixed:,} ReLUs that stay (kept or hidden sites)"
        )
    protos = allocate(groups, requested - fixed, s.allocator, s.snl_count_map(snl_counts))
    return Plan(
        model=spec or {"source": "python", "name": type(model).__name__},
        input_size=list(input_size),
        total_relus=c.total_relus,
        budget_requested=s.budget,
        budget=requested,
        allocator=s.allocator,
        group_size=s.group_size,
        gate=s.gate,
        gamma=float(s.gamma),
        sites=[site.to_dict() for site in c.sites],
        groups=[
            GroupPlan(g.index, list(g.sites), list(g.shape), p, balanced_mapping(g.channels, p).tolist())
            for g, p in zip(groups, protos)
        ],
        kept=sorted(kept, key=[site.name for site in c.sites].index),
        hidden_relus=c.hidden_relus,
        leaf_modules=list(s.leaf_modules),
    )


def _settings(settings: ConversionSettings | None, options: dict[str, Any]) -> ConversionSettings:
    if settings is not None and options:
        raise DeepShareError(f"give conversion settings or keyword options, not both ({', '.join(options)})")
    if settings is None:
        return settings_from(**{k: (list(v) if k in ("keep", "leaf_modules") else v) for k, v in options.items()})
    fields = {name: getattr(settings, name) for name in ConversionSettings.model_fields}
    return settings if type(settings) is ConversionSettings else ConversionSettings(**fields)


def convert(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    settings: ConversionSettings | None = None,
    *,
    snl_counts: Mapping[str, int] | None = None,
    spec: dict | None = None,
    **options: Any,
) -> Converted:
    """Convert ``model`` to shared gates under a DReLU budget; the original is left untouched.

    ``example_input`` is a tensor with a batch dimension or an input size (C, H, W); the
    settings come as a :class:`ConversionSettings` or as its fields in keyword ``options``
    (``convert(model, (3, 32, 32), budget="12k", group_size=2)``).
    """
    input_size = (
        tuple(example_input.shape[1:]) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    )
    plan = build_plan(model, input_size, settings, snl_counts=snl_counts, spec=spec, **options)
    return Converted(apply_plan(model, plan), plan)


def _unconvertible(sites) -> set[str]:
    """Sites of activation kinds without a DReLU decomposition: counted, kept as they are."""
    return {s.name for s in sites if not get_activation(s.activation).convertible}


def apply_plan(model: nn.Module, plan: Plan) -> fx.GraphModule:
    """Trace a copy of ``model`` and replace the plan's sites by shared gates (or SNL masks)."""
    if (kind := registered_plan_kind(plan.kind)) is not None:  # e.g. "snl" (registered in __init__.py)
        return kind.apply(model, plan)
    gm = trace(copy.deepcopy(model), plan.leaf_modules)
    gm.eval()
    propagate_shapes(gm, example_input(plan.input_size, gm))
    return SharedGatePass(plan)(gm).graph_module


class SharedGatePass(SiteRewrite):
    """The DeepShare rewrite of a shape-propagated graph: one PrototypeGate per group, one
    SharedGate per site. Requires the plan's sites (names, shapes) in the graph; ensures the
    converted census equals the plan's DReLUs."""

    holders = (GATES_ATTR, SITES_ATTR)

    def __init__(self, plan: Plan):
        self.plan = plan

    def requires(self, gm: fx.GraphModule) -> None:
        _check_sites_match(gm, self.plan)
        super().requires(gm)

    def call(self, gm: fx.GraphModule) -> PassResult:
        plan = self.plan
        self.add_holders(gm)
        graph = gm.graph
        modules = dict(gm.named_modules())
        nodes = {n.name: n for n in graph.nodes}
        for g in plan.groups:
            leader = nodes[g.leader]
            gate_name = f"g{g.index}"
            getattr(gm, GATES_ATTR).add_module(
                gate_name,
                PrototypeGate(g.channels, g.prototypes, torch.tensor(g.mapping, dtype=torch.long), mode=plan.gate,
                              gamma=plan.gamma),
            )
            with graph.inserting_before(leader):
                gate = graph.call_module(f"{GATES_ATTR}.{gate_name}", (activation_input(leader),))
            upper = {site for site in g.sites[1:] if _upper_gate_of(nodes[site], leader)}
            for site in g.sites:
                shared = _replace_site(gm, nodes[site], gate, g.channels, plan.gate, modules)
                if g.prototypes == 0:  # a linear group: y = beta * x, from the identity (SNL's linearised unit)
                    shared.beta.data.fill_(1.0)
                if site in upper:
                    _drop_clip(shared)
        gm.recompile()
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        super().ensures(gm)
        _check_census(gm, self.plan)


def _replace_site(gm, node: fx.Node, gate: fx.Node, channels: int, mode: str, modules) -> SharedGate:
    """Swap one activation node for a SharedGate call; honour in-place semantics for later readers."""
    shared = SharedGate(channels)
    shared.mode = mode
    getattr(gm, SITES_ATTR).add_module(node.name, shared)
    swap_site(gm, node, f"{SITES_ATTR}.{node.name}", modules, extra_args=(gate,))
    return shared


def _upper_gate_of(node: fx.Node, leader: fx.Node) -> bool:
    """Is ``node`` the upper gate of a ReLU6 / Hardtanh, ``relu(t - leader)``, sharing its lower gate's group?"""
    gap = activation_input(node)
    return (node.meta.get(ORIGIN_META) in ("relu6", "hardtanh") and gap.op == "call_function"
            and gap.target is operator.sub and len(gap.args) == 2 and gap.args[1] is leader)  # fmt: skip


def _drop_clip(shared: SharedGate) -> None:
    """Start the upper gate at α = 0, β = 1: with the lower gate's bit g = DReLU(x), the upper bit
    [x <= t] is 1 wherever x < 0 or 0 <= x <= t, so α·g + β = 1 is its best fit: the clip starts
    dropped (y = relu(x)) and retraining learns the affine."""
    with torch.no_grad():
        shared.alpha.zero_()
        shared.beta.fill_(1.0)


def _check_sites_match(gm: fx.GraphModule, plan: Plan) -> None:
    found = {s.name: s for s in find_sites(gm)}
    for g in plan.groups:
        for name in g.sites:
            site = found.get(name)
            if site is None:
                raise PlanError(f"plan site {name!r} is not a ReLU of this model (plan for another model?)")
            if list(site.shape) != list(g.shape):
                raise PlanError(f"plan site {name!r} has shape {list(site.shape)} here, {g.shape} in the plan")


def _check_census(gm: fx.GraphModule, plan: Plan) -> None:
    """Post-condition: the converted model's comparisons are exactly the plan's."""
    counted = census(gm, plan.input_size).total_relus
    if counted != plan.achieved:
        raise PlanError(f"internal: converted census {counted:,} != plan {plan.achieved:,} DReLUs")


# ---- save / load ------------------------------------------------------------------------------
def save(converted: Converted | fx.GraphModule, out: str | os.PathLike, plan: Plan | None = None) -> Path:
    """Write ``OUT/plan.json`` and ``OUT/model.safetensors`` (atomically, no pickles)."""
    from .plan import save_tensors_atomic

    gm, plan = (converted.model, converted.plan) if isinstance(converted, Converted) else (converted, plan)
    if plan is None:
        raise DeepShareError("save needs the plan of the converted model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(gm, out / WEIGHTS_FILE)
    plan.save(out)
    return out


def save_new(converted: Converted, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a new converted-model directory: refused if ``out`` is not empty, unless ``force``.

    The files are written into a temp sibling and renamed into place, so ``out`` never
    holds a plan from one conversion beside weights (or results) from another, even
    with two writers at once.
    """
    import shutil
    import tempfile

    from ..outputs import check_fresh_dir, publish_dir

    out = check_fresh_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        staged.chmod(0o755)
        save(converted, staged)
        publish_dir(staged, out, force=force)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def load(out: str | os.PathLike, *, trust_pickle: bool = False) -> Converted:
    """Rebuild a converted model from ``OUT/``: spec -> architecture -> replayed plan -> weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load_model

    from ..models import ModelSpec, load_model

    out = Path(out)
    plan = Plan.read(out)
    spec = ModelSpec.from_dict(plan.model) if "source" in plan.model else None
    if spec is None or spec.source == "python":
        raise PlanError(f"{out / PLAN_FILE} has no rebuildable model spec (converted from a Python object)")
    loaded = load_model(
        spec.display, num_classes=spec.num_classes, input_size=tuple(plan.input_size), trust_pickle=trust_pickle
    )
    gm = apply_plan(loaded.model, plan)
    weights = out / WEIGHTS_FILE
    if not weights.is_file():
        raise PlanError(f"{out} has no {WEIGHTS_FILE}")
    try:
        missing, unexpected = st_load_model(gm, str(weights), strict=False)
    except (SafetensorError, OSError) as e:
        raise PlanError(f"{weights} is not a readable safetensors file: {e}") from None
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()
        raise PlanError(f"{weights} does not fit the plan's model: {first[-1].strip() if first else e}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PlanError(f"{weights} does not fit the plan's model: {what}")
    if (kind := registered_plan_kind(plan.kind)) is not None and kind.check_loaded is not None:
        kind.check_loaded(gm, plan, weights)  # e.g. SNL: the weights' bool masks keep the plan's ReLUs
    for g in plan.groups:
        if getattr(gm, GATES_ATTR).get_submodule(f"g{g.index}").mapping.tolist() != g.mapping:
            raise PlanError(f"{weights} does not fit the plan: group {g.index} was saved with another mapping")
    gm.eval()
    return Converted(gm, plan, loaded.mean, loaded.std)
