"""The separate dealer on the issue's configurations: three processes against the simulated dealer, one run each.

    python bench/dealer_runs.py [--only resnet18 deeplab] [--frames N]

For each configuration -- ResNet-18-CIFAR at 6K DReLUs (batch 1) and the DeepLabV3-MobileNetV2
CamVid model converted at 3% on a full 3x180x240 frame, each in public and private weight mode --
one run with the separate dealer and one with the simulated (party-0) dealer, side by side on this
machine: agreement with plaintext, online bytes / rounds (which the dealer must not change), the
offline bytes the dealer sent against the cost model's estimate, and the wall times.  Untrained
weights with BatchNorm statistics from data (nothing is downloaded); the CamVid frame is the
first test frame of ../shared/data (skipped when that archive is absent).

Writes bench/results/dealer_runs.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from deepshare_convert import load_model  # noqa: E402
from deepshare_convert.conversion.rewrite import convert  # noqa: E402
from deepshare_convert.models.batchnorm import recalibrate_batchnorm  # noqa: E402
from deepshare_convert.mpc.launcher import run_two_party  # noqa: E402

from common import ROOT, add_out_arg, write_results  # noqa: E402

CAMVID = ROOT.parent / "shared" / "data" / "camvid-240x180.tar.gz"


def _resnet18():
    torch.manual_seed(0)
    loaded = load_model("resnet18_cifar")
    net = recalibrate_batchnorm(loaded.model, loaded.input_size, batch=32, seed=0)
    conv = convert(net, loaded.input_size, budget="6k", spec=loaded.spec.to_dict())
    x = torch.randn((1, *loaded.input_size), generator=torch.Generator().manual_seed(1))
    return "resnet18_cifar@6k", conv.model, x


def _deeplab():
    from deepshare_convert.data.segmentation import camvid_splits

    size = (3, 180, 240)
    torch.manual_seed(0)
    loaded = load_model("deeplabv3_mobilenetv2", input_size=",".join(map(str, size)))
    _, splits = camvid_splits()

    def frames(split, n):
        x = splits[split].images[:n].permute(0, 3, 1, 2).float() / 255
        return (x - torch.tensor(loaded.mean).view(1, 3, 1, 1)) / torch.tensor(loaded.std).view(1, 3, 1, 1)

    net = recalibrate_batchnorm(loaded.model, size, inputs=frames("train", 8))
    conv = convert(net, size, budget="3%", spec=loaded.spec.to_dict())
    net = recalibrate_batchnorm(conv.model, size, inputs=frames("train", 8))
    return "deeplabv3_mobilenetv2_camvid@3%", net, frames("test", 1)


def _row(name: str, net, x, mode: str) -> dict:
    out = {"model": name, "weights_mode": mode, "input": list(x.shape)}
    for dealer in ("separate", "simulated"):
        t0 = time.perf_counter()
        r = run_two_party(net, x, weights_mode=mode, dealer=dealer, timeout=1800)
        p0, p1 = r.parties
        out[dealer] = {
            "agreement": r.top1_agreement, "max_logit_error": r.max_logit_error,
            "online_bytes": p0.bytes, "online_rounds": p0.rounds, "setup_bytes": p0.setup_bytes,
            "setup_rounds": p0.setup_rounds, "offline_bytes": r.offline_bytes, "offline_expected": r.offline_expected,
            "offline_messages": r.offline_messages, "offline_s": p1.inferences[0]["offline_s"],
            "deal_s": r.dealer_report["inferences"][0]["deal_s"] if r.dealer_report else None,
            "online_wall_s": max(p0.wall_s, p1.wall_s), "run_s": time.perf_counter() - t0,
        }  # fmt: skip
        print(f"{name} {mode:7s} dealer {dealer:9s} agreement {r.top1_agreement:.4%} online {p0.bytes / 1e6:.2f} MB "
              f"{p0.rounds} rnd, offline {r.offline_bytes / 1e6:.2f} MB (est {r.offline_expected / 1e6:.2f}), "
              f"online wall {out[dealer]['online_wall_s']:.2f} s, whole run {out[dealer]['run_s']:.1f} s", flush=True)
    sep, sim = out["separate"], out["simulated"]
    assert (sep["online_bytes"], sep["online_rounds"]) == (sim["online_bytes"], sim["online_rounds"])
    assert sep["offline_bytes"] == sep["offline_expected"] > 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=("resnet18", "deeplab"), default=("resnet18", "deeplab"))
    add_out_arg(ap)
    args = ap.parse_args()
    builders = {"resnet18": _resnet18, "deeplab": _deeplab}
    rows = []
    for key in args.only:
        if key == "deeplab" and not CAMVID.is_file():
            print(f"skipping deeplab: {CAMVID} not found")
            continue
        name, net, x = builders[key]()
        rows += [_row(name, net, x, mode) for mode in ("public", "private")]
    path = write_results("dealer_runs", {"only": list(args.only), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
