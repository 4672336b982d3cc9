"""Run a lowered graph on CrypTen shares: an ``fx.Interpreter`` with one handler per MPC op.

Why not ``crypten.nn.from_pytorch``: it goes through ONNX, which cannot carry the shared
gate (index buffers, comparisons) and breaks on current torch exporters.  Walking the fx
graph keeps the model's own structure, so the DeepShare gate runs as designed: the
comparison on the leader's first P channels only, replication to C channels by indexing the
shares (no communication), and one gate product per site.

Values in the interpreter's environment are ``ArithmeticSharedTensor`` (secret), plain
tensors / Python values (public: shapes, constants, plaintext weights in ``public`` mode) or
a :class:`GateValue` (a group's DReLU bit, shared by its sites).  Every handler's
communication is recorded per node (bytes, rounds, seconds) for the predicted-vs-measured
table, and every comparison is counted (``comparisons``), so tests can check the number of
comparisons against the plan without trusting byte arithmetic alone.

In ``private`` mode the model tensors that multiply activations are masked once per loaded
model by :func:`setup_weights` (the setup phase: ``W - b`` opened once, see
:mod:`.protocols`); every run then takes the resulting :class:`~.protocols.FixedMask` es and
opens only activations.  :class:`CrypTenBackend` keeps them (and the dealer that knows the
``b``'s) between runs, so any number of inferences follow one setup.

:class:`CrypTenBackend` is this module behind the :class:`~.backend.Backend` seam: it starts
and stops CrypTen at one party and reads its communication counters around a run.  CrypTen
pitfalls handled there: communication is only counted with
``crypten.cfg.communicator.verbose = True``; triples from the default trusted-first-party
provider and the simulated dealer are generated locally; a separate dealer's corrections are counted apart (offline) -- the
numbers are the online phase.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..compat import import_crypten
from ..errors import DeepShareError, first_line
from . import protocols as P, truncation
from .backend import Backend, NodeStats, PartyRun, SetupRun
from .dealer.provider import use as use_dealer
from .dealer.randomness import DEALER_MODES, Corrections, Randomness, SeededParty, SimulatedDealer
from .fixed_point import ACTIVATION_BITS
from .local_ops import LocalOps, is_shared
from .lowering import Program
from .ring import RingWeight
from .weights import bn_affine, prepare_public_weights, ring_weight, setup_weights, share_input, share_model_tensor

__all__ = ["CrypTenBackend", "CrypTenInterpreter", "GateValue", "NodeStats", "share_input", "run_program",
           "setup_weights"]  # fmt: skip


@dataclass
class GateValue:
    """A group's DReLU bit on its P prototypes, replicated to C channels on first use."""

    bit: P.MaskedBit
    mapping: torch.Tensor | None  # None when the map is the identity (P = C)
    _replicated: P.MaskedBit | None = None

    def replicated(self) -> P.MaskedBit:
        if self._replicated is None:
            self._replicated = self.bit.replicate(self.mapping)
        return self._replicated


LINEAR = object()  # the gate of a linear group (P = 0): nothing to compare, every site is β·x


def _comm():
    import crypten.communicator as comm

    return comm.get()


class CrypTenInterpreter(LocalOps, fx.Interpreter):
    """Execute ``program`` on shares at one party; ``run(x_shared)`` returns the shared output."""

    def __init__(self, program: Program, rank: int, dealer: Randomness | None = None,
                 masks: dict[str, P.FixedMask] | None = None):  # fmt: skip
        import_crypten()
        super().__init__(program.gm, garbage_collect_values=True)
        self.program = program
        self.rank = rank
        self.dealer = dealer or SimulatedDealer(rank)
        self.private = program.weights_mode == "private"
        self.masks = masks or {}
        missing = set(program.fixed) - set(self.masks)
        if missing:
            raise DeepShareError(f"private weights are not set up (no mask for {sorted(missing)[0]!r}): run the setup first")
        self.mods = dict(program.gm.named_modules())
        self.nodes = {n.name: n for n in program.gm.graph.nodes}
        self.stats: dict[str, NodeStats] = {}
        self._shared_cache: dict[int, Any] = {}
        self._openings: dict[str, P.Opening] = {}  # input node -> its masked opening
        self.probe = None  # threat-model tests: called after every node (what the process holds meanwhile)

    @property
    def comparisons(self) -> int:
        """Elements that went through the secure comparison (counted by the protocol itself)."""
        return self.dealer.comparisons

    # -- plumbing ------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        op = self.program.op(n.name)
        if op.handler in ("input", "attr", "output", "public"):
            result = super().run_node(n)
            if op.handler == "attr" and op.secret:
                result = self.shared(result)
            return result
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        comm = _comm()
        before = comm.get_communication_stats()
        cmp_before = self.comparisons
        tic = time.perf_counter()
        try:
            result = getattr(self, f"_h_{op.handler}")(n, args, kwargs)
        except DeepShareError:
            raise
        except Exception as e:  # noqa: BLE001 - name the node, keep one line
            msg = first_line(e, 200)
            raise DeepShareError(f"MPC execution failed at node {n.name!r} ({op.handler}): {msg}") from e
        after = comm.get_communication_stats()
        self.stats[n.name] = NodeStats(
            int(after["bytes"] - before["bytes"]), int(after["rounds"] - before["rounds"]),
            time.perf_counter() - tic, self.comparisons - cmp_before,
        )  # fmt: skip
        if op.inplace_of is not None:  # an in-place op also rewrote its input for later readers
            self.env[self.nodes[op.inplace_of]] = result
            self._openings.pop(op.inplace_of, None)
        if self.probe is not None:
            self.probe()
        for done in self.user_to_last_uses.get(n, ()):  # no later reader: its opening is not needed
            self._openings.pop(done.name, None)
        return result

    def shared(self, t: torch.Tensor):
        """Secret-share a model tensor from party 0 (party 1 passes its zero placeholder: size only)."""
        key = id(t)
        if key not in self._shared_cache:
            self._shared_cache[key] = share_model_tensor(t, self.rank)
        return self._shared_cache[key]

    def opening(self, n: fx.Node, x) -> P.Opening:
        """``x - a`` for node ``n``'s input, opened once: every fixed-weight product of that value reuses it.

        Keyed by the input node, as the lowering counts (an in-place op forgets its input's opening).
        """
        key = n.args[0].name
        if key not in self._openings:
            self._openings[key] = P.open_masked(x, self.dealer)
        return self._openings[key]

    def ring_weight(self, n: fx.Node, w: torch.Tensor, x) -> RingWeight:
        """Node ``n``'s public weight encoded for the ring kernels, once per program (kept across runs)."""
        return ring_weight(self.program, n.name, w)

    def fixed(self, n: fx.Node) -> list[P.FixedMask]:
        """The setup masks of the model tensors node ``n`` multiplies by (the lowering names them)."""
        return [self.masks[name] for name in self.program.op(n.name).fixed]

    def _fixed_channel_scale(self, n: fx.Node, x):
        """x times the node's one setup-masked per-channel tensor (C,): one opening of x - a."""
        view = (1, -1) + (1,) * (x.dim() - 2)
        return P.fixed_product(x, self.fixed(n)[0], lambda u, v: u * v.view(view), self.dealer, self.opening(n, x))

    def _weights(self, module: nn.Module, *names: str):
        out = []
        for name in names:
            t = getattr(module, name, None)
            out.append(None if t is None else (self.shared(t) if self.private else t.detach()))
        return out

    # -- activations and gates -------------------------------------------------------------
    def _h_relu(self, n, args, kwargs):
        return P.relu(args[0], self.dealer)

    def _h_masked_relu(self, n, args, kwargs):
        """SNL: ReLU on the kept neurons only (the mask is public), identity on the rest.

        The kept elements of each example are gathered from the share, go through one
        :func:`~.protocols.relu` as a flat vector, and are scattered back into a copy of x's
        share: indexing shares is local, so only the kept elements cost communication.
        """
        x = args[0]
        keep = self.mods[n.target].keep.flatten()
        kept = int(keep.sum())
        if kept == 0:
            return x
        if kept == keep.numel():
            return P.relu(x, self.dealer)
        idx = keep.nonzero().flatten()
        flat = x.share.reshape(x.share.shape[0], -1)
        gathered = x.shallow_copy()
        gathered.share = flat.index_select(1, idx)
        y = P.relu(gathered, self.dealer)
        out = x.shallow_copy()
        share = flat.clone()
        share[:, idx] = y.share
        out.share = share.view(x.share.shape)
        return out

    def _h_gate(self, n, args, kwargs):
        gate = self.mods[n.target]
        x = args[0]
        if gate.prototypes == 0:
            return LINEAR
        proto = x[:, : gate.prototypes]
        if self.program.op(n.name).opened:  # a site reads this same x: its x - a rides with the comparison
            bit, self._openings[n.args[0].name] = P.drelu_and_open(proto, x, self.dealer)
        else:
            bit = P.drelu(proto, self.dealer)
        identity = bool(torch.equal(gate.mapping, torch.arange(gate.channels)))
        return GateValue(bit, None if identity else gate.mapping.long())

    def _h_site(self, n, args, kwargs):
        site = self.mods[n.target]
        x, gate = args[0], args[1]
        if gate is LINEAR:  # no prototype: the gate is 0 and the site is β·x
            if self.private:  # β was masked at setup, as an unfolded BatchNorm's scale
                return self._fixed_channel_scale(n, x)
            return P.public_scale(x, site.beta.detach())
        if not isinstance(gate, GateValue):
            raise DeepShareError(f"node {n.name!r}: a SharedGate must be fed by a PrototypeGate node")
        bit = gate.replicated()
        if tuple(bit.shape) != tuple(x.size()):
            raise DeepShareError(f"node {n.name!r}: gate shape {bit.shape} does not match input {tuple(x.size())}")
        if self.private:
            alpha, beta = self.fixed(n)
            return P.fixed_site(x, bit, alpha, beta, self.dealer, self.opening(n, x))
        xg = P.gate_product(x, bit, self.dealer, self._openings.get(n.args[0].name))
        return P.public_affine(xg, x, site.alpha.detach(), site.beta.detach())

    def _h_maxpool(self, n, args, kwargs):
        if n.op == "call_module":
            m = self.mods[n.target]
            k, s, p = m.kernel_size, m.stride, m.padding
        else:
            k = args[1] if len(args) > 1 else kwargs["kernel_size"]
            s = args[2] if len(args) > 2 else kwargs.get("stride")
            p = args[3] if len(args) > 3 else kwargs.get("padding", 0)
        return P.maxpool2d(args[0], k, s, p, self.dealer)

    # -- linear layers -----------------------------------------------------------------------
    def _h_conv2d(self, n, args, kwargs):
        x = args[0]
        if n.op == "call_module":
            m = self.mods[n.target]
            b = self._weights(m, "bias")[0]
            w = None if self.private else m.weight
            conv = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        else:
            names = ("weight", "bias", "stride", "padding", "dilation", "groups")
            vals = dict(zip(names, args[1:]), **kwargs)
            w, b = vals.pop("weight"), vals.pop("bias", None)
            conv = vals
        fixed = self.fixed(n)
        if fixed:  # a model weight masked at setup: opens x - a only
            out = P.fixed_product(x, fixed[0], lambda u, v: torch.conv2d(u, v, **conv), self.dealer, self.opening(n, x))
            return out + b.view(1, -1, *([1] * (out.dim() - 2))) if b is not None else out
        if is_shared(w):
            out = x.conv2d(w, **conv)
            return out + b.view(1, -1, *([1] * (out.dim() - 2))) if b is not None else out
        return P.public_conv2d(x, self.ring_weight(n, w, x), b, **conv)

    def _h_linear(self, n, args, kwargs):
        x = args[0]
        if n.op == "call_module":
            m = self.mods[n.target]
            w, b = (None if self.private else m.weight), self._weights(m, "bias")[0]
        else:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
        fixed = self.fixed(n)
        if fixed:  # a model weight masked at setup: opens x - a only
            out = P.fixed_product(x, fixed[0], lambda u, v: torch.matmul(u, v.t()), self.dealer, self.opening(n, x))
            return out + b if b is not None else out
        if is_shared(w):
            out = x.matmul(w.t())
            return out + b if b is not None else out
        return P.public_linear(x, self.ring_weight(n, w, x), b)

    def _h_bn(self, n, args, kwargs):
        """A BatchNorm that could not be folded: a per-channel affine."""
        m = self.mods[n.target]
        x = args[0]
        scale, shift = bn_affine(m)
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.private:  # the scale was masked at setup; the shift is an addition
            return self._fixed_channel_scale(n, x) + self.shared(shift).view(view)
        return P.public_mul(x, scale.view(view)) + shift.view(view)


@dataclass
class RunOutput:
    output: Any  # plaintext logits at party 1, None at party 0
    stats: dict[str, NodeStats] = field(default_factory=dict)
    comparisons: int = 0


def run_program(program: Program, rank: int, x: torch.Tensor | None, dealer: Randomness | None = None,
                masks: dict[str, P.FixedMask] | None = None, probe=None) -> RunOutput:  # fmt: skip
    """Share the input, run the graph, reveal the output to party 1 (crypten must be initialised).

    In ``private`` mode ``masks`` come from :func:`setup_weights` with the same ``dealer``.  Every
    triple CrypTen itself draws (its comparison's ANDs, a Beaver product) comes from ``dealer`` too,
    and so do the exact truncation's pairs when the program says ``truncation="exact"``.
    """
    comm = _comm()
    interp = CrypTenInterpreter(program, rank, dealer, masks)
    interp.probe = probe
    exact = truncation.exact(interp.dealer) if program.truncation == "exact" else contextlib.nullcontext()
    with use_dealer(interp.dealer), exact:
        return _run(interp, comm, program, rank, x)


def _run(interp: CrypTenInterpreter, comm, program: Program, rank: int, x: torch.Tensor | None) -> RunOutput:
    compared_before = interp.comparisons  # a dealer kept across runs keeps counting
    before = comm.get_communication_stats()
    tic = time.perf_counter()
    x_shared = share_input(x, program.input_shape, rank)
    mid = comm.get_communication_stats()
    interp.stats["input"] = NodeStats(int(mid["bytes"] - before["bytes"]), int(mid["rounds"] - before["rounds"]),
                                      time.perf_counter() - tic)  # fmt: skip
    with torch.no_grad():
        y = interp.run(x_shared)
    before = comm.get_communication_stats()
    tic = time.perf_counter()
    raw = y.reveal(dst=1)  # not get_plain_text: CrypTen 0.4.1's decode is off by 1.0 for some negatives
    logits = (raw.double() / y.encoder.scale).float() if raw is not None else None
    after = comm.get_communication_stats()
    interp.stats["output"] = NodeStats(int(after["bytes"] - before["bytes"]), int(after["rounds"] - before["rounds"]),
                                       time.perf_counter() - tic)  # fmt: skip
    return RunOutput(logits if rank == 1 else None, interp.stats, interp.comparisons - compared_before)


class CrypTenBackend(Backend):
    """CrypTen 0.4.1 over gloo (TCP): the :class:`~.backend.Backend` the launcher uses by default.

    ``dealer="separate"`` (the default): correlated randomness comes from a third process through
    the :class:`~.dealer.channel.DealerLink` given to :meth:`attach_dealer`; ``"simulated"``: party 0
    samples it (for measurement only -- party 0 can then unmask the client's input).  ``threads``:
    torch's intra-op threads in the party once CrypTen has started (1 on a shared loopback host; a
    server's cores otherwise).  The answer cannot depend on it: every kernel a party may pick
    (:mod:`.ring`) computes the same integers mod 2^64.
    """

    name = "crypten"

    def __init__(self, dealer: str = "separate", threads: int = 1):
        if dealer not in DEALER_MODES:
            raise DeepShareError(f"--dealer must be one of {', '.join(DEALER_MODES)}, got {dealer!r}")
        if threads < 1:
            raise DeepShareError(f"--threads must be at least 1, got {threads}")
        self.dealer_mode, self.threads = dealer, int(threads)
        self.rank: int | None = None
        self.link = None
        self.probe = None  # threat-model tests: called after every node of every run
        self.record_dealt = False  # threat-model tests: digest every value this party deals in the clear
        self._crypten = None
        self._session: tuple | None = None  # (program, randomness, masks) of the last setup

    def attach_dealer(self, link) -> None:
        self.link = link

    def _randomness(self) -> Randomness:
        if self.dealer_mode == "simulated":
            r = SimulatedDealer(self.rank)
        elif self.link is None:
            raise DeepShareError("no dealer is connected (dealer 'separate'): start one, or pass --dealer simulated "
                                 "for a measurement run that is not private against party 0")  # fmt: skip
        else:
            r = SeededParty(self.rank, self.link.seed)
        if self.record_dealt:
            r.dealt_digests = set()
        return r

    @property
    def dealt_digests(self) -> set[str]:
        """What this party dealt in the clear (the simulated dealer's party 0; nothing in a separate-dealer run)."""
        return set() if self._session is None else set(self._session[1].dealt_digests or ())

    def setup(self, program: Program) -> SetupRun:
        """Mask the program's fixed weights (private mode) with randomness kept for its later runs."""
        if self.rank is None:
            raise DeepShareError("the CrypTen backend sets up a program only between start() and stop()")
        comm = _comm()
        comm.barrier()
        comm.reset_communication_stats()
        tic = time.perf_counter()
        dealer = self._randomness()
        with use_dealer(dealer):
            masks = setup_weights(program, self.rank, dealer)
        prepare_public_weights(program)  # once per loaded model, like the masks
        wall = time.perf_counter() - tic
        stats = comm.get_communication_stats()
        self._session = (program, dealer, masks)
        return SetupRun(int(stats["bytes"]), int(stats["rounds"]), wall, program.setup_opened)

    def start(self, rank: int, master_addr: str, master_port: int) -> None:
        """Environment for CrypTen's DistributedCommunicator, then ``crypten.init()`` with counting on."""
        os.environ.update(
            RENDEZVOUS=f"tcp://{master_addr}:{master_port}", WORLD_SIZE="2", RANK=str(rank),
            DISTRIBUTED_BACKEND="gloo", MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )  # fmt: skip
        torch.set_num_threads(1)  # CrypTen starts on one thread (a multi-threaded start can hang it)
        crypten = import_crypten()
        crypten.init()
        torch.set_num_threads(self.threads)
        crypten.cfg.communicator.verbose = True
        crypten.cfg.encoder.precision_bits = ACTIVATION_BITS  # what CrypTen encodes new public values at
        self.rank, self._crypten = rank, crypten

    def _offline(self, dealer: Randomness) -> tuple[int, int, float]:
        """The client reads this run's corrections from the dealer (the offline phase): bytes, messages, seconds."""
        if not isinstance(dealer, SeededParty) or self.rank != 1:
            return 0, 0, 0.0
        b, m, s = self.link.bytes, self.link.messages, self.link.seconds
        dealer.corrections = Corrections(self.link.receive())
        return self.link.bytes - b, self.link.messages - m, self.link.seconds - s

    def run(self, program: Program, x: torch.Tensor | None) -> PartyRun:
        """Both parties in step (barrier), counters reset, then :func:`run_program` (after :meth:`setup` if needed)."""
        if self.rank is None:
            raise DeepShareError("the CrypTen backend runs a program only between start() and stop()")
        setup = None
        if self._session is None or self._session[0] is not program:
            setup = self.setup(program)  # counted apart; later runs of this program reuse it
        _, dealer, masks = self._session
        offline = self._offline(dealer)
        comm = _comm()
        comm.barrier()
        comm.reset_communication_stats()
        tic = time.perf_counter()
        result = run_program(program, self.rank, x, dealer, masks, self.probe)
        wall = time.perf_counter() - tic
        if isinstance(dealer, SeededParty) and dealer.corrections is not None:
            dealer.corrections.finish()
            dealer.corrections = None
        stats = comm.get_communication_stats()
        return PartyRun(result.output, int(stats["bytes"]), int(stats["rounds"]), wall, float(stats["time"]),
                        int(result.comparisons), result.stats, setup, *offline, self.dealer_mode)  # fmt: skip

    def stop(self) -> None:
        if self._crypten is not None:
            self._crypten.uninit()
        if self.link is not None:
            self.link.close()
        self.rank, self._crypten, self._session, self.link = None, None, None, None
