"""Codec of the event socket protocol, version 1 (docs/socket-protocol.md).

Turns one request line (bytes) into a typed request or a :class:`ProtocolError`, matches events against a
subscription :class:`Filter`, encodes every server message as one compact NDJSON line, and names the phases
of a connection's life (:class:`ClientPhase`) with the moves allowed between them. It is shared by the event
server (adapters) and the CLI client (app).

Events of a fax under the resend policy (``send.retry``, :mod:`faxd.core.resend`) carry ``attempt``,
``retry_at`` and ``gave_up`` after ``source``; those keys are absent from every other event, so its line
is byte for byte what it was before the policy existed (:func:`encode_event` writes them with the
generic encoder). Likewise a ``document`` event (a received fax's downloaded document) carries its
``document`` object after ``source``; no other event has the key.

This module must not do I/O, touch sockets or the event loop, read clocks or log: the event server decides
what to do with a bad line (reply, or close the connection), this module only says what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import json
import json.encoder
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Literal, NamedTuple, NoReturn, TypeAlias

from faxd.core.model import DocumentRef, Event, EventKind, FaxState, Source, Transition
from faxd.core.status import parse_time
from faxd.core.taxonomy import classify

PROTO_VERSION: Final = 1
#: Containers nested deeper than this are refused: no request needs more than 3 levels.
MAX_DEPTH: Final = 5
#: Longest accepted ``id``, ``ref``, fax id, phone number or filter entry.
MAX_STRING: Final = 256
#: Longest accepted ``cover_text``.
MAX_COVER_TEXT: Final = 10_000
#: Most entries in one filter list, ``to`` or ``documents``.
MAX_ITEMS: Final = 1000
#: Largest ``cover_index`` (RingCentral's field is an int32; it validates the index itself).
MAX_COVER_INDEX: Final = 2**31 - 1

#: Most faxes in one ``query`` page; also the page size when the request names none is DEFAULT_PAGE.
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 500

RequestId: TypeAlias = str | int
Resolution: TypeAlias = Literal["High", "Low"]


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message."""

    BAD_REQUEST = "bad_request"  # the request was malformed; the connection stays usable unless said
    NOT_FOUND = "not_found"  # no such fax
    CURSOR_EXPIRED = "cursor_expired"  # other epoch, or after_seq older than the journal keeps
    SLOW_CONSUMER = "slow_consumer"  # the client's queue overflowed; the connection is closed
    BUSY = "busy"  # too many clients; the connection is closed
    UNAUTHORIZED = "unauthorized"  # peer uid/gid not allowed; the connection is closed
    UPSTREAM = "upstream"  # RingCentral refused or failed (send, sync)
    INTERNAL = "internal"  # a bug in faxd; the request may be retried


class ClientPhase(StrEnum):
    """Where one connection is in its life, as the server sees it.

    ``handshake``: ``hello`` is written, requests are served, no subscription yet (an idle connection is
    closed after ``subscribe_timeout``). ``replaying``: subscribed; the journal after the cursor is being
    written, and live events wait in the connection's queue. ``live``: ``caught_up`` is written; live
    events go out as they are published. ``closed``: the server closed it (or the peer did); nothing more
    is written. A ``subscribe`` without ``after_seq`` still passes through ``replaying``: its replay is
    only the ``caught_up`` line.
    """

    HANDSHAKE = "handshake"
    REPLAYING = "replaying"
    LIVE = "live"
    CLOSED = "closed"

    def move(self, to: ClientPhase) -> ClientPhase:
        """``to``, if the protocol allows that move from here; :class:`PhaseError` otherwise."""
        if to not in PHASE_MOVES[self]:
            raise PhaseError(f"a connection cannot go from {self.value} to {to.value}")
        return to

    @property
    def subscribed(self) -> bool:
        """A subscription exists (and a second ``subscribe`` is refused)."""
        return self is ClientPhase.REPLAYING or self is ClientPhase.LIVE


class PhaseError(RuntimeError):
    """A connection was asked to make a move its phase does not allow: a bug in the server."""


#: The moves a connection may make: one subscription per connection, a replay always ends in ``caught_up``
#: before live events, and nothing follows ``closed``.
PHASE_MOVES: Final[Mapping[ClientPhase, frozenset[ClientPhase]]] = {
    ClientPhase.HANDSHAKE: frozenset({ClientPhase.REPLAYING, ClientPhase.CLOSED}),
    ClientPhase.REPLAYING: frozenset({ClientPhase.LIVE, ClientPhase.CLOSED}),
    ClientPhase.LIVE: frozenset({ClientPhase.CLOSED}),
    ClientPhase.CLOSED: frozenset(),
}


class ProtocolError(Exception):
    """A request line that cannot be served as written."""

    def __init__(self, code: str, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        #: The request's ``id`` when it could be read, so the error reply can echo it.
        self.request_id = request_id


class SendError(Exception):
    """Raised by the daemon's ``send`` when RingCentral or validation refuses a fax.

    ``code`` is :attr:`ErrorCode.UPSTREAM` or :attr:`ErrorCode.BAD_REQUEST`; ``rc_code`` is RingCentral's own
    ``errorCode`` (e.g. ``FAX-101``) when there is one.
    """

    def __init__(self, code: str, message: str, rc_code: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.rc_code = rc_code


class FetchError(SendError):
    """Raised by the daemon's ``fetch`` (``faxd fetch ID``) when a received fax's document cannot be had:
    ``not_found`` (no such received fax), ``bad_request`` (documents are off) or ``upstream``."""


class StoredEvent(NamedTuple):
    """A journalled event as the store reads it back for a replay, not made into an :class:`Event`.

    ``transition`` is the JSON text the journal keeps: the fields of :class:`~faxd.core.model.Transition`
    in their declared order (``kind`` as its value), compact and ASCII-only, as the store writes it.
    Filters match a stored event and :func:`encode_event` writes it exactly like the event it stands
    for: a replay reads the whole journal, and decoding each row into objects only to encode them again
    cost more than reading it.
    """

    seq: int
    epoch: str
    observed_at: str
    source: str
    transition: str

    def fields(self) -> dict[str, Any]:
        """The transition's fields, decoded (``kind`` as its value)."""
        fields: dict[str, Any] = json.loads(self.transition)
        return fields


# --------------------------------------------------------------------------------------------- requests


def _folded(value: object) -> str | None:
    return value.casefold() if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a subscriber wants; an empty list means "any", the lists are ANDed together."""

    fax_ids: frozenset[str] = frozenset()
    refs: frozenset[str] = frozenset()
    extensions: frozenset[str] = frozenset()
    directions: frozenset[str] = frozenset()  # casefolded: "outbound" matches "Outbound"
    to_status: frozenset[str] = frozenset()  # casefolded
    final_only: bool = False

    def matches(self, event: Event | StoredEvent | Mapping[str, Any]) -> bool:
        """True if ``event`` (an :class:`Event`, a :class:`StoredEvent` or its wire dict) passes every
        condition."""
        fax_id: object
        ref: object
        ext: object
        direction: object
        to_status: object
        final: object
        if isinstance(event, Event):
            t = event.transition
            fax_id, ref, ext, direction = t.fax_id, t.ref, t.extension_id, t.direction
            to_status, final = t.to_status, t.final
        else:
            # A stored transition has the wire's names for every field a filter looks at.
            get = (event.fields() if isinstance(event, StoredEvent) else event).get
            fax_id, ref, ext = get("fax_id"), get("ref"), get("extension_id")
            direction, to_status, final = get("direction"), get("to_status"), get("final")
        return (
            (not self.final_only or final is True)
            and (not self.fax_ids or fax_id in self.fax_ids)
            and (not self.refs or ref in self.refs)
            and (not self.extensions or ext in self.extensions)
            and (not self.directions or _folded(direction) in self.directions)
            and (not self.to_status or _folded(to_status) in self.to_status)
        )

    def to_wire(self) -> dict[str, Any]:
        """The ``filter`` object of a subscribe request (lists sorted, for stable output)."""
        return {
            "fax_ids": sorted(self.fax_ids),
            "refs": sorted(self.refs),
            "extensions": sorted(self.extensions),
            "directions": sorted(self.directions),
            "to_status": sorted(self.to_status),
            "final_only": self.final_only,
        }


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    """Replay events after ``after_seq`` (if given), then ``caught_up``, then live events."""

    after_seq: int | None = None
    epoch: str | None = None
    filter: Filter = field(default_factory=Filter)
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """One fax, by RingCentral id or by the caller's ``ref`` (exactly one of them is set)."""

    fax_id: str | None = None
    ref: str | None = None
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class ListRequest:
    """A snapshot of faxes (in flight only by default) with the journal's head seq."""

    active_only: bool = True
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class PageKey:
    """Where a ``query`` page ended: the store's sort key of its last fax (its creation time as a
    Julian day number, as SQLite computes it; 0 for a fax without one) and that fax's id.

    On the wire it is an opaque string (:meth:`to_wire`); the next page starts strictly after it, so a
    page is never repeated and never skipped however the faxes change between pages (the key of a
    fax, its creation time, never changes)."""

    created: float
    fax_id: str

    def to_wire(self) -> str:
        return f"{self.created!r}~{self.fax_id}"

    @classmethod
    def from_wire(cls, text: str) -> PageKey | None:
        """The key of a ``next`` string, None when it is not one."""
        number, sep, fax_id = text.partition("~")
        if not sep or not fax_id:
            return None
        try:
            created = float(number)
        except ValueError:
            return None
        return cls(created, fax_id) if math.isfinite(created) else None


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """One page of faxes (final and in flight) created in ``[since, until)``, oldest first, after the
    cursor ``after``: the done-queue and the audit export.

    ``since`` and ``until`` are UTC ISO 8601 times with milliseconds (normalized by the parser, so the
    store compares them exactly like the creation times it holds). ``to`` matches a recipient's number
    (with or without its ``+``); ``statuses`` (casefolded) the fax's status or any recipient's. Phone
    numbers are in the reply only when ``include_numbers`` asks for them.
    """

    since: str | None = None
    until: str | None = None
    to: str | None = None
    statuses: frozenset[str] = frozenset()
    directions: frozenset[str] = frozenset()  # casefolded
    extensions: frozenset[str] = frozenset()
    after: PageKey | None = None
    limit: int = DEFAULT_PAGE
    include_numbers: bool = False
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """Every journalled event of one fax."""

    fax_id: str
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class Recipient:
    """One number to fax."""

    phone: str


@dataclass(frozen=True, slots=True)
class Document:
    """One attachment, already decoded from base64."""

    name: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A fax to send through the daemon."""

    to: tuple[Recipient, ...]
    documents: tuple[Document, ...]
    ref: str | None = None
    cover_text: str | None = None
    resolution: Resolution | None = None  # None: the daemon's default
    cover_index: int | None = None  # 0: no cover page; None: the daemon's default (send.cover_index)
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """Reconcile every extension now."""

    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Download a received fax's document (again); the reply comes once it is written."""

    fax_id: str
    id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class PingRequest:
    """Liveness check."""

    id: RequestId | None = None


Request: TypeAlias = (
    SubscribeRequest
    | StatusRequest
    | ListRequest
    | QueryRequest
    | HistoryRequest
    | SendRequest
    | SyncRequest
    | PingRequest
    | FetchRequest
)

REQUEST_TYPES: Final = ("subscribe", "status", "list", "query", "history", "send", "sync", "ping", "fetch")


def _reject_constant(name: str) -> NoReturn:
    # json accepts NaN/Infinity by default; they are not JSON and no field takes a float anyway.
    raise ValueError(f"{name} is not valid JSON")


def _depth(value: object) -> int:
    """Nesting depth of a parsed JSON value, iteratively (a recursive walk could itself overflow)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


class _Fields:
    """Typed access to the fields of one request object, raising ``bad_request`` with the request id."""

    def __init__(self, obj: dict[str, Any], request_id: RequestId | None) -> None:
        self.obj = obj
        self.id = request_id

    def fail(self, message: str) -> NoReturn:
        raise ProtocolError(ErrorCode.BAD_REQUEST, message, self.id)

    def string(self, name: str, value: object, *, limit: int = MAX_STRING) -> str:
        if not isinstance(value, str):
            self.fail(f"{name} must be a string")
        if not value:
            self.fail(f"{name} must not be empty")
        if len(value) > limit:
            self.fail(f"{name} is longer than {limit} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: parses, but cannot be stored or logged
            self.fail(f"{name} is not valid Unicode")
        return value

    def opt_string(self, name: str, *, limit: int = MAX_STRING) -> str | None:
        value = self.obj.get(name)
        return None if value is None else self.string(name, value, limit=limit)

    def req_string(self, name: str) -> str:
        if self.obj.get(name) is None:
            self.fail(f"{name} is required")
        return self.string(name, self.obj[name])

    def opt_bool(self, name: str, default: bool) -> bool:
        value = self.obj.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(f"{name} must be true or false")
        return value

    def opt_seq(self, name: str) -> int | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{name} must be an integer")
        if value < 0:
            self.fail(f"{name} must not be negative")
        return value

    def list_of(self, name: str, value: object, *, required: bool = False) -> list[Any]:
        if value is None and not required:
            return []
        if not isinstance(value, list):
            self.fail(f"{name} must be a list")
        if len(value) > MAX_ITEMS:
            self.fail(f"{name} has more than {MAX_ITEMS} entries")
        if required and not value:
            self.fail(f"{name} must not be empty")
        return value

    def object(self, name: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{name} must be an object")
        return value

    def string_set(self, container: dict[str, Any], name: str, *, fold: bool = False) -> frozenset[str]:
        items = self.list_of(name, container.get(name))
        strings = (self.string(f"{name}[]", item) for item in items)
        return frozenset(s.casefold() for s in strings) if fold else frozenset(strings)


def _request_id(obj: dict[str, Any]) -> RequestId | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"id is longer than {MAX_STRING} characters")
    if isinstance(value, int) and abs(value) > 2**63:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id is out of range")
    return value


def decode_object(line: bytes) -> dict[str, Any]:
    """One NDJSON line (with or without its ``\\n``) as a JSON object; ``ProtocolError`` otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "line is not UTF-8") from None
    if not text.strip():
        raise ProtocolError(ErrorCode.BAD_REQUEST, "empty line")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # deep nesting overflows the C scanner before any depth check can run
        raise ProtocolError(ErrorCode.BAD_REQUEST, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers over 4300 digits
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a message must be a JSON object")
    if _depth(value) > MAX_DEPTH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "JSON nested too deeply")
    return value


def parse_request(line: bytes) -> Request:
    """Parse one request line; raises :class:`ProtocolError` (code ``bad_request``) if it is not valid.

    Unknown fields are ignored so that clients written against a later protocol still work.
    """
    obj = decode_object(line)
    request_id = _request_id(obj)
    f = _Fields(obj, request_id)
    kind = obj.get("type")
    if not isinstance(kind, str):
        f.fail("type must be a string")
    match kind:
        case "subscribe":
            return _parse_subscribe(f)
        case "status":
            fax_id, ref = f.opt_string("fax_id"), f.opt_string("ref")
            if (fax_id is None) == (ref is None):
                f.fail("status takes exactly one of fax_id and ref")
            return StatusRequest(fax_id=fax_id, ref=ref, id=request_id)
        case "list":
            return ListRequest(active_only=f.opt_bool("active_only", True), id=request_id)
        case "query":
            return _parse_query(f)
        case "history":
            return HistoryRequest(fax_id=f.req_string("fax_id"), id=request_id)
        case "send":
            return _parse_send(f)
        case "sync":
            return SyncRequest(id=request_id)
        case "ping":
            return PingRequest(id=request_id)
        case "fetch":
            return FetchRequest(fax_id=f.req_string("fax_id"), id=request_id)
    f.fail(f"unknown request type {kind[:40]!r}; expected one of {', '.join(REQUEST_TYPES)}")


def _parse_subscribe(f: _Fields) -> SubscribeRequest:
    raw = f.obj.get("filter")
    flt = Filter()
    if raw is not None:
        obj = f.object("filter", raw)
        final_only = obj.get("final_only", False)
        if not isinstance(final_only, bool):
            f.fail("filter.final_only must be true or false")
        flt = Filter(
            fax_ids=f.string_set(obj, "fax_ids"),
            refs=f.string_set(obj, "refs"),
            extensions=f.string_set(obj, "extensions"),
            directions=f.string_set(obj, "directions", fold=True),
            to_status=f.string_set(obj, "to_status", fold=True),
            final_only=final_only,
        )
    return SubscribeRequest(
        after_seq=f.opt_seq("after_seq"), epoch=f.opt_string("epoch"), filter=flt, id=f.id
    )


def _utc(f: _Fields, name: str) -> str | None:
    """An ISO 8601 time with a zone, as UTC with milliseconds and ``Z`` (RingCentral's own form)."""
    value = f.opt_string(name)
    if value is None:
        return None
    when = parse_time(value)
    if when is None:
        f.fail(f"{name} must be an ISO 8601 time with a zone, e.g. 2026-11-23T00:00:00Z")
    try:
        moment = datetime.fromtimestamp(when, UTC)
    except (OverflowError, OSError, ValueError):
        f.fail(f"{name} is out of range")
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: What people write inside a phone number and the store does not hold: "+1 (555) 123-4567".
_PHONE_PUNCTUATION: Final = re.compile(r"[\s().-]")


def _parse_query(f: _Fields) -> QueryRequest:
    since, until = _utc(f, "since"), _utc(f, "until")
    if since is not None and until is not None and since >= until:
        f.fail("since must be before until")
    to = f.opt_string("to")
    if to is not None:
        to = _PHONE_PUNCTUATION.sub("", to)
        if not re.fullmatch(r"\+?[0-9*#]+", to):
            f.fail("to must be a phone number, e.g. +15551230000")
    after: PageKey | None = None
    if (cursor := f.opt_string("after")) is not None and (after := PageKey.from_wire(cursor)) is None:
        f.fail("after must be the next of an earlier page")
    limit = f.obj.get("limit", DEFAULT_PAGE)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        f.fail(f"limit must be an integer from 1 to {MAX_PAGE}")
    return QueryRequest(
        since=since,
        until=until,
        to=to,
        statuses=f.string_set(f.obj, "statuses", fold=True),
        directions=f.string_set(f.obj, "directions", fold=True),
        extensions=f.string_set(f.obj, "extensions"),
        after=after,
        limit=limit,
        include_numbers=f.opt_bool("include_numbers", False),
        id=f.id,
    )


def _parse_send(f: _Fields) -> SendRequest:
    to: list[Recipient] = []
    for i, item in enumerate(f.list_of("to", f.obj.get("to"), required=True)):
        entry = f.object(f"to[{i}]", item)
        to.append(Recipient(phone=f.string(f"to[{i}].phone", entry.get("phone"))))
    documents: list[Document] = []
    if f.obj.get("documents") is None:
        # RingCentral's fax request requires an attachment (the spec's createFaxMessage schema).
        f.fail("documents is required: a fax needs at least one document")
    for i, item in enumerate(f.list_of("documents", f.obj.get("documents"), required=True)):
        entry = f.object(f"documents[{i}]", item)
        data = entry.get("data")
        if not isinstance(data, str):
            f.fail(f"documents[{i}].data must be a base64 string")
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            f.fail(f"documents[{i}].data is not valid base64")
        if not decoded:
            f.fail(f"documents[{i}] is empty")
        documents.append(
            Document(
                name=f.string(f"documents[{i}].name", entry.get("name")),
                content_type=f.string(f"documents[{i}].content_type", entry.get("content_type")),
                data=decoded,
            )
        )
    cover_text = f.opt_string("cover_text", limit=MAX_COVER_TEXT)
    cover_index = f.obj.get("cover_index")
    if cover_index is not None and (
        isinstance(cover_index, bool)
        or not isinstance(cover_index, int)
        or not 0 <= cover_index <= MAX_COVER_INDEX
    ):
        f.fail("cover_index must be an integer >= 0 (0: no cover page)")
    resolution = f.obj.get("resolution")
    if resolution is not None and resolution not in ("High", "Low"):
        f.fail('resolution must be "High" or "Low"')
    return SendRequest(
        to=tuple(to),
        documents=tuple(documents),
        ref=f.opt_string("ref"),
        cover_text=cover_text,
        resolution=resolution,
        cover_index=cover_index,
        id=f.id,
    )


# --------------------------------------------------------------------------------------------- encoders


# One encoder for every line: json.dumps() with non-default options builds a new one on each call,
# which is a good part of the cost of encoding an event (the fan-out and the replay encode many).
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_line(message: Mapping[str, Any]) -> bytes:
    """One compact JSON line; ASCII-only so a lone surrogate can never make it unencodable."""
    return _ENCODER.encode(message).encode() + b"\n"


def _with_id(message: dict[str, Any], request_id: RequestId | None) -> bytes:
    if request_id is not None:
        message["id"] = request_id
    return encode_line(message)


def encode_hello(
    *, server: str, epoch: str, head_seq: int, oldest_seq: int, heartbeat_s: float, max_line: int
) -> bytes:
    """The first line the server sends on every connection."""
    return encode_line(
        {
            "type": "hello",
            "proto": PROTO_VERSION,
            "server": server,
            "epoch": epoch,
            "head_seq": head_seq,
            "oldest_seq": oldest_seq,
            "heartbeat_s": heartbeat_s,
            "max_line": max_line,
        }
    )


_str: Final = json.encoder.encode_basestring_ascii  # what _ENCODER writes for a str, quotes included
_EVENT_LINE: Final = (
    '{"type":"event","seq":%d,"epoch":%s,"kind":%s,"fax_id":%s,"extension_id":%s,"direction":%s,'
    '"ref":%s,"recipient":%s,"from_status":%s,"to_status":%s,"final":%s,"error_code":%s,'
    '"error_category":%s,"retryable":%s,"pages":%s,"rc_modified":%s,"observed_at":%s,"source":%s}\n'
)


def encode_event(event: Event | StoredEvent, *, include_numbers: bool) -> bytes:
    """One journalled event: ``encode_line(event.to_wire(...))``, byte for byte.

    Written field by field instead (a stored event is cut and pasted, :func:`_spliced`): the replay
    and the fan-out encode every event they send, and building the wire dict only to encode it again
    cost as much as everything else on those paths. tests/test_protocol.py and tests/test_store.py check
    that every way gives the same bytes, for any event.
    """
    if isinstance(event, StoredEvent):
        line = _spliced(event, include_numbers)
        if line is not None:
            return line
        f = event.fields()
        if f.get("attempt") is not None or f.get("document") is not None:  # rare: the generic encoder
            return encode_line(_stored_to_event(event, f).to_wire(include_numbers=include_numbers))
        fields = (
            f["kind"], f["fax_id"], f["extension_id"], f["direction"], f["ref"], f["recipient_index"],
            f["recipient_phone"], f["from_status"], f["to_status"], f["final"], f["error_code"],
            f["error_category"], f["retryable"], f["pages"], f["rc_modified"], event.source,
        )  # fmt: skip
    else:
        t = event.transition
        if t.attempt is not None or t.document is not None:
            return encode_line(event.to_wire(include_numbers=include_numbers))
        fields = (
            t.kind.value, t.fax_id, t.extension_id, t.direction, t.ref, t.recipient_index,
            t.recipient_phone, t.from_status, t.to_status, t.final, t.error_code,
            t.error_category, t.retryable, t.pages, t.rc_modified, event.source.value,
        )  # fmt: skip
    return _event_line(event.seq, event.epoch, event.observed_at, fields, include_numbers)


#: Where each key of a stored transition starts, after ``kind`` (the journal's order).
_STORED_KEYS: Final = tuple(
    f',"{name}":'
    for name in (
        "fax_id", "extension_id", "direction", "from_status", "to_status", "final", "recipient_index",
        "recipient_phone", "error_code", "error_category", "retryable", "pages", "rc_modified", "ref",
    )
)  # fmt: skip
_SPLICED_LINE: Final = (
    '{"type":"event","seq":%d,"epoch":%s,%s,"ref":%s,"recipient":%s,%s,%s,"observed_at":%s,"source":%s}\n'
)


def _spliced(event: StoredEvent, include_numbers: bool) -> bytes | None:
    """The wire line of a stored event, pasted together from its JSON text without decoding it; None
    when the text does not have the journal's layout (every key, in order).

    The journal and the wire write every value alike (compact, ASCII-only) and share three runs of
    keys in the same order (``kind`` to ``direction``, ``from_status`` to ``final``, ``error_code`` to
    ``rc_modified``), so the line is those runs with ``ref`` and the ``recipient`` object around them.
    A key's marker ``,"name":`` cannot match inside a value: a quote inside a JSON string is escaped,
    and the quote that ends a string is followed by ``,`` or ``}``.
    """
    text = event.transition
    if (
        not text.startswith('{"kind":')
        or not text.endswith("}")
        or ',"attempt":' in text
        or ',"document":' in text
    ):
        return None
    at: list[int] = []
    pos = 0
    for key in _STORED_KEYS:
        pos = text.find(key, pos)
        if pos < 0:
            return None
        at.append(pos)
    index = text[at[6] + 19 : at[7]]  # ,"recipient_index":
    if index == "null":
        recipient = "null"
    else:
        phone = text[at[7] + 19 : at[8]] if include_numbers else "null"  # ,"recipient_phone":
        recipient = f'{{"index":{index},"phone":{phone}}}'
    line = (
        _SPLICED_LINE
        % (
            event.seq,
            _str(event.epoch),
            text[1 : at[3]],
            text[at[13] + 7 : -1],  # ,"ref":
            recipient,
            text[at[3] + 1 : at[6]],
            text[at[8] + 1 : at[13]],
            _str(event.observed_at),
            _str(event.source),
        )
    )
    return line.encode()


def _stored_to_event(event: StoredEvent, fields: Mapping[str, Any]) -> Event:
    """A stored event decoded into an :class:`Event` (unknown keys of a newer journal are dropped)."""
    known = {name: value for name, value in fields.items() if name in Transition.__dataclass_fields__}
    document = known.get("document")
    transition = Transition(
        **{
            **known,
            "kind": EventKind(known["kind"]),
            "document": None if document is None else DocumentRef.from_wire(document),
        }
    )
    return Event(event.seq, event.epoch, transition, event.observed_at, Source(event.source))


def _event_line(
    seq: int, epoch: str, observed_at: str, fields: tuple[Any, ...], include_numbers: bool
) -> bytes:
    (kind, fax_id, extension_id, direction, ref, index, phone, from_status, to_status, final,
     error_code, category, retryable, pages, rc_modified, source) = fields  # fmt: skip
    if index is None:
        recipient = "null"
    else:
        phone = phone if include_numbers else None
        recipient = f'{{"index":{index:d},"phone":{"null" if phone is None else _str(phone)}}}'
    text = _EVENT_LINE % (
        seq,
        _str(epoch),
        _str(kind),
        _str(fax_id),
        _str(extension_id),
        _str(direction),
        "null" if ref is None else _str(ref),
        recipient,
        "null" if from_status is None else _str(from_status),
        _str(to_status),
        "true" if final else "false",
        "null" if error_code is None else _str(error_code),
        "null" if category is None else _str(category),
        "null" if retryable is None else ("true" if retryable else "false"),
        "null" if pages is None else f"{pages:d}",
        "null" if rc_modified is None else _str(rc_modified),
        _str(observed_at),
        _str(source),
    )
    return text.encode()


def encode_fetched(fax_id: str, document: DocumentRef, request_id: RequestId | None = None) -> bytes:
    """The reply to ``fetch``: where the document now is."""
    return _with_id({"type": "fetched", "fax_id": fax_id, "document": document.to_wire()}, request_id)


def encode_caught_up(seq: int, request_id: RequestId | None = None) -> bytes:
    """End of the replay: every matching event up to ``seq`` has been sent."""
    return _with_id({"type": "caught_up", "seq": seq}, request_id)


def encode_heartbeat(head_seq: int) -> bytes:
    """Sent when the connection has been idle for ``heartbeat_s``."""
    return encode_line({"type": "heartbeat", "head_seq": head_seq})


def encode_bye(reason: str) -> bytes:
    """Last line before the server closes the connection on its own (``shutdown``, ``idle_timeout``)."""
    return encode_line({"type": "bye", "reason": reason})


def encode_pong(request_id: RequestId | None = None) -> bytes:
    """Reply to ``ping``."""
    return _with_id({"type": "pong"}, request_id)


def encode_ok(request_id: RequestId | None = None) -> bytes:
    """Reply to ``sync``."""
    return _with_id({"type": "ok"}, request_id)


def encode_error(
    code: str, message: str, request_id: RequestId | None = None, **details: int | str | None
) -> bytes:
    """An ``error``; ``details`` adds fields such as ``resume_after_seq`` or ``rc_code``."""
    body: dict[str, Any] = {"type": "error", "code": str(code), "message": message}
    body.update({k: v for k, v in details.items() if v is not None})
    return _with_id(body, request_id)


def fax_to_wire(state: FaxState, include_numbers: bool) -> dict[str, Any]:
    """The ``fax`` object of ``status`` and ``list`` replies."""
    return {
        "fax_id": state.fax_id,
        "extension_id": state.extension_id,
        "direction": state.direction,
        "status": state.status,
        "availability": state.availability,
        "ref": state.ref,
        "pages": state.pages,
        "created": state.created,
        "rc_modified": state.rc_modified,
        "from_phone": state.from_phone if include_numbers else None,
        "in_flight": state.in_flight,
        "final": not state.in_flight,
        "recipients": [
            {
                "index": r.index,
                "phone": r.phone if include_numbers else None,
                "status": r.status,
                "error_code": r.error_code,
            }
            for r in state.recipients
        ],
    }


def encode_fax(state: FaxState, *, include_numbers: bool, request_id: RequestId | None = None) -> bytes:
    """Reply to ``status``."""
    return _with_id({"type": "fax", "fax": fax_to_wire(state, include_numbers)}, request_id)


def encode_faxes(
    states: Iterable[FaxState], head_seq: int, *, include_numbers: bool, request_id: RequestId | None = None
) -> bytes:
    """Reply to ``list``: subscribe with ``after_seq=head_seq`` to follow on from this snapshot."""
    faxes = [fax_to_wire(s, include_numbers) for s in states]
    return _with_id({"type": "faxes", "faxes": faxes, "head_seq": head_seq}, request_id)


def _audited(state: FaxState, include_numbers: bool) -> dict[str, Any]:
    """A fax of a ``page``: the ``fax`` object, each recipient with its error's category."""
    fax = fax_to_wire(state, include_numbers)
    for wire in fax["recipients"]:
        known = classify(wire["error_code"])
        wire["error_category"] = None if known is None else known.category
    return fax


def encode_page(
    states: Iterable[FaxState],
    next_key: PageKey | None,
    head_seq: int,
    *,
    include_numbers: bool,
    request_id: RequestId | None = None,
) -> bytes:
    """Reply to ``query``: ``next`` is the ``after`` of the following page, null on the last one."""
    return _with_id(
        {
            "type": "page",
            "faxes": [_audited(s, include_numbers) for s in states],
            "next": None if next_key is None else next_key.to_wire(),
            "head_seq": head_seq,
        },
        request_id,
    )


def encode_history(
    events: Sequence[Event], *, include_numbers: bool, request_id: RequestId | None = None
) -> bytes:
    """Reply to ``history``."""
    wire = [e.to_wire(include_numbers=include_numbers) for e in events]
    return _with_id({"type": "history", "events": wire}, request_id)


def encode_accepted(fax_id: str, ref: str | None, status: str, request_id: RequestId | None = None) -> bytes:
    """Reply to ``send``: RingCentral took the fax; its events follow on the subscription."""
    return _with_id({"type": "accepted", "fax_id": fax_id, "ref": ref, "status": status}, request_id)
