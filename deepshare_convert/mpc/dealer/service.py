"""The dealer as a process: accept the two parties, then deal each inference ahead of it.

A session is: :func:`~.channel.accept_parties` (authenticated key exchange with both, the plan
hash checked by all three), the setup pass (private mode: the weight masks, seeded at both
parties, so nothing is sent), then for each inference one dry pass (:mod:`.dry_run`) and one
encrypted message of corrections to the client.  The dealer never connects to the parties'
own channel and never holds an opening, an input or a weight.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from ...errors import DeepShareError
from .dry_run import dry_crypten
from .provider import use
from .randomness import DealingView

__all__ = ["DealerReport", "deal_session"]


@dataclass
class DealerReport:
    """What the dealer sent (the offline phase), per party and per inference."""

    bytes: dict[int, int] = field(default_factory=dict)  # party -> correction payload bytes
    messages: dict[int, int] = field(default_factory=dict)
    inferences: list[dict[str, float]] = field(default_factory=list)  # bytes, deal_s of each
    setup_bytes: int = 0
    wall_s: float = 0.0
    dealt_digests: set[str] = field(default_factory=set)  # threat-model tests: every uniform value dealt

    def to_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "messages": dict(self.messages), "inferences": self.inferences,
                "setup_bytes": self.setup_bytes, "wall_s": round(self.wall_s, 4)}  # fmt: skip


def deal_session(program, link0, link1, count: int, *, record: bool = False, probe=None,
                 lock: threading.Lock | None = None) -> DealerReport:  # fmt: skip
    """Deal one setup and ``count`` inferences of ``program`` to the parties behind ``link0`` / ``link1``.

    ``record`` / ``probe``: for the threat-model tests (digests of what was dealt; a call after every node).
    ``lock``: held around each dry pass (CrypTen's state is one per process: a dealer serving many
    sessions deals one pass at a time, and sends outside the lock, so a slow client stalls only itself).
    """
    from ..executor import run_program
    from ..weights import setup_weights

    tic = time.perf_counter()
    view = DealingView(link0.seed, link1.seed)
    if record:
        view.dealt_digests = set()
    report = DealerReport()
    held = lock or contextlib.nullcontext()
    with held, dry_crypten(), use(view), torch.no_grad():
        masks = setup_weights(program, 0, view)
        if view.take_corrections().numel():
            raise DeepShareError("the setup asked for dealt products: the dealer has no setup message")
    for _ in range(count):
        t = time.perf_counter()
        with held, dry_crypten(), use(view), torch.no_grad():
            run_program(program, 0, None, view, masks, probe)
            flat = view.take_corrections()
        deal_s = time.perf_counter() - t
        link1.send(flat)
        report.inferences.append({"bytes": int(flat.numel() * 8), "deal_s": deal_s})
    report.bytes = {0: link0.bytes, 1: link1.bytes}
    report.messages = {0: link0.messages, 1: link1.messages}
    report.wall_s = time.perf_counter() - tic
    report.dealt_digests = set(view.dealt_digests or ())
    return report
