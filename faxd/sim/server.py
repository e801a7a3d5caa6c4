"""The :class:`Simulator`: wires the state, the REST app, the WSG and the control API together.

Runs a real aiohttp server on loopback. Everything time-based runs on the running event
loop (timers owned here, cancelled in :meth:`Simulator.stop`), so tests can use ``looptime``;
wall-clock timestamps come from the injectable ``wall_clock``.

Each fault is one method here, marked with :func:`~faxd.sim.control.fault`: the mark makes it an
endpoint of the control API too. The fault's mechanics belong in the part it disturbs (the gateway,
the REST app, the store, the token store); this module must not grow protocol logic.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from aiohttp import web

from faxd.sim.auth import TokenStore
from faxd.sim.common import RecordedRequest, Timers, default_wall_clock
from faxd.sim.config import RecipientScript, SimConfig
from faxd.sim.control import PREFIX, arg, control_app, fault, optional, seconds_or_text, string_list, text
from faxd.sim.events import NotificationHub
from faxd.sim.observe import Observer, ObserverSet
from faxd.sim.ratelimit import RateLimiter
from faxd.sim.rest import RestApi
from faxd.sim.store import Change, MessageStore
from faxd.sim.wsg import RECOVERY_EXPIRED, Gateway


class _RequestLog(list[RecordedRequest]):
    """The request log; every append wakes :meth:`Simulator.wait_for` so tests can await requests."""

    def __init__(self, on_append: Callable[[], None]) -> None:
        super().__init__()
        self._on_append = on_append

    def append(self, item: RecordedRequest) -> None:
        super().append(item)
        self._on_append()


class Simulator:
    """A RingCentral look-alike on ``127.0.0.1`` (see docs/simulator.md)."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        wall_clock: Callable[[], datetime] | None = None,
        response_observer: Observer | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config or SimConfig()
        #: Serve HTTPS and WSS with this context (tests of faxd's TLS verification); None: plain HTTP.
        self.ssl_context = ssl_context
        #: Who sees every JSON body served (``response_observer`` + the global observers).
        self.observers = ObserverSet(response_observer)
        self.host = host
        self.port = port
        self.url = ""
        self.requests: list[RecordedRequest] = _RequestLog(self._wake)
        self._wall = wall_clock or default_wall_clock
        self.timers = Timers()
        self.tokens = TokenStore(self.config, self.timers.now, self._wall)
        self.limiter = RateLimiter(
            self.config.rate_limits, self.timers.now, enabled=self.config.rate_limits_enabled
        )
        self.hub = NotificationHub(self._deliver)
        self.store = MessageStore(self.config, self.timers, self._wall, self._on_change)
        self.gateway = Gateway(
            self.config,
            self.tokens,
            self.store,
            self.limiter,
            self.timers,
            self._wall,
            self._record_ws,
            self.observers,
        )
        self.rest = RestApi(
            self.config,
            self.tokens,
            self.store,
            self.limiter,
            self.timers,
            self._wall,
            self.requests,
            lambda: self.ws_url,
            self.gateway.handle,
            self.observers,
        )
        self._runner: web.AppRunner | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self.rest.middleware])
        self.rest.add_routes(app)
        app.add_subapp(PREFIX, control_app(self))
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self._runner = runner
        sockets = [s for srv in runner.sites for s in getattr(getattr(srv, "_server", None), "sockets", ())]
        port = sockets[0].getsockname()[1] if sockets else self.port
        self.port = port
        host = self.host if ":" not in self.host else f"[{self.host}]"
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{host}:{port}"
        self.store.base_url = self.url
        self.gateway.base_url = self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        self.hub.cancel()
        for fut in self._waiters:
            fut.cancel()
        await self.gateway.stop()
        self.timers.cancel_all()
        if runner is not None:
            await runner.cleanup()
        self.timers.cancel_all()  # anything armed while the handlers wound down

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- internals -------------------------------------------------------------------------
    def _on_change(self, change: Change) -> None:
        if self.gateway.paused:
            # Paused: the change happens but is never announced, even if notifications are
            # resumed within the same loop turn; waiters still see it.
            asyncio.get_running_loop().call_soon(self._wake)
        else:
            self.hub.on_change(change)

    def _deliver(self, changes: list[Change]) -> None:
        self.gateway.deliver(changes)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked after every store change and recorded request.

        Event-driven (no polling); bound it with ``asyncio.timeout`` in the caller.
        """
        while not predicate():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)

    async def wait_for_status(self, message_id: str, status: str) -> dict[str, Any]:
        """Wait until the message's aggregate ``messageStatus`` is ``status``; return it."""
        await self.wait_for(lambda: self.message(message_id)["messageStatus"] == status)
        return self.message(message_id)

    def _record_ws(
        self, method: str, path: str, group: str | None, status: int, transport: str, raw: str
    ) -> None:
        self.requests.append(RecordedRequest(method, path, group, status, self.timers.now(), transport, raw))

    # -- scripting -------------------------------------------------------------------------
    def create_outbound_fax(
        self,
        extension_id: str | None,
        recipients: Sequence[RecipientScript],
        *,
        pages: int = 1,
    ) -> str:
        """An outbound fax sent "from another app"; announced like RingCentral would."""
        ext = self.store.resolve_extension(extension_id)
        message = self.store.create_outbound(ext, list(recipients), pages=pages)
        return str(message.id)

    def create_inbound_fax(self, extension_id: str | None, from_phone: str, *, pages: int = 1) -> str:
        """A fax received by the extension (status ``Received``)."""
        ext = self.store.resolve_extension(extension_id)
        return str(self.store.create_inbound(ext, from_phone, pages=pages).id)

    def set_outcome(self, phone: str, script: RecipientScript) -> None:
        """Script what happens to faxes later sent through ``POST …/fax`` to ``phone``."""
        self.store.set_outcome(phone, script)

    def message(self, message_id: str) -> dict[str, Any]:
        """Ground truth: the record as the API would return it. KeyError if unknown."""
        found = self.store.messages[int(message_id)]
        result: dict[str, Any] = json.loads(json.dumps(self.store.record(found)))
        return result

    def messages(self) -> list[dict[str, Any]]:
        return [self.message(str(mid)) for mid in sorted(self.store.messages)]

    def requests_to(self, path_suffix: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose route template ends with ``path_suffix``."""
        return [
            r
            for r in self.requests
            if r.path.endswith(path_suffix) and (method is None or r.method == method)
        ]

    # -- faults (each also POST /_sim/faults/NAME: see faxd.sim.control.fault) --------------
    @fault("drop-ws", result="dropped")
    def drop_ws(self) -> int:
        """Abort every WebSocket (network failure). Sessions stay recoverable."""
        return self.gateway.drop_all()

    @fault("pause-notifications")
    def pause_notifications(self) -> None:
        """Changes keep happening, but no notification is sent (nor buffered).

        Changes made before the call (still being coalesced) are announced first.
        """
        self.hub.flush()
        self.gateway.paused = True

    @fault("delay-notifications", seconds=arg(float, 5))
    def delay_notifications(self, seconds: float) -> None:
        """Hold every notification ``seconds`` before it is sent (0 ends the fault)."""
        self.gateway.notification_delay = max(0.0, seconds)

    @fault("duplicate-notifications", copies=arg(int, 2))
    def duplicate_notifications(self, copies: int) -> None:
        """Send every notification ``copies`` times (1 ends the fault)."""
        self.gateway.notification_copies = max(1, copies)

    @fault("resume-notifications")
    def resume_notifications(self) -> None:
        self.gateway.paused = False

    @fault("expire-tokens", result="expired")
    def expire_access_tokens(self) -> int:
        """Every access token issued so far is expired now (OAU-128); refresh still works."""
        return self.tokens.expire_access_tokens()

    @fault("stale-sync-tokens", result="staled", code=arg(str))
    def stale_sync_tokens(self, code: str = "MSG-333") -> int:
        """Every sync token issued so far now gets 400 ``code``: ``MSG-333`` (full synchronization is
        required) or ``CMN-101`` ("Parameter [syncToken] value is invalid")."""
        return self.store.stale_sync_tokens(code)

    @fault("fail-next-recovery", code=arg(str))
    def fail_next_recovery(self, code: str = RECOVERY_EXPIRED) -> None:
        """The next ``wsc`` reconnect gets ``recoveryState: Failed`` with ``code``."""
        self.gateway.fail_next_recovery(code)

    @fault(
        "fail-requests",
        count=arg(int, 1),
        status=arg(int),
        html=arg(bool),
        match=arg(optional(str)),
        retry_after=arg(seconds_or_text),
    )
    def fail_next_requests(
        self,
        count: int,
        *,
        status: int = 503,
        html: bool = False,
        match: str | None = None,
        retry_after: str | float | None = "1",
    ) -> None:
        """Answer the next ``count`` REST requests with ``status`` (JSON CMN-201 or HTML); with
        ``match``, only requests whose path and query contain it (``"syncType=FSync"``).

        ``retry_after`` is their ``Retry-After`` header: seconds, or a string sent as it is (an
        HTTP-date); None sends none. RingCentral's 503s carry one (its errors doc; /oauth/token)."""
        self.rest.faults.fail_next = count
        self.rest.faults.fail_status = status
        self.rest.faults.fail_html = html
        self.rest.faults.fail_match = match
        if isinstance(retry_after, int | float):
            retry_after = f"{retry_after:g}"
        self.rest.faults.fail_retry_after = retry_after

    @fault("delay-requests", count=arg(int, 1), seconds=arg(float, 5), match=arg(optional(str)))
    def delay_next_requests(self, count: int, seconds: float, *, match: str | None = None) -> None:
        """Hold each of the next ``count`` REST requests for ``seconds`` (loop time); with ``match``,
        only requests whose path and query contain it (``"/content/"``: document downloads)."""
        self.rest.faults.delay_next = count
        self.rest.faults.delay_seconds = seconds
        self.rest.faults.delay_match = match

    @fault("rate-limit-storm", group=arg(text), seconds=arg(float, 60))
    def rate_limit_storm(self, group: str, seconds: float) -> None:
        """Answer every request of throttling ``group`` with 429 for ``seconds``."""
        if group not in self.config.rate_limits:
            raise ValueError(f"'group' must be one of {sorted(self.config.rate_limits)}")
        self.limiter.storm(group, seconds)

    @fault("remove-extension", extension_id=arg(text), restore=arg(bool))
    def remove_extension(self, extension_id: str, *, restore: bool = False) -> None:
        """The extension is deleted from the account (``restore``: it is back): every REST request
        naming it, its messages included, gets 404 ``CMN-102`` "Resource for parameter
        [extensionId] is not found" (what RingCentral answers for an unknown extension id)."""
        ext = self.store.resolve_extension(extension_id)
        if restore:
            self.rest.removed_extensions.discard(ext)
        else:
            self.rest.removed_extensions.add(ext)

    @fault("bulk-get", mode=arg(str, "shuffle"), count=arg(int))
    def bulk_get_fault(self, mode: str, count: int = 1) -> None:
        """The next ``count`` bulk GETs (207) answer out of step: ``shuffle`` (the records come in
        another order than the status entries that name them) or ``unasked`` (the last id is answered
        with a message that was not asked). RingCentral's batch-request guide documents the status
        entries and the parts, not an order a client could file records by: a record carries its
        own id, an error part only its place next to its status entry."""
        if mode not in ("shuffle", "unasked"):
            raise ValueError("mode must be 'shuffle' or 'unasked'")
        self.rest.faults.bulk_mode = mode
        self.rest.faults.bulk_next = count

    @fault("rate-limit-group", method=arg(text), path_suffix=arg(text, key="path"), group=arg(text))
    def set_rate_limit_group(self, method: str, path_suffix: str, group: str) -> None:
        """Count ``method`` requests whose route template ends with ``path_suffix`` in throttling
        ``group`` (limits and the ``X-Rate-Limit-Group`` header), not in the spec's group.

        RingCentral's rate-limit doc: group names and assignments may change and limits can be
        customised per app; the header says which group a response was counted in."""
        if group not in self.config.rate_limits:
            raise ValueError(f"group must be one of {sorted(self.config.rate_limits)}")
        self.rest.group_overrides.append((method.upper(), path_suffix, group))

    @fault("blackhole-ws", result="blackholed")
    def blackhole_ws(self) -> int:
        """Open sockets go silent (no frames, no pongs, no replies) without closing."""
        return self.gateway.blackhole_all()

    @fault("delay-pongs", low=arg(float, 0, key="min"), high=arg(float, 0, key="max"))
    def delay_pongs(self, low: float, high: float) -> None:
        """Every pong goes out a random ``low``..``high`` seconds late (in order, delays
        overlapping), like a slow or jittery path; ``delay_pongs(0, 0)`` ends it."""
        self.gateway.delay_pongs(low, high)

    @fault("refuse-subscriptions", how=arg(str, "disabled"), extensions=arg(string_list, []))
    def refuse_subscriptions(self, how: str, extensions: Sequence[str] = ()) -> None:
        """Refuse subscription filters like RingCentral does for a user without the rights:
        ``disabled`` (200 with ``disabledFilters`` for ``extensions``), ``forbidden`` (403 SUB-405 for
        a request naming one of them), ``permission`` (403 SUB-528 for every request), ``off``."""
        self.gateway.refuse_subscriptions(how, extensions)

    @fault("refuse-ws-upgrades", seconds=arg(float, 5), status=arg(int, 503))
    def refuse_ws_upgrades(self, seconds: float, status: int = 503) -> None:
        """Answer every WebSocket upgrade (``GET /ws``) with HTTP ``status`` for ``seconds``, before
        looking at its ws token (a gateway overloaded or in maintenance); 0 ends it."""
        self.gateway.refuse_upgrades(seconds, status)

    @fault("expire-ws-tokens", result="expired")
    def expire_ws_tokens(self) -> int:
        """Every ws token issued so far is expired now: the gateway refuses it (WSG-401)."""
        return self.tokens.expire_ws_tokens()

    @fault("wan-path", on=arg(bool, True))
    def wan_path(self, on: bool = True) -> None:
        """Pongs come back like over a real WAN path (see ``faxd.sim.wsg.wan_pong_delay``): mostly
        tens of ms, some hundreds, rare 1-3 s spikes, now and then none; ``wan_path(False)`` ends it.
        Takes precedence over ``delay_pongs``."""
        self.gateway.wan_path = on

    @fault("ignore-heartbeats", ignore=arg(bool, True, key="on"))
    def ignore_heartbeats(self, ignore: bool = True) -> None:
        """Leave client Heartbeats unanswered (they still re-arm the idle timer); False ends it."""
        self.gateway.answer_heartbeats = not ignore

    @fault("malformed-frame", result="sent", kind=arg(str), size=arg(int))
    def send_malformed_frame(self, kind: str = "malformed", *, size: int = 5 * 1024 * 1024) -> int:
        """Send a broken frame on every socket: ``malformed`` (not a JSON array),
        ``oversize`` (a ``size``-byte frame, above the usual client limits)."""
        if kind == "malformed":
            text = '{"type":"ServerNotification", this is not json'
        elif kind == "oversize":
            filler = "x" * max(0, size - 64)
            text = json.dumps([{"type": "ServerNotification", "padding": filler}])
        else:
            raise ValueError("kind must be 'malformed' or 'oversize'")
        return self.gateway.send_raw_all(text)

    @fault("skew-date", seconds=arg(float, 0))
    def skew_date(self, seconds: float) -> None:
        """The ``Date`` header of every REST response is ``seconds`` off the simulator's clock
        (a server, or a local clock, that is wrong); 0 ends it."""
        self.rest.faults.date_skew = seconds

    @fault("token-scope", scope=arg(text))
    def set_token_scope(self, scope: str) -> None:
        """Token replies carry this ``scope`` (the app's permissions, space-separated)."""
        self.tokens.scope = scope

    @fault("deny-message-reads", extension_ids=arg(string_list, []))
    def deny_message_reads(self, extension_ids: Sequence[str]) -> None:
        """GETs of these extensions' message store and message-sync answer 403 ``CMN-408``
        (the JWT user lacks the ReadMessages permission for them); ``[]`` ends it."""
        self.rest.faults.unreadable = frozenset(self.store.resolve_extension(e) for e in extension_ids)

    @fault(
        "foreign-notification",
        result="id",
        message_type=arg(str, key="type"),
        extension_id=arg(optional(str)),
    )
    def send_foreign_notification(self, message_type: str = "SMS", extension_id: str | None = None) -> str:
        """An inbound SMS arrives and its notification goes to every subscription,
        whatever its filters say (type filter not honoured)."""
        ext = self.store.resolve_extension(extension_id)
        if message_type != "SMS":
            raise ValueError("only SMS is supported")
        message = self.store.create_sms(ext, "+16505550199", "Hello from the simulator")
        self.gateway.push_foreign(message)
        return str(message.id)
