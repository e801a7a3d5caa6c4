"""The done-queue and the audit export: ``faxd status --all`` and ``faxd export``, clients of the socket.

Both page through the socket's ``query`` request (docs/socket-protocol.md) and write each page as it
arrives, so the client holds one page (at most 1,000 faxes) whatever the size of the window; the daemon
reads each page from the store by an index (keyset paging). Phone numbers are asked for only with
``numbers=True`` (``--numbers``), and served only when the daemon's ``events.include_numbers`` allows.

This module must not open the store, read the daemon's config or its secrets, parse arguments or call
``sys.exit``; faxd/cli.py wires it into argparse. It reads the clock only in :func:`parse_when`'s
caller, which passes ``now``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from faxd.client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    ClientError,
    Connection,
    _error_text,
    _paint,
    _status_color,
    use_color,
)

#: Faxes asked for per ``query`` request (the daemon caps a page at 1,000).
PAGE = 500

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: datetime) -> str:
    """``24h``, ``7d``, ``30m``, ``2w`` (that long before ``now``), or an ISO 8601 date or time (local
    time when it names no zone), as the UTC time the socket takes; ValueError with the reason."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        when = now - timedelta(seconds=int(match[1]) * _UNITS[match[2]])
    else:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a duration (24h, 7d, 30m) nor an ISO 8601 date or time"
            ) from None
        if when.tzinfo is None:
            when = when.astimezone()  # the local time zone, as people mean a bare date
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Query:
    """What ``status --all`` and ``export`` select (the ``query`` request without its paging)."""

    since: str | None = None
    until: str | None = None
    to: str | None = None
    statuses: Sequence[str] = ()
    directions: Sequence[str] = ()
    extensions: Sequence[str] = ()
    numbers: bool = False

    def to_wire(self) -> dict[str, Any]:
        request: dict[str, Any] = {
            "type": "query",
            "statuses": list(self.statuses),
            "directions": list(self.directions),
            "extensions": list(self.extensions),
            "include_numbers": self.numbers,
            "limit": PAGE,
        }
        for key, value in (("since", self.since), ("until", self.until), ("to", self.to)):
            if value is not None:
                request[key] = value
        return request


async def pages(conn: Connection, query: Query) -> AsyncIterator[list[dict[str, Any]]]:
    """Every page of ``query``, in order, each requested once the previous one is consumed."""
    request = query.to_wire()
    while True:
        reply = await conn.request(request)
        if reply.get("type") != "page":
            raise ClientError(_error_text(reply))
        yield list(reply.get("faxes") or [])
        after = reply.get("next")
        if not isinstance(after, str):
            return
        request = {**request, "after": after}


def _local(iso: object) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in the local time zone, from an ISO 8601 time."""
    if not isinstance(iso, str):
        return "-"
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    return (when.astimezone() if when.tzinfo else when).strftime("%Y-%m-%d %H:%M:%S")


#: Columns of ``status --all``: (title, width). Fixed, so each page prints as it comes.
_COLUMNS = (
    ("CREATED", 19),
    ("FAX ID", 14),
    ("DIR", 3),
    ("STATUS", 14),
    ("#", 2),
    ("NUMBER", 16),
    ("RESULT", 14),
    ("ERROR", 22),
    ("REF", 0),
)


def _row(cells: Sequence[str], color: bool = False) -> str:
    out = []
    for (_, width), cell in zip(_COLUMNS, cells, strict=True):
        text = cell.ljust(width)
        if color and cell in _STATUS_CELLS:
            text = _paint(cell, _status_color(cell), True) + " " * (width - len(cell))
        out.append(text)
    return "  ".join(out).rstrip()


_STATUS_CELLS = frozenset(
    {"Queued", "Sent", "Delivered", "Received", "SendingFailed", "DeliveryFailed", "Sending"}
)


def table_rows(fax: dict[str, Any], color: bool) -> Iterator[str]:
    """One line per recipient (a fax without recipients gets one), the fax's own columns on the first."""
    head = [
        _local(fax.get("created")),
        str(fax.get("fax_id")),
        "out" if fax.get("direction") == "Outbound" else "in",
        str(fax.get("status")),
    ]
    ref = str(fax.get("ref") or "")
    recipients = fax.get("recipients") or [None]
    for n, r in enumerate(recipients):
        fax_cells = head if n == 0 else [""] * len(head)
        if r is None:
            rest = ["", str(fax.get("from_phone") or "-"), "", "", ref]
        else:
            error = str(r.get("error_code") or "")
            if error and r.get("error_category"):
                error += f" ({r['error_category']})"
            rest = [str(r.get("index")), str(r.get("phone") or "-"), str(r.get("status")), error, ref]
        yield _row([*fax_cells, *rest], color)


async def status_all(socket_path: str, query: Query, *, json_out: bool, out: TextIO, err: TextIO) -> int:
    """``faxd status --all``: every fax of the window (final and in flight), oldest first."""
    color = not json_out and use_color(out)
    count = 0
    try:
        async with await Connection.open(socket_path) as conn:
            async for page in pages(conn, query):
                for fax in page:
                    if json_out:
                        out.write(json.dumps(fax, separators=(",", ":")) + "\n")
                    else:
                        if count == 0:
                            out.write(_row([title for title, _ in _COLUMNS]) + "\n")
                        out.writelines(line + "\n" for line in table_rows(fax, color))
                    count += 1
                out.flush()
    except ClientError as exc:
        err.write(f"faxd status: {exc}\n")
        return exc.exit_code
    if count == 0 and not json_out:
        out.write("no faxes match\n")
    return EXIT_OK


#: The CSV columns of ``faxd export``: one row per recipient (a fax without recipients gets one row).
CSV_COLUMNS = (
    "fax_id",
    "ref",
    "extension_id",
    "direction",
    "fax_status",
    "availability",
    "pages",
    "created",
    "modified",
    "from_phone",
    "recipient_index",
    "recipient_phone",
    "recipient_status",
    "error_code",
    "error_category",
    "final",
)


#: A cell a spreadsheet would run as a formula (OWASP "CSV injection"): a client's ``ref`` can be any
#: text. A plain number such as ``+16505551234`` or ``-3`` cannot call anything and is left as it is.
_FORMULA = re.compile(r"[=+\-@\t\r]")
_NUMBER_LIKE = re.compile(r"[+-]?[0-9][0-9 ().\-]*")


def spreadsheet_safe(value: object) -> object:
    """``value``, with a leading ``'`` when a spreadsheet would take the text for a formula."""
    if isinstance(value, str) and _FORMULA.match(value) and not _NUMBER_LIKE.fullmatch(value):
        return "'" + value
    return value


def csv_rows(fax: dict[str, Any]) -> Iterator[list[object]]:
    """The CSV rows of one fax; absent values (and redacted numbers) are empty cells, and text a
    spreadsheet would run as a formula starts with ``'`` (:func:`spreadsheet_safe`)."""
    for row in _csv_cells(fax):
        yield [spreadsheet_safe(cell) for cell in row]


def _csv_cells(fax: dict[str, Any]) -> Iterator[list[object]]:
    common = [
        fax.get("fax_id"),
        fax.get("ref"),
        fax.get("extension_id"),
        fax.get("direction"),
        fax.get("status"),
        fax.get("availability"),
        fax.get("pages"),
        fax.get("created"),
        fax.get("rc_modified"),
        fax.get("from_phone"),
    ]
    final = "true" if fax.get("final") else "false"
    recipients = fax.get("recipients") or []
    if not recipients:
        yield [*["" if v is None else v for v in common], "", "", "", "", "", final]
    for r in recipients:
        values = [
            *common,
            r.get("index"),
            r.get("phone"),
            r.get("status"),
            r.get("error_code"),
            r.get("error_category"),
        ]
        yield [*["" if v is None else v for v in values], final]


@contextlib.contextmanager
def _destination(output: str | None, stdout: TextIO) -> Iterator[TextIO]:
    """``stdout``, or a new 0600 file that replaces ``output`` only once complete (fsynced, renamed):
    an export that fails half-way never leaves a partial file under the name a script waits for."""
    if output is None:
        yield stdout
        return
    final = Path(output)
    temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ClientError(f"cannot write {output}: {exc.strerror}", EXIT_UNAVAILABLE) from None
    try:
        with open(fd, "w", encoding="utf-8", newline="") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


async def export(
    socket_path: str, query: Query, *, fmt: str, output: str | None, out: TextIO, err: TextIO
) -> int:
    """``faxd export``: every fax of the window as CSV (one row per recipient) or NDJSON (one fax per
    line), oldest first; a one-line summary on ``err``."""
    faxes = rows = 0
    try:
        async with await Connection.open(socket_path) as conn:
            with _destination(output, out) as dest:
                writer = csv.writer(dest, lineterminator="\n")
                if fmt == "csv":
                    writer.writerow(CSV_COLUMNS)
                async for page in pages(conn, query):
                    for fax in page:
                        if fmt == "csv":
                            for row in csv_rows(fax):
                                writer.writerow(row)
                                rows += 1
                        else:
                            dest.write(json.dumps(fax, separators=(",", ":")) + "\n")
                            rows += 1
                        faxes += 1
    except ClientError as exc:
        err.write(f"faxd export: {exc}\n")
        return exc.exit_code
    except OSError as exc:
        err.write(f"faxd export: cannot write {output or 'the output'}: {exc.strerror}\n")
        return EXIT_FAILED
    where = f" to {output}" if output else ""
    numbers = "with phone numbers" if query.numbers else "phone numbers redacted"
    err.write(f"faxd export: {faxes} faxes, {rows} {fmt} records{where} ({numbers})\n")
    return EXIT_OK
