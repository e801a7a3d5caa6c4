"""The resend worker (``send.retry``): journals the attempts of each logical fax and resends on time.

The rules (what is retried, when, when faxd gives up) are :mod:`faxd.core.resend`; this module does the
I/O around them:

* :class:`ResendBook` is the ``resends`` table (store migration 3): one row per attempt that needs
  remembering (every resent message, and any attempt a decision was made about), with the planned
  time of the next attempt. It is what makes a retry timer survive a restart.
* :meth:`Resender.review` is the reconciler's review hook: before each batch of transitions is
  committed it marks those of attempts (ref, attempt number, ``retry_at``, ``gave_up``) and, when an
  attempt just ended, decides and writes the decision to the book first. A crash between the two
  writes leaves the decision in the book: the same transitions, read again after the restart, are
  marked from it (nothing is decided twice).
* :meth:`Resender.run` sleeps until the next planned attempt, then resends through
  :meth:`RingCentral.resend_fax` (``originalMessageId``, the Heavy group's budget) to the failed
  recipients only, writes the new attempt to the book, and journals RingCentral's answer.

At most once per attempt: the row is ``resending`` while the request is out. A row still ``resending``
at start-up means faxd stopped or crashed during the request, whose outcome is unknown; it is not
repeated (that could fax the same document twice) and the logical fax ends with ``gave_up:
interrupted``. A request that failed without reaching RingCentral for sure (5xx, 429, timeout, no
connection) is tried again a minute later (or after Retry-After), until the deadline; a 4xx other
than 408/429 ends the logical fax with ``gave_up: refused``.

Log events are ``resend.*``; phone numbers are never logged (only how many recipients).
This module must not decide policy (faxd.core.resend does) nor read RingCentral's message store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import structlog

from faxd.adapters.metrics import Metrics
from faxd.adapters.reconcile import Reconciler
from faxd.adapters.rest import ApiError, RingCentral, Stopping
from faxd.adapters.store import Journalled, Store
from faxd.core.model import FaxState, Source
from faxd.core.protocol import SendError
from faxd.core.resend import Attempt, Decision, GiveUp, RetryPolicy, decide, gave_up, iso, mark, retry_delay
from faxd.core.status import parse_time

log = structlog.get_logger(__name__)

#: Seconds before a resend request that failed for a passing reason is tried again (at least).
REQUEST_RETRY = 60.0

#: States of a row: ``sent`` (a resent message, its outcome pending), ``planned`` (the next attempt is
#: due at ``retry_at``), ``resending`` (its request is out), ``resent`` (the next attempt has its own
#: row), ``gave_up``, ``done`` (ended without a failure the policy retries).
_OPEN = ("planned", "resending")


@dataclass(frozen=True)
class Row:
    """One row of the ``resends`` table."""

    fax_id: str
    ref: str
    attempt: int
    first_at: float
    extension_id: str
    state: str
    retry_at: float | None
    targets: tuple[str, ...]
    gave_up: str | None

    @property
    def of(self) -> Attempt:
        return Attempt(self.ref, self.attempt, self.first_at)

    @property
    def decision(self) -> Decision | None:
        """The decision this row holds; None when none was made (or it ended without one)."""
        if self.gave_up is not None:
            return Decision(self.targets, gave_up=GiveUp(self.gave_up))
        if self.state in ("planned", "resending", "resent"):
            return Decision(self.targets, retry_at=self.retry_at)
        return None


_COLUMNS = "fax_id, ref, attempt, first_at, extension_id, state, retry_at, targets, gave_up"


class ResendBook:
    """The ``resends`` table, on the store's connection (one writer, the event loop's thread)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[Row]:
        rows = self._store.db.execute(f"SELECT {_COLUMNS} FROM resends {sql}", params).fetchall()
        return [
            Row(str(f), str(r), int(a), float(t), str(e), str(s), w, tuple(json.loads(g)), u)
            for f, r, a, t, e, s, w, g, u in rows
        ]

    def row(self, fax_id: str) -> Row | None:
        found = self._rows("WHERE fax_id = ?", (fax_id,))
        return found[0] if found else None

    def open_rows(self, state: str) -> list[Row]:
        """Rows in ``state`` (``planned`` or ``resending``), the next due first."""
        assert state in _OPEN
        return self._rows("WHERE state = ? ORDER BY retry_at, fax_id", (state,))

    def record(self, fax_id: str, extension_id: str, attempt: Attempt, decision: Decision | None) -> None:
        """The decision about attempt ``attempt`` (message ``fax_id``); None: it ended without one."""
        if decision is None:
            state, retry_at, reason = "done", None, None
        elif decision.gave_up is not None:
            state, retry_at, reason = "gave_up", None, decision.gave_up.value
        else:
            state, retry_at, reason = "planned", decision.retry_at, None
        self._store.db.execute(
            f"INSERT INTO resends ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (fax_id) DO UPDATE SET state = excluded.state, retry_at = excluded.retry_at,"
            " targets = excluded.targets, gave_up = excluded.gave_up",
            (
                fax_id,
                attempt.ref,
                attempt.number,
                attempt.first_at,
                extension_id,
                state,
                retry_at,
                json.dumps(list(decision.targets) if decision else []),
                reason,
            ),
        )

    def set_state(self, fax_id: str, state: str, *, retry_at: float | None = None) -> None:
        self._store.db.execute(
            "UPDATE resends SET state = ?, retry_at = COALESCE(?, retry_at) WHERE fax_id = ?",
            (state, retry_at, fax_id),
        )

    def give_up(self, fax_id: str, reason: GiveUp) -> None:
        self._store.db.execute(
            "UPDATE resends SET state = 'gave_up', gave_up = ? WHERE fax_id = ?", (reason.value, fax_id)
        )

    def forget_pruned(self) -> None:
        """Drop the rows of finished tries whose fax retention removed: nothing can follow them."""
        self._store.db.execute(
            "DELETE FROM resends WHERE state IN ('resent', 'gave_up', 'done')"
            " AND fax_id NOT IN (SELECT fax_id FROM faxes)"
        )

    def resent(self, previous: Row, fax_id: str) -> Attempt:
        """Message ``fax_id`` is the attempt after ``previous``: both rows change in one transaction."""
        attempt = Attempt(previous.ref, previous.attempt + 1, previous.first_at)
        db = self._store.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE resends SET state = 'resent' WHERE fax_id = ?", (previous.fax_id,))
            db.execute(
                f"INSERT INTO resends ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, 'sent', NULL, '[]', NULL)",
                (fax_id, attempt.ref, attempt.number, attempt.first_at, previous.extension_id),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return attempt


class Resender:
    """The resend policy at work: the reconciler's review hook and the timer of planned attempts."""

    def __init__(
        self,
        policy: RetryPolicy,
        rc: RingCentral,
        reconciler: Reconciler,
        metrics: Metrics,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.rc = rc
        self.reconciler = reconciler
        self.metrics = metrics
        self.wall = wall
        self.book = ResendBook(reconciler.store)
        self._wake = asyncio.Event()
        reconciler.review = self.review
        self.book.forget_pruned()
        self._count_planned()

    def _count_planned(self) -> None:
        self.metrics.resends_planned.set(len(self.book.open_rows("planned")))

    # -- the review hook ------------------------------------------------------------------------------

    def review(self, changed: Mapping[str, FaxState], journal: list[Journalled]) -> list[Journalled]:
        """``journal`` with the transitions of attempts marked; decisions written to the book first."""
        now = self.wall()
        seen: dict[str, tuple[Attempt, Decision | None] | None] = {}
        out: list[Journalled] = []
        for j in journal:
            fax_id = j.transition.fax_id
            if fax_id not in seen:
                # A stall or settle of a fax this batch did not change: its state is the held one.
                state = changed.get(fax_id) or self.reconciler.fax(fax_id)
                seen[fax_id] = self._decided(state, now)
            found = seen[fax_id]
            if found is None:
                out.append(j)
            else:
                out.append(Journalled(mark(j.transition, *found), j.source))
        return out

    def _attempt(self, state: FaxState, row: Row | None, now: float) -> Attempt | None:
        if row is not None:
            return row.of
        if state.ref is not None:
            # Attempt 1 needs no row until it ends: a fax faxd sent with a ref.
            return Attempt(state.ref, 1, parse_time(state.created) or now)
        return None

    def _decided(self, state: FaxState | None, now: float) -> tuple[Attempt, Decision | None] | None:
        """(attempt, decision) of ``state``'s message; None when it is no attempt of a logical fax."""
        if state is None or state.direction != "Outbound":
            return None
        row = self.book.row(state.fax_id)
        attempt = self._attempt(state, row, now)
        if attempt is None:
            return None
        if row is not None and row.state != "sent":
            return attempt, row.decision  # decided before (this process or an earlier one)
        if state.in_flight:
            return attempt, None
        decision = decide(self.policy, state, attempt, now)
        if decision is not None or row is not None:
            self.book.record(state.fax_id, state.extension_id, attempt, decision)
        if decision is not None:
            self._decision_made(state.fax_id, attempt, decision)
        return attempt, decision

    def _decision_made(self, fax_id: str, attempt: Attempt, decision: Decision) -> None:
        if decision.gave_up is not None:
            self.metrics.resend_gave_up.labels(decision.gave_up.value).inc()
            log.warning(
                "resend.gave_up",
                ref=attempt.ref,
                fax_id=fax_id,
                attempt=attempt.number,
                reason=decision.gave_up.value,
                recipients=len(decision.targets),
            )
            return
        assert decision.retry_at is not None
        log.info(
            "resend.planned",
            ref=attempt.ref,
            fax_id=fax_id,
            attempt=attempt.number + 1,
            retry_at=iso(decision.retry_at),
            recipients=len(decision.targets),
        )
        self._count_planned()
        self._wake.set()

    # -- the timer -------------------------------------------------------------------------------------

    async def run(self, connected: asyncio.Event) -> NoReturn:
        """Forever: resend each planned attempt when it is due (once RingCentral is logged in)."""
        for row in self.book.open_rows("resending"):
            log.warning(
                "resend.interrupted",
                ref=row.ref,
                fax_id=row.fax_id,
                detail="faxd stopped during this resend request; it is not repeated",
            )
            self._give_up(row, GiveUp.INTERRUPTED)
        await connected.wait()
        while True:
            self._wake.clear()
            planned = self.book.open_rows("planned")
            if not planned:
                await self._wake.wait()
                continue
            row = planned[0]
            delay = (row.retry_at or 0.0) - self.wall()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            await self.resend(row)

    async def resend(self, row: Row) -> None:
        """Send attempt ``row.attempt + 1`` now: RingCentral's resend of ``row``'s message."""
        if retry_delay(self.policy, row.of, self.wall(), 0.0) is None:
            # Planned in time, but faxd was down (or waited for budget) until after the deadline.
            self._give_up(row, GiveUp.DEADLINE)
            return
        self.book.set_state(row.fax_id, "resending")
        self._count_planned()
        try:
            record = await self.rc.resend_fax(row.extension_id, row.fax_id, to=row.targets)
        except Stopping:
            # faxd is stopping and the request would have had to wait for budget: it never went
            # out, so it stays planned for the next start. Nothing more is sent until the stop.
            self.book.set_state(row.fax_id, "planned")
            log.info("resend.deferred", ref=row.ref, fax_id=row.fax_id)
            await asyncio.Event().wait()  # until the stop cancels this task
            raise AssertionError("unreachable") from None
        except ApiError as exc:
            self._request_failed(row, exc)
            return
        new_id = record.get("id")
        if not isinstance(new_id, str | int) or isinstance(new_id, bool) or not str(new_id):
            log.warning("resend.bad_answer", ref=row.ref, fax_id=row.fax_id, detail="no message id")
            self._give_up(row, GiveUp.REFUSED)
            return
        attempt = self.book.resent(row, str(new_id))
        self.metrics.resends.labels("sent").inc()
        log.info("resend.sent", ref=row.ref, fax_id=str(new_id), attempt=attempt.number, of=row.fax_id)
        try:
            self.reconciler.adopt(row.extension_id, record)
        except SendError as exc:
            # The new message is in the book: the next reconcile finds it and marks it.
            log.warning("resend.bad_answer", ref=row.ref, fax_id=str(new_id), detail=exc.message)

    def _request_failed(self, row: Row, exc: ApiError) -> None:
        if 400 <= exc.status < 500 and exc.status not in (408, 429):
            log.warning("resend.refused", ref=row.ref, fax_id=row.fax_id, status=exc.status, code=exc.code)
            self._give_up(row, GiveUp.REFUSED)
            return
        self.metrics.resends.labels("failed").inc()
        wanted = max(REQUEST_RETRY, getattr(exc, "retry_after", 0.0) or 0.0)
        at = retry_delay(self.policy, row.of, self.wall(), wanted)
        if at is None:
            self._give_up(row, GiveUp.DEADLINE)
            return
        log.warning(
            "resend.request_failed",
            ref=row.ref,
            fax_id=row.fax_id,
            status=exc.status,
            code=exc.code,
            retry_at=iso(at),
        )
        self.book.set_state(row.fax_id, "planned", retry_at=at)
        self._count_planned()

    def _give_up(self, row: Row, reason: GiveUp) -> None:
        """End ``row``'s logical fax with a ``resend`` event saying why (its last attempt had ended)."""
        self.book.give_up(row.fax_id, reason)
        last = self.reconciler.fax(row.fax_id)
        status = last.status if last is not None else None
        t = gave_up(row.fax_id, row.extension_id, status, row.of, reason)
        store = self.reconciler.store
        events = store.commit([], [Journalled(t, Source.SEND)], observed_at=iso(self.wall()))
        if events:
            self.reconciler.publish(events)
        self.metrics.resend_gave_up.labels(reason.value).inc()
        self._count_planned()
        log.warning(
            "resend.gave_up", ref=row.ref, fax_id=row.fax_id, attempt=row.attempt, reason=reason.value
        )
