"""Two-party private inference of (converted) models with CrypTen.

Modules, in the order data flows through them:

* :mod:`.lowering`  -- fx graph -> MPC program: BatchNorm folding, step-mode gates, and one
  :class:`~.lowering.MPCOp` per node saying what it costs under MPC (or a one-line error
  naming the node CrypTen cannot run).  No crypten import: the cost model uses it too.
* :mod:`.protocols` -- the two-party protocols the executor adds on top of CrypTen (the
  masked-bit gate product, public-weight convolutions, the correlated-randomness dealer).
* :mod:`.executor`  -- an ``fx.Interpreter`` that runs the lowered graph on CrypTen tensors.
* :mod:`.launcher`  -- two real processes on 127.0.0.1 (or one party of a two-host run).
* :mod:`.costs`     -- bytes / rounds / latency per node from ``cost_table.json``; ``calibrate()``.

crypten is imported only inside functions of :mod:`.protocols`, :mod:`.executor`,
:mod:`.launcher` and :mod:`.costs` (via :func:`deepshare_convert.compat.import_crypten`),
never at package import.
"""

from __future__ import annotations

WEIGHT_MODES = ("private", "public")

__all__ = ["WEIGHT_MODES"]
