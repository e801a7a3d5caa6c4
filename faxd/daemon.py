"""The supervisor: wires the adapters from a :class:`Config`, runs them, and stops them in order.

Start-up (each step's clean-up is pushed on an exit stack and unwound in reverse):
  store → metrics registry → HTTP session → event socket → /metrics → READY=1 (without waiting for
  RingCentral: local clients can replay the journal while RingCentral is unreachable)
Then two task groups: the consumer (the reconcile queue) outside, the producers (RingCentral login,
WebSocket session, safety poller) inside, plus the watchdog.
Stop (SIGTERM/SIGINT): STOPPING=1 → producers cancelled → the queue drains what it already knows,
within ``DRAIN_DEADLINE`` → clients get ``bye`` → resources closed in reverse order → exit 0.
A crash of any task cancels the rest and exits non-zero (systemd restarts us); every exception of the
group is logged once.
This module must not contain protocol or fax logic; it only wires and supervises.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import NoReturn

import aiohttp
import prometheus_client
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from faxd import __version__
from faxd.adapters.event_server import EventServer, EventServerSettings
from faxd.adapters.metrics import Metrics, metrics_app
from faxd.adapters.notify import Notifier
from faxd.adapters.reconcile import (
    ReconcileQueue,
    Reconciler,
    ReconcileSettings,
    poll_forever,
)
from faxd.adapters.rest import ApiError, AuthFailed, Document, RingCentral
from faxd.adapters.store import Store
from faxd.adapters.ws_session import WsSession, WsSettings
from faxd.config import Config, split_host_port
from faxd.core.backoff import backoff
from faxd.core.debounce import KeyedQueue
from faxd.core.model import Event, FaxState
from faxd.core.protocol import SendError, SendRequest
from faxd.core.wsg import Hint, event_filters

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
    """What the event socket needs from the rest of the daemon (see :class:`Backend`)."""

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
            return self.reconciler.faxes.get(fax_id)
        return None if ref is None else self.reconciler.by_ref(ref)

    def faxes(self, active_only: bool) -> list[FaxState]:
        faxes = self.reconciler.faxes.values()
        return [f for f in faxes if f.in_flight] if active_only else list(faxes)

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


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """One verified context for REST and WS; ``ca_file`` replaces the system trust store."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()


async def _login(rc: RingCentral, notifier: Notifier) -> None:
    """Log in, retrying transient failures with backoff; wrong credentials are fatal."""
    delays = backoff(initial=2.0, cap=60.0)
    while True:
        try:
            await rc.login()
            return
        except AuthFailed as exc:
            raise FatalError(
                f"RingCentral refused the credentials ({exc.code}): {exc.message}", EX_CREDENTIALS
            ) from exc
        except ApiError as exc:
            delay = max(next(delays), getattr(exc, "retry_after", 0.0) or 0.0)
            notifier.status(f"cannot reach RingCentral ({exc.code}); retrying")
            log.warning("login failed, retrying", code=exc.code, status=exc.status, delay=round(delay, 1))
            await asyncio.sleep(delay)


async def _watchdog(notifier: Notifier, metrics: Metrics) -> NoReturn:
    """WATCHDOG=1 from the event loop itself (a blocked loop gets us restarted) and a loop-lag probe."""
    loop = asyncio.get_running_loop()
    interval = notifier.watchdog_interval or 5.0
    while True:
        before = loop.time()
        await asyncio.sleep(interval)
        metrics.loop_lag.set(max(0.0, loop.time() - before - interval))
        notifier.watchdog()


async def _until(stop: asyncio.Event) -> NoReturn:
    await stop.wait()
    raise _Stop


def _flatten(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_flatten(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def run(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
) -> int:
    """Run the daemon until ``stop`` is set or SIGTERM/SIGINT arrives; return the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        return await _run(config, registry or CollectorRegistry(), stop, on_ready)
    except FatalError as exc:
        log.error("faxd cannot run", reason=str(exc))
        return exc.exit_code
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _run(
    config: Config,
    registry: CollectorRegistry,
    stop: asyncio.Event,
    on_ready: Callable[[], Awaitable[None] | None] | None,
) -> int:
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    notifier = Notifier()
    metrics = Metrics(registry)
    extensions: list[str] = []  # resolved ids ("~" → the JWT user's id), known after login
    rc_cfg = config.ringcentral
    async with AsyncExitStack() as stack:
        stack.callback(notifier.close)
        store = Store(config.store.path)
        try:
            store.open()
        except Exception as exc:
            raise FatalError(f"store: {exc}") from exc
        stack.callback(store.close)

        connector = aiohttp.TCPConnector(ssl=_ssl_context(rc_cfg.ca_file))
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

        rec = config.reconcile
        settings = ReconcileSettings(
            debounce=rec.debounce,
            max_delay=rec.max_delay,
            poll_interval=rec.poll_interval,
            active_poll_interval=rec.active_poll_interval,
            stall_after=rec.stall_after,
        )
        reconciler = Reconciler(rc, store, metrics, publish, settings)
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
        await server.start()
        stack.push_async_callback(server.close)

        ws_up = False

        async def ready() -> tuple[bool, str]:
            if not ws_up:
                return False, "websocket not subscribed"
            return True, "ok"

        if config.metrics.listen is not None:
            host, port = split_host_port(config.metrics.listen)
            runner = web.AppRunner(metrics_app(registry, ready), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, host, port)
            await site.start()
            log.info("metrics listening", listen=config.metrics.listen)

        notifier.ready("started; connecting to RingCentral")
        log.info("faxd started", socket=ev.socket, store=str(config.store.path), epoch=store.epoch)
        if on_ready is not None:
            result = on_ready()
            if result is not None:
                await result

        def on_hint(hint: Hint) -> None:
            if hint.extension_id in extensions:
                queue.hint(hint.extension_id, "push")
            else:
                metrics.ws_bad_frames.labels("foreign_extension").inc()

        def on_resync() -> None:
            for key in extensions:
                queue.hint(key, "resync", immediate=True)

        def on_state(state: str) -> None:
            nonlocal ws_up
            ws_up = state == "up"
            in_flight = len(reconciler.in_flight())
            notifier.status(f"websocket {state}; {in_flight} faxes in flight")

        async def ringcentral() -> None:
            await _login(rc, notifier)
            for ext in rc_cfg.extensions:
                resolved = rc.owner_id if ext == "~" else ext
                if resolved and resolved not in extensions:
                    extensions.append(resolved)
            log.info("logged in to RingCentral", extensions=len(extensions))
            backend.connected.set()
            for key in extensions:
                queue.hint(key, "startup", immediate=True)
            ws = WsSession(
                rc,
                filters=event_filters(extensions),
                settings=WsSettings(
                    heartbeat_interval=config.websocket.heartbeat_interval,
                    ping_interval=config.websocket.ping_interval,
                    ping_timeout=config.websocket.ping_timeout,
                    max_message_bytes=config.websocket.max_message_bytes,
                ),
                metrics=metrics,
                on_hint=on_hint,
                on_resync=on_resync,
                on_state=on_state,
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(ws.run())
                tg.create_task(poll_forever(queue, lambda: extensions, settings))

        started = time.monotonic()
        fatal: list[BaseException] = []
        crashed: list[BaseException] = []
        try:
            async with asyncio.TaskGroup() as consumers:
                consumers.create_task(queue.run())
                consumers.create_task(_watchdog(notifier, metrics))
                try:
                    async with asyncio.TaskGroup() as producers:
                        producers.create_task(ringcentral())
                        producers.create_task(_until(stop))
                except* _Stop:
                    pass
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
