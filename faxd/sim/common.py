"""Small helpers shared by the simulator modules: time formats, ids, error bodies, timers."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

JsonDict = dict[str, Any]


def iso(dt: datetime) -> str:
    """RingCentral's timestamp format: UTC, milliseconds, ``Z`` (``2016-03-10T18:07:52.534Z``)."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_iso(value: str) -> datetime:
    """Parse an ISO 8601 date-time or date; naive values are taken as UTC. Raises ValueError."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


def new_token(prefix: str) -> str:
    """An opaque bearer-style token (url-safe)."""
    return f"{prefix}{secrets.token_urlsafe(24)}"


def api_error(code: str, message: str, parameter_name: str | None = None) -> JsonDict:
    """RingCentral's general error body: ``errors[]`` plus the first error at top level."""
    entry: JsonDict = {"errorCode": code, "message": message}
    if parameter_name is not None:
        entry["parameterName"] = parameter_name
    body: JsonDict = {"errorCode": code, "message": message, "errors": [dict(entry)]}
    if parameter_name is not None:
        body["parameterName"] = parameter_name
    return body


def oauth_error(error: str, code: str, message: str) -> JsonDict:
    """``/restapi/oauth/*`` error body: RFC 6749 ``error`` plus RingCentral ``errors[]``."""
    return {
        "error": error,
        "error_description": message,
        "errors": [{"errorCode": code, "message": message}],
    }


class ApiError(Exception):
    """An error response the HTTP layer turns into JSON (``status`` + ``body``)."""

    def __init__(self, status: int, body: JsonDict, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {body.get('errorCode') or body.get('error')}")
        self.status = status
        self.body = body
        self.headers = headers or {}


def not_found(parameter: str) -> ApiError:
    return ApiError(
        404, api_error("CMN-102", f"Resource for parameter [{parameter}] is not found", parameter)
    )


def invalid_parameter(parameter: str, status: int = 400) -> ApiError:
    return ApiError(status, api_error("CMN-101", f"Parameter [{parameter}] value is invalid", parameter))


class Timers:
    """Event-loop timers owned by the simulator; :meth:`cancel_all` runs on stop.

    Uses the running loop's clock, so the whole simulator follows fake time under ``looptime``.
    """

    def __init__(self) -> None:
        self._handles: set[asyncio.TimerHandle] = set()

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._handles.discard(handle)
            callback()

        handle = loop.call_later(max(0.0, delay), fire)
        self._handles.add(handle)
        return handle

    def cancel(self, handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            handle.cancel()
            self._handles.discard(handle)

    def cancel_all(self) -> None:
        for handle in list(self._handles):
            handle.cancel()
        self._handles.clear()


def default_wall_clock() -> datetime:
    return datetime.now(UTC)


def plus_seconds(dt: datetime, seconds: float) -> datetime:
    return dt + timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the simulator served: an HTTP request, a WS ClientRequest or a Heartbeat.

    ``path`` is the route template (``…/message-store/{messageId}``) so tests can count
    spend per endpoint; ``raw_path`` is what the client actually asked for; ``time`` is the
    event loop time; ``transport`` is ``"http"`` or ``"ws"``; ``group`` is the throttling
    group (None for requests outside any group).
    """

    method: str
    path: str
    group: str | None
    status: int
    time: float
    transport: str = "http"
    raw_path: str = ""

    def as_dict(self) -> JsonDict:
        return {
            "method": self.method,
            "path": self.path,
            "group": self.group,
            "status": self.status,
            "time": self.time,
            "transport": self.transport,
            "rawPath": self.raw_path,
        }


def loop_wall_clock(start: datetime | None = None) -> Callable[[], datetime]:
    """A wall clock that advances with the running event loop's time.

    Pass it as ``Simulator(wall_clock=loop_wall_clock())`` under ``looptime`` so that
    ``creationTime``/``lastModifiedTime`` move with fake time. Anchored at ``start``
    (default: now) on its first call.
    """
    anchor: list[tuple[datetime, float]] = []

    def now() -> datetime:
        loop_now = asyncio.get_running_loop().time()
        if not anchor:
            anchor.append((start or datetime.now(UTC), loop_now))
        base, t0 = anchor[0]
        return base + timedelta(seconds=loop_now - t0)

    return now
