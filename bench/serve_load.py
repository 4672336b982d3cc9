"""`deepshare serve` under load: many clients, a bounded number of sessions at once, answers checked.

    python bench/serve_load.py [--clients 10] [--queries 10] [--max-sessions 4] [--budget 12k]

One server (a thread of this process, its session workers spawned) serves CIFAR ResNet-20 -- the
shared pretrained weights, converted at ``--budget`` (no retraining: what is measured is the
serving, and every private answer is held to the same model's plaintext answer), private weights,
with an in-process dealer (``--local``).  ``--clients`` client processes each send ``--queries``
queries of one CIFAR-10 test image (a PNG file written from the shared archive), all clients at
once, so ``--max-sessions`` run and the rest queue.  Reported: every answer against plaintext
top-1 and against its own image, throughput (images/s), p50/p95 latency per query as the client
sees it (from the call to the answer; "alone": one client with the server otherwise idle; "warm"
leaves out each client's first query, which also pays for importing CrypTen while ten processes
start at once), the server's memory (RSS of the supervisor -- this process, which also holds the
test images -- and of its session workers) after one warm-up session per worker, through the run
and after it, and the plaintext forward of one image on the same machine for the ratio.

Writes bench/results/serve_load.json.  Needs ../shared (weights and CIFAR-10 JPEGs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import ROOT, add_out_arg, median_time, update_docs_section, write_results  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "models" / "resnet20-12fca82f.th"


def _rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _client(args) -> list[dict]:
    """One client process: its queries one after another, each timed from connect to answer."""
    address, files, out, key = args
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from deepshare_convert.serving import query

    answers = []
    for f in files:
        tic = time.perf_counter()
        r = query(address, [f], out, key=key)
        answers.append({"file": f, "label": r.answers[0].label, "latency_s": time.perf_counter() - tic,
                        "bytes": r.bytes, "rounds": r.rounds})  # fmt: skip
    return answers


def _percentiles(values: list[float]) -> tuple[float, float]:
    v = sorted(values)
    return statistics.median(v), v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--max-sessions", type=int, default=4)
    ap.add_argument("--budget", default="12k")
    add_out_arg(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from PIL import Image

    from deepshare_convert import load_model
    from deepshare_convert.conversion.rewrite import convert, save
    from deepshare_convert.data import load_dataset
    from deepshare_convert.model_or_out import load_any
    from deepshare_convert.mpc.handshake import new_key
    from deepshare_convert.mpc.prepare import prepare, reference
    from deepshare_convert.serving import ServeConfig, Server, architecture_only, read_inputs

    work = Path(tempfile.mkdtemp(prefix="deepshare-serve-load-"))
    loaded = load_model("resnet20", weights=str(WEIGHTS))
    conv = convert(loaded.model, loaded.input_size, budget=args.budget, spec=loaded.spec.to_dict())
    out = str(save(conv, work / "resnet20"))
    full = load_any(out).model
    _, _, test = load_dataset("cifar10-jpg")
    n = args.clients * args.queries
    files = []
    for i in range(n):
        path = work / f"img{i:03d}.png"
        Image.fromarray(test.images[i].numpy()).save(path)
        files.append(str(path))
    cm = architecture_only(out)
    x = read_inputs(files, cm.input_size, cm.mean, cm.std).x
    gm = prepare(full)
    want = reference(gm, x).numpy().argmax(1)
    plain_s = median_time(lambda: full(x[:1]), repeats=20)

    key, lines = new_key(), []
    server = Server(full, tuple(cm.input_size), key, ServeConfig(listen=("127.0.0.1", 0), local=True,
                                                                  max_sessions=args.max_sessions), log=lines.append)  # fmt: skip
    up = threading.Event()
    thread = threading.Thread(target=server.run, kwargs=dict(ready=lambda s: up.set(), install_signals=False),
                              daemon=True)  # fmt: skip
    thread.start()
    assert up.wait(300)
    warm = [(server.address, [files[0]], out, key)] * args.max_sessions  # one session per worker first
    with mp.get_context("spawn").Pool(args.max_sessions) as pool:
        pool.map(_client, warm)
        alone = pool.apply(_client, ((server.address, files[:5], out, key),))  # one client, nothing else running
    workers = [p.pid for p in mp.active_children() if p.name.startswith("deepshare-session")]
    rss_before, workers_before = _rss_mb([os.getpid(), *workers]), _rss_mb(workers)
    jobs = [(server.address, files[c * args.queries:(c + 1) * args.queries], out, key) for c in range(args.clients)]
    samples, done = [], threading.Event()

    def sample():  # the workers' RSS through the run: growth, or a plateau
        while not done.wait(2.0):
            live = [p.pid for p in mp.active_children() if p.name.startswith("deepshare-session")]
            samples.append([round(time.perf_counter() - tic, 1), round(_rss_mb(live), 1), round(_rss_mb([os.getpid()]), 1),
                            server.counts["ok"]])

    tic = time.perf_counter()
    threading.Thread(target=sample, daemon=True).start()
    with mp.get_context("spawn").Pool(args.clients) as pool:
        results = pool.map(_client, jobs)
    wall = time.perf_counter() - tic
    done.set()
    time.sleep(1.0)
    workers_now = [p.pid for p in mp.active_children() if p.name.startswith("deepshare-session")]
    rss_after, workers_after = _rss_mb([os.getpid(), *workers_now]), _rss_mb(workers_now)
    server.stop()
    thread.join(120)

    flat = [a for client in results for a in client]
    index = {f: i for i, f in enumerate(files)}
    own = all(a["file"] == f for (_, fs, _, _), client in zip(jobs, results) for a, f in zip(client, fs))
    agree = sum(a["label"] == int(want[index[a["file"]]]) for a in flat)
    p50, p95 = _percentiles([a["latency_s"] for a in flat])
    warm50, warm95 = _percentiles([a["latency_s"] for client in results for a in client[1:]])  # imports done
    data = {
        "model": f"resnet20 (shared CIFAR-10 weights) at {args.budget}, private weights, dealer in-process",
        "clients": args.clients, "queries_per_client": args.queries, "max_sessions": args.max_sessions,
        "answers": len(flat), "agree_with_plaintext": agree, "each_client_its_own": own,
        "sessions_ok": sum("image(s)" in line and line.startswith("session from") for line in lines) - args.max_sessions - 5,
        "sessions_failed": sum(": failed:" in line for line in lines),
        "wall_s": round(wall, 2), "throughput_images_per_s": round(len(flat) / wall, 3),
        "latency_p50_s": round(p50, 3), "latency_p95_s": round(p95, 3),
        "latency_warm_p50_s": round(warm50, 3), "latency_warm_p95_s": round(warm95, 3),
        "latency_alone_p50_s": round(statistics.median(a["latency_s"] for a in alone[1:]), 3),
        "plaintext_forward_s": round(plain_s, 5), "p50_over_plaintext": round(p50 / plain_s, 1),
        "online_bytes_per_query": flat[0]["bytes"], "rounds_per_query": flat[0]["rounds"],
        "server_rss_mb_before": round(rss_before, 1), "server_rss_mb_after": round(rss_after, 1),
        "workers_rss_mb_before": round(workers_before, 1), "workers_rss_mb_after": round(workers_after, 1),
        "workers_replaced": sorted(workers) != sorted(workers_now),
        "rss_mb_during": samples,  # [seconds, workers MB, supervisor MB, sessions done]
    }  # fmt: skip
    path = write_results("serve_load", data, args.out)
    for k, v in data.items():
        print(f"{k}: {v}")
    print(f"wrote {path}")
    if args.out is None:
        update_docs_section("serve_load", markdown(data, "python " + " ".join(sys.argv)))
        print("updated the bench:serve_load section of docs/results.md")
    assert agree == len(flat) == n and own, "a private answer differs from plaintext"


def markdown(d: dict, command: str) -> str:
    """The docs/results.md section of one run."""
    columns = {
        "answers = plaintext top-1": f"{d['agree_with_plaintext']}/{d['answers']}",
        "own answers": "yes" if d["each_client_its_own"] else "no",
        "sessions ok / failed": f"{d['sessions_ok']} / {d['sessions_failed']}",
        "images/s": f"{d['throughput_images_per_s']:.2f}",
        "p50 / p95 s": f"{d['latency_p50_s']:.2f} / {d['latency_p95_s']:.2f}",
        "warm p50 / p95 s": f"{d['latency_warm_p50_s']:.2f} / {d['latency_warm_p95_s']:.2f}",
        "alone p50 s": f"{d['latency_alone_p50_s']:.2f}",
        "plaintext forward": f"{1e3 * d['plaintext_forward_s']:.2f} ms",
        "online per query": f"{d['online_bytes_per_query'] / 1e6:.2f} MB, {d['rounds_per_query']} rounds",
        "workers' RSS MB, before → after": f"{d['workers_rss_mb_before']:.0f} → {d['workers_rss_mb_after']:.0f}",
    }
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns),
                       "| " + " | ".join(columns.values()) + " |"])  # fmt: skip
    return f"""## Serving under load (bench/serve_load.py)

Command: `{command}` (JSON in `bench/results/serve_load.json`). {d["model"]}; {d["clients"]} client
processes × {d["queries_per_client"]} queries of one CIFAR-10 test image each, all at once, at most
{d["max_sessions"]} sessions at a time (`--max-sessions`), on this 2-core machine. Latency is per query as
the client sees it; "warm" leaves out each client's first query (which also imports CrypTen while ten
processes start); "alone" is one client on an otherwise idle server.

{table}

The workers' memory is sampled every 2 s through the run (`rss_mb_during` in the JSON): it rises
over the first sessions, then stays flat; it does not grow with the sessions served."""


if __name__ == "__main__":
    main()
