"""The backend seam: the launcher drives any :class:`Backend`, in order, with the lowered program.

No MPC here (and no crypten): a stand-in backend evaluates the program in the clear, so the test
checks only the seam -- what the launcher hands a backend and what it does with the result.
The real backend is tested against two-party runs in test_mpc.py.
"""

from __future__ import annotations

import socket
import threading
import time

import torch
import torch.nn as nn

from deepshare_convert.mpc.backend import Backend, NodeStats, PartyRun
from deepshare_convert.mpc.launcher import free_port, run_party
from deepshare_convert.mpc.prepare import prepare


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Until something listens on ``port`` -- without connecting (a connection would be a stranger).

    Threads must not trace at the same time (torch.fx's patcher is global), so a test starts
    party 1 only once party 0 has traced its model and listens.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # fails only on a listener; never blocks its bind
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class _Clear(Backend):
    """Runs the program's graph in plaintext: a stand-in to observe the seam, not a backend."""

    name = "clear"

    def __init__(self):
        self.calls: list[str] = []

    def start(self, rank, master_addr, master_port):
        self.calls.append(f"start {rank}")

    def run(self, program, x):
        self.calls.append("run")
        with torch.no_grad():
            y = program.gm(x) if x is not None else None  # party 0 has no input, gets no output
        return PartyRun(y, 0, 0, 0.0, 0.0, program.comparisons, {"output": NodeStats()})

    def stop(self):
        self.calls.append("stop")


def test_launcher_drives_any_backend():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    backend, server = _Clear(), _Clear()
    port, key = free_port(), b"k" * 32  # the handshake runs first: party 0 in a thread
    t = threading.Thread(target=run_party, args=(0, net, None, tuple(x.shape)),
                         kwargs=dict(weights_mode="public", backend=server, master_port=port, key=key,
                                     dealer="simulated"), daemon=True)  # fmt: skip
    t.start()
    wait_listening(port)  # party 0 has traced its model: fx tracing in two threads at once is not safe
    report = run_party(1, net, x, tuple(x.shape), weights_mode="public", backend=backend, master_port=port, key=key,
                       dealer="simulated")  # a plaintext stand-in deals nothing: no dealer process  # fmt: skip
    t.join(30)
    assert backend.calls == ["start 1", "run", "stop"] and server.calls == ["start 0", "run", "stop"]
    assert report.comparisons == 2 * 4 * 6 * 6  # one per ReLU element, from the lowering
    with torch.no_grad():  # the prepared model (folded, on the coefficient grid) ran, not the float one
        assert torch.allclose(torch.from_numpy(report.output), prepare(net)(x), atol=1e-5)
        assert torch.allclose(torch.from_numpy(report.output), net(x), atol=1e-2)
