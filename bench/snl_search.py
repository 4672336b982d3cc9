"""Wall time of the SNL mask search on ResNet-20 / the shared CIFAR-10 until 15k ReLUs remain.

    python bench/snl_search.py [--quick] [--budget 15k] [--limit 5000] [--batch-size 32]
                               [--lambda 1e-2] [--max-epochs 12] [--threads N]

The search is the one `deepshare snl` runs (engine, KD from the pretrained model,
Adam lr 1e-3, lambda x1.1 when the count stalls), on a fixed train subset
(``--limit``) with a small test subset for the per-epoch accuracy.  The count
cannot fall faster than Adam moves the masks (about lr per step, from 1 to the
1e-2 threshold), so it needs over a thousand steps whatever lambda is.  Lambda
starts at 1e-2 here, above the masks' gradient noise (~1e-3 per mask on
ResNet-20), so the masks move at full speed and the run fits a CPU budget:
from SNL's 1e-5 lambda needs tens of full CIFAR epochs to grow into effect, and
from 1e-3 the count was still at 100k after 11 epochs (1,727 steps).
``--quick`` is a smoke run (a few hundred images, a step cap).

Writes bench/results/snl_search.json (or snl_search_quick.json): wall time,
epochs, steps, seconds per step, and the kept ReLUs of every layer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from deepshare_convert.snl import SNLConfig, run_snl  # noqa: E402

from common import ROOT, add_out_arg, write_results  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "models" / "resnet20-12fca82f.th"


class _EpochPrinter:
    """Minimal engine reporter: one line per epoch (live count, lambda, time)."""

    def start(self, name, total, done=0):
        print(f"{name}: {total} steps", flush=True)

    def advance(self, info):
        pass

    def epoch(self, m):
        test = m.get("test_acc", m.get("test_miou", float("nan")))  # mIoU for segmentation data
        print(f"  epoch {m['epoch']}: step {m['step']} live {m.get('live', '-')} lambda {m.get('lambda', 0):.3g} "
              f"test {test:.1f}% ({m['epoch_seconds']:.0f} s)", flush=True)  # fmt: skip

    def stop(self):
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small subset, step cap")
    p.add_argument("--budget", default="15k")
    p.add_argument("--limit", type=int, default=5000, help="train subset size")
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lambda", dest="lam", type=float, default=1e-2)
    p.add_argument("--max-epochs", type=int, default=12)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--check-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    add_out_arg(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.limit, args.test_limit, args.max_steps = 512, 256, 60
    config = SNLConfig(model="resnet20", weights=str(WEIGHTS), data="cifar10-jpg", budget=args.budget,
                       lambda_policy="faithful",  # SNL's rule, which the docstring and results describe
                       batch_size=args.batch_size, limit=args.limit, test_limit=args.test_limit, lam=args.lam,
                       max_epochs=args.max_epochs, max_steps=args.max_steps, check_every=args.check_every)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_snl(config, Path(tmp) / "snl", reporter=_EpochPrinter())
        wall = time.perf_counter() - t0
        import json

        counts = json.loads((result.out / "snl_counts.json").read_text())
    layers = {name: {"shape": counts["site_shapes"][name], "relus": counts["site_relus"][name], "kept": kept}
              for name, kept in counts["sites"].items()}  # fmt: skip
    data = {
        "model": "resnet20", "weights": WEIGHTS.name, "data": "cifar10-jpg", "train_subset": args.limit,
        "test_subset": args.test_limit, "batch_size": args.batch_size, "budget": counts["budget"],
        "reached": counts["reached"], "kept": counts["kept"], "epochs": counts["epochs"], "steps": counts["steps"],
        "search_wall_seconds": counts["search_wall_seconds"], "run_wall_seconds": round(wall, 1),
        "seconds_per_step": round(counts["search_train_seconds"] / max(counts["steps"], 1), 4),
        "lambda_start": args.lam, "lambda_final": counts["final_lambda"], "cap": counts["cap"],
        "original_acc": result.results.get("original_acc"), "masked_acc": result.results.get("masked_acc"),
        "live_trajectory": counts["live_trajectory"], "per_layer": layers,
    }  # fmt: skip
    path = write_results("snl_search_quick" if args.quick else "snl_search", data, args.out)
    print(f"{'reached' if data['reached'] else 'NOT reached'} {data['budget']:,}: {data['kept']:,} ReLUs kept after "
          f"{data['epochs']} epochs / {data['steps']} steps, search {data['search_wall_seconds']:.0f} s -> {path}")
    for name, layer in layers.items():
        print(f"  {name:10s} {'x'.join(map(str, layer['shape'])):>9s} {layer['kept']:>6,} / {layer['relus']:,}")


if __name__ == "__main__":
    main()
