"""SNL (Selective Network Linearization, Cho et al., ICML 2022): the mask search and the SNL baseline.

One package, two uses:

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

Both stages run on the project's one training loop (:class:`~..training.engine.Trainer`):
the search is the :class:`SNLSearch` hooks, so checkpoints, Ctrl-C and ``--resume``
work as for retraining.  The masks are put in by an fx pass that mirrors
:func:`~..rewrite.apply_plan`, one :class:`MaskedReLU` per census site, named after it.

The modules, one concept each::

    masks.py    MaskedReLU and MaskPass, the fx pass that puts one at every site (mask_relus, kept_counts, binarise)
    plan.py     the SNL plan kind: snl_plan, apply_snl_plan, check_kept (rewrite reaches them via plan_kinds),
                load_masks (the public masks alone, for the input party of private inference)
    search.py   the search as loop hooks (SNLSearch), the lambda policies, the masks' lr group
    job.py      SNLConfig (snl_run.json), run_snl, resume_snl and the job that runs both stages

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

# Everything the one-module snl.py offered, by the same names (the private ones too: tests and bench use them).
from ..training.rundir import RESULTS_FILE  # noqa: F401
from .job import (  # noqa: F401
    COUNTS_FILE,
    COUNTS_FORMAT,
    DEFAULT_MAX_EPOCHS,
    FINETUNE,
    RUN_FILE,
    SEARCH,
    SEARCH_WEIGHTS,
    SNLConfig,
    SNLResult,
    _Job,
    resume_snl,
    run_snl,
)
from .masks import (  # noqa: F401
    MASKS_ATTR,
    THRESHOLD,
    MaskedReLU,
    MaskPass,
    _check_masked,
    binarise,
    kept_counts,
    mask_relus,
    masked_relus,
)
from .plan import apply_snl_plan, check_kept, load_masks, snl_plan  # noqa: F401
from .search import LAMBDA_POLICIES, SNLSearch, _mask_groups, _SearchReporter  # noqa: F401

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
    "load_masks",
    "run_snl",
    "resume_snl",
    "COUNTS_FILE",
    "COUNTS_FORMAT",
]
