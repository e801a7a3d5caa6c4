"""The supervisor: wires the adapters from a :class:`Config`, runs them, and stops them in order.

Start-up (each step's clean-up is pushed on an exit stack and unwound in reverse):
  store → metrics registry → HTTP session → event socket (inherited from systemd when socket-activated,
  else bound) → /metrics → READY=1 (without waiting for RingCentral: local clients can replay the
  journal while RingCentral is unreachable)
Then two task groups: the consumers (the reconcile queue, the watchdog) outside, the producers
(RingCentral login, WebSocket session, safety poller, the SIGHUP reloader) inside.
The watchdog task sends WATCHDOG=1 at half ``$WATCHDOG_USEC`` and refreshes the STATUS= line
(WebSocket up/down, faxes in flight, last sync).
Reload (SIGHUP): RELOADING=1 → the config file is read again → log level/format, extensions (the WS
filters are PUT), WebSocket and reconcile timings are applied; keys that need a restart are named and
keep their old values; a bad file keeps the running config → READY=1.
Stop (SIGTERM/SIGINT): STOPPING=1 → producers cancelled → the queue drains what it already knows,
within ``DRAIN_DEADLINE`` → clients get ``bye`` → resources closed in reverse order → exit 0.
A crash of any task cancels the rest and exits non-zero (systemd restarts us); every exception of the
group is logged once.
This module must not contain protocol or fax logic; it only wires and supervises.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any, NoReturn

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from faxd import __version__
from faxd.adapters.event_server import EventServer, EventServerSettings
from faxd.adapters.metrics import Metrics, add_process_collectors, metrics_app
from faxd.adapters.notify import Notifier, listen_fds
from faxd.adapters.reconcile import (
    ReconcileQueue,
    Reconciler,
    ReconcileSettings,
    poll_forever,
)
from faxd.adapters.rest import ApiError, AuthFailed, Document, RingCentral
from faxd.adapters.store import Store
from faxd.adapters.ws_session import WsSession, WsSettings
from faxd.config import Config, ConfigError, load_config, split_host_port
from faxd.core.backoff import backoff
from faxd.core.debounce import KeyedQueue
from faxd.core.model import Event, FaxState
from faxd.core.protocol import SendError, SendRequest
from faxd.core.wsg import Hint, event_filters
from faxd.logs import configure_logging

log = structlog.get_logger(__name__)

DRAIN_DEADLINE = 10.0  # seconds the queue may take to finish on stop; systemd's TimeoutStopSec is 30 s
CONNECT_WAIT = 30.0  # how long a send or sync request waits for the first RingCentral login
EX_CREDENTIALS = 78  # RingCentral refused our credentials: a restart would not help


class _Stop(Exception):
    """Raised inside a task group to end it in an orderly way."""


class FatalError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Backend:
    """What the event socket needs from the rest of the daemon (see :class:`Backend`).

    Faxes in flight come from the reconciler's memory; any other fax is read from the store on
    demand (``status`` and ``history`` by id or ``ref``). ``list`` with ``active_only=false`` answers
    the :attr:`list_all_limit` newest faxes of the store (by creation time, newest first), not the
    whole table: a store holds hundreds of thousands of faxes, which would not fit one reply line.
    """

    list_all_limit = 1000

    def __init__(self, store: Store, reconciler: Reconciler, queue: ReconcileQueue, extensions: list[str]):
        self.store = store
        self.reconciler = reconciler
        self.queue = queue
        self.extensions = extensions
        self.epoch = store.epoch
        self.connected = asyncio.Event()  # set once logged in and the extensions are resolved

    async def _connected(self) -> None:
        try:
            async with asyncio.timeout(CONNECT_WAIT):
                await self.connected.wait()
        except TimeoutError:
            raise SendError("upstream", "not connected to RingCentral") from None

    def head_seq(self) -> int:
        return self.store.head_seq()

    def oldest_seq(self) -> int:
        return self.store.oldest_seq()

    def events_after(self, after_seq: int, limit: int) -> list[Event]:
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

    async def sync(self) -> None:
        await self._connected()
        for key in self.extensions:
            self.queue.hint(key, "request", immediate=True)
        await self.queue.wait_idle()

    async def send(self, request: SendRequest) -> FaxState:
        await self._connected()
        return await self.reconciler.send(
            self.extensions[0],
            to=[r.phone for r in request.to],
            documents=[Document(d.name, d.content_type, d.data) for d in request.documents],
            ref=request.ref,
            cover_text=request.cover_text,
            resolution=request.resolution,
        )


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """The one verified TLS context for REST and WS: system trust, or only ``ca_file`` when given."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _login(rc: RingCentral, live: _Live) -> None:
    """Log in, retrying transient failures with backoff; wrong credentials are fatal."""
    delays = backoff(initial=2.0, cap=60.0)
    while True:
        try:
            await rc.login()
            live.problem = ""
            return
        except AuthFailed as exc:
            raise FatalError(
                f"RingCentral refused the credentials ({exc.code}): {exc.message}", EX_CREDENTIALS
            ) from exc
        except ApiError as exc:
            delay = max(next(delays), getattr(exc, "retry_after", 0.0) or 0.0)
            live.problem = f"cannot reach RingCentral ({exc.code}), retrying"
            live.refresh_status()
            log.warning("login failed, retrying", code=exc.code, status=exc.status, delay=round(delay, 1))
            await asyncio.sleep(delay)


async def _watchdog(notifier: Notifier, metrics: Metrics, live: _Live) -> NoReturn:
    """WATCHDOG=1 from the event loop itself (a blocked loop gets us restarted), a loop-lag probe and
    the periodic STATUS= refresh. Never depends on RingCentral: an outage must not cause restarts."""
    loop = asyncio.get_running_loop()
    interval = notifier.watchdog_interval or 5.0
    while True:
        notifier.watchdog()
        live.refresh_oldest_in_flight()
        live.refresh_status()
        before = loop.time()
        await asyncio.sleep(interval)
        metrics.loop_lag.set(max(0.0, loop.time() - before - interval))


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


# What a SIGHUP can change while running; every other key needs a restart.
RELOADABLE: dict[str, frozenset[str] | None] = {
    "ringcentral": frozenset({"extensions"}),
    "websocket": None,  # None: every key of the section
    "reconcile": None,
    "logging": None,
    "store": frozenset(),
    "events": frozenset(),
    "metrics": frozenset(),
}


def merge_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to run with after a reload, the keys applied, and the changed keys that need a restart.

    Keys that need a restart keep their old value, so a later reload names them again.
    """
    sections: dict[str, Any] = {}
    applied: list[str] = []
    restart: list[str] = []
    for section_field in dataclasses.fields(old):
        name = section_field.name
        old_section, new_section = getattr(old, name), getattr(new, name)
        allowed = RELOADABLE.get(name, frozenset())
        kept: dict[str, Any] = {}
        for f in dataclasses.fields(old_section):
            before, after = getattr(old_section, f.name), getattr(new_section, f.name)
            if before == after:
                continue
            if allowed is None or f.name in allowed:
                applied.append(f"{name}.{f.name}")
            else:
                restart.append(f"{name}.{f.name}")
                kept[f.name] = before
        sections[name] = dataclasses.replace(new_section, **kept) if kept else new_section
    return dataclasses.replace(new, **sections), applied, restart


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


def _ws_settings(config: Config) -> WsSettings:
    ws = config.websocket
    return WsSettings(
        heartbeat_interval=ws.heartbeat_interval,
        ping_interval=ws.ping_interval,
        ping_timeout_min=ws.ping_timeout_min,
        ping_timeout=ws.ping_timeout,
        max_message_bytes=ws.max_message_bytes,
    )


def _clock(ts: float | None) -> str:
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%SZ")


def _unix(iso: str | None) -> float:
    """Unix time of RingCentral's ISO 8601 timestamp, 0 if missing or unreadable."""
    if not iso:
        return 0.0
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return moment.timestamp() if moment.tzinfo is not None else 0.0


class _Live:
    """What the daemon is running with now, and the STATUS= line derived from it."""

    def __init__(self, config: Config, notifier: Notifier, metrics: Metrics) -> None:
        self.config = config
        self.notifier = notifier
        self.metrics = metrics
        self.ws: WsSession | None = None
        self.reconciler: Reconciler | None = None
        self.problem = ""
        self.stopping = False

    def ws_state(self) -> str:
        return self.ws.state if self.ws is not None else "disconnected"

    def status_line(self) -> str:
        state = self.ws_state()
        ws = "up" if state == "up" else f"down ({state})"
        in_flight = self.reconciler.in_flight_count() if self.reconciler is not None else 0
        last = _clock(self.metrics.last_sync_time())
        text = f"WebSocket {ws}; {in_flight} faxes in flight; last sync {last}"
        refused = self.ws.refused_extensions if self.ws is not None else {}
        if refused:
            why = ", ".join(sorted(set(refused.values())))
            text += f"; push refused for {len(refused)} extension{'s' * (len(refused) != 1)} ({why}), polled"
        return f"{text}; {self.problem}" if self.problem else text

    def refresh_oldest_in_flight(self) -> None:
        """The stuck-Queued alert's gauge; walks every fax in flight, so only on the watchdog's tick."""
        if self.reconciler is not None:
            created = [_unix(f.created) for f in self.reconciler.in_flight()]
            self.metrics.oldest_in_flight.set(min((c for c in created if c), default=0.0))

    def refresh_status(self) -> None:
        """STATUS= when it changed; cheap enough to call after every publish."""
        if not self.stopping:
            self.notifier.status(self.status_line())


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
        log.error("faxd cannot run", reason=str(exc))
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
    metrics = Metrics(registry)
    add_process_collectors(registry)
    live = _Live(config, notifier, metrics)
    extensions: list[str] = []  # resolved ids ("~" → the JWT user's id), known after login
    rc_cfg = config.ringcentral
    inherited = listen_fds()
    async with AsyncExitStack() as stack:
        for name, sock in inherited.items():
            stack.callback(sock.close)
            if name != "events":
                log.warning("ignoring an inherited socket with an unknown name", name=name)
        store = Store(config.store.path)
        try:
            store.open()
        except Exception as exc:
            raise FatalError(f"store: {exc}") from exc
        stack.callback(store.close)

        tls = ssl_context(rc_cfg.ca_file)
        connector = aiohttp.TCPConnector(ssl=tls)
        session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": f"faxd/{__version__}"})
        stack.push_async_callback(session.close)
        rc = RingCentral(
            session,
            server=rc_cfg.server,
            client_id=rc_cfg.client_id,
            client_secret=rc_cfg.client_secret.reveal(),
            jwt=rc_cfg.jwt.reveal(),
            metrics=metrics,
            rate_share=config.reconcile.rate_share,
        )
        stack.push_async_callback(rc.aclose)

        server: EventServer | None = None

        def publish(events: Sequence[Event]) -> None:
            if server is not None:
                server.publish(events)
            metrics.journal_head.set(store.head_seq())
            live.refresh_status()

        rec = config.reconcile
        reconciler = Reconciler(rc, store, metrics, publish, _reconcile_settings(config))
        live.reconciler = reconciler
        queue = ReconcileQueue(
            KeyedQueue(debounce=rec.debounce, max_delay=rec.max_delay, backoff_base=2.0, backoff_cap=300.0),
            reconciler,
            metrics,
        )
        ev = config.events
        backend = _Backend(store, reconciler, queue, extensions)
        server = EventServer(
            EventServerSettings(
                path=ev.socket,
                mode=ev.mode,
                group=ev.group,
                max_clients=ev.max_clients,
                client_queue=ev.client_queue,
                allowed_uids=ev.allowed_uids,
                allowed_gids=ev.allowed_gids,
                heartbeat_interval=ev.heartbeat_interval,
                include_numbers=ev.include_numbers,
            ),
            backend,
            metrics,
            server_name=f"faxd/{__version__}",
        )
        activated = inherited.get("events")
        if activated is not None:
            log.info("event socket passed by systemd (socket activation)", path=ev.socket)
            activated.setblocking(False)
        await server.start(sock=activated)
        stack.push_async_callback(server.close)

        async def ready() -> tuple[bool, str]:
            problems: list[str] = []
            try:
                store.db.execute("SELECT 1").fetchone()
            except Exception:  # noqa: BLE001 - any failure means "not ready"
                problems.append("store not open")
            if live.ws_state() != "up":
                problems.append("websocket not subscribed")
            last = metrics.last_sync_time()
            stale_after = 2 * live.config.reconcile.poll_interval + 60
            if not last:
                problems.append("no sync yet")
            elif time.time() - last > stale_after:
                problems.append(f"last sync older than {stale_after:.0f}s")
            return (not problems, "; ".join(problems) or "ok")

        if config.metrics.listen is not None:
            host, port = split_host_port(config.metrics.listen)
            runner = web.AppRunner(metrics_app(registry, ready), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, host, port)
            await site.start()
            log.info("metrics listening", listen=config.metrics.listen)

        notifier.ready(live.status_line())
        log.info("faxd started", socket=ev.socket, store=str(config.store.path), epoch=store.epoch)
        if on_ready is not None:
            result = on_ready()
            if result is not None:
                await result

        def on_hint(hint: Hint) -> None:
            if hint.extension_id in extensions:
                log.debug("ws hint queued", extension=hint.extension_id)
                queue.hint(hint.extension_id, "push")
            else:
                metrics.ws_bad_frames.labels("foreign_extension").inc()

        def on_resync() -> None:
            for key in extensions:
                queue.hint(key, "resync", immediate=True)

        def on_state(_: str) -> None:
            live.refresh_status()

        def resolve(wanted: Sequence[str]) -> list[str]:
            out: list[str] = []
            for ext in wanted:
                resolved = rc.owner_id if ext == "~" else ext
                if resolved and resolved not in out:
                    out.append(resolved)
            return out

        poll_changed = asyncio.Event()

        async def poller() -> NoReturn:
            """The safety poller, started again with new intervals after a reload."""
            while True:
                poll_changed.clear()
                settings = _reconcile_settings(live.config)
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(poll_forever(queue, lambda: extensions, settings))
                        tg.create_task(_until(poll_changed, _Restart))
                except* _Restart:
                    pass

        async def ringcentral() -> None:
            await _login(rc, live)
            extensions[:] = resolve(live.config.ringcentral.extensions)
            log.info("logged in to RingCentral", extensions=len(extensions))
            backend.connected.set()
            for key in extensions:
                queue.hint(key, "startup", immediate=True)
            live.ws = WsSession(
                rc,
                filters=event_filters(extensions),
                settings=_ws_settings(live.config),
                metrics=metrics,
                on_hint=on_hint,
                on_resync=on_resync,
                on_state=on_state,
                ssl_context=tls,
            )
            live.refresh_status()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(live.ws.run())
                    tg.create_task(poller())
            except* AuthFailed as group:
                # Refresh and a new JWT grant were both refused mid-run: a restart would not help.
                exc = group.exceptions[0]
                assert isinstance(exc, AuthFailed)
                raise FatalError(
                    f"RingCentral refused the credentials ({exc.code}): {exc.message}", EX_CREDENTIALS
                ) from None

        async def apply(new: Config) -> None:
            effective, applied, restart = merge_reload(live.config, new)
            old, live.config = live.config, effective
            if restart:
                log.warning(
                    "changed settings need a restart (systemctl restart faxd); the old values stay in effect",
                    keys=restart,
                )
            if effective.logging != old.logging:
                lg = effective.logging
                configure_logging(level=lg.level, fmt=lg.format, redact_phi=lg.redact_phi)
            if effective.reconcile != old.reconcile:
                settings = _reconcile_settings(effective)
                queue.queue.debounce, queue.queue.max_delay = settings.debounce, settings.max_delay
                reconciler.settings = settings
                rc.budget.share = effective.reconcile.rate_share
                poll_changed.set()
            if live.ws is not None and effective.websocket != old.websocket:
                live.ws.update_settings(_ws_settings(effective))
            if backend.connected.is_set() and effective.ringcentral.extensions != old.ringcentral.extensions:
                wanted = resolve(effective.ringcentral.extensions)
                added = [key for key in wanted if key not in extensions]
                extensions[:] = wanted
                for key in added:
                    queue.hint(key, "resync", immediate=True)
                if live.ws is not None:
                    await live.ws.update_filters(event_filters(extensions))
            metrics.reloads.labels("ok").inc()
            log.info("configuration reloaded", applied=applied, restart_needed=restart)

        async def reloader() -> NoReturn:
            while True:
                await reload.wait()
                reload.clear()
                notifier.reloading()
                if config_path is None:
                    log.warning("reload requested, but faxd was not started from a config file")
                    notifier.ready(live.status_line())
                    continue
                log.info("reloading configuration", path=config_path)
                try:
                    new = await asyncio.to_thread(load_config, config_path)
                except ConfigError as exc:
                    metrics.reloads.labels("error").inc()
                    log.error(
                        "reload failed; the running configuration stays in effect",
                        path=config_path,
                        problems=exc.problems,
                    )
                else:
                    await apply(new)
                notifier.ready(live.status_line())

        started = time.monotonic()
        fatal: list[BaseException] = []
        crashed: list[BaseException] = []
        try:
            async with asyncio.TaskGroup() as consumers:
                consumers.create_task(queue.run())
                consumers.create_task(_watchdog(notifier, metrics, live))
                try:
                    async with asyncio.TaskGroup() as producers:
                        producers.create_task(ringcentral())
                        producers.create_task(reloader())
                        producers.create_task(_until(stop))
                except* _Stop:
                    pass
                live.stopping = True
                notifier.stopping()
                log.info("stopping: draining the reconcile queue", deadline=DRAIN_DEADLINE)
                try:
                    async with asyncio.timeout(DRAIN_DEADLINE):
                        await queue.drain()
                except TimeoutError:
                    log.warning("drain deadline passed; pending work will be redone at start-up")
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
            log.error("faxd crashed", error=repr(error), exc_info=error)
        if crashed:
            return 1
        log.info("faxd stopped", uptime_s=round(time.monotonic() - started, 1))
        return 0
