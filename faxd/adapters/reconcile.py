"""The reconcile worker: turns "extension E changed" into exact, journalled transitions.

Three parts, all thin around the core:

* :class:`Reconciler` reads the message store for one extension (message-sync ISync with the stored
  token, FSync when there is none or it went stale, then a bulk GET of in-flight faxes the sync did not
  return when a poll asked for it), diffs with :mod:`faxd.core.status` and commits states, transitions
  and the new token in one store transaction, then publishes the new events.
* :class:`ReconcileQueue` drives a :class:`faxd.core.debounce.KeyedQueue` on the event loop's clock.
* :func:`poll_forever` asks for a reconcile of every extension every ``poll_interval`` (or
  ``active_poll_interval`` while a fax is in flight), so changes are found even when no hint arrives.

This module must not parse WebSocket frames or talk to socket clients; it gets keys and gives events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import ApiError, Document, RingCentral, SyncTokenStale
from faxd.adapters.store import Journalled, Store
from faxd.core.debounce import KeyedQueue
from faxd.core.model import Event, EventKind, FaxState, Source
from faxd.core.protocol import SendError
from faxd.core.status import RecordError, apply_record, diff, is_expected, parse_time, stalled

log = structlog.get_logger(__name__)

Publish = Callable[[Sequence[Event]], None]


@dataclass(frozen=True)
class ReconcileSettings:
    debounce: float = 1.0
    max_delay: float = 5.0
    poll_interval: float = 300.0
    active_poll_interval: float = 60.0
    stall_after: float = 1800.0
    fsync_days: float = 7.0  # how far back the first full sync looks


def _source(reasons: set[str]) -> Source:
    if "push" in reasons:
        return Source.PUSH
    if reasons & {"startup", "resync"}:
        return Source.STARTUP
    return Source.POLL


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Reconciler:
    """Reads RingCentral, writes the store, publishes events. One instance per daemon."""

    def __init__(
        self,
        rc: RingCentral,
        store: Store,
        metrics: Metrics,
        publish: Publish,
        settings: ReconcileSettings,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.rc = rc
        self.store = store
        self.metrics = metrics
        self.publish = publish
        self.settings = settings
        self.wall = wall
        self.faxes: dict[str, FaxState] = store.load_faxes()
        self._update_gauges()

    def in_flight(self, extension_id: str | None = None) -> list[FaxState]:
        return [
            f
            for f in self.faxes.values()
            if f.in_flight and (extension_id is None or f.extension_id == extension_id)
        ]

    def by_ref(self, ref: str) -> FaxState | None:
        return next((f for f in self.faxes.values() if f.ref == ref), None)

    async def reconcile(self, extension_id: str, reasons: set[str]) -> None:
        """One reconcile of one extension. Raises :class:`ApiError` on failure (the queue backs off)."""
        started = time.perf_counter()
        trigger = next(iter(sorted(reasons))) if len(reasons) == 1 else _source(reasons).value
        try:
            await self._reconcile(extension_id, reasons)
        except ApiError as exc:
            self.metrics.reconciles.labels(trigger, "error").inc()
            log.warning("reconcile failed", extension=extension_id, code=exc.code, status=exc.status)
            raise
        self.metrics.reconciles.labels(trigger, "ok").inc()
        self.metrics.reconcile_duration.observe(time.perf_counter() - started)
        self.metrics.last_sync.set(self.wall())

    async def _reconcile(self, extension_id: str, reasons: set[str]) -> None:
        source = _source(reasons)
        token = self.store.sync_token(extension_id)
        date_from = datetime.fromtimestamp(self.wall(), UTC) - timedelta(days=self.settings.fsync_days)
        try:
            result = await self.rc.message_sync(extension_id, token, date_from=date_from)
        except SyncTokenStale:
            log.info("sync token stale, running a full sync", extension=extension_id)
            result = await self.rc.message_sync(extension_id, None, date_from=date_from)
        seen: set[str] = set()
        changed: dict[str, FaxState] = {}
        journal: list[Journalled] = []

        def absorb(record: Any, how: Source) -> None:
            fax_id = str(record.get("id")) if isinstance(record, dict) else ""
            old = changed.get(fax_id) or self.faxes.get(fax_id)
            try:
                new = apply_record(old, record, extension_id=extension_id)
            except RecordError as exc:
                self.metrics.api_bad_bodies.labels("message-record").inc()
                log.warning("ignored a malformed message record", reason=str(exc))
                return
            if new is None:
                return
            seen.add(new.fax_id)
            if new == old:
                return
            changed[new.fax_id] = new
            for t in diff(old, new):
                if not is_expected(t.from_status, t.to_status) and t.kind in (
                    EventKind.STATUS,
                    EventKind.RECIPIENT,
                ):
                    log.warning("unexpected status move", fax_id=t.fax_id, frm=t.from_status, to=t.to_status)
                journal.append(Journalled(t, how))

        for record in result.records:
            absorb(record, source)
        if reasons & {"poll", "startup", "resync", "request"}:
            missing = [f.fax_id for f in self.in_flight(extension_id) if f.fax_id not in seen]
            if missing:
                found = await self.rc.get_messages(extension_id, missing)
                for item in found.values():
                    if item is not None:
                        # Found without a push hint: record it as a poll find, whatever asked.
                        absorb(item, Source.POLL)
        now = self.wall()
        for state in [*changed.values(), *self.in_flight(extension_id)]:
            current = changed.get(state.fax_id, state)
            t = stalled(current, now=now, stall_after=self.settings.stall_after)
            if t is not None:
                journal.append(Journalled(t, source))
        events = self.store.commit(
            list(changed.values()),
            journal,
            observed_at=_iso(now),
            sync_tokens={extension_id: result.sync_token},
        )
        self.faxes.update(changed)
        self._account(events)
        if events:
            log.info("reconciled", extension=extension_id, source=source.value, events=len(events))
            self.publish(events)

    def _account(self, events: Sequence[Event]) -> None:
        now = self.wall()
        for event in events:
            t = event.transition
            if t.kind in (EventKind.STATUS, EventKind.RECIPIENT):
                if t.kind is EventKind.STATUS:
                    self.metrics.transitions.labels(t.direction, t.to_status).inc()
                    if event.source is Source.POLL:
                        self.metrics.missed_by_push.inc()
                    fax = self.faxes.get(t.fax_id)
                    created = parse_time(fax.created) if fax else None
                    if t.final and t.from_status is not None and created is not None:
                        self.metrics.time_to_final.observe(max(0.0, now - created))
                if t.error_category is not None and t.kind is EventKind.RECIPIENT:
                    self.metrics.failures.labels(t.error_category).inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.in_flight.set(len(self.in_flight()))
        self.metrics.journal_head.set(self.store.head_seq())
        self.metrics.journal_oldest.set(self.store.oldest_seq())

    async def send(
        self,
        extension_id: str,
        *,
        to: Sequence[str],
        documents: Sequence[Document],
        ref: str | None,
        cover_text: str | None,
        resolution: str | None,
    ) -> FaxState:
        """Send a fax and journal RingCentral's answer at once (source ``send``)."""
        if ref is not None and self.by_ref(ref) is not None:
            raise SendError("bad_request", f"ref {ref!r} is already used by another fax")
        try:
            record = await self.rc.send_fax(
                extension_id, to=to, documents=documents, cover_text=cover_text, resolution=resolution
            )
        except ApiError as exc:
            raise SendError("upstream", exc.message or "RingCentral refused the fax", exc.code) from exc
        try:
            state = apply_record(None, record, extension_id=extension_id)
        except RecordError as exc:
            raise SendError("upstream", f"RingCentral's answer was not a fax record: {exc}") from exc
        if state is None:
            raise SendError("upstream", "RingCentral's answer was not a fax record")
        state = replace(state, ref=ref)
        old = self.faxes.get(state.fax_id)
        transitions = [Journalled(t, Source.SEND) for t in diff(old, state)]
        events = self.store.commit([state], transitions, observed_at=_iso(self.wall()))
        self.faxes[state.fax_id] = state
        self._account(events)
        self.publish(events)
        return state


class ReconcileQueue:
    """Runs due keys of a :class:`KeyedQueue` through the reconciler, one key at a time."""

    def __init__(self, queue: KeyedQueue, reconciler: Reconciler, metrics: Metrics) -> None:
        self.queue = queue
        self.reconciler = reconciler
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def hint(self, key: str, reason: str, *, immediate: bool = False) -> None:
        """Ask for a reconcile of ``key``. Never blocks."""
        self.queue.add(key, reason, self._now(), immediate=immediate)
        self.metrics.queue_depth.set(self.queue.depth)
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Until nothing is pending or being processed (used by ``sync`` requests and the drain)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Forever: wait for the next due key, reconcile it, report the result to the queue."""
        while True:
            item = self.queue.pop(self._now())
            if item is None:
                if self.queue.is_idle():
                    self._idle.set()
                deadline = self.queue.next_deadline()
                self._wake.clear()
                timeout = None if deadline is None else max(0.0, deadline - self._now())
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            key, reasons = item
            self.metrics.queue_depth.set(self.queue.depth)
            ok = False
            try:
                await self.reconciler.reconcile(key, reasons)
                ok = True
            except ApiError:
                pass  # logged and counted by the reconciler; the queue backs off
            finally:
                delay = self.queue.done(key, self._now(), ok=ok)
                if delay is not None:
                    log.info("reconcile will be retried", extension=key, delay=round(delay, 2))
                self.metrics.queue_depth.set(self.queue.depth)

    async def drain(self) -> None:
        """Make every pending key due and wait until all are processed (bound it with a timeout)."""
        self.queue.flush(self._now())
        self._wake.set()
        await self.wait_idle()


async def poll_forever(
    queue: ReconcileQueue, extensions: Callable[[], Sequence[str]], settings: ReconcileSettings
) -> None:
    """Safety polls of every extension every ``poll_interval``; active polls of the extensions with
    faxes in flight every ``active_poll_interval``. Runs until cancelled."""
    loop = asyncio.get_running_loop()
    tick = min(settings.active_poll_interval, settings.poll_interval)
    last_full = loop.time()
    while True:
        await asyncio.sleep(tick)
        now = loop.time()
        if now - last_full >= settings.poll_interval:
            keys = set(extensions())
            last_full = now
        else:
            keys = {f.extension_id for f in queue.reconciler.in_flight()}
        for key in sorted(keys):
            queue.hint(key, "poll")
