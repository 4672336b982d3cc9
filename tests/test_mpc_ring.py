"""Ring kernels (deepshare_convert/mpc/ring.py): every kernel equals torch's int64 product mod 2^64 bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from deepshare_convert.mpc import ring
from deepshare_convert.mpc.ring import RingWeight, chunked, ring_conv2d, ring_linear, split_signed

G = torch.Generator().manual_seed(0)


def _ring(*shape) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.long, generator=G)


def _weight(shape, amp: int) -> torch.Tensor:
    return torch.randint(-amp, amp + 1, shape, dtype=torch.long, generator=G)


@pytest.mark.parametrize("b", [8, 17, 22, 32, 53])
def test_signed_chunks_reassemble_the_share(b):
    x = torch.cat([_ring(1000), torch.tensor([-(2**63), 2**63 - 1, 0, -1, 1])])
    chunks = split_signed(x, b)
    assert len(chunks) == -(-64 // b)
    assert all(int(c.abs().max()) <= 2 ** (b - 1) for c in chunks[:-1])
    total = torch.zeros_like(x)
    for k, c in enumerate(chunks):
        total += torch.bitwise_left_shift(c, k * b)
    assert torch.equal(total, x)


CONVS = [  # (cin, cout, k, stride, padding, dilation, groups, hw)
    (3, 8, 3, 1, 1, 1, 1, 9),
    (16, 32, 3, 2, 1, 1, 1, 8),
    (8, 8, 3, 1, 0, 1, 4, 7),
    (8, 8, 3, 1, 2, 2, 8, 6),  # depthwise, dilated
    (64, 128, 1, 2, 0, 1, 1, 8),
    (512, 64, 3, 1, 1, 1, 1, 4),
]


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,hw", CONVS)
@pytest.mark.parametrize("amp", [1, 3000, 2**16, 2**24, 2**40, 2**50])
def test_ring_conv2d_equals_the_int64_conv(cin, cout, k, stride, padding, dilation, groups, hw, amp):
    x = _ring(2, cin, hw, hw)
    w = _weight((cout, cin // groups, k, k), amp)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = torch.conv2d(x, w, **kw)
    rw = RingWeight.of(w)
    for kernel in (None, "int64", "float64"):  # float64 falls back to int64 when the weight is too large
        assert torch.equal(ring_conv2d(x, rw, kernel=kernel, **kw), ref), kernel
    if rw.chunks:
        assert torch.equal(chunked(x, rw.wf, rw.l1_bits, lambda u, v: torch.conv2d(u, v, **kw)), ref)
    if amp == 2**50:  # no room for 8-bit chunks: int64 only
        assert rw.chunks == 0


def test_the_float64_bound_is_tight_enough_to_be_exact_at_its_edge():
    """Weights whose L1 sits just under 2^22 (two chunks): the largest products still round-trip."""
    w = torch.full((4, 64, 1, 1), (2**22 - 1) // 64, dtype=torch.long)
    x = torch.full((1, 64, 2, 2), -(2**63), dtype=torch.long)  # every chunk at its extreme
    x[0, ::2] = 2**63 - 1
    rw = RingWeight.of(w)
    assert rw.chunks == 2
    assert torch.equal(ring_conv2d(x, rw, kernel="float64"), torch.conv2d(x, w))


@pytest.mark.parametrize("amp", [1, 2**16, 2**40])
def test_ring_linear_equals_the_int64_matmul(amp):
    x, w = _ring(3, 512), _weight((10, 512), amp)
    for kernel in (None, "int64", "float64"):
        assert torch.equal(ring_linear(x, w, kernel=kernel), x @ w.t()), kernel


def test_encode_is_crypten_fixed_point_and_the_choice_is_remembered():
    w = torch.randn(8, 4, 3, 3, generator=G) * 0.1
    rw = RingWeight.encode(w, 2**16)
    assert torch.equal(rw.w, torch.round(w.double() * 2**16).long()) and rw.wf.dtype == torch.float64
    x = _ring(1, 4, 5, 5)
    ring._CHOSEN.clear()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one thread: the fixed choice, nothing timed
        ring_conv2d(x, rw, padding=1)
        assert not ring._CHOSEN
        torch.set_num_threads(2)  # more: timed once, then remembered
        assert torch.equal(ring_conv2d(x, rw, padding=1), torch.conv2d(x, rw.w, padding=1))
        (key,) = ring._CHOSEN
        assert ring._CHOSEN[key] in ring.KERNELS and key[-1] == 2
    finally:
        torch.set_num_threads(threads)


class _Net(nn.Module):
    """Conv with bias, stride and groups, a 1x1 conv, a linear layer: the public ring path end to end."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=True)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=True)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv2(torch.relu(self.conv(x))), 1))


def test_two_party_public_layers_agree_with_plaintext():
    from deepshare_convert.mpc.launcher import run_two_party

    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    r = run_two_party(net, x, weights_mode="public")
    assert r.top1_agreement == 1.0 and r.max_logit_error <= 1e-3


def test_public_weights_are_encoded_once_at_setup_and_again_only_when_changed():
    from deepshare_convert.compat import import_crypten
    from deepshare_convert.mpc.fixed_point import WEIGHT_SCALE
    from deepshare_convert.mpc.lowering import lower
    from deepshare_convert.mpc.prepare import prepare
    from deepshare_convert.mpc.weights import prepare_public_weights, ring_weight as _ring_weight

    import_crypten()
    net = _Net().eval()
    program = lower(prepare(net), (1, 4, 8, 8), "public")
    assert prepare_public_weights(program) == 3 and len(program.kernels) == 3
    conv = next(n for n in program.gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    w = program.gm.get_submodule("conv").weight
    rw = _ring_weight(program, conv.name, w)
    assert rw is program.kernels[conv.name][2]  # reused, not re-encoded
    assert torch.equal(rw.w, torch.round(w.detach().double() * WEIGHT_SCALE).long())
    with torch.no_grad():
        w.mul_(2)  # an in-place change of the weight: encoded again
    assert torch.equal(_ring_weight(program, conv.name, w).w, torch.round(w.detach().double() * WEIGHT_SCALE).long())
    assert prepare_public_weights(lower(prepare(net), (1, 4, 8, 8), "private")) == 0
