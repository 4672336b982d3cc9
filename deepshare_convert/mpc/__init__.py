"""Two-party private inference of (converted) models with CrypTen.

Modules, in the order data flows through them:

* :mod:`.prepare`   -- the deployed model: traced, gates in ``step`` mode, BatchNorm folded,
  weights on the fixed-point grid; :func:`~.prepare.strip_weights` for the input party.
* :mod:`.lowering`  -- fx graph -> MPC program: one :class:`~.lowering.MPCOp` per node saying
  what it costs under MPC (node -> handler tables, handler -> cost-rule table), or a one-line
  error naming the node no protocol can run.  No crypten import: the cost model uses it too.
* :mod:`.program`   -- the lowered program's types (:class:`~.program.MPCOp`, :class:`~.program.Program`).
* :mod:`.cost_rules` -- handler -> cost rule: elements compared / opened / revealed, rounds, MACs.
* :mod:`.transport` -- ``pack``/``unpack``: graph modules across the spawn boundary.
* :mod:`.backend`   -- the :class:`~.backend.Backend` seam: start a party, run a program on
  shares, reveal, report the traffic.  CrypTen is the one implementation.
* :mod:`.protocols` -- the two-party protocols the executor adds on top of CrypTen (the
  masked-bit gate product, public-weight convolutions, the correlated-randomness dealer).
* :mod:`.executor`  -- :class:`~.executor.CrypTenBackend`: an ``fx.Interpreter`` that runs the
  lowered graph on CrypTen tensors, plus CrypTen's start/stop and counters.
* :mod:`.local_ops`  -- the handlers that need no communication (public arithmetic, reshapes,
  pooling and resampling by public coefficients), a mixin of the interpreter.
* :mod:`.weights`   -- model tensors on shares: private-mode setup masks, public weights encoded
  once for the ring kernels, sharing a tensor or the input.
* :mod:`.handshake` -- before any share moves: both parties prove knowledge of a shared key
  (HMAC over fresh nonces) and compare the plan's hash; strangers are refused.
* :mod:`.launcher`  -- two real processes on 127.0.0.1 (or one party of a two-host run),
  framework-neutral: it drives whichever backend it is given, after the handshake.
* :mod:`.costs`     -- bytes / rounds / latency per node from ``cost_table.json`` (no MPC framework needed);
* :mod:`.calibrate` -- ``deepshare calibrate``: that table measured on CrypTen; :mod:`.units` -- --bandwidth / --rtt.
* :mod:`.rounds`    -- round depth: the fewest rounds any merging of independent openings could reach.
* :mod:`.what_if`   -- the same budget re-planned at group sizes 1, 2, 4 and costed (``--what-if``).

crypten is imported only inside functions of :mod:`.protocols`, :mod:`.executor`, :mod:`.weights` and
:mod:`.calibrate` (via :func:`deepshare_convert.compat.import_crypten`), never at package import.
"""

from __future__ import annotations

WEIGHT_MODES = ("private", "public")

__all__ = ["WEIGHT_MODES"]
