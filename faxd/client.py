"""The client side of the event socket: what ``faxd watch|status|history|send`` run.

Each command connects to the daemon's socket, speaks protocol v1 (faxd.core.protocol), writes people-
readable lines (or NDJSON with ``--json``) to ``out`` and one-line errors to ``err``, and returns the exit
code: 0 success, 1 a failure reported by faxd (not found, fax failed, connection lost), 2 when the daemon
cannot be reached (not running, access denied) or the command line names an unreadable file.

This module must not import the daemon or adapters, parse arguments or call ``sys.exit``; faxd/cli.py
wires these functions into argparse.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import mimetypes
import os
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from faxd.core.model import FINAL_STATUSES, SUCCESS_STATUSES
from faxd.core.protocol import ProtocolError, decode_object, encode_line

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 2

#: Largest server line the client accepts (a ``list`` of many faxes can be big).
MAX_REPLY_LINE = 64 * 1024 * 1024
#: The request line limit for ``send`` (docs/socket-protocol.md); checked here to give a clear error early.
MAX_SEND_LINE = 72 * 1024 * 1024


class ClientError(Exception):
    """Something to print as one line on stderr, with the exit code to return. ``transient``: the
    daemon went away or is not (yet) there, which a restart of faxd cures (``watch --follow`` retries)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, *, transient: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.transient = transient


class ConnectionLost(ClientError):
    """The daemon closed the connection, or it broke."""

    def __init__(self) -> None:
        super().__init__("connection to faxd lost", transient=True)


class Connection:
    """One connection to the daemon: the ``hello``, requests with replies, and the message stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        #: Messages that arrived while waiting for a reply (events, caught_up), in arrival order.
        self._backlog: deque[dict[str, Any]] = deque()
        self.hello: dict[str, Any] = {}

    @classmethod
    async def open(cls, socket_path: str) -> Connection:
        """Connect and read ``hello``; :class:`ClientError` (exit 2) when faxd cannot be reached."""
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path, limit=MAX_REPLY_LINE)
        except FileNotFoundError:
            raise ClientError(
                f"faxd is not running (no socket at {socket_path})", EXIT_UNAVAILABLE, transient=True
            ) from None
        except ConnectionRefusedError:
            raise ClientError(
                f"faxd is not running (nothing listens on {socket_path})", EXIT_UNAVAILABLE, transient=True
            ) from None
        except PermissionError:
            raise ClientError(
                f"permission denied on {socket_path} (is your user in the socket's group?)", EXIT_UNAVAILABLE
            ) from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {socket_path}: {exc.strerror}", EXIT_UNAVAILABLE) from None
        conn = cls(reader, writer)
        try:
            first = await conn.recv()
        except ClientError as exc:
            await conn.close()
            raise ClientError(str(exc), EXIT_UNAVAILABLE, transient=exc.transient) from None
        if first.get("type") != "hello":
            await conn.close()
            if first.get("type") == "error":
                raise ClientError(f"faxd refused the connection: {_error_text(first)}", EXIT_UNAVAILABLE)
            raise ClientError(f"{socket_path} does not speak the faxd protocol", EXIT_UNAVAILABLE)
        conn.hello = first
        return conn

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def send(self, message: dict[str, Any]) -> None:
        """Write one request line."""
        try:
            self._writer.write(encode_line(message))
            await self._writer.drain()
        except ConnectionError:
            raise ConnectionLost from None

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except ValueError:
            raise ClientError("faxd sent a line longer than the client accepts") from None
        except ConnectionError:
            raise ConnectionLost from None
        if not line.endswith(b"\n"):
            raise ConnectionLost
        try:
            return decode_object(line)
        except ProtocolError as exc:
            raise ClientError(f"faxd sent an invalid line ({exc.message})") from None

    async def recv(self) -> dict[str, Any]:
        """The next message: first any that arrived while :meth:`request` waited for its reply."""
        if self._backlog:
            return self._backlog.popleft()
        return await self._read()

    def pending(self) -> bool:
        """True if messages that arrived during a :meth:`request` are still unread."""
        return bool(self._backlog)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request with a fresh ``id`` and return its reply (which may be an ``error``).

        Other messages that arrive meanwhile (events of a subscription on the same connection) are kept
        for :meth:`recv`. ``bye`` and errors without an id end the connection: :class:`ClientError`.
        """
        self._next_id += 1
        request_id = self._next_id
        await self.send({**message, "id": request_id})
        while True:
            reply = await self._read()
            if reply.get("id") == request_id:
                return reply
            kind = reply.get("type")
            if kind == "bye":
                raise ClientError(f"faxd closed the connection ({reply.get('reason')})")
            if kind == "error":
                raise ClientError(_error_text(reply))
            if kind != "heartbeat":
                self._backlog.append(reply)


def _error_text(message: dict[str, Any]) -> str:
    text = f"{message.get('code')}: {message.get('message')}"
    if message.get("rc_code"):
        text += f" ({message['rc_code']})"
    return text


def _write_json(out: TextIO, value: object) -> None:
    out.write(json.dumps(value, separators=(",", ":")) + "\n")


# ------------------------------------------------------------------------------------------ formatting

_RESET = "\033[0m"
_DIM = "\033[2m"
_BOLD = "\033[1m"
_GREEN = "\033[32m"
_RED = "\033[31m"
_YELLOW = "\033[33m"
_FAILED = frozenset({"SendingFailed", "DeliveryFailed"})


def use_color(out: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Colours only on a terminal, and never when ``NO_COLOR`` is set and not empty (no-color.org)."""
    return out.isatty() and not environ.get("NO_COLOR")


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color else text


def _status_color(status: str) -> str:
    if status in _FAILED:
        return _RED
    if status in SUCCESS_STATUSES:
        return _GREEN
    return _YELLOW


def _clock(iso: object) -> str:
    """HH:MM:SS in the local time zone, from an ISO 8601 timestamp."""
    if not isinstance(iso, str):
        return "--:--:--"
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "--:--:--"
    if when.tzinfo is not None:
        when = when.astimezone()
    return when.strftime("%H:%M:%S")


def format_event(event: dict[str, Any], color: bool) -> str:
    """One event as an aligned line, e.g.
    ``12:01:02      #17  fax 1234567     recipient 1 +15551234567  Queued → SendingFailed  LineBusy (busy,
    retryable)  final``.
    """
    kind = event.get("kind")
    recipient = event.get("recipient")
    if kind == "recipient" and isinstance(recipient, dict):
        subject = f"recipient {recipient.get('index')}"
        if recipient.get("phone"):
            subject += f" {recipient['phone']}"
    elif kind == "status":
        subject = f"{str(event.get('direction') or '').lower()} fax".strip()
    else:
        subject = str(kind)
    to_status = str(event.get("to_status"))
    from_status = event.get("from_status") or "new"
    arrow = f"{from_status} → "
    pad = max(0, 14 - len(to_status))
    parts = [
        _paint(_clock(event.get("observed_at")), _DIM, color),
        f"#{event.get('seq')}".rjust(7),
        f"fax {event.get('fax_id')}".ljust(15),
        subject.ljust(28),
        arrow.rjust(18) + _paint(to_status, _status_color(to_status), color) + " " * pad,
    ]
    if event.get("error_code"):
        why = [str(event.get("error_category") or "other")]
        if event.get("retryable") is not None:
            why.append("retryable" if event["retryable"] else "not retryable")
        parts.append(f"{event['error_code']} ({', '.join(why)})")
    if event.get("final"):
        parts.append(_paint("final", _BOLD, color))
    if event.get("ref"):
        parts.append(f"ref={event['ref']}")
    if event.get("attempt") is not None:  # send.retry: which try, and what follows
        parts.append(f"attempt {event['attempt']}")
        if event.get("retry_at"):
            parts.append(f"retry at {_clock(event['retry_at'])}")
        if event.get("gave_up"):
            parts.append(f"gave up ({event['gave_up']})")
    document = event.get("document")
    if isinstance(document, dict) and document.get("path"):
        parts.append(f"document={document['path']}")
    return "  ".join(parts).rstrip()


def format_fax(fax: dict[str, Any], color: bool) -> str:
    """One fax and its recipients, for ``faxd status ID``."""
    status = str(fax.get("status"))
    head = [
        f"fax {fax.get('fax_id')}",
        str(fax.get("direction")),
        _paint(status, _status_color(status), color),
        "final" if fax.get("final") else "in flight",
    ]
    if fax.get("availability") not in (None, "Alive"):
        head.append(str(fax["availability"]))
    lines = ["  ".join(head)]
    details = [
        ("extension", fax.get("extension_id")),
        ("ref", fax.get("ref")),
        ("pages", fax.get("pages")),
        ("created", fax.get("created")),
        ("modified", fax.get("rc_modified")),
    ]
    lines.extend(f"  {name:<10} {value}" for name, value in details if value is not None)
    for r in fax.get("recipients") or []:
        r_status = str(r.get("status"))
        phone = str(r.get("phone") or "-")
        row = f"  #{r.get('index')}  {phone:<16}  {_paint(r_status, _status_color(r_status), color)}"
        if r.get("error_code"):
            row += f"  {r['error_code']}"
        lines.append(row)
    return "\n".join(lines)


def format_fax_table(faxes: Sequence[dict[str, Any]]) -> str:
    """Faxes as an aligned table, for ``faxd status``."""
    header = ("FAX ID", "DIR", "STATUS", "RECIPIENTS", "REF", "MODIFIED")
    rows = [header]
    for fax in faxes:
        recipients = fax.get("recipients") or []
        done = sum(1 for r in recipients if r.get("status") in FINAL_STATUSES)
        rows.append(
            (
                str(fax.get("fax_id")),
                "out" if fax.get("direction") == "Outbound" else "in",
                str(fax.get("status")),
                f"{done}/{len(recipients)} final" if recipients else "-",
                str(fax.get("ref") or "-"),
                str(fax.get("rc_modified") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


# ------------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class WatchFilter:
    """The subscription filter of ``faxd watch`` (docs/socket-protocol.md, subscribe)."""

    fax_ids: Sequence[str] = ()
    refs: Sequence[str] = ()
    directions: Sequence[str] = ()
    to_status: Sequence[str] = ()
    extensions: Sequence[str] = ()
    final_only: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "fax_ids": list(self.fax_ids),
            "refs": list(self.refs),
            "directions": list(self.directions),
            "to_status": list(self.to_status),
            "extensions": list(self.extensions),
            "final_only": self.final_only,
        }


#: ``watch --follow`` waits this long before its first reconnect, doubling up to RECONNECT_MAX.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0


class _Watcher:
    """``faxd watch``: one subscription at a time, and the cursor (epoch, seq) it has covered.

    The cursor is the seq of the last event printed, or the ``caught_up`` seq when that is later
    (events the filter skipped are covered too). A new connection subscribes after it, in its epoch,
    so across a daemon restart nothing is printed twice and nothing is missed.
    """

    def __init__(
        self, socket_path: str, flt: WatchFilter, after_seq: int | None, json_out: bool, out: TextIO
    ):
        self.socket_path = socket_path
        self.filter = flt.to_wire()
        self.cursor = after_seq
        self.epoch: str | None = None
        self.json_out = json_out
        self.out = out
        self.color = not json_out and use_color(out)
        #: Set once a subscription is confirmed: the reconnect backoff starts again from its first step.
        self.confirmed = False

    async def session(self, follow: bool) -> int:
        """One connection, until it ends (ClientError) or, without ``follow``, until ``caught_up``."""
        async with await Connection.open(self.socket_path) as conn:
            self.epoch = self.epoch or conn.hello.get("epoch")
            subscribe: dict[str, Any] = {"type": "subscribe", "filter": self.filter}
            if self.cursor is not None:
                subscribe.update(after_seq=self.cursor, epoch=self.epoch)
            await conn.send(subscribe)
            while True:
                message = await conn.recv()
                kind = message.get("type")
                if kind == "event":
                    self.show(message)
                elif kind == "caught_up":
                    self.confirmed = True
                    seq = message.get("seq")
                    if isinstance(seq, int) and (self.cursor is None or seq > self.cursor):
                        self.cursor = seq
                    if not follow:
                        return EXIT_OK
                elif kind == "error":
                    # A slow consumer is cut off with the seq to resume after: ours is the cursor.
                    slow = message.get("code") == "slow_consumer"
                    raise ClientError(_error_text(message), transient=slow)
                elif kind == "bye":
                    reason = message.get("reason")
                    raise ClientError(
                        f"faxd closed the connection ({reason})", transient=reason == "shutdown"
                    )

    def show(self, message: dict[str, Any]) -> None:
        """Print one event and move the cursor past it."""
        if self.json_out:
            _write_json(self.out, message)
        else:
            self.out.write(format_event(message, self.color) + "\n")
        self.out.flush()
        seq = message.get("seq")
        if isinstance(seq, int):
            self.cursor = seq
        self.epoch = message.get("epoch") or self.epoch


async def watch(
    socket_path: str,
    *,
    after_seq: int | None,
    fax_ids: Iterable[str] = (),
    refs: Iterable[str] = (),
    json_out: bool,
    out: TextIO,
    follow: bool = True,
    err: TextIO = sys.stderr,
    where: WatchFilter | None = None,
    reconnect: bool = False,
) -> int:
    """``faxd watch``: print events (replayed after ``after_seq``, then live) until the connection ends.

    ``where`` is the subscription filter (``fax_ids`` and ``refs`` add to it). With ``follow=False`` it
    returns 0 once the replay is done (``caught_up``). A lost connection, ``bye`` or an error is
    reported on ``err`` with the seq to resume after, and returns 1; with ``reconnect`` (``--follow``)
    a lost daemon is waited for instead (backoff up to RECONNECT_MAX) and the subscription resumes
    from the cursor. An expired cursor (another epoch: the store was restored) still ends it.
    """
    flt = where or WatchFilter()
    flt = dataclasses.replace(flt, fax_ids=[*flt.fax_ids, *fax_ids], refs=[*flt.refs, *refs])
    watcher = _Watcher(socket_path, flt, after_seq, json_out, out)
    delay = RECONNECT_FIRST
    told = False
    while True:
        try:
            return await watcher.session(follow)
        except ClientError as exc:
            if not (reconnect and exc.transient):
                resume = f"; resume with --after-seq {watcher.cursor}" if watcher.cursor is not None else ""
                extra = resume if exc.exit_code == EXIT_FAILED else ""
                err.write(f"faxd watch: {exc}{extra}\n")
                return exc.exit_code
            if watcher.confirmed:
                delay, told, watcher.confirmed = RECONNECT_FIRST, False, False
            if not told:  # once per outage, not once per attempt
                err.write(f"faxd watch: {exc}; reconnecting, to resume after seq {watcher.cursor}\n")
                err.flush()
                told = True
        # A pause between attempts while faxd restarts: no busy loop on a missing socket.
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX)


async def status(
    socket_path: str,
    *,
    fax_id: str | None = None,
    ref: str | None = None,
    json_out: bool,
    out: TextIO,
    err: TextIO = sys.stderr,
) -> int:
    """``faxd status [ID|--ref R]``: one fax with its recipients, or a table of the faxes in flight."""
    color = not json_out and use_color(out)
    try:
        async with await Connection.open(socket_path) as conn:
            if fax_id is None and ref is None:
                reply = await conn.request({"type": "list", "active_only": True})
                if reply.get("type") != "faxes":
                    raise ClientError(_error_text(reply))
                faxes = reply.get("faxes") or []
                if json_out:
                    _write_json(out, {"faxes": faxes, "head_seq": reply.get("head_seq")})
                elif faxes:
                    out.write(format_fax_table(faxes) + "\n")
                else:
                    out.write("no faxes in flight\n")
                return EXIT_OK
            query = {"fax_id": fax_id} if fax_id is not None else {"ref": ref}
            reply = await conn.request({"type": "status", **query})
            if reply.get("type") != "fax":
                raise ClientError(_error_text(reply))
            if json_out:
                _write_json(out, reply["fax"])
            else:
                out.write(format_fax(reply["fax"], color) + "\n")
            return EXIT_OK
    except ClientError as exc:
        err.write(f"faxd status: {exc}\n")
        return exc.exit_code


async def history(
    socket_path: str, fax_id: str, *, json_out: bool, out: TextIO, err: TextIO = sys.stderr
) -> int:
    """``faxd history ID``: every journalled event of one fax, oldest first."""
    color = not json_out and use_color(out)
    try:
        async with await Connection.open(socket_path) as conn:
            reply = await conn.request({"type": "history", "fax_id": fax_id})
            if reply.get("type") != "history":
                raise ClientError(_error_text(reply))
            for event in reply.get("events") or []:
                if json_out:
                    _write_json(out, event)
                else:
                    out.write(format_event(event, color) + "\n")
            return EXIT_OK
    except ClientError as exc:
        err.write(f"faxd history: {exc}\n")
        return exc.exit_code


async def fetch(
    socket_path: str, fax_id: str, *, json_out: bool, out: TextIO, err: TextIO = sys.stderr
) -> int:
    """``faxd fetch ID``: download a received fax's document (again); prints where it is."""
    try:
        async with await Connection.open(socket_path) as conn:
            reply = await conn.request({"type": "fetch", "fax_id": fax_id})
            if reply.get("type") != "fetched" or not isinstance(reply.get("document"), dict):
                raise ClientError(_error_text(reply))
            document = reply["document"]
            if json_out:
                _write_json(out, document)
            else:
                pages = document.get("pages")
                out.write(
                    f"{document.get('path')}  {document.get('bytes')} bytes"
                    f"  {pages if pages is not None else '?'} pages  sha256 {document.get('sha256')}\n"
                )
            return EXIT_OK
    except ClientError as exc:
        err.write(f"faxd fetch: {exc}\n")
        return exc.exit_code


async def _read_documents(files: Sequence[str]) -> list[dict[str, str]]:
    documents = []
    for name in files:
        path = Path(name)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise ClientError(f"cannot read {name}: {exc.strerror}", EXIT_UNAVAILABLE) from None
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        documents.append(
            {"name": path.name, "content_type": content_type, "data": base64.b64encode(data).decode()}
        )
    return documents


async def send(
    socket_path: str,
    *,
    to: Sequence[str],
    files: Sequence[str],
    ref: str | None = None,
    cover_text: str | None = None,
    resolution: str | None = None,
    cover_index: int | None = None,
    wait: bool = False,
    out: TextIO,
    err: TextIO = sys.stderr,
) -> int:
    """``faxd send``: print the new fax id on ``out``; ``wait`` follows it until every recipient is final.

    With ``wait`` the exit code is 0 only if every recipient ended in a success status; progress lines and
    the reason for a failure go to ``err``.
    """
    try:
        if not files:
            raise ClientError("a fax needs at least one document", 2)
        request: dict[str, Any] = {
            "type": "send",
            "to": [{"phone": phone} for phone in to],
            "documents": await _read_documents(files),
        }
        options = (
            ("ref", ref),
            ("cover_text", cover_text),
            ("resolution", resolution),
            ("cover_index", cover_index),
        )
        for key, value in options:
            if value is not None:
                request[key] = value
        if len(encode_line(request)) > MAX_SEND_LINE:
            raise ClientError(f"documents too large: a send request is capped at {MAX_SEND_LINE} bytes", 2)
        async with await Connection.open(socket_path) as conn:
            if wait:
                # Subscribed before sending, from the hello's head: no event of the new fax can be missed.
                hello = conn.hello
                subscribe = {
                    "type": "subscribe",
                    "after_seq": hello.get("head_seq"),
                    "epoch": hello.get("epoch"),
                }
                reply = await conn.request(subscribe)
                if reply.get("type") != "caught_up":
                    raise ClientError(_error_text(reply))
            reply = await conn.request(request)
            if reply.get("type") != "accepted":
                raise ClientError(f"send failed: {_error_text(reply)}")
            new_id = str(reply.get("fax_id"))
            out.write(new_id + "\n")
            out.flush()
            if not wait:
                return EXIT_OK
            return await _follow(conn, new_id, err, ref)
    except ClientError as exc:
        err.write(f"faxd send: {exc}\n")
        return exc.exit_code


async def _status(conn: Connection, fax_id: str) -> _Progress:
    reply = await conn.request({"type": "status", "fax_id": fax_id})
    if reply.get("type") != "fax":
        raise ClientError(f"lost track of fax {fax_id}: {_error_text(reply)}")
    return _Progress.of(reply["fax"])


def _next_try(message: dict[str, Any], fax_id: str, ref: str | None, attempt: int) -> bool:
    """Whether ``message`` is about a later try (send.retry's resend) of the logical fax ``ref``."""
    later = isinstance(message.get("attempt"), int) and message["attempt"] > attempt
    return ref is not None and message.get("ref") == ref and message.get("fax_id") != fax_id and later


async def _follow(conn: Connection, fax_id: str, err: TextIO, ref: str | None = None) -> int:
    """Apply the fax's events until every recipient (or the fax, if it has none) is final. With a
    ``ref``, a failure faxd will resend (``retry_at``) is not the end: the next try is followed, and
    the verdict is each recipient's last outcome (docs/outlets.md, "Resend policy")."""
    progress = await _status(conn, fax_id)
    earlier: list[tuple[str, _Progress]] = []  # tries already over, with what they settled
    attempt, retrying = 1, False
    # Decide only once the messages that queued up during the requests are applied: the status
    # snapshot may be newer than some of them, but the last event of each recipient is the truth.
    while conn.pending() or retrying or not progress.final():
        message = await conn.recv()
        kind = message.get("type")
        if kind in ("bye", "error"):
            why = message.get("reason") if kind == "bye" else _error_text(message)
            raise ClientError(f"lost track of fax {fax_id} ({why}); see: faxd status {fax_id}")
        if kind != "event":
            continue
        if _next_try(message, fax_id, ref, attempt):
            earlier.append((fax_id, progress.settled()))
            fax_id, attempt, retrying = str(message["fax_id"]), int(message["attempt"]), False
            progress = await _status(conn, fax_id)
        if message.get("fax_id") != fax_id:
            continue
        err.write(format_event(message, color=False) + "\n")
        progress.apply(fax_id, message)
        if message.get("kind") in ("status", "resend"):
            retrying = message.get("retry_at") is not None
    failed = sum(p.verdict(f, err) != EXIT_OK for f, p in [*earlier, (fax_id, progress)])
    return EXIT_FAILED if failed else EXIT_OK


class _Progress:
    """What ``send --wait`` knows of its fax: the fax's status and each recipient's."""

    def __init__(self, fax_status: str, recipients: dict[int, dict[str, Any]]) -> None:
        self.fax_status = fax_status
        self.recipients = recipients

    @classmethod
    def of(cls, fax: dict[str, Any]) -> _Progress:
        """From the ``fax`` object of a ``status`` reply."""
        recipients: dict[int, dict[str, Any]] = {
            int(r["index"]): {
                "status": r.get("status"),
                "error_code": r.get("error_code"),
                "phone": r.get("phone"),
            }
            for r in fax.get("recipients") or []
        }
        return cls(str(fax.get("status")), recipients)

    def final(self) -> bool:
        """Every recipient final, or the fax itself when it has no recipients."""
        if self.recipients:
            return all(r["status"] in FINAL_STATUSES for r in self.recipients.values())
        return self.fax_status in FINAL_STATUSES

    def apply(self, fax_id: str, message: dict[str, Any]) -> None:
        """One event of the fax; ClientError when the fax went away (availability) before it finished."""
        to_status = str(message.get("to_status"))
        recipient = message.get("recipient")
        if message.get("kind") == "recipient" and isinstance(recipient, dict):
            entry = self.recipients.setdefault(int(recipient["index"]), {"phone": recipient.get("phone")})
            entry["status"] = to_status
            entry["error_code"] = message.get("error_code")
        elif message.get("kind") == "status":
            self.fax_status = to_status
        elif message.get("kind") == "availability" and to_status != "Alive":
            raise ClientError(f"fax {fax_id} was {to_status} before it finished")
        if message.get("retry_at") is not None and isinstance(recipient, dict):
            self.recipients[int(recipient["index"])]["retried"] = True

    def settled(self) -> _Progress:
        """What this try settled: its recipients but those a later try sends to again."""
        kept = {i: r for i, r in self.recipients.items() if not r.get("retried")}
        return _Progress(self.fax_status if kept or not self.recipients else "Sent", kept)

    def verdict(self, fax_id: str, err: TextIO) -> int:
        """EXIT_OK if everything succeeded; else EXIT_FAILED, each failure told on ``err``."""
        if not self.recipients and self.fax_status not in SUCCESS_STATUSES:
            err.write(f"faxd send: fax {fax_id} ended {self.fax_status}\n")
            return EXIT_FAILED
        failed = [(i, r) for i, r in sorted(self.recipients.items()) if r["status"] not in SUCCESS_STATUSES]
        for index, r in failed:
            reason = r.get("error_code") or "no error code"
            err.write(
                f"faxd send: fax {fax_id} recipient {index} {r.get('phone') or ''} {r['status']}: {reason}\n"
            )
        return EXIT_FAILED if failed else EXIT_OK
