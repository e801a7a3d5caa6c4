"""The WebSocket session with RingCentral's gateway: connect, subscribe, recover, never go deaf.

One connection at a time, one subscription holding every event filter. Each connect uses a ws
token the gateway has not taken yet (a refused upgrade leaves it unused, so the next attempt offers
it again within its lifetime instead of spending the Auth budget); a reconnect inside the announced
``recoveryTimeout`` presents ``wsc`` so the gateway replays what was missed. Whenever hints may
have been lost (first subscribe, fresh connect, failed recovery) ``on_resync`` is called so the
daemon reconciles everything. A quiet connection gets an app-level Heartbeat (against the gateway's
idle timeout; no reply is expected); WS pings, answered within a timeout that follows the measured
round trips (``faxd.core.roundtrip``), detect a dead path; every close, error frame or failure leads
to a backed-off reconnect. Event filters RingCentral refuses (``disabledFilters``, a 403 such as
SUB-405 or SUB-528) are left out of the subscription and asked for again only after a long backoff;
``refused_extensions`` names their extensions, which the daemon keeps tracking by polling.
Each connection goes through the proxy the
policy names for the ws URL (a CONNECT tunnel; TLS to the gateway inside it, verified as ever).

This module must not decide anything about faxes (it only hands :class:`Hint` values on), must
not parse frames itself (``faxd.core.wsg`` does), must not let websockets read proxy settings from
the environment (the policy decides), and must never log a token, the ws URL query or a proxy password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidProxyStatus,
    InvalidStatus,
    ProxyError as WsProxyError,
    WebSocketException,
)

from faxd import __version__
from faxd.adapters.metrics import WS_DISCONNECT_REASONS, Metrics
from faxd.adapters.rest import ApiError, AuthFailed, RateLimited, RingCentral, WsToken
from faxd.core import wsg
from faxd.core.backoff import backoff
from faxd.core.proxy import DIRECT, Proxy, ProxyError, ProxyPolicy
from faxd.core.ratebudget import parse_retry_after
from faxd.core.roundtrip import RoundTrip
from faxd.core.wsg import WsState

log = structlog.get_logger(__name__)

# websockets logs the HTTP request line (with ?access_token=...) at DEBUG: its logger for our
# connections is capped at INFO so a debug-level root logger cannot leak the token.
_WS_LOGGER = logging.getLogger("faxd.ws_library")
_WS_LOGGER.setLevel(logging.INFO)

REPLY_TIMEOUT: Final = 60.0  # what @rc-ex/ws waits for a ClientRequest reply
RECONNECT_CODES: Final = frozenset({"WSG-902", "WSG-903"})
#: Error frames that refuse the ws token, not the wsc: the session stays recoverable.
TOKEN_REFUSED: Final = frozenset({"WSG-401"})
#: Share of a ws token's ``expires_in`` within which an unused one is offered again (@rc-ex/ws: 0.8).
WS_TOKEN_REUSE: Final = 0.8
_SECRET_QUERY = re.compile(r"((?:access_token|wsc)=)[^&\s'\"]+")


def redact(text: str) -> str:
    """Blank out ws token and wsc values in ``text`` (exception messages may quote the URL)."""
    return _SECRET_QUERY.sub(r"\1<redacted>", text)


@dataclass(frozen=True)
class WsSettings:
    heartbeat_interval: float = 60
    ping_interval: float = 1
    ping_timeout_min: float = 5
    ping_timeout: float = 8
    max_message_bytes: int = 1048576
    connect_timeout: float = 30


class _Closed(Exception):
    """The current connection is over; ``reason`` becomes the ``ws_disconnects`` label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def gateway_connect(
    token: WsToken,
    *,
    wsc: str | None,
    settings: WsSettings,
    ssl_context: ssl.SSLContext | None,
    proxy: Proxy | None = None,
) -> connect:
    """Open a WebSocket to the gateway with ``token`` (and ``wsc`` to recover a session): the one
    place where faxd (the daemon and ``faxd doctor``) decides how it reaches the WSG."""
    url = f"{token.uri}?access_token={quote(token.token, safe='')}"
    if wsc is not None:
        url += f"&wsc={quote(wsc, safe='')}"
    return connect(
        url,
        open_timeout=settings.connect_timeout,
        ping_interval=None,  # the caller pings, with a timeout that follows the path
        ping_timeout=None,
        close_timeout=5,
        # Frames above the soft limit are ignored in the codec; only far bigger ones (4x)
        # make the library drop the connection.
        max_size=settings.max_message_bytes * 4,
        compression=None,
        # websockets takes proxy credentials only inside the URL; it never puts that URL
        # into a message (it would on an invalid URL, which parse_proxy_url rules out).
        proxy=proxy.url_with_credentials() if proxy is not None else None,
        user_agent_header=f"faxd/{__version__}",
        logger=_WS_LOGGER,
        ssl=ssl_context if url.startswith("wss:") else None,
    )


def default_delays() -> Iterator[float]:
    """Reconnect delays: 1-2 s, 2-4 s, ... up to 30-60 s (equal jitter never retries at once)."""
    return backoff(2.0, 2.0, 60.0, "equal")


def default_refusal_delays() -> Iterator[float]:
    """When to ask again for refused filters: 7.5-15 min, 15-30 min, then 30-60 min. A refusal is a
    permission someone has to change; asking more often would only spend the Medium budget."""
    return backoff(900.0, 2.0, 3600.0, "equal")


class WsSession:
    """Keeps one WSG subscription alive; see the module docstring."""

    def __init__(
        self,
        rc: RingCentral,
        *,
        filters: Sequence[str],
        settings: WsSettings,
        metrics: Metrics,
        on_hint: Callable[[wsg.Hint], None],
        on_resync: Callable[[], None],
        on_state: Callable[[str], None] | None = None,
        delays: Callable[[], Iterator[float]] = default_delays,
        refusal_delays: Callable[[], Iterator[float]] = default_refusal_delays,
        ssl_context: ssl.SSLContext | None = None,
        proxies: ProxyPolicy = DIRECT,
    ) -> None:
        self._rc = rc
        self._ssl = ssl_context
        self._proxies = proxies
        self._filters = list(filters)
        self._subscribed_filters: list[str] | None = None
        self._settings = settings
        self._metrics = metrics
        self._on_hint = on_hint
        self._on_resync = on_resync
        self._on_state = on_state
        self._delays = delays
        self._wsg = wsg.WsgSession()
        self._roundtrip = RoundTrip()
        # The gateway went on "delivering" into a dead path until the ping timed out, and a
        # Successful recovery replays only what it knows it did not send: hints may be gone.
        self._deaf = False
        self._ws: ClientConnection | None = None
        self._pending: dict[str, asyncio.Future[wsg.ClientResponse]] = {}
        self._subscribe_ids: set[str] = set()
        self._was_up = False
        self._connected = False
        self._state = WsState.DISCONNECTED
        self._detail = ""
        self._filter_lock = asyncio.Lock()
        # A ws token the gateway never accepted (refused upgrade, connection refused, timeout) and
        # until when it is offered again: every new one costs one of the Auth group's 5 requests a
        # minute, which logins and refreshes share.
        self._ws_token: WsToken | None = None
        self._ws_token_until = 0.0
        # Event filters RingCentral refused (filter -> error code or disabledFilters reason), asked
        # for again only when the long refusal backoff is due.
        self._refused: dict[str, str] = {}
        self._refusal_delays = refusal_delays
        self._refusal_backoff = refusal_delays()
        self._retry_refused_at: float | None = None
        self._refusal_scheduled = asyncio.Event()
        self._set_state(WsState.DISCONNECTED, "starting")

    @property
    def subscription_id(self) -> str | None:
        return self._wsg.subscription_id

    @property
    def state(self) -> WsState:
        return self._state

    # ------------------------------------------------------------------ supervision loop

    async def run(self) -> None:
        """Run until cancelled. Only :class:`AuthFailed` (credentials rejected) escapes."""
        loop = asyncio.get_running_loop()
        delays = self._delays()
        while True:
            self._was_up = self._connected = False
            ended: Exception
            try:
                ended = _Closed(await self._connection())
            except AuthFailed:
                self._set_state(WsState.DISCONNECTED, "credentials rejected")
                raise
            except Exception as exc:  # noqa: BLE001 - classified; a bug here must not silence push for good
                ended = exc
            why = classify(ended)
            self._after(ended, why)
            self._ws = None
            self._fail_pending()
            self._wsg.lost(loop.time())
            if self._connected:
                self._metrics.ws_disconnects.labels(why.label).inc()
            # A 429's penalty, or a 5xx's Retry-After (RingCentral: always obey it).
            retry_after = (ended.retry_after or 0.0) if isinstance(ended, ApiError) else 0.0
            if self._was_up:
                # The connection was good: a single drop is most likely transient, so reconnect at
                # once (recovery only works inside recoveryTimeout) and back off from scratch after.
                delays = self._delays()
                delay = retry_after
            else:
                delay = max(next(delays), retry_after)
            log.info("ws.disconnected", reason=why.reason, was_up=self._was_up, retry_in=round(delay, 2))
            self._set_state(WsState.DISCONNECTED, f"{why.reason}; reconnecting in {delay:.0f}s")
            await asyncio.sleep(delay)

    def _after(self, ended: Exception, why: Disconnect) -> None:
        """What an ending means beyond its reason: a refused ws token is not offered again, and a
        proxy that cannot be used or a bug of ours is logged."""
        if isinstance(ended, InvalidStatus) and ended.response.status_code in (401, 403):
            self._ws_token = None  # refused as invalid or expired: the next try gets a new one
        elif isinstance(ended, ProxyError):
            log.error("ws.proxy_unusable", reason=str(ended))
        elif why.label == "internal":
            log.error("ws.unexpected_error", error=redact(repr(ended)), exc_info=False)

    async def _connection(self) -> str:
        """One connection from ws token to close; returns the disconnect reason."""
        loop = asyncio.get_running_loop()
        wsc = self._wsg.recovery_token(loop.time())
        self._set_state(WsState.CONNECTING, "recovering session" if wsc else "")
        token = await self._unused_ws_token()
        proxy = self._proxies.proxy_for(token.uri)
        async with gateway_connect(
            token, wsc=wsc, settings=self._settings, ssl_context=self._ssl, proxy=proxy
        ) as ws:
            self._ws_token = None  # the gateway took it, and the docs call ws tokens single-use
            details = await self._connection_details(ws, presented_wsc=wsc is not None)
            survived = self._wsg.connected(details, presented_wsc=wsc is not None)
            self._connected = True
            self._metrics.ws_connects.labels("recovery" if wsc else "fresh").inc()
            if details.recovery_state is not None:
                result = "successful" if survived else "failed"
                self._metrics.ws_recoveries.labels(result).inc()
                log.info(
                    "ws.recovery",
                    result=result,
                    state=details.recovery_state,
                    error_code=details.recovery_error_code,
                )
            self._ws = ws
            reader = asyncio.create_task(self._read(ws), name="ws-reader")
            pinger = asyncio.create_task(self._keepalive(ws), name="ws-keepalive")
            sub: asyncio.Task[None] | None = None
            retrier: asyncio.Task[None] | None = None
            try:
                watched: set[asyncio.Task[Any]] = {reader, pinger}
                if survived and self._subscribed_filters == self._wanted_filters():
                    self._up()
                    if self._deaf:
                        self._resync()
                else:
                    sub = asyncio.create_task(self._locked_subscribe(ws, survived), name="ws-subscribe")
                    watched.add(sub)
                # Created after the subscribe, so that the subscribe takes the filter lock first.
                retrier = asyncio.create_task(self._retry_refused(ws), name="ws-refusal-retry")
                watched.add(retrier)
                while True:
                    done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                    for helper in (pinger, sub, retrier):
                        if helper in done:
                            helper.result()  # re-raises what ended it (no pong, no subscribe reply)
                            watched.discard(helper)
                    if reader in done:
                        return reader.result()
            finally:
                # The helpers end with this connection, however it ends (also when run() is
                # cancelled mid-subscribe): none may outlive it or die unobserved.
                helpers = [t for t in (sub, retrier, pinger, reader) if t is not None]
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)

    async def _unused_ws_token(self) -> WsToken:
        """The ws token for this attempt: the last one if the gateway never took it and it has time
        left, else a new one."""
        loop = asyncio.get_running_loop()
        if self._ws_token is not None and loop.time() < self._ws_token_until:
            log.info("ws.token_reused")
            return self._ws_token
        self._ws_token = None
        token = await self._rc.ws_token()
        self._ws_token, self._ws_token_until = token, loop.time() + WS_TOKEN_REUSE * token.expires_in
        return token

    async def _connection_details(
        self, ws: ClientConnection, *, presented_wsc: bool
    ) -> wsg.ConnectionDetails:
        """Wait for the first ConnectionDetails; nothing may be sent before it."""
        async with asyncio.timeout(self._settings.connect_timeout):
            while True:
                frame = self._parse(await ws.recv())
                if isinstance(frame, wsg.ConnectionDetails):
                    return frame
                if isinstance(frame, wsg.ErrorFrame):
                    log.warning("ws.connect_error_frame", code=frame.error_code, message=frame.message)
                    if presented_wsc and frame.error_code not in TOKEN_REFUSED:
                        # e.g. WSG-400 malformed wsc: presenting it again would fail the same way.
                        self._wsg.forget()
                    raise _Closed("error_frame")
                if frame is not None:
                    log.info("ws.frame_before_details", type=type(frame).__name__)

    def _up(self) -> None:
        self._was_up = True
        refused = len(self.refused_extensions)
        detail = f"subscribed ({len(self._subscribed_filters or ())} filters"
        detail += f"; push refused for {refused} extension{'s' * (refused != 1)})" if refused else ")"
        self._set_state(WsState.UP, detail)

    # ------------------------------------------------------------------ subscription

    async def _locked_subscribe(self, ws: ClientConnection, survived: bool) -> None:
        async with self._filter_lock:
            await self._subscribe(ws, survived=survived)

    async def _subscribe(
        self, ws: ClientConnection, *, survived: bool, retry: bool = False, keep_state: bool = False
    ) -> None:
        """Create (or, when ``survived``, update) the subscription; hold ``_filter_lock``.

        It asks for the filters RingCentral has not refused, or for every filter on a ``retry`` of
        the refused ones. A 403 (e.g. SUB-405 "Not allowed subscribe for messages to other
        extensions", SUB-528 a missing app permission) refuses filters: SUB-405 those of the
        other extensions (the user's own are always allowed), anything else all it asked for; the
        rest is asked for again at once, the refused ones only after ``refusal_delays`` (minutes to
        an hour). A 2xx reply's ``disabledFilters`` are refused the same way. Any other non-2xx reply
        is retried on the same connection with backoff; a missing reply ends the connection. Calls
        ``on_resync`` once a new subscription exists, or when refused filters came back.
        """
        if not keep_state:
            self._set_state(WsState.SUBSCRIBING, "")
        delays = self._delays()
        while True:
            filters = list(self._filters) if retry else self._wanted_filters()
            existing = self._wsg.subscription_id if survived else None
            if not filters:
                self._set_state(
                    WsState.SUBSCRIBING, f"refused ({self._refusal_reasons()}); extensions polled"
                )
                return
            if existing is not None and filters == self._subscribed_filters:
                self._up()  # e.g. a PUT refused: the subscription stands as it was
                if self._deaf:
                    self._resync()
                return
            mid = self._message_id()
            if existing is not None:
                text = wsg.encode_update(mid, existing, filters)
            else:
                self._subscribe_ids.add(mid)
                text = wsg.encode_subscribe(mid, filters)
            reply = await self._request(ws, mid, text)
            if reply.ok:
                if existing is None:
                    self._wsg.subscription_id = wsg.subscription_id_of(reply)
                refused = self._match_disabled(filters, wsg.disabled_filters_of(reply))
                self._subscribed_filters = [f for f in filters if f not in refused]
                regained = self._settle_refusals(filters, refused)
                log.info(
                    "ws.subscribed",
                    method="PUT" if existing else "POST",
                    filters=len(self._subscribed_filters),
                    refused=len(refused),
                )
                self._up()
                if existing is None or self._deaf or regained:
                    self._resync()
                return
            if reply.status == 403:
                # Permanent until someone changes a permission: never asked again in a tight loop.
                refused = self._refused_by(filters, reply.error_code or str(reply.status))
                self._settle_refusals(filters, refused)
                log.warning(
                    "ws.subscribe_refused", status=reply.status, code=reply.error_code, filters=len(refused)
                )
                retry = False
                continue  # the rest at once; a refused PUT leaves the subscription as it was
            retry_after = parse_retry_after(reply.headers.get("Retry-After")) if reply.status == 429 else None
            delay = max(next(delays), retry_after or 0.0)
            log.warning(
                "ws.subscribe_failed", status=reply.status, code=reply.error_code, retry_in=round(delay, 2)
            )
            survived = False  # a failed PUT (e.g. SUB-507) falls back to a new POST
            self._set_state(WsState.SUBSCRIBING, f"subscription refused ({reply.error_code or reply.status})")
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ refused filters

    @property
    def refused_extensions(self) -> dict[str, str]:
        """Extensions with an event filter RingCentral refused, and why (an error code or the
        ``disabledFilters`` reason). They get no push; the daemon's polls keep them tracked."""
        out: dict[str, str] = {}
        for flt in self._filters:
            reason = self._refused.get(flt)
            key = wsg.filter_key(flt, self._rc.owner_id)
            if reason is not None and key is not None:
                out.setdefault(key[0], reason)
        return out

    def _wanted_filters(self) -> list[str]:
        return [f for f in self._filters if f not in self._refused]

    def _refusal_reasons(self) -> str:
        return ", ".join(sorted(set(self.refused_extensions.values()))) or "none"

    def _match_disabled(self, asked: Sequence[str], disabled: Sequence[wsg.DisabledFilter]) -> dict[str, str]:
        """Which of ``asked`` a reply's ``disabledFilters`` name (the server may spell them its way)."""
        owner = self._rc.owner_id
        by_key = {wsg.filter_key(f, owner): f for f in asked}
        refused: dict[str, str] = {}
        for item in disabled:
            flt = item.filter if item.filter in asked else by_key.get(wsg.filter_key(item.filter, owner))
            if flt is not None:
                refused[flt] = item.reason or "disabled"
        return refused

    def _refused_by(self, asked: Sequence[str], code: str) -> dict[str, str]:
        """The filters a 403 refuses: SUB-405 names other extensions, so the user's own stay."""
        owner = self._rc.owner_id
        if code == "SUB-405" and owner is not None:
            others = [f for f in asked if (wsg.filter_key(f, owner) or ("",))[0] != owner]
            if 0 < len(others) < len(asked):
                return dict.fromkeys(others, code)
        return dict.fromkeys(asked, code)

    def _settle_refusals(self, asked: Sequence[str], refused: Mapping[str, str]) -> bool:
        """Record what a reply accepted and refused; True when refused filters came back."""
        before = self.refused_extensions
        regained = [f for f in asked if f not in refused and f in self._refused]
        for flt in regained:
            del self._refused[flt]
        self._refused.update(refused)
        after = self.refused_extensions
        for ext, reason in after.items():
            if ext not in before:  # once per extension, until it is accepted again
                log.warning(
                    "ws.push_refused",
                    extension=ext,
                    reason=reason,
                    detail="RingCentral refused this extension's event filters; it is tracked by polling",
                )
        for ext in before.keys() - after.keys():
            log.info("ws.push_accepted", extension=ext)
        self._metrics.ws_disabled_filters.set(sum(1 for f in self._filters if f in self._refused))
        loop = asyncio.get_running_loop()
        if not self._refused:
            self._retry_refused_at = None
            self._refusal_backoff = self._refusal_delays()
        elif refused and (self._retry_refused_at is None or self._retry_refused_at <= loop.time()):
            self._retry_refused_at = loop.time() + next(self._refusal_backoff)
        self._refusal_scheduled.set()
        return bool(regained)

    async def _retry_refused(self, ws: ClientConnection) -> None:
        """Ask again for the refused filters when their (long) backoff is due; for this connection."""
        loop = asyncio.get_running_loop()
        while True:
            self._refusal_scheduled.clear()
            at = self._retry_refused_at
            if at is None and self._refused:
                # An attempt that ended with its connection asked for nothing: schedule the next.
                self._retry_refused_at = loop.time() + next(self._refusal_backoff)
                continue
            if at is None:
                await self._refusal_scheduled.wait()
                continue
            if loop.time() < at:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(at - loop.time()):
                        await self._refusal_scheduled.wait()  # rescheduled or no longer needed
                continue
            async with self._filter_lock:
                if self._retry_refused_at != at:
                    continue
                self._retry_refused_at = None  # the attempt schedules the next one if refused again
                log.info("ws.refusal_retry", filters=len(self._refused))
                await self._subscribe(
                    ws, survived=self._wsg.subscription_id is not None, retry=True, keep_state=True
                )

    def update_settings(self, settings: WsSettings) -> None:
        """New timings; they apply from the next connection."""
        self._settings = settings

    async def update_filters(self, filters: Sequence[str]) -> None:
        """Change the event filters: a PUT on the live subscription, else used at the next subscribe."""
        async with self._filter_lock:
            self._filters = list(filters)
            for flt in [f for f in self._refused if f not in self._filters]:
                del self._refused[flt]
            self._metrics.ws_disabled_filters.set(sum(1 for f in self._filters if f in self._refused))
            ws, sub = self._ws, self._wsg.subscription_id
            wanted = self._wanted_filters()
            if (
                ws is None
                or sub is None
                or self._state is not WsState.UP
                or self._subscribed_filters == wanted
            ):
                return
            # A refused PUT, or a subscription gone, is handled as at any subscribe; a connection
            # lost meanwhile subscribes with the new filters next time.
            with contextlib.suppress(_Closed, ConnectionClosed):
                await self._subscribe(ws, survived=True, keep_state=True)

    async def _request(self, ws: ClientConnection, mid: str, text: str) -> wsg.ClientResponse:
        future: asyncio.Future[wsg.ClientResponse] = asyncio.get_running_loop().create_future()
        self._pending[mid] = future
        try:
            await ws.send(text)
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await future
        except TimeoutError:
            raise _Closed("reply_timeout") from None
        finally:
            self._pending.pop(mid, None)
            self._subscribe_ids.discard(mid)

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_Closed("closed"))
        self._pending.clear()

    # ------------------------------------------------------------------ liveness

    async def _keepalive(self, ws: ClientConnection) -> None:
        """Ping every ``ping_interval``; the connection is dead once the oldest ping still without a
        pong has waited longer than the path's timeout.

        Pings do not wait for each other: a pong answers its own ping and every earlier one (RFC 6455
        lets a peer answer only the latest), so one lost pong is forgotten as soon as the next pong
        comes, and a slow pong does not hold the next ping back. Returns when the connection closes
        for another reason (the reader says why); raises :class:`_Closed` ("ping_timeout") after
        aborting the socket, because a dead path would not answer a close handshake either.
        """
        loop = asyncio.get_running_loop()
        s = self._settings
        pings: deque[tuple[float, asyncio.Future[float]]] = deque()  # (sent, pong), oldest first
        next_ping = loop.time()
        try:
            while True:
                while pings and pings[0][1].done():
                    # The latency of a ping answered by a later pong (its own was lost) is that
                    # longer wait: an upper bound, which only makes the estimate more cautious.
                    rtt = pings.popleft()[1].result()  # ConnectionClosed when the socket closed
                    self._roundtrip.observe(rtt)
                    self._metrics.ws_ping_rtt.observe(rtt)
                now = loop.time()
                if now >= next_ping:
                    pings.append((now, asyncio.ensure_future(await ws.ping())))
                    next_ping = max(next_ping + s.ping_interval, now)
                    continue
                timeout = self._roundtrip.timeout(s.ping_timeout_min, s.ping_timeout)
                self._metrics.ws_ping_timeout.set(timeout)
                if not pings:
                    await asyncio.sleep(next_ping - now)
                    continue
                sent, oldest = pings[0]
                deadline = sent + timeout
                if now < deadline:
                    # A pong read in the loop turn this wait times out in (faxd's own loop was
                    # busy) is seen at the top of the loop: the path is alive, only late.
                    await asyncio.wait([oldest], timeout=min(next_ping, deadline) - now)
                    continue
                # A replacement needs a ws token from the Auth group (5 a minute). While none can
                # be had, cutting a connection that may only be slow would leave us with nothing:
                # the pong may take as long as a replacement would (up to the ceiling).
                grace = min(self._rc.ws_token_wait(), s.ping_timeout - timeout)
                if await _answered(oldest, grace):
                    continue
                log.warning(
                    "ws.ping_timeout",
                    waited=round(loop.time() - sent, 3),
                    unanswered=len(pings),
                    srtt=self._roundtrip.srtt,
                )
                self._roundtrip.timed_out()
                self._deaf = True
                ws.transport.abort()
                raise _Closed("ping_timeout")
        except ConnectionClosed:
            return

    # ------------------------------------------------------------------ reading

    async def _read(self, ws: ClientConnection) -> str:
        """Read frames until the connection ends; returns why it ended.

        After ``heartbeat_interval`` without a frame a Heartbeat goes out, so that the gateway's idle
        timeout never ends a quiet session. Its reply is not waited for (no official SDK does, and
        the gateway need not send one): whether the path is alive is the pings' question.
        """
        try:
            while True:
                try:
                    async with asyncio.timeout(self._settings.heartbeat_interval):
                        data = await ws.recv()
                except TimeoutError:
                    await ws.send(wsg.encode_heartbeat(self._message_id()))
                    continue
                self._metrics.ws_last_message.set(time.time())
                reason = self._handle(self._parse(data))
                if reason is not None:
                    await ws.close(code=1000, reason=reason)
                    return reason
        except ConnectionClosed as exc:
            return _close_reason(exc)
        finally:
            self._fail_pending()

    def _parse(self, data: str | bytes) -> wsg.Frame | None:
        try:
            frame = wsg.parse_frame(data, max_bytes=self._settings.max_message_bytes)
        except wsg.FrameError as exc:
            self._bad_frame(exc, size=len(data))
            return None
        self._wsg.frame(frame)
        return frame

    def _bad_frame(self, exc: wsg.FrameError, *, size: int | None = None) -> None:
        self._metrics.ws_bad_frames.labels(exc.reason).inc()
        log.warning("ws.bad_frame", reason=exc.reason, detail=redact(exc.detail)[:100], size=size)

    def _handle(self, frame: wsg.Frame | None) -> str | None:
        """Act on one frame; a returned string ends the connection with that reason."""
        if isinstance(frame, wsg.ClientResponse):
            future = self._pending.get(frame.message_id)
            if future is None or future.done():
                log.info("ws.unexpected_reply", status=frame.status)
                return None
            if frame.ok and frame.message_id in self._subscribe_ids:
                # Record the id before any notification of the new subscription is read.
                try:
                    self._wsg.subscription_id = wsg.subscription_id_of(frame)
                except wsg.FrameError as exc:
                    self._bad_frame(exc)
                    frame = wsg.ClientResponse(frame.message_id, 599, frame.headers, frame.body)
            future.set_result(frame)
        elif isinstance(frame, wsg.Notification):
            self._notification(frame)
        elif isinstance(frame, wsg.ErrorFrame):
            log.warning("ws.error_frame", code=frame.error_code, message=frame.message)
            if frame.error_code in RECONNECT_CODES:
                return (frame.error_code or "error").lower().replace("-", "_")
        elif isinstance(frame, wsg.ConnectionDetails):
            log.info("ws.late_connection_details")
        return None

    def _notification(self, n: wsg.Notification) -> None:
        current = self._wsg.subscription_id
        if current is None or n.subscription_id != current:
            self._bad_frame(wsg.FrameError("foreign_subscription"))
            return
        try:
            hint = wsg.extract_hint(n)
        except wsg.FrameError as exc:
            self._bad_frame(exc)
            return
        self._metrics.ws_hints.inc()
        try:
            self._on_hint(hint)
        except Exception as exc:  # noqa: BLE001 - a consumer bug must not close the session
            log.error("ws.on_hint_failed", error=repr(exc))

    # ------------------------------------------------------------------ helpers

    def _resync(self) -> None:
        log.info("ws.resync")
        self._deaf = False
        try:
            self._on_resync()
        except Exception as exc:  # noqa: BLE001 - a consumer bug must not close the session
            log.error("ws.on_resync_failed", error=repr(exc))

    def _set_state(self, state: WsState, detail: str) -> None:
        if (state, detail) == (self._state, self._detail):
            return
        self._state, self._detail = state, detail
        text = f"{state}: {detail}" if detail else state
        self._metrics.ws_state.state(state)
        if self._on_state is not None:
            try:
                self._on_state(f"WebSocket {text}")
            except Exception as exc:  # noqa: BLE001 - status reporting is best effort
                log.error("ws.on_state_failed", error=repr(exc))

    @staticmethod
    def _message_id() -> str:
        return str(uuid.uuid4())


async def _answered(pong: asyncio.Future[float], grace: float) -> bool:
    """Whether a pong whose wait timed out comes after all (within ``grace`` more seconds)."""
    if not pong.done() and grace > 0:
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(grace):
                await asyncio.shield(pong)
    return pong.done() and not pong.cancelled() and pong.exception() is None


def _close_reason(exc: ConnectionClosed) -> str:
    if exc.rcvd is not None:
        return "closed" if exc.rcvd.code in (1000, 1001) else "closed_abnormal"
    if exc.sent is not None and exc.sent.code == 1009:
        return "too_large"
    return "connection_lost"


_EXCEPTION_NAME = re.compile(r"^[A-Za-z]*(Error|Exception|Timeout)$")


@dataclass(frozen=True)
class Disconnect:
    """Why a connection ended (or never started)."""

    #: What the log and STATUS= say: ``handshake 503``, ``api OAU-213``, ``ConnectionRefusedError``, ...
    reason: str
    #: Its bounded ``faxd_ws_disconnects_total`` label, one of :data:`WS_DISCONNECT_REASONS`.
    label: str


def classify(ended: Exception) -> Disconnect:
    """Why a connection ended, from what ended it: an exception of the connect, the subscribe or the
    connection, or :class:`_Closed` with the reason the connection gave. Pure; tests/test_ws_session.py
    has its table."""
    match ended:
        case RateLimited():
            return Disconnect("rate_limited", "rate_limited")
        case ApiError(code=code, status=status):
            return Disconnect(f"api {code or status}", "api_error")
        case _Closed(reason=reason):
            return Disconnect(reason, reason if reason in WS_DISCONNECT_REASONS else "other")
        case InvalidStatus():
            return Disconnect(f"handshake {ended.response.status_code}", "handshake")
        case InvalidProxyStatus():
            return Disconnect(f"proxy {ended.response.status_code}", "other")
        case WsProxyError():
            return Disconnect("proxy_bad_reply", "other")
        case ProxyError():
            return Disconnect("proxy_unusable", "other")
        case OSError() | TimeoutError() | WebSocketException():
            name = type(ended).__name__
            return Disconnect(name, "network" if _EXCEPTION_NAME.match(name) else "other")
    return Disconnect("internal", "internal")
