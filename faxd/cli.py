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
from typing import TypeVar

from faxd import __version__, audit
from faxd.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_EVENT_SOCKET,
    EX_CONFIG,
    Config,
    ConfigError,
    EventsConfig,
    StoreConfig,
    default_config_path,
    deferred_credentials,
    load_config,
    load_section,
    render_effective,
)

EX_USAGE = 64
EX_BAD_ARGS = 2  # what argparse exits with on a usage error (docs/architecture.md, exit codes)
_T = TypeVar("_T")


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or default_config_path(os.environ))


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


class _UnusableConfig(Exception):
    """A client command cannot use the config it was given; the message says what to do instead."""


def _section(args: argparse.Namespace, section: type[_T], what: str, flag: str) -> _T | None:
    """Only `section` of the config (a client never reads the daemon's secrets); None when no
    config was named and the default file does not exist. A config that cannot be used is an error
    that says how to do without it (`flag`)."""
    path = _config_path(args)
    implicit = not args.config and path == DEFAULT_CONFIG_PATH
    if implicit and not os.path.lexists(path):
        return None
    try:
        return load_section(path, section)
    except ConfigError as exc:
        raise _UnusableConfig(
            f"faxd {args.command}: cannot take the {what} from {path}:\n"
            + "".join(f"  {problem}\n" for problem in exc.problems)
            + f"fix the config or name the {what} with {flag}"
        ) from None


def _socket_path(args: argparse.Namespace) -> str:
    """--socket, else $FAXD_SOCKET, else events.socket of the config, else the default."""
    if args.socket:
        return str(args.socket)
    if env := os.environ.get("FAXD_SOCKET"):
        return env
    events = _section(args, EventsConfig, "event socket", "--socket PATH or $FAXD_SOCKET")
    return DEFAULT_EVENT_SOCKET if events is None else events.socket


def _cmd_run(args: argparse.Namespace) -> int:
    from faxd import daemon
    from faxd.logs import configure_logging

    config = _load(args)
    configure_logging(
        level=config.logging.level, fmt=config.logging.format, redact_phi=config.logging.redact_phi
    )
    return asyncio.run(daemon.run(config, config_path=_config_path(args)))


def _faxd_argv() -> list[str]:
    """How systemd-run can start this same faxd (its PATH does not include a venv's bin)."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "faxd" and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "faxd"]


def _cmd_check_config(args: argparse.Namespace) -> int:
    from faxd import credentials

    # From a shell there is no $CREDENTIALS_DIRECTORY: check everything else and say what was not.
    config = load_config(_config_path(args), defer_credentials=True)
    print(render_effective(config), end="")
    deferred = deferred_credentials(config)
    if not deferred:
        return 0
    found = []
    print("faxd check-config: the config is valid, but these credentials were not checked:", file=sys.stderr)
    for key, name in deferred:
        file, note = credentials.inspect(name)
        found.append((name, file))
        print(f"  {key}: {{credential: {name}}}: {note}", file=sys.stderr)
    command = credentials.systemd_run_command(found, os.path.abspath(_config_path(args)), _faxd_argv())
    print(
        "$CREDENTIALS_DIRECTORY is set only inside the unit. To check them as faxd.service loads them"
        f" (LoadCredentialEncrypted= needs systemd >= {credentials.MIN_SYSTEMD_ENCRYPTED}), as root:\n"
        f"  {command}",
        file=sys.stderr,
    )
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from faxd import doctor
    from faxd.logs import configure_logging

    # The report is the output; the REST client's own log lines would only repeat it (on stderr).
    configure_logging(level="error", fmt="console", redact_phi=True, stream=sys.stderr)
    return asyncio.run(doctor.main(_config_path(args), json_out=args.json, out=sys.stdout))


def _cmd_demo(args: argparse.Namespace) -> int:
    from faxd import demo

    return asyncio.run(demo.run(give_up_after=args.timeout, keep=args.keep))


def _cmd_watch(args: argparse.Namespace) -> int:
    from faxd import client

    where = client.WatchFilter(
        directions=args.direction or [],
        to_status=args.status or [],
        extensions=args.extension or [],
        final_only=args.final_only,
    )
    return asyncio.run(
        client.watch(
            _socket_path(args),
            after_seq=args.after_seq,
            fax_ids=args.fax or [],
            refs=args.ref or [],
            json_out=args.json,
            out=sys.stdout,
            where=where,
            reconnect=args.follow,
        )
    )


def _audit_query(args: argparse.Namespace) -> audit.Query:
    return audit.Query(
        since=args.since,
        until=args.until,
        to=args.to,
        statuses=args.status or [],
        directions=args.direction or [],
        extensions=args.extension or [],
        numbers=args.numbers,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    return asyncio.run(
        audit.export(
            _socket_path(args),
            _audit_query(args),
            fmt=args.format,
            output=args.output,
            out=sys.stdout,
            err=sys.stderr,
        )
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from faxd import client

    if args.all:
        if args.fax_id or args.ref:
            print("faxd status: --all lists many faxes; it takes no ID or --ref", file=sys.stderr)
            return EX_BAD_ARGS
    elif any((args.until, args.to, args.status, args.direction, args.extension, args.numbers)):
        print(
            "faxd status: --until, --to, --status, --direction, --extension and --numbers need --all",
            file=sys.stderr,
        )
        return EX_BAD_ARGS
    if args.all:
        return asyncio.run(
            audit.status_all(
                _socket_path(args), _audit_query(args), json_out=args.json, out=sys.stdout, err=sys.stderr
            )
        )
    return asyncio.run(
        client.status(
            _socket_path(args), fax_id=args.fax_id, ref=args.ref, json_out=args.json, out=sys.stdout
        )
    )


def _cmd_history(args: argparse.Namespace) -> int:
    from faxd import client

    return asyncio.run(client.history(_socket_path(args), args.fax_id, json_out=args.json, out=sys.stdout))


def _cmd_fetch(args: argparse.Namespace) -> int:
    from faxd import client

    return asyncio.run(client.fetch(_socket_path(args), args.fax_id, json_out=args.json, out=sys.stdout))


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


def _cmd_install_service(args: argparse.Namespace) -> int:
    from pathlib import Path

    from faxd import install_service

    return install_service.install(
        root=Path(args.root) if args.root else None,
        unit_dir=args.unit_dir,
        sysusers_dir=args.sysusers_dir,
        force=args.force,
        version=__version__,
        out=sys.stdout,
        err=sys.stderr,
    )


def _store_path(args: argparse.Namespace) -> str:
    """--db, else store.path of the config (only its `store` section is read). Never a default
    path: a restore must not land in a store no config names."""
    if args.db:
        return str(args.db)
    store = _section(args, StoreConfig, "store", "--db PATH")
    if store is None:
        raise _UnusableConfig(
            f"faxd store: there is no {DEFAULT_CONFIG_PATH}: name the config with -c FILE"
            " or the store with --db PATH"
        )
    return store.path


def _cmd_store_backup(args: argparse.Namespace) -> int:
    from faxd.adapters.store import StoreError, backup

    database = _store_path(args)
    try:
        snapshot = backup(database, args.file)
    except (StoreError, OSError) as exc:
        print(f"faxd store backup: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {database} to {args.file}: epoch {snapshot.epoch}, head seq {snapshot.head_seq}")
    return 0


def _cmd_store_restore(args: argparse.Namespace) -> int:
    from faxd.adapters.store import StoreError, restore

    database = _store_path(args)
    try:
        written, restored = restore(args.file, database)
    except (StoreError, OSError) as exc:
        print(f"faxd store restore: {exc}", file=sys.stderr)
        return 1
    print(
        f"restored {args.file} (head seq {written.head_seq}) to {database} under the new epoch"
        f" {restored.epoch}: clients resuming an older cursor get cursor_expired"
    )
    return 0


def _cmd_outlets(args: argparse.Namespace) -> int:
    """`faxd outlets [replay NAME --from-seq N | dead-letter NAME]`: straight from the store (run as
    faxd's user or root), so no secret and no running daemon is needed."""
    import json
    import sqlite3

    from faxd.adapters.outlets import open_ledger, outlet_states

    action = getattr(args, "outlets_command", None)
    try:
        ledger = open_ledger(_store_path(args), write=action == "replay")
        if action is not None and args.name not in ledger.names():
            known = ", ".join(ledger.names()) or "none yet"
            print(f"faxd outlets: no outlet {args.name!r} in the store (known: {known})", file=sys.stderr)
            return 1
        if action == "replay":
            ledger.request_replay(args.name, args.from_seq)
            print(
                f"outlet {args.name} delivers again from seq {args.from_seq}: within a second while faxd"
                " runs, else when it starts"
            )
        elif action == "dead-letter":
            for dead in ledger.dead_letters(args.name):
                if args.json:
                    print(json.dumps({**dead.__dict__, "event": json.loads(dead.event)}))
                else:
                    when, tries = dead.parked_at, dead.attempts
                    print(f"{dead.seq:>8}  {when}  {tries:>3}x  fax {dead.fax_id}  {dead.reason}")
        else:
            for row in outlet_states(ledger):
                print(json.dumps(row) if args.json else _outlet_line(row))
    except (OSError, sqlite3.Error) as exc:
        print(f"faxd outlets: {exc}", file=sys.stderr)
        return 1
    return 0


def _seq(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a seq >= 1, got {text!r}")
    return int(text)


def _outlet_line(row: dict[str, object]) -> str:
    replay = f", replay from {row['replay_from']} pending" if row["replay_from"] is not None else ""
    return (
        f"{row['name']}: cursor {row['cursor']} of {row['head_seq']} (lag {row['lag_events']} events,"
        f" {row['lag_seconds']}s), {row['dead_letters']} dead-lettered, committed {row['updated_at']}{replay}"
    )


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (default: $FAXD_CONFIG or /etc/faxd/config.yaml)")


def _with_socket(p: argparse.ArgumentParser) -> None:
    _with_config(p)
    p.add_argument("--socket", help="the daemon's event socket (default: from the config)")
    p.add_argument("--json", action="store_true", help="print NDJSON instead of text")


def _with_event_filter(p: argparse.ArgumentParser) -> None:
    """The socket's subscription filters: each repeatable, ORed within, ANDed together."""
    p.add_argument("--direction", action="append", help="only Inbound or Outbound (repeatable)")
    p.add_argument("--status", action="append", metavar="S", help="only events to status S (repeatable)")
    p.add_argument("--extension", action="append", metavar="ID", help="only this extension (repeatable)")
    p.add_argument("--final-only", action="store_true", help="only events that say nothing more will follow")


def _when(text: str) -> str:
    from datetime import UTC, datetime

    try:
        return audit.parse_when(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _with_window(p: argparse.ArgumentParser, since_default: str | None) -> None:
    """What ``status --all`` and ``export`` select: a window of creation times, and filters."""
    since_help = "faxes created since WHEN: 24h, 7d, 30m, or an ISO 8601 date or time (local if no zone)"
    if since_default is None:
        p.add_argument("--since", type=_when, required=True, metavar="WHEN", help=since_help)
    else:
        # argparse converts a string default with `type`, at parse time.
        p.add_argument(
            "--since", type=_when, default=since_default, metavar="WHEN", help=f"{since_help} (24h)"
        )
    p.add_argument("--until", type=_when, metavar="WHEN", help="and before WHEN (default: now)")
    p.add_argument("--to", metavar="NUMBER", help="only faxes to this number")
    p.add_argument(
        "--status", action="append", metavar="S", help="only faxes with status S, or a recipient in S"
    )
    p.add_argument("--direction", action="append", help="only Inbound or Outbound (repeatable)")
    p.add_argument("--extension", action="append", metavar="ID", help="only this extension (repeatable)")
    p.add_argument(
        "--numbers",
        action="store_true",
        help="show phone numbers (PHI; default: redacted; faxd must serve them: events.include_numbers)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faxd", description="Fax-status daemon for RingCentral.")
    parser.add_argument("--version", action="version", version=f"faxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_daemon_commands(sub)
    _add_store_commands(sub)
    _add_outlet_commands(sub)
    _add_client_commands(sub)
    return parser


def _add_daemon_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands that run, check or install faxd itself."""
    p = sub.add_parser("run", help="run the daemon in the foreground")
    _with_config(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate the config and print it with secrets masked")
    _with_config(p)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("doctor", help="preflight: check the config, network, credentials and permissions")
    _with_config(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("demo", help="simulator + daemon on loopback, sample faxes, live transitions")
    p.add_argument("--timeout", type=float, default=90.0, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "install-service",
        help="install the systemd units, sysusers file, example config and alert rules from this package",
    )
    p.add_argument("--root", help="install under this directory instead of / (staging, images, tests)")
    p.add_argument(
        "--force", action="store_true", help="also replace files with local changes (never the config)"
    )
    p.add_argument(
        "--unit-dir",
        default="/usr/local/lib/systemd/system",
        help="where the units go (default: %(default)s; /etc/systemd/system also works)",
    )
    p.add_argument("--sysusers-dir", help="where faxd.conf goes (default: the sysusers.d beside --unit-dir)")
    p.set_defaults(func=_cmd_install_service)

    # Listed for --help; main() hands its arguments to faxd.sim.cli before argparse sees them.
    sub.add_parser("simulate", help="run the RingCentral simulator alone (faxd simulate --help)")


def _add_store_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("store", help="back up or restore the store (the journal and fax states)")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    for name, func, text, file_help in (
        ("backup", _cmd_store_backup, "copy the store to FILE (0600), safely while faxd runs", "the copy"),
        (
            "restore",
            _cmd_store_restore,
            "replace the store by FILE under a new epoch (faxd stopped)",
            "a backup",
        ),
    ):
        action = store_sub.add_parser(name, help=text, description=text)
        _with_config(action)
        action.add_argument("--db", help="the store's database (default: store.path of the config)")
        action.add_argument("file", help=file_help)
        action.set_defaults(func=func)


def _add_outlet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        _with_config(p)
        p.add_argument("--db", help="the store's database (default: store.path of the config)")
        p.add_argument("--json", action="store_true", help="print NDJSON instead of text")
        p.set_defaults(func=_cmd_outlets)

    p = sub.add_parser(
        "outlets", help="the hooks' and webhooks' cursors, lag and dead letters (docs/outlets.md)"
    )
    common(p)
    actions = p.add_subparsers(dest="outlets_command", metavar="ACTION")
    action = actions.add_parser("replay", help="deliver again from a seq (faxd running or not)")
    common(action)
    action.add_argument("name")
    action.add_argument(
        "--from-seq", type=_seq, required=True, metavar="N", help="first seq delivered again (>= 1)"
    )
    action = actions.add_parser("dead-letter", help="the events an outlet gave up on")
    common(action)
    action.add_argument("name")


def _add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands that talk to the running daemon over its event socket."""
    p = sub.add_parser("watch", help="follow transitions as they happen")
    _with_socket(p)
    p.add_argument("--after-seq", type=int, help="first replay everything after this seq")
    p.add_argument("--fax", action="append", help="only this fax id (repeatable)")
    p.add_argument("--ref", action="append", help="only this ref (repeatable)")
    _with_event_filter(p)
    p.add_argument(
        "--follow", action="store_true", help="reconnect when faxd restarts and resume where it stopped"
    )
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser(
        "status", help="one fax with its recipients, the faxes in flight, or (--all) every fax of a window"
    )
    _with_socket(p)
    p.add_argument("fax_id", nargs="?")
    p.add_argument("--ref")
    p.add_argument("--all", action="store_true", help="every fax, final and in flight (the done-queue)")
    _with_window(p, since_default="24h")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("export", help="every fax of a window as CSV or NDJSON, for compliance")
    _with_config(p)
    p.add_argument("--socket", help="the daemon's event socket (default: from the config)")
    _with_window(p, since_default=None)
    p.add_argument("--format", choices=["csv", "ndjson"], default="csv", help="default: %(default)s")
    p.add_argument("-o", "--output", help="write to FILE (0600, complete or not at all) instead of stdout")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("history", help="every journalled transition of one fax")
    _with_socket(p)
    p.add_argument("fax_id")
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser("fetch", help="download a received fax's document (again) into the spool directory")
    _with_socket(p)
    p.add_argument("fax_id")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("send", help="send a fax through the daemon")
    _with_socket(p)
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
    except _UnusableConfig as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
