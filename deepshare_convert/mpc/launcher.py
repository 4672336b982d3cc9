"""Real two-party runs: party 0 holds the model, party 1 the inputs; party 1 alone gets the output.

:func:`run_two_party` starts both parties as separate processes on 127.0.0.1 (gloo over TCP).
They are *spawned*, not forked, so each process holds exactly what it was sent: party 0 the
prepared model and the input shape; party 1 the inputs and -- in ``private`` mode -- only a
weightless skeleton of the graph (:func:`~.prepare.strip_weights`), sent as
:func:`~.transport.pack`-ed data.  :func:`run_party` runs one party of a deployment across two
hosts (``deepshare private-infer --rank R``).

Before a party starts its backend it runs the :mod:`.handshake` with the other: both prove
knowledge of a shared key and compare the plan's hash, so no share goes to a stranger or to a
party running another program.  :func:`spawn_two` makes a fresh random key per run for its two
children; :func:`run_party` needs the user's key (``--key-file`` or ``$DEEPSHARE_MPC_KEY``).

The MPC framework itself is behind :class:`~.backend.Backend` (``backend=``; CrypTen by
default): this module only decides which process holds what, and collects the reports.
Results cross the process boundary as numpy (never torch tensors); the parent runs with one
torch thread while it starts the parties (a CrypTen pitfall: a multi-threaded parent can hang
the next run).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import DeepShareError, first_line
from . import WEIGHT_MODES
from .backend import Backend
from .dealer.channel import accept_parties, connect_dealer
from .dealer.randomness import DEALER_MODES
from .dealer.service import deal_session
from .fixed_point import truncation_mode
from .handshake import authenticate, new_key, plan_digest, require_key
from .holdings import plaintext_inventory as _plaintext_inventory, tensor_digest, unmasked_openings
from .lowering import lower
from .prepare import prepare, reference, strip_weights
from .transport import canonical, pack, unpack

__all__ = ["PartyReport", "PrivateRun", "run_two_party", "run_party", "serve_dealer", "serve_dealer_sessions", "spawn_two",
           "tensor_digest",
           "free_port"]


@dataclass
class PartyReport:
    """What one party measured, and what it held in plaintext (digests, for the threat-model tests)."""

    rank: int
    bytes: int
    rounds: int
    wall_s: float
    comm_s: float
    comparisons: int
    per_node: dict[str, dict[str, float]]
    output: np.ndarray | None
    plaintext_digests: list[str] = field(default_factory=list)
    dealt_digests: list[str] = field(default_factory=list)  # values this party dealt in the clear (simulated: party 0)
    unmasked_digests: list[str] = field(default_factory=list)  # ε + (its mask, or its share of it) of every opening
    setup: dict[str, float] = field(default_factory=dict)  # bytes, rounds, wall_s, elements of the one setup
    inferences: list[dict[str, float]] = field(default_factory=list)  # online bytes, rounds, wall_s of each run
    dealer: str = "separate"
    offline_bytes: int = 0  # corrections this party received from the dealer (the offline phase)
    offline_messages: int = 0

    @property
    def setup_bytes(self) -> int:
        return int(self.setup.get("bytes", 0))

    @property
    def setup_rounds(self) -> int:
        return int(self.setup.get("rounds", 0))


@dataclass
class PrivateRun:
    weights_mode: str
    parties: list[PartyReport]
    logits: np.ndarray  # revealed to party 1
    plaintext: np.ndarray | None  # the same model run in the clear (None when no one holds both)
    comparisons_expected: int
    setup_s: float = 0.0
    dealer: str = "separate"  # who dealt the correlated randomness: "separate" (a third process) or "simulated"
    dealer_report: dict[str, Any] | None = None  # what the dealer process sent (and held, with inventory)
    offline_expected: int = 0  # bytes of corrections the cost model predicts for the whole run
    truncation: str = "local"  # "exact" | "local" (mpc/truncation.py)

    @property
    def offline_bytes(self) -> int:
        """Correction bytes the dealer sent, as the client received them (the offline phase)."""
        return sum(p.offline_bytes for p in self.parties)

    @property
    def offline_messages(self) -> int:
        return sum(p.offline_messages for p in self.parties)

    @property
    def top1_agreement(self) -> float | None:
        """Fraction of argmax decisions (over axis 1) equal to plaintext: per image, or per pixel for dense outputs."""
        if self.plaintext is None:
            return None
        return float((self.logits.argmax(1) == self.plaintext.argmax(1)).mean())

    @property
    def dense(self) -> bool:
        """(N, K, H, W) logits: a label per pixel (segmentation), so agreement is counted per pixel."""
        return self.logits.ndim > 2

    @property
    def pixel_agreement(self) -> float | None:
        """Segmentation: the fraction of pixels whose private label equals plaintext's (None otherwise)."""
        return self.top1_agreement if self.dense else None

    @property
    def max_logit_error(self) -> float | None:
        if self.plaintext is None:
            return None
        return float(np.abs(self.logits - self.plaintext).max())

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights_mode": self.weights_mode,
            "truncation": self.truncation,
            "batch": int(self.logits.shape[0]),
            "top1_agreement": self.top1_agreement,
            **({"pixel_agreement": self.pixel_agreement, "pixels": int(self.logits[:, 0].size)} if self.dense else {}),
            "max_logit_error": self.max_logit_error,
            "comparisons": self.parties[0].comparisons,
            "comparisons_expected": self.comparisons_expected,
            "dealer": self.dealer,
            "offline": {"bytes": self.offline_bytes, "bytes_expected": self.offline_expected,
                        "messages": self.offline_messages,
                        "setup_bytes": 0 if self.dealer_report is None else self.dealer_report["setup_bytes"]},
            "parties": [
                {"rank": p.rank, "bytes": p.bytes, "rounds": p.rounds, "wall_s": round(p.wall_s, 4),
                 "comm_s": round(p.comm_s, 4), "setup_bytes": p.setup_bytes, "setup_rounds": p.setup_rounds,
                 "setup_wall_s": round(p.setup.get("wall_s", 0.0), 4),
                 "inferences": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in i.items()}
                                for i in p.inferences]}
                for p in self.parties
            ],  # fmt: skip
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inference_party(backend: Backend, rank: int, gm: fx.GraphModule | dict, input_shape: tuple[int, ...],
                     inputs: np.ndarray | None, weights_mode: str, inventory: bool,
                     count: int = 1) -> dict[str, Any]:  # fmt: skip
    """One party: one setup, then ``count`` inferences of ``input_shape`` one after another.

    ``backend`` is already started; returns only numpy / Python values.  ``bytes`` / ``rounds``
    / ``wall_s`` are the online phase summed over the inferences, ``per_node`` the last one's.
    """
    program = lower(unpack(gm) if isinstance(gm, dict) else gm, input_shape, weights_mode)
    held: set[str] = set()
    if inventory and hasattr(backend, "probe"):  # what the process holds after every node, not only at the end
        from . import protocols

        backend.probe, backend.record_dealt = lambda: held.update(_plaintext_inventory()), True
        protocols.OPENINGS = []
    setup = backend.setup(program)
    xs = [torch.from_numpy(c) for c in np.split(inputs, count)] if inputs is not None else [None] * count
    outs, runs, result = [], [], None
    for x in xs:
        result = backend.run(program, x)
        if result.output is not None:
            outs.append(result.output.detach().float())
        runs.append({"bytes": result.bytes, "rounds": result.rounds, "wall_s": result.wall_s,
                     "comm_s": result.comm_s, "comparisons": result.comparisons,
                     "offline_bytes": result.offline_bytes, "offline_messages": result.offline_messages,
                     "offline_s": result.offline_s})  # fmt: skip
        if inventory:  # sampled after every inference too: what the process held while it ran
            held.update(_plaintext_inventory())
    report = {
        "rank": rank, "bytes": sum(r["bytes"] for r in runs), "rounds": sum(r["rounds"] for r in runs),
        "wall_s": sum(r["wall_s"] for r in runs), "comm_s": sum(r["comm_s"] for r in runs),
        "comparisons": sum(r["comparisons"] for r in runs),
        "per_node": {k: {"bytes": v.bytes, "rounds": v.rounds, "seconds": v.seconds, "comparisons": v.comparisons}
                     for k, v in result.per_node.items()},
        "output": torch.cat(outs).numpy() if outs else None,  # a view: the tensor stays visible to the inventory
        "setup": {"bytes": setup.bytes, "rounds": setup.rounds, "wall_s": setup.wall_s, "elements": setup.elements},
        "inferences": runs,
        "dealer": result.dealer,
        "offline_bytes": sum(r["offline_bytes"] for r in runs),
        "offline_messages": sum(r["offline_messages"] for r in runs),
    }  # fmt: skip
    del result, outs
    if inventory:  # everything this process holds in the clear, its own inputs and output included
        report["plaintext_digests"] = sorted(held.union(_plaintext_inventory()))
        report["dealt_digests"] = sorted(getattr(backend, "dealt_digests", ()))
        from . import protocols

        report["unmasked_digests"] = unmasked_openings(protocols.OPENINGS or [])
        protocols.OPENINGS = None
    return report


def _inference_plan(rank: int, gm: fx.GraphModule | dict, input_shape: tuple[int, ...], inputs, weights_mode: str,
                    inventory: bool, count: int = 1) -> str:  # fmt: skip
    """The plan hash of what :func:`_inference_party` will run, from what this party holds (the number of
    inferences after the one setup included: parties that disagree on it would wait for each other)."""
    digest = plan_digest(lower(unpack(gm) if isinstance(gm, dict) else gm, input_shape, weights_mode))
    return digest if count == 1 else hashlib.sha256(f"{digest}:{count}".encode()).hexdigest()


def _dealer_plan(rank: int, gm, input_shape: tuple[int, ...], inputs, weights_mode: str, inventory: bool,
                 count: int = 1) -> tuple[str, tuple[int, ...], int]:  # fmt: skip
    """(the weightless plan hash the dealer checks, the input shape, the number of inferences) of a party."""
    program = lower(unpack(gm) if isinstance(gm, dict) else gm, input_shape, weights_mode)
    return dealer_digest(program, count), tuple(input_shape), count


def dealer_digest(program, count: int) -> str:
    """The plan hash shared with the dealer: the program without float weights, and the number of inferences."""
    return hashlib.sha256(f"{plan_digest(program, weights=False)}:{count}".encode()).hexdigest()


def _function_plan(fn) -> str:
    """The plan of a party body with no lowered program (calibration): which function both run."""
    return hashlib.sha256(f"{fn.__module__}.{fn.__qualname__}".encode()).hexdigest()


def _party_entry(queue, rank: int, master_addr: str, master_port: int, backend: Backend, fn, args: tuple,
                 key: bytes, plan, timeout: float, dealer_port: int | None = None) -> None:  # fmt: skip
    """Process body: handshakes (the other party, then the dealer), start the backend, run
    ``fn(backend, rank, *args)``, send its result or one error line."""
    try:
        digest = plan(rank, *args) if callable(plan) else _function_plan(fn)
        session = authenticate(rank, key, digest, master_addr, master_port, timeout=timeout)
        if dealer_port is not None:
            dplan, shape, count = _dealer_plan(rank, *args)
            backend.attach_dealer(connect_dealer(rank, key, dplan, master_addr, dealer_port, input_shape=shape,
                                                 count=count, timeout=timeout))  # fmt: skip
        backend.start(rank, master_addr, session.store_port)
        try:
            result = fn(backend, rank, *args)
        finally:
            backend.stop()
        queue.put(("ok", rank, result))
    except BaseException as e:  # noqa: BLE001 - report any failure as one line to the parent
        msg = first_line(e, 300)
        queue.put(("error", rank, msg if isinstance(e, DeepShareError) else f"{type(e).__name__}: {msg}"))


def _dealer_entry(queue, key: bytes, addr: str, port: int, gm: dict, weights_mode: str, inventory: bool,
                  timeout: float) -> None:  # fmt: skip
    """The dealer's process body: accept both parties, deal the session, report what it sent (and held)."""
    try:
        torch.set_num_threads(1)
        graph = unpack(gm)

        def plan_for(shape, count):
            program = lower(graph, tuple(shape), weights_mode)
            return dealer_digest(program, count), (program, count)

        link0, link1, (program, count) = accept_parties(key, plan_for, addr, port, timeout=timeout)
        held: set[str] = set()
        try:
            dealt = deal_session(program, link0, link1, count, record=inventory,
                                 probe=(lambda: held.update(_plaintext_inventory())) if inventory else None)  # fmt: skip
            report = dealt.to_dict()
        finally:
            link0.close()
            link1.close()
        if inventory:
            report["plaintext_digests"] = sorted(held.union(_plaintext_inventory()))
            report["dealt_digests"] = sorted(dealt.dealt_digests)
        queue.put(("ok", DEALER_RANK, report))
    except BaseException as e:  # noqa: BLE001 - report any failure as one line to the parent
        msg = first_line(e, 300)
        queue.put(("error", DEALER_RANK, msg if isinstance(e, DeepShareError) else f"{type(e).__name__}: {msg}"))


DEALER_RANK = 2  # the dealer's report travels under this rank (it is no party of the MPC)


def spawn_two(fn, args: tuple[tuple, tuple], *, timeout: float = 600.0, backend: Backend | None = None,
              plan=None, dealer: tuple | None = None) -> list[Any]:  # fmt: skip
    """Run ``fn(backend, rank, *args[rank])`` in two spawned processes joined by ``backend``; their results.

    ``backend`` defaults to CrypTen.  ``fn`` (and ``plan``) must be module-level functions;
    everything crossing the boundary must pickle (numpy, not torch tensors, on the way back).
    The two processes run the :mod:`.handshake` first, with a fresh random key sent to each
    through its spawn pipe (never a command line); ``plan(rank, *args[rank])`` gives each
    party's plan hash (None: both run ``fn``, nothing else to compare).

    ``dealer`` = (packed weightless graph, weights mode, inventory): a third process deals the
    correlated randomness (:mod:`.dealer`); its report comes back third.  None: no dealer process
    (the backend then must not need one: ``CrypTenBackend(dealer="simulated")``).
    """
    backend = backend or default_backend()
    port = free_port()
    key = new_key()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CrypTen pitfall: a multi-threaded parent can hang the next run
    dealer_port = free_port() if dealer is not None else None
    procs = [
        ctx.Process(target=_party_entry, daemon=True,
                    args=(queue, r, "127.0.0.1", port, backend, fn, args[r], key, plan, timeout, dealer_port))
        for r in range(2)
    ]  # fmt: skip
    if dealer is not None:
        procs.append(ctx.Process(target=_dealer_entry, daemon=True,
                                 args=(queue, key, "127.0.0.1", dealer_port, *dealer, timeout)))  # fmt: skip
    started = []
    try:
        for p in procs:
            p.start()
            started.append(p)
        reports = _collect(queue, procs, timeout)
    finally:
        torch.set_num_threads(threads)
        for p in started:
            if p.is_alive():
                p.terminate()
            p.join(5)
        queue.close()
        queue.join_thread()
    return [reports[r] for r in range(len(procs))]


def default_backend(dealer: str = "separate", threads: int = 1) -> Backend:
    """CrypTen, the one backend (imported on use: launching needs no crypten until a party runs)."""
    from .executor import CrypTenBackend

    return CrypTenBackend(dealer, threads)


def _check_mode(weights_mode: str) -> None:
    if weights_mode not in WEIGHT_MODES:
        raise DeepShareError(f"--weights-mode must be 'private' or 'public', got {weights_mode!r}")


def run_two_party(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    weights_mode: str = "public",
    timeout: float = 600.0,
    inventory: bool = False,
    plaintext: bool = True,
    leaf_modules: Sequence[str] = (),
    backend: Backend | None = None,
    sequential: bool = False,
    dealer: str = "separate",
    threads: int = 1,
    truncation: str | None = None,
) -> PrivateRun:
    """Run ``model`` on ``inputs`` (N, C, H, W) under two-party MPC on this machine (``backend``: CrypTen).

    One setup (private mode: the weights masked once), then one inference of the whole batch,
    or with ``sequential`` N inferences of one image each, one after another, reusing the setup.
    ``dealer="separate"``: a third process deals the correlated randomness (private against
    either party); ``"simulated"``: party 0 samples it -- a measurement of the online phase only,
    not private against party 0.  ``threads``: torch threads per party (both share this host).
    ``truncation``: ``"exact"`` or ``"local"`` (default: :func:`~.fixed_point.truncation_mode`), handed
    to the spawned processes as ``$DEEPSHARE_TRUNCATION``.
    """
    _check_mode(weights_mode)
    _check_dealer(dealer)
    truncation = truncation_mode(truncation)
    with _environment(DEEPSHARE_TRUNCATION=truncation):
        return _run_two_party(model, inputs, weights_mode, timeout, inventory, plaintext, leaf_modules, backend,
                              sequential, dealer, truncation, threads)  # fmt: skip


@contextlib.contextmanager
def _environment(**values: str):
    """Variables set for the block (and the processes it spawns), restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_two_party(model, inputs, weights_mode, timeout, inventory, plaintext, leaf_modules, backend, sequential,
                   dealer, truncation, threads=1) -> PrivateRun:  # fmt: skip
    tic = time.perf_counter()
    gm = prepare(model, leaf_modules=leaf_modules)
    count = int(inputs.shape[0]) if sequential else 1
    shape = (1, *inputs.shape[1:]) if sequential else tuple(inputs.shape)
    program = lower(gm, shape, weights_mode, truncation)  # refuses unsupported nodes before any process starts
    expected = program.comparisons * count
    clear = None
    if plaintext:
        clear = reference(gm, inputs).numpy()
    server = (pack(gm), shape, None, weights_mode, inventory, count)
    client_gm = pack(strip_weights(gm) if weights_mode == "private" else gm)
    client = (client_gm, shape, inputs.detach().float().numpy(), weights_mode, inventory, count)
    setup = time.perf_counter() - tic
    dealer_args = (pack(strip_weights(gm)), weights_mode, inventory) if dealer == "separate" else None
    reports = spawn_two(_inference_party, (server, client), timeout=timeout, backend=backend or default_backend(dealer, threads),
                        plan=_inference_plan, dealer=dealer_args)  # fmt: skip
    parties = [PartyReport(**r) for r in reports[:2]]
    dealt = reports[2] if len(reports) > 2 else None
    return PrivateRun(weights_mode, parties, parties[1].output, clear, expected, setup, dealer, dealt,
                      program.offline_elements * 8 * count if dealer == "separate" else 0, truncation)  # fmt: skip


def _check_dealer(dealer: str) -> None:
    if dealer not in DEALER_MODES:
        raise DeepShareError(f"--dealer must be one of {', '.join(DEALER_MODES)}, got {dealer!r}")


def _collect(queue, procs, timeout: float) -> dict[int, dict[str, Any]]:
    import queue as queue_mod

    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(reports) < len(procs):
        try:
            status, rank, payload = queue.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
        except queue_mod.Empty:
            if time.monotonic() > deadline:
                raise DeepShareError(f"two-party run timed out after {timeout:.0f}s") from None
            dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in reports and p.exitcode]
            if dead:
                who = "the dealer" if dead[0] == DEALER_RANK else f"party {dead[0]}"
                raise DeepShareError(f"{who} died (exit code {procs[dead[0]].exitcode})") from None
            continue
        if status == "error":
            raise DeepShareError(f"{'the dealer' if rank == DEALER_RANK else f'party {rank}'}: {payload}")
        reports[rank] = payload
    return reports


def run_party(
    rank: int,
    model: nn.Module,
    inputs: torch.Tensor | None,
    input_shape: tuple[int, ...],
    *,
    weights_mode: str = "public",
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    leaf_modules: Sequence[str] = (),
    backend: Backend | None = None,
    key: bytes | None = None,
    timeout: float = 600.0,
    dealer: str = "separate",
    dealer_addr: str | None = None,
    dealer_port: int | None = None,
    dealer_key: bytes | None = None,
    threads: int = 1,
) -> PartyReport:
    """Run one party in this process; the other runs the same call elsewhere with the other rank.

    Party 0 passes the real model and ``inputs=None``; party 1 passes the inputs and, in
    ``private`` mode, a model whose weights it does not know (they are zeroed here anyway).
    ``key`` (default: ``$DEEPSHARE_MPC_KEY``, required) authenticates the two parties on
    ``master_port`` before the backend meets on ``master_port + 1``; party 0 waits up to
    ``timeout`` seconds for an authenticated party 1, refusing strangers meanwhile.  With
    ``dealer="separate"`` (the default) both then authenticate the dealer at ``dealer_addr:dealer_port``
    (:func:`serve_dealer`, under ``dealer_key``, default ``key``) before any share moves.
    """
    _check_mode(weights_mode)
    _check_dealer(dealer)
    if rank not in (0, 1):
        raise DeepShareError(f"--rank must be 0 (model owner) or 1 (input owner), got {rank}")
    if rank == 1 and inputs is None:
        raise DeepShareError("party 1 holds the inputs: pass --data")
    if not 0 < master_port < 65535:
        raise DeepShareError(f"--master-port must be 1..65534 (the handshake's; CrypTen uses the next), got {master_port}")
    if dealer == "separate" and (dealer_addr is None or dealer_port is None):
        raise DeepShareError("a two-host run needs the dealer: pass --dealer-addr HOST:PORT (a `deepshare dealer`), "
                             "or --dealer simulated for a measurement that is not private against party 0")  # fmt: skip
    gm = prepare(model, leaf_modules=leaf_modules)
    if rank == 1 and weights_mode == "private":
        gm = strip_weights(gm)
    gm = canonical(gm)  # the form every participant hashes (a spawned one, a server's worker, the dealer)
    key = key if key is not None else require_key()
    arr = inputs.detach().float().numpy() if (rank == 1 and inputs is not None) else None
    program = lower(gm, tuple(input_shape), weights_mode)  # refuses unsupported nodes before listening
    session = authenticate(rank, key, plan_digest(program), master_addr, master_port, store_port=master_port + 1,
                           timeout=timeout)  # fmt: skip
    backend = backend or default_backend(dealer, threads)
    if dealer == "separate":
        backend.attach_dealer(connect_dealer(rank, dealer_key or key, dealer_digest(program, 1), dealer_addr,
                                             dealer_port, input_shape=tuple(input_shape), timeout=timeout))  # fmt: skip
    threads = torch.get_num_threads()
    backend.start(rank, master_addr, session.store_port)
    try:
        return PartyReport(**_inference_party(backend, rank, gm, tuple(input_shape), arr, weights_mode, False))
    finally:
        backend.stop()
        torch.set_num_threads(threads)


def serve_dealer(model: nn.Module, *, weights_mode: str = "public", addr: str = "127.0.0.1", port: int = 29600,
                 key: bytes | dict[int, bytes] | None = None, leaf_modules: Sequence[str] = (),
                 timeout: float = 600.0) -> dict[str, Any]:  # fmt: skip
    """The dealer of one two-host session: wait for both parties, deal, return what was sent.

    ``model`` is the architecture only (its weights are zeroed here and never read): the dealer
    needs shapes, not values.  The input shape comes from the parties' hellos and the plan hash
    of all three must agree.  ``key``: one for both links, or ``{0: server's, 1: client's}``.
    """
    reports = serve_dealer_sessions(model, weights_mode=weights_mode, addr=addr, port=port, key=key,
                                    leaf_modules=leaf_modules, timeout=timeout, sessions=1, pair_timeout=timeout)  # fmt: skip
    if not reports:
        raise DeepShareError(f"no session was dealt within {timeout:.0f}s")
    if "error" in reports[0]:
        raise DeepShareError(reports[0]["error"])
    return reports[0]


def serve_dealer_sessions(model: nn.Module, *, weights_mode: str = "public", addr: str = "127.0.0.1",
                          port: int = 29600, key: bytes | dict[int, bytes] | None = None,
                          leaf_modules: Sequence[str] = (), timeout: float = 600.0, sessions: int = 0,
                          pair_timeout: float = 60.0, log=None, on_report=None, stop=None) -> list[dict[str, Any]]:  # fmt: skip
    """A dealer serving sessions (``sessions`` of them; 0: until ``stop`` is set, or SIGINT/SIGTERM in the CLI).

    Each pair of parties announcing one session name (a ``serve`` worker and its client, or the two
    parties of ``private-infer --rank``) is checked and dealt on its own thread (:mod:`.dealer.sessions`).
    ``on_report(report)`` is called as each session ends (a failed one has ``"error"``).
    """
    from .dealer.sessions import DealerServer

    _check_mode(weights_mode)
    if not 0 < port < 65536:
        raise DeepShareError(f"--listen port must be 1..65535, got {port}")
    key = key if key is not None else require_key()
    keys = key if isinstance(key, dict) else {0: key, 1: key}
    graph = canonical(strip_weights(prepare(model, leaf_modules=leaf_modules)))

    def plan_for(shape, count):
        program = lower(graph, tuple(shape), weights_mode)
        return dealer_digest(program, count), program

    try:
        listener = socket.create_server((addr, port), backlog=128)
    except OSError as e:
        raise DeepShareError(f"the dealer cannot listen on {addr}:{port}: {e.strerror or e}") from None
    threads = torch.get_num_threads()
    dealer = DealerServer(keys, plan_for, listener, timeout=timeout, pair_timeout=pair_timeout, log=log,
                          on_report=on_report)  # fmt: skip
    watcher = None
    if stop is not None:
        import threading

        def watch():
            stop.wait()
            dealer.stop()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    try:
        return dealer.serve(sessions, deadline=timeout if sessions == 1 else None)
    finally:
        listener.close()
        torch.set_num_threads(threads)
