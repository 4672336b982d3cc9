"""A session's control line: the handshake's socket, kept open for a few MAC'd messages.

After the handshake (:func:`~..mpc.handshake.serve_client`) the server tells the client, on the
same connection, ``ready`` (with the dealer's address) once its dealer link stands, or ``error``
with one line if it cannot serve the session (no dealer, a broken worker).  Each message carries
an HMAC under the session key over (session name, sequence number, body), so nobody on the path
can forge or replay one.  The MPC traffic itself runs on the backend's own rendezvous.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from ..mpc.handshake import HandshakeError, _mac, _recv, _same, _send

__all__ = ["Control"]


class Control:
    """One end of a session's control line (``key`` and ``session`` from the handshake)."""

    def __init__(self, sock: socket.socket, key: bytes, session: str) -> None:
        self.sock, self.key, self.session = sock, key, session
        self.sent = self.received = 0

    def send(self, kind: str, **body: Any) -> None:
        text = json.dumps({"kind": kind, **body}, sort_keys=True)
        _send(self.sock, {"body": text, "mac": _mac(self.key, "control", self.session, self.sent, text)})
        self.sent += 1

    def recv(self, timeout: float) -> dict[str, Any]:
        """The next message; :class:`HandshakeError` for a forged one, ConnectionError/TimeoutError as they come."""
        msg = _recv(self.sock, time.monotonic() + timeout)
        text = msg.get("body")
        if not isinstance(text, str) or not _same(msg.get("mac"), _mac(self.key, "control", self.session,
                                                                          self.received, text)):  # fmt: skip
            raise HandshakeError("the server sent an unauthenticated control message")
        self.received += 1
        return json.loads(text)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
