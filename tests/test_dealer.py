"""The separate dealer: what each of the three processes holds, exact offline costs, refusals.

The threat model (docs/private_inference.md) is checked on what each process actually held: every
integer and float tensor alive in it, sampled after every node of a real three-process run.  The
simulated dealer (party 0 samples the masks, CrypTen's TFP) must fail the same check -- otherwise
the check could not fail.
"""

from __future__ import annotations

import importlib.util
import socket
import threading

import pytest
import torch

from deepshare_convert.errors import DeepShareError

from .test_mpc import DIGITS_BATCH, _weight_digests, inputs, model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("crypten") is None, reason="crypten not installed")

_RUNS: dict = {}


def run(mode: str, dealer: str, truncation: str = "local"):
    """One inventoried run of the digits CNN at 10% per (weights mode, dealer, truncation), shared by the tests."""
    from deepshare_convert.mpc.launcher import run_two_party

    if (mode, dealer, truncation) not in _RUNS:
        net, _, _ = model("digits_cnn", "10%")
        _RUNS[mode, dealer, truncation] = run_two_party(net, inputs("digits_cnn", DIGITS_BATCH), weights_mode=mode,
                                                        inventory=True, dealer=dealer, timeout=300,
                                                        truncation=truncation)  # fmt: skip
    return _RUNS[mode, dealer, truncation]


# ---- the randomness itself -----------------------------------------------------------------------
def test_seeded_shares_add_up_to_what_the_dealer_dealt():
    """Server and client expand their seeds; the client's product shares are the dealer's corrections."""
    from deepshare_convert.mpc.dealer.randomness import Corrections, DealingView, SeededParty

    s0, s1 = bytes(range(32)), bytes(range(32, 64))
    dealer, server, client = DealingView(s0, s1), SeededParty(0, s0), SeededParty(1, s1)

    def calls(r):
        a, b = r.ring((3, 4)), r.ring((4,))
        c = r.product(lambda u, v: u * v, (a, b), (3, 4))
        x, y = r.bits((5,)), r.bits((5,))
        z = r.binary_product(lambda u, v: u & v, (x, y), (5,))
        ra, rb = r.random_bit((6,))
        return a, b, c, x, y, z, ra, rb

    dealt = calls(dealer)
    client.corrections = Corrections(dealer.take_corrections())
    mine, theirs = calls(server), calls(client)
    client.corrections.finish()
    for d, p0, p1, binary in zip(dealt, mine, theirs, (0, 0, 0, 1, 1, 1, 0, 1)):
        assert p0.plain is None and p1.plain is None  # no party holds a dealt value
        joined = p0.share ^ p1.share if binary else p0.share + p1.share
        assert torch.equal(joined, d.plain)
    a, b, c = dealt[:3]
    assert torch.equal(c.plain, a.plain * b.plain) and set(dealt[6].plain.tolist()) <= {0, 1}
    assert torch.equal(dealt[6].plain, dealt[7].plain)  # [r] and <r> are the same bit
    assert server.stream.drawn == dealer.s0.drawn and client.stream.drawn < dealer.s1.drawn + 1


def test_a_comparison_deals_the_cost_models_corrections():
    """DEALT_PER_COMPARISON, on the dealer's own pass over CrypTen's comparison (no intercept)."""
    from deepshare_convert.compat import import_crypten

    import_crypten()
    from crypten.mpc.primitives import ArithmeticSharedTensor as A

    from deepshare_convert.mpc import protocols as P
    from deepshare_convert.mpc.cost_rules import DEALT_PER_COMPARISON
    from deepshare_convert.mpc.dealer.dry_run import dry_crypten
    from deepshare_convert.mpc.dealer.provider import use
    from deepshare_convert.mpc.dealer.randomness import DealingView

    for n in (1, 37):
        view = DealingView(b"\1" * 32, b"\2" * 32)
        with dry_crypten(), use(view):
            x = A(None, size=(n,), precision=16, src=1)
            P.drelu(x, view)
            assert view.take_corrections().numel() == DEALT_PER_COMPARISON * n
            P.relu(x, view)
            assert view.take_corrections().numel() == (DEALT_PER_COMPARISON + 1) * n


# ---- three real processes ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["public", "private"])
def test_separate_dealer_agrees_and_offline_equals_estimate(mode):
    r, sim = run(mode, "separate"), run(mode, "simulated")
    assert r.top1_agreement == 1.0 and r.dealer == "separate"
    assert r.offline_bytes == r.offline_expected > 0 and r.offline_messages == 1
    assert r.parties[0].offline_bytes == 0  # the server gets nothing from the dealer after the handshake
    assert r.dealer_report["bytes"] == {0: 0, 1: r.offline_bytes} and r.dealer_report["setup_bytes"] == 0
    for p, q in zip(r.parties, sim.parties):  # the online phase is what it was with the simulated dealer
        assert (p.bytes, p.rounds, p.setup_bytes, p.setup_rounds) == (q.bytes, q.rounds, q.setup_bytes, q.setup_rounds)
    assert sim.offline_bytes == sim.offline_expected == 0


@pytest.mark.parametrize("truncation", ["local", "exact"])  # exact: the truncation masks r are dealt too
@pytest.mark.parametrize("mode", ["public", "private"])
def test_no_party_ever_holds_a_dealt_mask(mode, truncation):
    r = run(mode, "separate", truncation)
    if truncation == "exact":
        assert r.top1_agreement == 1.0 and r.offline_bytes == r.offline_expected > run(mode, "separate").offline_bytes
    dealt = set(r.dealer_report["dealt_digests"])
    assert len(dealt) > 10  # the dealer saw its masks (else this test proves nothing)
    for p in r.parties:
        assert not dealt & set(p.plaintext_digests), f"party {p.rank} holds a mask or bit in the clear"
        assert not p.dealt_digests


@pytest.mark.parametrize("mode", ["public", "private"])
def test_the_simulated_dealer_fails_the_same_check(mode):
    """Party 0 sampled the masks, and holds them while the run uses them: it could unmask the client."""
    r = run(mode, "simulated")
    dealt = set(r.parties[0].dealt_digests)
    assert dealt and dealt & set(r.parties[0].plaintext_digests)


def _encoded_input():
    """The client's input as it enters the ring (CrypTen's encoder at the activation grid)."""
    from crypten.encoder import FixedPointEncoder

    from deepshare_convert.mpc.fixed_point import ACTIVATION_BITS
    from deepshare_convert.mpc.launcher import tensor_digest

    return tensor_digest(FixedPointEncoder(precision_bits=ACTIVATION_BITS).encode(inputs("digits_cnn", DIGITS_BATCH)))


def test_the_server_unmasks_the_input_only_with_the_simulated_dealer():
    """Private mode opens the input itself (x - a, for the first convolution): party 0 adds what it holds of a.

    With the simulated dealer that is a, and it reads the client's image in the ring exactly; with the
    separate dealer it is its share of a, and what it gets is still masked by the client's share."""
    from deepshare_convert.compat import import_crypten

    import_crypten()
    x = _encoded_input()
    sim, sep = run("private", "simulated"), run("private", "separate")
    assert x in set(sim.parties[0].unmasked_digests)  # the attack works where it should
    assert sim.parties[0].unmasked_digests and sep.parties[0].unmasked_digests  # the server received openings
    assert x not in set(sep.parties[0].unmasked_digests)


@pytest.mark.parametrize("mode", ["public", "private"])
def test_dealer_holds_no_input_output_or_weight(mode):
    from deepshare_convert.mpc.launcher import tensor_digest

    r = run(mode, "separate")
    x = inputs("digits_cnn", DIGITS_BATCH)
    secret = {tensor_digest(x.numpy()), tensor_digest(r.logits)}
    held = set(r.dealer_report["plaintext_digests"])
    assert secret <= set(r.parties[1].plaintext_digests)
    assert not (secret | {_encoded_input()}) & held
    assert not (secret | {_encoded_input()}) & set(r.parties[0].plaintext_digests)
    weights = _weight_digests("digits_cnn", "10%")
    assert weights <= set(r.parties[0].plaintext_digests) and not weights & held
    if mode == "private":
        assert not weights & set(r.parties[1].plaintext_digests)


# ---- refusals ----------------------------------------------------------------------------------
def _fake_dealer(port: int, key: bytes, plan: str | None) -> threading.Thread:
    """A dealer that knows ``key`` (or a stranger without it) and answers with ``plan``."""
    from deepshare_convert.mpc.dealer import channel

    def serve():
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(20)
            try:
                channel.accept_parties(key, lambda shape, count: (plan, None), "127.0.0.1", port, timeout=15,
                                       listener=server)  # fmt: skip
            except DeepShareError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("who", ["stranger", "other-plan"])
def test_a_stranger_or_another_plan_as_dealer_is_refused(who):
    """Both fail at the dealer handshake, before the party's backend starts (so before any share)."""
    import time

    from deepshare_convert.mpc.dealer.channel import connect_dealer
    from deepshare_convert.mpc.handshake import HandshakeError
    from deepshare_convert.mpc.launcher import free_port

    port, key = free_port(), b"k" * 32
    _fake_dealer(port, b"x" * 32 if who == "stranger" else key, "0" * 64)
    time.sleep(0.3)
    errors = []

    def party(rank):
        try:
            connect_dealer(rank, key, "f" * 64, "127.0.0.1", port, input_shape=(1, 1, 8, 8), timeout=10)
        except HandshakeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=party, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    needle = "failed authentication as the dealer" if who == "stranger" else "different plan"
    assert len(errors) == 2
    assert all(needle in e for e in errors), errors


def test_two_host_run_without_a_dealer_address_is_refused():
    from deepshare_convert.mpc.launcher import run_party

    net, _, size = model("digits_cnn", "10%")
    with pytest.raises(DeepShareError, match="--dealer-addr"):
        run_party(0, net, None, (1, *size), key=b"k" * 32)


def test_each_link_may_have_its_own_key_and_the_servers_key_cannot_pose_as_the_dealer():
    """{0: S, 1: C} at the dealer: both parties get in with their own key; a dealer holding only S (what the
    server knows) is refused by the client."""
    import time

    from deepshare_convert.mpc.dealer import channel
    from deepshare_convert.mpc.handshake import HandshakeError
    from deepshare_convert.mpc.launcher import free_port

    server_key, client_key, plan = b"s" * 32, b"c" * 32, "f" * 64
    port = free_port()
    got = {}

    def dealer():
        with socket.create_server(("127.0.0.1", port)) as listener:
            got["links"] = channel.accept_parties({0: server_key, 1: client_key}, lambda s, c: (plan, None),
                                                  "127.0.0.1", port, timeout=20, listener=listener)  # fmt: skip

    t = threading.Thread(target=dealer, daemon=True)
    t.start()
    time.sleep(0.3)
    links = {}
    threads = [threading.Thread(target=lambda r, k: links.setdefault(r, channel.connect_dealer(
        r, k, plan, "127.0.0.1", port, input_shape=(1, 1, 8, 8), timeout=10)), args=(r, k))
        for r, k in ((0, server_key), (1, client_key))]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    t.join(30)
    l0, l1, _ = got["links"]
    assert links[0].seed == l0.seed and links[1].seed == l1.seed and l0.seed != l1.seed
    for link in (*links.values(), l0, l1):
        link.close()

    port = free_port()
    _fake_dealer(port, server_key, plan)  # the server, posing as the dealer to the client
    time.sleep(0.3)
    with pytest.raises(HandshakeError, match="failed authentication as the dealer"):
        channel.connect_dealer(1, client_key, plan, "127.0.0.1", port, input_shape=(1, 1, 8, 8), timeout=10)
