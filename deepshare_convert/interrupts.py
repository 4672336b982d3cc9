"""Ctrl-C during training stops at a step boundary, never inside a step.

A SIGINT that lands inside a forward pass has already moved BatchNorm running
statistics (and may land inside ``optimizer.step``), so state saved there cannot be
resumed bit-exactly.  While :func:`deferred_sigint` is active, SIGINT only sets a
flag; the training loop polls :func:`requested` after each complete step and
checkpoints there.  A second Ctrl-C aborts at once (the last checkpoint stays the
resume point, as after SIGKILL).  Light on purpose: the CLI enters it before its
heavy imports, so an early Ctrl-C is not lost either.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["deferred_sigint", "requested", "clear", "send_sigint"]

_pending = False
_depth = 0


def requested() -> bool:
    """True once a Ctrl-C arrived inside :func:`deferred_sigint` and was not yet acted on."""
    return _pending


def clear() -> None:
    """Forget a pending Ctrl-C (the loop acted on it)."""
    global _pending
    _pending = False


def send_sigint() -> None:
    """Tests: deliver a real SIGINT to this process (the handler a Ctrl-C would reach)."""
    if signal.getsignal(signal.SIGINT) is _on_sigint:
        os.kill(os.getpid(), signal.SIGINT)
    else:
        raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    global _pending
    if _pending:  # the second Ctrl-C: stop now, keep the last checkpoint
        raise KeyboardInterrupt
    _pending = True
    print("deepshare: interrupt received; stopping after the current step (Ctrl-C again to abort now)",
          file=sys.stderr)  # fmt: skip


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Defer SIGINT to the next step boundary (re-entrant; a no-op off the main thread)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT) if _depth == 0 else None
    if _depth == 0:
        if previous is signal.SIG_IGN:  # e.g. a background job: nothing to defer
            yield
            return
        _pending = False
        signal.signal(signal.SIGINT, _on_sigint)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGINT, previous)
            _pending = False
