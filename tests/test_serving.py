"""`deepshare serve` / `query` on loopback: answers equal plaintext, each client gets its own, faults are lines.

One server (digits CNN at 10%, private weights, two sessions at once) serves the whole module;
clients are real `deepshare query` processes, the dealer a real process where a test kills it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from deepshare_convert.errors import DataError, DeepShareError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")

CLI = [sys.executable, "-m", "deepshare_convert.cli.app"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _png(path, rng, shape=(8, 8), mode="L"):
    from PIL import Image

    arr = rng.integers(0, 256, size=shape if mode == "L" else (*shape, 3), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return str(path)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import convert, save

    torch.manual_seed(0)
    loaded = load_model("digits_cnn")
    conv = convert(loaded.model, loaded.input_size, budget="10%", spec=loaded.spec.to_dict())
    return str(save(conv, tmp_path_factory.mktemp("serve") / "digits"))


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    from deepshare_convert.mpc.handshake import new_key

    path = tmp_path_factory.mktemp("keys") / "serve.key"
    path.write_bytes(new_key())
    path.chmod(0o600)
    return path


class Running:
    """A :class:`~deepshare_convert.serving.Server` on a thread of the test process, with its log lines."""

    def __init__(self, out, key, **config):
        from deepshare_convert.model_or_out import load_any
        from deepshare_convert.serving import ServeConfig, Server

        self.loaded = load_any(out)
        self.lines: list[str] = []
        cfg = ServeConfig(listen=("127.0.0.1", 0), **config)
        self.server = Server(self.loaded.model, tuple(self.loaded.input_size), key, cfg, log=self.lines.append)
        up = threading.Event()
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(ready=lambda s: up.set(),
                                                                           install_signals=False), daemon=True)
        self.thread.start()
        assert up.wait(120), "the server did not start"
        self.address = f"{self.server.address[0]}:{self.server.address[1]}"

    def plaintext(self, x: torch.Tensor) -> np.ndarray:
        from deepshare_convert.mpc.prepare import prepare, reference

        return reference(prepare(self.loaded.model), x).numpy()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hits = [line for line in self.lines if text in line]
            if hits:
                return hits[-1]
            time.sleep(0.1)
        raise AssertionError(f"no log line with {text!r} in {self.lines}")

    def when_busy(self, then: float, timeout: float = 60.0) -> None:
        """Return ``then`` seconds after a session started (past its handshake and setup)."""
        end = time.monotonic() + timeout
        while not self.server.active:
            assert time.monotonic() < end, f"no session started: {self.lines}"
            time.sleep(0.05)
        time.sleep(then)

    def close(self):
        self.server.stop()
        self.thread.join(60)


@pytest.fixture(scope="module")
def served(out, key):
    s = Running(out, key.read_bytes(), local=True, max_sessions=2)
    yield s
    s.close()


def _query(served, out, key, *files, extra=()):
    return subprocess.Popen([*CLI, "query", served.address, *map(str, files), "--model", out, "--key-file", str(key),
                             "--json", "--timeout", "120", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip


def _inputs(out, files):
    from deepshare_convert.serving import architecture_only, read_inputs

    cm = architecture_only(out)
    return read_inputs(files, cm.input_size, cm.mean, cm.std)


# ---- the client's files ------------------------------------------------------------------------
def test_query_preprocessing_is_the_loaders(tmp_path, out):
    """Five PNGs in an image folder: the tensor a query sends is the one evaluation's loader builds."""
    from deepshare_convert.data import load_dataset, make_loader
    from deepshare_convert.models import get_entry

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    _png(tmp_path / "train" / "a" / "t.png", rng)
    files = [_png(tmp_path / "test" / "a" / f"{i}.png", rng) for i in range(5)]
    info, _, test = load_dataset(f"imagefolder:{tmp_path}")
    entry = get_entry("digits_cnn")
    x, _ = next(iter(make_loader(test, info, train=False, batch_size=5, mean=entry.mean, std=entry.std)))
    got = _inputs(out, [tmp_path / "test"])
    assert got.names == sorted(files) and got.resized == []
    assert torch.equal(got.x, x)


def test_bad_files_are_one_line_before_any_connection(tmp_path, out, key):
    rng = np.random.default_rng(1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    colour = _png(tmp_path / "colour.png", rng, mode="RGB")
    with pytest.raises(DataError, match="holds no image files"):
        _inputs(out, [tmp_path / "empty"])
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        _inputs(out, [tmp_path / "broken.png"])
    with pytest.raises(DataError, match="has 3 channel.*takes 1"):
        _inputs(out, [colour])
    big = _inputs(out, [_png(tmp_path / "big.png", rng, shape=(16, 12))])
    assert big.x.shape == (1, 1, 8, 8) and big.resized  # resized, and said
    # nothing listens at port 9: a bad file must fail first, with one line
    for bad in (tmp_path / "empty", tmp_path / "broken.png", colour):
        p = subprocess.run([*CLI, "query", "127.0.0.1:9", str(bad), "--model", out, "--key-file", str(key)],
                           capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
        assert p.returncode != 0 and p.stderr.startswith("deepshare: error:"), p.stderr
        assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr


# ---- the server ---------------------------------------------------------------------------------
def test_clients_get_their_own_answers_equal_to_plaintext(tmp_path, served, out, key):
    """Three clients at once, two queries each, different images: every answer is its own, = plaintext."""
    rng = np.random.default_rng(2)
    jobs = []
    for c in range(3):
        for q in range(2):
            files = [_png(tmp_path / f"c{c}q{q}i{i}.png", rng) for i in range(1 + (c + q) % 2)]
            jobs.append((files, _query(served, out, key, *files)))
    for files, p in jobs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
        r = json.loads(o)
        assert [a["file"] for a in r["answers"]] == files
        want = served.plaintext(_inputs(out, files).x)
        assert [a["label"] for a in r["answers"]] == want.argmax(1).tolist()
        assert r["online"]["bytes"] > 0 and r["offline_bytes"] > 0
    assert sum("session from 127.0.0.1:" in x and "image(s)" in x for x in served.lines) >= 6


def test_refusals_leave_the_server_serving(tmp_path, served, out, key):
    """A wrong key, another plan, too many images: one line on the client; the server answers the next."""
    rng = np.random.default_rng(3)
    img = _png(tmp_path / "x.png", rng)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"0" * 64)
    wrong.chmod(0o600)
    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import convert, save

    loaded = load_model("digits_cnn")
    other = str(save(convert(loaded.model, loaded.input_size, budget="20%", spec=loaded.spec.to_dict()),
                     tmp_path / "other"))  # fmt: skip
    cases = [(["--key-file", str(wrong)], "failed authentication"), (["--model", other], "different plan")]
    for args, text in cases:
        cmd = [*CLI, "query", served.address, img, "--model", out, "--key-file", str(key), "--timeout", "60", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
        assert p.returncode != 0 and text in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
    many = [_png(tmp_path / f"m{i}.png", rng) for i in range(3)]
    from deepshare_convert.serving import query

    with pytest.raises(DeepShareError, match="refused us: a session takes 1 to 64 images"):  # --max-images 64
        query(served.server.address, _inputs(out, many * 22), out, key=key.read_bytes())
    p = _query(served, out, key, img)
    o, e = p.communicate(timeout=120)
    assert p.returncode == 0, e
    assert json.loads(o)["answers"][0]["label"] == int(served.plaintext(_inputs(out, [img]).x).argmax())


def test_a_client_killed_mid_inference_frees_its_session(tmp_path, served, out, key):
    rng = np.random.default_rng(4)
    files = [_png(tmp_path / f"k{i}.png", rng) for i in range(64)]
    failed = "session from 127.0.0.1: failed"
    done = len([x for x in served.lines if failed in x])
    p = _query(served, out, key, *files)
    served.when_busy(1.5)  # past the handshake and the setup: inside the 64 inferences (about 4 s)
    assert p.poll() is None
    p.kill()
    p.wait(30)
    line = served.wait_for(failed, timeout=60)
    assert len([x for x in served.lines if failed in x]) == done + 1 and "\n" not in line
    assert "went away mid-inference" in line
    img = files[0]
    q = _query(served, out, key, img)
    o, e = q.communicate(timeout=120)
    assert q.returncode == 0, e
    assert json.loads(o)["answers"][0]["label"] == int(served.plaintext(_inputs(out, [img]).x).argmax())


def _dealer_process(out, key, port):
    return subprocess.Popen([*CLI, "dealer", out, "--weights-mode", "private", "--listen", f"127.0.0.1:{port}",
                             "--key-file", str(key)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)  # fmt: skip


def test_a_dealer_gone_is_one_line_and_the_server_recovers(tmp_path, out, key):
    from deepshare_convert.mpc.launcher import free_port

    rng = np.random.default_rng(5)
    port = free_port()
    dealer = _dealer_process(out, key, port)
    s = Running(out, key.read_bytes(), dealer=("127.0.0.1", port), max_sessions=1, dealer_timeout=3.0)
    try:
        files = [_png(tmp_path / f"d{i}.png", rng) for i in range(64)]
        p = _query(s, out, key, *files)
        s.when_busy(1.5)
        assert p.poll() is None
        dealer.kill()
        dealer.wait(30)
        o, e = p.communicate(timeout=180)
        assert p.returncode != 0 and e.startswith("deepshare: error:") and e.strip().count("\n") == 0, e
        img = files[0]
        p = _query(s, out, key, img)  # no dealer now: refused with a reason
        o, e = p.communicate(timeout=120)
        assert p.returncode != 0 and "cannot reach its dealer" in e, e
        dealer = _dealer_process(out, key, port)
        time.sleep(3.0)
        p = _query(s, out, key, img)
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e
        assert json.loads(o)["answers"][0]["label"] == int(s.plaintext(_inputs(out, [img]).x).argmax())
    finally:
        s.close()
        dealer.kill()


def test_stop_lets_the_running_session_finish(tmp_path, out, key):
    rng = np.random.default_rng(6)
    s = Running(out, key.read_bytes(), local=True, max_sessions=1)
    files = [_png(tmp_path / f"s{i}.png", rng) for i in range(64)]
    p = _query(s, out, key, *files)
    s.when_busy(0.5)
    s.server.stop()  # what SIGINT / SIGTERM do
    o, e = p.communicate(timeout=180)
    s.thread.join(120)
    assert p.returncode == 0, e
    assert len(json.loads(o)["answers"]) == 64 and not s.thread.is_alive()
    assert s.lines[-1].startswith("server stopped after 1 session(s)")


def test_cli_local_try_out_in_three_commands(tmp_path, out):
    """`serve --local --json` writes a key and says how to query; one JSON line per session; SIGTERM: exit 0."""
    import shutil
    import signal

    from deepshare_convert.mpc.launcher import free_port

    mine = shutil.copytree(out, tmp_path / "digits")
    img = _png(tmp_path / "x.png", np.random.default_rng(7))
    at = f"127.0.0.1:{free_port()}"
    srv = subprocess.Popen([*CLI, "serve", str(mine), "--local", "--listen", at, "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        keyfile = mine / "local.key"
        end = time.monotonic() + 120
        while not keyfile.exists() and time.monotonic() < end:
            time.sleep(0.2)
        q = subprocess.run([*CLI, "query", at, img, "--model", str(mine), "--key-file", str(keyfile), "--timeout",
                            "120"], capture_output=True, text=True, env=ENV, timeout=180)  # fmt: skip
        assert q.returncode == 0, q.stderr
        assert "x.png" in q.stdout and "probability" in q.stdout
    finally:
        srv.send_signal(signal.SIGTERM)
        o, e = srv.communicate(timeout=60)
    assert srv.returncode == 0, e
    assert f"try it: deepshare query {at}" in " ".join(e.split())
    records = [json.loads(line) for line in o.splitlines()]
    assert [(r["role"], r["status"], r["images"], r["client"]) for r in records] == [("server", "ok", 1, "127.0.0.1")]
    assert records[0]["bytes"] > 0 and records[0]["rounds"] > 0
    assert "server stopped after 1 session(s)" in e
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"


def test_workers_that_cannot_start_stop_the_server_with_one_reason(tmp_path, out, key):
    """A script without a __main__ guard re-runs itself in each spawned worker: the server says so and exits,
    rather than respawning workers that die the same way forever."""
    script = tmp_path / "serve_it.py"
    script.write_text(
        "import deepshare_convert as ds\n"
        "from deepshare_convert.mpc.handshake import load_key\n"
        f"loaded = ds.load({out!r})\n"
        "cfg = ds.ServeConfig(listen=('127.0.0.1', 0), local=True, max_sessions=1)\n"
        f"ds.Server(loaded.model, tuple(loaded.plan.input_size), load_key({str(key)!r}), cfg).run()\n"
    )  # fmt: skip
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0
    assert "a session worker could not start" in r.stderr and "__main__" in r.stderr, r.stderr[-2000:]
