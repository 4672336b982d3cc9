"""SNL (Selective Network Linearization, Cho et al., ICML 2022): the mask search and the SNL baseline.

One module, two uses:

* **budgets for DeepShare** -- the search decides neuron by neuron which ReLUs a
  model needs under a budget; the per-site counts (``snl_counts.json``) feed
  ``deepshare convert --allocator snl`` (paper Sec. 3.2);
* **the SNL baseline** -- the binarised, finetuned network, saved like a converted
  model (plan + safetensors), so DeepShare and SNL are compared at the same budget
  with the same census.

The algorithm, as the public SNL code runs it:

1. every activation site gets a mask ``m`` of its shape, initialised to 1, and
   computes ``m * relu(x) + (1 - m) * x`` (a neuron with m = 0 is linear);
2. all parameters train with Adam (lr 1e-3) on CE + KD (T = 4, teacher = the
   original model) + ``lambda * sum|m|``; SNL's lambda starts at 1e-5 and, after a few
   warm-up epochs, grows x1.1 whenever the live count ``#(m > 1e-2)`` is not a new
   minimum; the search stops as soon as the count is within the budget;
3. binarise (``m > 1e-2``), freeze, and finetune with SGD (lr 1e-3, momentum 0.9,
   weight decay 5e-4, cosine), CE + KD.

Both stages run on the project's one training loop (:class:`~.training.engine.Trainer`):
the search is the :class:`SNLSearch` hooks, so checkpoints, Ctrl-C and ``--resume``
work as for retraining.  The masks are put in by an fx pass that mirrors
:func:`~.rewrite.apply_plan`, one :class:`MaskedReLU` per census site, named after it.

Output directory::

    OUT/snl_run.json         the resolved settings (what --resume continues)
    OUT/checkpoint.pt        the engine's last checkpoint (weights, masks, Adam state, lambda)
    OUT/metrics.jsonl        one line per epoch (live count, lambda, accuracies)
    OUT/snl_counts.json      kept ReLUs per site, lambda trajectory -> convert --allocator snl
    OUT/search.safetensors   the masked model at the end of the search (float masks)
    OUT/plan.json, OUT/model.safetensors   the SNL-linearised model (``rewrite.load`` reads it)
    OUT/results.json         accuracies, counts, epochs, steps, wall times
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .activations import get_activation
from .errors import BudgetError, DeepShareError, PlanError
from .outputs import check_output_dir
from .plan import PLAN_FILE, WEIGHTS_FILE, Plan, save_tensors_atomic, write_json_atomic
from .tracing import census, check_leaf_names, example_input, find_sites, model_dtype, propagate_shapes, register_leaf_module, trace
from .interrupts import deferred_sigint
from .training.engine import CHECKPOINT, METRICS, PhaseHooks, PhaseSpec, Reporter, Trainer, resume_state_or_restart

__all__ = [
    "MaskedReLU",
    "SNLSearch",
    "SNLConfig",
    "SNLResult",
    "mask_relus",
    "masked_relus",
    "kept_counts",
    "binarise",
    "snl_plan",
    "apply_snl_plan",
    "check_kept",
    "run_snl",
    "resume_snl",
    "COUNTS_FILE",
    "COUNTS_FORMAT",
]

THRESHOLD = 1e-2  # a mask above this is a live ReLU (SNL's threshold)
MASKS_ATTR = "snl_masks"
RUN_FILE = "snl_run.json"
COUNTS_FILE = "snl_counts.json"
COUNTS_FORMAT = "deepshare-snl-counts/1"
SEARCH_WEIGHTS = "search.safetensors"
RESULTS_FILE = "results.json"
DEFAULT_MAX_EPOCHS = 200
# How lambda moves (``--lambda-policy``): start, growth, warm-up epochs, masks' lr multiple, budget checks.
#   faithful: SNL's code -- 1e-5, x1.1 only when the count stalls, after 5 epochs, masks at the model's lr,
#             the budget checked at epoch ends;
#   fast (default): 1e-3 (near the masks' gradient noise), x1.25 after every epoch still above the budget
#             from the second epoch on, masks at 5x the lr, the budget checked after every step -- so a
#             search ends in tens of epochs, not hundreds (digits CNN at 10%: 20 epochs).
LAMBDA_POLICIES = {
    "fast": {"lam": 1e-3, "lam_growth": 1.25, "warmup_epochs": 1, "mask_lr_scale": 5.0, "check_every": 1},
    "faithful": {"lam": 1e-5, "lam_growth": 1.1, "warmup_epochs": 5, "mask_lr_scale": 1.0, "check_every": None},
}
SEARCH, FINETUNE = 0, 1  # phase indices in the engine's checkpoints


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

    Mirrors :func:`~.rewrite.apply_plan`: the caller's model is untouched, each
    mask is the submodule ``snl_masks.<site name>`` (so counts carry the census'
    names), in-place ReLUs keep their meaning for later readers, the graph is
    linted and recompiled, and the census of the result must show the same sites
    with every neuron live -- with all masks at 1 it computes what the model did.
    """
    from .rewrite import swap_relu

    gm = trace(copy.deepcopy(model), leaf_modules)
    gm.eval()
    propagate_shapes(gm, example_input(input_size, gm))
    sites = find_sites(gm)
    if any(s.kind in ("gate", MaskedReLU.site_kind) for s in sites):
        raise DeepShareError("the model is already converted or linearised; SNL starts from the original model")
    if not sites:
        raise DeepShareError("the model has no ReLU activation sites to linearise")
    odd = next((s for s in sites if not get_activation(s.activation).convertible), None)
    if odd is not None:
        raise DeepShareError(f"SNL masks activations of the form x*DReLU(x); site {odd.name!r} is a "
                             f"{odd.activation!r} activation")  # fmt: skip
    if hasattr(gm, MASKS_ATTR):
        raise PlanError(f"model already has an attribute {MASKS_ATTR!r} (masked twice?)")
    holder = nn.Module()
    gm.add_module(MASKS_ATTR, holder)
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    dtype = model_dtype(gm)
    for site in sites:
        holder.add_module(site.name, MaskedReLU(site.shape, binary=binary, threshold=threshold, dtype=dtype))
        swap_relu(gm, nodes[site.name], f"{MASKS_ATTR}.{site.name}", modules)
    gm.graph.lint()
    gm.recompile()
    _check_masked(gm, input_size, sites, leaf_modules)
    return gm


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


# ---- the linearised model as a plan ------------------------------------------------------------------
def snl_plan(model_census, counts: dict[str, int], *, spec: dict[str, Any], budget: int, budget_requested: str,
             leaf_modules: Sequence[str] = ()) -> Plan:  # fmt: skip
    """The replayable record of an SNL-linearised model: which sites, how many ReLUs each keeps.

    Which neurons stay is data (a bool tensor per site), so it lives in
    ``model.safetensors``; the plan holds the counts that the loaded weights
    must reproduce.
    """
    return Plan(
        model=spec, input_size=list(model_census.input_size), total_relus=model_census.total_relus,
        budget_requested=str(budget_requested), budget=budget, allocator="snl", group_size=1, gate="step",
        gamma=1.0, sites=[s.to_dict() for s in model_census.sites], groups=[], kept=[],
        hidden_relus=model_census.hidden_relus, leaf_modules=list(leaf_modules), kind="snl", snl_kept=dict(counts),
    )  # fmt: skip


def apply_snl_plan(model: nn.Module, plan: Plan) -> fx.GraphModule:
    """Rebuild an SNL plan's graph on ``model``: binarised masks at its sites (the weights fill them)."""
    gm = mask_relus(model, plan.input_size, leaf_modules=plan.leaf_modules, binary=True)
    masks = masked_relus(gm)
    if list(masks) != list(plan.snl_kept):
        missing = next((s for s in plan.snl_kept if s not in masks), None) or next(s for s in masks)
        raise PlanError(f"SNL plan site {missing!r} does not match this model's ReLU sites (plan for another model?)")
    shapes = {s["name"]: list(s["shape"]) for s in plan.sites}
    for name, m in masks.items():
        if list(m.shape) != shapes.get(name):
            raise PlanError(f"SNL plan site {name!r} has shape {shapes.get(name)}, the model {list(m.shape)}")
    return gm


def check_kept(gm: nn.Module, plan: Plan, weights: Path | str) -> None:
    """After loading: the weights' masks must keep exactly the plan's ReLUs at every site."""
    for name, kept in kept_counts(gm).items():
        if kept != plan.snl_kept[name]:
            raise PlanError(f"{weights} does not fit the plan: site {name!r} keeps {kept:,} ReLUs, "
                            f"the plan says {plan.snl_kept[name]:,}")  # fmt: skip


# ---- the search as loop hooks -------------------------------------------------------------------------
class SNLSearch(PhaseHooks):
    """SNL's search inside the engine: the L1 mask penalty, the lambda schedule, the stop at the budget.

    ``budget`` counts mask ReLUs (hidden ReLUs are taken off by the caller).
    The count is checked at every epoch end and, with ``check_every=K``, every K
    steps too, so a small model stops as soon as it is within budget.  Lambda,
    the best count and the trajectories are checkpointed with the engine's
    state, so a resumed search continues exactly.
    """

    def __init__(self, budget: int, *, lam: float = 1e-5, growth: float = 1.1, warmup_epochs: int = 5,
                 check_every: int | None = None, grow_while_above: bool = False):  # fmt: skip
        self.budget = int(budget)
        self.grow_while_above = grow_while_above  # fast policy: grow after every epoch above budget, not on stalls
        self.lam, self.growth, self.warmup_epochs, self.check_every = float(lam), growth, warmup_epochs, check_every
        self.best: int | None = None  # lowest live count so far (starts at the model's count)
        self.lambdas: list[float] = []  # lambda used in each epoch
        self.lives: list[int] = []  # live count at the end of each epoch
        self.reached = False
        self.steps = 0  # steps done in the phase
        self.epoch_start_step = 0  # steps done when the current epoch began
        self.train_seconds = 0.0
        self._masks: list[MaskedReLU] = []

    def on_phase_start(self, model: nn.Module) -> None:
        self._masks = list(masked_relus(model).values())
        if self.best is None:
            self.best = self.live()

    def live(self) -> int:
        """Neurons with ``m > threshold`` now."""
        return sum(int(m.live().sum()) for m in self._masks)

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.lam * sum(m.mask.abs().sum() for m in self._masks)

    def after_step(self, model: nn.Module, steps_done: int) -> bool:
        self.steps = steps_done
        if self.check_every and steps_done % self.check_every == 0 and self.live() <= self.budget:
            self.reached = True
        return self.reached

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> bool:
        if self.steps == self.epoch_start_step:  # an epoch without steps (a cap already met) changes nothing
            return self.reached
        self.epoch_start_step = self.steps
        live = self.live()
        self.lambdas.append(self.lam)
        self.lives.append(live)
        self.train_seconds += float(metrics.get("epoch_seconds", 0.0))
        if live <= self.budget:
            self.reached = True
            return True
        stalled = live >= self.best
        self.best = min(self.best, live)
        if epoch >= self.warmup_epochs and (stalled or self.grow_while_above):
            self.lam *= self.growth
        return self.reached

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        used = self.lambdas[-1] if self.lambdas else self.lam
        return {"live": self.live(), "budget": self.budget, "lambda": used}

    _STATE = ("lam", "best", "lambdas", "lives", "reached", "steps", "epoch_start_step", "train_seconds")

    def state_dict(self) -> dict[str, Any]:
        return {k: copy.copy(getattr(self, k)) for k in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._STATE:
            setattr(self, k, copy.copy(state[k]))


def _mask_groups(scale: float):
    """Masks in their own Adam group at ``scale`` x the lr (None at 1: one group, as SNL's code has it).

    Adam moves a parameter by about lr per step whatever lambda is, so at lr 1e-3 a mask
    needs ~1,000 steps to fall from 1 to the 1e-2 threshold; 10x makes that ~100.
    """
    if scale == 1.0:
        return None

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        masks = {id(m.mask) for m in masked_relus(model).values()}
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in masks]},
                {"params": [p for p in params if id(p) in masks], "lr_scale": scale}]  # fmt: skip

    return groups


class _SearchReporter:
    """Adds the live count, the budget and lambda to each step's info, for the progress bar."""

    def __init__(self, inner: Reporter, hooks: SNLSearch):
        self.inner, self.hooks = inner, hooks

    def start(self, name: str, total: int, done: int = 0) -> None:
        self.inner.start(name, total, done)

    def advance(self, info: dict[str, Any]) -> None:
        self.inner.advance({**info, "live": self.hooks.live(), "budget": self.hooks.budget, "lambda": self.hooks.lam})

    def epoch(self, info: dict[str, Any]) -> None:
        self.inner.epoch(info)

    def stop(self) -> None:
        self.inner.stop()


# ---- the job: settings, run, resume ----------------------------------------------------------------------
@dataclass
class SNLConfig:
    """Everything a run needs; saved as ``OUT/snl_run.json`` so ``--resume`` continues it.

    Caps: ``max_epochs`` and/or ``max_steps`` (whichever comes first; neither
    means ``DEFAULT_MAX_EPOCHS``).  Only the caps and ``finetune_epochs`` may
    change on resume.
    """

    model: str
    data: str
    budget: str
    weights: str | None = None
    num_classes: int | None = None
    input_size: list[int] | None = None
    leaf_modules: list[str] = field(default_factory=list)
    pretrained: bool = False
    trust_pickle: bool = False  # never saved: a resumed run asks for --trust-pickle again
    max_epochs: int | None = None
    max_steps: int | None = None
    finetune_epochs: int = 0
    seed: int = 0
    batch_size: int = 128
    limit: int | None = None
    test_limit: int | None = None
    eval_batch_size: int = 256
    check_every: int | None = None
    lambda_policy: str = "fast"
    lam: float | None = None  # None: the policy's (see LAMBDA_POLICIES); so are growth, warm-up, mask lr
    lam_growth: float | None = None
    warmup_epochs: int | None = None
    mask_lr_scale: float | None = None
    threshold: float = THRESHOLD
    lr: float = 1e-3
    finetune_lr: float = 1e-3
    temperature: float = 4.0
    augment: bool = True

    RESUMABLE = ("max_epochs", "max_steps", "finetune_epochs")

    def validate(self) -> "SNLConfig":
        """One-line errors for settings that cannot run; fills the default cap."""
        positive = {"max_epochs": self.max_epochs, "max_steps": self.max_steps, "batch_size": self.batch_size,
                    "limit": self.limit, "test_limit": self.test_limit, "check_every": self.check_every}  # fmt: skip
        for name, value in positive.items():
            if value is not None and value < 1:
                raise DeepShareError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.finetune_epochs < 0:
            raise DeepShareError(f"--finetune-epochs must be 0 or more, got {self.finetune_epochs}")
        if self.lambda_policy not in LAMBDA_POLICIES:
            raise DeepShareError(f"--lambda-policy must be one of {', '.join(LAMBDA_POLICIES)}, "
                                 f"got {self.lambda_policy!r}")  # fmt: skip
        for key, value in LAMBDA_POLICIES[self.lambda_policy].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if not (self.lam > 0 and self.lam_growth >= 1 and self.threshold >= 0 and self.warmup_epochs >= 0
                and self.mask_lr_scale > 0):  # fmt: skip
            raise DeepShareError("SNL needs lambda > 0, growth >= 1, threshold >= 0 and warm-up epochs >= 0")
        if self.max_epochs is None and self.max_steps is None:
            self.max_epochs = DEFAULT_MAX_EPOCHS
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("trust_pickle")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SNLConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DeepShareError(f"{RUN_FILE} has an unknown setting {unknown[0]!r} (written by another version?)")
        d = dict(d)
        if "lambda_policy" not in d:  # written before the policies: it ran SNL's own schedule
            d.update(lambda_policy="faithful", mask_lr_scale=1.0)
        return cls(**d)

    def cap_text(self) -> str:
        caps = [f"--max-epochs {self.max_epochs}" if self.max_epochs else "",
                f"--max-steps {self.max_steps}" if self.max_steps else ""]  # fmt: skip
        return " / ".join(c for c in caps if c)


@dataclass
class SNLResult:
    """Where the run wrote its files, the per-site counts, and every number it measured."""

    out: Path
    counts: dict[str, int]
    results: dict[str, Any]

    @property
    def reached(self) -> bool:
        return bool(self.results.get("reached"))


def run_snl(config: SNLConfig, out: str | Path, *, reporter: Reporter | None = None,
            fail_at_step: int | None = None) -> SNLResult:  # fmt: skip
    """Run the search (and the finetune, with ``finetune_epochs``) into ``out`` from scratch."""
    config.validate()
    out = check_output_dir(out)
    if (out / CHECKPOINT).exists():
        raise DeepShareError(f"{out} already holds a run; continue it with --resume {out}, or choose another -o")
    if config.weights is not None and Path(config.weights).is_file():
        config.weights = str(Path(config.weights).resolve())  # a resume from elsewhere still finds them
    with deferred_sigint():  # a Ctrl-C during setup stops at the first step boundary, resumably
        job = _Job(config, out, reporter, fail_at_step)  # checks model, data and budget before writing anything
        write_json_atomic(out / RUN_FILE, config.to_dict())
        return job.run(None)


def resume_snl(out: str | Path, *, changes: dict[str, Any] | None = None, reporter: Reporter | None = None,
               fail_at_step: int | None = None) -> SNLResult:  # fmt: skip
    """Continue the run in ``out`` from its last checkpoint; ``changes`` may raise the caps.

    A setting other than the caps that differs from the run's is an error: the
    checkpoint only makes sense with the data, budget and seed it was made with.
    """
    out = Path(out)
    path = out / RUN_FILE
    if not path.is_file():
        raise DeepShareError(f"{out} holds no {RUN_FILE}: not an SNL run directory")
    config = SNLConfig.from_dict(json.loads(path.read_text()))
    config.trust_pickle = bool((changes or {}).get("trust_pickle"))
    for key, value in (changes or {}).items():
        if key == "trust_pickle":
            continue
        if key == "weights" and value is not None and Path(value).is_file():
            value = str(Path(value).resolve())
        if value is None or value == getattr(config, key):
            continue
        if key not in SNLConfig.RESUMABLE:
            flag = {"lam": "lambda"}.get(key, key).replace("_", "-")
            raise DeepShareError(f"--{flag} {value} differs from the run in {out} "
                                 f"({getattr(config, key)}); on --resume only --max-epochs, --max-steps and "
                                 "--finetune-epochs may change")  # fmt: skip
        setattr(config, key, value)
    config.validate()
    state = resume_state_or_restart(out, partial=(METRICS, RESULTS_FILE, COUNTS_FILE, PLAN_FILE, WEIGHTS_FILE))
    with deferred_sigint():
        job = _Job(config, out, reporter, fail_at_step)  # no checkpoint yet (killed early): state None, a fresh start
        write_json_atomic(path, config.to_dict())
        return job.run(state)


def _save_tensors(model: nn.Module, path: Path) -> None:
    save_tensors_atomic(model, path)


class _Job:
    """One SNL run: the original (teacher), the masked student, loaders and the trainer."""

    def __init__(self, config: SNLConfig, out: Path, reporter: Reporter | None, fail_at_step: int | None):
        from .budget import parse_budget
        from .data import load_dataset
        from .models import load_model

        self.config, self.out, self.reporter = config, out, reporter
        torch.manual_seed(config.seed)
        self.info, self.train_split, self.test_split = load_dataset(config.data)
        size = tuple(config.input_size) if config.input_size else self.info.input_size
        if tuple(size) != tuple(self.info.input_size):
            raise DeepShareError(f"--input-size {','.join(map(str, size))} does not match {config.data}'s images "
                                 f"({','.join(map(str, self.info.input_size))})")  # fmt: skip
        self.loaded = load_model(config.model, weights=config.weights, num_classes=config.num_classes,
                                 input_size=tuple(size), trust_pickle=config.trust_pickle,
                                 pretrained=config.pretrained)  # fmt: skip
        check_leaf_names(self.loaded.model, config.leaf_modules)
        self.input_size = tuple(self.loaded.input_size)
        self.original = self.loaded.model.eval()
        self._check_classes()
        self.mean, self.std = self.loaded.mean or self.info.mean, self.loaded.std or self.info.std
        self.census = census(self.original, self.input_size, name=self.loaded.spec.display,
                             leaf_modules=config.leaf_modules)  # fmt: skip
        self.budget = parse_budget(config.budget, self.census.total_relus)
        if self.budget <= self.census.hidden_relus:
            raise BudgetError(f"budget {self.budget:,} does not cover the {self.census.hidden_relus:,} ReLUs "
                              "hidden inside leaf modules (SNL cannot mask them)")  # fmt: skip
        self.model = mask_relus(self.original, self.input_size, threshold=config.threshold,
                                leaf_modules=config.leaf_modules)  # fmt: skip
        self.trainer = Trainer(self.model, self._loader(self.train_split, train=True),
                               self._loader(self.test_split, train=False), out, fail_at_step=fail_at_step)  # fmt: skip
        self.results: dict[str, Any] = {}
        if (out / RESULTS_FILE).is_file():  # a resumed run keeps what it measured before
            self.results = json.loads((out / RESULTS_FILE).read_text())

    def _check_classes(self) -> None:
        """The model must take the data's images and have one output per class (a clear error now, not mid-run)."""
        try:
            with torch.no_grad():
                outputs = self.original(example_input(self.input_size, self.original, batch=2)).shape[-1]
        except RuntimeError as e:
            size = "x".join(map(str, self.input_size))
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DeepShareError(
                f"{self.config.model} cannot run on the {size} images of {self.config.data}: {first}"
            ) from None
        classes = self.info.num_classes
        if outputs != classes and not (outputs == 1 and classes == 2):
            raise DeepShareError(f"{self.config.model} has {outputs} outputs but {self.config.data} has {classes} "
                                 f"classes; pass --num-classes {classes} with weights trained for it")  # fmt: skip

    def _loader(self, split, *, train: bool):
        from .data import make_loader

        c = self.config
        return make_loader(split, self.info, train=train, batch_size=c.batch_size if train else c.eval_batch_size,
                           mean=self.mean, std=self.std, augment=c.augment if train else False,
                           limit=c.limit if train else c.test_limit, seed=c.seed)  # fmt: skip

    def accuracy(self, model: nn.Module) -> float:
        from .evaluate import evaluate

        return evaluate(model, self.trainer.test_loader).top1

    def note(self, **values: Any) -> None:
        """Record results as soon as they are known (a resumed run keeps them)."""
        self.results.update(values)
        write_json_atomic(self.out / RESULTS_FILE, self.results)

    # ---- the two phases ------------------------------------------------------------------------------
    def run(self, state: dict[str, Any] | None) -> SNLResult:
        if state is None:
            self.note(model=self.loaded.spec.display, data=self.config.data, total_relus=self.census.total_relus,
                      budget=self.budget, original_acc=self.accuracy(self.original))  # fmt: skip
        phase = state["phase"] if state else SEARCH
        if phase == SEARCH:
            counts = self.search(state)
            state = None
        else:
            counts = json.loads((self.out / COUNTS_FILE).read_text())["sites"]
        if not self.results["reached"]:
            return SNLResult(self.out, counts, self.results)
        return self.linearise(counts, state)

    def search(self, state: dict[str, Any] | None) -> dict[str, int]:
        c = self.config
        hooks = SNLSearch(self.budget - self.census.hidden_relus, lam=c.lam, growth=c.lam_growth,
                          warmup_epochs=c.warmup_epochs, check_every=c.check_every,
                          grow_while_above=c.lambda_policy == "fast")  # fmt: skip
        t0 = time.perf_counter()
        if state is not None and self._search_over(state, hooks):
            self.model.load_state_dict(state["model"])  # it ended before the interruption: nothing to rerun
            self.trainer.global_step = state["global_step"]
        else:
            if self.reporter is not None:
                self.trainer.reporter = _SearchReporter(self.reporter, hooks)
            spec = PhaseSpec(name="snl-search", epochs=c.max_epochs, steps=c.max_steps, lr_start=c.lr,
                             scheduler="none", optimizer="adam", ce_weight=1.0, kd_weight=1.0,
                             temperature=c.temperature, param_groups=_mask_groups(c.mask_lr_scale))  # fmt: skip
            self.trainer.run_phase(SEARCH, spec, hooks, self.original, resume=state)
        wall = self.results.get("search_wall_seconds", 0.0) + time.perf_counter() - t0
        return self._finish_search(hooks, wall)

    def _search_over(self, state: dict[str, Any], hooks: SNLSearch) -> bool:
        """Did the checkpointed search already end (budget reached, or a cap met)?"""
        hooks.load_state_dict(state["hooks"])
        c = self.config
        steps_done = state["global_step"] - state["extra"].get("phase_step0", 0)
        epochs_done = state["epoch"] if state["batch"] == 0 else -1  # -1: mid-epoch, that epoch is not done
        return (hooks.reached or bool(c.max_steps and steps_done >= c.max_steps)
                or bool(c.max_epochs and epochs_done >= c.max_epochs))  # fmt: skip

    def _finish_search(self, hooks: SNLSearch, wall: float) -> dict[str, int]:
        counts = kept_counts(self.model)
        kept = sum(counts.values())
        summary = {
            "format": COUNTS_FORMAT, "model": self.loaded.spec.to_dict(), "data": self.config.data,
            "input_size": list(self.input_size), "budget_requested": str(self.config.budget), "budget": self.budget,
            "total_relus": self.census.total_relus, "hidden_relus": self.census.hidden_relus, "kept": kept,
            "reached": hooks.reached, "epochs": len(hooks.lives), "steps": hooks.steps,
            "lambda_trajectory": hooks.lambdas, "live_trajectory": hooks.lives, "final_lambda": hooks.lam,
            "threshold": self.config.threshold, "seed": self.config.seed, "cap": self.config.cap_text(),
            "search_train_seconds": round(hooks.train_seconds, 3), "search_wall_seconds": round(wall, 3),
            "sites": counts, "site_relus": {s.name: s.relus for s in self.census.sites},
            "site_shapes": {s.name: list(s.shape) for s in self.census.sites},
        }  # fmt: skip
        write_json_atomic(self.out / COUNTS_FILE, summary)
        _save_tensors(self.model, self.out / SEARCH_WEIGHTS)
        self.note(reached=hooks.reached, kept_after_search=kept + self.census.hidden_relus,
                  search_epochs=summary["epochs"], search_steps=hooks.steps, final_lambda=hooks.lam,
                  search_wall_seconds=summary["search_wall_seconds"], masked_acc=self.accuracy(self.model),
                  cap=self.config.cap_text())  # fmt: skip
        return counts

    def linearise(self, counts: dict[str, int], state: dict[str, Any] | None) -> SNLResult:
        """Binarise, finetune (optionally), save as a plan + safetensors, and check the census."""
        c = self.config
        binarise(self.model)
        if state is None:
            self.note(binarised_acc=self.accuracy(self.model))
        t0 = time.perf_counter()
        if c.finetune_epochs:
            spec = PhaseSpec(name="snl-finetune", epochs=c.finetune_epochs, lr_start=c.finetune_lr, lr_end=0.0,
                             scheduler="cosine", optimizer="sgd", momentum=0.9, weight_decay=5e-4, ce_weight=1.0,
                             kd_weight=1.0, temperature=c.temperature)  # fmt: skip
            self.trainer.reporter = self.reporter or self.trainer.reporter
            self.trainer.run_phase(FINETUNE, spec, PhaseHooks(), self.original, resume=state)
        elif state is not None:
            self.model.load_state_dict(state["model"])
        plan = snl_plan(self.census, kept_counts(self.model), spec=self.loaded.spec.to_dict(), budget=self.budget,
                        budget_requested=c.budget, leaf_modules=c.leaf_modules)  # fmt: skip
        from .rewrite import save

        self.model.eval()
        save(self.model, self.out, plan=plan)
        counted = census(self.model, self.input_size, leaf_modules=c.leaf_modules).total_relus
        if counted != plan.achieved or counted > self.budget:
            raise PlanError(f"internal: the linearised model counts {counted:,} ReLUs, plan {plan.achieved:,}, "
                            f"budget {self.budget:,}")  # fmt: skip
        self.note(snl_acc=self.accuracy(self.model), snl_relus=counted, finetune_epochs=c.finetune_epochs,
                  finetune_wall_seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
        return SNLResult(self.out, counts, self.results)
