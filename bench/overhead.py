"""Conversion time per stage, and train-step time / activation memory of converted vs original.

    python bench/overhead.py [--quick]

Writes bench/results/overhead.json and the `overhead` section of docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from deepshare_convert import load_model  # noqa: E402
from deepshare_convert.conversion.rewrite import apply_plan, build_plan, convert, save  # noqa: E402

from common import add_out_arg, median_time, update_docs_section, write_results  # noqa: E402


def conversion_breakdown(model_name: str, input_size: str, budget: str) -> dict:
    """Wall time of each stage of `deepshare convert` (after imports and model construction)."""
    loaded = load_model(model_name, input_size=input_size, num_classes=None)
    t0 = time.perf_counter()
    plan = build_plan(loaded.model, loaded.input_size, budget=budget, spec=loaded.spec.to_dict())
    t1 = time.perf_counter()
    gm = apply_plan(loaded.model, plan)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        from deepshare_convert.conversion.rewrite import Converted

        save(Converted(gm, plan), Path(d) / "out")
    t3 = time.perf_counter()
    return {"model": model_name, "input_size": input_size, "budget": budget, "drelus": plan.achieved,
            "relus": plan.total_relus, "census_and_allocate_s": round(t1 - t0, 3),
            "rewrite_and_check_s": round(t2 - t1, 3), "save_s": round(t3 - t2, 3), "total_s": round(t3 - t0, 3)}  # fmt: skip


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (deduplicated by storage): the activation memory."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


def train_step_ratio(model_name: str, budget: str, batch: int, repeats: int) -> dict:
    """Train-step time (fwd + bwd + SGD) of the converted model in each phase's gate mode vs the original."""
    from deepshare_convert.conversion.gates import set_gate_mode
    from deepshare_convert.training.phases import apply_switch_fraction

    loaded = load_model(model_name)
    original = loaded.model.train()
    converted = convert(original, loaded.input_size, budget=budget).model.train()
    x = torch.randn(batch, *loaded.input_size)
    y = torch.randint(0, 10, (batch,))

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

        return run

    def set_mode(mode):
        set_gate_mode(converted, mode)
        if mode == "mixed":
            apply_switch_fraction(converted, 0.5)

    modes = ("step", "gelu", "mixed")
    times: dict[str, list[float]] = {k: [] for k in ("original", *modes)}
    for _ in range(repeats):  # blocks interleaved, so background load hits all alike
        times["original"].append(median_time(step(original), repeats=3, warmup=1))
        for mode in modes:  # steady state within a block: a training phase runs one mode for many steps
            set_mode(mode)
            times[mode].append(median_time(step(converted), repeats=3, warmup=1))
    med = {k: sorted(v)[repeats // 2] for k, v in times.items()}
    set_mode("step")
    m_orig, m_conv = saved_activation_bytes(original, x), saved_activation_bytes(converted, x)
    return {"model": model_name, "budget": budget, "batch": batch,
            "images_per_s": {k: round(batch / v, 1) for k, v in med.items()},
            "time_ratio": {m: round(med[m] / med["original"], 3) for m in modes},
            "original_saved_MB": round(m_orig / 2**20, 1), "converted_saved_MB": round(m_conv / 2**20, 1),
            "memory_ratio": round(m_conv / m_orig, 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small models only (smoke test)")
    add_out_arg(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.quick:
        conversions = [("resnet20", "3,32,32", "15k"), ("timm:resnet18", "3,64,64", "20k")]
        steps = [("resnet20", "15k", 32, 3)]
    else:
        conversions = [("timm:resnet50", "3,224,224", "50k"), ("timm:resnet18", "3,224,224", "50k"),
                       ("timm:densenet121", "3,224,224", "200k"), ("timm:regnetx_002", "3,224,224", "50k"),
                       ("resnet18_cifar", "3,32,32", "12.9k"), ("wrn22_8", "3,32,32", "120k")]  # fmt: skip
        steps = [("resnet18_cifar", "12.9k", 64, 3), ("resnet20", "15k", 64, 5)]
    conv = [conversion_breakdown(*c) for c in conversions]
    train = [train_step_ratio(*s) for s in steps]
    path = write_results("overhead" + ("_quick" if args.quick else ""), {"conversion": conv, "train_step": train},
                         args.out)
    lines = ["## Overhead (bench/overhead.py)", "", f"Command: `python bench/overhead.py{' --quick' if args.quick else ''}`", "",
             "| model | input | budget | ReLUs -> DReLUs | census+allocate s | rewrite+check s | save s | total s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['model']} | {c['input_size']} | {c['budget']} | {c['relus']:,} -> {c['drelus']:,} | "
              f"{c['census_and_allocate_s']} | {c['rewrite_and_check_s']} | {c['save_s']} | {c['total_s']} |" for c in conv]
    lines += ["", "Train step (forward + backward + SGD), images/s; ratio = converted time / original time:", "",
              "| model | budget | batch | original | step gates | GELU gates | mixed (switch) | ratio step / gelu / mixed "
              "| saved-activation MB orig / conv | memory ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in train:
        ips, r = t["images_per_s"], t["time_ratio"]
        lines.append(f"| {t['model']} | {t['budget']} | {t['batch']} | {ips['original']} | {ips['step']} | {ips['gelu']} | "
                     f"{ips['mixed']} | {r['step']} / {r['gelu']} / {r['mixed']} | "
                     f"{t['original_saved_MB']} / {t['converted_saved_MB']} | {t['memory_ratio']} |")
    if not args.quick:
        update_docs_section("overhead", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
