"""The backend seam: the launcher drives any :class:`Backend`, in order, with the lowered program.

No MPC here (and no crypten): a stand-in backend evaluates the program in the clear, so the test
checks only the seam -- what the launcher hands a backend and what it does with the result.
The real backend is tested against two-party runs in test_mpc.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepshare_convert.mpc.backend import Backend, NodeStats, PartyRun
from deepshare_convert.mpc.launcher import run_party


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
            y = program.gm(x)
        return PartyRun(y, 0, 0, 0.0, 0.0, program.comparisons, {"output": NodeStats()})

    def stop(self):
        self.calls.append("stop")


def test_launcher_drives_any_backend():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    backend = _Clear()
    report = run_party(1, net, x, tuple(x.shape), weights_mode="public", backend=backend)
    assert backend.calls == ["start 1", "run", "stop"]
    assert report.comparisons == 2 * 4 * 6 * 6  # one per ReLU element, from the lowering
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(report.output), net(x), atol=1e-3)  # the prepared (folded) model
