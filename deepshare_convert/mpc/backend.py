"""The seam between the framework-neutral side of private inference and the MPC framework.

Everything up to a :class:`~.lowering.Program` -- preparing the deployed model, lowering it,
the cost model -- and everything around a party -- which process holds what, spawning,
collecting reports, the plaintext reference, the CLI -- knows nothing of CrypTen.  What does
is a :class:`Backend`: at one party it joins the two-party session, runs a Program on secret
shares (share the input, execute each op by its ``handler``, reveal the output to party 1)
and says what crossed the wire.  :class:`~.executor.CrypTenBackend` is the one implementation.

A second framework would be one more subclass, passed as ``backend=`` to the launcher's
:func:`~.launcher.run_two_party` / :func:`~.launcher.run_party`; the lowering and the CLI stay
as they are.  Its counts would have to match the lowering's (the tests check CrypTen's to the
byte), or the cost table be recalibrated for it.

``run`` is one call, not share / execute / reveal, because the counters are read around the
whole online phase: a backend that exposed the steps separately would still have to report
one set of totals.  ``setup`` is the one step kept apart: in ``private`` mode it masks the
model's weights once per loaded program, and every later ``run`` of that program reuses it
(a backend with nothing to set up keeps the default, which costs nothing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .lowering import Program

__all__ = ["Backend", "NodeStats", "PartyRun", "SetupRun"]


@dataclass
class NodeStats:
    """What one node (or the input sharing / output reveal) cost at one party, as measured."""

    bytes: int = 0
    rounds: int = 0
    seconds: float = 0.0
    comparisons: int = 0


@dataclass
class SetupRun:
    """One party's setup of a Program (private mode: every fixed weight's ``W - b`` opened once)."""

    bytes: int = 0
    rounds: int = 0
    wall_s: float = 0.0
    elements: int = 0  # model-tensor elements masked
    offline_bytes: int = 0  # dealer -> this party (corrections): none at setup, the masks are seeded
    offline_messages: int = 0


@dataclass
class PartyRun:
    """One party's run of a Program: the revealed output (party 1 only) and what it measured."""

    output: Any  # plaintext output tensor at party 1, None at party 0
    bytes: int  # sent + received by this party, the online phase
    rounds: int
    wall_s: float
    comm_s: float
    comparisons: int  # elements that went through the secure comparison
    per_node: dict[str, NodeStats] = field(default_factory=dict)
    setup: SetupRun | None = None  # the setup this run had to do first (None: it reused an earlier one)
    offline_bytes: int = 0  # dealer -> this party for this run (corrections), the offline phase
    offline_messages: int = 0
    offline_s: float = 0.0  # waiting for and reading them
    dealer: str = "separate"  # "separate" (a third process dealt) or "simulated" (party 0 sampled)


class Backend(ABC):
    """An MPC framework as one party uses it: ``start`` -> [``setup``] -> ``run`` (any number) -> ``stop``.

    Instances travel to spawned party processes, so they must pickle before ``start``.
    """

    name: str = ""

    @abstractmethod
    def start(self, rank: int, master_addr: str, master_port: int) -> None:
        """Join the two-party session as party ``rank`` (0: model owner, 1: input owner)."""

    def attach_dealer(self, link) -> None:
        """Take this party's authenticated :class:`~.dealer.channel.DealerLink` (before ``setup``)."""
        raise NotImplementedError(f"the {self.name} backend has no dealer support")

    @abstractmethod
    def run(self, program: Program, x: torch.Tensor | None) -> PartyRun:
        """Share ``x`` (party 1's input; None at party 0), execute ``program``, reveal to party 1."""

    def setup(self, program: Program) -> SetupRun:
        """Prepare ``program`` once for any number of runs (counted apart from them); default: nothing."""
        return SetupRun()

    @abstractmethod
    def stop(self) -> None:
        """Leave the session; the process may start another one afterwards."""
