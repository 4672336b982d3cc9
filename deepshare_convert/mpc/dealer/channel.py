"""The dealer's links to the two parties: an authenticated key exchange, then encrypted corrections.

Each party connects to the dealer and runs, under the shared key ``K`` (the same key scheme as
:mod:`..handshake`):

1. party -> dealer: protocol, rank, a nonce, an ephemeral X25519 public key, the input shape and
   the number of inferences;
2. dealer -> party: its nonce, its X25519 public key, and an HMAC-SHA256 proof over the transcript;
3. party -> dealer: its plan hash under the same MAC (a party that cannot check the dealer's proof
   stops here: a stranger posing as the dealer never gets a plan, let alone a share);
4. dealer -> party, once *both* parties are in: the verdict (its own plan hash, checked against
   both parties') under the MAC.

Both ends then derive, with HKDF-SHA256 over the X25519 secret and the transcript, the 32-byte
PRG seed of this party and an AES-GCM key.  A passive observer -- the other party included, even
though it knows ``K`` -- sees only public keys, so it learns neither the seed nor the corrections,
which travel to the client AES-GCM-encrypted.  (With one ``K`` for all three, a server that can
also *rewrite* the client's traffic could pose as the dealer to the client; a client link key of
its own -- the client's ``--dealer-key-file``, the dealer's ``--client-key-file`` -- rules that
out: docs/private_inference.md, threat model.)
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..handshake import HandshakeError, _mac, _recv, _same, _send, _short

__all__ = ["DEALER_PROTOCOL", "DealerLink", "PartyLink", "connect_dealer", "accept_parties", "check_pair", "greet",
           "links_of"]

DEALER_PROTOCOL = "deepshare-mpc-dealer/1"
CHUNK = 1 << 24  # bytes of plaintext per AES-GCM frame
_log = logging.getLogger(__name__)


def _public(priv: X25519PrivateKey) -> str:
    return priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _derive(priv: X25519PrivateKey, peer_pub: str, transcript: str) -> tuple[bytes, bytes]:
    """(PRG seed, AES-GCM key) of one party's link, from the exchange and everything said in it."""
    shared = priv.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_pub)))
    okm = HKDF(hashes.SHA256(), 64, salt=None, info=hashlib.sha256(transcript.encode()).digest()).derive(shared)
    return okm[:32], okm[32:]


def _transcript(rank: int, nonce_p: str, nonce_d: str, pub_p: str, pub_d: str, session: str = "") -> str:
    """What both MACs cover; ``session`` (a served session's name, from the parties' handshake) binds
    the link to one session, so a dealer serving many pairs each party with its own peer."""
    parts = (DEALER_PROTOCOL, str(rank), nonce_p, nonce_d, pub_p, pub_d)
    return "\x1f".join((*parts, session) if session else parts)


class _Frames:
    """Length-prefixed AES-GCM frames with counter nonces (one direction per key: dealer -> party)."""

    def __init__(self, sock: socket.socket, key: bytes):
        self.sock, self.aead, self.counter = sock, AESGCM(key), 0

    def _nonce(self) -> bytes:
        self.counter += 1
        return self.counter.to_bytes(12, "big")

    def send(self, data: bytes) -> None:
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        self.sock.sendall(len(chunks).to_bytes(4, "big"))
        for chunk in chunks:
            sealed = self.aead.encrypt(self._nonce(), chunk, None)
            self.sock.sendall(len(sealed).to_bytes(8, "big") + sealed)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("the dealer closed the connection")
            buf += chunk
        return bytes(buf)

    def recv(self) -> bytes:
        count = int.from_bytes(self._read(4), "big")
        parts = []
        for _ in range(count):
            n = int.from_bytes(self._read(8), "big")
            if n > CHUNK + 16:
                raise ConnectionError(f"dealer frame of {n} bytes")
            parts.append(self.aead.decrypt(self._nonce(), self._read(n), None))
        return b"".join(parts)


@dataclass
class DealerLink:
    """A party's authenticated link to the dealer: its PRG seed and the encrypted correction stream."""

    rank: int
    seed: bytes
    frames: _Frames
    bytes: int = 0  # correction payload received (8 per element), the offline phase
    messages: int = 0
    seconds: float = 0.0

    def receive(self) -> torch.Tensor:
        """One inference's corrections (the client; the server receives none)."""
        tic = time.perf_counter()
        data = self.frames.recv()
        self.seconds += time.perf_counter() - tic
        self.bytes += len(data)
        self.messages += 1
        return torch.from_numpy(np.frombuffer(data, dtype=np.int64).copy())

    def close(self) -> None:
        self.frames.sock.close()


@dataclass
class PartyLink:
    """The dealer's side of one party's link."""

    rank: int
    seed: bytes
    frames: _Frames
    peer: str
    bytes: int = 0
    messages: int = 0

    def send(self, flat: torch.Tensor) -> None:
        data = flat.contiguous().numpy().tobytes()
        self.frames.send(data)
        self.bytes += len(data)
        self.messages += 1

    def close(self) -> None:
        self.frames.sock.close()


def _connect(addr: str, port: int, deadline: float, step_timeout: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((addr, port), timeout=step_timeout)
        except OSError as e:  # the dealer not listening yet: retry until the deadline
            if time.monotonic() > deadline:
                raise HandshakeError(f"the dealer did not answer at {addr}:{port}: {e.strerror or e}") from None
            time.sleep(0.1)


def connect_dealer(rank: int, key: bytes, plan: str, addr: str, port: int, *, input_shape, count: int = 1,
                   timeout: float = 600.0, step_timeout: float = 10.0, session: str = "",
                   connect_timeout: float | None = None, on_greeted=None) -> DealerLink:  # fmt: skip
    """Party ``rank``'s side: authenticate the dealer at ``addr:port``, agree on the plan, derive the link.

    ``session``: the session's name (:attr:`~..handshake.Session.id`) when the dealer serves many.
    ``connect_timeout``: how long to retry a dealer not listening (default ``timeout``);
    ``on_greeted()``: called once the dealer has proved itself, before its verdict -- which waits
    for the other party (a server tells its client to come only then)."""
    deadline = time.monotonic() + timeout
    sock = _connect(addr, port, time.monotonic() + (timeout if connect_timeout is None else connect_timeout),
                    step_timeout)  # fmt: skip
    try:
        priv, nonce = X25519PrivateKey.generate(), secrets.token_hex(32)
        pub = _public(priv)
        _send(sock, {"protocol": DEALER_PROTOCOL, "rank": rank, "nonce": nonce, "pub": pub,
                     "input_shape": list(input_shape), "count": int(count), "session": session})  # fmt: skip
        hello = _recv(sock, deadline)
        if "refused" in hello:
            raise HandshakeError(f"the dealer at {addr}:{port} refused us: {str(hello['refused'])[:100]}")
        nd, pd = hello.get("nonce"), hello.get("pub")
        if not (isinstance(nd, str) and isinstance(pd, str)):
            raise HandshakeError(f"the peer at {addr}:{port} is not a deepshare dealer")
        transcript = _transcript(rank, nonce, nd, pub, pd, session)
        if not _same(hello.get("proof"), _mac(key, "dealer", transcript)):
            _send(sock, {"refused": "the dealer failed authentication"})
            raise HandshakeError(f"the peer at {addr}:{port} failed authentication as the dealer (wrong key, or not "
                                 "the dealer): refused before any share was sent")  # fmt: skip
        _send(sock, {"plan": plan, "proof": _mac(key, "party", transcript, plan)})
        if on_greeted is not None:
            on_greeted()
        end = _recv(sock, deadline)
        if "refused" in end:
            raise HandshakeError(f"the dealer at {addr}:{port} refused us: {str(end['refused'])[:100]}")
        verdict, theirs = end.get("verdict"), end.get("plan")
        if not _same(end.get("mac"), _mac(key, "verdict", transcript, verdict, theirs)):
            raise HandshakeError(f"the dealer at {addr}:{port} sent an unauthenticated verdict: refused")
        if verdict != "ok" or not _same(theirs, plan):
            raise HandshakeError(f"the dealer runs a different plan (sha256 {_short(theirs)}… vs ours {_short(plan)}…; "
                                 f"verdict {verdict}): refused before any share was sent")  # fmt: skip
        seed, aead = _derive(priv, pd, transcript)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        sock.close()
        raise HandshakeError(f"dealer handshake with {addr}:{port} broke off ({type(e).__name__}: {e})") from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(timeout)
    return DealerLink(rank, seed, _Frames(sock, aead))


@dataclass
class _Pending:
    rank: int
    sock: socket.socket
    peer: str
    transcript: str
    plan: str
    input_shape: tuple[int, ...]
    count: int
    session: str = ""
    key: bytes = field(repr=False, default=b"")
    seed: bytes = field(repr=False, default=b"")
    aead: bytes = field(repr=False, default=b"")


def greet(conn: socket.socket, peer: str, keys: dict[int, bytes], deadline: float) -> _Pending:
    hello = _recv(conn, deadline)
    rank, nonce, pub = hello.get("rank"), hello.get("nonce"), hello.get("pub")
    if hello.get("protocol") != DEALER_PROTOCOL or rank not in (0, 1) or not isinstance(nonce, str) \
            or not isinstance(pub, str):
        _send(conn, {"refused": f"not a {DEALER_PROTOCOL} party"})
        raise ValueError("not a deepshare party hello")
    key, session = keys[rank], str(hello.get("session") or "")[:64]
    priv, nd = X25519PrivateKey.generate(), secrets.token_hex(32)
    pd = _public(priv)
    transcript = _transcript(rank, nonce[:64], nd, pub, pd, session)
    _send(conn, {"protocol": DEALER_PROTOCOL, "nonce": nd, "pub": pd, "proof": _mac(key, "dealer", transcript)})
    reply = _recv(conn, deadline)
    if "refused" in reply:
        raise ValueError("it rejected our proof (a different key)")
    plan = reply.get("plan")
    if not _same(reply.get("proof"), _mac(key, "party", transcript, plan)):
        _send(conn, {"refused": "authentication failed (wrong or missing key)"})
        raise ValueError("authentication failed (wrong or missing key)")
    seed, aead = _derive(priv, pub, transcript)
    shape = tuple(int(d) for d in hello.get("input_shape") or ())
    return _Pending(rank, conn, peer, transcript, plan, shape, int(hello.get("count", 1)), session, key, seed, aead)


def accept_parties(key: bytes | dict[int, bytes], plan_for, addr: str, port: int, *, timeout: float = 600.0,
                   step_timeout: float = 10.0, listener: socket.socket | None = None,
                   ) -> tuple[PartyLink, PartyLink, Any]:  # fmt: skip
    """The dealer's side: accept until party 0 and party 1 have both authenticated, then check the plan.

    ``key``: one key for both links, or ``{0: server's, 1: client's}`` -- with a key of its own the
    client's link cannot be impersonated by a server that rewrites traffic.

    ``plan_for(input_shape, count)`` gives the dealer's own (plan hash, program) for what the
    parties announce; both parties' hashes must equal it.  Strangers are refused and logged.
    Returns the two links and the program.
    """
    keys = key if isinstance(key, dict) else {0: key, 1: key}
    deadline = time.monotonic() + timeout
    server = listener or socket.create_server((addr, port))
    pending: dict[int, _Pending] = {}
    try:
        while len(pending) < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted({0, 1} - set(pending))
                raise HandshakeError(f"no authenticated party {missing[0]} reached the dealer within {timeout:.0f}s")
            server.settimeout(left)
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(step_timeout)
            try:
                p = greet(conn, peer[0], keys, time.monotonic() + step_timeout)
            except (OSError, ValueError, UnicodeDecodeError) as e:
                _log.warning("the dealer refused a connection from %s: %s", peer[0], e)
                conn.close()
                continue
            if p.rank in pending:
                pending.pop(p.rank).sock.close()  # a party reconnected: keep the newest
            pending[p.rank] = p
        program = check_pair(pending[0], pending[1], plan_for)
    except BaseException:
        for p in pending.values():
            p.sock.close()
        raise
    finally:
        if listener is None:
            server.close()
    link0, link1 = links_of(pending[0], pending[1], timeout)
    return link0, link1, program


def links_of(p0: _Pending, p1: _Pending, timeout: float) -> tuple[PartyLink, PartyLink]:
    """The two checked parties' links (their sockets now carry encrypted frames)."""
    links = tuple(PartyLink(p.rank, p.seed, _Frames(p.sock, p.aead), p.peer) for p in (p0, p1))
    for link in links:
        link.frames.sock.settimeout(timeout)
    return links[0], links[1]


def check_pair(p0: _Pending, p1: _Pending, plan_for) -> Any:
    """Both parties announce the same inputs and the dealer's own plan hash: send each the verdict.

    Returns what ``plan_for`` gave besides the hash (the program); raises after refusing both."""
    pending = {0: p0, 1: p1}
    if (p0.input_shape, p0.count) != (p1.input_shape, p1.count):
        _refuse(pending.values())
        raise HandshakeError(f"the parties announce different inputs ({p0.input_shape} x{p0.count} vs "
                             f"{p1.input_shape} x{p1.count})")  # fmt: skip
    plan, program = plan_for(p0.input_shape, p0.count)
    for p in (p0, p1):
        verdict = "ok" if _same(p.plan, plan) else "plan-mismatch"
        _send(p.sock, {"verdict": verdict, "plan": plan, "mac": _mac(p.key, "verdict", p.transcript, verdict, plan)})
    bad = [p.rank for p in (p0, p1) if not _same(p.plan, plan)]
    if bad:
        raise HandshakeError(f"party {bad[0]} runs a different plan (sha256 {_short(pending[bad[0]].plan)}… vs "
                             f"the dealer's {_short(plan)}…): refused before any share was dealt")  # fmt: skip
    return program


def _refuse(parties) -> None:
    for p in parties:
        try:
            _send(p.sock, {"verdict": "refused", "plan": "", "mac": _mac(p.key, "verdict", p.transcript, "refused", "")})
        except OSError:
            pass
