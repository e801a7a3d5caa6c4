"""The WebSocket gateway (WSG): connections, WSG sessions, subscriptions, notifications.

Implements docs/ringcentral.md §2: ``GET /ws?access_token=…[&wsc=…]``, ``ConnectionDetails`` as the
first frame, ``ClientRequest`` subscription create/update/delete tunnelled over the socket,
``ServerNotification`` frames with an increasing ``wsc.sequence``, ``Heartbeat`` echo,
``Error`` frames (WSG-400, WSG-902 idle, WSG-903 absolute timeout) and session recovery:
after a disconnect a WSG session (its subscription and up to ``recoveryBufferSize``
notifications) survives ``recoveryTimeout`` seconds, and a reconnect with its ``wsc`` token
within that window resumes it and replays what was missed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import WSMsgType, web

from faxd.logs import get_logger
from faxd.sim.auth import TokenStore, WsToken
from faxd.sim.common import ApiError, JsonDict, Timers, api_error, iso, new_token, new_uuid
from faxd.sim.config import SimConfig
from faxd.sim.events import EventFilter, envelope, notification_bodies, parse_filters
from faxd.sim.observe import ObserverSet, ServedJson
from faxd.sim.ratelimit import RateLimiter, rate_exceeded_body
from faxd.sim.store import Change, Message, MessageStore

log = get_logger(__name__)

_WSC_PREFIX = "wsc1:"
#: recoveryErrorCode when the WSG session is unknown or its recovery window has passed.
#: Not observed on RingCentral (UNCONFIRMED); WSG-1003/1005 are the observed codes.
RECOVERY_EXPIRED = "WSG-1001"

SUBSCRIPTION_PATHS = ("/restapi/v1.0/subscription", "/restapi/v1.0/subscription/")
#: SUB-405's message (the errors guide); also the simulator's ``disabledFilters`` message.
OTHER_EXTENSIONS = "Not allowed subscribe for messages to other extensions"

#: The ``wan_path`` mode's pong delays: (probability, low s, high s); a pong that falls in none of
#: these bands is "fast" (log-normal, median ``WAN_MEDIAN`` s). ``None`` as the range: lost.
WAN_LOST = 0.002  # about 7 pongs an hour at one ping a second never come
WAN_SPIKE = (0.005, 1.0, 3.0)  # about 18 an hour: a retransmission, a Wi-Fi or LTE hiccup
WAN_SLOW = (0.05, 0.1, 0.9)  # one in 20: queueing somewhere on the way
WAN_MEDIAN = 0.04
WAN_SIGMA = 0.5  # most fast pongs take 15-110 ms


def wan_pong_delay(rng: random.Random) -> float | None:
    """One pong's delay on a realistic WAN path, in seconds; None: this pong is lost.

    Heavy-tailed: mostly tens of milliseconds, one in twenty some hundreds, rare spikes of 1-3 s,
    and now and then no pong at all.
    """
    draw = rng.random()
    if draw < WAN_LOST:
        return None
    draw -= WAN_LOST
    for chance, low, high in (WAN_SPIKE, WAN_SLOW):
        if draw < chance:
            return rng.uniform(low, high)
        draw -= chance
    return rng.lognormvariate(math.log(WAN_MEDIAN), WAN_SIGMA)


def encode_wsc(session_id: str) -> str:
    return base64.urlsafe_b64encode((_WSC_PREFIX + session_id).encode()).decode().rstrip("=")


def decode_wsc(token: str) -> str | None:
    """The WSG session id inside a wsc token, or None if the token is malformed."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not raw.startswith(_WSC_PREFIX) or len(raw) == len(_WSC_PREFIX):
        return None
    return raw[len(_WSC_PREFIX) :]


@dataclass
class Subscription:
    id: str
    raw_filters: list[str]
    filters: list[EventFilter]
    creation_time: datetime
    disabled: list[JsonDict] = field(default_factory=list)  # disabledFilters of the last POST/PUT


@dataclass
class WsgSession:
    """A WSG session: what ``wsc`` recovery resumes."""

    id: str
    oauth_session_id: str
    owner_id: str
    created: datetime
    buffer: deque[JsonDict]
    sequence: int = 0
    subscription: Subscription | None = None
    connection: Connection | None = None
    expiry: asyncio.TimerHandle | None = None

    @property
    def wsc_token(self) -> str:
        return encode_wsc(self.id)


@dataclass
class _Outgoing:
    payload: list[Any] | None = None
    raw: str | None = None
    with_wsc: bool = False
    close_code: int | None = None
    pong: bytes | None = None
    #: (method, route template, raw path) of the ClientRequest this frame answers
    request: tuple[str, str, str] | None = None


@dataclass
class Connection:
    """One open WebSocket."""

    id: int
    ws: web.WebSocketResponse
    request: web.Request
    session: WsgSession
    queue: asyncio.Queue[_Outgoing] = field(default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None
    idle: asyncio.TimerHandle | None = None
    absolute: asyncio.TimerHandle | None = None
    blackholed: bool = False
    pong_due: float = 0.0  # when the last delayed pong goes out (delay_pongs fault)
    detached: bool = False  # taken over by a newer connection of the same session
    closing: bool = False

    def send(
        self,
        payload: list[Any],
        *,
        with_wsc: bool = False,
        request: tuple[str, str, str] | None = None,
    ) -> None:
        self.queue.put_nowait(_Outgoing(payload=payload, with_wsc=with_wsc, request=request))

    def send_raw(self, text: str) -> None:
        self.queue.put_nowait(_Outgoing(raw=text))

    def close(self, code: int) -> None:
        self.queue.put_nowait(_Outgoing(close_code=code))

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (a network failure)."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()


Recorder = Callable[[str, str, str | None, int, str, str], None]


class Gateway:
    """All WSG sessions and connections of the simulator."""

    def __init__(
        self,
        config: SimConfig,
        tokens: TokenStore,
        store: MessageStore,
        limiter: RateLimiter,
        timers: Timers,
        wall_clock: Callable[[], datetime],
        record: Recorder,
        observers: ObserverSet | None = None,
    ) -> None:
        self._config = config
        self._observers = observers or ObserverSet()
        self._tokens = tokens
        self._store = store
        self._limiter = limiter
        self._timers = timers
        self._wall = wall_clock
        self._record = record
        self.sessions: dict[str, WsgSession] = {}
        self.connections: dict[int, Connection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_conn = 1
        self.paused = False
        self.notification_delay = 0.0  # fault: hold every notification this long (loop seconds)
        self.notification_copies = 1  # fault: send every notification this many times
        self.pong_delay = (0.0, 0.0)  # fault: every pong [low, high] seconds late
        self.wan_path = False  # mode: pong delays of a realistic WAN path (wan_pong_delay)
        self.pongs_lost = 0  # pongs the wan_path mode never sent
        self.answer_heartbeats = True  # fault (False): Heartbeats still count as activity, unanswered
        self._refuse_upgrades_until = -1.0  # fault: upgrades answered with an HTTP error until then
        self._refuse_upgrades_status = 503
        self._refuse_how = "off"  # fault: refuse_subscriptions
        self._refuse_extensions: frozenset[str] = frozenset()
        self._rng = random.Random(config.seed)
        self.stopping = False
        self._fail_next_recovery: str | None = None
        self.base_url = ""

    # -- lifecycle -------------------------------------------------------------------------
    async def stop(self) -> None:
        self.stopping = True
        for conn in list(self.connections.values()):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for session in self.sessions.values():
            self._timers.cancel(session.expiry)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- frames ----------------------------------------------------------------------------
    @staticmethod
    def _meta(kind: str, status: int, **extra: Any) -> JsonDict:
        meta: JsonDict = {
            "type": kind,
            "messageId": new_uuid(),
            "status": status,
            "headers": {"RCRequestId": new_uuid()},
        }
        meta.update(extra)
        return meta

    def _error_frame(self, status: int, code: str, message: str) -> list[Any]:
        return [self._meta("Error", status), {"errorCode": code, "message": message}]

    def _connection_details(self, session: WsgSession, recovery: tuple[str, str | None] | None) -> list[Any]:
        body: JsonDict = {
            "creationTime": iso(session.created),
            "maxConnectionsPerSession": 50,
            "recoveryBufferSize": self._config.recovery_buffer_size,
            "recoveryTimeout": self._config.recovery_timeout,
            "idleTimeout": self._config.idle_timeout,
            "absoluteTimeout": self._config.absolute_timeout,
            "maxActiveRequests": 10,
        }
        if recovery is not None:
            body["recoveryState"] = recovery[0]
            if recovery[1] is not None:
                body["recoveryErrorCode"] = recovery[1]
        return [self._meta("ConnectionDetails", 200), body]

    # -- the endpoint ----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /ws``: the WSG endpoint (aiohttp handler)."""
        if self._timers.now() < self._refuse_upgrades_until:
            status = self._refuse_upgrades_status
            self._record("GET", "/ws", None, status, "ws", request.path_qs)
            return web.Response(status=status, text="Service Unavailable", content_type="text/plain")
        ws = web.WebSocketResponse(autoping=False, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        access = request.query.get("access_token")
        wsc = request.query.get("wsc")
        if not access:
            self._record("GET", "/ws", None, 4400, "ws", request.path_qs)
            await ws.close(code=4400, message=b"access_token is required")
            return ws
        ws_token = self._tokens.check_ws_token(access)
        if ws_token is None:
            self._record("GET", "/ws", None, 4401, "ws", request.path_qs)
            frame = self._error_frame(401, "WSG-401", "Invalid or expired access token")
            await ws.send_str(json.dumps(frame))
            self._observe(_Outgoing(payload=frame))
            await ws.close(code=4401, message=b"Unauthorized")
            return ws
        recovery: tuple[str, str | None] | None = None
        if wsc is not None:
            session_id = decode_wsc(wsc)
            if session_id is None:
                self._record("GET", "/ws", None, 400, "ws", request.path_qs)
                frame = self._error_frame(400, "WSG-400", "Malformed WebSocket session context token")
                await ws.send_str(json.dumps(frame))
                self._observe(_Outgoing(payload=frame))
                await ws.close(code=4400, message=b"Malformed WebSocket session context token")
                return ws
            session, recovery = self._recover(session_id, ws_token)
        else:
            self._supersede(ws_token.session_id)
            session = self._new_session(ws_token)
        self._record("GET", "/ws", None, 101, "ws", request.path_qs)
        conn = Connection(self._next_conn, ws, request, session)
        self._next_conn += 1
        self.connections[conn.id] = conn
        previous = session.connection
        if previous is not None:
            previous.detached = True
            previous.abort()
        session.connection = conn
        self._timers.cancel(session.expiry)
        session.expiry = None
        conn.writer = self._spawn(self._writer(conn))
        conn.send(self._connection_details(session, recovery), with_wsc=True)
        if recovery is not None and recovery[0] == "Successful":
            while session.buffer:
                conn.send(self._notification_frame(session.buffer.popleft()), with_wsc=True)
        self._arm_idle(conn)
        conn.absolute = self._timers.call_later(
            self._config.absolute_timeout,
            lambda: self._timeout(conn, 408, "WSG-903", "Absolute timeout expired"),
        )
        try:
            await self._reader(conn)
        finally:
            await self._closed(conn)
        return ws

    def _new_session(self, ws_token: WsToken) -> WsgSession:
        session = WsgSession(
            id=new_token(""),
            oauth_session_id=ws_token.session_id,
            owner_id=ws_token.owner_id,
            created=self._wall(),
            buffer=deque(maxlen=max(1, self._config.recovery_buffer_size)),
        )
        self.sessions[session.id] = session
        return session

    def _supersede(self, oauth_session_id: str) -> None:
        """A fresh connect abandons the disconnected WSG sessions of its OAuth session.

        Their ``wsc`` is stale from now on: a client that presents one (instead of the ``wsc`` of
        the new session's ConnectionDetails) gets ``Failed`` ``WSG-1001``. What RingCentral does
        with an abandoned session inside its recovery window is undocumented; failing it is the
        strict reading of "recover with the token of the connection that was lost".
        """
        for old in list(self.sessions.values()):
            if old.oauth_session_id == oauth_session_id and old.connection is None:
                self._discard(old)

    def _recover(self, session_id: str, ws_token: WsToken) -> tuple[WsgSession, tuple[str, str | None]]:
        old = self.sessions.get(session_id)
        code: str | None = None
        if self._fail_next_recovery is not None:
            code, self._fail_next_recovery = self._fail_next_recovery, None
        elif old is None:
            code = RECOVERY_EXPIRED
        elif old.oauth_session_id != ws_token.session_id:
            code = "WSG-1003"
        elif old.subscription is None:
            code = "WSG-1005"
        if code is None and old is not None:
            return old, ("Successful", None)
        if old is not None:
            self._discard(old)
        return self._new_session(ws_token), ("Failed", code)

    def _discard(self, session: WsgSession) -> None:
        self._timers.cancel(session.expiry)
        self.sessions.pop(session.id, None)
        conn = session.connection
        if conn is not None:
            conn.detached = True
            conn.abort()

    async def _reader(self, conn: Connection) -> None:
        ws = conn.ws
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                if conn.blackholed:
                    continue
                self._arm_idle(conn)
                self._on_frame(conn, msg.data)
            elif msg.type == WSMsgType.PING:
                if conn.blackholed:
                    continue
                delay = self._pong_delay()
                if delay is None:
                    self.pongs_lost += 1  # lost on the way
                    continue
                if delay > 0:
                    # A slow path: each pong is late by its own delay (they overlap, as on a real
                    # path) but never overtakes an earlier one.
                    due = max(self._timers.now() + delay, conn.pong_due)
                    conn.pong_due = due
                    pong = _Outgoing(pong=msg.data)
                    self._timers.call_later(
                        due - self._timers.now(), functools.partial(conn.queue.put_nowait, pong)
                    )
                else:
                    await ws.pong(msg.data)
            elif msg.type in (WSMsgType.PONG, WSMsgType.BINARY):
                continue
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                return

    def _pong_delay(self) -> float | None:
        """How late the pong to a ping goes out (0: at once), or None when it is lost."""
        if self.wan_path:
            return wan_pong_delay(self._rng)
        low, high = self.pong_delay
        return self._rng.uniform(low, high) if high > 0 else 0.0

    async def _writer(self, conn: Connection) -> None:
        ws = conn.ws
        session = conn.session
        while True:
            item = await conn.queue.get()
            if conn.blackholed:
                continue
            try:
                if item.close_code is not None:
                    conn.closing = True
                    await ws.close(code=item.close_code)
                    return
                if item.raw is not None:
                    await ws.send_str(item.raw)
                    continue
                if item.pong is not None:
                    await ws.pong(item.pong)
                    continue
                assert item.payload is not None
                if item.with_wsc:
                    session.sequence += 1
                    item.payload[0]["wsc"] = {
                        "token": session.wsc_token,
                        "sequence": session.sequence,
                    }
                await ws.send_str(json.dumps(item.payload))
                self._observe(item)
            except (ConnectionError, RuntimeError) as exc:
                log.debug("sim.ws_send_failed", conn=conn.id, error=str(exc))
                return

    def _observe(self, item: _Outgoing) -> None:
        """Show the body of a frame that went out to the observers."""
        if not self._observers.active or item.payload is None:
            return
        meta: JsonDict = item.payload[0]
        kind = meta.get("type")
        body = item.payload[1] if len(item.payload) > 1 else None
        method = path = raw_path = ""
        if kind == "ClientRequest" and item.request is not None:
            method, path, raw_path = item.request
        elif kind == "ServerNotification" and isinstance(body, dict):
            path = str(body.get("event", ""))
        if kind in ("ClientRequest", "ServerNotification", "Error", "ConnectionDetails", "Heartbeat"):
            self._observers(
                ServedJson(
                    "ws", kind, method, path, int(meta.get("status", 0)), "application/json", body, raw_path
                )
            )

    async def _closed(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        self._timers.cancel(conn.idle)
        self._timers.cancel(conn.absolute)
        writer = conn.writer
        if writer is not None and not writer.done():
            if conn.closing:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(writer), 10)
            writer.cancel()
        if not conn.detached:
            self._disconnected(conn)

    def _disconnected(self, conn: Connection) -> None:
        """The session of ``conn`` lost its connection: start its recovery window."""
        session = conn.session
        if session.connection is not conn:
            return
        session.connection = None
        if self.stopping:
            return
        if self.sessions.get(session.id) is session:
            session.expiry = self._timers.call_later(
                self._config.recovery_timeout, lambda: self._expire(session)
            )

    def _expire(self, session: WsgSession) -> None:
        session.expiry = None
        if session.connection is None and self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    def _arm_idle(self, conn: Connection) -> None:
        self._timers.cancel(conn.idle)
        conn.idle = self._timers.call_later(
            self._config.idle_timeout,
            lambda: self._timeout(conn, 408, "WSG-902", "Idle timeout expired"),
        )

    def _timeout(self, conn: Connection, status: int, code: str, message: str) -> None:
        if conn.id not in self.connections:
            return
        self._timers.cancel(conn.idle)
        self._timers.cancel(conn.absolute)
        conn.send(self._error_frame(status, code, message))
        conn.close(1000)

    # -- client frames ---------------------------------------------------------------------
    def _on_frame(self, conn: Connection, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.debug("sim.ws_frame_ignored", conn=conn.id, detail="not JSON", frame=text[:100])
            return
        if not isinstance(frame, list) or not frame or not isinstance(frame[0], dict):
            log.debug("sim.ws_frame_ignored", conn=conn.id, detail="not a WSG frame", frame=text[:100])
            return
        meta: JsonDict = frame[0]
        body = frame[1] if len(frame) > 1 else None
        kind = meta.get("type")
        if kind == "Heartbeat":
            self._record("Heartbeat", "Heartbeat", None, 200, "ws", "Heartbeat")
            if not self.answer_heartbeats:
                return
            reply = {
                "type": "Heartbeat",
                "messageId": meta.get("messageId"),
                "status": 200,
                "headers": {"RCRequestId": new_uuid()},
            }
            conn.send([reply])
        elif kind == "ClientRequest":
            self._client_request(conn, meta, body)
        else:
            log.debug("sim.ws_frame_ignored", conn=conn.id, detail="unknown frame type", type=kind)

    def _client_request(self, conn: Connection, meta: JsonDict, body: Any) -> None:
        method = str(meta.get("method", "")).upper()
        raw_path = str(meta.get("path", ""))
        template, sub_id = _subscription_route(raw_path)
        group: str | None = None
        if template.startswith("/restapi/v1.0/subscription"):
            group = "Light" if method == "GET" else "Medium"
        headers: JsonDict = {"RCRequestId": new_uuid(), "Content-Type": "application/json"}
        try:
            if group is not None:
                verdict = self._limiter.check(group)
                headers.update(verdict.headers())
                if not verdict.allowed:
                    raise ApiError(429, rate_exceeded_body())
            status, reply_body = self._subscription_request(conn.session, method, template, sub_id, body)
        except ApiError as err:
            status = err.status
            reply_body = err.body
            headers.update(err.headers)
        if status == 204 and sub_id is not None:
            headers["WSG-SubscriptionId"] = sub_id  # a DELETE: no body names it
        if status < 300 and isinstance(reply_body, dict) and "id" in reply_body:
            headers["WSG-SubscriptionId"] = reply_body["id"]
        self._record(method, template, group, status, "ws", raw_path)
        reply_meta: JsonDict = {
            "type": "ClientRequest",
            "messageId": meta.get("messageId"),
            "status": status,
            "headers": headers,
        }
        conn.send(
            [reply_meta] if reply_body is None else [reply_meta, reply_body],
            request=(method, template, raw_path),
        )

    def _subscription_request(
        self, session: WsgSession, method: str, template: str, sub_id: str | None, body: Any
    ) -> tuple[int, Any]:
        """Serve one ClientRequest: (status, body), or ApiError."""
        if template == "/restapi/v1.0/subscription" and method == "POST":
            return 200, self._create_subscription(session, body)
        if sub_id is not None and method in ("GET", "PUT", "DELETE"):
            current = session.subscription
            if current is None or current.id != sub_id:
                raise ApiError(
                    404,
                    api_error(
                        "CMN-102",
                        "Resource for parameter [subscriptionId] is not found",
                        "subscriptionId",
                    ),
                )
            if method == "GET":
                return 200, self._subscription_info(current)
            if method == "PUT":
                return 200, self._update_subscription(session, current, body)
            session.subscription = None
            return 204, None
        if template.startswith("/restapi/v1.0/subscription"):
            raise ApiError(405, api_error("CMN-405", f"Method [{method}] is not allowed for this resource"))
        raise ApiError(404, api_error("CMN-120", "Invalid URI"))

    def _check_delivery_mode(self, body: JsonDict) -> None:
        mode = body.get("deliveryMode")
        if not isinstance(mode, dict) or mode.get("transportType") != "WebSocket":
            raise ApiError(
                400,
                api_error(
                    "CMN-101",
                    "Parameter [deliveryMode.transportType] value is invalid",
                    "deliveryMode.transportType",
                ),
            )

    def _create_subscription(self, session: WsgSession, body: Any) -> JsonDict:
        if not isinstance(body, dict):
            raise ApiError(400, api_error("CMN-103", "JSON can't be parsed."))
        filters = parse_filters(body.get("eventFilters"), session.owner_id, self._config)
        self._check_delivery_mode(body)
        filters, disabled = self._refusals(filters)
        # One subscription per WSG session: a second one replaces the first.
        session.subscription = Subscription(
            new_uuid(), [f.raw for f in filters], filters, self._wall(), disabled
        )
        return self._subscription_info(session.subscription)

    def _update_subscription(self, session: WsgSession, current: Subscription, body: Any) -> JsonDict:
        if not isinstance(body, dict):
            raise ApiError(400, api_error("CMN-103", "JSON can't be parsed."))
        filters = parse_filters(body.get("eventFilters"), session.owner_id, self._config)
        if "deliveryMode" in body:
            self._check_delivery_mode(body)
        filters, current.disabled = self._refusals(filters)
        current.raw_filters = [f.raw for f in filters]
        current.filters = filters
        return self._subscription_info(current)

    def _refusals(self, filters: list[EventFilter]) -> tuple[list[EventFilter], list[JsonDict]]:
        """The ``refuse_subscriptions`` fault: the filters granted and the ``disabledFilters``, or
        the 403 that refuses the whole request."""
        how = self._refuse_how
        if how == "permission":
            message = "[SubscriptionWebSocket] application permission is required for [WebSocket] transport"
            raise ApiError(403, api_error("SUB-528", message))
        hit = [f for f in filters if f.extension_id in self._refuse_extensions]
        if how == "off" or not hit:
            return filters, []
        if how == "forbidden":
            raise ApiError(403, api_error("SUB-405", OTHER_EXTENSIONS))
        disabled = [
            {
                "filter": f.raw,
                "reason": "PermissionDenied",
                "message": OTHER_EXTENSIONS,
            }
            for f in hit
        ]
        return [f for f in filters if f not in hit], disabled

    def _subscription_info(self, sub: Subscription) -> JsonDict:
        ttl = self._config.absolute_timeout
        expires = sub.creation_time.timestamp() + ttl
        return {
            "uri": f"{self.base_url}/restapi/v1.0/subscription/{sub.id}",
            "id": sub.id,
            "creationTime": iso(sub.creation_time),
            "status": "Active",
            "eventFilters": list(sub.raw_filters),
            "expirationTime": iso(datetime.fromtimestamp(expires, tz=sub.creation_time.tzinfo)),
            "expiresIn": ttl - 1,
            "deliveryMode": {"transportType": "WebSocket", "encryption": False},
            **({"disabledFilters": list(sub.disabled)} if sub.disabled else {}),
        }

    # -- notifications ---------------------------------------------------------------------
    def _notification_frame(self, env: JsonDict) -> list[Any]:
        meta = self._meta("ServerNotification", 200)
        meta["messageId"] = env["uuid"]
        return [meta, env]

    def deliver(self, changes: list[Change]) -> None:
        """Fan the changes of one tick out to every subscription that sees them."""
        now = iso(self._wall())
        for session in list(self.sessions.values()):
            sub = session.subscription
            if sub is None:
                continue
            for flt in sub.filters:
                for body in notification_bodies(flt, changes, self._config.account_id, self._store.record):
                    self.push(
                        session,
                        envelope(flt, body, sub.id, session.owner_id, self._config.account_id, now),
                    )

    def push(self, session: WsgSession, env: JsonDict) -> None:
        """Send one notification envelope, or buffer it while the session is disconnected."""
        if self.paused:
            return
        if self.notification_delay > 0:
            self._timers.call_later(self.notification_delay, lambda: self._push_now(session, env))
        else:
            self._push_now(session, env)

    def _push_now(self, session: WsgSession, env: JsonDict) -> None:
        for _ in range(self.notification_copies):
            conn = session.connection
            if conn is None:
                session.buffer.append(env)  # deque(maxlen): the oldest is dropped
            else:
                conn.send(self._notification_frame(env), with_wsc=True)

    # -- faults ----------------------------------------------------------------------------
    def drop_all(self) -> int:
        """Abort every connection (like a network failure); sessions stay recoverable.

        The sessions count as disconnected at once: notifications made after this call are
        buffered for replay.
        """
        conns = list(self.connections.values())
        for conn in conns:
            conn.abort()
            self._disconnected(conn)
            conn.detached = True
        return len(conns)

    def blackhole_all(self) -> int:
        """Stop sending (and answering) anything on every open connection, without closing."""
        conns = list(self.connections.values())
        for conn in conns:
            conn.blackholed = True
            self._timers.cancel(conn.idle)
            self._timers.cancel(conn.absolute)
        return len(conns)

    def refuse_upgrades(self, seconds: float, status: int = 503) -> None:
        """Answer every WebSocket upgrade with HTTP ``status`` for ``seconds`` (0 ends it)."""
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status")
        self._refuse_upgrades_until = self._timers.now() + max(0.0, seconds)
        self._refuse_upgrades_status = status

    def refuse_subscriptions(self, how: str, extensions: Sequence[str] = ()) -> None:
        """Refuse subscription filters from now on (POST and PUT): ``disabled`` lists the filters of
        ``extensions`` in ``disabledFilters`` of a 200 and grants the rest; ``forbidden`` answers a
        request naming one of them 403 ``SUB-405``; ``permission`` answers every request 403
        ``SUB-528``; ``off`` ends it. Existing subscriptions are left as they are."""
        if how not in ("off", "disabled", "forbidden", "permission"):
            raise ValueError("how must be off, disabled, forbidden or permission")
        if how in ("disabled", "forbidden") and not extensions:
            raise ValueError(f"{how} needs the extensions to refuse")
        self._refuse_how = how
        self._refuse_extensions = frozenset(str(e) for e in extensions)

    def fail_next_recovery(self, code: str = RECOVERY_EXPIRED) -> None:
        self._fail_next_recovery = code

    def delay_pongs(self, low: float, high: float) -> None:
        if not 0 <= low <= high:
            raise ValueError("need 0 <= low <= high")
        self.pong_delay = (low, high)

    def send_raw_all(self, text: str) -> int:
        conns = list(self.connections.values())
        for conn in conns:
            conn.send_raw(text)
        return len(conns)

    def push_foreign(self, message: Message) -> int:
        """Fault: announce ``message`` to subscriptions whose filters do not cover it."""
        now = iso(self._wall())
        count = 0
        for session in list(self.sessions.values()):
            sub = session.subscription
            if sub is None or not sub.filters or any(f.matches(message) for f in sub.filters):
                continue
            flt = sub.filters[0]
            body = {
                "accountId": int(self._config.account_id)
                if self._config.account_id.isdigit()
                else self._config.account_id,
                "extensionId": int(message.extension_id)
                if message.extension_id.isdigit()
                else message.extension_id,
                "lastUpdated": iso(message.last_modified),
                "changes": [
                    {
                        "type": message.type,
                        "newCount": 1,
                        "updatedCount": 0,
                        "newMessageIds": [message.id],
                    }
                ],
            }
            self.push(
                session,
                envelope(flt, body, sub.id, session.owner_id, self._config.account_id, now),
            )
            count += 1
        return count

    def subscribed_sessions(self) -> list[WsgSession]:
        return [s for s in self.sessions.values() if s.subscription is not None]


def _subscription_route(raw_path: str) -> tuple[str, str | None]:
    """The route template of a ClientRequest path (absolute URLs accepted too) and the
    subscription id it names, if any."""
    path = raw_path.split("?", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].split("/", 1)[-1]
    if path in SUBSCRIPTION_PATHS:
        return "/restapi/v1.0/subscription", None
    if path.startswith("/restapi/v1.0/subscription/"):
        sub_id = path[len("/restapi/v1.0/subscription/") :].rstrip("/")
        return "/restapi/v1.0/subscription/{subscriptionId}", sub_id
    return path, None
