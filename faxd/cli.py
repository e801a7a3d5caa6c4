"""The ``faxd`` command: one entry point for the daemon, the demo, the simulator and the socket clients.

This module parses arguments, loads config, sets up logs and turns results into exit codes; the work
itself lives in :mod:`faxd.daemon`, :mod:`faxd.demo`, :mod:`faxd.sim` and :mod:`faxd.client`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from faxd import __version__
from faxd.config import EX_CONFIG, Config, ConfigError, default_config_path, load_config, render_effective

EX_USAGE = 64


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or default_config_path(os.environ))


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    try:
        return _load(args).events.socket
    except ConfigError:
        # A client must work without reading the daemon's secrets: fall back to the default path.
        return "/run/faxd/events.sock"


def _cmd_run(args: argparse.Namespace) -> int:
    from faxd import daemon
    from faxd.logs import configure_logging

    config = _load(args)
    configure_logging(
        level=config.logging.level, fmt=config.logging.format, redact_phi=config.logging.redact_phi
    )
    return asyncio.run(daemon.run(config, config_path=_config_path(args)))


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(render_effective(config), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from faxd import demo

    return asyncio.run(demo.run(give_up_after=args.timeout, keep=args.keep))


def _cmd_watch(args: argparse.Namespace) -> int:
    from faxd import client

    return asyncio.run(
        client.watch(
            _socket_path(args),
            after_seq=args.after_seq,
            fax_ids=args.fax or [],
            refs=args.ref or [],
            json_out=args.json,
            out=sys.stdout,
        )
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from faxd import client

    return asyncio.run(
        client.status(
            _socket_path(args), fax_id=args.fax_id, ref=args.ref, json_out=args.json, out=sys.stdout
        )
    )


def _cmd_history(args: argparse.Namespace) -> int:
    from faxd import client

    return asyncio.run(client.history(_socket_path(args), args.fax_id, json_out=args.json, out=sys.stdout))


def _cmd_send(args: argparse.Namespace) -> int:
    from faxd import client

    return asyncio.run(
        client.send(
            _socket_path(args),
            to=args.to,
            files=args.files,
            ref=args.ref,
            cover_text=args.cover_text,
            resolution=args.resolution,
            cover_index=args.cover_index,
            wait=args.wait,
            out=sys.stdout,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faxd", description="Fax-status daemon for RingCentral.")
    parser.add_argument("--version", action="version", version=f"faxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="config file (default: $FAXD_CONFIG or /etc/faxd/config.yaml)")

    def with_socket(p: argparse.ArgumentParser) -> None:
        with_config(p)
        p.add_argument("--socket", help="the daemon's event socket (default: from the config)")
        p.add_argument("--json", action="store_true", help="print NDJSON instead of text")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    with_config(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate the config and print it with secrets masked")
    with_config(p)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("demo", help="simulator + daemon on loopback, sample faxes, live transitions")
    p.add_argument("--timeout", type=float, default=90.0, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.set_defaults(func=_cmd_demo)

    # Listed for --help; main() hands its arguments to faxd.sim.cli before argparse sees them.
    sub.add_parser("simulate", help="run the RingCentral simulator alone (faxd simulate --help)")

    p = sub.add_parser("watch", help="follow transitions as they happen")
    with_socket(p)
    p.add_argument("--after-seq", type=int, help="first replay everything after this seq")
    p.add_argument("--fax", action="append", help="only this fax id (repeatable)")
    p.add_argument("--ref", action="append", help="only this ref (repeatable)")
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("status", help="one fax with its recipients, or the faxes in flight")
    with_socket(p)
    p.add_argument("fax_id", nargs="?")
    p.add_argument("--ref")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("history", help="every journalled transition of one fax")
    with_socket(p)
    p.add_argument("fax_id")
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser("send", help="send a fax through the daemon")
    with_socket(p)
    p.add_argument("--to", action="append", required=True, help="recipient number, E.164 (repeatable)")
    p.add_argument("files", nargs="+", help="documents to send (PDF, TIFF, ...)")
    p.add_argument("--ref", help="your own reference, carried by every event of this fax")
    p.add_argument("--cover-text", help="cover page text (needs a cover page: --cover-index 1-13)")
    p.add_argument(
        "--cover-index",
        type=int,
        metavar="N",
        help="cover page: 0 = none, 1-13 = one of the account's cover pages (default: send.cover_index)",
    )
    p.add_argument("--resolution", choices=["High", "Low"])
    p.add_argument("--wait", action="store_true", help="follow the fax to its final status")
    p.set_defaults(func=_cmd_send)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["simulate"]:
        # The simulator parses its own options (argparse.REMAINDER would not take leading ones).
        from faxd.sim.cli import main as sim_main

        return sim_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"faxd: invalid configuration ({_config_path(args)}):\n{exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
