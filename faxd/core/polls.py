"""The poll schedules: when each extension is due for a check, as pure bookkeeping on time passed in.

:class:`PollSchedule` is the per-key schedule of polls the request scheduler
(:mod:`faxd.core.scheduler`) builds on. :class:`ReconcileTimers` holds the reconcile engine's other
timers, which :func:`faxd.adapters.reconcile.timers_forever` drives on the loop's clock:

* Journal retention runs at the start and every ``prune_interval`` (never when it is None).
* A settle check of the key whose wait is due first is due when its time comes
  (:meth:`ReconcileTimers.settle_due`), but at most once per ``settle_quiet`` per key: a settle check
  in progress does not settle at once (it waits for budget, or the check failed and backs off).
* :meth:`ReconcileTimers.next_wake` is the earliest of these; a caller also wakes when a new wait
  began (it may be due sooner).

:class:`PollSchedule` rules:

A *check* is a reconcile that also reads the faxes in flight by id (a bulk GET), so it finds what
push and message-sync missed; a push-hinted reconcile alone is not one. The schedule says which keys
are due for a check and how urgent they are; it never sends anything and never decides budget: the
request scheduler (:mod:`faxd.core.scheduler`) turns due keys into poll work that spends only the
headroom of the rate budget. Rules:

* Every key is checked at least every ``interval`` (the safety poll), counted from its last check,
  whatever caused it (a poll, start-up, resync, a settle check, a client's ``sync``).
* A key with faxes in flight (:meth:`PollSchedule.set_active`) is also due ``active_interval`` after
  its last check (the active poll); while push is down (:meth:`PollSchedule.set_push`) that becomes
  ``min(active_interval, outage_interval)``, so a gateway outage costs seconds, not an interval. The
  same holds, one key at a time, for keys whose push alone is refused (:meth:`PollSchedule.set_unpushed`:
  RingCentral refused their event filters while the subscription works for the others).
* Keys added together are spread over one ``interval`` (round-robin), so a hundred extensions do not
  all fall due at the same instant; since each key's next due time counts from its own last check,
  a sweep that the budget delays stretches instead of piling up.
* :meth:`PollSchedule.due` hands a due key out once (oldest due first) and then not again until it is
  checked: the poll may wait in the scheduler's queue for headroom, and asking twice would not make
  it sooner. Should the check never come (the work was dropped), the key is handed out again one
  interval later.
* :meth:`PollSchedule.put_off` takes a handed-out safety poll back and offers it again one active
  period later (the request scheduler does so while push is reading that key), at most once per
  due: a second offer stands, so a safety poll is never more than one active period late for this.
* Time only comes in as ``now``; :meth:`PollSchedule.next_wake` says when the next key falls due.

This module must not do I/O, read clocks, or know about rate budgets, requests or the event loop.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class PollKind(enum.Enum):
    """Why a key is due: it has faxes in flight (``ACTIVE``), or only the safety net (``SAFETY``)."""

    ACTIVE = "active"
    SAFETY = "safety"


@dataclass(slots=True)
class _Entry:
    last: float  # the last check (for a new key: when it was added)
    safety_due: float  # next safety poll; after the first round, last + interval
    requested: float | None = None  # when due() handed the key out, until it is checked
    held: float | None = None  # a safety poll put off until then (put_off), until it is checked
    order: int = 0  # tie-break: the order keys were added in


class PollSchedule(Generic[K]):
    """Per-key check deadlines: a safety interval for all, a shorter one for keys with faxes in flight."""

    def __init__(self, interval: float, active_interval: float, outage_interval: float = 5.0) -> None:
        self._entries: dict[K, _Entry] = {}
        self._active: set[K] = set()
        self._unpushed: set[K] = set()
        self._push_up = True
        self._order = 0
        self.configure(interval, active_interval, outage_interval)

    def configure(self, interval: float, active_interval: float, outage_interval: float) -> None:
        """New intervals (a reload); every key's next safety poll counts from its last check again."""
        if min(interval, active_interval, outage_interval) <= 0:
            raise ValueError("poll intervals must be positive")
        self.interval = interval
        self.active_interval = active_interval
        self.outage_interval = outage_interval
        for entry in self._entries.values():
            entry.safety_due = entry.last + interval

    # -- what is polled ------------------------------------------------------------------------------

    def set_keys(self, keys: Iterable[K], now: float) -> None:
        """The keys to poll. New ones are spread over one interval; gone ones are forgotten."""
        wanted = list(dict.fromkeys(keys))
        for key in [k for k in self._entries if k not in wanted]:
            del self._entries[key]
            self._active.discard(key)
            self._unpushed.discard(key)
        new = [k for k in wanted if k not in self._entries]
        for i, key in enumerate(new):
            self._order += 1
            self._entries[key] = _Entry(
                last=now, safety_due=now + self.interval * (i + 1) / len(new), order=self._order
            )

    def set_active(self, keys: Iterable[K]) -> None:
        """The keys with faxes in flight now (unknown keys are ignored)."""
        self._active = {k for k in keys if k in self._entries}

    def set_push(self, up: bool) -> None:
        """Whether push (the WebSocket subscription) works; while it does not, active keys poll faster."""
        self._push_up = up

    @property
    def push_up(self) -> bool:
        return self._push_up

    def set_unpushed(self, keys: Iterable[K]) -> None:
        """The keys that get no push although the subscription works (unknown keys are ignored)."""
        self._unpushed = {k for k in keys if k in self._entries}

    def keys(self) -> list[K]:
        return list(self._entries)

    def is_active(self, key: K) -> bool:
        return key in self._active

    # -- time ----------------------------------------------------------------------------------------

    def active_period(self, key: K | None = None) -> float:
        """The interval of a key with faxes in flight, as it is now (for ``key``: its own push)."""
        if self._push_up and key not in self._unpushed:
            return self.active_interval
        return min(self.active_interval, self.outage_interval)

    def due_at(self, key: K) -> float:
        """When ``key`` is next due for a check (while not yet handed out)."""
        entry = self._entries[key]
        due = entry.safety_due
        if key in self._active:
            due = min(due, entry.last + self.active_period(key))
        if entry.requested is not None:
            # Handed out and not checked yet: ask again only if the check never comes.
            due = max(due, entry.requested + self._period(key))
        elif entry.held is not None:
            due = max(due, entry.held)
        return due

    def _period(self, key: K) -> float:
        return min(self.interval, self.active_period(key)) if key in self._active else self.interval

    def kind(self, key: K) -> PollKind:
        return PollKind.ACTIVE if key in self._active else PollKind.SAFETY

    def due(self, now: float) -> list[tuple[K, PollKind]]:
        """Keys due for a check at ``now``, oldest due first; each is handed out once until checked."""
        ready = sorted(
            ((self.due_at(k), e.order, k) for k, e in self._entries.items() if self.due_at(k) <= now),
            key=lambda t: (t[0], t[1]),
        )
        out: list[tuple[K, PollKind]] = []
        for _, _, key in ready:
            self._entries[key].requested = now
            out.append((key, self.kind(key)))
        return out

    def put_off(self, key: K, now: float) -> bool:
        """Take back the safety poll of ``key`` just handed out: due again one active period from
        ``now``. Only once until the key is checked; False (nothing changed) the second time, so the
        poll is at most one active period later than it would have been."""
        entry = self._entries.get(key)
        if entry is None or entry.held is not None:
            return False
        entry.requested = None
        entry.held = now + min(self.interval, self.active_period(key))
        return True

    def next_wake(self) -> float | None:
        """When the next key falls due; None when there are no keys."""
        return min((self.due_at(k) for k in self._entries), default=None)

    def checked(self, key: K, now: float) -> None:
        """A check of ``key`` succeeded at ``now``: its intervals count from here."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.last = now
        entry.safety_due = now + self.interval
        entry.requested = None
        entry.held = None

    def staleness(self, now: float) -> float:
        """The longest any key has gone without a check (0 without keys): the sweep's lag."""
        return max((now - e.last for e in self._entries.values()), default=0.0)


class Timer(enum.Enum):
    """What :meth:`ReconcileTimers.due` says is due."""

    PRUNE = "prune"  # journal retention


class ReconcileTimers(Generic[K]):
    """The reconcile engine's timers besides polls: retention and settle checks."""

    def __init__(self, now: float, *, prune_interval: float | None, settle_quiet: float) -> None:
        self.prune_interval = prune_interval
        self.settle_quiet = settle_quiet
        self._next_prune = now if prune_interval is not None else math.inf
        self._settle_hinted: dict[K, float] = {}  # key -> when its last settle check was asked for

    def due(self, now: float) -> list[Timer]:
        """What is due at ``now``; each is then scheduled again from ``now``."""
        out: list[Timer] = []
        if now >= self._next_prune and self.prune_interval is not None:
            out.append(Timer.PRUNE)
            self._next_prune = now + self.prune_interval
        return out

    def _settle_again(self, key: K) -> float:
        return self._settle_hinted.get(key, -math.inf) + self.settle_quiet

    def settle_due(self, now: float, at: float, key: K) -> bool:
        """Whether to ask for a settle check of ``key``, whose first wait is due ``at``; if so, noted."""
        if at <= now and now >= self._settle_again(key):
            self._settle_hinted[key] = now
            return True
        return False

    def next_wake(self, settle: tuple[float, K] | None = None) -> float:
        """When something is due next (``inf``: nothing), given the first wait (due time, key) not
        yet asked for."""
        wake = self._next_prune
        if settle is not None:
            at, key = settle
            wake = min(wake, max(at, self._settle_again(key)))
        return wake
