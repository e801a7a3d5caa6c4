"""The request driver: runs the pure request scheduler (:mod:`faxd.core.scheduler`) on the event loop.

The scheduler decides which RingCentral request goes next; this module only owns the clock (the
loop's), the waiting and the tasks. :meth:`RequestDriver.run` loops ``next`` / ``next_wake`` /
``done``: it hands each grant to whoever waits for it, or runs it in its task group through the
runner registered for its kind of key (``"ext"``: a reconcile, registered by the daemon), at most
``max_running`` background grants at once, and turns how the work ended into an
:class:`~faxd.core.scheduler.Outcome`:

=====================================================  ============================================
the work                                               outcome
=====================================================  ============================================
returned                                               ``ok`` (a runner may return its own outcome)
:class:`~faxd.adapters.rest.RateLimited` (429)         ``rate_limited(group, retry_after)``: the group
                                                       holds everything until the penalty ends
:class:`~faxd.adapters.rest.BudgetDeferred`            ``deferred``: pending again, first in line
any other :class:`~faxd.adapters.rest.ApiError`        ``error(retry_after)``: the key backs off
                                                       (1, 2, 4, 8, 10 s; a 5xx Retry-After wins)
=====================================================  ============================================

The API other adapters use (docs/scheduler.md §3):

* :meth:`RequestDriver.submit`: background work for a key whose kind has a runner (a push hint, a
  poll, a settle check, a resync), optionally at a later loop time.
* :meth:`RequestDriver.execute`: run a coroutine as one key's work (``Work(("doc", id), ...,
  cost={Medium: 1})``, ``Work(("send", ref), Priority.USER, cost={Heavy: 1})``) and return its result:
  it waits (bounded) for the grant, runs under the grant's permit (every request it makes through
  :class:`~faxd.adapters.rest.RingCentral` is taken from the grant), and is run again when a request
  beyond the reserved cost was deferred. Errors are the caller's to retry.
* :meth:`RequestDriver.single` (the :class:`~faxd.adapters.rest.Gate` of :class:`RingCentral`): a
  request made outside any grant (``send_fax``, ``resend_fax``, ``get_content``, ``ws_token``, a
  login, an adapter calling a REST method directly) gets a one-request grant of its group, awaited:
  ``USER``, or ``SETTLE`` in the Light group (below push hints).

Stop: :meth:`RequestDriver.drain` closes the scheduler (nothing new is submitted; what would have to
wait for budget is dropped), runs what still goes at once, waits for running grants, and fails the
callers still waiting with :class:`~faxd.adapters.rest.Stopping`. It never waits for budget.

Metrics: queue depth per priority, the wait of each grant (histogram per priority), room and tokens per
group, the effective debounce; :meth:`RequestDriver.status` is the STATUS= phrase when budget-limited.

This module must not know what a reconcile does, parse RingCentral's answers or decide priorities: the
scheduler decides, the runners do the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog

from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import ApiError, BudgetDeferred, RateLimited, Stopping, permitted
from faxd.core.ratebudget import GROUPS, LIGHT
from faxd.core.scheduler import Grant, Key, Outcome, Priority, Result, Scheduler, Work

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: How long a call outside any grant (and :meth:`RequestDriver.execute` by default) waits for its
#: grant before it fails: a user request must get an answer, and a grant of USER work comes within
#: one window of its group unless RingCentral's penalty says otherwise.
GRANT_WAIT: Final = 90.0
#: Background grants (reconciles) running at once; user work and single requests run beside them.
#: One: the paced rate (a Light request every 1.7 s) needs no more, and a second reconcile's request
#: already in flight when a 429 comes back would walk into the penalty (which restarts it).
MAX_RUNNING: Final = 1

#: The class of a request made outside any grant, by group (USER when not listed): the daemon's
#: own Light requests are scheduled work, so a Light call made directly must not pass push hints.
SINGLE_PRIORITY: Final = {LIGHT: Priority.SETTLE}
#: The shortest sleep of the loop when nothing may go now.
MIN_SLEEP: Final = 0.001

Runner = Callable[[Grant], Awaitable[Outcome | None]]


@dataclass(frozen=True)
class _Permit:
    """The permit of one running grant (:class:`faxd.adapters.rest.Permit`)."""

    sched: Scheduler
    grant: Grant

    def take(self, group: str, now: float) -> bool:
        return self.sched.take(self.grant, group, now)


def outcome_of(exc: BaseException | None) -> Outcome:
    """How work that raised ``exc`` (None: returned) ended, for the scheduler."""
    match exc:
        case None:
            return Outcome.ok()
        case RateLimited(group=group, retry_after=after):
            return Outcome.rate_limited(group, after)
        case BudgetDeferred():
            return Outcome.deferred()
        case Stopping():
            return Outcome.failed()
        case ApiError(retry_after=after):
            return Outcome.error(after)
        case _:
            return Outcome.failed()


class RequestDriver:
    """Runs one :class:`Scheduler` on the loop's clock (see the module docstring)."""

    def __init__(self, sched: Scheduler, metrics: Metrics, *, max_running: int = MAX_RUNNING) -> None:
        self.sched = sched
        self.metrics = metrics
        self.max_running = max_running
        self._runners: dict[str, Runner] = {}
        self._waiters: dict[Key, asyncio.Future[Grant]] = {}
        self._background = 0
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()  # set whenever a grant ends or work is dropped
        self._quiet = asyncio.Event()  # closed, nothing running, nothing more goes now
        self._calls = itertools.count(1)
        self._checked: dict[Key, float] = {}  # key -> when its last successful check was granted
        self._limited: list[str] = []  # the groups that held back user, push or settle work, last seen

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- inputs -------------------------------------------------------------------------------------

    def register(self, kind: str, runner: Runner) -> None:
        """Run granted background work of keys ``(kind, ...)`` with ``runner``."""
        self._runners[kind] = runner

    def submit(self, work: Work, *, at: float | None = None) -> bool:
        """Ask for background work (its kind needs a runner); ``at``: not before that loop time.
        False once the driver is draining."""
        if work.key[0] not in self._runners:
            raise ValueError(f"no runner for keys of kind {work.key[0]!r}")
        ok = self.sched.submit(work, self.now(), at=at)
        self.wake()
        return ok

    def set_push(self, up: bool) -> None:
        """Whether push works (the WebSocket subscription is up): while it does not, the push
        reserve is spent on polling the extensions with faxes in flight."""
        if up != self.sched.push_up:
            self.sched.set_push(up)
            log.info("sched.push", up=up)
            self.wake()

    def set_unpushed(self, keys: Iterable[Key]) -> None:
        """The keys whose push alone is refused: polled like while push is down."""
        self.sched.set_unpushed(keys)
        self.wake()

    def set_extensions(self, keys: Iterable[Key]) -> None:
        self.sched.set_extensions(keys, self.now())
        self.wake()

    def set_active(self, keys: Iterable[Key]) -> None:
        self.sched.set_active(keys)
        self.wake()

    def wake(self) -> None:
        """Something changed: look at the scheduler again."""
        self._changed.set()

    # -- work with a waiting caller ------------------------------------------------------------------

    async def execute(self, work: Work, run: Callable[[], Awaitable[T]], *, wait: float = GRANT_WAIT) -> T:
        """Run ``run()`` as ``work`` once the scheduler grants it; its result, or its exception.

        ``wait`` bounds the wait for each grant (:class:`ApiError` ``budget_timeout``). The key must
        not be waiting already (ValueError). Work that was deferred (a request beyond the reserved
        cost did not fit the budget) is pending again, first in its priority, and runs again at its
        next grant; any other error ends the work (not retried: the caller decides).
        """
        grant = await self._granted(work, wait, submit=True)
        while True:
            try:
                with permitted(_Permit(self.sched, grant)):
                    result = await run()
            except BudgetDeferred:
                self._end(grant, Outcome.deferred())
                grant = await self._granted(work, wait, submit=False)
                continue
            except BaseException:
                self._end(grant, Outcome.failed())
                raise
            self._end(grant, Outcome.ok())
            return result

    @contextlib.asynccontextmanager
    async def single(self, group: str, *, wait: float = GRANT_WAIT) -> AsyncIterator[_Permit]:
        """A one-request grant of ``group`` for a request made outside any grant (the
        :class:`~faxd.adapters.rest.Gate` of :class:`RingCentral`): ``USER`` work, but in the Light
        group ``SETTLE`` (below push: a Light call made directly spends only the headroom and, while
        push works, never the push reserve)."""
        priority = SINGLE_PRIORITY.get(group, Priority.USER)
        work = Work(("call", str(next(self._calls))), priority, frozenset({"call"}), {group: 1})
        grant = await self._granted(work, wait, submit=True)
        try:
            yield _Permit(self.sched, grant)
        except BaseException:
            self._end(grant, Outcome.failed())  # the caller owns retries; a 429 is in the budget
            raise
        self._end(grant, Outcome.ok())

    async def _granted(self, work: Work, wait: float, *, submit: bool) -> Grant:
        """Wait for the grant of ``work`` (submitted here unless it is pending already)."""
        key = work.key
        if key in self._waiters:
            raise ValueError(f"{key} is already waiting for a grant")
        if submit and not self.sched.submit(work, self.now()):
            raise Stopping(next(iter(work.cost)))
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._waiters[key] = future
        self.wake()
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(future)
        except BaseException as exc:
            if self._waiters.get(key) is future:
                del self._waiters[key]
            if future.done() and not future.cancelled() and future.exception() is None:
                self._end(future.result(), Outcome.failed())  # granted just as the caller gave up
            else:
                future.cancel()  # the grant, when it comes, finds no waiter and is ended at once
            if isinstance(exc, TimeoutError):
                groups = "/".join(work.cost)
                raise ApiError(0, "budget_timeout", f"no {groups} budget within {wait:g} s") from None
            raise

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: hand out what may go now, then sleep until the scheduler's next wake or a change."""
        async with asyncio.TaskGroup() as tg:
            while True:
                self._changed.clear()
                now = self.now()
                while (grant := self.sched.next(now, self._accept)) is not None:
                    self._dispatch(grant, tg)
                self._gauges(now)
                self._report_limits(now)
                if self.sched.closed and self.sched.running == 0:
                    self._quiet.set()
                wake = self.sched.next_wake(now, self._accept)
                # At least MIN_SLEEP: nothing may go now (next said so), and a wake a hair after now
                # (float rounding of a due time) must not spin the loop at one instant.
                timeout = None if wake is None else max(MIN_SLEEP, wake - self.now())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()

    def _accept(self, work: Work) -> bool:
        if work.key in self._waiters:
            return True
        if work.key[0] in self._runners:
            return self._background < self.max_running
        return True  # a waiter that gave up: granted and ended at once

    def _dispatch(self, grant: Grant, tg: asyncio.TaskGroup) -> None:
        self.metrics.sched_wait.labels(grant.priority.name.lower()).observe(max(0.0, grant.waited))
        future = self._waiters.pop(grant.key, None)
        if future is not None and not future.done():
            future.set_result(grant)
            return
        runner = self._runners.get(grant.key[0])
        if runner is None or future is not None:
            self._end(grant, Outcome.failed())  # its caller gave up waiting
            return
        self._background += 1
        tg.create_task(self._run_background(grant, runner))

    async def _run_background(self, grant: Grant, runner: Runner) -> None:
        outcome = Outcome.failed()
        try:
            with permitted(_Permit(self.sched, grant)):
                outcome = await runner(grant) or Outcome.ok()
        except ApiError as exc:
            outcome = outcome_of(exc)
        finally:
            self._background -= 1
            self._end(grant, outcome)

    def _end(self, grant: Grant, outcome: Outcome) -> None:
        self.sched.done(grant, self.now(), outcome)
        if outcome.result is Result.OK and grant.checks and grant.key[0] in self._runners:
            self._checked[grant.key] = grant.granted_at
        if outcome.result is Result.ERROR and not self.sched.closed:
            due = self.sched.due_at(grant.key)
            if due is not None:
                log.info("sched.retry_scheduled", key=grant.key[0], delay=round(due - self.now(), 2))
        self.wake()
        self._ended.set()

    # -- waiting for keys ----------------------------------------------------------------------------

    def busy(self, keys: Iterable[Key]) -> bool:
        """Whether any of ``keys`` is pending or running."""
        return any(self.sched.pending(k) is not None or self.sched.is_running(k) for k in keys)

    async def settled(self, keys: Iterable[Key]) -> None:
        """Until none of ``keys`` is pending or running."""
        wanted = list(keys)
        while self.busy(wanted):
            self._ended.clear()
            await self._ended.wait()

    async def checked(self, keys: Iterable[Key], since: float) -> None:
        """Until each of ``keys`` had a check (a grant that reads the faxes in flight) granted at or
        after loop time ``since`` succeed (a client's ``sync``: polls may keep a key pending for good
        under load, so "not pending" is not the test). Waits through retries; bound it."""
        wanted = list(keys)
        while any(self._checked.get(k, -math.inf) < since for k in wanted):
            self._ended.clear()
            await self._ended.wait()

    # -- stop ----------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Close the scheduler, run what may still go at once, wait for running grants, then fail the
        callers still waiting. Bound it with a timeout: a request may be slow."""
        dropped = self.sched.close(self.now())
        log.info("sched.closed", dropped=len(dropped), running=self.sched.running)
        self.wake()
        try:
            await self._quiet.wait()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Forget what is still pending and fail its waiters ("faxd is stopping")."""
        left = {w.key: w for w in self.sched.abandon()}
        waiters, self._waiters = self._waiters, {}
        for key, future in waiters.items():
            if not future.done():
                work = left.get(key)
                future.set_exception(Stopping(next(iter(work.cost)) if work is not None else "-"))
        self._ended.set()

    # -- observability -------------------------------------------------------------------------------

    def status(self) -> str:
        """ "rate-limited: Light, next slot in 4 s" when user, push or settle work waits for budget."""
        return self.sched.status(self.now())

    def _report_limits(self, now: float) -> None:
        """One log line when the set of groups that hold back user, push or settle work changes."""
        limited = self.sched.limited(now)
        groups = sorted(limited)
        if groups == self._limited:
            return
        self._limited = groups
        if groups:
            log.info("sched.budget_limited", groups=groups, status=self.sched.status(now))
        else:
            log.info("sched.budget_ok")

    def _gauges(self, now: float) -> None:
        m = self.metrics
        depth = self.sched.depth()
        for priority, n in depth.items():
            m.sched_depth.labels(priority.name.lower()).set(n)
        m.queue_depth.set(sum(depth.values()))
        for group in GROUPS:
            b = self.sched.budget_of(group, now)
            m.sched_room.labels(group).set(b.room)
            if b.tokens is not None:
                m.sched_tokens.labels(group).set(b.tokens)
        m.effective_debounce.set(self.sched.effective_debounce(now))
