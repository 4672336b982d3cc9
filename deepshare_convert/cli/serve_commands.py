"""``deepshare serve | query``: private inference as a service (the server, and a client of it).

Registered on the main app by :func:`register`.  Thin: :mod:`..serving` holds the server, the
client and the rules both rely on (what the client may read, how files become the model's input).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .console import console, err_console
from .loading import load_model_or_out
from .mpc_commands import DealerAddrOpt, DealerKeyOpt, ThreadsOpt, _host_port
from .options import JsonOpt, LeafOpt

WeightsModeOpt = Annotated[
    str,
    typer.Option("--weights-mode", help="private: the weights stay with the server (the client holds plan.json "
                 "only); public: both hold them. Server and clients must agree."),
]  # fmt: skip
KeyFileOpt = Annotated[
    Optional[str],
    typer.Option("--key-file", help="Key shared by the server and its clients (mode 600; default: "
                 "$DEEPSHARE_MPC_KEY)."),
]  # fmt: skip

LOCAL_KEY = "local.key"  # what `serve --local` writes into OUT/ when no key is given


def _local_key(out: str, key_file: str | None) -> tuple[bytes, str]:
    """The key of a one-host try-out: the given one, $DEEPSHARE_MPC_KEY, or a fresh OUT/local.key (mode 600)."""
    from ..mpc.handshake import load_key, new_key

    key = load_key(key_file)
    if key is not None:
        return key, key_file or "$DEEPSHARE_MPC_KEY"
    path = Path(out) / LOCAL_KEY
    if not path.exists():
        path.touch(mode=0o600)
        path.write_bytes(new_key())
    return load_key(path), str(path)


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``query`` to ``app``."""

    @app.command("serve")
    def serve(
        out: Annotated[str, typer.Argument(metavar="OUT", help="A converted-model directory (`deepshare convert`).",
                                           show_default=False)],
        listen: Annotated[str, typer.Option("--listen", help="HOST:PORT clients connect to.")] = "127.0.0.1:29700",
        key_file: KeyFileOpt = None,
        dealer_addr: DealerAddrOpt = None,
        dealer_key_file: DealerKeyOpt = None,
        local: Annotated[bool, typer.Option("--local", help="Start the dealer in this process (a try-out on one "
                                            "host; without a key, writes a fresh OUT/local.key).")] = False,
        weights_mode: WeightsModeOpt = "private",
        max_sessions: Annotated[int, typer.Option("--max-sessions", help="Sessions served at once; more clients "
                                                  "wait in the queue.")] = 2,
        max_images: Annotated[int, typer.Option("--max-images", help="Most images one session may send.")] = 64,
        session_timeout: Annotated[float, typer.Option("--session-timeout", help="Seconds a session may run "
                                                       "before it is stopped.")] = 600.0,
        threads: ThreadsOpt = 1,
        leaf: LeafOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Serve private inference of OUT/ to many clients (party 0): load once, then one session per client.

        Every session is handshaken (key and plan hash), gets fresh masks from the dealer
        (--dealer-addr, or --local), and runs on a rendezvous of its own; one line is printed per
        session (client, images, bytes, rounds, wall time; with --json one JSON object per line on
        stdout, the other events on stderr).  Ctrl-C or SIGTERM stops accepting and
        lets the running sessions finish.
        """
        from ..mpc.handshake import require_key
        from ..serving import ServeConfig, Server

        host, port = _host_port(listen, "--listen")
        dealer = _host_port(dealer_addr, "--dealer-addr") if dealer_addr else None
        if local and dealer is None:
            key, where = _local_key(out, key_file)
        else:
            key, where = require_key(key_file), None
        dealer_key = require_key(dealer_key_file) if dealer_key_file else None
        loaded = load_model_or_out(out, leaf=leaf)
        config = ServeConfig(listen=(host, port), dealer=dealer, weights_mode=weights_mode, max_sessions=max_sessions,
                             max_images=max_images, session_timeout=session_timeout, local=local and dealer is None,
                             leaf_modules=tuple(leaf or ()), threads=threads)  # fmt: skip
        say = err_console if as_json else console

        def on_record(rec):
            print(json.dumps({"role": "server", **dataclasses.asdict(rec)}), flush=True)

        server = Server(loaded.model, tuple(loaded.input_size), key, config, dealer_key=dealer_key,
                        log=lambda line: say.print(line, soft_wrap=True),
                        on_record=on_record if as_json else None)  # fmt: skip

        def ready(s):
            if where is not None:
                a = f"{s.address[0]}:{s.address[1]}"
                err_console.print(f"try it: deepshare query {a} IMAGE... --model {out} --key-file {where}",
                                  soft_wrap=True)  # fmt: skip

        server.run(ready=ready)

    @app.command("query")
    def query_command(
        address: Annotated[str, typer.Argument(metavar="HOST:PORT", help="Where `deepshare serve` listens.",
                                               show_default=False)],
        files: Annotated[list[str], typer.Argument(metavar="FILES...", help="Images (JPEG, PNG, ...), folders of "
                                                   "them, or .npy arrays.", show_default=False)],
        model: Annotated[str, typer.Option("--model", help="The converted directory the server serves (private "
                                           "mode reads its plan.json only).", show_default=False)] = ...,
        key_file: KeyFileOpt = None,
        dealer_addr: Annotated[Optional[str], typer.Option("--dealer-addr", help="HOST:PORT of the dealer "
                                                           "(default: the one the server names).")] = None,
        dealer_key_file: DealerKeyOpt = None,
        weights_mode: WeightsModeOpt = "private",
        masks: Annotated[Optional[str], typer.Option("--masks", help="Segmentation: write one PNG of labels per "
                                                     "image into this folder.")] = None,
        timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the server.")] = 600.0,
        threads: ThreadsOpt = 1,
        as_json: JsonOpt = False,
    ) -> None:
        """Ask a `deepshare serve` for the labels of your own images, privately (party 1).

        The files are read and preprocessed here (resized to the plan's input size where they
        differ, normalised as evaluation does) before anything is sent; the server never sees
        them, and only this process learns the answers.
        """
        from ..mpc.handshake import require_key
        from ..serving import query

        host, port = _host_port(address, "HOST:PORT")
        dealer = _host_port(dealer_addr, "--dealer-addr") if dealer_addr else None
        key = require_key(key_file)
        dealer_key = require_key(dealer_key_file) if dealer_key_file else None
        with console.status(f"query: {len(files)} path(s) -> {host}:{port}", spinner="dots"):
            result = query((host, port), files, model, key=key, dealer_key=dealer_key, dealer_address=dealer,
                           weights_mode=weights_mode, timeout=timeout, threads=threads)  # fmt: skip
        written = _write_masks(result, masks) if masks else []
        if as_json:
            print(json.dumps({**result.to_dict(), "masks": written}, indent=2))
            return
        _print_answers(result, written)


def _write_masks(result, folder: str) -> list[str]:
    """One 8-bit PNG of labels per segmented image; the paths written."""
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for a in result.answers:
        if a.mask is None:
            continue
        path = root / (Path(a.name.split("[")[0]).stem + (f"_{a.name.split('[')[1].rstrip(']')}" if "[" in a.name
                                                           else "") + ".png")  # fmt: skip
        Image.fromarray(a.mask, mode="L").save(path)
        paths.append(str(path))
    return paths


def _print_answers(result, written: list[str]) -> None:
    from rich.table import Table

    table = Table(title=f"private answers ({result.weights_mode} weights)")
    table.add_column("file")
    if result.answers and result.answers[0].mask is None:
        table.add_column("label", justify="right")
        table.add_column("probability", justify="right")
        for a in result.answers:
            table.add_row(a.name, str(a.label), f"{a.probability:.4f}")
    else:
        table.add_column("mask")
        for a, path in zip(result.answers, written or [""] * len(result.answers)):
            table.add_row(a.name, path or f"{a.mask.shape[0]}x{a.mask.shape[1]} (pass --masks DIR to write it)")
    console.print(table)
    console.print(f"online {result.bytes / 1e6:,.2f} MB, {result.rounds} rounds; setup {result.setup_bytes / 1e6:,.2f} "
                  f"MB; offline {result.offline_bytes / 1e6:,.2f} MB from the dealer; {result.wall_s:.2f} s")  # fmt: skip
    for name in result.resized:
        err_console.print(f"note: {name} was resized to the model's input size")
