"""Sans-I/O codec and session bookkeeping for RingCentral's WebSocket gateway (WSG).

Turns text frames into typed frames (docs/ringcentral.md §2.3), encodes the few frames faxd sends
(subscription ClientRequests, Heartbeat), extracts fax hints from notifications (§3), keeps the
newest ``wsc`` session token (§2.4), decides whether a reconnect may try session recovery, and names
the states of a session (:class:`WsState`) for everything that reports or checks them.

This module must not do I/O, read clocks or import an event loop: the WebSocket adapter feeds it
text and the current monotonic time (``now``) and acts on what it returns.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

#: Machine reasons of :class:`FrameError`; used verbatim as the ``reason`` metric label.
FRAME_ERROR_REASONS: Final = (
    "not_json",
    "not_array",
    "bad_meta",
    "unknown_type",
    "bad_body",
    "too_large",
    "other_type",
    "foreign_subscription",
)

SUBSCRIPTION_PATH: Final = "/restapi/v1.0/subscription"


class FrameError(ValueError):
    """A frame faxd cannot use. ``reason`` is one of :data:`FRAME_ERROR_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Wsc:
    """The WSG session context token presented as ``&wsc=`` to recover a session."""

    token: str = field(repr=False)  # a credential-like value: kept out of reprs and logs
    sequence: int


@dataclass(frozen=True, slots=True)
class ConnectionDetails:
    """First frame of every connection; on a ``wsc`` connect it carries ``recovery_state``."""

    message_id: str | None
    wsc: Wsc | None
    recovery_state: str | None = None  # "Successful" | "Failed" | None (no wsc presented)
    recovery_error_code: str | None = None
    recovery_timeout: float | None = None
    idle_timeout: float | None = None
    absolute_timeout: float | None = None
    recovery_buffer_size: int | None = None
    max_active_requests: int | None = None


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """The gateway's reply to a tunnelled ClientRequest (matched on ``message_id``)."""

    message_id: str
    status: int
    headers: Mapping[str, str]
    body: Any
    wsc: Wsc | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str | None:
        """``errors[0].errorCode``, else the top-level ``errorCode`` of a non-2xx reply body."""
        return error_code_of(self.body)


@dataclass(frozen=True, slots=True)
class Notification:
    """A ServerNotification: the envelope fields faxd uses and the event body."""

    message_id: str | None
    subscription_id: str | None
    event: str
    uuid: str | None
    owner_id: str | None
    body: Any
    wsc: Wsc | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A Heartbeat frame (the server's echo of ours)."""

    message_id: str | None
    wsc: Wsc | None = None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """A gateway Error frame, e.g. WSG-902 idle timeout or WSG-903 absolute timeout."""

    error_code: str | None
    message: str | None
    wsc: Wsc | None = None


Frame = ConnectionDetails | ClientResponse | Notification | Heartbeat | ErrorFrame


@dataclass(frozen=True, slots=True)
class Hint:
    """ "The fax box of ``extension_id`` changed": what a notification tells faxd."""

    extension_id: str
    new_ids: tuple[str, ...] = ()
    updated: int = 0


# --------------------------------------------------------------------------- decoding


def parse_frame(data: str | bytes, *, max_bytes: int | None = None) -> Frame:
    """Decode one WSG text frame; raise :class:`FrameError` for anything unusable."""
    # surrogatepass: a str with a lone surrogate can still be measured (it then fails as not_json or
    # parses to strings faxd never looks into).
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if max_bytes is not None and size > max_bytes:
        raise FrameError("too_large", f"{size} bytes")
    try:
        decoded = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise FrameError("not_json", type(exc).__name__) from None
    if not isinstance(decoded, list):
        raise FrameError("not_array", type(decoded).__name__)
    if not 1 <= len(decoded) <= 2:
        raise FrameError("not_array", f"{len(decoded)} elements")
    meta = decoded[0]
    if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
        raise FrameError("bad_meta", "no type")
    body: Any = decoded[1] if len(decoded) == 2 else None
    wsc = _wsc(meta.get("wsc"))
    message_id = _opt_str(meta.get("messageId"))
    kind = meta["type"]
    if kind == "ConnectionDetails":
        return _connection_details(message_id, wsc, body)
    if kind == "ClientRequest":
        return _client_response(meta, message_id, wsc, body)
    if kind == "ServerNotification":
        return _notification(message_id, wsc, body)
    if kind == "Heartbeat":
        return Heartbeat(message_id, wsc)
    if kind == "Error":
        if body is not None and not isinstance(body, dict):
            raise FrameError("bad_body", "Error body not an object")
        b = body or {}
        return ErrorFrame(
            _opt_str(b.get("errorCode", meta.get("errorCode"))),
            _opt_str(b.get("message", meta.get("message"))),
            wsc,
        )
    raise FrameError("unknown_type", kind[:40])


def _wsc(raw: Any) -> Wsc | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FrameError("bad_meta", "wsc not an object")
    token, sequence = raw.get("token"), raw.get("sequence")
    if not isinstance(token, str) or not token:
        raise FrameError("bad_meta", "wsc.token")
    # bool is an int subclass; a boolean sequence is a broken frame, not sequence 1.
    if isinstance(sequence, bool) or not isinstance(sequence, int | str):
        raise FrameError("bad_meta", "wsc.sequence")
    try:
        return Wsc(token, int(sequence))
    except ValueError:
        raise FrameError("bad_meta", "wsc.sequence") from None


def _connection_details(message_id: str | None, wsc: Wsc | None, body: Any) -> ConnectionDetails:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise FrameError("bad_body", "ConnectionDetails body not an object")
    state = body.get("recoveryState")
    if state is not None and not isinstance(state, str):
        raise FrameError("bad_body", "recoveryState")
    return ConnectionDetails(
        message_id=message_id,
        wsc=wsc,
        recovery_state=state,
        recovery_error_code=_opt_str(body.get("recoveryErrorCode")),
        recovery_timeout=_opt_num(body, "recoveryTimeout"),
        idle_timeout=_opt_num(body, "idleTimeout"),
        absolute_timeout=_opt_num(body, "absoluteTimeout"),
        recovery_buffer_size=_opt_int(body, "recoveryBufferSize"),
        max_active_requests=_opt_int(body, "maxActiveRequests"),
    )


def _client_response(meta: dict[str, Any], message_id: str | None, wsc: Wsc | None, body: Any) -> Frame:
    if message_id is None:
        raise FrameError("bad_meta", "ClientRequest without messageId")
    status = meta.get("status")
    if isinstance(status, bool) or not isinstance(status, int):
        raise FrameError("bad_meta", "ClientRequest without status")
    headers = meta.get("headers", {})
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise FrameError("bad_meta", "headers not an object")
    return ClientResponse(message_id, status, {str(k): str(v) for k, v in headers.items()}, body, wsc)


def _notification(message_id: str | None, wsc: Wsc | None, body: Any) -> Notification:
    if not isinstance(body, dict):
        raise FrameError("bad_body", "notification without envelope")
    event = body.get("event")
    if not isinstance(event, str):
        raise FrameError("bad_body", "envelope.event")
    owner = body.get("ownerId")
    inner = body.get("body")
    if owner is None and isinstance(inner, dict):
        owner = inner.get("ownerId")  # the spec's MessageEvent puts it inside the body
    return Notification(
        message_id=message_id,
        subscription_id=_opt_str(body.get("subscriptionId")),
        event=event,
        uuid=_opt_str(body.get("uuid")),
        owner_id=_id_str(owner),
        body=inner,
        wsc=wsc,
    )


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise FrameError("bad_meta", "expected a string")


def _opt_num(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FrameError("bad_body", key)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        raise FrameError("bad_body", key) from None
    if not math.isfinite(number):  # NaN and Infinity parse as JSON but are no number of seconds
        raise FrameError("bad_body", key)
    return number


def _opt_int(obj: Mapping[str, Any], key: str) -> int | None:
    value = _opt_num(obj, key)
    return None if value is None else int(value)


def _id_str(value: Any) -> str | None:
    """Ids arrive as JSON numbers or strings; faxd keys everything by their decimal string."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise FrameError("bad_body", "boolean id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise FrameError("bad_body", "bad id")


def error_code_of(body: Any) -> str | None:
    """RingCentral error code: ``errors[0].errorCode``, else top-level ``errorCode``/``error``."""
    if not isinstance(body, dict):
        return None
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = errors[0].get("errorCode")
        if isinstance(code, str):
            return code
    for key in ("errorCode", "error"):
        code = body.get(key)
        if isinstance(code, str):
            return code
    return None


# --------------------------------------------------------------------------- hints

_EXTENSION_IN_EVENT = re.compile(r"/extension/([^/?]+)/")


def extract_hint(notification: Notification) -> Hint:
    """The fax hint of a notification.

    Raises :class:`FrameError` ``other_type`` for notifications about other message types (SMS,
    voicemail...) and ``bad_body`` for bodies of the wrong shape.
    """
    body = notification.body
    if not isinstance(body, dict):
        raise FrameError("bad_body", "notification body not an object")
    if "changes" in body:
        return _message_store_hint(notification, body)
    if "id" in body and ("messageStatus" in body or "type" in body):
        return _record_hint(notification, body)
    raise FrameError("bad_body", "neither changes[] nor a message record")


def _extension_of(notification: Notification, body: Mapping[str, Any]) -> str:
    ext = _id_str(body.get("extensionId"))
    if ext is None:
        match = _EXTENSION_IN_EVENT.search(notification.event)
        if match and match.group(1) != "~":
            ext = match.group(1)
    if ext is None:
        ext = notification.owner_id
    if ext is None:
        raise FrameError("bad_body", "no extension id")
    return ext


def _message_store_hint(notification: Notification, body: Mapping[str, Any]) -> Hint:
    changes = body["changes"]
    if not isinstance(changes, list):
        raise FrameError("bad_body", "changes not a list")
    fax = False
    new_ids: list[str] = []
    updated = 0
    for change in changes:
        if not isinstance(change, dict):
            raise FrameError("bad_body", "change not an object")
        if change.get("type") != "Fax":
            continue
        fax = True
        ids = change.get("newMessageIds") or []
        if not isinstance(ids, list):
            raise FrameError("bad_body", "newMessageIds not a list")
        for raw in ids:
            ident = _id_str(raw)
            if ident is not None and ident not in new_ids:
                new_ids.append(ident)
        count = change.get("updatedCount") or 0
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise FrameError("bad_body", "updatedCount")
        updated += count
    if not fax:
        raise FrameError("other_type", "no Fax change")
    return Hint(_extension_of(notification, body), tuple(new_ids), updated)


def _record_hint(notification: Notification, body: Mapping[str, Any]) -> Hint:
    if body.get("type", "Fax") != "Fax":
        raise FrameError("other_type", "record is not a Fax")
    ident = _id_str(body["id"])
    if ident is None:
        raise FrameError("bad_body", "record id is null")
    return Hint(_extension_of(notification, body), (ident,), 0)


# --------------------------------------------------------------------------- encoding


def event_filters(extensions: Iterable[str]) -> list[str]:
    """The event filters of the one subscription: every fax change, plus inbound fax records."""
    filters: list[str] = []
    for ext in extensions:
        base = f"/restapi/v1.0/account/~/extension/{ext}"
        for f in (f"{base}/message-store?type=Fax", f"{base}/fax?direction=Inbound"):
            if f not in filters:
                filters.append(f)
    return filters


def encode_client_request(
    message_id: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> str:
    """A ClientRequest frame; the body element is omitted when ``body`` is None."""
    meta: dict[str, Any] = {"type": "ClientRequest", "messageId": message_id, "method": method, "path": path}
    if headers:
        meta["headers"] = dict(headers)
    frame: list[Any] = [meta] if body is None else [meta, body]
    return json.dumps(frame, separators=(",", ":"))


def _subscription_body(filters: Sequence[str]) -> dict[str, Any]:
    return {"eventFilters": list(filters), "deliveryMode": {"transportType": "WebSocket"}}


def encode_subscribe(message_id: str, filters: Sequence[str]) -> str:
    return encode_client_request(message_id, "POST", SUBSCRIPTION_PATH, _subscription_body(filters))


def encode_update(message_id: str, subscription_id: str, filters: Sequence[str]) -> str:
    path = f"{SUBSCRIPTION_PATH}/{subscription_id}"
    return encode_client_request(message_id, "PUT", path, _subscription_body(filters))


def encode_unsubscribe(message_id: str, subscription_id: str) -> str:
    return encode_client_request(message_id, "DELETE", f"{SUBSCRIPTION_PATH}/{subscription_id}")


def encode_heartbeat(message_id: str) -> str:
    return json.dumps([{"type": "Heartbeat", "messageId": message_id}], separators=(",", ":"))


def subscription_id_of(response: ClientResponse) -> str:
    """The subscription id of a 2xx subscription reply (body ``id``, else the WSG header)."""
    body = response.body
    ident = body.get("id") if isinstance(body, dict) else None
    if ident is None:
        ident = response.headers.get("WSG-SubscriptionId")
    try:
        value = _id_str(ident)
    except FrameError:
        value = None
    if value is None:
        raise FrameError("bad_body", "subscription reply without id")
    return value


@dataclass(frozen=True, slots=True)
class DisabledFilter:
    """One entry of a subscription reply's ``disabledFilters`` (spec ``DisabledFilterInfo``)."""

    filter: str
    reason: str
    message: str = ""


def disabled_filters_of(response: ClientResponse) -> list[DisabledFilter]:
    """The filters a 2xx subscription reply says the user may not subscribe to.

    Liberal: entries without a ``filter`` string are skipped, a missing ``reason`` is empty.
    """
    body = response.body
    raw = body.get("disabledFilters") if isinstance(body, dict) else None
    if not isinstance(raw, list):
        return []
    out: list[DisabledFilter] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("filter"), str):
            continue
        reason, message = item.get("reason"), item.get("message")
        out.append(
            DisabledFilter(
                item["filter"],
                reason if isinstance(reason, str) else "",
                message if isinstance(message, str) else "",
            )
        )
    return out


_FILTER_KEY = re.compile(r"/extension/([^/?]+)/([^/?]+)")


def filter_key(event_filter: str, owner_id: str | None = None) -> tuple[str, str] | None:
    """(extension id, resource) of an event filter, e.g. ``("200000001", "message-store")``; ``~`` is
    ``owner_id``. Matches a filter however the server spells its account part or prefix."""
    match = _FILTER_KEY.search(event_filter.split("?", 1)[0])
    if match is None:
        return None
    ext = match.group(1)
    if ext == "~":
        if owner_id is None:
            return None
        ext = owner_id
    return ext, match.group(2)


# --------------------------------------------------------------------------- session bookkeeping


class WsState(StrEnum):
    """Where the WebSocket session is: what STATUS=, ``/readyz`` and ``faxd_ws_state`` report."""

    DISCONNECTED = "disconnected"  # no connection; the next attempt is scheduled
    CONNECTING = "connecting"  # ws token, upgrade, waiting for ConnectionDetails
    SUBSCRIBING = "subscribing"  # connected; the subscription is being made (or every filter is refused)
    UP = "up"  # subscribed: notifications arrive


def newer_wsc(stored: Wsc | None, incoming: Wsc | None, *, connection_details: bool = False) -> Wsc | None:
    """The wsc to keep: the incoming one when none is stored, when it comes with a
    ConnectionDetails (every connection starts a session context: a fresh connect a new session
    whose sequence starts again at 1, a recovery the resumed one), or when its sequence is higher;
    otherwise the stored one (docs/ringcentral.md §2.4)."""
    if incoming is None:
        return stored
    if stored is None or connection_details or incoming.sequence > stored.sequence:
        return incoming
    return stored


@dataclass(slots=True)
class WsgSession:
    """What survives a WebSocket connection: the wsc, the recovery window, the subscription.

    The adapter reports frames, connects and losses; this decides whether to present ``wsc``
    and whether a new subscription (and a full resync) is needed.
    """

    wsc: Wsc | None = None
    recovery_timeout: float | None = None
    subscription_id: str | None = None
    lost_at: float | None = None

    def frame(self, frame: Frame) -> None:
        """Keep the newest wsc of any frame."""
        self.wsc = newer_wsc(self.wsc, frame.wsc, connection_details=isinstance(frame, ConnectionDetails))

    def recovery_token(self, now: float) -> str | None:
        """The wsc token to present on the next connect, or None for a fresh session."""
        if self.wsc is None:
            return None
        late = (
            self.lost_at is not None
            and self.recovery_timeout is not None
            and now - self.lost_at >= self.recovery_timeout
        )
        if late:
            return None
        return self.wsc.token

    def lost(self, now: float) -> None:
        """The connection closed; the recovery window starts at the first loss."""
        if self.lost_at is None:
            self.lost_at = now

    def connected(self, details: ConnectionDetails, *, presented_wsc: bool) -> bool:
        """Record a ConnectionDetails; True when the subscription survived (no resubscribe needed)."""
        recovered = presented_wsc and details.recovery_state == "Successful"
        if recovered:
            self.frame(details)
        else:
            # A new session (fresh connect or failed recovery): the old session's wsc is dead even
            # when these details carry none, and presenting it would fail the next recovery.
            self.wsc = details.wsc
        if details.recovery_timeout is not None:
            self.recovery_timeout = details.recovery_timeout
        self.lost_at = None
        survived = recovered and self.subscription_id is not None
        if not survived:
            self.subscription_id = None
        return survived

    def forget(self) -> None:
        """Drop the session context (e.g. after the gateway rejected our wsc)."""
        self.wsc = None
        self.subscription_id = None
        self.lost_at = None
