"""Exact truncation (mpc/truncation.py) against the local one, on two real CrypTen parties.

The shares are chosen, not drawn: party 1 holds a share near -2^63 so that the two shares of a
value near the 2^62 bound wrap around the ring.  CrypTen's local truncation (each party divides
its own share) is then off by 2^64 / d; the exact protocol, run by both parties with the dealer's
pairs, stays within one unit (two for a divisor that is not a power of two).  Then a model: the
estimate's bytes, rounds and offline bytes equal the measured ones under exact truncation, with the
separate dealer.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")

RING = 2**64


def _signed(v: int) -> int:
    v %= RING
    return v - RING if v >= 2**63 else v


def _wrapping_shares(values: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(s0, s1) with s0 + s1 = v ± 2^64 as integers (so = v in the ring): the shares wrap.

    Both shares on v's far side: near -2^63 for v >= 0, near 2^63 for v <= -2 (-1 cannot wrap).
    """
    s0, s1 = [], []
    for v in values:
        if v >= 0:
            b = -(2**63) + int(rng.integers(0, min(v, 2**40) + 1))
            a = v - RING - b
        else:
            b = 2**63 - 1 - int(rng.integers(0, min(-v - 2, 2**40) + 1))
            a = v + RING - b
        assert -(2**63) <= a < 2**63 and a + b != v and _signed(a + b) == v
        s0.append(a)
        s1.append(b)
    return s0, s1


def _party(backend, rank, shares, divisors):
    """Both truncations of one shared vector, each revealed to both parties (as ring integers)."""
    from crypten.mpc.primitives import ArithmeticSharedTensor as A

    from deepshare_convert.mpc import truncation
    from deepshare_convert.mpc.dealer.randomness import SimulatedDealer

    dealer = SimulatedDealer(rank, seed=7)
    out = {}
    for d in divisors:
        x = A.from_shares(torch.tensor(shares, dtype=torch.long), precision=0)
        out[("local", d)] = x.clone().div_(d).reveal().numpy()
        with truncation.exact(dealer):
            y = x.clone().div_(d)  # the very call every truncation of a run makes, routed to the protocol
        out[("exact", d)] = y.reveal().numpy()
        out[("opened", d)] = x.reveal().numpy()  # the value itself, for the check
    return out


def _run(s0, s1, divisors):
    from deepshare_convert.mpc.executor import CrypTenBackend
    from deepshare_convert.mpc.launcher import spawn_two

    return spawn_two(_party, ((s0, divisors), (s1, divisors)), backend=CrypTenBackend("simulated"), timeout=300)


def test_local_truncation_wraps_near_the_bound_and_exact_stays_within_one_unit():
    rng = np.random.default_rng(0)
    values = [2**62 - 256, -(2**62), 2**61 + 12345, -(2**61) - 7, 2**40 + 3, -(2**32), 255, -2, 0]
    values += [int(v) for v in rng.integers(-(2**62) + 2**16, 2**62 - 2**16, 64)]
    s0, s1 = _wrapping_shares(values, rng)
    divisors = [2**8, 2**16, 9]
    r0, r1 = _run(s0, s1, divisors)
    v = np.array(values, dtype=object)
    for d in divisors:
        assert np.array_equal(r0[("opened", d)], r1[("opened", d)]) and [int(t) for t in r0[("opened", d)]] == values
        floor = np.array([x // d for x in values], dtype=object)
        local = np.array([int(t) for t in r1[("local", d)]], dtype=object)
        exact = np.array([int(t) for t in r1[("exact", d)]], dtype=object)
        assert np.array_equal(r0[("exact", d)], r1[("exact", d)])  # both parties opened the same result
        local_err = np.abs(local - floor)
        assert (local_err >= RING // d - 2).all(), f"d={d}: every local truncation of a wrapping pair fails by ~2^64/d"
        err = exact - floor
        allowed = {0, 1} if d & (d - 1) == 0 else {-1, 0, 1}
        assert set(int(e) for e in err) <= allowed, f"d={d}: exact truncation off by {sorted(set(err))}"
        # within one unit of x / d (two for a divisor that is not a power of two)
        bound = 1 if d & (d - 1) == 0 else 2
        assert all(abs(int(e) * d + (int(f) * d - int(x))) <= bound * d for e, f, x in zip(err, floor, v))


def test_exact_truncation_estimate_equals_measurement_with_the_separate_dealer():
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(3),
                        nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 3, 9, 9)
    for mode in ("public", "private"):
        est = estimate(net, (3, 9, 9), batch=2, weights_mode=mode, truncation="exact")
        local = estimate(net, (3, 9, 9), batch=2, weights_mode=mode, truncation="local")
        run = run_two_party(net, x, weights_mode=mode, truncation="exact")
        for p in run.parties:
            assert (p.bytes, p.rounds) == (est.bytes, est.rounds), mode
        assert run.offline_bytes == est.offline_bytes == run.offline_expected, mode
        # truncated: conv 8·81, conv 8·9, linear 3, avg-pool 8·9, adaptive pool 8 (each of the batch of 2)
        n = 2 * (8 * 81 + 8 * 9 + 8 * 9 + 8 + 3)
        assert est.bytes - local.bytes == 16 * n and est.rounds - local.rounds == 5
        assert est.offline_bytes - local.offline_bytes == 8 * 2 * n
        assert run.max_logit_error < 1e-4, run.max_logit_error


class _Dense(nn.Module):
    """Sites (after conversion), a bilinear upsample, a float constant, a mean: every other truncating handler."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.r2(self.c2(self.r1(self.c1(x)))) * 0.3
        y = nn.functional.interpolate(self.head(y), scale_factor=2, mode="bilinear", align_corners=False)
        return y - y.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("mode", ["public", "private"])
def test_exact_truncation_on_a_converted_dense_model(mode):
    from deepshare_convert.conversion.rewrite import convert
    from deepshare_convert.mpc.costs import estimate
    from deepshare_convert.mpc.launcher import run_two_party

    torch.manual_seed(1)
    conv = convert(_Dense().eval(), (3, 6, 6), budget="50%")
    x = torch.randn(1, 3, 6, 6)
    est = estimate(conv.model, (3, 6, 6), weights_mode=mode, truncation="exact")
    run = run_two_party(conv.model, x, weights_mode=mode, truncation="exact")
    assert [(p.bytes, p.rounds) for p in run.parties] == [(est.bytes, est.rounds)] * 2
    assert run.offline_bytes == est.offline_bytes
    assert run.max_logit_error < 1e-3, run.max_logit_error
