"""Per-group request rate limiting as RingCentral documents it (docs/ringcentral.md §5).

Sliding window per throttling group (Light/Medium/Heavy/Auth): at most ``limit`` requests in
any ``window`` seconds. Going over starts a ``penalty``; every request made during the penalty
is refused and restarts it (the "429 trap"). A fault can also force a 429 "storm" on a group.
Time is the event loop clock, so tests can run it under fake time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from faxd.sim.common import JsonDict


@dataclass
class Verdict:
    """The outcome of one request against its group's budget."""

    group: str
    allowed: bool
    limit: int
    remaining: int
    window: int
    retry_after: int = 0

    def headers(self) -> dict[str, str]:
        out = {
            "X-Rate-Limit-Group": self.group.lower(),
            "X-Rate-Limit-Limit": str(self.limit),
            "X-Rate-Limit-Remaining": str(self.remaining),
            "X-Rate-Limit-Window": str(self.window),
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


def rate_exceeded_body() -> JsonDict:
    return {
        "errorCode": "CMN-301",
        "message": "Request rate exceeded",
        "errors": [{"errorCode": "CMN-301", "message": "Request rate exceeded"}],
    }


@dataclass
class _GroupState:
    hits: deque[float] = field(default_factory=deque)
    penalty_until: float = 0.0
    storm_until: float = 0.0


class RateLimiter:
    """Sliding-window limiter keyed by throttling group."""

    def __init__(
        self,
        limits: dict[str, tuple[int, int, int]],
        clock: Callable[[], float],
        *,
        enabled: bool = True,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self.enabled = enabled
        self._groups: dict[str, _GroupState] = {}

    def _state(self, group: str) -> _GroupState:
        return self._groups.setdefault(group, _GroupState())

    def check(self, group: str) -> Verdict:
        """Account one request to ``group`` and say whether it may proceed."""
        limit, window, penalty = self._limits.get(group, (1_000_000, 60, 60))
        now = self._clock()
        state = self._state(group)
        while state.hits and state.hits[0] <= now - window:
            state.hits.popleft()
        if now < state.storm_until:
            retry = math.ceil(state.storm_until - now)
            return Verdict(group, False, limit, 0, window, max(1, retry))
        if self.enabled and now < state.penalty_until:
            state.penalty_until = now + penalty  # the trap: asking again restarts the penalty
            return Verdict(group, False, limit, 0, window, penalty)
        if self.enabled and len(state.hits) >= limit:
            state.penalty_until = now + penalty
            return Verdict(group, False, limit, 0, window, penalty)
        state.hits.append(now)
        return Verdict(group, True, limit, max(0, limit - len(state.hits)), window)

    def storm(self, group: str, seconds: float) -> None:
        """Fault: answer every request of ``group`` with 429 for ``seconds``."""
        self._state(group).storm_until = self._clock() + seconds

    def reset(self) -> None:
        self._groups.clear()
