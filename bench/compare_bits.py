"""Fewer compared bits: what a sub-ring comparison would save in rounds, and what it costs in accuracy.

    python bench/compare_bits.py [--quick] [--limit N]

CrypTen's DReLU works on the whole 64-bit ring: A2B, one AND for the generate bits, a
carry tree of log2(64) = 6 AND levels, a 1-bit B2A: 8 rounds, 432 bytes per
element (cost_table.json).  Comparing only bits [t, L) of the fixed-point value (2^16 scale, as
measured here; the executor's activations are on 2^-24 now (mpc/fixed_point.py), which moves every
window up by 8 bits)
means each party reduces its share locally (``share >> t`` then mod 2^(L-t)) and the carry
tree runs on k = L - t bits: 2 + ceil(log2 k) rounds.  The result is exact while
|x| < 2^(L-17) (no wrap of the sub-ring) -- up to the local truncation, which can move the sum
by one unit of 2^t and so flips the sign of values with |x| < 2^(t-16).

This script simulates exactly that arithmetic (random 64-bit shares, arithmetic shifts, the
k-bit wrap) at every ReLU of the pretrained ResNet-20 on CIFAR-10 test images and reports,
per (L, t): the largest |x| seen, the fraction of flipped comparisons, the top-1 with those
ReLUs and the rounds / bytes the comparison would take.  Then it runs that comparison on two
CrypTen parties (CrypTen's own carry tree, cut to log2(k) levels, on 4,096 values in (-20, 20))
and reports the measured bytes, rounds and wrong signs ("crypten" in the JSON).  Writes
bench/results/compare_bits.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from deepshare_convert import load_model  # noqa: E402
from deepshare_convert.data import load_dataset, make_loader  # noqa: E402

from common import ROOT, add_out_arg, write_results  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "models" / "resnet20-12fca82f.th"
FRAC_BITS = 16
SCHEMES = [(64, 0), (32, 0), (24, 0), (20, 0), (32, 8), (24, 8), (28, 12), (20, 4)]  # (L, t): bits [t, L)


def subring_negative(x: torch.Tensor, bits: int, drop: int, gen: torch.Generator) -> torch.Tensor:
    """x < 0 as the two parties would find it comparing bits [drop, bits) of two random 64-bit shares."""
    fixed = torch.round(x.double() * 2**FRAC_BITS).long()
    s0 = torch.randint(-(2**63), 2**63 - 1, fixed.shape, dtype=torch.long, generator=gen)
    s1 = fixed - s0  # wraps mod 2^64, like the ring
    k = bits - drop
    total = (s0 >> drop) + (s1 >> drop)  # each party's local truncation, then the k-bit sum
    if k < 64:
        total = (total << (64 - k)) >> (64 - k)  # the k-bit ring, sign-extended
    return total < 0


def comparison_cost(k: int) -> tuple[int, int]:
    """(rounds, bytes per element) of CrypTen's circuit on k bits, one element per 64-bit word as CrypTen packs."""
    levels = math.ceil(math.log2(k))
    return 2 + levels, 32 + 64 * levels + 16


class SubringReLU(nn.Module):
    """x * [x >= 0] with the comparison made on a sub-ring; counts flips against the exact sign."""

    def __init__(self, bits: int, drop: int, gen: torch.Generator, stats: dict):
        super().__init__()
        self.bits, self.drop, self.gen, self.stats = bits, drop, gen, stats

    def forward(self, x):
        neg = subring_negative(x, self.bits, self.drop, self.gen)
        exact = torch.round(x.double() * 2**FRAC_BITS) < 0
        self.stats["flips"] += int((neg != exact).sum())
        self.stats["n"] += x.numel()
        self.stats["max_abs"] = max(self.stats["max_abs"], float(x.abs().max()))
        return x * (~neg).to(x.dtype)


def _swap_relus(model: nn.Module, make) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, make())
        else:
            _swap_relus(child, make)
    return model


def _subring_party(backend, rank: int, n: int, schemes: list[tuple[int, int]]) -> dict:
    """At one party: CrypTen's comparison with the carry tree cut to log2(k) levels, on k-bit shares.

    Each party moves bits [t, L) of its share (k = L - t) to the top of a 64-bit word (local);
    the sum of those words is floor(x / 2^t) mod 2^k at the top (or one less), so the carry into bit 63 needs only the top aligned
    k-bit block of CrypTen's Sklansky tree (log2 k levels; below it G = P = 0).  The msb is
    then masked and opened as in :func:`deepshare_convert.mpc.protocols.drelu`.
    """
    import crypten.communicator as comm
    from crypten.mpc.primitives import ArithmeticSharedTensor as A, BinarySharedTensor as B, circuit

    from deepshare_convert.mpc.dealer.randomness import SimulatedDealer

    constants = circuit.__dict__["__SPK_circuit_constants"]
    g = torch.Generator().manual_seed(0)
    plain = (torch.rand(n, generator=g) - 0.5) * 40  # |x| < 20, like the ResNet-20 activations
    x = A(plain, precision=FRAC_BITS, src=1) if rank == 1 else A(None, size=(n,), precision=FRAC_BITS, src=1)
    dealer = SimulatedDealer(rank, seed=1)  # a measurement of comparison bytes: who deals does not change them
    out = {}
    for bits, drop in schemes:
        k = bits - drop
        comm.get().barrier()
        before = comm.get().get_communication_stats()
        word = ((x.share >> drop) << (64 - k)) if k < 64 else x.share
        xb = [B(word, src=i) if i == rank else B(None, size=(n,), src=i) for i in range(2)]
        S, P = xb[0] & xb[1], xb[0] ^ xb[1]
        SP = B.stack([S, P])
        masks, out_masks, multipliers = constants(SP.device)
        for i in range(int(math.log2(k))):  # CrypTen's loop, cut after the top k-bit block is done
            P0 = SP[1] & out_masks[i]
            S1P1 = SP & masks[i]
            S1P1._tensor *= multipliers[i]
            update = P0 & S1P1
            SP[1] &= out_masks[i] ^ -1
            SP ^= update
        total = P ^ (SP[0] << 1)
        total.share = total.share >> 63
        _, r_b = dealer.random_bit((n,))
        r = r_b.plain
        z = ((total & 1) ^ B.from_shares(r_b.share)).reveal() & 1
        after = comm.get().get_communication_stats()
        out[(bits, drop)] = {"bytes": int(after["bytes"] - before["bytes"]), "rounds": int(after["rounds"] - before["rounds"]),
                  "z": z.numpy(), "r": None if r is None else r.numpy()}  # fmt: skip
    out["plain"] = plain.numpy() if rank == 1 else None
    return out


def measure_crypten(n: int = 4096, schemes=((64, 0), (32, 0), (24, 8))) -> list[dict]:
    """Run the cut comparison on two CrypTen parties: bytes, rounds and wrong signs per (L, t).

    ``wrong_outside_window``: wrong signs with |x| >= 2^(t-16), where the analysis says none.
    """
    from deepshare_convert.mpc.executor import CrypTenBackend
    from deepshare_convert.mpc.launcher import spawn_two

    r0, r1 = spawn_two(_subring_party, ((n, list(schemes)), (n, list(schemes))), backend=CrypTenBackend(dealer="simulated"))
    plain = torch.as_tensor(r1["plain"])
    exact = torch.round(plain.double() * 2**FRAC_BITS) < 0
    rows = []
    for bits, drop in schemes:
        m = r0[(bits, drop)]
        wrong = (torch.as_tensor(m["z"]) ^ torch.as_tensor(m["r"])).bool() != exact
        outside = plain.abs() >= 2.0 ** (drop - FRAC_BITS)
        rows.append({"bits": bits, "drop": drop, "compared_bits": bits - drop, "elements": n,
                     "bytes_per_element": m["bytes"] / n, "rounds": m["rounds"], "wrong": int(wrong.sum()),
                     "wrong_outside_window": int((wrong & outside).sum())})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 test images")
    ap.add_argument("--limit", type=int, default=10000, help="test images")
    add_out_arg(ap)
    args = ap.parse_args()
    limit = 500 if args.quick else args.limit
    torch.set_num_threads(1)
    info, _, test = load_dataset("cifar10-jpg")
    loader = make_loader(test, info, train=False, batch_size=250, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225), limit=limit)  # fmt: skip
    batches = list(loader)
    rows = []
    for bits, drop in SCHEMES:
        model = load_model("resnet20", weights=WEIGHTS).model.eval()
        stats = {"flips": 0, "n": 0, "max_abs": 0.0}
        gen = torch.Generator().manual_seed(0)
        _swap_relus(model, lambda b=bits, d=drop, g=gen, s=stats: SubringReLU(b, d, g, s))
        correct = 0
        with torch.no_grad():
            for x, y in batches:
                correct += int((model(x).argmax(1) == y).sum())
        rounds, nbytes = comparison_cost(bits - drop)
        row = {"bits": bits, "drop": drop, "compared_bits": bits - drop, "exact_below": 2.0 ** (bits - 17),
               "flip_below": 2.0 ** (drop - FRAC_BITS) if drop else 0.0, "max_abs": stats["max_abs"],
               "comparisons": stats["n"], "flips": stats["flips"], "flip_rate": stats["flips"] / stats["n"],
               "top1": 100 * correct / limit, "rounds": rounds, "bytes_per_element": nbytes}  # fmt: skip
        rows.append(row)
        print(f"bits [{drop:2d}, {bits:2d}) k={bits - drop:2d}: {rounds} rounds, {nbytes} B/elem; max |x| "
              f"{row['max_abs']:.1f}; flips {row['flips']:,} of {row['comparisons']:,} ({100 * row['flip_rate']:.4f}%); "
              f"top-1 {row['top1']:.2f}%", flush=True)  # fmt: skip
    crypten_rows = measure_crypten()
    for r in crypten_rows:
        print(f"CrypTen, cut carry tree, bits [{r['drop']}, {r['bits']}): {r['rounds']} rounds, "
              f"{r['bytes_per_element']:g} B/elem; wrong signs {r['wrong']} of {r['elements']} "
              f"({r['wrong_outside_window']} outside |x| < 2^(t-16))", flush=True)  # fmt: skip
    path = write_results("compare_bits_quick" if args.quick else "compare_bits",
                         {"model": "resnet20 (shared pretrained)", "data": "cifar10-jpg test", "images": limit,
                          "frac_bits": FRAC_BITS, "rows": rows, "crypten": crypten_rows}, args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
