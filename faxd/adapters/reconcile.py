"""The reconcile worker: turns "extension E changed" into exact, journalled transitions.

Three parts, all thin around the core:

* :class:`Reconciler` reads the message store for one extension and commits what it found:

  1. message-sync: ISync with the stored token alone (the token carries the sync frame); FSync
     (from ``fsync_days`` ago) when there is none or the ISync was refused (any 400: MSG-333,
     CMN-101 "Parameter [syncToken] value is invalid", ...). A refused token is dropped at once, so
     it is presented once; a full sync that fails too is retried with the scheduler's backoff and
     counted in ``faxd_full_sync_failing`` (an alert) until it succeeds.
     When an FSync answers ``olderRecordsExist`` (the frame's ``recordCount`` was too small) it is
     repeated with a larger ``recordCount`` (times 4, up to ``fsync_max_record_count``); what is still left
     out is logged, and any of it faxd already tracks is read by id in step 2. The records are diffed
     with :mod:`faxd.core.status` and the new states, their transitions and the new syncToken are
     committed in ONE store transaction, then published. Duplicates (the server's 5 s overlap, a
     record seen by sync and bulk GET) diff to nothing; deleted and purged records that come back as
     id + availability only become ``availability`` events.
  2. When a poll, start-up, resync, client request or settle timer asked (not for a plain push hint),
     or after an FSync: a bulk GET (chunks of 50) of the faxes still in flight (or waiting to settle)
     that step 1 did not return. A 404 naming the message means RingCentral dropped it: the fax
     becomes ``Purged`` (one ``availability`` event, final). A 404 naming the *extension*
     (``CMN-102`` ``extensionId``: deleted or mistyped) purges nothing: the reconcile fails, the
     extension is counted in ``faxd_extensions_not_found`` (logged once, in STATUS=) and retried
     every ``missing_extension_retry`` until RingCentral knows it again. Ids whose entry failed
     otherwise are committed as far as they went and the reconcile raises :class:`BulkIncomplete`,
     so the scheduler retries it with backoff. A chunk the budget cannot pay now ends the reconcile
     as deferred: what was read is committed, and its next grant reads only the rest. What
     step 2 finds is journalled with source ``poll`` whatever asked: it is what push and sync missed,
     and counts in ``faxd_missed_by_push_total``.
  3. Without any API call: ``stalled`` events (checked when step 2 runs, i.e. at least every
     ``active_poll_interval`` while faxes are in flight, not on every push; once per fax and process)
     and ``settled`` events (the ``Sent`` settle rule,
     :func:`faxd.core.status.settled`), committed with step 2's states.

  Memory holds only the faxes that can still produce an event: in flight, or waiting to settle. That
  bookkeeping (the held faxes, their per-extension indexes, settle waits, stall marks) and the rules
  of step 3 are :class:`faxd.core.tracking.Tracker`, pure and told only what the store committed;
  the Reconciler does the I/O around it (REST, store, metrics, publishing). Every other fax lives only
  in the store: a record that message-sync returns for such a fax is diffed against its stored state,
  read by id (one batched query per reconcile) before the diff, so nothing is repeated or lost;
  ``status``, ``history`` and ``by_ref`` read it by primary key (or the UNIQUE ``ref``) on demand.

* :class:`ReconcileWork` makes the reconciler the request scheduler's work (keys ``("ext", id)``,
  their cost, the runner the driver of :mod:`faxd.adapters.scheduling` calls with each grant). The
  scheduler decides when: debounced push hints, polls every ``poll_interval`` (extensions with faxes
  in flight every ``active_poll_interval``), resyncs, a client's ``sync``, within the rate budget.
* :func:`timers_forever` asks for a ``settle`` check of an extension when one of its ``Sent`` is due
  to settle, and prunes the journal (``retention_days``) at start and every ``prune_interval``.

Log events are named ``area.what`` (``reconcile.failed``, ``journal.pruned``); any human sentence is
in the ``detail`` field.

This module must not parse WebSocket frames or talk to socket clients; it gets keys and gives events.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from faxd.adapters.metrics import SYNC_RESET_CODES, Metrics
from faxd.adapters.rest import (
    BULK_MAX,
    ApiError,
    Document,
    ExtensionNotFound,
    NotSent,
    RingCentral,
    SyncResult,
    SyncTokenStale,
)
from faxd.adapters.scheduling import RequestDriver
from faxd.adapters.store import Journalled, Store
from faxd.core.model import Event, EventKind, FaxState, Source
from faxd.core.polls import PollKind, ReconcileTimers
from faxd.core.protocol import SendError
from faxd.core.ratebudget import LIGHT
from faxd.core.scheduler import Grant, Key, Outcome, Priority, Work, ext_key
from faxd.core.status import RecordError, apply_record, diff, is_expected, parse_time, unsettled
from faxd.core.tracking import Tracker

log = structlog.get_logger(__name__)

Publish = Callable[[Sequence[Event]], None]
#: (the new states of a batch, its transitions) -> the transitions to journal.
Review = Callable[[Mapping[str, FaxState], list[Journalled]], list[Journalled]]

DAY = 86400.0
#: Reasons after which the in-flight faxes the sync did not return are read by id (bulk GET).
CHECK_REASONS = frozenset({"poll", "startup", "resync", "request", "settle"})


@dataclass(frozen=True)
class ReconcileSettings:
    debounce: float = 1.0
    max_delay: float = 5.0
    poll_interval: float = 300.0
    active_poll_interval: float = 60.0
    stall_after: float = 1800.0
    sent_settle: float = 0.0  # seconds a Sent must hold before it is final; 0 = final at once
    retention_days: float | None = None  # journal retention; None = keep everything
    prune_interval: float = 3600.0
    fsync_days: float = 7.0  # how far back the first full sync looks
    fsync_record_count: int = 250
    fsync_max_record_count: int = 4000
    #: Retry interval of an extension RingCentral does not know (404 CMN-102 extensionId): a
    #: configuration problem that a fast retry would not fix.
    missing_extension_retry: float = 600.0


class BulkIncomplete(ApiError):
    """Some ids of a bulk GET failed (not 404): what was read is committed, the rest is retried."""


def _source(reasons: set[str]) -> Source:
    if "push" in reasons:
        return Source.PUSH
    if reasons & {"startup", "resync"}:
        return Source.STARTUP
    return Source.POLL


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Batch:
    """What one step of a reconcile found: new states and transitions to commit together."""

    changed: dict[str, FaxState] = field(default_factory=dict)
    journal: list[Journalled] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    #: Stored states of faxes not held in memory that this step's records name (read before diffing).
    base: dict[str, FaxState] = field(default_factory=dict)


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
        #: The faxes in flight or waiting to settle, with their indexes and settle waits (the store
        #: has every fax): :mod:`faxd.core.tracking`, fed only after the store committed.
        self.tracker = Tracker()
        self._sending_refs: set[str] = set()
        self._fsync_failing: set[str] = set()  # extensions whose last full sync failed
        self._not_found: set[str] = set()  # extensions RingCentral answered 404 extensionId for
        self._bulk_left: dict[str, set[str]] = {}  # what a check deferred for budget has still to read
        for state in store.load_faxes(in_flight_only=True).values():
            self.tracker.hold(state)
        if settings.sent_settle > 0:
            # With sent_settle 0 every Sent is journalled final: nothing can wait, skip the journal scan.
            # A wait survives restarts through the journal: since = when the Sent was journalled.
            waiting = [(key, at) for t, at in store.unsettled_sent() if (key := unsettled(t)) is not None]
            known = store.faxes_by_id({key[0] for key, _ in waiting if key[0] not in self.faxes})
            self.tracker.restore(
                [(key, parse_time(observed_at) or wall()) for key, observed_at in waiting], known
            )
        #: Called after each commit that changed faxes (which extensions have faxes in flight may have
        #: changed: a send, a resend, a reconcile).
        self.on_tracked: Callable[[], None] | None = None
        #: Set whenever a timer (settle) may have to fire earlier than :func:`timers_forever` planned.
        self.timers_changed = asyncio.Event()
        #: Sees (and may rewrite) every batch of transitions just before it is committed: the resend
        #: policy (faxd.adapters.resend) marks the attempts of the faxes it resends there.
        self.review: Review | None = None
        self._update_gauges()

    def update_settings(self, settings: ReconcileSettings) -> None:
        """New settings (a reload): each is read where it is used, so they apply from the next use. The
        poll timings belong to the scheduler, the timers to :func:`timers_forever`, which its owner
        starts again."""
        self.settings = settings

    # -- what is held in memory (the tracker's view) -------------------------------------------------

    @property
    def faxes(self) -> Mapping[str, FaxState]:
        """The faxes held in memory: exactly those in flight or waiting to settle."""
        return self.tracker.faxes

    def fax(self, fax_id: str) -> FaxState | None:
        """A fax by id: from memory when held, else from the store."""
        held = self.tracker.get(fax_id)
        return held if held is not None else self.store.fax(fax_id)

    def in_flight(self, extension_id: str | None = None) -> list[FaxState]:
        return self.tracker.in_flight(extension_id)

    def in_flight_count(self) -> int:
        return self.tracker.in_flight_count()

    def active_extensions(self) -> list[str]:
        """Extensions with at least one fax in flight."""
        return self.tracker.active_extensions()

    def tracked(self, extension_id: str) -> list[FaxState]:
        """Faxes of ``extension_id`` that can still produce an event: in flight or waiting to settle."""
        return self.tracker.tracked(extension_id)

    def next_settle(self) -> tuple[float, str] | None:
        """(wall time, extension) of the earliest ``Sent`` due to settle; None when nothing waits."""
        return self.tracker.next_settle(self.settings.sent_settle)

    def problems(self) -> list[str]:
        """Short phrases for the STATUS= line about extensions faxd cannot track now; no ids."""
        out: list[str] = []
        if self._fsync_failing:
            out.append(f"full sync failing for {len(self._fsync_failing)} extension(s)")
        if self._not_found:
            out.append(f"{len(self._not_found)} configured extension(s) not found by RingCentral")
        return out

    def by_ref(self, ref: str) -> FaxState | None:
        """The fax sent with ``ref`` (the store's UNIQUE index; held faxes are the same states)."""
        found = self.store.fax_by_ref(ref)
        if found is None:
            return None
        return self.faxes.get(found.fax_id, found)

    async def reconcile(
        self, extension_id: str, reasons: set[str], *, check: bool | None = None, retry: bool = False
    ) -> None:
        """One reconcile of one extension. Raises :class:`ApiError` on failure (the scheduler backs
        off). ``check``: read the faxes in flight by id too (default: when ``reasons`` ask for it);
        ``retry``: it follows a failure (counted with trigger ``retry``)."""
        started = time.perf_counter()
        trigger = next(iter(sorted(reasons))) if len(reasons) == 1 else _source(reasons).value
        if retry:
            trigger = "retry"
        try:
            await self._reconcile(
                extension_id, reasons, bool(reasons & CHECK_REASONS) if check is None else check
            )
        except NotSent as exc:
            # Not a failure: a request did not fit the budget now (the scheduler grants the rest
            # later) or faxd is stopping. What this reconcile committed before is consistent.
            log.info("reconcile.deferred", extension=extension_id, group=exc.group, code=exc.code)
            raise
        except ExtensionNotFound as exc:
            self.metrics.reconciles.labels(trigger, "error").inc()
            if extension_id not in self._not_found:
                # Once per episode: it is retried every missing_extension_retry until it is back.
                log.error(
                    "reconcile.extension_not_found",
                    detail="RingCentral does not know this extension (deleted, or mistyped in"
                    " ringcentral.extensions); its faxes are not tracked until it is back",
                    extension=extension_id,
                    code=exc.code,
                    retry_s=self.settings.missing_extension_retry,
                )
                self._not_found.add(extension_id)
                self.metrics.extensions_not_found.set(len(self._not_found))
            raise
        except ApiError as exc:
            self.metrics.reconciles.labels(trigger, "error").inc()
            log.warning("reconcile.failed", extension=extension_id, code=exc.code, status=exc.status)
            raise
        if extension_id in self._not_found:
            log.info("reconcile.extension_found", extension=extension_id)
            self._not_found.discard(extension_id)
            self.metrics.extensions_not_found.set(len(self._not_found))
        self.metrics.reconciles.labels(trigger, "ok").inc()
        self.metrics.reconcile_duration.observe(time.perf_counter() - started)
        self.metrics.last_sync.set(self.wall())

    async def _sync(self, extension_id: str) -> tuple[SyncResult, bool]:
        """message-sync: ISync, or FSync (returned True) when there is no token or it was refused.

        A refused ISync (any 400: MSG-333, CMN-101, ...) drops the token at once, so the token is
        presented once: if the full sync fails too, the scheduler's retries go straight to a full sync.
        Extensions whose full sync fails are counted (``faxd_full_sync_failing``) until one succeeds.
        """
        token = self.store.sync_token(extension_id)
        if token is not None:
            try:
                # The token alone: it carries the frame the full sync set up (no dateFrom, which
                # would move the frame's start and drop changes to older faxes).
                return await self.rc.message_sync(extension_id, token), False
            except SyncTokenStale as exc:
                code = exc.code if exc.code in SYNC_RESET_CODES else "other"
                self.metrics.sync_token_resets.labels(code).inc()
                # MSG-333 is RingCentral's routine "full sync required"; anything else is worth a look.
                level = log.info if exc.code == "MSG-333" else log.warning
                level(
                    "reconcile.sync_token_refused",
                    detail="running a full sync",
                    extension=extension_id,
                    code=exc.code,
                )
                self.store.commit([], [], observed_at=_iso(self.wall()), sync_tokens={extension_id: None})
        try:
            result = await self._full_sync(extension_id)
        except (ExtensionNotFound, NotSent):
            raise  # not a sync problem: a missing extension (counted as such), or not sent for budget
        except ApiError as exc:
            if extension_id not in self._fsync_failing:
                log.warning(
                    "reconcile.full_sync_failed",
                    detail="retried with backoff",
                    extension=extension_id,
                    code=exc.code,
                    status=exc.status,
                )
                self._fsync_failing.add(extension_id)
                self.metrics.full_sync_failing.set(len(self._fsync_failing))
            raise
        if extension_id in self._fsync_failing:
            log.info("reconcile.full_sync_recovered", extension=extension_id)
            self._fsync_failing.discard(extension_id)
            self.metrics.full_sync_failing.set(len(self._fsync_failing))
        return result, True

    async def _full_sync(self, extension_id: str) -> SyncResult:
        """FSync of the Fax box from ``fsync_days`` ago, widened while the frame is too small."""
        date_from = datetime.fromtimestamp(self.wall(), UTC) - timedelta(days=self.settings.fsync_days)
        count = self.settings.fsync_record_count
        while True:
            result = await self.rc.message_sync(extension_id, None, date_from=date_from, record_count=count)
            if not result.older_records_exist or count >= self.settings.fsync_max_record_count:
                break
            count = min(self.settings.fsync_max_record_count, count * 4)
            log.info(
                "reconcile.full_sync_widened",
                detail="olderRecordsExist: asking again with a larger recordCount",
                extension=extension_id,
                record_count=count,
            )
        if result.older_records_exist:
            log.warning(
                "reconcile.full_sync_truncated",
                detail="older faxes left out; the tracked ones are read by id",
                extension=extension_id,
                record_count=count,
            )
        return result

    def _absorb(self, batch: _Batch, extension_id: str, record: Any, how: Source) -> None:
        fax_id = str(record.get("id")) if isinstance(record, dict) else ""
        old = batch.changed.get(fax_id) or self.tracker.get(fax_id) or batch.base.get(fax_id)
        try:
            new = apply_record(old, record, extension_id=extension_id)
        except RecordError as exc:
            self.metrics.api_bad_bodies.labels("message-record").inc()
            log.warning("reconcile.bad_record", detail="malformed message record ignored", reason=str(exc))
            return
        if new is None:
            return
        batch.seen.add(new.fax_id)
        if new == old:
            return  # a duplicate (overlap, or seen by sync and bulk GET): nothing new
        batch.changed[new.fax_id] = new
        for t in diff(old, new, settle=self.settings.sent_settle > 0):
            if not is_expected(t.from_status, t.to_status) and t.kind in (
                EventKind.STATUS,
                EventKind.RECIPIENT,
            ):
                log.warning("reconcile.unexpected_move", fax_id=t.fax_id, frm=t.from_status, to=t.to_status)
            batch.journal.append(Journalled(t, how))

    def _commit(self, batch: _Batch, *, sync_tokens: dict[str, str | None] | None = None) -> list[Event]:
        now = self.wall()
        journal = batch.journal if self.review is None else self.review(batch.changed, batch.journal)
        events = self.store.commit(
            list(batch.changed.values()), journal, observed_at=_iso(now), sync_tokens=sync_tokens
        )
        if self.tracker.committed([e.transition for e in events], batch.changed.values(), now=now):
            self.timers_changed.set()
        if batch.changed and self.on_tracked is not None:
            self.on_tracked()
        self._account(events, batch.changed)
        if events:
            self.publish(events)
        return events

    async def _reconcile(self, extension_id: str, reasons: set[str], check: bool) -> None:
        source = _source(reasons)
        result, full = await self._sync(extension_id)
        synced = _Batch()
        # Records of faxes not held (finished long ago, say): diff them against their stored state.
        records: list[Any] = result.records
        ids = {str(r.get("id")) for r in records if isinstance(r, dict) and r.get("id") is not None}
        unheld = [fax_id for fax_id in ids if fax_id not in self.faxes]
        if unheld:
            synced.base = self.store.faxes_by_id(unheld)
        for record in records:
            self._absorb(synced, extension_id, record, source)
        events = self._commit(synced, sync_tokens={extension_id: result.sync_token})

        checked = _Batch(seen=set(synced.seen))
        check = full or check
        deferred: NotSent | None = None
        failed: list[str] = []
        if check:
            failed, deferred = await self._read_tracked(checked, extension_id)
        checked.journal += [
            Journalled(t, source)
            for t in self.tracker.due(
                extension_id,
                checked.changed,
                now=self.wall(),
                stall_after=self.settings.stall_after,
                settle_after=self.settings.sent_settle,
                stalls=check,
            )
        ]
        events += self._commit(checked)
        self.tracker.mark_stalled(j.transition for j in checked.journal)
        if events:
            log.info("reconcile.done", extension=extension_id, source=source.value, events=len(events))
        if deferred is not None:
            raise deferred  # what was read is committed; the next grant reads on
        if failed:
            raise BulkIncomplete(0, "bulk_incomplete", f"{len(failed)} of the in-flight faxes not read")

    async def _read_tracked(self, batch: _Batch, extension_id: str) -> tuple[list[str], NotSent | None]:
        """Step 2: bulk GETs of the held faxes the sync did not return (``batch.seen``) into ``batch``.

        Returns the ids whose entry failed (not 404: read again on the retry) and, when a chunk did
        not fit the budget, that refusal: what was read stays in ``batch``, and the next check (the
        same work, granted again) reads only what this one did not reach, so a check of thousands of
        faxes in flight ends after as many grants as it needs instead of starting over each time.
        """
        tracked = [f for f in self.tracked(extension_id) if f.fax_id not in batch.seen]
        batch.base = {f.fax_id: f for f in tracked}  # in case one leaves memory during the GET
        missing = [f.fax_id for f in tracked]
        left = self._bulk_left.pop(extension_id, None)
        if left is not None:
            missing = [fax_id for fax_id in missing if fax_id in left]
        failed: list[str] = []
        for at in range(0, len(missing), BULK_MAX):
            chunk = missing[at : at + BULK_MAX]
            try:
                found = await self.rc.get_messages(extension_id, chunk)
            except NotSent as exc:
                self._bulk_left[extension_id] = set(missing[at:])
                return failed, exc
            for fax_id in chunk:
                if fax_id not in found:
                    failed.append(fax_id)
                    continue
                item = found[fax_id]
                # 404: RingCentral no longer has the message (purged and gone).
                record = item if item is not None else {"id": fax_id, "availability": "Purged"}
                # Found without a push hint: record it as a poll find, whatever asked.
                self._absorb(batch, extension_id, record, Source.POLL)
        return failed, None

    def prune(self) -> tuple[int, int]:
        """Apply ``retention_days`` to the journal and to final faxes (see :meth:`Store.prune`).

        A fax row is kept at least as long as a full sync can still return it (``fsync_days``), so a
        pruned fax never comes back as "new" and repeats its events.
        """
        days = self.settings.retention_days
        if days is None:
            return (0, 0)
        now = self.wall()
        faxes_before = now - max(days, self.settings.fsync_days) * DAY
        rows, gone = self.store.prune(before=_iso(now - days * DAY), faxes_before=faxes_before)
        if gone:
            # Pruned faxes are final (never in flight); drop any that still waited to settle.
            kept = self.store.faxes_by_id(list(self.faxes))
            self.tracker.forget([f for f in self.faxes if f not in kept])
        if rows or gone:
            log.info("journal.pruned", rows=rows, faxes=gone, oldest_seq=self.store.oldest_seq())
        self._update_gauges()
        return rows, gone

    def _account(self, events: Sequence[Event], changed: Mapping[str, FaxState]) -> None:
        now = self.wall()
        for event in events:
            t = event.transition
            if t.kind in (EventKind.STATUS, EventKind.RECIPIENT):
                if event.source is Source.POLL:
                    self.metrics.missed_by_push.inc()
                if t.kind is EventKind.STATUS:
                    self.metrics.transitions.labels(t.direction, t.to_status).inc()
                    fax = changed.get(t.fax_id) or self.tracker.get(t.fax_id)
                    created = parse_time(fax.created) if fax else None
                    if t.final and t.from_status is not None and created is not None:
                        self.metrics.time_to_final.observe(max(0.0, now - created))
                if t.error_category is not None and t.kind is EventKind.RECIPIENT:
                    self.metrics.failures.labels(t.error_category).inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.in_flight.set(self.in_flight_count())
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
        cover_index: int | None = None,
    ) -> FaxState:
        """Send a fax and journal RingCentral's answer at once (source ``send``).

        ``cover_index`` 0 means no cover page, so a ``cover_text`` (printed on the cover page) with it
        is refused rather than silently dropped.
        """
        if ref is not None and (ref in self._sending_refs or self.by_ref(ref) is not None):
            raise SendError("bad_request", f"ref {ref!r} is already used by another fax")
        if not documents:
            raise SendError("bad_request", "a fax needs at least one document")
        if cover_text is not None and cover_index == 0:
            raise SendError(
                "bad_request",
                "cover_text is printed on a cover page, but cover_index is 0 (no cover page):"
                " give cover_index 1-13, or set send.cover_index",
            )
        if ref is not None:
            # Reserved across the await: two overlapping sends with one ref must not both reach
            # RingCentral (the second would be sent but could never be journalled with its ref).
            self._sending_refs.add(ref)
        try:
            record = await self.rc.send_fax(
                extension_id,
                to=to,
                documents=documents,
                cover_text=cover_text,
                resolution=resolution,
                cover_index=cover_index,
            )
        except NotSent:
            raise  # not sent for want of budget: the scheduler's affair, not RingCentral's refusal
        except ApiError as exc:
            raise SendError("upstream", exc.message or "RingCentral refused the fax", exc.code) from exc
        finally:
            if ref is not None:
                self._sending_refs.discard(ref)
        return self.adopt(extension_id, record, ref=ref)

    def adopt(self, extension_id: str, record: Any, *, ref: str | None = None) -> FaxState:
        """Journal the record RingCentral answered a send (or resend) with, at once (source ``send``)."""
        try:
            state = apply_record(None, record, extension_id=extension_id)
        except RecordError as exc:
            raise SendError("upstream", f"RingCentral's answer was not a fax record: {exc}") from exc
        if state is None:
            raise SendError("upstream", "RingCentral's answer was not a fax record")
        state = replace(state, ref=ref)
        old = self.fax(state.fax_id)
        settle = self.settings.sent_settle > 0
        transitions = [Journalled(t, Source.SEND) for t in diff(old, state, settle=settle)]
        self._commit(_Batch(changed={state.fax_id: state}, journal=transitions))
        return state


class ReconcileWork:
    """The reconciler as the request scheduler's work: keys ``("ext", id)``, what each costs, and the
    runner the driver calls with each grant.

    A push-hinted reconcile costs one Light request (the ISync); a check (every other reason) one
    more per 50 faxes tracked for the extension (the bulk GETs; the scheduler caps a grant at what its
    bucket holds, and the rest is read at the next grant). After every commit that changed faxes (a
    reconcile, a send, a resend) the scheduler hears which extensions have faxes in flight (their
    active polls).
    """

    def __init__(self, driver: RequestDriver, reconciler: Reconciler) -> None:
        self.driver = driver
        self.reconciler = reconciler
        driver.register("ext", self.run)
        reconciler.on_tracked = self.refresh_active

    def cost(self, extension_id: str, *, check: bool) -> dict[str, int]:
        reads = math.ceil(len(self.reconciler.tracked(extension_id)) / BULK_MAX) if check else 0
        return {LIGHT: 1 + reads}

    def poll_cost(self, key: Key, _kind: PollKind) -> dict[str, int]:
        """The cost of a poll of ``key`` (for :class:`faxd.core.scheduler.Scheduler`)."""
        return self.cost(key[1], check=True)

    def ask(self, extension_id: str, priority: Priority, reason: str, *, at: float | None = None) -> bool:
        """Ask for a reconcile of ``extension_id`` (``at``: not before that loop time)."""
        check = priority is not Priority.PUSH
        work = Work(
            ext_key(extension_id), priority, frozenset({reason}), self.cost(extension_id, check=check)
        )
        return self.driver.submit(work, at=at)

    def refresh_active(self) -> None:
        self.driver.set_active(ext_key(e) for e in self.reconciler.active_extensions())

    async def run(self, grant: Grant) -> Outcome | None:
        """One granted reconcile; errors become the grant's outcome (the driver maps ApiErrors)."""
        try:
            retry = self.driver.sched.failures(grant.key) > 0
            await self.reconciler.reconcile(grant.key[1], set(grant.reasons), check=grant.checks, retry=retry)
        except ExtensionNotFound:
            # A configuration problem that a fast retry would not fix.
            return Outcome.error(self.reconciler.settings.missing_extension_retry)
        return None


async def timers_forever(work: ReconcileWork) -> None:
    """The reconcile engine's timers besides polls (the scheduler polls), until cancelled (the
    schedule is :class:`faxd.core.polls.ReconcileTimers`; this only drives it on the loop's clock):

    * a ``settle`` check of an extension when one of its ``Sent`` is due to settle (``sent_settle``);
      the reconcile re-reads the fax and journals ``settled`` if it still holds;
    * journal retention (``retention_days``) at start and every ``prune_interval``.

    Started again by its owner when the settings change.
    """
    loop = asyncio.get_running_loop()
    reconciler = work.reconciler
    settings = reconciler.settings
    timers: ReconcileTimers[str] = ReconcileTimers(
        loop.time(),
        prune_interval=settings.prune_interval if settings.retention_days is not None else None,
        settle_quiet=max(settings.debounce, 0.5),
    )
    while True:
        now = loop.time()
        for _ in timers.due(now):
            reconciler.prune()
        # Settle waits are kept in wall time; the timers run on the loop's clock.
        first = reconciler.next_settle()
        settle = None if first is None else (now + max(0.0, first[0] - reconciler.wall()), first[1])
        if settle is not None and timers.settle_due(now, *settle):
            work.ask(settle[1], Priority.SETTLE, "settle")
            continue
        reconciler.timers_changed.clear()
        wake = timers.next_wake(settle)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if math.isinf(wake) else max(0.0, wake - now)):
                await reconciler.timers_changed.wait()
