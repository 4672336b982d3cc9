"""``deepshare serve``: party 0 as a long-running server -- a supervisor and a bounded pool of session workers.

The model is loaded and prepared once, in the supervisor.  It then listens on one socket and
starts ``max_sessions`` *worker* processes (spawned, each with a copy of that socket): every
idle worker blocks in ``accept()``, so the kernel hands each new client to exactly one of them
and clients beyond ``max_sessions`` wait in the listen queue.  A worker runs one session at a time:

1. the handshake on the accepted connection (:func:`~..mpc.handshake.serve_client`: key, and the
   plan hash for the number of images the client announces, at most ``max_images``);
2. its link to the dealer, under the session's name (:func:`~..mpc.dealer.channel.connect_dealer`),
   then ``ready`` -- or one ``error`` line -- on the control line (:mod:`.control`);
3. CrypTen on a fresh rendezvous port, one setup (private weights masked for this client, with
   this session's dealer masks), one inference per image; CrypTen is shut down after it.

Isolation: each session's state lives in one function call of one worker; nothing of a session
outlives it but its log record.  A session that fails after the handshake (a client killed
mid-inference, a dealer gone) ends its worker -- CrypTen's state after a broken peer is not to be
trusted -- and the supervisor starts a fresh one; a refused handshake (stranger, other plan) does
not.  The supervisor prints one line per session (client, images, bytes, rounds, wall time),
kills a session running past ``session_timeout``, and on SIGINT/SIGTERM stops accepting, lets
running sessions finish and exits.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import DeepShareError, first_line

__all__ = ["ServeConfig", "Server", "SessionRecord"]

KEEP = 10_000  # session records kept in memory (the log has them all): a server must not grow with its clients


@dataclass
class ServeConfig:
    """How the server listens, where its dealer is, and its limits."""

    listen: tuple[str, int] = ("127.0.0.1", 29700)
    dealer: tuple[str, int] | None = None  # the `deepshare dealer`; None with ``local``: one started here
    weights_mode: str = "private"
    max_sessions: int = 2
    max_images: int = 64
    session_timeout: float = 600.0
    dealer_timeout: float = 10.0
    local: bool = False  # start a dealer in this process (a try-out on one host)
    leaf_modules: tuple[str, ...] = ()
    threads: int = 1  # torch threads per session worker


@dataclass
class SessionRecord:
    """One session as the supervisor logs it."""

    worker: int
    client: str
    status: str  # "ok", "refused", "failed"
    images: int = 0
    bytes: int = 0
    rounds: int = 0
    setup_bytes: int = 0
    offline_bytes: int = 0
    wall_s: float = 0.0
    message: str = ""

    def line(self) -> str:
        if self.status == "ok":
            return (f"session from {self.client}: {self.images} image(s), online {self.bytes / 1e6:,.2f} MB / "
                    f"{self.rounds} rounds, setup {self.setup_bytes / 1e6:,.2f} MB, {self.wall_s:.2f} s")  # fmt: skip
        return f"session from {self.client}: {self.status}: {self.message}"


@dataclass
class _Worker:
    process: Any
    busy_since: float | None = None
    client: str = ""
    up: bool = False  # it started (unpacked and lowered the model) and waits for clients


class Server:
    """Serve ``model`` (the full converted model, weights included) to many clients; :meth:`run` blocks.

    ``key``: the key clients authenticate with; ``dealer_key``: the server's key with the dealer
    (default ``key``).  ``log(line)`` gets one line per event (default: print); ``on_record(record)``,
    when given, gets each finished session instead of its log line (``serve --json``).
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, ...], key: bytes, config: ServeConfig, *,
                 dealer_key: bytes | None = None, log: Callable[[str], None] | None = None,
                 on_record: Callable[[SessionRecord], None] | None = None) -> None:  # fmt: skip
        from ..mpc.launcher import _check_mode
        from ..mpc.lowering import lower
        from ..mpc.prepare import prepare, strip_weights
        from ..mpc.transport import canonical, pack

        _check_mode(config.weights_mode)
        if config.max_sessions < 1:
            raise DeepShareError(f"--max-sessions must be at least 1, got {config.max_sessions}")
        if config.threads < 1:
            raise DeepShareError(f"--threads must be at least 1, got {config.threads}")
        if config.max_images < 1:
            raise DeepShareError(f"--max-images must be at least 1, got {config.max_images}")
        if config.dealer is None and not config.local:
            raise DeepShareError("the server needs a dealer: pass --dealer-addr HOST:PORT (a `deepshare dealer`), "
                                 "or --local to start one here for a try-out")  # fmt: skip
        self.config, self.key, self.dealer_key = config, key, dealer_key or key
        self._print_lock = threading.Lock()
        self.log = log or self._print
        self.on_record = on_record
        self.shape = (1, *input_size)
        gm = prepare(model, leaf_modules=config.leaf_modules)
        lower(gm, self.shape, config.weights_mode)  # refuses an unsupported model before listening
        self.packed = pack(gm)
        self.weightless = canonical(strip_weights(gm))  # the dealer's graph, hashed as the parties hash theirs
        self.records: collections.deque[SessionRecord] = collections.deque(maxlen=KEEP)  # the latest only
        self.counts = {"ok": 0, "refused": 0, "failed": 0}  # every session
        self.stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._dealer = None
        self.address: tuple[str, int] | None = None
        self.dealer_address: tuple[str, int] | None = config.dealer

    # ---- lifecycle -------------------------------------------------------------------------------
    def run(self, ready: Callable[[Server], None] | None = None, install_signals: bool = True) -> list[SessionRecord]:
        """Listen, start the workers, log sessions until SIGINT/SIGTERM (or :meth:`stop`); the records."""
        host, port = self.config.listen
        try:
            self._listener = socket.create_server((host, port), backlog=128)
        except OSError as e:
            raise DeepShareError(f"the server cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.address = self._listener.getsockname()[:2]
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.stop())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # CrypTen pitfall: spawn from a one-thread parent
        ctx = mp.get_context("spawn")
        self._events = ctx.Queue()
        self._stop_workers = ctx.Event()
        workers: dict[int, _Worker] = {}
        self._workers = workers
        try:
            if self.config.local:
                self._start_local_dealer()
            for wid in range(self.config.max_sessions):
                workers[wid] = self._spawn(ctx, wid)
            self.log(f"serving {self.config.weights_mode}-weights model {tuple(self.shape[1:])} on "
                     f"{self.address[0]}:{self.address[1]} ({self.config.max_sessions} session(s) at once); "
                     f"dealer {self.dealer_address[0]}:{self.dealer_address[1]}")  # fmt: skip
            if ready is not None:
                ready(self)
            self._supervise(ctx, workers)
        finally:
            self._shutdown(workers)
            torch.set_num_threads(threads)
        return list(self.records)

    def stop(self) -> None:
        self.stopping.set()

    @property
    def active(self) -> list[str]:
        """The clients of the sessions running now."""
        return [w.client for w in getattr(self, "_workers", {}).values() if w.busy_since is not None]

    def _print(self, line: str) -> None:
        with self._print_lock:  # the dealer thread (--local) logs too
            print(line, flush=True)

    def _spawn(self, ctx, wid: int) -> _Worker:
        c = self.config
        p = ctx.Process(target=_worker_main, daemon=True, name=f"deepshare-session-{wid}",
                        args=(wid, self._listener, self.packed, self.shape, c.weights_mode, self.key, self.dealer_key,
                              self.dealer_address, c.max_images, c.dealer_timeout, c.session_timeout, self._events,
                              self._stop_workers, c.threads))  # fmt: skip
        p.start()
        return _Worker(p)

    def _supervise(self, ctx, workers: dict[int, _Worker]) -> None:
        while not self.stopping.is_set():
            self._drain(workers, 0.2)
            now = time.monotonic()
            for wid, w in list(workers.items()):
                if w.busy_since is not None and now - w.busy_since > self.config.session_timeout:
                    w.process.kill()
                    w.process.join(5)
                    self._record(SessionRecord(wid, w.client, "failed",
                                               message=f"ran past --session-timeout {self.config.session_timeout:.0f}s: "
                                                       f"stopped"))  # fmt: skip
                    workers[wid] = self._spawn(ctx, wid)
                elif not w.process.is_alive():
                    self._drain(workers, 0.0)  # its last words first
                    if not w.up:  # it never started: a fresh one would die the same way, over and over
                        raise DeepShareError(
                            f"a session worker could not start (exit code {w.process.exitcode}); from a script, "
                            "start the server under `if __name__ == '__main__':` (its workers are spawned "
                            "processes that import the script)")  # fmt: skip
                    if w.busy_since is not None:
                        self._record(SessionRecord(wid, w.client, "failed",
                                                   message=f"its worker died (exit code {w.process.exitcode})"))
                    w.process.join(1)
                    workers[wid] = self._spawn(ctx, wid)

    def _drain(self, workers: dict[int, _Worker], timeout: float) -> None:
        while True:
            try:
                kind, wid, payload = self._events.get(timeout=timeout)
            except queue_mod.Empty:
                return
            timeout = 0.0
            w = workers.get(wid)
            if kind == "up" and w is not None:
                w.up = True
            elif kind == "busy" and w is not None:
                w.busy_since, w.client = time.monotonic(), payload
            elif kind == "record":
                if w is not None:
                    w.busy_since = None
                self._record(SessionRecord(**payload))
            elif kind == "log":
                self.log(payload)

    def _record(self, rec: SessionRecord) -> None:
        self.records.append(rec)
        self.counts[rec.status] += 1
        if self.on_record is not None:
            self.on_record(rec)
        else:
            self.log(rec.line())

    def _shutdown(self, workers: dict[int, _Worker]) -> None:
        """Stop accepting; idle workers go at once, running sessions finish (up to the session timeout, or
        until a second SIGINT/SIGTERM)."""
        if hasattr(self, "_stop_workers"):
            self._stop_workers.set()
        self.stopping.clear()  # from here, a second signal means: now
        running = [w for w in workers.values() if w.busy_since is not None]
        if running:
            self.log(f"stopping: waiting for {len(running)} running session(s) (again to stop them now)")
        for w in workers.values():
            if w.busy_since is None and w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + self.config.session_timeout
        for w in workers.values():
            idle_until = time.monotonic() + 5.0  # an idle worker exits on SIGTERM at once
            while w.process.is_alive() and time.monotonic() < deadline and not self.stopping.is_set():
                if w.busy_since is None and time.monotonic() > idle_until:
                    break
                self._drain(workers, 0.2)
            if w.process.is_alive():
                w.process.kill()
            w.process.join(5)
        if hasattr(self, "_events"):
            self._drain(workers, 0.0)
        if self._listener is not None:
            self._listener.close()
        if self._dealer is not None:
            self._dealer.stop()
        if workers:
            self.log(f"server stopped after {self.counts['ok']} session(s) ({self.counts['refused']} refused, "
                     f"{self.counts['failed']} failed)")

    def _start_local_dealer(self) -> None:
        """A dealer thread in this process (``--local``): a try-out needs no third terminal."""
        from ..mpc.dealer.sessions import DealerServer
        from ..mpc.launcher import dealer_digest
        from ..mpc.lowering import lower

        graph, mode = self.weightless, self.config.weights_mode

        def plan_for(shape, count):
            program = lower(graph, tuple(shape), mode)
            return dealer_digest(program, count), program

        listener = socket.create_server(("127.0.0.1", 0))
        self._dealer = DealerServer({0: self.dealer_key, 1: self.key}, plan_for, listener,
                                    timeout=self.config.session_timeout, log=self.log)  # fmt: skip
        threading.Thread(target=self._dealer.serve, daemon=True, name="deepshare-dealer").start()
        self.dealer_address = listener.getsockname()[:2]


# ---- the worker process ------------------------------------------------------------------------
class _Refusal(Exception):
    """A handshake refused: logged, and the worker goes on."""


def _worker_main(wid: int, listener: socket.socket, packed: dict, shape: tuple[int, ...], weights_mode: str,
                 key: bytes, dealer_key: bytes, dealer: tuple[str, int], max_images: int, dealer_timeout: float,
                 session_timeout: float, events, stop, threads: int = 1) -> None:  # fmt: skip
    """Serve sessions one after another until ``stop``; exit after a session that failed mid-way."""
    from ..mpc.launcher import dealer_digest
    from ..mpc.lowering import lower
    from ..mpc.transport import unpack

    busy, leaving = threading.Event(), threading.Event()

    def on_term(*_):
        if not busy.is_set():
            os._exit(0)
        leaving.set()  # finish this session, then go

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    torch.set_num_threads(1)
    gm = unpack(packed)
    program = lower(gm, shape, weights_mode)
    events.put(("up", wid, None))
    listener.settimeout(0.5)
    while not (stop.is_set() or leaving.is_set()):
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        busy.set()
        events.put(("busy", wid, peer[0]))
        try:
            rec = _session(wid, conn, peer[0], gm, program, shape, weights_mode, key, dealer_key, dealer, max_images,
                           dealer_timeout, session_timeout, dealer_digest, threads)  # fmt: skip
        except _Refusal as e:
            events.put(("record", wid, SessionRecord(wid, peer[0], "refused", message=str(e)).__dict__))
            continue
        except BaseException as e:  # noqa: BLE001 - the session broke mid-way: log it, and end this worker
            msg = _failure(e)
            events.put(("record", wid, SessionRecord(wid, peer[0], "failed", message=msg).__dict__))
            events.close()
            events.join_thread()
            os._exit(1)
        finally:
            conn.close()
            busy.clear()
        events.put(("record", wid, rec.__dict__))


def _session(wid, conn, client, gm, program, shape, weights_mode, key, dealer_key, dealer, max_images,
             dealer_timeout, session_timeout, dealer_digest, threads=1) -> SessionRecord:  # fmt: skip
    from ..mpc.dealer.channel import connect_dealer
    from ..mpc.executor import CrypTenBackend
    from ..mpc.handshake import HandshakeError, plan_digest, serve_client
    from ..mpc.launcher import _inference_party, free_port
    from .control import Control

    base = plan_digest(program)

    def plan_for(hello):
        count = hello.get("count")
        if not isinstance(count, int) or not 1 <= count <= max_images:
            raise DeepShareError(f"a session takes 1 to {max_images} images (--max-images), not {count!r}")
        return _count_plan(base, count)

    tic = time.perf_counter()
    try:
        session = serve_client(conn, key, plan_for, free_port())
    except HandshakeError as e:
        raise _Refusal(first_line(e, 200)) from None
    count = int(session.hello["count"])
    control = Control(conn, key, session.id)
    link = _dealer_link(control, connect_dealer, dealer_key, dealer_digest(program, count), dealer, shape, count,
                        session.id, dealer_timeout, session_timeout)  # fmt: skip
    backend = CrypTenBackend("separate", threads)
    backend.attach_dealer(link)
    backend.start(0, conn.getsockname()[0], session.store_port)
    try:
        report = _inference_party(backend, 0, gm, shape, None, weights_mode, False, count)
    finally:
        backend.stop()
    return SessionRecord(wid, client, "ok", images=count, bytes=report["bytes"], rounds=report["rounds"],
                         setup_bytes=int(report["setup"]["bytes"]), wall_s=time.perf_counter() - tic)  # fmt: skip


def _dealer_link(control, connect_dealer, key, plan, dealer, shape, count, session, dealer_timeout, timeout):
    """Authenticate the dealer, tell the client ``ready`` once it has proved itself, then wait for its verdict
    (which comes when the client has joined the dealer too).  A dealer not there: one error line to the client."""

    greeted, out = threading.Event(), {}

    def run():
        try:
            out["link"] = connect_dealer(0, key, plan, *dealer, input_shape=shape, count=count, timeout=timeout,
                                         connect_timeout=dealer_timeout, session=session, on_greeted=greeted.set)  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e
        greeted.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    if not greeted.wait(dealer_timeout + 15.0) or "error" in out:
        why = first_line(out.get("error", TimeoutError("no answer")), 160)
        control.send("error", message=f"the server cannot reach its dealer ({why})")
        raise _Refusal(f"no dealer: {why}")
    control.send("ready", dealer=list(dealer))
    t.join(timeout)
    if "link" not in out:
        e = out.get("error", TimeoutError("no verdict"))
        raise _Refusal(f"the dealer did not pair this session: {first_line(e, 160)}") from None
    return out["link"]


def _failure(e: BaseException) -> str:
    """One line for a session that broke mid-way: a peer that went away is said as such."""
    text = first_line(e, 400)
    if any(t in text for t in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")):
        return "the client (or the dealer) went away mid-inference; the session was dropped"
    return text[:200] if isinstance(e, DeepShareError) else f"{type(e).__name__}: {text[:200]}"


def _count_plan(base: str, count: int) -> str:
    """The plan hash of ``count`` inferences after one setup (as :func:`~..mpc.launcher._inference_plan`)."""
    import hashlib

    return base if count == 1 else hashlib.sha256(f"{base}:{count}".encode()).hexdigest()

