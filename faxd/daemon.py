"""The supervisor: opens the daemon's services from a :class:`Config`, runs them, and stops them in order.

Start-up (:func:`_run`): each service is opened on an exit stack, whose clean-ups unwind in reverse:
  sockets inherited from systemd → store → HTTP session and RingCentral client → the reconcile
  :class:`Engine` (reconciler + request scheduler and its driver) → event socket (inherited when
  socket-activated, else bound) → /metrics → READY=1 (without waiting for RingCentral: local clients
  can replay the journal while RingCentral is unreachable).
Then two task groups (:func:`_supervise`): the consumers (the request driver, the watchdog) outside,
the producers (the :class:`Upstream`: login, WebSocket session, settle and retention timers; the
:class:`Reloader`) inside. :class:`Status` owns the STATUS= line, /readyz and the gauges derived from
the daemon's memory; the watchdog sends WATCHDOG=1 at half ``$WATCHDOG_USEC`` and refreshes STATUS=.
The outlets (hooks and webhooks, faxd.adapters.outlets) open after the event socket and run among
the consumers, so they deliver what the drain still journals.
Reload (SIGHUP): RELOADING=1 → the config file is read again → :func:`faxd.config.merge_reload` keeps
the old value of every changed key not marked ``reload=True`` and names it → each reloadable part gets
``apply(old, new)`` and changes only what it owns (log settings; scheduler timings; the WS filters and
settings, poll intervals and rate share) → READY=1. A bad file keeps the running config.
Stop (SIGTERM/SIGINT): STOPPING=1 → producers cancelled → the request scheduler is closed and drains
what may go at once, within ``DRAIN_DEADLINE``; no request that would have to wait for the rate budget
is started (its waiters get :class:`faxd.adapters.rest.Stopping`; keys are redone at start-up) →
clients get ``bye`` → services closed in reverse order → exit 0, within 5 s of the signal.
A crash of any task cancels the rest and exits 1 (systemd restarts us); every exception of the group
is logged once. RingCentral refusing the credentials, a bad proxy or socket setting exit 78.
This module must not contain protocol or fax logic; it only wires and supervises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from faxd import __version__
from faxd.adapters.documents import Documents, DocumentSettings
from faxd.adapters.event_server import EventServer, EventServerSettings, SocketSetupError
from faxd.adapters.metrics import Metrics, add_process_collectors, metrics_app
from faxd.adapters.notify import Notifier, listen_fds
from faxd.adapters.outlets import Outlets
from faxd.adapters.reconcile import Reconciler, ReconcileSettings, ReconcileWork, timers_forever
from faxd.adapters.resend import Resender
from faxd.adapters.rest import ApiError, AuthFailed, Document, RingCentral
from faxd.adapters.scheduling import RequestDriver
from faxd.adapters.store import Store
from faxd.adapters.ws_session import WsSession, WsSettings
from faxd.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    EventsConfig,
    MetricsConfig,
    ProxySetting,
    RingCentralConfig,
    load_config,
    merge_reload,
    outlet_settings,
    split_host_port,
)
from faxd.core import proxy
from faxd.core.backoff import backoff
from faxd.core.model import DocumentRef, Event, FaxState
from faxd.core.polls import PollKind
from faxd.core.protocol import FetchError, PageKey, QueryRequest, SendError, SendRequest, StoredEvent
from faxd.core.ratebudget import HEAVY
from faxd.core.resend import RetryPolicy
from faxd.core.scheduler import Key, Priority, Scheduler, SchedulerSettings, Work, ext_key
from faxd.core.status import parse_time
from faxd.core.wsg import Hint, WsState, event_filters
from faxd.logs import configure_logging

log = structlog.get_logger(__name__)

#: Seconds the request scheduler may take to finish on stop. The whole stop (drain, ``bye`` to clients, token
#: revoke of at most 1 s) must stay within 5 s; systemd's TimeoutStopSec (15 s) is a backstop only.
DRAIN_DEADLINE = 2.5
CONNECT_WAIT = 30.0  # how long a send or sync request waits for the first RingCentral login
FETCH_WAIT = 60.0  # how long `faxd fetch` waits for its download before telling the client it is queued
EX_CREDENTIALS = 78  # RingCentral refused our credentials: a restart would not help


class FatalError(Exception):
    """faxd cannot run: logged once, told to systemd (STATUS=, EXIT_STATUS=), exits ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _credentials_refused(exc: AuthFailed) -> FatalError:
    """RingCentral refused the credentials (at login or mid-run): a restart would not help."""
    return FatalError(f"RingCentral refused the credentials ({exc.code}): {exc.message}", EX_CREDENTIALS)


class _Stop(Exception):
    """Raised inside a task group to end it in an orderly way."""


class _Restart(Exception):
    """Ends a task group so that its tasks start again with new settings."""


async def _until(event: asyncio.Event, exc: type[Exception] = _Stop) -> NoReturn:
    await event.wait()
    raise exc


def _flatten(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_flatten(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


# -- settings of the adapters, from the config ----------------------------------------------------------


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """The one verified TLS context for REST and WS: system trust, or only ``ca_file`` when given."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def http_session(rc_cfg: RingCentralConfig, tls: ssl.SSLContext) -> aiohttp.ClientSession:
    """The HTTP session of every RingCentral REST call, the daemon's and ``faxd doctor``'s alike, so
    that how faxd reaches RingCentral (TLS, proxy, headers) is decided in one place; connection
    settings of ``rc_cfg`` beyond TLS (a proxy) belong here."""
    connector = aiohttp.TCPConnector(ssl=tls)
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": f"faxd/{__version__}"})


def proxy_policy(setting: ProxySetting | None, environ: Mapping[str, str]) -> proxy.ProxyPolicy:
    """``ringcentral.proxy`` if set (``none``: no proxy at all), else the environment's, as curl reads it."""
    if setting is None:
        return proxy.policy(None, environ, use_environment=True)
    return proxy.policy(setting.proxy, environ, use_environment=False)


def _reconcile_settings(config: Config) -> ReconcileSettings:
    rec = config.reconcile
    return ReconcileSettings(
        debounce=rec.debounce,
        max_delay=rec.max_delay,
        poll_interval=rec.poll_interval,
        active_poll_interval=rec.active_poll_interval,
        stall_after=rec.stall_after,
        sent_settle=rec.sent_settle,
        retention_days=config.store.retention_days,
    )


def _scheduler_settings(config: Config, missing_extension_retry: float) -> SchedulerSettings:
    rec = config.reconcile
    return SchedulerSettings(
        debounce=rec.debounce,
        max_delay=rec.max_delay,
        poll_interval=rec.poll_interval,
        active_poll_interval=rec.active_poll_interval,
        # A missing extension is retried this often (its Retry-After, as the scheduler sees it).
        retry_after_cap=max(SchedulerSettings.retry_after_cap, missing_extension_retry),
    )


def ws_settings(config: Config) -> WsSettings:
    """The WebSocket settings of ``config`` (the daemon's session and ``faxd doctor``'s test)."""
    ws = config.websocket
    return WsSettings(
        heartbeat_interval=ws.heartbeat_interval,
        ping_interval=ws.ping_interval,
        ping_timeout_min=ws.ping_timeout_min,
        ping_timeout=ws.ping_timeout,
        max_message_bytes=ws.max_message_bytes,
    )


def _event_server_settings(ev: EventsConfig) -> EventServerSettings:
    return EventServerSettings(
        path=ev.socket,
        mode=ev.mode,
        group=ev.group,
        max_clients=ev.max_clients,
        client_queue=ev.client_queue,
        allowed_uids=ev.allowed_uids,
        allowed_gids=ev.allowed_gids,
        heartbeat_interval=ev.heartbeat_interval,
        include_numbers=ev.include_numbers,
    )


@dataclass(frozen=True)
class Route:
    """How faxd reaches RingCentral: the proxy policy (REST and WebSocket), REST's proxy, the TLS context."""

    proxies: proxy.ProxyPolicy
    rest_proxy: proxy.Proxy | None
    tls: ssl.SSLContext

    @classmethod
    def of(cls, rc_cfg: RingCentralConfig) -> Route:
        """The route of ``rc_cfg`` in this environment; FatalError (exit 78) for an unusable proxy."""
        proxies = proxy_policy(rc_cfg.proxy, os.environ)
        try:
            rest_proxy = proxies.proxy_for(rc_cfg.server)
        except proxy.ProxyError as exc:
            raise FatalError(f"proxy: {exc}", EX_CONFIG) from None
        if rest_proxy is not None:
            log.info("api.via_proxy", proxy=rest_proxy.url, origin=proxies.origin)
        return cls(proxies, rest_proxy, ssl_context(rc_cfg.ca_file))


# -- the reloadable parts ------------------------------------------------------------------------------


class Reloadable(Protocol):
    """A part of the running daemon that takes over new settings on a reload (SIGHUP)."""

    async def apply(self, old: Config, new: Config) -> None:
        """Change this part's own state from ``old`` to ``new``: only keys marked ``reload=True`` in
        :mod:`faxd.config` differ (the others keep their old values)."""
        ...


class _Logging:
    """``logging.*``: the log level, format and redaction."""

    async def apply(self, old: Config, new: Config) -> None:
        if new.logging != old.logging:
            lg = new.logging
            configure_logging(level=lg.level, fmt=lg.format, redact_phi=lg.redact_phi)


class Engine:
    """The reconcile engine: the reconciler, and the request scheduler with its driver, which decides
    when every RingCentral request goes (``reconcile.*``; docs/scheduler.md). The REST client asks the
    driver for a grant for any request made outside one."""

    def __init__(
        self,
        config: Config,
        rc: RingCentral,
        store: Store,
        metrics: Metrics,
        publish: Callable[[Sequence[Event]], None],
    ) -> None:
        settings = _reconcile_settings(config)
        self.reconciler = Reconciler(rc, store, metrics, publish, settings)
        self.scheduler = Scheduler(
            rc.budget,
            _scheduler_settings(config, settings.missing_extension_retry),
            poll_cost=self._poll_cost,
        )
        self.driver = RequestDriver(self.scheduler, metrics)
        self.work = ReconcileWork(self.driver, self.reconciler)
        rc.use_gate(self.driver)

    def _poll_cost(self, key: Key, kind: PollKind) -> dict[str, int]:
        return self.work.poll_cost(key, kind)

    async def apply(self, old: Config, new: Config) -> None:
        if new.reconcile == old.reconcile:
            return
        settings = _reconcile_settings(new)
        self.scheduler.configure(_scheduler_settings(new, settings.missing_extension_retry))
        self.reconciler.update_settings(settings)
        self.driver.wake()


class Status:
    """What faxd tells about itself: the STATUS= line, /readyz, the journal-head and oldest-in-flight
    gauges. The upstream reports its WebSocket state and login problem here; the rest is read from
    the reconciler's memory and the metrics."""

    def __init__(
        self,
        config: Config,
        notifier: Notifier,
        metrics: Metrics,
        store: Store,
        reconciler: Reconciler,
        rate_status: Callable[[], str] | None = None,
    ) -> None:
        self._notifier = notifier
        self._rate_status = rate_status
        self._metrics = metrics
        self._store = store
        self._reconciler = reconciler
        self._poll_interval = config.reconcile.poll_interval
        self._ws_state = WsState.DISCONNECTED
        self._push_refused: dict[str, str] = {}
        self._problem = ""
        self._stopping = False

    @property
    def ws_state(self) -> WsState:
        return self._ws_state

    def set_ws_state(self, state: WsState, push_refused: Mapping[str, str] | None = None) -> None:
        """The WebSocket session's state (up, subscribing, connecting, disconnected) and the extensions
        whose event filters RingCentral refuses (extension -> reason), which are tracked by polling."""
        self._ws_state = state
        self._push_refused = dict(push_refused or {})

    def set_problem(self, problem: str) -> None:
        """A problem of the upstream for STATUS= (e.g. "cannot reach RingCentral"); "" when none."""
        self._problem = problem

    def line(self) -> str:
        state = self.ws_state
        ws = "up" if state is WsState.UP else f"down ({state})"
        in_flight = self._reconciler.in_flight_count()
        last = _clock(self._metrics.last_sync_time())
        text = f"WebSocket {ws}; {in_flight} faxes in flight; last sync {last}"
        refused = self._push_refused
        if refused:
            why = ", ".join(sorted(set(refused.values())))
            text += f"; push refused for {len(refused)} extension{'s' * (len(refused) != 1)} ({why}), polled"
        problems = [self._problem] if self._problem else []
        if self._rate_status is not None and (limited := self._rate_status()):
            problems.append(limited)  # "rate-limited: Light, next slot in 4 s"
        problems += self._reconciler.problems()
        return "; ".join([text, *problems])

    def refresh(self) -> None:
        """STATUS= when it changed; cheap enough to call after every publish."""
        if not self._stopping:
            self._notifier.status(self.line())

    def stopping(self) -> None:
        """STOPPING=1 with its own STATUS=, which no later refresh replaces."""
        self._stopping = True
        self._notifier.stopping()

    def refresh_oldest_in_flight(self) -> None:
        """The stuck-Queued alert's gauge; walks every fax in flight, so only on the watchdog's tick."""
        created = [parse_time(f.created) or 0.0 for f in self._reconciler.in_flight()]
        self._metrics.oldest_in_flight.set(min((c for c in created if c), default=0.0))

    def published(self, _: Sequence[Event]) -> None:
        self._metrics.journal_head.set(self._store.head_seq())
        self.refresh()

    async def ready(self) -> tuple[bool, str]:
        """/readyz: the store answers, the WebSocket is subscribed, a sync succeeded lately."""
        problems: list[str] = []
        try:
            self._store.db.execute("SELECT 1").fetchone()
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            problems.append("store not open")
        if self.ws_state is not WsState.UP:
            problems.append("websocket not subscribed")
        last = self._metrics.last_sync_time()
        stale_after = 2 * self._poll_interval + 60
        if not last:
            problems.append("no sync yet")
        elif time.time() - last > stale_after:
            problems.append(f"last sync older than {stale_after:.0f}s")
        return (not problems, "; ".join(problems) or "ok")

    async def apply(self, old: Config, new: Config) -> None:
        self._poll_interval = new.reconcile.poll_interval


def _clock(ts: float | None) -> str:
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%SZ")


class Upstream:
    """RingCentral as the daemon follows it: the login, the WebSocket session, the safety poller.

    It owns the resolved extension ids (``~`` becomes the JWT user's id at login), tells the request
    scheduler which extensions to poll and whether push works, and asks it for a reconcile per hint
    (``PUSH``), resync and start-up (``RESYNC``: a hint for one of them makes it ``PUSH``, first).
    Reloads change the extensions (a PUT of the subscription's filters), the WebSocket settings, the
    timers and the rate share.
    """

    def __init__(
        self,
        config: Config,
        rc: RingCentral,
        work: ReconcileWork,
        metrics: Metrics,
        status: Status,
        route: Route,
    ) -> None:
        self._config = config
        self._rc = rc
        self._work = work
        self._driver = work.driver
        self._metrics = metrics
        self._status = status
        self._route = route
        self._ws: WsSession | None = None
        self._poll_changed = asyncio.Event()
        self.extensions: tuple[str, ...] = ()  # resolved ids, known after login
        self.connected = asyncio.Event()  # set once logged in and the extensions are resolved

    async def run(self) -> None:
        """Log in, then keep the WebSocket session and the poller running until cancelled."""
        await self._login()
        self.extensions = self._resolve(self._config.ringcentral.extensions)
        log.info("upstream.logged_in", extensions=len(self.extensions))
        self.connected.set()
        self._driver.set_extensions(ext_key(e) for e in self.extensions)
        for key in self.extensions:
            self._work.ask(key, Priority.RESYNC, "startup")
        self._ws = WsSession(
            self._rc,
            filters=event_filters(self.extensions),
            settings=ws_settings(self._config),
            metrics=self._metrics,
            on_hint=self._on_hint,
            on_resync=self._on_resync,
            on_state=self._on_ws_state,
            ssl_context=self._route.tls,
            proxies=self._route.proxies,
        )
        self._on_ws_state("")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._ws.run())
                tg.create_task(self._poll())
        except* AuthFailed as group:
            # Refresh and a new JWT grant were both refused mid-run.
            exc = group.exceptions[0]
            assert isinstance(exc, AuthFailed)
            raise _credentials_refused(exc) from None

    async def _login(self) -> None:
        """Log in, retrying transient failures with backoff; wrong credentials are fatal."""
        delays = backoff(initial=2.0, cap=60.0)
        while True:
            try:
                await self._rc.login()
                self._status.set_problem("")
                return
            except AuthFailed as exc:
                raise _credentials_refused(exc) from exc
            except ApiError as exc:
                delay = max(next(delays), getattr(exc, "retry_after", 0.0) or 0.0)
                self._status.set_problem(f"cannot reach RingCentral ({exc.code}), retrying")
                self._status.refresh()
                log.warning("auth.login_failed", code=exc.code, status=exc.status, retry_in=round(delay, 1))
                await asyncio.sleep(delay)

    def _resolve(self, wanted: Sequence[str]) -> tuple[str, ...]:
        out: list[str] = []
        for ext in wanted:
            resolved = self._rc.owner_id if ext == "~" else ext
            if resolved and resolved not in out:
                out.append(resolved)
        return tuple(out)

    def _on_hint(self, hint: Hint) -> None:
        if hint.extension_id in self.extensions:
            log.debug("ws.hint_queued", extension=hint.extension_id)
            self._work.ask(hint.extension_id, Priority.PUSH, "push")
        else:
            self._metrics.ws_bad_frames.labels("foreign_extension").inc()

    def _on_resync(self) -> None:
        for key in self.extensions:
            self._work.ask(key, Priority.RESYNC, "resync")

    def _on_ws_state(self, _: str) -> None:
        # The session reports its first state while it is being built, before self._ws is set.
        ws = self._ws
        if ws is None:
            self._status.set_ws_state(WsState.DISCONNECTED)
        else:
            self._status.set_ws_state(ws.state, ws.refused_extensions)
        # While push is down, the push reserve is spent on polling the extensions with faxes in flight;
        # extensions whose push alone is refused are polled as often (from the headroom).
        self._driver.set_push(ws is not None and ws.state is WsState.UP)
        self._driver.set_unpushed(ext_key(e) for e in (ws.refused_extensions if ws is not None else {}))
        self._status.refresh()

    async def _poll(self) -> NoReturn:
        """The settle and retention timers (the scheduler polls), started again after a reload."""
        while True:
            self._poll_changed.clear()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(timers_forever(self._work))
                    tg.create_task(_until(self._poll_changed, _Restart))
            except* _Restart:
                pass

    async def apply(self, old: Config, new: Config) -> None:
        self._config = new
        if new.reconcile != old.reconcile:
            self._rc.set_rate_share(new.reconcile.rate_share)
            self._poll_changed.set()
        if self._ws is not None and new.websocket != old.websocket:
            self._ws.update_settings(ws_settings(new))
        if self.connected.is_set() and new.ringcentral.extensions != old.ringcentral.extensions:
            wanted = self._resolve(new.ringcentral.extensions)
            added = [key for key in wanted if key not in self.extensions]
            self.extensions = wanted
            self._driver.set_extensions(ext_key(e) for e in wanted)
            for key in added:
                self._work.ask(key, Priority.RESYNC, "resync")
            if self._ws is not None:
                await self._ws.update_filters(event_filters(self.extensions))


class Reloader:
    """SIGHUP: read the config file again and hand old and new settings to each reloadable part."""

    def __init__(
        self,
        config: Config,
        path: str | None,
        parts: Sequence[Reloadable],
        *,
        notifier: Notifier,
        metrics: Metrics,
        status: Status,
    ) -> None:
        self.config = config  # what the daemon runs with now
        self._path = path
        self._parts = parts
        self._notifier = notifier
        self._metrics = metrics
        self._status = status

    async def run(self, requested: asyncio.Event) -> NoReturn:
        while True:
            await requested.wait()
            requested.clear()
            self._notifier.reloading()
            await self._reload()
            self._notifier.ready(self._status.line())

    async def _reload(self) -> None:
        if self._path is None:
            log.warning("reload.no_config_file", detail="faxd was not started from a config file")
            return
        log.info("reload.started", path=self._path)
        try:
            new = await asyncio.to_thread(load_config, self._path)
        except ConfigError as exc:
            self._metrics.reloads.labels("error").inc()
            log.error(
                "reload.failed",
                path=self._path,
                problems=exc.problems,
                detail="the running configuration stays in effect",
            )
            return
        await self.apply(new)

    async def apply(self, new: Config) -> None:
        effective, applied, restart = merge_reload(self.config, new)
        old, self.config = self.config, effective
        if restart:
            log.warning(
                "reload.restart_needed",
                keys=restart,
                detail="the old values stay in effect until systemctl restart faxd",
            )
        for part in self._parts:
            await part.apply(old, effective)
        self._metrics.reloads.labels("ok").inc()
        log.info("reload.applied", applied=applied, restart_needed=restart)


# -- the event socket's view of the daemon --------------------------------------------------------------


class _Backend:
    """What the event socket needs from the rest of the daemon (see :class:`Backend`).

    Faxes in flight come from the reconciler's memory; any other fax is read from the store on
    demand (``status`` and ``history`` by id or ``ref``). ``list`` with ``active_only=false`` answers
    the :attr:`list_all_limit` newest faxes of the store (by creation time, newest first), not the
    whole table: a store holds hundreds of thousands of faxes, which would not fit one reply line.
    """

    list_all_limit = 1000

    def __init__(self, store: Store, engine: Engine, upstream: Upstream, cover_index: int | None = 0):
        self.store = store
        self.cover_index = cover_index  # send.cover_index: for a send that names no cover page
        self.reconciler = engine.reconciler
        self.work = engine.work
        self.upstream = upstream
        self.epoch = store.epoch
        self.documents: Documents | None = None  # documents.enabled

    async def fetch(self, fax_id: str) -> DocumentRef:
        """``faxd fetch ID``: download a received fax's document (again); FetchError when it cannot."""
        if self.documents is None:
            raise FetchError("bad_request", "documents.enabled is false: faxd does not download documents")
        await self._connected()
        try:
            async with asyncio.timeout(FETCH_WAIT):
                return await self.documents.fetch(fax_id)
        except TimeoutError:
            error = self.documents.last_error(fax_id) or "waiting for the rate budget"
            raise FetchError("upstream", f"not downloaded yet ({error}); it stays queued") from None

    async def _connected(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_WAIT):
                await self.upstream.connected.wait()
        except TimeoutError:
            raise SendError("upstream", "not connected to RingCentral") from None

    def head_seq(self) -> int:
        return self.store.head_seq()

    def oldest_seq(self) -> int:
        return self.store.oldest_seq()

    def events_after(self, after_seq: int, limit: int) -> list[StoredEvent]:
        return self.store.events_after(after_seq, limit)

    def fax(self, fax_id: str | None = None, ref: str | None = None) -> FaxState | None:
        if fax_id is not None:
            return self.reconciler.fax(fax_id)
        return None if ref is None else self.reconciler.by_ref(ref)

    def faxes(self, active_only: bool) -> list[FaxState]:
        if not active_only:
            return self.store.recent_faxes(self.list_all_limit)
        # Newest first, like the store's answer.
        return sorted(self.reconciler.in_flight(), key=lambda f: (f.created or "", f.fax_id), reverse=True)

    def history(self, fax_id: str) -> list[Event]:
        return self.store.history(fax_id)

    async def fax_page(self, query: QueryRequest) -> tuple[list[FaxState], PageKey | None]:
        return await asyncio.to_thread(self.store.read_page, query)

    async def sync(self) -> None:
        await self._connected()
        extensions = self.upstream.extensions
        asked = self.work.driver.now()
        for key in extensions:
            self.work.ask(key, Priority.USER, "request")
        await self.work.driver.checked((ext_key(e) for e in extensions), asked)

    async def send(self, request: SendRequest) -> FaxState:
        await self._connected()

        def send() -> Awaitable[FaxState]:
            return self.reconciler.send(
                self.upstream.extensions[0],
                to=[r.phone for r in request.to],
                documents=[Document(d.name, d.content_type, d.data) for d in request.documents],
                ref=request.ref,
                cover_text=request.cover_text,
                resolution=request.resolution,
                cover_index=self.cover_index if request.cover_index is None else request.cover_index,
            )

        # One fax, one key: the scheduler's USER work, in the Heavy group.
        work = Work(("send", uuid.uuid4().hex), Priority.USER, frozenset({"send"}), {HEAVY: 1})
        try:
            return await self.work.driver.execute(work, send)
        except ApiError as exc:  # no budget within the wait, or faxd is stopping: nothing was sent
            raise SendError("upstream", exc.message or "RingCentral could not be asked", exc.code) from exc


class _Fanout:
    """Where the reconciler's committed events go. Sinks join as their services open, so the
    reconciler can be built before the event socket that serves its events."""

    def __init__(self) -> None:
        self._sinks: list[Callable[[Sequence[Event]], None]] = []

    def subscribe(self, sink: Callable[[Sequence[Event]], None]) -> None:
        self._sinks.append(sink)

    def publish(self, events: Sequence[Event]) -> None:
        for sink in self._sinks:
            sink(events)


# -- opening the services --------------------------------------------------------------------------------


def _adopt_sockets(stack: AsyncExitStack) -> dict[str, socket.socket]:
    """The sockets systemd passed (socket activation), closed last."""
    inherited = listen_fds()
    for name, sock in inherited.items():
        stack.callback(sock.close)
        if name != "events":
            log.warning("daemon.unknown_socket_ignored", name=name)
    return inherited


def _open_store(stack: AsyncExitStack, config: Config) -> Store:
    store = Store(config.store.path)
    try:
        store.open()
    except Exception as exc:
        raise FatalError(f"store: {exc}") from exc
    stack.callback(store.close)
    return store


def _open_ringcentral(stack: AsyncExitStack, config: Config, route: Route, metrics: Metrics) -> RingCentral:
    rc_cfg = config.ringcentral
    session = http_session(rc_cfg, route.tls)
    stack.push_async_callback(session.close)
    rc = RingCentral(
        session,
        server=rc_cfg.server,
        client_id=rc_cfg.client_id,
        client_secret=rc_cfg.client_secret.reveal(),
        jwt=rc_cfg.jwt.reveal(),
        metrics=metrics,
        rate_share=config.reconcile.rate_share,
        proxy=route.rest_proxy,
    )
    stack.push_async_callback(rc.aclose)
    return rc


def _open_documents(
    config: Config,
    rc: RingCentral,
    store: Store,
    metrics: Metrics,
    journal: _Fanout,
    driver: RequestDriver,
) -> Documents | None:
    """The downloader of received faxes' documents (``documents.enabled``), fed by the journal; its
    requests are the request scheduler's work (``driver``)."""
    cfg = config.documents
    if not cfg.enabled:
        return None
    settings = DocumentSettings(Path(cfg.spool_dir), mode=cfg.mode, retention_days=cfg.retention_days)
    try:
        settings.spool_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        if not os.access(settings.spool_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable by faxd")
    except OSError as exc:
        raise FatalError(f"documents.spool_dir: {cfg.spool_dir}: {exc.strerror or exc}", EX_CONFIG) from None
    documents = Documents(settings, rc, store, metrics, journal.publish, driver=driver)
    journal.subscribe(documents.published)
    return documents


async def _open_event_server(
    stack: AsyncExitStack,
    ev: EventsConfig,
    backend: _Backend,
    metrics: Metrics,
    activated: socket.socket | None,
) -> EventServer:
    server = EventServer(_event_server_settings(ev), backend, metrics, server_name=f"faxd/{__version__}")
    if activated is not None:
        log.info("socket.activated", path=ev.socket, detail="passed by systemd")
        activated.setblocking(False)
    try:
        await server.start(sock=activated)
    except SocketSetupError as exc:
        raise FatalError(str(exc), EX_CONFIG) from exc
    stack.push_async_callback(server.close)
    return server


async def _serve_metrics(
    stack: AsyncExitStack,
    config: MetricsConfig,
    registry: CollectorRegistry,
    ready: Callable[[], Awaitable[tuple[bool, str]]],
) -> None:
    if config.listen is None:
        return
    host, port = split_host_port(config.listen)
    runner = web.AppRunner(metrics_app(registry, ready), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("metrics.listening", listen=config.listen)


# -- running ---------------------------------------------------------------------------------------------


async def run(
    config: Config,
    *,
    config_path: str | None = None,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
) -> int:
    """Run the daemon until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code.

    SIGHUP re-reads ``config_path`` (when given) and applies what can change while running.
    """
    stop = stop or asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig, event in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, event.set)
            installed.append(sig)
    notifier = Notifier()
    try:
        return await _run(
            config, config_path, registry or CollectorRegistry(), stop, reload, notifier, on_ready
        )
    except FatalError as exc:
        log.error("daemon.cannot_run", reason=str(exc))
        notifier.send(f"STATUS=failed: {exc}", f"EXIT_STATUS={exc.exit_code}")
        return exc.exit_code
    finally:
        notifier.close()
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _run(
    config: Config,
    config_path: str | None,
    registry: CollectorRegistry,
    stop: asyncio.Event,
    reload: asyncio.Event,
    notifier: Notifier,
    on_ready: Callable[[], Awaitable[None] | None] | None,
) -> int:
    """The lifecycle: open the services in order, READY=1, supervise, close them in reverse."""
    metrics = Metrics(registry)
    add_process_collectors(registry)
    async with AsyncExitStack() as stack:
        inherited = _adopt_sockets(stack)
        store = _open_store(stack, config)
        route = Route.of(config.ringcentral)
        rc = _open_ringcentral(stack, config, route, metrics)
        journal = _Fanout()
        engine = Engine(config, rc, store, metrics, journal.publish)
        status = Status(config, notifier, metrics, store, engine.reconciler, engine.driver.status)
        upstream = Upstream(config, rc, engine.work, metrics, status, route)
        backend = _Backend(store, engine, upstream, config.send.cover_index)
        resender = _resender(config, rc, engine, metrics)
        backend.documents = _open_documents(config, rc, store, metrics, journal, engine.driver)
        server = await _open_event_server(stack, config.events, backend, metrics, inherited.get("events"))
        journal.subscribe(server.publish)
        journal.subscribe(status.published)
        outlets = await stack.enter_async_context(Outlets(outlet_settings(config.outlets), store, metrics))
        journal.subscribe(outlets.published)
        await _serve_metrics(stack, config.metrics, registry, status.ready)

        notifier.ready(status.line())
        log.info(
            "daemon.started", socket=config.events.socket, store=str(config.store.path), epoch=store.epoch
        )
        if on_ready is not None and (result := on_ready()) is not None:
            await result

        parts: list[Reloadable] = [_Logging(), engine, upstream, status]
        reloader = Reloader(config, config_path, parts, notifier=notifier, metrics=metrics, status=status)
        return await _supervise(
            engine,
            upstream,
            reloader,
            status,
            notifier,
            metrics,
            stop,
            reload,
            outlets.run,
            resender,
            backend.documents,
        )


def _resender(config: Config, rc: RingCentral, engine: Engine, metrics: Metrics) -> Resender | None:
    """The resend policy's worker (send.retry), when it may resend at all (max_attempts > 1)."""
    retry = config.send.retry
    policy = RetryPolicy(
        categories=retry.categories,
        max_attempts=retry.max_attempts,
        delay=retry.delay,
        backoff=retry.backoff,
        max_delay=retry.max_delay,
        deadline=retry.deadline,
    )
    return Resender(policy, rc, engine.reconciler, metrics) if policy.enabled else None


async def _watchdog(notifier: Notifier, metrics: Metrics, status: Status) -> NoReturn:
    """WATCHDOG=1 from the event loop itself (a blocked loop gets us restarted), a loop-lag probe and
    the periodic STATUS= refresh. Never depends on RingCentral: an outage must not cause restarts."""
    loop = asyncio.get_running_loop()
    interval = notifier.watchdog_interval or 5.0
    while True:
        notifier.watchdog()
        status.refresh_oldest_in_flight()
        status.refresh()
        before = loop.time()
        await asyncio.sleep(interval)
        metrics.loop_lag.set(max(0.0, loop.time() - before - interval))


async def _drain(engine: Engine, status: Status) -> None:
    """STOPPING=1, then let the scheduler hand out what may still go at once (user, push and settle
    work that fits the budget now) and wait for running grants, within the deadline: nothing waits
    for the rate budget; what is left is redone at start-up, its waiters fail."""
    status.stopping()
    engine.reconciler.rc.stop_waiting()
    log.info("daemon.stopping", deadline=DRAIN_DEADLINE, detail="draining the request scheduler")
    try:
        async with asyncio.timeout(DRAIN_DEADLINE):
            await engine.driver.drain()
    except TimeoutError:
        log.warning("daemon.drain_timeout", detail="pending work will be redone at start-up")


async def _supervise(
    engine: Engine,
    upstream: Upstream,
    reloader: Reloader,
    status: Status,
    notifier: Notifier,
    metrics: Metrics,
    stop: asyncio.Event,
    reload: asyncio.Event,
    outlets: Callable[[], Coroutine[Any, Any, None]],
    resender: Resender | None = None,
    documents: Documents | None = None,
) -> int:
    """Run the consumers around the producers until ``stop``; the exit code (FatalError raised).
    The outlets are consumers: they deliver what the drain still journals, and stop with the scheduler."""
    started = time.monotonic()
    fatal: list[BaseException] = []
    crashed: list[BaseException] = []
    try:
        async with asyncio.TaskGroup() as consumers:
            consumers.create_task(engine.driver.run())
            consumers.create_task(_watchdog(notifier, metrics, status))
            consumers.create_task(outlets())
            try:
                async with asyncio.TaskGroup() as producers:
                    producers.create_task(upstream.run())
                    producers.create_task(reloader.run(reload))
                    if resender is not None:
                        producers.create_task(resender.run(upstream.connected))
                    if documents is not None:
                        producers.create_task(documents.run(upstream.connected))
                    producers.create_task(_until(stop))
            except* _Stop:
                pass
            await _drain(engine, status)
            raise _Stop
    except* _Stop:
        pass
    except* FatalError as group:
        fatal = _flatten(group)
    except* Exception as group:  # noqa: BLE001 - the supervisor logs every crash once, then exits 1
        crashed = _flatten(group)
    if fatal:
        raise fatal[0]
    for error in crashed:
        log.error("daemon.crashed", error=repr(error), exc_info=error)
    if crashed:
        return 1
    log.info("daemon.stopped", uptime_s=round(time.monotonic() - started, 1))
    return 0
