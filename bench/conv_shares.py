"""Convolutions on shares vs the plaintext float32 layer, per ResNet-18-CIFAR layer type, step by step.

    python bench/conv_shares.py [--quick] [--threads 1 2] [--repeats 7]

Each party's local work for one linear layer at batch 1 (a uniform int64 share), timed in one
process next to the plaintext float32 forward of the same layer (all kernels take turns; the
best of the repeats, medians in the JSON), reported as a ratio to it:

* ``legacy``: the previous ring conv (unsigned chunks bounded by max|w| * fan-in, one float64
  call per chunk, the weight encoded on every call).
* ``int64``: torch's int64 kernel on the share.
* ``float64``: signed chunks bounded by the weight's L1 norm (two at CrypTen's 2^16 scale),
  weight prepared once.
* ``auto``: what :func:`deepshare_convert.mpc.protocols.public_conv2d` now runs (the faster of
  the two, timed once per layer shape and thread count).
* ``private``: the two share-by-share products of a setup-masked weight (``ε·[W] + [a]·δ``) at
  one party, on the int64 kernel.

Weights are the BN-folded layers of ResNet-18-CIFAR with BatchNorm statistics from random data
(as bench/pi_latency.py).  Every new kernel is checked equal to the int64 kernel bit for bit.
Writes bench/results/conv_shares.json (conv_shares_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from deepshare_convert import load_model  # noqa: E402
from deepshare_convert.models.batchnorm import recalibrate_batchnorm  # noqa: E402
from deepshare_convert.mpc.ring import RingWeight, ring_conv2d, ring_linear  # noqa: E402

from common import add_out_arg, write_results  # noqa: E402

# (label, conv module, its BatchNorm, input resolution)
LAYERS = [
    ("conv3x3 64ch 32x32", "layer1.0.conv1", "layer1.0.bn1", 32),
    ("conv3x3 128ch 16x16", "layer2.0.conv2", "layer2.0.bn2", 16),
    ("conv3x3 256ch 8x8", "layer3.0.conv2", "layer3.0.bn2", 8),
    ("conv3x3 512ch 4x4", "layer4.0.conv2", "layer4.0.bn2", 4),
    ("conv1x1 shortcut 64->128 s2", "layer2.0.shortcut.0", "layer2.0.shortcut.1", 32),
    ("linear 512->100", "linear", None, 0),
]
QUICK = {"conv3x3 64ch 32x32", "conv1x1 shortcut 64->128 s2", "linear 512->100"}
FRAC = 16  # CrypTen's fixed-point scale 2^16
REPEATS = 11


def _legacy_ring_conv2d(share: torch.Tensor, weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """The previous implementation, kept here as the baseline (weight encoded per call)."""
    w = torch.round(weight.detach().double() * 2**FRAC).long()
    fan_in = w[0].numel()
    b = 52 - int(w.abs().max().item()).bit_length() - max(fan_in - 1, 1).bit_length()
    if b < 8:
        return torch.conv2d(share, w, **kwargs)
    b = min(b, 32)
    wf, mask, out = w.double(), (1 << b) - 1, None
    for k in range(-(-64 // b)):
        part = torch.bitwise_and(torch.bitwise_right_shift(share, k * b), mask).double()
        y = torch.conv2d(part, wf, **kwargs).round_().long()
        y = torch.bitwise_left_shift(y, k * b) if k else y
        out = y if out is None else out.add_(y)
    return out


def _folded(model: nn.Module, conv: str, bn: str | None) -> tuple[nn.Module, torch.Tensor]:
    mods = dict(model.named_modules())
    m = mods[conv]
    w = m.weight.detach()
    if bn is not None:
        b = mods[bn]
        w = w * (b.weight / torch.sqrt(b.running_var + b.eps)).detach().view(-1, 1, 1, 1)
    return m, w


def _ring(shape, g) -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.long, generator=g)


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Every kernel once per round, ``repeats`` rounds after a warm-up: a burst of load hits all alike."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            tic = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - tic)
    return times


def measure(label: str, m: nn.Module, w: torch.Tensor, hw: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rw = RingWeight.encode(w, 2**FRAC)
    if isinstance(m, nn.Linear):
        x, share = torch.randn(1, m.in_features, generator=g), _ring((1, m.in_features), g)
        plain = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        fn = lambda u, v: torch.matmul(u, v.t())  # noqa: E731
        ring = lambda k: ring_linear(share, rw, kernel=k)  # noqa: E731
        legacy = None
    else:
        kw = dict(stride=m.stride, padding=m.padding)
        x, share = torch.randn(1, m.in_channels, hw, hw, generator=g), _ring((1, m.in_channels, hw, hw), g)
        plain = lambda: torch.conv2d(x, w, **kw)  # noqa: E731
        fn = lambda u, v: torch.conv2d(u, v, **kw)  # noqa: E731
        ring = lambda k: ring_conv2d(share, rw, kernel=k, **kw)  # noqa: E731
        legacy = lambda: _legacy_ring_conv2d(share, w, **kw)  # noqa: E731
    # private mode, one party: ε·[W] + [a]·δ with both operands uniform in the ring (int64 kernel)
    a, w_share, delta = _ring(share.shape, g), _ring(rw.w.shape, g), _ring(rw.w.shape, g)
    private = lambda: fn(share, w_share) + fn(a, delta)  # noqa: E731

    ref = fn(share, rw.w)  # the int64 kernel: the reference ring product
    assert torch.equal(ring("float64"), ref) and torch.equal(ring(None), ref), label
    if legacy is not None:
        assert torch.equal(legacy(), ref), label

    kernels = {"plain": plain, "legacy": legacy, "int64": lambda: ring("int64"), "float64": lambda: ring("float64"),
               "auto": lambda: ring(None), "private": private}  # fmt: skip
    times = _interleaved({k: f for k, f in kernels.items() if f is not None}, repeats)
    t_plain = min(times["plain"])
    row = {"layer": label, "plain_ms": t_plain * 1e3, "plain_median_ms": statistics.median(times["plain"]) * 1e3,
           "float64_chunks": rw.chunks, "l1_bits": rw.l1_bits}  # fmt: skip
    for name, ts in times.items():
        if name != "plain":
            row[f"{name}_ms"], row[f"{name}_ratio"] = min(ts) * 1e3, min(ts) / t_plain
            row[f"{name}_median_ms"] = statistics.median(ts) * 1e3
    return row


COLS = ("legacy", "int64", "float64", "auto", "private")


def table(results: dict, repeats: int) -> str:
    lines = []
    for threads, rows in results.items():
        lines.append(f"\n{threads} thread(s): best-of-{repeats} ms (ratio to the plaintext float32 layer)\n")
        lines.append("| layer | plaintext f32 | " + " | ".join(COLS) + " | float64 chunks |")
        lines.append("|---|---:|" + "---:|" * len(COLS) + "---|")
        for r in rows:
            cells = [f"{r[c + '_ms']:.2f} ({r[c + '_ratio']:.1f}×)" if f"{c}_ms" in r else "—" for c in COLS]
            lines.append(f"| {r['layer']} | {r['plain_ms']:.2f} | " + " | ".join(cells)
                         + f" | {r['float64_chunks']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three layer types, one thread, few repeats")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=REPEATS)
    add_out_arg(ap)
    args = ap.parse_args()
    threads = [1] if args.quick else args.threads
    repeats = 3 if args.quick else args.repeats

    torch.manual_seed(0)
    loaded = load_model("resnet18_cifar")
    model = recalibrate_batchnorm(loaded.model, loaded.input_size, batch=32, seed=0).eval()
    layers = [lay for lay in LAYERS if not args.quick or lay[0] in QUICK]
    results: dict[str, list] = {}
    with torch.no_grad():
        for t in threads:
            torch.set_num_threads(t)
            rows = []
            for label, conv, bn, hw in layers:
                m, w = _folded(model, conv, bn)
                rows.append(measure(label, m, w, hw, repeats))
                print(f"[{t} thr] {label:30s} " + "  ".join(
                    f"{c} {rows[-1][c + '_ratio']:.1f}x" for c in COLS if f"{c}_ms" in rows[-1]), flush=True)
            results[str(t)] = rows
    print(table(results, repeats))
    name = "conv_shares_quick" if args.quick else "conv_shares"
    print("wrote", write_results(name, {"quick": args.quick, "results": results, "table": table(results, repeats)}, args.out))


if __name__ == "__main__":
    main()
