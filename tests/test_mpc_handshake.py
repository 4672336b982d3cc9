"""The handshake before any share moves: a shared key, the same plan, strangers turned away.

The protocol tests run both sides as threads over real loopback sockets (the handshake needs no
MPC); one test runs two real CrypTen parties (``run_party`` in spawned processes, the two-host
code path) with a stranger connecting first, and checks they still agree with plaintext.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from deepshare_convert.errors import DeepShareError
from deepshare_convert.mpc import handshake as hs
from deepshare_convert.mpc.handshake import HandshakeError, authenticate, load_key, plan_digest
from deepshare_convert.mpc.launcher import free_port, run_party
from deepshare_convert.mpc.lowering import lower, prepare
from deepshare_convert.mpc.prepare import reference, strip_weights

from .test_mpc_backend import _Clear, wait_listening

KEY = b"0123456789abcdef0123456789abcdef"
WRONG = b"fedcba9876543210fedcba9876543210"


def _net(out: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, out)).eval()


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run ``fn`` in a thread; its result or exception lands in the returned dict."""
    box: dict = {}

    def body():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def _dial(port: int, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _drain(s: socket.socket) -> bytes:
    """Everything the other side sends until it closes (a reset counts as closed)."""
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _stranger(port: int, key: bytes) -> list[dict]:
    """A process that speaks the protocol with ``key`` (a wrong one): every message party 0 sent it."""
    got = []
    with _dial(port) as s:
        nc = "ab" * 32
        hs._send(s, {"protocol": hs.PROTOCOL, "rank": 1, "nonce": nc})
        hello = hs._recv(s, time.monotonic() + 10)
        got.append(hello)
        hs._send(s, {"plan": "p", "proof": hs._mac(key, "rank1", nc, hello["nonce"], "p")})
        got.append(hs._recv(s, time.monotonic() + 10))
        assert _drain(s) == b""  # party 0 closed: nothing more
    return got


# ---- the protocol ------------------------------------------------------------------------------
def test_handshake_agrees_on_the_rendezvous_port():
    port = free_port()
    t0, b0 = _in_thread(authenticate, 0, KEY, "plan", "127.0.0.1", port, store_port=4242, timeout=20)
    s1 = authenticate(1, KEY, "plan", "127.0.0.1", port, timeout=20)
    t0.join(20)
    assert b0["result"].store_port == s1.store_port == 4242 and b0["result"].refused == []


def test_strangers_are_refused_and_party_0_keeps_waiting_for_its_peer():
    """A wrong key, garbage and a silent connection come first; none gets a port; the real party 1 then joins."""
    port = free_port()
    t0, b0 = _in_thread(authenticate, 0, KEY, "plan", "127.0.0.1", port, store_port=4242, timeout=30, step_timeout=1)
    got = _stranger(port, WRONG)
    assert set(got[0]) == {"protocol", "rank", "nonce", "proof"}  # party 0's proof: a MAC, useless without the key
    assert got[1] == {"refused": "authentication failed (wrong or missing key)"}  # no plan, no port
    with _dial(port) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")  # garbage: refused, not crashed on
        assert _drain(s) == b""  # closed (or reset) without a word
    with _dial(port):  # silent, and held open while the next two queue behind it: party 0 drops it after 1 s
        with pytest.raises(HandshakeError, match="failed authentication"):  # a wrong key, as party 1
            authenticate(1, WRONG, "plan", "127.0.0.1", port, timeout=10)
        session = authenticate(1, KEY, "plan", "127.0.0.1", port, timeout=10)
    t0.join(20)
    assert session.store_port == b0["result"].store_port == 4242
    reasons = [r.split(": ", 1)[1] for r in b0["result"].refused]
    assert reasons[0] == "authentication failed (wrong or missing key)" and len(reasons) == 4
    assert reasons[1].startswith("broken handshake") and reasons[2] == "broken handshake (TimeoutError)"
    assert reasons[3] == "it rejected our proof (a different key)"


def test_a_different_plan_stops_both_parties():
    port = free_port()
    t0, b0 = _in_thread(authenticate, 0, KEY, "a" * 64, "127.0.0.1", port, timeout=20)
    with pytest.raises(HandshakeError, match="party 0 runs a different plan") as e1:
        authenticate(1, KEY, "b" * 64, "127.0.0.1", port, timeout=20)
    t0.join(20)
    e0 = b0["error"]
    assert isinstance(e0, HandshakeError) and "party 1 runs a different plan" in str(e0)
    for e in (str(e0), str(e1.value)):
        assert "\n" not in e and "before any share" in e and KEY.decode() not in e


def test_party_0_gives_up_clearly_when_only_strangers_came():
    port = free_port()
    t0, b0 = _in_thread(authenticate, 0, KEY, "plan", "127.0.0.1", port, timeout=3, step_timeout=1)
    _stranger(port, WRONG)
    t0.join(10)
    msg = str(b0["error"])
    assert "no authenticated party 1" in msg and "1 connection(s) refused" in msg and "\n" not in msg


# ---- keys --------------------------------------------------------------------------------------
def test_key_sources_and_refusals(tmp_path):
    f = tmp_path / "mpc.key"
    f.write_bytes(KEY + b"\n")
    f.chmod(0o600)
    assert load_key(f, environ={}) == KEY
    assert load_key(None, environ={hs.KEY_ENV: KEY.decode()}) == KEY
    assert load_key(None, environ={}) is None
    f.chmod(0o644)
    with pytest.raises(HandshakeError, match="chmod 600"):
        load_key(f, environ={})
    with pytest.raises(HandshakeError, match="too short"):
        load_key(None, environ={hs.KEY_ENV: "short"})
    with pytest.raises(HandshakeError, match="no such file"):
        load_key(tmp_path / "nope", environ={})


def test_cli_two_host_run_needs_a_key(capsys, monkeypatch, tmp_path):
    from deepshare_convert.cli.app import run as cli

    monkeypatch.delenv(hs.KEY_ENV, raising=False)
    assert cli(["private-infer", "digits_cnn", "--rank", "0"]) != 0
    err = capsys.readouterr().err
    assert "--key-file" in err and hs.KEY_ENV in err and err.count("\n") == 1 and "Traceback" not in err
    f = tmp_path / "k"
    f.write_bytes(KEY)
    f.chmod(0o640)
    assert cli(["private-infer", "digits_cnn", "--rank", "0", "--key-file", str(f)]) != 0
    err = capsys.readouterr().err
    assert "chmod 600" in err and KEY.decode() not in err and err.count("\n") == 1


# ---- the plan ----------------------------------------------------------------------------------
def test_plan_digest_covers_what_both_hold_and_nothing_private():
    gm = prepare(_net())
    shape = (2, 3, 8, 8)

    def digest(g, mode, s=shape):
        return plan_digest(lower(g, s, mode))

    assert digest(gm, "private") == digest(strip_weights(gm), "private")  # party 1's skeleton: same plan
    assert digest(gm, "public") != digest(strip_weights(gm), "public")  # both hold the weights: they count
    assert digest(gm, "private") != digest(gm, "public")
    assert digest(gm, "private") != digest(gm, "private", (1, 3, 8, 8))  # batch size
    assert digest(gm, "private") != digest(prepare(_net(out=3)), "private")  # architecture


# ---- real two-party runs (CrypTen) --------------------------------------------------------------
def _party(queue, rank: int, out: int, x, port: int, key: bytes) -> None:
    try:
        rep = run_party(rank, _net(out), None if x is None else torch.from_numpy(x), (2, 3, 8, 8),
                        weights_mode="private", master_port=port, key=key, timeout=60,
                        dealer_addr="127.0.0.1", dealer_port=port + 2)  # fmt: skip
        queue.put((rank, "ok", rep.output))
    except DeepShareError as e:
        queue.put((rank, "error", str(e)))


def _dealer(queue, out: int, port: int, key: bytes) -> None:
    try:
        from deepshare_convert.mpc.launcher import serve_dealer

        rep = serve_dealer(_net(out), weights_mode="private", port=port + 2, key=key, timeout=60)
        queue.put((2, "ok", rep))
    except DeepShareError as e:
        queue.put((2, "error", str(e)))


def _spawn(ctx, queue, rank, out, x, port):
    if rank == 2:
        p = ctx.Process(target=_dealer, args=(queue, out, port, KEY), daemon=True)
    else:
        p = ctx.Process(target=_party, args=(queue, rank, out, x, port, KEY), daemon=True)
    p.start()
    return p


def _results(queue, procs) -> dict:
    got = {}
    for _ in procs:
        rank, status, payload = queue.get(timeout=120)
        got[rank] = (status, payload)
    for p in procs:
        p.join(10)
    return got


@pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")
def test_stranger_first_then_the_real_parties_finish_and_agree():
    """Party 0 listens; a stranger connects first and is refused; the real party 1 then runs the inference."""
    ctx, x, port = mp.get_context("spawn"), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)), free_port()
    queue = ctx.Queue()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CrypTen pitfall: a multi-threaded parent can hang the run
    try:
        p0 = _spawn(ctx, queue, 0, 2, None, port)
        got = _stranger(port, WRONG)
        assert got[1] == {"refused": "authentication failed (wrong or missing key)"}
        p1 = _spawn(ctx, queue, 1, 2, x.numpy(), port)
        p2 = _spawn(ctx, queue, 2, 2, None, port)
        res = _results(queue, [p0, p1, p2])
    finally:
        torch.set_num_threads(threads)
    assert res[0] == ("ok", None) and res[1][0] == "ok" and res[2][0] == "ok", res
    assert res[2][1]["bytes"][1] > 0 and res[2][1]["bytes"][0] == 0  # corrections to the client only
    clear = reference(prepare(_net()), x).numpy()
    assert np.abs(res[1][1] - clear).max() < 1e-2 and (res[1][1].argmax(1) == clear.argmax(1)).all()


def test_real_parties_with_different_plans_stop_before_any_share():
    """run_party, the two-host path: the backend is never started on either side."""
    port = free_port()
    backends = [_Clear(), _Clear()]
    x = torch.randn(2, 3, 8, 8)
    t0, b0 = _in_thread(run_party, 0, _net(2), None, tuple(x.shape), master_port=port, key=KEY, backend=backends[0],
                        dealer="simulated")  # fmt: skip
    wait_listening(port)
    with pytest.raises(HandshakeError, match="different plan"):
        run_party(1, _net(3), x, tuple(x.shape), master_port=port, key=KEY, backend=backends[1], dealer="simulated")
    t0.join(20)
    assert isinstance(b0["error"], HandshakeError) and "different plan" in str(b0["error"])
    assert backends[0].calls == backends[1].calls == []  # no backend start, so no share and no CrypTen traffic


@pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")
def test_cli_two_hosts_private_weights(tmp_path):
    """``private-infer --rank 0/1`` as two commands: party 1 rebuilds the graph from plan.json alone
    (no weights) and still hashes to party 0's plan; a third command with another batch size is refused."""
    import subprocess
    import sys

    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import Converted, convert, save

    loaded = load_model("digits_cnn")
    conv = convert(loaded.model.eval(), loaded.input_size, budget="10%", spec=loaded.spec.to_dict())
    out = str(save(Converted(conv.model, conv.plan), tmp_path / "digits"))
    key = tmp_path / "mpc.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    dealer_at = f"127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m", "deepshare_convert.cli.app"]
    exe = [*cli, "private-infer", out, "--weights-mode", "private", "--key-file", str(key),
           "--master-port", str(free_port()), "--dealer-addr", dealer_at, "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def party(*args):
        return subprocess.Popen([*exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def dealer(*args):
        return subprocess.Popen([*cli, "dealer", out, "--weights-mode", "private", "--listen", dealer_at, "--json",
                                 "--sessions", "1", "--timeout", "120", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip

    p0 = party("--rank", "0", "--batch-size", "2")
    bad = party("--rank", "1", "--batch-size", "3", "--data", "digits")  # another plan: refused, party 0 stops
    o_bad, e_bad = bad.communicate(timeout=120)
    o0, e0 = p0.communicate(timeout=120)
    assert bad.returncode != 0 and p0.returncode != 0
    assert "party 0 runs a different plan" in e_bad and "party 1 runs a different plan" in e0
    assert e0.strip().count("\n") == 0 and "Traceback" not in e0 + e_bad
    d = dealer("--key-file", str(key))
    p0 = party("--rank", "0", "--batch-size", "2")
    p1 = party("--rank", "1", "--batch-size", "2", "--data", "digits")
    (o1, e1), (o0, e0), (od, ed) = p1.communicate(timeout=180), p0.communicate(timeout=180), d.communicate(timeout=60)
    assert p0.returncode == p1.returncode == d.returncode == 0, e0 + e1 + ed
    r0, r1, rd = json.loads(o0), json.loads(o1), json.loads(od)
    assert r0["bytes"] == r1["bytes"] > 0 and r0["comparisons"] == 2 * conv.plan.achieved
    assert len(r1["predictions"]) == 2 and "predictions" not in r0
    assert r1["dealer"] == r0["dealer"] == "separate" and r1["offline_bytes"] == rd["bytes"]["1"] > 0
    assert r0["offline_bytes"] == rd["bytes"]["0"] == 0  # the server gets nothing from the dealer
