"""A dealer that serves many sessions: pairs each server with its client by the session's name.

One ``deepshare dealer`` process answers every session of a ``deepshare serve`` (and the one-shot
``private-infer --rank`` runs too).  Each connection is greeted on a thread of its own
(:func:`~.channel.greet`: key, nonces, X25519); a greeted party waits until the other party of its
session -- the one announcing the same session name, which both took from their own handshake
(:func:`~..handshake.session_id`) -- has been greeted too, then the pair is checked
(:func:`~.channel.check_pair`: same inputs, the dealer's own plan hash) and dealt
(:func:`~.service.deal_session`).  The dry passes take turns under one lock (CrypTen's state is one
per process); sending is outside it, so one slow client stalls only its own session.

A party whose partner never comes is dropped after ``pair_timeout``; a stranger is refused and
logged; neither stops the dealer.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import DeepShareError, first_line
from .channel import _Pending, check_pair, greet, links_of
from .service import deal_session

__all__ = ["DealerServer"]

_log = logging.getLogger(__name__)
KEEP = 1000  # reports kept in memory: a dealer that runs for months must not grow with its sessions


@dataclass
class _Waiting:
    parties: dict[int, _Pending] = field(default_factory=dict)
    since: float = field(default_factory=time.monotonic)


class DealerServer:
    """Accept parties on ``listener`` until stopped (or ``sessions`` are dealt); one line per session.

    ``keys``: ``{0: server's key, 1: client's key}``.  ``plan_for(input_shape, count)`` gives the
    dealer's (plan hash, program) for what a pair announces.  ``log(line)`` receives a line per
    session dealt, refused or failed.
    """

    def __init__(self, keys: dict[int, bytes], plan_for: Callable, listener: socket.socket, *,
                 timeout: float = 600.0, step_timeout: float = 10.0, pair_timeout: float = 60.0,
                 log: Callable[[str], None] | None = None,
                 on_report: Callable[[dict[str, Any]], None] | None = None) -> None:  # fmt: skip
        self.keys, self.plan_for, self.listener = keys, plan_for, listener
        self.timeout, self.step_timeout, self.pair_timeout = timeout, step_timeout, pair_timeout
        self.log = log or _log.info
        self.on_report = on_report
        self.lock = threading.Lock()  # one dry pass at a time
        self.cv = threading.Condition()
        self.waiting: dict[str, _Waiting] = {}
        self.reports: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEEP)  # the latest only
        self.ended = 0  # sessions dealt or failed, all of them
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    # ---- the accept loop ---------------------------------------------------------------------
    def serve(self, sessions: int = 0, deadline: float | None = None) -> list[dict[str, Any]]:
        """Serve until :meth:`stop` (or, with ``sessions`` > 0, until that many were dealt or failed; or
        ``deadline`` seconds passed).  Every report, a failed session's with ``"error"``."""
        self.listener.settimeout(0.2)
        end = None if deadline is None else time.monotonic() + deadline
        try:
            while not self.stopping.is_set():
                if sessions and self.ended >= sessions:
                    break
                if end is not None and time.monotonic() > end:
                    break
                try:
                    conn, peer = self.listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self.stopping.is_set():
                        break
                    raise
                t = threading.Thread(target=self._handle, args=(conn, peer[0]), daemon=True)
                t.start()
                self.threads = [x for x in self.threads if x.is_alive()] + [t]
        finally:
            for t in self.threads:  # sessions already paired finish; lone waiters give up at pair_timeout
                t.join(self.timeout)
        return list(self.reports)

    def stop(self) -> None:
        self.stopping.set()
        with self.cv:
            self.cv.notify_all()

    def _report(self, report: dict[str, Any]) -> None:
        with self.cv:
            self.reports.append(report)
            self.ended += 1
        if self.on_report is not None:
            self.on_report(report)

    # ---- one connection ----------------------------------------------------------------------
    def _handle(self, conn: socket.socket, peer: str) -> None:
        conn.settimeout(self.step_timeout)
        try:
            p = greet(conn, peer, self.keys, time.monotonic() + self.step_timeout)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self.log(f"dealer: refused a connection from {peer}: {first_line(e, 120)}")
            conn.close()
            return
        pair = self._pair(p)
        if pair is None:
            return
        self._deal(*pair)

    def _pair(self, p: _Pending) -> tuple[_Pending, _Pending] | None:
        """Wait for the other party of ``p``'s session; the thread that completes a pair deals it."""
        slot = p.session  # a plan mismatch is found by check_pair, and said to both
        with self.cv:
            w = self.waiting.setdefault(slot, _Waiting())
            old = w.parties.pop(p.rank, None)
            if old is not None:
                old.sock.close()  # a party reconnected: keep the newest
            w.parties[p.rank] = p
            if len(w.parties) == 2:
                del self.waiting[slot]
                self.cv.notify_all()
                return w.parties[0], w.parties[1]
            deadline = time.monotonic() + self.pair_timeout
            while self.waiting.get(slot) is w and w.parties.get(p.rank) is p:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping.is_set():
                    w.parties.pop(p.rank, None)
                    if not w.parties:
                        self.waiting.pop(slot, None)
                    p.sock.close()
                    self.log(f"dealer: party {p.rank} from {p.peer} waited {self.pair_timeout:.0f}s for its peer "
                             f"(session {p.session[:8] or '-'}): dropped")  # fmt: skip
                    return None
                self.cv.wait(min(left, 0.5))
        return None  # the other thread took the pair (or ``p`` was replaced by a reconnect)

    def _deal(self, p0: _Pending, p1: _Pending) -> None:
        tic = time.perf_counter()
        name = p0.session[:8] or "-"
        try:
            program = check_pair(p0, p1, self.plan_for)
            link0, link1 = links_of(p0, p1, self.timeout)
            try:
                report = deal_session(program, link0, link1, p0.count, lock=self.lock).to_dict()
            finally:
                link0.close()
                link1.close()
        except (DeepShareError, OSError, ValueError) as e:
            for p in (p0, p1):
                p.sock.close()
            line = f"session {name} ({p0.peer} + {p1.peer}) failed: {first_line(e, 160)}"
            self._report({"session": p0.session, "error": line})
            self.log(f"dealer: {line}")
            return
        report["session"] = p0.session
        self._report(report)
        if self.on_report is not None:
            return  # the caller says it
        self.log(f"dealer: session {name} server {p0.peer} client {p1.peer}: {p0.count} inference(s), "
                 f"{report['bytes'][1] / 1e6:,.2f} MB to the client in {report['messages'][1]} message(s), "
                 f"{time.perf_counter() - tic:.2f} s")  # fmt: skip
