"""Exponential backoff delays with jitter, as pure values.

``backoff()`` yields an endless series of delays (seconds); a caller "resets" by asking for a new
generator. ``KeyedBackoff`` keeps one series per key with the time each key may be retried.
This module must not sleep, read clocks or draw from global randomness: time comes in as ``now``
and randomness from an injected :class:`random.Random`, so tests replay exact delays.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Jitter = Literal["full", "equal", "decorrelated", "none"]
JITTERS: tuple[Jitter, ...] = ("full", "equal", "decorrelated", "none")


def backoff(
    initial: float = 2.0,
    factor: float = 2.0,
    cap: float = 60.0,
    jitter: Jitter = "full",
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Delays growing from ``initial`` by ``factor`` up to ``cap``, with jitter.

    - ``none``: initial, initial·factor, … , cap, cap, …
    - ``full``: uniform(0, that) — spreads a herd of clients the most (AWS "full jitter").
    - ``equal``: half of it fixed plus uniform(0, half) — never retries almost at once.
    - ``decorrelated``: uniform(initial, previous·factor·1.5), capped — grows on average like the
      others but each delay depends on the previous one rather than on the attempt count.
    """
    if initial <= 0 or factor < 1 or cap < initial:
        raise ValueError("need initial > 0, factor >= 1, cap >= initial")
    if jitter not in JITTERS:
        raise ValueError(f"unknown jitter {jitter!r}")
    r = rng if rng is not None else random.Random()
    ceiling = initial
    previous = initial
    while True:
        if jitter == "none":
            yield ceiling
        elif jitter == "full":
            yield r.uniform(0.0, ceiling)
        elif jitter == "equal":
            yield ceiling / 2 + r.uniform(0.0, ceiling / 2)
        else:
            previous = min(cap, r.uniform(initial, max(initial, previous * factor * 1.5)))
            yield previous
        ceiling = min(cap, ceiling * factor)


Policy = Callable[[], Iterator[float]]


@dataclass
class KeyedBackoff:
    """One backoff series per key: ``failed`` gives the delay, ``succeeded`` resets the key."""

    policy: Policy = field(default=backoff)
    _series: dict[Hashable, Iterator[float]] = field(default_factory=dict, init=False, repr=False)
    _ready_at: dict[Hashable, float] = field(default_factory=dict, init=False, repr=False)

    def failed(self, key: Hashable, now: float, *, at_least: float = 0.0) -> float:
        """Record a failure of ``key`` at ``now``; return how long to wait before the next try.

        ``at_least`` lets a server's Retry-After win over a shorter backoff delay.
        """
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.policy()
        delay = max(next(series), at_least)
        self._ready_at[key] = now + delay
        return delay

    def succeeded(self, key: Hashable) -> None:
        self._series.pop(key, None)
        self._ready_at.pop(key, None)

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` may be tried again (0 when it may be tried now)."""
        ready = self._ready_at.get(key)
        return 0.0 if ready is None else max(0.0, ready - now)

    def failing(self, key: Hashable) -> bool:
        return key in self._series
