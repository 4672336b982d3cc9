"""The dealer's pass over a program: the parties' calls replayed, so it deals exactly what they ask for.

Correlated randomness must be asked for in one order by the server, the client and the dealer.
The MPC program is oblivious -- which values it asks for depends on shapes, never on data --
so the dealer runs the same interpreter on the weightless graph with a :class:`DryCommunicator`
in place of the network: every "opening" returns the dealer's own garbage, nothing is sent,
and each request for randomness reaches the :class:`~.randomness.DealingView`, which computes
the product in the clear from both seeds and records the client's correction.  The dealer
therefore never sees an opening (there is none in its process) and needs no weights.
"""

from __future__ import annotations

import contextlib

import torch

from ...compat import import_crypten
from ..fixed_point import ACTIVATION_BITS

__all__ = ["dry_crypten", "DryCommunicator"]


def _communicator_class():
    import_crypten()
    from crypten.communicator.communicator import Communicator

    class DryCommunicator(Communicator):
        """Two parties' worth of CrypTen calls at one process: every collective returns this side's value."""

        BYTES_PER_ELEMENT = 8

        def __init__(self):
            self.reset_communication_stats()

        def get_rank(self):
            return 0

        def get_world_size(self):
            return 2

        def _same(self, value):
            return [t.clone() for t in value] if isinstance(value, list) else value.clone()

        def all_reduce(self, input, op=None, batched=False):
            return self._same(input)

        def reduce(self, input, dst, op=None, batched=False):
            return self._same(input)

        def broadcast(self, input, src, group=None, batched=False):
            return input

        def all_gather(self, tensor):
            return [tensor.clone(), tensor.clone()]

        def gather(self, tensor, dst):
            return [tensor.clone(), tensor.clone()]

        def barrier(self):
            return None

        def get_name(self):
            return "dealer"

    return DryCommunicator


DryCommunicator = None  # the class, made on first use (needs crypten)


@contextlib.contextmanager
def dry_crypten():
    """CrypTen calls in this process go to a :class:`DryCommunicator` (and PRZS to throwaway generators)."""
    global DryCommunicator
    crypten = import_crypten()
    import crypten.communicator as comm

    if DryCommunicator is None:
        DryCommunicator = _communicator_class()
    dry = DryCommunicator()
    saved_get, saved_bits = comm.get, crypten.cfg.encoder.precision_bits
    saved_gens = {k: dict(v) for k, v in crypten.generators.items()}
    comm.get = lambda: dry
    for i, key in enumerate(crypten.generators):
        crypten.generators[key][torch.device("cpu")] = torch.Generator().manual_seed(i)
    crypten.cfg.encoder.precision_bits = ACTIVATION_BITS
    try:
        yield dry
    finally:
        comm.get = saved_get
        crypten.cfg.encoder.precision_bits = saved_bits
        for key, gens in saved_gens.items():
            crypten.generators[key].clear()
            crypten.generators[key].update(gens)
