"""``deepshare query``: the client's side of one session with a ``deepshare serve``.

The client holds its files and the converted directory's ``plan.json`` (in private-weights mode
nothing else of it: :func:`~.artifacts.architecture_only`).  :func:`query` reads and preprocesses
the files (:mod:`.inputs`) before it connects -- a bad file is one line and nothing is sent -- then
runs the handshake announcing how many images it sends, waits for the server's ``ready`` (with
the dealer's address), authenticates the dealer under the session's name, and runs party 1: one
setup, one inference per image.  Only the client learns the outputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DeepShareError, first_line
from .inputs import Inputs, read_inputs

__all__ = ["Answer", "QueryResult", "query"]


@dataclass
class Answer:
    """One image's answer: the label and its softmax probability (segmentation: the mask of labels)."""

    name: str
    label: int | None
    probability: float | None
    logits: np.ndarray
    mask: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.name}
        if self.mask is None:
            out.update(label=self.label, probability=round(float(self.probability), 6))
        else:
            out["mask_shape"] = list(self.mask.shape)
        return out


@dataclass
class QueryResult:
    answers: list[Answer]
    weights_mode: str
    bytes: int = 0
    rounds: int = 0
    setup_bytes: int = 0
    offline_bytes: int = 0
    wall_s: float = 0.0
    resized: list[str] = field(default_factory=list)

    @property
    def logits(self) -> np.ndarray:
        return np.stack([a.logits for a in self.answers])

    def to_dict(self) -> dict[str, Any]:
        return {"weights_mode": self.weights_mode, "answers": [a.to_dict() for a in self.answers],
                "online": {"bytes": self.bytes, "rounds": self.rounds}, "setup_bytes": self.setup_bytes,
                "offline_bytes": self.offline_bytes, "wall_s": round(self.wall_s, 4),
                "resized": self.resized}  # fmt: skip


def _answers(logits: np.ndarray, names: list[str]) -> list[Answer]:
    out = []
    for name, z in zip(names, logits):
        if z.ndim == 3:  # (K, H, W): a label per pixel
            out.append(Answer(name, None, None, z, mask=z.argmax(0).astype(np.uint8)))
            continue
        p = torch.softmax(torch.from_numpy(z).double(), 0)
        out.append(Answer(name, int(p.argmax()), float(p.max()), z))
    return out


def query(
    address: tuple[str, int],
    files: Sequence[str | Path] | Inputs,
    model_dir: str | Path,
    *,
    key: bytes,
    dealer_key: bytes | None = None,
    dealer_address: tuple[str, int] | None = None,
    weights_mode: str = "private",
    timeout: float = 600.0,
    threads: int = 1,
) -> QueryResult:
    """Ask the server at ``address`` for the answers to ``files`` (paths, folders, or read :class:`Inputs`).

    ``model_dir``: the converted directory the server serves (only ``plan.json`` is read in
    ``private`` mode; ``public`` mode reads the weights too, as both parties hold them).
    ``dealer_address`` overrides the dealer the server announces; ``dealer_key`` is this client's
    key with the dealer (default ``key``).  ``threads``: torch threads of this party.
    """
    from ..mpc.dealer.channel import connect_dealer
    from ..mpc.executor import CrypTenBackend
    from ..mpc.handshake import HandshakeError, authenticate, plan_digest
    from ..mpc.launcher import _check_mode, _inference_party, dealer_digest
    from ..mpc.lowering import lower
    from ..mpc.prepare import prepare, strip_weights
    from ..mpc.transport import canonical
    from .artifacts import architecture_only
    from .control import Control
    from .server import _count_plan

    _check_mode(weights_mode)
    tic = time.perf_counter()
    net, input_size, mean, std = _client_model(model_dir, weights_mode, architecture_only)
    inputs = files if isinstance(files, Inputs) else read_inputs(files, input_size, mean, std)
    gm = prepare(net)
    gm = canonical(strip_weights(gm) if weights_mode == "private" else gm)  # hashed as the server's worker does
    shape, count = (1, *input_size), len(inputs.names)
    program = lower(gm, shape, weights_mode)
    host, port = address
    session = authenticate(1, key, _count_plan(plan_digest(program), count), host, port, request={"count": count},
                           keep=True, timeout=timeout)  # fmt: skip
    control = Control(session.conn, key, session.id)
    caller_threads = torch.get_num_threads()  # CrypTen's start sets this process's; given back after
    try:
        try:
            msg = control.recv(timeout)
        except (OSError, ValueError) as e:
            raise DeepShareError(f"the server at {host}:{port} closed the session before it started "
                                 f"({type(e).__name__})") from None  # fmt: skip
        if msg.get("kind") != "ready":
            raise DeepShareError(f"the server at {host}:{port}: {str(msg.get('message', msg))[:200]}")
        dhost, dport = dealer_address or tuple(msg["dealer"])
        if dealer_address is None and dhost in ("127.0.0.1", "localhost", "0.0.0.0") and host not in (
                "127.0.0.1", "localhost"):  # fmt: skip
            dhost = host  # a dealer beside the server, named by its loopback address
        link = connect_dealer(1, dealer_key or key, dealer_digest(program, count), dhost, int(dport),
                              input_shape=shape, count=count, timeout=min(timeout, 60.0), session=session.id)  # fmt: skip
        backend = CrypTenBackend("separate", threads)
        backend.attach_dealer(link)
        backend.start(1, host, session.store_port)
        try:
            report = _inference_party(backend, 1, gm, shape, inputs.x.numpy(), weights_mode, False, count)
        except (HandshakeError, DeepShareError):
            raise
        except BaseException as e:  # noqa: BLE001 - a peer gone mid-run: one line
            raise DeepShareError(f"the private inference broke off: {_why(e)}") from None
        finally:
            backend.stop()
    finally:
        control.close()
        torch.set_num_threads(caller_threads)
    logits = report["output"]
    return QueryResult(_answers(logits, inputs.names), weights_mode, report["bytes"], report["rounds"],
                       int(report["setup"]["bytes"]), report["offline_bytes"], time.perf_counter() - tic,
                       inputs.resized)  # fmt: skip


def _why(e: BaseException) -> str:
    text = first_line(e, 200)
    if isinstance(e, (ConnectionError, EOFError)) or "Connection closed" in text or "reset by peer" in text:
        return f"the server or the dealer went away ({type(e).__name__}: {text})"
    return f"{type(e).__name__}: {text}"


def _client_model(model_dir, weights_mode: str, architecture_only):
    """(model, input size, mean, std): the architecture only in private mode, the full model in public."""
    if weights_mode == "private":
        cm = architecture_only(model_dir)
        return cm.model, cm.input_size, cm.mean, cm.std
    from ..model_or_out import load_any

    loaded = load_any(str(model_dir))
    return loaded.model, tuple(loaded.input_size), loaded.mean, loaded.std
