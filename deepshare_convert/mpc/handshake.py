"""The handshake two parties run before any share moves: a shared key and the same plan.

CrypTen's rendezvous (torch.distributed over TCP) accepts whoever connects first and checks
nothing about the program the other side runs.  So before a party starts its backend, party 0
listens on the agreed port and party 1 connects there; the two then

1. **authenticate each other** with a shared secret key: each sends a fresh random nonce and
   proves knowledge of the key with HMAC-SHA256 over (protocol version, its rank, both nonces)
   -- party 0 first, party 1 second with its plan hash under the same MAC; proofs are checked
   with :func:`hmac.compare_digest`.  A peer without the key is refused and party 0 keeps
   listening for the real one (until ``timeout``): a stranger who connects first cannot take
   the session, only delay it by at most ``step_timeout``;
2. **compare the plan**: the SHA-256 of the lowered MPC program (:func:`plan_digest`: ops,
   shapes, handlers, graph, module settings, weights mode, and the weights themselves only in
   ``public`` mode, where both parties hold them).  A mismatch stops both parties with a
   one-line error.

Only after both checks does party 0 tell party 1 (under the MAC) the port of the backend's own
rendezvous, so no share -- and no CrypTen start-up traffic -- ever reaches an unauthenticated
peer.  The key comes from a file (``--key-file``, refused if group/others can read it) or the
``DEEPSHARE_MPC_KEY`` environment variable, never from a command-line value; the one-command
local launch makes a fresh random key per run and hands it to both child processes itself.

What this does not do: encrypt or authenticate the backend's traffic after the handshake (gloo
over TCP) -- run that over WireGuard or another tunnel (docs/private_inference.md, "Three hosts,
safely").  No crypten import.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DeepShareError
from .fixed_point import ACTIVATION_BITS, CONSTANT_BITS, WEIGHT_BITS

if TYPE_CHECKING:
    from .lowering import Program

__all__ = [
    "KEY_ENV",
    "PROTOCOL",
    "HandshakeError",
    "Session",
    "authenticate",
    "load_key",
    "serve_client",
    "session_id",
    "new_key",
    "plan_digest",
    "require_key",
]

PROTOCOL = "deepshare-mpc-handshake/1"
KEY_ENV = "DEEPSHARE_MPC_KEY"
MIN_KEY_BYTES = 16
MAX_MESSAGE = 4096  # every handshake message is a small JSON object
_log = logging.getLogger(__name__)


class HandshakeError(DeepShareError):
    """No key, a peer that failed authentication, or a peer running another plan."""


# ---- keys -------------------------------------------------------------------------------------
def new_key() -> bytes:
    """A fresh random key (64 hex characters): what the local launcher gives its two children."""
    return secrets.token_hex(32).encode()


def _check_key(key: bytes, where: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise HandshakeError(f"the MPC key from {where} is too short ({len(key)} bytes, need {MIN_KEY_BYTES}+): "
                             f"make one with `openssl rand -hex 32`")  # fmt: skip
    return key


def load_key(key_file: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> bytes | None:
    """The shared key from ``key_file``, else from ``$DEEPSHARE_MPC_KEY``; None when neither is set.

    A key file that group or others may read (or write) is refused, as ssh refuses such
    private keys: the key is what stops a stranger from running the protocol with us.
    """
    environ = os.environ if environ is None else environ
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise HandshakeError(f"--key-file {path}: no such file")
        mode = stat.S_IMODE(path.stat().st_mode)
        if os.name == "posix" and mode & 0o077:
            raise HandshakeError(f"--key-file {path} is accessible to other users (mode {mode:o}): "
                                 f"run `chmod 600 {path}`")  # fmt: skip
        return _check_key(path.read_bytes().strip(), f"--key-file {path}")
    value = environ.get(KEY_ENV, "").strip()
    return _check_key(value.encode(), f"${KEY_ENV}") if value else None


def require_key(key_file: str | os.PathLike | None = None) -> bytes:
    """:func:`load_key`, or a one-line error saying how to configure one (two-host runs need it)."""
    key = load_key(key_file)
    if key is None:
        raise HandshakeError(f"a two-host run needs a shared key: pass --key-file PATH (mode 600, e.g. from "
                             f"`openssl rand -hex 32`) or set {KEY_ENV}, the same on both parties")  # fmt: skip
    return key


# ---- the plan ---------------------------------------------------------------------------------
def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if type(target).__name__ == "OpOverload":
        return str(target)  # aten.conv2d.default
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def plan_digest(program: Program, weights: bool = True) -> str:
    """SHA-256 of what both parties must agree on: the lowered program, never private weights.

    Covered: protocol version, the fixed-point format, weights mode, input/output shapes, every op's handler and
    counts, the graph (ops, targets, arguments), every module's type and settings, and every
    parameter / buffer's name, dtype and shape.  Tensor *contents* only where both parties
    hold them: all of them in ``public`` mode; in ``private`` mode only the non-float ones (the
    gates' channel maps), since party 1 holds a zeroed skeleton.  ``weights=False`` leaves float
    contents out in both modes: the digest the dealer, which holds no weights, checks.
    """
    from torch.fx.node import Node, map_aggregate

    gm = program.gm

    def ref(a: Any) -> Any:
        return f"%{a.name}" if isinstance(a, Node) else a

    doc = {
        "protocol": PROTOCOL,
        "fixed_point": [ACTIVATION_BITS, WEIGHT_BITS, CONSTANT_BITS],  # parties on other grids decode garbage
        "weights_mode": program.weights_mode,
        "truncation": program.truncation,  # exact and local truncation open different values
        "input_shape": list(program.input_shape),
        "output_shape": list(program.output_shape),
        "ops": [op.to_dict() for op in program.ops],
        "graph": [[n.op, n.name, _target_name(n.target), repr(map_aggregate(n.args, ref)),
                   repr(map_aggregate(n.kwargs, ref))] for n in gm.graph.nodes],
        "modules": [[name, type(m).__name__, m.extra_repr()] for name, m in gm.named_modules()],
    }  # fmt: skip
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=repr).encode())
    tensors = dict(gm.named_parameters())
    tensors.update(dict(gm.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if (weights and program.weights_mode == "public") or not t.is_floating_point():
            h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- the wire ---------------------------------------------------------------------------------
class _Refused(Exception):
    """This connection is not our peer (party 0 logs it and keeps listening)."""


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _read(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake timed out")
        sock.settimeout(left)  # a bound on the whole exchange, not per recv: no slow drip
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed during the handshake")
        buf += chunk
    return buf


def _recv(sock: socket.socket, deadline: float) -> dict[str, Any]:
    n = int.from_bytes(_read(sock, 4, deadline), "big")
    if n > MAX_MESSAGE:
        raise ValueError(f"handshake message of {n} bytes")
    obj = json.loads(_read(sock, n, deadline))
    if not isinstance(obj, dict):
        raise ValueError("handshake message is not an object")
    return obj


def _mac(key: bytes, *parts: Any) -> str:
    return hmac.new(key, "\x1f".join(str(p) for p in (PROTOCOL, *parts)).encode(), hashlib.sha256).hexdigest()


def _same(a: Any, b: str) -> bool:
    return isinstance(a, str) and hmac.compare_digest(a.encode(), b.encode())


def _short(digest: Any) -> str:
    return str(digest)[:12]


@dataclass
class Session:
    """A successful handshake: where the backend meets, and who was turned away before."""

    store_port: int
    refused: list[str] = field(default_factory=list)  # "ADDR: reason", party 0 only
    id: str = ""  # from both nonces: names this session to the dealer (both parties know it, no one chose it)
    hello: dict[str, Any] = field(default_factory=dict)  # party 1's hello (what a server reads its request from)
    conn: socket.socket | None = field(default=None, repr=False)  # kept open with ``keep``: the session's control line


def session_id(nonce_1: str, nonce_0: str) -> str:
    """The session's name: a hash of both fresh nonces, so neither party alone picks it."""
    return hashlib.sha256(f"session\x1f{nonce_1}\x1f{nonce_0}".encode()).hexdigest()[:32]


def _serve_one(conn: socket.socket, key: bytes, plan, store_port: int, deadline: float) -> Session:
    """Party 0's side with one connection; raises _Refused for a stranger, HandshakeError on a plan mismatch.

    ``plan``: our plan hash, or a function of party 1's hello that gives it (a server whose plan
    depends on what the client asks for, e.g. the number of images)."""
    hello = _recv(conn, deadline)
    if hello.get("protocol") != PROTOCOL or hello.get("rank") != 1 or not isinstance(hello.get("nonce"), str):
        _send(conn, {"refused": f"not a {PROTOCOL} party 1"})
        raise _Refused("not a deepshare party 1 hello")
    if callable(plan):
        try:
            plan = plan(hello)
        except DeepShareError as e:
            _send(conn, {"refused": str(e)[:200]})
            raise _Refused(str(e)) from None
    nc, ns = hello["nonce"][:64], secrets.token_hex(32)
    _send(conn, {"protocol": PROTOCOL, "rank": 0, "nonce": ns, "proof": _mac(key, "rank0", nc, ns)})
    reply = _recv(conn, deadline)
    if "refused" in reply:
        raise _Refused("it rejected our proof (a different key)")
    their_plan = reply.get("plan")
    if not _same(reply.get("proof"), _mac(key, "rank1", nc, ns, their_plan)):
        _send(conn, {"refused": "authentication failed (wrong or missing key)"})
        raise _Refused("authentication failed (wrong or missing key)")
    verdict = "ok" if _same(their_plan, plan) else "plan-mismatch"
    _send(conn, {"verdict": verdict, "plan": plan, "store_port": store_port,
                 "mac": _mac(key, "verdict", nc, ns, verdict, plan, store_port)})  # fmt: skip
    if verdict != "ok":
        raise HandshakeError(f"party 1 runs a different plan (sha256 {_short(their_plan)}… vs ours {_short(plan)}…): "
                             f"refused before any share was sent")  # fmt: skip
    return Session(store_port, id=session_id(nc, ns), hello=hello)


def serve_client(conn: socket.socket, key: bytes, plan, store_port: int, *, step_timeout: float = 10.0) -> Session:
    """Party 0's handshake on an accepted connection (a server's session); ``conn`` stays open.

    Raises :class:`HandshakeError` for a stranger or another plan (after telling the peer)."""
    conn.settimeout(step_timeout)
    try:
        session = _serve_one(conn, key, plan, store_port, time.monotonic() + step_timeout)
    except _Refused as e:
        raise HandshakeError(str(e)) from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise HandshakeError(f"broken handshake ({type(e).__name__})") from None
    session.conn = conn
    return session


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def _serve(key: bytes, plan: str, addr: str, port: int, store_port: int | None, timeout: float,
           step_timeout: float) -> Session:  # fmt: skip
    """Party 0: accept connections until one authenticates (or ``timeout``); strangers are refused and logged."""
    refused: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        server = socket.create_server((addr, port))  # SO_REUSEADDR on POSIX
    except OSError as e:
        raise HandshakeError(f"party 0 cannot listen on {addr}:{port}: {e.strerror or e}") from None
    with server:
        while (left := deadline - time.monotonic()) > 0:
            server.settimeout(left)
            try:
                conn, peer = server.accept()
            except TimeoutError:
                break
            with conn:
                conn.settimeout(step_timeout)  # the sends; reads share one deadline for the whole exchange
                try:
                    port1 = store_port or _free_port(addr)
                    session = _serve_one(conn, key, plan, port1, time.monotonic() + step_timeout)
                    session.refused = refused
                    return session
                except _Refused as e:
                    reason = str(e)
                except (OSError, ValueError, UnicodeDecodeError) as e:  # a silent or garbled peer
                    reason = f"broken handshake ({type(e).__name__})"
            refused.append(f"{peer[0]}: {reason}")
            _log.warning("party 0 refused a connection from %s: %s; still waiting for party 1", peer[0], reason)
    seen = f" ({len(refused)} connection(s) refused, last from {refused[-1]})" if refused else ""
    raise HandshakeError(f"no authenticated party 1 reached {addr}:{port} within {timeout:.0f}s{seen}")


def _connect(addr: str, port: int, deadline: float, step_timeout: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((addr, port), timeout=step_timeout)
        except OSError as e:  # party 0 not listening yet: retry until the deadline
            if time.monotonic() > deadline:
                raise HandshakeError(f"party 0 did not answer at {addr}:{port}: {e.strerror or e}") from None
            time.sleep(0.1)


def _join(key: bytes, plan: str, addr: str, port: int, timeout: float, step_timeout: float,
          request: dict[str, Any] | None = None, keep: bool = False) -> Session:  # fmt: skip
    """Party 1: connect, check party 0's proof, send ours with our plan hash, read the verdict.

    ``request``: more fields of our hello (what a server needs to know to compute its plan; they
    are bound by the plan hash both check).  ``keep``: leave the connection open (``Session.conn``)."""
    deadline = time.monotonic() + timeout
    conn = _connect(addr, port, deadline, step_timeout)
    try:
        session = _join_on(conn, key, plan, addr, port, deadline, request or {})
    except BaseException:
        conn.close()
        raise
    if keep:
        session.conn = conn
    else:
        conn.close()
    return session


def _join_on(conn: socket.socket, key: bytes, plan: str, addr: str, port: int, deadline: float,
             request: dict[str, Any]) -> Session:  # fmt: skip
    try:
        nc = secrets.token_hex(32)
        _send(conn, {**request, "protocol": PROTOCOL, "rank": 1, "nonce": nc})
        hello = _recv(conn, deadline)  # party 0 may be busy with a stranger first: wait up to the deadline
        if "refused" in hello:
            raise HandshakeError(f"party 0 at {addr}:{port} refused us: {str(hello['refused'])[:100]}")
        ns = hello.get("nonce")
        if not isinstance(ns, str) or not _same(hello.get("proof"), _mac(key, "rank0", nc, ns)):
            _send(conn, {"refused": "party 0 failed authentication"})
            raise HandshakeError(f"the peer at {addr}:{port} failed authentication (wrong key, or not party 0): "
                                 f"refused before any share was sent")  # fmt: skip
        _send(conn, {"plan": plan, "proof": _mac(key, "rank1", nc, ns, plan)})
        end = _recv(conn, deadline)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise HandshakeError(f"handshake with {addr}:{port} broke off ({type(e).__name__}: {e})") from None
    if "refused" in end:
        raise HandshakeError(f"party 0 at {addr}:{port} refused us: {str(end['refused'])[:100]} "
                             f"(are both parties using the same key?)")  # fmt: skip
    verdict, theirs, store_port = end.get("verdict"), end.get("plan"), end.get("store_port")
    if not _same(end.get("mac"), _mac(key, "verdict", nc, ns, verdict, theirs, store_port)):
        raise HandshakeError(f"party 0 at {addr}:{port} sent an unauthenticated verdict: refused")
    if verdict != "ok" or not _same(theirs, plan):
        raise HandshakeError(f"party 0 runs a different plan (sha256 {_short(theirs)}… vs ours {_short(plan)}…): "
                             f"refused before any share was sent")  # fmt: skip
    if not isinstance(store_port, int) or not 0 < store_port < 65536:
        raise HandshakeError(f"party 0 sent an invalid rendezvous port {store_port!r}")
    return Session(store_port, id=session_id(nc, ns))


def authenticate(rank: int, key: bytes, plan: str, addr: str, port: int, *, store_port: int | None = None,
                 timeout: float = 600.0, step_timeout: float = 10.0, request: dict[str, Any] | None = None,
                 keep: bool = False) -> Session:  # fmt: skip
    """Run the handshake as party ``rank`` on ``addr:port``; the port where the backend then meets.

    Party 0 listens (``store_port``: the backend's rendezvous port it announces, a free one
    if None) and turns strangers away until party 1 authenticates or ``timeout`` passes;
    party 1 connects (retrying until party 0 listens).  ``step_timeout`` bounds a whole
    exchange at party 0, so a silent or slow stranger delays it by at most that much.
    """
    if rank == 0:
        return _serve(key, plan, addr, port, store_port, timeout, step_timeout)
    return _join(key, plan, addr, port, timeout, step_timeout, request, keep)
