"""``deepshare private-infer | estimate-latency | calibrate | export``: private inference commands.

Registered on the main app by :func:`register` (one line at the bottom of ``app.py``).  Heavy
imports (torch, crypten, onnx) stay inside the command bodies, like every other command.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .console import console
from .loading import load_model_or_out

from .options import (  # isort: skip (one compact list, see pyproject)
    InputSizeOpt, JsonOpt, LeafOpt, ModelOrOutArg, NumClassesOpt, PretrainedOpt, TrustPickleOpt, WeightsOpt,
    batch_size_opt, check_out_file,
)  # fmt: skip

WeightsModeOpt = Annotated[
    str,
    typer.Option("--weights-mode", help="private: weights, α, β secret-shared by the server (hidden from the "
                 "client); public: weights known to both (only the client's data is private)."),
]  # fmt: skip


DealerOpt = Annotated[
    str,
    typer.Option("--dealer", help="separate: a third process deals the masks and triples (private against "
                 "either party); simulated: party 0 samples them (a measurement only: NOT private against the "
                 "server)."),
]  # fmt: skip
DealerAddrOpt = Annotated[
    Optional[str],
    typer.Option("--dealer-addr", help="HOST:PORT of the `deepshare dealer` (with --rank; both parties name it)."),
]  # fmt: skip
DealerKeyOpt = Annotated[
    Optional[str],
    typer.Option("--dealer-key-file", help="Key shared with the dealer (mode 600; default: --key-file)."),
]  # fmt: skip

ThreadsOpt = Annotated[
    int,
    typer.Option("--threads", help="Torch threads per party (1 suits parties sharing one host; give a server its "
                 "cores). The answer does not depend on it."),
]  # fmt: skip

SIMULATED_WARNING = ("dealer simulated: party 0 sampled every mask and triple, so this run is NOT private against "
                     "the server (a measurement of the online phase only)")  # fmt: skip


def _host_port(value: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or a one-line usage error."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{option} must be HOST:PORT (e.g. 127.0.0.1:29600), got {value!r}")
    return host, int(port)


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise typer.BadParameter(f"--batch-size must be at least 1, got {batch_size}")


def _original_of(path: str):
    """The unconverted architecture a converted directory came from (weights do not change costs)."""
    from pathlib import Path

    if not Path(path).is_dir():
        return None
    from ..conversion.plan import Plan
    from ..models import ModelSpec, load_model

    plan = Plan.read(path)
    spec = ModelSpec.from_dict(plan.model) if "source" in plan.model else None
    if spec is None or spec.source == "python":
        return None
    return load_model(spec.display, num_classes=spec.num_classes, input_size=tuple(plan.input_size)).model


def _first_batch(data: str, num: int, mean, std, input_size):
    from ..data import check_input_fits, load_dataset, make_loader, require_split

    with console.status(f"reading {data}", spinner="dots"):
        info, _, test = load_dataset(data)
    require_split(test, "test", data)
    check_input_fits(input_size, info, data)  # before normalising: a clear line, not a mean/std error
    loader = make_loader(test, info, train=False, batch_size=num, mean=mean, std=std, limit=num)
    return next(iter(loader))


def _label_score(logits, labels, data: str) -> tuple[str, float, str]:
    """Private predictions against the dataset's labels: top-1, or for segmentation the pixel accuracy over
    labelled pixels (the ignore label left out, as mIoU does)."""
    pred = logits.argmax(1)
    if pred.ndim == 1:
        return "top1_labels", float((pred == labels).mean()), "correct"
    from ..data import load_dataset

    ignore = load_dataset(data)[0].ignore_index
    keep = labels != ignore if ignore is not None else labels >= 0
    acc = float((pred == labels)[keep].mean()) if keep.any() else float("nan")
    return "pixel_acc_labels", acc, "of the labelled pixels correct"


def register(app: typer.Typer) -> None:
    """Add the private-inference commands to ``app``."""

    @app.command("private-infer")
    def private_infer(
        model: ModelOrOutArg,
        data: Annotated[Optional[str], typer.Option("--data", help="Dataset spec (party 1's inputs: the first "
                                                     "--batch-size test images).")] = None,
        batch_size: Annotated[int, batch_size_opt("Test images in the two-party run (one batch).")] = 4,
        weights_mode: WeightsModeOpt = "public",
        sequential: Annotated[bool, typer.Option("--sequential", help="One inference per image, one after another, "
                                                 "after one setup (private weights masked once).")] = False,
        rank: Annotated[Optional[int], typer.Option("--rank", help="Run one party only: 0 holds the model, "
                                                    "1 the inputs (two-host deployment).")] = None,
        master_addr: Annotated[str, typer.Option("--master-addr", help="Party 0's address (with --rank).")] = "127.0.0.1",
        master_port: Annotated[int, typer.Option("--master-port", help="Party 0's handshake port (with --rank); "
                                                 "CrypTen's rendezvous uses the next one.")] = 29500,
        key_file: Annotated[Optional[str], typer.Option("--key-file", help="File holding the key both parties share "
                                                        "(mode 600; default: $DEEPSHARE_MPC_KEY). Required with "
                                                        "--rank; a local run makes a fresh key.")] = None,
        dealer: DealerOpt = "separate",
        dealer_addr: DealerAddrOpt = None,
        dealer_key_file: DealerKeyOpt = None,
        threads: ThreadsOpt = 1,
        weights: WeightsOpt = None,
        input_size: InputSizeOpt = None,
        num_classes: NumClassesOpt = None,
        leaf: LeafOpt = None,
        trust_pickle: TrustPickleOpt = False,
        pretrained: PretrainedOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Two-party CrypTen inference: party 0 holds the model, party 1 the inputs and gets the output.

        Without --rank the server, the client and the dealer run here as three processes (gloo on
        127.0.0.1) and the result is compared with plaintext inference.  With --rank, this process
        is one party of a deployment whose dealer runs elsewhere (`deepshare dealer`, --dealer-addr);
        party 0 needs no --data.  Every participant first proves knowledge of a shared key and
        compares the plan's hash; no share moves before all hold.  Setup, offline (the dealer's
        corrections) and online costs are reported apart.
        """
        from pathlib import Path

        from ..errors import DeepShareError
        from ..mpc.handshake import load_key, require_key

        _check_batch(batch_size)
        _check_dealer(dealer)
        how = (weights, input_size, num_classes, trust_pickle, pretrained, leaf)
        if rank is not None:
            if sequential:
                raise DeepShareError("--sequential runs both parties here; it does not combine with --rank")
            key = require_key(key_file)  # before loading anything: a missing key is the first thing to say
            link = None
            if dealer == "separate":
                if dealer_addr is None:
                    raise DeepShareError("a two-host run needs the dealer: pass --dealer-addr HOST:PORT (where "
                                         "`deepshare dealer` listens), or --dealer simulated for a measurement that "
                                         "is not private against party 0")  # fmt: skip
                host, port = _host_port(dealer_addr, "--dealer-addr")
                link = (host, port, require_key(dealer_key_file) if dealer_key_file else key)
            _one_party(model, data, batch_size, weights_mode, rank, master_addr, master_port, how, as_json, key,
                       dealer, link, threads)  # fmt: skip
            return
        if key_file is not None:
            load_key(key_file)  # a local run makes its own key; a given file is still checked (mode, length)
        if data is None:
            raise DeepShareError("--data is required (party 1's inputs)")
        from ..mpc.launcher import run_two_party

        loaded = load_model_or_out(model, *how)
        x, y = _first_batch(data, batch_size, loaded.mean, loaded.std, loaded.input_size)
        who = "server, client and dealer" if dealer == "separate" else "two parties, simulated dealer"
        with console.status(f"private inference ({who}; {weights_mode} weights) on {len(x)} images", spinner="dots"):
            run = run_two_party(loaded.model, x, weights_mode=weights_mode, leaf_modules=leaf or (), sequential=sequential,
                                dealer=dealer, threads=threads)  # fmt: skip
        key, acc, what = _label_score(run.logits, y.numpy(), data)
        name = str(Path(model)) if Path(model).is_dir() else loaded.spec.display
        if as_json:
            doc = {"model": name, "data": data, key: acc, **run.to_dict()}
            if dealer == "simulated":
                doc["warning"] = SIMULATED_WARNING
            print(json.dumps(doc, indent=2))
            return
        from .mpc_tables import private_run_table

        console.print(private_run_table(run, name))
        console.print(f"private predictions: {100 * acc:.1f}% {what} on {len(y)} {data} test images; "
                      f"{run.parties[0].comparisons:,} comparisons (plan: {run.comparisons_expected:,})")  # fmt: skip
        _print_dealer_line(run)

    @app.command("dealer")
    def dealer_command(
        model: ModelOrOutArg,
        listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to wait on for the parties.")] = "127.0.0.1:29600",
        key_file: Annotated[Optional[str], typer.Option("--key-file", help="Key shared with the parties (mode 600; "
                                                        "default: $DEEPSHARE_MPC_KEY); the parties' --dealer-key-file, "
                                                        "or their --key-file.")] = None,
        server_key_file: Annotated[Optional[str], typer.Option("--server-key-file", help="The server link's own key "
                                                               "(default: --key-file).")] = None,
        client_key_file: Annotated[Optional[str], typer.Option("--client-key-file", help="The client link's own key "
                                                               "(default: --key-file): unknown to the server, it stops "
                                                               "a server posing as the dealer.")] = None,
        weights_mode: WeightsModeOpt = "public",
        sessions: Annotated[int, typer.Option("--sessions", help="Sessions to deal before exiting (0: serve until "
                                              "Ctrl-C or SIGTERM).")] = 0,
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds a party waits for its peer at the dealer "
                                               "(with --sessions 1: for both parties).")] = 600.0,
        weights: WeightsOpt = None,
        input_size: InputSizeOpt = None,
        num_classes: NumClassesOpt = None,
        leaf: LeafOpt = None,
        trust_pickle: TrustPickleOpt = False,
        pretrained: PretrainedOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        """The dealer of a deployment: correlated randomness for both parties, on a host of its own.

        Waits on --listen for servers and clients (`deepshare serve` / `query`, or `private-infer
        --rank 0/1 --dealer-addr`), authenticates each under the key, pairs the two parties of each
        session, checks that all three run one plan, then deals the session's masks and triples:
        seeds to each party, corrections to the client.  One line (--json: one JSON object) per
        session.  A converted OUT/ is rebuilt from plan.json alone; no weights are read.
        """
        import signal
        import threading
        from pathlib import Path

        from ..errors import DeepShareError
        from ..mpc.handshake import require_key
        from ..mpc.launcher import serve_dealer_sessions
        from ..serving.artifacts import architecture_only
        from .console import err_console

        if sessions < 0:
            raise typer.BadParameter(f"--sessions must be 0 (until stopped) or more, got {sessions}")
        host, port = _host_port(listen, "--listen")
        default = require_key(key_file) if key_file or not (server_key_file and client_key_file) else None
        key = {0: require_key(server_key_file) if server_key_file else default,
               1: require_key(client_key_file) if client_key_file else default}  # fmt: skip
        if Path(model).is_dir():
            net = architecture_only(model).model  # the dealer never reads the weights file
        else:
            net = load_model_or_out(model, weights, input_size, num_classes, trust_pickle, pretrained, leaf).model
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

        def on_report(report):
            if as_json:
                print(json.dumps({"role": "dealer", "weights_mode": weights_mode, **report}), flush=True)
            elif "error" not in report:
                console.print(f"dealer ({weights_mode} weights): session {report['session'][:8] or '-'}: "
                              f"{len(report['inferences'])} inference(s) dealt; offline "
                              f"{report['bytes'][1] / 1e6:,.2f} MB to the client in {report['messages'][1]} "
                              f"message(s), {report['bytes'][0]:,} bytes to the server; {report['wall_s']:.2f} s")  # fmt: skip

        err_console.print(f"dealer: listening on {host}:{port}" + (f" for {sessions} session(s)" if sessions else
                                                                   " (Ctrl-C to stop)"))  # fmt: skip
        reports = serve_dealer_sessions(net, weights_mode=weights_mode, addr=host, port=port, key=key,
                                        leaf_modules=leaf or (), timeout=timeout, sessions=sessions,
                                        pair_timeout=timeout if sessions == 1 else min(timeout, 60.0),
                                        log=lambda line: err_console.print(line), on_report=on_report, stop=stop)  # fmt: skip
        failed = [r["error"] for r in reports if "error" in r]
        if sessions == 1 and (failed or not reports):
            raise DeepShareError(failed[0] if failed else f"no session reached the dealer within {timeout:.0f}s")

    @app.command("estimate-latency")
    def estimate_latency(
        model: ModelOrOutArg,
        bandwidth: Annotated[str, typer.Option("--bandwidth", help="Link bandwidth, with its unit: 1Gbps, 100Mbit "
                                               "(bits/s) or 1GB/s (bytes/s).")] = "1Gbps",
        rtt: Annotated[str, typer.Option("--rtt", help="Round-trip time, with its unit: 1ms, 200us or 0.05s.")] = "1ms",
        weights_mode: WeightsModeOpt = "public",
        batch_size: Annotated[int, batch_size_opt("Images per private inference.")] = 1,
        measure: Annotated[bool, typer.Option("--measure", help="Also run the real two-party execution "
                                              "(random inputs) and show measured next to predicted.")] = False,
        what_if: Annotated[bool, typer.Option("--what-if", help="Also re-plan the same budget at group sizes "
                                              "1, 2, 4 (and the plan's own) and compare their costs.")] = False,
        budget: Annotated[Optional[str], typer.Option("--budget", help="DReLU budget of the --what-if rows for an "
                                                      "unconverted MODEL (an OUT/ uses its plan's).")] = None,
        table_path: Annotated[Optional[str], typer.Option("--table", help="Cost table JSON.",
                                                          show_default="the package's cost_table.json")] = None,
        weights: WeightsOpt = None,
        input_size: InputSizeOpt = None,
        num_classes: NumClassesOpt = None,
        leaf: LeafOpt = None,
        trust_pickle: TrustPickleOpt = False,
        pretrained: PretrainedOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Bytes, rounds and latency of private inference per layer, and the speedup over the original.

        latency = compute + bytes*8/bandwidth + rounds*RTT, with per-operation costs measured
        on CrypTen (`deepshare calibrate`).  For a converted OUT/ the original architecture is
        rebuilt from its plan and estimated under the same settings.  --what-if re-plans the same
        budget at group sizes 1, 2, 4 with the code `convert --group-size G` runs.
        """
        from ..mpc.costs import CostTable, estimate
        from ..mpc.units import parse_bandwidth, parse_duration

        _check_batch(batch_size)
        bw, rt = parse_bandwidth(bandwidth), parse_duration(rtt)
        table = CostTable.load(table_path)
        loaded = load_model_or_out(model, weights, input_size, num_classes, trust_pickle, pretrained, leaf)
        settings = _what_if_settings(model, budget, leaf) if what_if else None  # bad input: say so before any work
        kw = dict(batch=batch_size, weights_mode=weights_mode, table=table, bandwidth=bw, rtt=rt)
        with console.status("lowering and costing", spinner="dots"):
            est = estimate(loaded.model, loaded.input_size, name=loaded.spec.display, leaf_modules=leaf or (), **kw)
            orig_model = _original_of(model)
            orig = estimate(orig_model, loaded.input_size, name="original", **kw) if orig_model is not None else None
        rows = None
        if settings is not None:  # an unconverted MODEL is its own original
            from ..mpc.what_if import what_if as run_what_if

            base_model, base = (orig_model, orig) if orig_model is not None else (loaded.model, est)
            with console.status("re-planning at group sizes 1, 2, 4", spinner="dots"):
                rows = run_what_if(base_model, loaded.input_size, settings, baseline=base, **kw)
        measured = run = None
        if measure:
            import torch

            from ..mpc.launcher import run_two_party

            x = torch.randn((batch_size, *loaded.input_size), generator=torch.Generator().manual_seed(0))
            with console.status(f"two-party run ({weights_mode} weights)", spinner="dots"):
                run = run_two_party(loaded.model, x, weights_mode=weights_mode, leaf_modules=leaf or ())
            measured = run.parties[0].per_node
        if as_json:
            out = {"estimate": est.to_dict(), "original": orig.to_dict() if orig else None}
            if orig:  # online phase (the setup, private mode only, is once per loaded model: estimate.setup_*)
                out["speedup"] = orig.latency_s / est.latency_s
                out["speedup_network"] = orig.network_s / est.network_s
            if rows is not None:
                out["what_if"] = [r.to_dict() for r in rows]
            if run is not None:
                p0 = run.parties[0]
                out["measured"] = {"bytes": p0.bytes, "rounds": p0.rounds, "wall_s": p0.wall_s,
                                   "setup_bytes": p0.setup_bytes, "setup_rounds": p0.setup_rounds,
                                   "offline_bytes": run.offline_bytes, "offline_messages": run.offline_messages,
                                   "bytes_deviation": (est.bytes - p0.bytes) / max(p0.bytes, 1),
                                   "rounds_deviation": (est.rounds - p0.rounds) / max(p0.rounds, 1),
                                   "max_logit_error": run.max_logit_error}  # fmt: skip
            print(json.dumps(out, indent=2))
            return
        from .mpc_tables import estimate_table

        console.print(estimate_table(est, orig, measured))
        console.print(f"offline (dealer -> client, per inference): {est.offline_bytes / 1e6:,.3f} MB in "
                      f"{est.offline_messages} message, {est.offline_network_s * 1e3:,.1f} ms at {bandwidth}; "
                      f"it can travel before the input exists, so the latency above is online only")  # fmt: skip
        if rows is not None:
            from .mpc_tables import what_if_table

            console.print(what_if_table(rows, est, settings.budget))
        if run is not None:
            p0 = run.parties[0]
            console.print(
                f"measured (loopback, party 0): setup {p0.setup_bytes / 1e6:,.2f} MB, {p0.setup_rounds} rounds "
                f"(predicted {est.setup_bytes / 1e6:,.2f} MB, {est.setup_rounds}); "
                f"online {p0.bytes / 1e6:,.2f} MB, {p0.rounds} rounds, {p0.wall_s * 1e3:,.0f} ms; "
                f"predicted {est.bytes / 1e6:,.2f} MB ({100 * (est.bytes - p0.bytes) / max(p0.bytes, 1):+.2f}%), "
                f"{est.rounds} rounds ({100 * (est.rounds - p0.rounds) / max(p0.rounds, 1):+.2f}%); "
                f"max logit error {run.max_logit_error:.2e}; offline {run.offline_bytes / 1e6:,.3f} MB measured "
                f"(predicted {est.offline_bytes / 1e6:,.3f} MB)"
            )

    @app.command()
    def calibrate(
        out: Annotated[Optional[str], typer.Option("--out", "-o", callback=check_out_file, help="Where to write the table.",
                                                   show_default="the package's cost_table.json")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="Smaller micro-benchmarks.")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Re-measure the per-operation MPC cost table on CrypTen (two local processes)."""
        from dataclasses import asdict

        from ..mpc.calibrate import calibrate as run_calibrate
        from ..mpc.costs import TABLE_PATH

        with console.status("measuring CrypTen operations (two parties on 127.0.0.1)", spinner="dots"):
            table = run_calibrate(out, quick=quick)
        if as_json:
            print(json.dumps(asdict(table), indent=2))
            return
        from .mpc_tables import cost_table_table

        console.print(cost_table_table(table, out or str(TABLE_PATH)))

    @app.command()
    def export(
        model: ModelOrOutArg,
        onnx: Annotated[str, typer.Option("--onnx", callback=check_out_file, help="Output .onnx file.", show_default=False)],
        batch_size: Annotated[int, batch_size_opt("Batch size of the exported graph.")] = 1,
        opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 17,
        weights: WeightsOpt = None,
        input_size: InputSizeOpt = None,
        num_classes: NumClassesOpt = None,
        leaf: LeafOpt = None,
        trust_pickle: TrustPickleOpt = False,
        pretrained: PretrainedOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Export MODEL (converted or not) to ONNX with the shared gate as standard ops; checked with onnxruntime."""
        from ..export_onnx import export_onnx

        _check_batch(batch_size)
        loaded = load_model_or_out(model, weights, input_size, num_classes, trust_pickle, pretrained, leaf)
        with console.status("exporting and checking with onnxruntime", spinner="dots"):
            report = export_onnx(loaded.model, loaded.input_size, onnx, batch=batch_size, opset=opset)
        if as_json:
            print(json.dumps(report.to_dict(), indent=2))
            return
        shown = ("Cast", "Gather", "GreaterOrEqual", "Mul", "Add")
        console.print(
            f"wrote [bold]{report.path}[/] (opset {report.opset}, {report.nodes} nodes: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(report.op_counts.items()) if k in shown)}); "
            f"onnx.checker ok; onnxruntime vs PyTorch max abs error {report.max_abs_error:.1e}"
        )


def _what_if_settings(model: str, budget, leaf):
    """The conversion settings --what-if re-plans: an OUT/'s plan, or a MODEL with --budget."""
    from pathlib import Path

    from ..conversion.plan import Plan
    from ..conversion.settings import settings_from
    from ..errors import DeepShareError

    if not Path(model).is_dir():
        if budget is None:
            raise DeepShareError("--what-if on an unconverted MODEL needs --budget (an OUT/ uses its plan's)")
        return settings_from(budget=budget, leaf_modules=list(leaf or []))
    if budget is not None:
        raise DeepShareError("--budget is for an unconverted MODEL; an OUT/ re-plans its own plan's budget")
    plan = Plan.read(model)
    if plan.kind != "deepshare":
        raise DeepShareError(f"--what-if re-plans shared-gate conversions; {model} is an {plan.kind} plan")
    if _original_of(model) is None:
        raise DeepShareError(f"--what-if needs the original architecture of {model}; its plan names a Python model")
    return plan.settings()


def _check_dealer(dealer: str) -> None:
    from ..mpc.dealer.randomness import DEALER_MODES

    if dealer not in DEALER_MODES:
        raise typer.BadParameter(f"--dealer must be one of {', '.join(DEALER_MODES)}, got {dealer!r}")


def _print_dealer_line(run) -> None:
    """One line on who dealt: the offline bytes (estimate = measured), or the simulated dealer's warning."""
    if run.dealer == "simulated":
        console.print(f"[yellow]{SIMULATED_WARNING}[/yellow]")
        return
    console.print(f"dealer separate: offline {run.offline_bytes / 1e6:,.3f} MB to the client in "
                  f"{run.offline_messages} message(s) (estimate {run.offline_expected / 1e6:,.3f} MB); "
                  f"nothing to the server")  # fmt: skip


def _one_party(model, data, num, weights_mode, rank, master_addr, master_port, how, as_json, key, dealer="separate",
               link=None, threads=1):  # fmt: skip
    """One party of a two-host deployment (``--rank``)."""
    from pathlib import Path

    from ..errors import DeepShareError
    from ..mpc.launcher import run_party

    x = None
    if rank == 1 and weights_mode == "private" and Path(model).is_dir():
        from ..serving.artifacts import architecture_only

        cm = architecture_only(model)  # the client never reads the weights file
        net, input_size, mean, std = cm.model, cm.input_size, cm.mean, cm.std
    else:
        loaded = load_model_or_out(model, *how)
        net, input_size, mean, std = loaded.model, tuple(loaded.input_size), loaded.mean, loaded.std
    if rank == 1:
        if data is None:
            raise DeepShareError("party 1 holds the inputs: pass --data")
        x, _ = _first_batch(data, num, mean, std, input_size)
    shape = (num, *input_size) if x is None else tuple(x.shape)
    with console.status(f"party {rank}: waiting for / running with {master_addr}:{master_port}", spinner="dots"):
        dealer_kw = dict(dealer_addr=link[0], dealer_port=link[1], dealer_key=link[2]) if link else {}
        rep = run_party(rank, net, x, shape, weights_mode=weights_mode, master_addr=master_addr,
                        master_port=master_port, leaf_modules=how[-1] or (), key=key, dealer=dealer, threads=threads,
                        **dealer_kw)  # fmt: skip
    result = {"rank": rank, "weights_mode": weights_mode, "bytes": rep.bytes, "rounds": rep.rounds,
              "wall_s": rep.wall_s, "comparisons": rep.comparisons, "setup_bytes": rep.setup_bytes,
              "setup_rounds": rep.setup_rounds, "dealer": dealer, "offline_bytes": rep.offline_bytes,
              "offline_messages": rep.offline_messages}  # fmt: skip
    if dealer == "simulated":
        result["warning"] = SIMULATED_WARNING
    if rep.output is not None:
        result["predictions"] = rep.output.argmax(1).tolist()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(
        f"party {rank} ({weights_mode} weights): setup {rep.setup_bytes / 1e6:,.2f} MB, {rep.setup_rounds} rounds; "
        f"online {rep.bytes / 1e6:,.2f} MB, {rep.rounds} rounds, "
        f"{rep.wall_s * 1e3:,.0f} ms, {rep.comparisons:,} comparisons"
        + (f"; offline {rep.offline_bytes / 1e6:,.2f} MB from the dealer" if dealer == "separate" else "")
        + (f"; predictions {result['predictions']}" if "predictions" in result else "")
    )
    if dealer == "simulated":
        console.print(f"[yellow]{SIMULATED_WARNING}[/yellow]")
