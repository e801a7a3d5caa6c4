"""Event filters and notification payloads (no aiohttp).

Parses the subscription ``eventFilters`` the simulator supports, decides which message
changes each filter sees, and builds the notification envelopes exactly as RingCentral
sends them (``docs/notifications``): the message-store change summary and the
``fax?direction=Inbound`` full record. :class:`NotificationHub` coalesces the changes made
in one event-loop tick into one notification per filter.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs

from faxd.sim.common import ApiError, JsonDict, api_error, iso, new_uuid
from faxd.sim.config import SimConfig
from faxd.sim.store import DIRECTIONS, MESSAGE_TYPES, Change, Message

_FILTER_RE = re.compile(
    r"^(?:/restapi/v1\.0)?/account/(?P<account>[^/?]+)/extension/(?P<extension>[^/?]+)"
    r"/(?P<resource>message-store|fax)/?$"
)

FilterKind = Literal["message-store", "fax"]


@dataclass(frozen=True)
class EventFilter:
    """One parsed event filter; ``extension_id`` is resolved (never ``~``)."""

    raw: str
    kind: FilterKind
    extension_id: str
    types: frozenset[str] | None
    direction: str | None

    def event(self, account_id: str) -> str:
        """The ``event`` field of notifications: the filter with real ids substituted."""
        base = f"/restapi/v1.0/account/{account_id}/extension/{self.extension_id}/{self.kind}"
        _, sep, query = self.raw.partition("?")
        return base + (sep + query if sep else "")

    def matches(self, message: Message) -> bool:
        if message.extension_id != self.extension_id:
            return False
        if self.kind == "fax":
            return message.type == "Fax" and message.direction == "Inbound"
        if self.types is not None and message.type not in self.types:
            return False
        return self.direction is None or message.direction == self.direction


def _invalid(raw: Sequence[str]) -> ApiError:
    joined = ", ".join(raw)
    return ApiError(400, api_error("SUB-508", f"Invalid event filters: [{joined}]", "eventFilters"))


def parse_filter(raw: str, owner: str, config: SimConfig) -> EventFilter:
    """Parse one filter or raise RingCentral's SUB-5xx/SUB-4xx error."""
    path, _, query = raw.partition("?")
    match = _FILTER_RE.match(path)
    if match is None:
        raise _invalid([raw])
    account = match["account"]
    if account not in ("~", config.account_id):
        raise ApiError(
            403,
            api_error("SUB-406", "Not allowed subscribe for events to extensions of other account"),
        )
    extension = match["extension"]
    if extension == "~":
        extension = owner
    if extension not in config.extensions:
        raise ApiError(403, api_error("SUB-405", "Not allowed subscribe for messages to other extensions"))
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _invalid([raw]) from None
    if match["resource"] == "fax":
        if set(params) != {"direction"} or params["direction"] != ["Inbound"]:
            raise _invalid([raw])
        return EventFilter(raw, "fax", extension, frozenset({"Fax"}), "Inbound")
    return _message_store_filter(raw, extension, params)


def _message_store_filter(raw: str, extension: str, params: dict[str, list[str]]) -> EventFilter:
    """A message-store filter's query: optional ``type`` (comma-separated) and ``direction``."""
    if set(params) - {"type", "direction"}:
        raise _invalid([raw])
    types: frozenset[str] | None = None
    if "type" in params:
        names = [t for v in params["type"] for t in v.split(",")]
        if not names or any(t not in MESSAGE_TYPES for t in names):
            raise _invalid([raw])
        types = frozenset(names)
    direction: str | None = None
    if "direction" in params:
        values = params["direction"]
        if len(values) != 1 or values[0] not in DIRECTIONS:
            raise _invalid([raw])
        direction = values[0]
    return EventFilter(raw, "message-store", extension, types, direction)


def parse_filters(raws: object, owner: str, config: SimConfig) -> list[EventFilter]:
    if not isinstance(raws, list) or not raws or not all(isinstance(r, str) and r for r in raws):
        raise ApiError(400, api_error("CMN-101", "Parameter [eventFilters] value is invalid", "eventFilters"))
    return [parse_filter(r, owner, config) for r in raws]


def _number(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def notification_bodies(
    flt: EventFilter,
    changes: Sequence[Change],
    account_id: str,
    render: Callable[[Message], JsonDict],
) -> list[JsonDict]:
    """The ``body`` of each notification ``flt`` produces for these changes (maybe none)."""
    if flt.kind == "fax":
        out = []
        for change in changes:
            if change.kind == "new" and flt.matches(change.message):
                record = render(change.message)
                record["id"] = str(record["id"])
                out.append(record)
        return out
    # message-store: one change summary per message type, new ids listed, updates counted
    kinds: dict[int, tuple[Message, bool]] = {}
    for change in changes:
        if not flt.matches(change.message):
            continue
        mid = change.message.id
        was_new = kinds[mid][1] if mid in kinds else False
        kinds[mid] = (change.message, was_new or change.kind == "new")
    if not kinds:
        return []
    per_type: dict[str, JsonDict] = {}
    last = None
    for message, is_new in kinds.values():
        entry = per_type.setdefault(message.type, {"type": message.type, "newCount": 0, "updatedCount": 0})
        if is_new:
            entry["newCount"] += 1
            entry.setdefault("newMessageIds", []).append(message.id)
        else:
            entry["updatedCount"] += 1
        if last is None or message.last_modified > last:
            last = message.last_modified
    assert last is not None
    return [
        {
            "accountId": _number(account_id),
            "extensionId": _number(flt.extension_id),
            "lastUpdated": iso(last),
            "changes": list(per_type.values()),
        }
    ]


def envelope(
    flt: EventFilter, body: JsonDict, subscription_id: str, owner: str, account_id: str, now: str
) -> JsonDict:
    """The notification envelope (``uuid, event, timestamp, subscriptionId, ownerId, body``)."""
    return {
        "uuid": new_uuid(),
        "event": flt.event(account_id),
        "timestamp": now,
        "subscriptionId": subscription_id,
        "ownerId": owner,
        "body": body,
    }


class NotificationHub:
    """Collects the changes of one loop tick and hands them over together."""

    def __init__(self, deliver: Callable[[list[Change]], None]) -> None:
        self._deliver = deliver
        self._pending: list[Change] = []
        self._handle: asyncio.Handle | None = None

    def on_change(self, change: Change) -> None:
        self._pending.append(change)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Hand over the pending changes now (instead of at the end of the loop turn)."""
        if self._handle is not None:
            self._handle.cancel()
        self._flush()

    def _flush(self) -> None:
        self._handle = None
        changes, self._pending = self._pending, []
        if changes:
            self._deliver(changes)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pending = []
