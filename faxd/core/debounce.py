"""A keyed work queue with debouncing, in the manner of client-go's workqueue, on time passed in.

A key (an extension id) names work that can be coalesced: "reconcile this extension's fax box".
Rules:

* A key is pending at most once (dirty set): more hints for a pending key only move its due time.
* A key is never handed out twice at once (processing set). A hint that arrives while the key is being
  processed marks it; when the worker reports :meth:`KeyedQueue.done`, the key is pending again, once.
* Quiet period ``debounce``: each hint pushes the due time to ``now + debounce``, but never past
  ``first hint + max_delay``, so a key that keeps getting hints is still served.
* Leading edge: a hint for a key that has been idle (not pending, not processing, not done within the
  last ``debounce``) is due at once — an isolated change is reported without waiting.
* Rate cap: a key is not handed out again within ``debounce`` of its last :meth:`KeyedQueue.done`.
  A first hint for a key done less than ``debounce`` ago is due at ``last done + debounce`` (what is
  left of the window, not a whole new quiet period from the hint); later hints of the same burst slide
  it as above.
* Errors back off per key (``backoff_base * 2**(n-1)``, capped at ``backoff_cap``, or longer when the
  worker says the failure is known to last: ``done(at_least=...)``) and reset on success.
* Each pending key carries the set of reasons (triggers) that asked for it, merged when coalesced.
* :meth:`KeyedQueue.flush` makes every pending key due now (for a drain on shutdown).
* :meth:`KeyedQueue.shut_down` (client-go's ``ShutDownWithDrain``): new hints are dropped, pending keys
  become due at once, and a key that fails is not retried (start-up redoes it); the driver finishes
  what is pending and processing, and is drained when :meth:`KeyedQueue.is_idle`.
* A hint never shortens a backoff, except an ``immediate`` one (start-up, lost WS session, a client's
  ``sync`` request): those mean "the state is unknown now", which outranks an error pause.

Pure: no asyncio, no clock reads. The async driver owns the clock and sleeps until
:meth:`KeyedQueue.next_deadline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Pending:
    due: float
    first: float  # when the burst that made this key pending began; bounds the debounce
    reasons: set[str] = field(default_factory=set)


@dataclass
class KeyedQueue:
    debounce: float
    max_delay: float
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _processing: set[str] = field(default_factory=set)
    # Hints that arrived while the key was processing: reasons and the time of the first one.
    _again: dict[str, tuple[float, set[str]]] = field(default_factory=dict)
    _last_done: dict[str, float] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
    _closed: bool = False

    def add(self, key: str, reason: str, now: float, *, immediate: bool = False) -> bool:
        """A hint (or a poll, or a request) for ``key``. ``immediate`` skips the quiet period.

        Returns False when the hint was dropped because the queue is shutting down.
        """
        if self._closed:
            return False
        if key in self._processing:
            first, reasons = self._again.get(key, (now, set()))
            reasons.add(reason)
            self._again[key] = (first, reasons)
            return True
        pending = self._pending.get(key)
        if pending is None:
            last = self._last_done.get(key)
            idle = last is None or now - last >= self.debounce
            # Done recently: wait only for the rest of the window (the rate cap). It ends before
            # now + debounce, hence within first + max_delay (max_delay >= debounce).
            due = now if immediate or idle or last is None else last + self.debounce
            self._pending[key] = _Pending(due=due, first=now, reasons={reason})
            return True
        pending.reasons.add(reason)
        if immediate:
            pending.due = min(pending.due, now)
        elif pending.due > now:
            # Still in the quiet period: slide it, within the bound. (A key already due stays due.)
            pending.due = max(pending.due, min(now + self.debounce, pending.first + self.max_delay))
        return True

    def retime(self, debounce: float, max_delay: float) -> None:
        """New quiet period and bound (a reload): they shape every hint from now on; a key already
        pending keeps its due time until its next hint."""
        if max_delay < debounce:
            raise ValueError("max_delay must be >= debounce")
        self.debounce, self.max_delay = debounce, max_delay

    def next_deadline(self) -> float | None:
        """When the earliest pending key becomes due; None when nothing is pending."""
        if not self._pending:
            return None
        return min(p.due for p in self._pending.values())

    def pop(self, now: float) -> tuple[str, set[str]] | None:
        """The most overdue key and its reasons, moved to processing; None when nothing is due."""
        due = [(p.due, key) for key, p in self._pending.items() if p.due <= now]
        if not due:
            return None
        _, key = min(due)
        pending = self._pending.pop(key)
        self._processing.add(key)
        return key, pending.reasons

    def done(self, key: str, now: float, *, ok: bool, at_least: float = 0.0) -> float | None:
        """The worker finished ``key``. On failure the key comes back after its backoff (returned),
        or after ``at_least`` when that is longer (a failure that is known to last)."""
        self._processing.discard(key)
        self._last_done[key] = now
        again = self._again.pop(key, None)
        delay: float | None = None
        if ok:
            self._failures.pop(key, None)
        elif self._closed:
            # Shutting down: no retry (the next start-up reconciles every extension anyway).
            return None
        else:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            delay = max(at_least, min(self.backoff_cap, self.backoff_base * 2 ** (n - 1)))
            reasons = {"retry"} if again is None else again[1] | {"retry"}
            self._pending[key] = _Pending(due=now + delay, first=now, reasons=reasons)
            return delay
        if again is not None:
            first, reasons = again
            # Hints came in during processing: the new state must be read, after a quiet period.
            due = now if self._closed else min(now + self.debounce, first + self.max_delay)
            self._pending[key] = _Pending(due=max(due, now), first=first, reasons=reasons)
        return delay

    def flush(self, now: float) -> None:
        """Make every pending key due now."""
        for pending in self._pending.values():
            pending.due = min(pending.due, now)

    def shut_down(self, now: float) -> None:
        """Stop taking hints; what is pending becomes due now and is still handed out (the drain)."""
        self._closed = True
        self.flush(now)

    @property
    def closed(self) -> bool:
        return self._closed

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    @property
    def depth(self) -> int:
        """Keys pending (not counting those being processed)."""
        return len(self._pending)

    def is_idle(self) -> bool:
        return not self._pending and not self._processing
