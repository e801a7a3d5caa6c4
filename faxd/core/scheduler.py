"""The request scheduler: which RingCentral request goes next, and when, on time passed in.

Everything faxd asks of RingCentral is *work* for a *key* (``("ext", id)``: reconcile that extension;
``("send", ref)``: send one fax; ``("auth", what)``: a token request). Work is submitted with a
:class:`Priority` and a cost (requests per rate-limit group), and handed out as a :class:`Grant` only
when its whole cost fits the budget *now*: a grant never has to wait. The driver (an adapter) loops
``next(now)`` / ``next_wake(now)`` / ``done(grant, now, outcome)`` and sends each request of a grant
through ``take(grant, group, now)``. Rules:

Priorities and coalescing
* Strict priority: ``USER`` (a send, a client's ``sync``) > ``PUSH`` (push-hinted reconcile) >
  ``SETTLE`` (settle checks, bulk GETs of faxes in flight) > ``RESYNC`` (start-up and resync full
  syncs) > ``ACTIVE_POLL`` > ``SAFETY_POLL``. Among due work, the highest priority goes first, and
  within a priority the key that asked first (oldest first: none starves). A due item that does not
  fit the budget holds back everything after it that needs the same group; other groups go on.
* A key is pending at most once: more work for it merges into the pending item (the highest
  priority, the union of reasons, the larger cost per group). Raised to a higher priority, the item
  queues by the time of that request. A key is never handed out twice at once; work for a key that
  is running waits and is pending again, once, when the grant is done.
* Push hints are debounced as :mod:`faxd.core.debounce` does: an idle key is due at once (leading
  edge) unless the budget is scarce; a burst slides the quiet period ``debounce``, never past
  ``max_delay`` after its first hint; a key is not handed out again within ``debounce`` of its last
  grant's end. Other work is due at once; work submitted with a future ``at`` (a settle timer) is
  submitted at that time, so it neither merges into earlier work nor claims budget before.

Budget: pacing and reserves on the rate budget
* :class:`faxd.core.ratebudget.RateBudget` stays the ground truth: our own requests in the sliding
  window (each recorded by ``take`` when it is sent), the server's ``X-Rate-Limit-*`` headers
  (``observed``), 429 penalties. A grant reserves its cost; a grant's request counts in the window
  when it is taken, and the window, counting reserved requests too, is never allowed past the share.
* Pacing: in a paced group (Light, Medium) a token bucket of ``burst`` tokens refills at
  ``(allowed - burst) / window`` (``allowed``: faxd's share of a window, 40 for Light by default), so
  the bucket alone admits at most ``allowed`` in any window, and the share is spread evenly instead
  of spent in a burst followed by a blind minute. ``burst = max(2, ceil(allowed * burst_fraction))``
  (4 for Light: one token every 1.7 s); Heavy and Auth carry only user work and are not paced (the
  window alone).
* Reserves: work below ``PUSH`` never takes the last ``push_reserve`` tokens of a group, nor those
  that pending push hints still in their quiet period will need: polls, resyncs and settle checks
  spend only the headroom, and a push hint finds budget at once or waits only for the hinted work
  ahead of it (one refill interval each).
  While push is down (:meth:`Scheduler.set_push`), ``SETTLE`` and ``ACTIVE_POLL`` may spend the push
  reserve, and the poll schedule polls keys with faxes in flight every ``outage_poll_interval``.
* A grant's cost is capped at what the group can ever hold for that priority; a grant that needs
  more requests than it reserved asks ``take`` for each extra one, which says no rather than wait
  (the work then ends as ``DEFERRED`` and is pending again, first in its priority).
* Adaptive coalescing: the *effective debounce* of a group is how long a new push hint would wait
  for its turn at the paced rate behind the hinted work already waiting (at least ``debounce``). It
  grows linearly with demand instead of jumping to a window; while it exceeds ``debounce`` an idle
  key's hint waits out the quiet period instead of spending a token on the first hint of a burst.

Polls
* :class:`faxd.core.polls.PollSchedule` says which keys are due for a check; ``next`` turns them into
  ``ACTIVE_POLL`` / ``SAFETY_POLL`` work, which spends only headroom and so never delays a hinted
  key. A sweep the budget cannot afford stretches (each key's next poll counts from its last check).
  Any successful grant that checks (every priority but ``PUSH``) resets the key's poll clock, and so
  does a plain push of a key with no faxes in flight (its ISync is all a poll would read). While
  push works, an active poll that falls due while the key's hinted work waits or runs is put off by
  one active period instead of merging into it (push is reading that key; merged, the poll's bulk
  reads would make the hint wait for their budget too). A safety poll is put off the same way, but
  only once per due (:meth:`PollSchedule.put_off`): offered again, it merges, so it is never more than
  one active period late for a hint (``min(poll_interval, active_poll_interval)``). The same holds
  when the hint comes second: a push hint for a key whose poll waits for headroom takes its place
  instead of merging into it, and the poll goes back to the schedule the same way. A safety
  poll that has waited a whole ``poll_interval`` queues with the active polls by its age, so even a
  poll load beyond the headroom leaves every key checked within about two intervals plus its turn.

Errors
* ``ERROR`` (5xx, connection errors, unreadable bodies): the key backs off ``backoff_base * 2**(n-1)``
  capped at ``backoff_cap`` (10 s), or longer when a ``Retry-After`` says so (at most
  ``retry_after_cap``); success resets it. A push hint for a key in backoff, once any request of its
  groups has succeeded since its failure, is due within ``backoff_cap``; ``USER`` and ``RESYNC`` work
  ends a backoff at once (the state is unknown now). A backoff never delays other keys.
* ``RATE_LIMITED`` (429): the group gets the penalty (Retry-After, 30 s without one): nothing of that
  group is handed out or taken until it ends, whatever the priority. The work is pending again in
  its place without counting as a failure.

Shutdown
* After :meth:`Scheduler.close` nothing is submitted and nothing that would have to wait is handed
  out: polls, resyncs, work in backoff and work scheduled for later are dropped at once (returned);
  ``USER``, ``PUSH`` and ``SETTLE`` work becomes due and goes only if the budget allows it now;
  failures are not retried; ``next_wake`` is None. Start-up redoes every extension anyway.

Observability, as plain data: :meth:`Scheduler.snapshot` (queue depth per priority, budget left per
group, effective debounce, poll staleness, one STATUS phrase such as ``rate-limited: Light, next slot
in 4 s``); every grant carries how long its work waited.

The driver calls ``next`` again after every ``submit``, ``done``, ``set_push`` and ``configure``, and
otherwise sleeps until ``next_wake`` (None: until one of those happens). docs/scheduler.md shows it.

This module must not do I/O, sleep, read clocks or import asyncio: ``now`` is passed in (the loop's
monotonic time), and the driver owns the clock and the waiting.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from faxd.core.polls import PollKind, PollSchedule
from faxd.core.ratebudget import GROUPS, LIGHT, MEDIUM, NO_THROTTLING, RateBudget

Key = tuple[str, str]

_EPS: Final = 1e-9
#: Added to budget-derived wake times, so that float rounding never wakes the driver a hair too early.
_SLACK: Final = 1e-6


def ext_key(extension_id: str) -> Key:
    """The key of "reconcile this extension"."""
    return ("ext", extension_id)


class Priority(enum.IntEnum):
    """Request classes, highest first (a lower value goes first)."""

    USER = 0
    PUSH = 1
    SETTLE = 2
    RESYNC = 3
    ACTIVE_POLL = 4
    SAFETY_POLL = 5


#: Work that reads the faxes in flight by id (a check); a push-hinted reconcile alone does not.
CHECKS: Final = frozenset(Priority) - {Priority.PUSH}
#: Hinted work: what the reserves and quiet-period claims protect.
HINTED: Final = frozenset({Priority.USER, Priority.PUSH})
#: What is still handed out after close (if the budget allows it at once).
DRAINED: Final = frozenset({Priority.USER, Priority.PUSH, Priority.SETTLE})
#: Work that ends a backoff: the state is unknown now, which outranks an error pause.
IMMEDIATE: Final = frozenset({Priority.USER, Priority.RESYNC})
_POLLS: Final = frozenset({Priority.ACTIVE_POLL, Priority.SAFETY_POLL})


class Result(enum.Enum):
    OK = "ok"
    ERROR = "error"  # transient (5xx, connection error, unreadable body): retried after a backoff
    FAILED = "failed"  # failed and must not be retried here (a send: its caller reports the error)
    RATE_LIMITED = "rate_limited"  # 429: retried once the group's penalty ends
    DEFERRED = "deferred"  # needed more budget than ``take`` allowed; nothing failed


@dataclass(frozen=True)
class Outcome:
    """How a grant ended; build it with the class methods."""

    result: Result
    retry_after: float | None = None
    group: str | None = None  # the group a 429 came from

    @classmethod
    def ok(cls) -> Outcome:
        return cls(Result.OK)

    @classmethod
    def error(cls, retry_after: float | None = None) -> Outcome:
        return cls(Result.ERROR, retry_after=retry_after)

    @classmethod
    def failed(cls) -> Outcome:
        return cls(Result.FAILED)

    @classmethod
    def rate_limited(cls, group: str, retry_after: float | None = None) -> Outcome:
        return cls(Result.RATE_LIMITED, retry_after=retry_after, group=group)

    @classmethod
    def deferred(cls) -> Outcome:
        return cls(Result.DEFERRED)


def _light() -> Mapping[str, int]:
    return {LIGHT: 1}


@dataclass(frozen=True, eq=False)
class Work:
    """Work for one key. ``cost``: requests per rate-limit group it will send (an estimate; extras go
    through :meth:`Scheduler.take`)."""

    key: Key
    priority: Priority
    reasons: frozenset[str] = frozenset()
    cost: Mapping[str, int] = field(default_factory=_light)


@dataclass(frozen=True, eq=False)
class Grant:
    """Permission to run one key's work now, with its cost reserved."""

    id: int
    key: Key
    priority: Priority
    priorities: frozenset[Priority]
    reasons: frozenset[str]
    cost: Mapping[str, int]  # reserved: take() hands these out without asking the budget again
    first: float  # when the key first asked at this priority
    granted_at: float

    @property
    def waited(self) -> float:
        """Seconds from the request to the grant (quiet period, queueing and budget together)."""
        return self.granted_at - self.first

    @property
    def checks(self) -> bool:
        """Whether the work should read the faxes in flight by id (every priority but a plain push)."""
        return bool(self.priorities & CHECKS)


@dataclass(frozen=True)
class SchedulerSettings:
    debounce: float = 1.0
    max_delay: float = 5.0
    poll_interval: float = 300.0
    active_poll_interval: float = 60.0
    outage_poll_interval: float = 5.0
    push_reserve: int = 1
    burst_fraction: float = 0.1
    paced: frozenset[str] = frozenset({LIGHT, MEDIUM})
    backoff_base: float = 1.0
    backoff_cap: float = 10.0
    retry_after_cap: float = 300.0

    def __post_init__(self) -> None:
        if self.debounce < 0 or self.max_delay < self.debounce:
            raise ValueError("need 0 <= debounce <= max_delay")
        if self.push_reserve < 0:
            raise ValueError("push_reserve must not be negative")
        if not 0 < self.burst_fraction <= 1:
            raise ValueError("burst_fraction must be in (0, 1]")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        if self.retry_after_cap < 0:
            raise ValueError("retry_after_cap must not be negative")


@dataclass(frozen=True)
class GroupBudget:
    group: str
    allowed: int  # faxd's share of one window
    window: float
    room: int  # requests the window still takes, less those reserved by running grants
    tokens: float | None  # the pacing bucket (None: not paced)
    next_slot: float  # seconds until a push reconcile of this group could be granted (0: now)


@dataclass(frozen=True)
class Snapshot:
    depth: Mapping[Priority, int]  # keys waiting per priority (not counting running ones)
    running: int
    budgets: Mapping[str, GroupBudget]
    effective_debounce: float  # Light's
    staleness: float  # the longest any polled key has gone unchecked
    status: str  # "" or e.g. "rate-limited: Light, next slot in 4 s"


@dataclass(slots=True)
class _Item:
    key: Key
    priority: Priority
    priorities: set[Priority]
    reasons: set[str]
    cost: dict[str, int]
    first: float  # when the key asked at this priority: the order within a priority
    due: float
    burst: float  # first hint of the current push burst: bounds the quiet period
    seq: int
    backoff: bool = False  # ``due`` is a retry time after an error

    def view(self) -> Work:
        return Work(self.key, self.priority, frozenset(self.reasons), dict(self.cost))

    def order(self) -> tuple[int, float, int]:
        return (self.priority, self.first, self.seq)


def _absorb(item: _Item, again: _Item) -> None:
    """``item`` goes again and takes in what asked for its key meanwhile: reasons, priorities, the
    larger cost of each group, and the higher priority with its place in line."""
    item.reasons |= again.reasons
    item.priorities |= again.priorities
    for g, n in again.cost.items():
        item.cost[g] = max(item.cost.get(g, 0), n)
    if again.priority < item.priority:
        item.priority, item.first = again.priority, again.first


@dataclass(slots=True)
class _Running:
    grant: Grant
    item: _Item
    left: dict[str, int]  # reserved requests not taken yet


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class Scheduler:
    """One queue for every RingCentral request, over one :class:`RateBudget`."""

    def __init__(
        self,
        budget: RateBudget,
        settings: SchedulerSettings | None = None,
        *,
        poll_cost: Callable[[Key, PollKind], Mapping[str, int]] | None = None,
    ) -> None:
        self.budget = budget
        self.settings = settings or SchedulerSettings()
        s = self.settings
        self.polls: PollSchedule[Key] = PollSchedule(
            s.poll_interval, s.active_poll_interval, s.outage_poll_interval
        )
        self._poll_cost = poll_cost
        self._pending: dict[Key, _Item] = {}
        self._again: dict[Key, _Item] = {}  # work for a key that is running
        self._scheduled: list[tuple[float, int, Work]] = []  # (at, seq, work) submitted with a future at
        self._running: dict[int, _Running] = {}
        self._running_keys: dict[Key, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._outstanding: dict[str, int] = {}  # reserved, not taken
        self._last_done: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._failed_at: dict[Key, float] = {}
        self._answered: dict[str, float] = {}  # group -> last success
        self._seq = 0
        self._grants = 0
        self._closed = False

    def configure(self, settings: SchedulerSettings) -> None:
        """New settings (a reload). Pending work keeps its due times; new rules apply from now."""
        self.settings = settings
        self.polls.configure(
            settings.poll_interval, settings.active_poll_interval, settings.outage_poll_interval
        )

    # ------------------------------------------------------------------ inputs

    def set_push(self, up: bool) -> None:
        """Whether push works (WebSocket subscribed). While it does not, the push reserve is free for
        polling the keys with faxes in flight."""
        self.polls.set_push(up)

    @property
    def push_up(self) -> bool:
        return self.polls.push_up

    def set_unpushed(self, keys: Iterable[Key]) -> None:
        """Keys whose push RingCentral refuses while the subscription works for the others: their
        faxes in flight are polled every ``outage_poll_interval`` too (from the headroom)."""
        self.polls.set_unpushed(keys)

    def observed(
        self,
        group: str,
        now: float,
        *,
        limit: int | None = None,
        remaining: int | None = None,
        window: float | None = None,
    ) -> None:
        """A response's ``X-Rate-Limit-*`` headers (call it for every response, as it arrives)."""
        self.budget.observed(group, now, limit=limit, remaining=remaining, window=window)

    def submit(self, work: Work, now: float, *, at: float | None = None) -> bool:
        """Ask for ``work``; with ``at`` in the future, it is submitted then (a settle timer), so it
        neither merges into earlier work nor claims budget before its time. False once closed."""
        if not work.cost or any(n < 1 for n in work.cost.values()):
            raise ValueError("a work item costs at least one request of some group")
        if self._closed:
            return False
        if at is not None and at > now:
            self._seq += 1
            heapq.heappush(self._scheduled, (at, self._seq, work))
            return True
        key = work.key
        table = self._again if key in self._running_keys else self._pending
        item = table.get(key)
        if item is not None and self._unseat_poll(item, work, now):
            item = None
        if item is None:
            table[key] = self._new_item(work, now)
        else:
            self._merge(item, work, now)
        return True

    def _unseat_poll(self, item: _Item, work: Work, now: float) -> bool:
        """Whether hinted ``work`` takes the place of the poll ``item`` waits with, instead of merging
        into it: the poll rule of :meth:`_tick` for a hint that comes second. The poll goes back to
        the schedule (an active poll: one active period; a safety poll: :meth:`PollSchedule.put_off`,
        which says no the second time, and then they merge)."""
        if work.priority not in HINTED or not self.push_up or not item.priorities <= _POLLS:
            return False
        return self.polls.kind(item.key) is PollKind.ACTIVE or self.polls.put_off(item.key, now)

    def _new_item(self, work: Work, now: float) -> _Item:
        self._seq += 1
        return _Item(
            key=work.key,
            priority=work.priority,
            priorities={work.priority},
            reasons=set(work.reasons),
            cost=dict(work.cost),
            first=now,
            due=self._due(work, now),
            burst=now,
            seq=self._seq,
        )

    def _due(self, work: Work, now: float) -> float:
        """When new work of this kind for this key is due."""
        if work.priority is not Priority.PUSH:
            return now
        d = self.settings.debounce
        last = self._last_done.get(work.key)
        if last is not None and now - last < d:
            return last + d  # the rate cap: what is left of the quiet period after the last grant
        if any(self.effective_debounce(now, g, exclude=work.key) > d for g in work.cost):
            return now + d  # scarce: let the burst coalesce instead of spending a token on its start
        return now

    def _merge(self, item: _Item, work: Work, now: float) -> None:
        item.reasons |= work.reasons
        item.priorities.add(work.priority)
        for g, n in work.cost.items():
            item.cost[g] = max(item.cost.get(g, 0), n)
        p = work.priority
        raised = p < item.priority
        if raised:
            item.priority, item.first, item.burst = p, now, now
        if item.backoff:
            if p in IMMEDIATE:
                item.due, item.backoff = now, False
            elif p is Priority.PUSH and self._answered_since_failure(item):
                item.due = min(item.due, now + self.settings.backoff_cap)
            return
        if raised:
            item.due = min(item.due, self._due(work, now))
        elif p == item.priority:
            if p is Priority.PUSH:
                if item.due > now:  # in the quiet period: slide it, within the bound
                    s = self.settings
                    item.due = max(item.due, min(now + s.debounce, item.burst + s.max_delay))
            else:
                item.due = min(item.due, now)

    def _answered_since_failure(self, item: _Item) -> bool:
        failed = self._failed_at.get(item.key)
        return failed is not None and any(self._answered.get(g, -math.inf) > failed for g in item.cost)

    # ------------------------------------------------------------------ budget

    def _pace(self, group: str) -> tuple[int, float] | None:
        """(bucket size, tokens per second) of a paced group; None when the window alone governs."""
        if group not in self.settings.paced:
            return None
        allowed = self.budget.allowed(group)
        _, window = self.budget.limits(group)
        size = min(allowed, max(2, math.ceil(allowed * self.settings.burst_fraction)))
        if size >= allowed:
            return None
        return size, (allowed - size) / window

    def _capacity(self, group: str) -> int:
        pace = self._pace(group)
        return pace[0] if pace is not None else self.budget.allowed(group)

    def _bucket(self, group: str, now: float) -> _Bucket | None:
        pace = self._pace(group)
        if pace is None:
            return None
        size, rate = pace
        b = self._buckets.get(group)
        if b is None:
            b = self._buckets[group] = _Bucket(float(size), now)
        if now > b.at:
            b.tokens += rate * (now - b.at)
            b.at = now
        b.tokens = min(b.tokens, float(size))
        return b

    def _reserve(self, group: str) -> int:
        """The push reserve of a group, so small that every priority can still run in a full bucket."""
        return max(0, min(self.settings.push_reserve, self._capacity(group) - 1))

    def _floor(self, group: str, priority: Priority, claims: Mapping[str, int]) -> int:
        """Tokens (or window slots) a grant of ``priority`` must leave in ``group``."""
        if priority in HINTED:
            return 0
        reserve = self._reserve(group)
        if not self.push_up and priority in (Priority.SETTLE, Priority.ACTIVE_POLL):
            reserve = 0
        return reserve + claims.get(group, 0)

    def _need(self, group: str, n: int, priority: Priority) -> int:
        """A cost capped at what the group can ever hold for this priority (extras go through take)."""
        ceiling = self._capacity(group) - (0 if priority in HINTED else self._reserve(group))
        return max(1, min(n, ceiling))

    def _claims(self, now: float) -> dict[str, int]:
        """Budget that hinted work in its quiet period (or waiting for its key) will need soon."""
        claims: dict[str, int] = {}
        waiting = [i for i in self._pending.values() if i.due > now and not i.backoff]
        for item in [*waiting, *self._again.values()]:
            if item.priority in HINTED:
                for g, n in item.cost.items():
                    claims[g] = claims.get(g, 0) + n
        return claims

    def _wait(
        self, cost: Mapping[str, int], priority: Priority, now: float, claims: Mapping[str, int]
    ) -> float:
        """Seconds until ``cost`` fits for ``priority`` (0: now; inf: only a grant's end can help)."""
        wait = 0.0
        for g, raw in cost.items():
            n = self._need(g, raw, priority)
            floor = self._floor(g, priority, claims)
            pace, bucket = self._pace(g), self._bucket(g, now)
            window_need = self._outstanding.get(g, 0) + n + (0 if bucket is not None else floor)
            wait = max(wait, self.budget.delay(g, now, n=window_need))
            if pace is not None and bucket is not None:
                size, rate = pace
                short = floor + n - bucket.tokens
                if floor + n > size:
                    wait = math.inf
                elif short > _EPS:
                    wait = max(wait, short / rate)
        return wait

    def _available(self, group: str, now: float) -> float:
        room = self.budget.room(group, now) - self._outstanding.get(group, 0)
        bucket = self._bucket(group, now)
        return float(room) if bucket is None else min(float(room), bucket.tokens)

    def _rate(self, group: str) -> float:
        pace = self._pace(group)
        if pace is not None:
            return pace[1]
        _, window = self.budget.limits(group)
        return self.budget.allowed(group) / window

    def effective_debounce(self, now: float, group: str = LIGHT, *, exclude: Key | None = None) -> float:
        """How long a new push hint for ``group`` would wait now: at least ``debounce``, growing by one
        refill interval for each request the hinted work already waiting needs beyond what is left."""
        waiting = sum(
            i.cost.get(group, 0)
            for i in [*self._pending.values(), *self._again.values()]
            if i.priority in HINTED and i.key != exclude
        )
        short = waiting + 1 - self._available(group, now)
        queue = max(0.0, short) / self._rate(group)
        blocked = self.budget.delay(group, now)  # a penalty, or the server's own count
        return max(self.settings.debounce, blocked, queue)

    # ------------------------------------------------------------------ handing out

    def _scan(
        self, now: float, accept: Callable[[Work], bool] | None
    ) -> tuple[_Item | None, list[tuple[_Item, float]]]:
        """The first due item that fits, in strict priority order, and the blocked heads before it."""
        claims = self._claims(now)
        blocked: set[str] = set()
        heads: list[tuple[_Item, float]] = []
        for item in sorted((i for i in self._pending.values() if i.due <= now), key=_Item.order):
            groups = set(item.cost)
            if groups & blocked:
                blocked |= groups
                continue
            if accept is not None and not accept(item.view()):
                blocked |= groups
                continue
            wait = self._wait(item.cost, item.priority, now, claims)
            if wait <= 0:
                return item, heads
            heads.append((item, wait))
            blocked |= groups
        return None, heads

    def _tick(self, now: float) -> None:
        """Work whose time has come: scheduled submissions, polls the schedule says are due."""
        if self._closed:
            return
        while self._scheduled and self._scheduled[0][0] <= now:
            self.submit(heapq.heappop(self._scheduled)[2], now)
        for item in self._pending.values():
            if item.priority is Priority.SAFETY_POLL and now - item.first >= self.settings.poll_interval:
                # Aging: a safety poll that waited a whole interval queues with the active polls, by
                # its age, so a poll load beyond the headroom cannot starve it.
                item.priority = Priority.ACTIVE_POLL
        for key, kind in self.polls.due(now):
            if (
                self.push_up
                and self._hinted(key)
                and (kind is PollKind.ACTIVE or self.polls.put_off(key, now))
            ):
                # Push is reading this key now: merged into its hinted work, the poll's bulk reads
                # would make the hint wait for their budget too. Offered again one active period
                # later; a safety poll only once, so it stays within its staleness bound.
                continue
            priority = Priority.ACTIVE_POLL if kind is PollKind.ACTIVE else Priority.SAFETY_POLL
            cost = self._poll_cost(key, kind) if self._poll_cost is not None else _light()
            self.submit(Work(key, priority, frozenset({"poll"}), cost), now)

    def _hinted(self, key: Key) -> bool:
        """Whether hinted work (user, push) for ``key`` waits or runs."""
        item = self._pending.get(key) or self._again.get(key)
        if item is not None and item.priority in HINTED:
            return True
        running = self._running.get(self._running_keys.get(key, -1))
        return running is not None and running.grant.priority in HINTED

    def next(self, now: float, accept: Callable[[Work], bool] | None = None) -> Grant | None:
        """The work to run now, its cost reserved; None when nothing may go now.

        ``accept``: the driver's filter (say, "sends only" while a reconcile runs); work it refuses
        still holds back lower work of its groups.
        """
        self._tick(now)
        item, _ = self._scan(now, accept)
        if item is None:
            return None
        del self._pending[item.key]
        reserved: dict[str, int] = {}
        for g, raw in item.cost.items():
            n = self._need(g, raw, item.priority)
            reserved[g] = n
            self._outstanding[g] = self._outstanding.get(g, 0) + n
            bucket = self._bucket(g, now)
            if bucket is not None:
                bucket.tokens -= n
        self._grants += 1
        grant = Grant(
            id=self._grants,
            key=item.key,
            priority=item.priority,
            priorities=frozenset(item.priorities),
            reasons=frozenset(item.reasons),
            cost=dict(reserved),
            first=item.first,
            granted_at=now,
        )
        self._running[grant.id] = _Running(grant, item, dict(reserved))
        self._running_keys[item.key] = grant.id
        return grant

    def next_wake(self, now: float, accept: Callable[[Work], bool] | None = None) -> float | None:
        """When :meth:`next` may have something (at or before ``now``: call it now); None when only
        a submit, take or done can change anything, and always after close."""
        if self._closed:
            return None
        item, heads = self._scan(now, accept)
        if item is not None:
            return now
        times = [i.due for i in self._pending.values() if i.due > now]
        if self._scheduled:
            times.append(self._scheduled[0][0])
        times += [now + wait + _SLACK for _, wait in heads if math.isfinite(wait)]
        poll = self.polls.next_wake()
        if poll is not None:
            times.append(poll)
        return min(times, default=None)

    def take(self, grant: Grant, group: str, now: float) -> bool:
        """May the grant send one request of ``group`` now? Reserved requests always may; an extra one
        only if the budget allows it now for the grant's priority and no higher work waits for the
        group. True records the request in the window: send it at once. False: end the work with
        :meth:`Outcome.deferred` (or without that request)."""
        running = self._running.get(grant.id)
        if running is None:
            raise ValueError(f"grant {grant.id} is not running")
        if group == NO_THROTTLING:
            return True  # counted in no group, never waits
        if running.left.get(group, 0) > 0:
            running.left[group] -= 1
            self._outstanding[group] -= 1
            self.budget.spent(group, now)
            return True
        if any(
            group in i.cost and i.priority < grant.priority and i.due <= now for i in self._pending.values()
        ):
            return False
        if self._wait({group: 1}, grant.priority, now, self._claims(now)) > 0:
            return False
        bucket = self._bucket(group, now)
        if bucket is not None:
            bucket.tokens -= 1
        self.budget.spent(group, now)
        return True

    def done(self, grant: Grant, now: float, outcome: Outcome) -> None:
        """The grant's work ended. Unused reserved requests go back to the bucket."""
        running = self._running.pop(grant.id, None)
        if running is None:
            raise ValueError(f"grant {grant.id} is not running")
        key = grant.key
        del self._running_keys[key]
        self._release(running.left, now)
        self._remember_done(key, now)
        again = self._again.pop(key, None)
        if outcome.result in (Result.OK, Result.FAILED):
            self._finished(grant, again, now, ok=outcome.result is Result.OK)
            return
        item = running.item
        self._retry_later(item, grant, outcome, now)
        if self._closed:
            return  # no retries while shutting down: start-up redoes every extension
        if again is not None:
            _absorb(item, again)
        self._pending[key] = item

    def _release(self, left: Mapping[str, int], now: float) -> None:
        """Reserved requests a grant did not take go back (clipped to the bucket size at its next refill)."""
        for g, n in left.items():
            if n:
                self._outstanding[g] -= n
                bucket = self._bucket(g, now)
                if bucket is not None:
                    bucket.tokens += n

    def _finished(self, grant: Grant, again: _Item | None, now: float, *, ok: bool) -> None:
        """The work is over, for good (a FAILED send is not retried here): its key's failures are
        forgotten, and what asked for the key while it ran queues now."""
        key = grant.key
        self._failures.pop(key, None)
        self._failed_at.pop(key, None)
        if ok:
            for g in grant.cost:
                self._answered[g] = now
            # A plain push reads the extension's changes (ISync) but not its faxes in flight by id;
            # for a key with none in flight that is all a poll would read, so it counts as one. With
            # 100 extensions pushing every few minutes, that spares most safety polls.
            if grant.checks or not self.polls.is_active(key):
                self.polls.checked(key, now)
                if again is not None and again.priorities <= _POLLS:
                    again = None  # this grant was the check those polls asked for
        if again is not None:
            self._requeue(again, now)

    def _retry_later(self, item: _Item, grant: Grant, outcome: Outcome, now: float) -> None:
        """When the work goes again: after a 429 once its group's penalty ends, after an error with
        backoff (``Retry-After`` wins when longer), deferred work at once."""
        if outcome.result is Result.RATE_LIMITED:
            group = outcome.group or next(iter(grant.cost))
            self.budget.penalty(group, now, outcome.retry_after)
            item.due, item.backoff = now, False
        elif outcome.result is Result.ERROR:
            s = self.settings
            n = self._failures.get(grant.key, 0) + 1
            self._failures[grant.key] = n
            self._failed_at[grant.key] = now
            delay = min(s.backoff_cap, s.backoff_base * 2 ** (n - 1))
            if outcome.retry_after is not None and outcome.retry_after > 0:
                delay = max(delay, min(outcome.retry_after, s.retry_after_cap))
            item.due, item.backoff = now + delay, True
        else:
            item.due, item.backoff = now, False

    def _remember_done(self, key: Key, now: float) -> None:
        """For the rate cap; entries older than the quiet period no longer matter (one-off keys such
        as sends would otherwise pile up)."""
        self._last_done[key] = now
        if len(self._last_done) > 2 * (len(self._pending) + len(self._running)) + 64:
            horizon = now - self.settings.debounce
            self._last_done = {k: t for k, t in self._last_done.items() if t > horizon}

    def _requeue(self, again: _Item, now: float) -> None:
        """Work that came in while its key was running, now that the grant succeeded."""
        if self._closed:
            if again.priority not in DRAINED:
                return
            again.due = now
        elif again.priority is Priority.PUSH:
            s = self.settings
            again.due = max(now, min(now + s.debounce, again.burst + s.max_delay))
        else:
            again.due = max(again.due, now)
        self._pending[again.key] = again

    # ------------------------------------------------------------------ shutdown

    def close(self, now: float) -> list[Work]:
        """Stop: no more submits, no retries; polls, resyncs and work in backoff are dropped (returned);
        user, push and settle work becomes due and goes only if the budget allows it at once."""
        if self._closed:
            return []
        self._closed = True
        dropped = [w for _, _, w in sorted(self._scheduled)]
        self._scheduled.clear()
        for table in (self._pending, self._again):
            for key, item in list(table.items()):
                if item.priority in DRAINED and not item.backoff:
                    item.due = min(item.due, now)
                else:
                    del table[key]
                    dropped.append(item.view())
        return dropped

    @property
    def closed(self) -> bool:
        return self._closed

    def abandon(self) -> list[Work]:
        """Forget everything still pending (the end of a drain) and return it, e.g. to fail waiters."""
        left = [i.view() for i in [*self._pending.values(), *self._again.values()]]
        left += [w for _, _, w in sorted(self._scheduled)]
        self._pending.clear()
        self._again.clear()
        self._scheduled.clear()
        return left

    def is_idle(self) -> bool:
        """Nothing pending, scheduled or running."""
        return not self._pending and not self._again and not self._running and not self._scheduled

    # ------------------------------------------------------------------ observability

    def depth(self) -> dict[Priority, int]:
        """Keys waiting per priority (pending, or waiting for their running key)."""
        out = dict.fromkeys(Priority, 0)
        for item in [*self._pending.values(), *self._again.values()]:
            out[item.priority] += 1
        return out

    @property
    def running(self) -> int:
        return len(self._running)

    def is_running(self, key: Key) -> bool:
        """Whether a grant of ``key`` is running now."""
        return key in self._running_keys

    def failures(self, key: Key) -> int:
        return self._failures.get(key, 0)

    def pending(self, key: Key) -> Work | None:
        item = self._pending.get(key) or self._again.get(key)
        return None if item is None else item.view()

    def due_at(self, key: Key) -> float | None:
        item = self._pending.get(key)
        return None if item is None else item.due

    def _groups(self) -> list[str]:
        seen = dict.fromkeys(GROUPS)
        for item in [*self._pending.values(), *self._again.values()]:
            seen.update(dict.fromkeys(item.cost))
        return list(seen)

    def budget_of(self, group: str, now: float) -> GroupBudget:
        limit_window = self.budget.limits(group)[1]
        bucket = self._bucket(group, now)
        next_slot = self._wait({group: 1}, Priority.PUSH, now, {})
        return GroupBudget(
            group=group,
            allowed=self.budget.allowed(group),
            window=limit_window,
            room=self.budget.room(group, now) - self._outstanding.get(group, 0),
            tokens=None if bucket is None else bucket.tokens,
            next_slot=next_slot,
        )

    def status(self, now: float) -> str:
        """One phrase when user, push or settle work waits for budget, or a group is penalised."""
        parts = [
            f"{g}, next slot in {max(1, math.ceil(wait))} s" if math.isfinite(wait) else g
            for g, wait in self.limited(now).items()
        ]
        return "rate-limited: " + "; ".join(parts) if parts else ""

    def limited(self, now: float) -> dict[str, float]:
        """The groups user, push or settle work waits for (or that are penalised), with the seconds
        until the next slot (inf: not within a window)."""
        limited: dict[str, float] = {}
        _, heads = self._scan(now, None)
        claims = self._claims(now)
        for item, _ in heads:
            if item.priority not in DRAINED:
                continue  # polls and resyncs waiting for headroom are the plan, not a limit
            for g, n in item.cost.items():
                wait = self._wait({g: n}, item.priority, now, claims)
                if wait > 0:
                    limited[g] = max(limited.get(g, 0.0), wait)
        for g in self._groups():
            if self.budget.penalised(g, now):
                limited[g] = max(limited.get(g, 0.0), self.budget.delay(g, now))
        return limited

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(
            depth=self.depth(),
            running=len(self._running),
            budgets={g: self.budget_of(g, now) for g in self._groups()},
            effective_debounce=self.effective_debounce(now),
            staleness=self.polls.staleness(now),
            status=self.status(now),
        )

    def set_extensions(self, keys: Iterable[Key], now: float) -> None:
        """The keys the poll schedule sweeps (``ext_key`` of every configured extension)."""
        self.polls.set_keys(keys, now)

    def set_active(self, keys: Iterable[Key]) -> None:
        """The keys with faxes in flight (their active poll)."""
        self.polls.set_active(keys)
