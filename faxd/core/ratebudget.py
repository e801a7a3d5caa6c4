"""Client-side rate budget per RingCentral throttling group (docs/ringcentral.md §5).

Classifies a request into its group (Light, Medium, Heavy, Auth; the server's ``X-Rate-Limit-Group``
header wins over this table), counts what faxd sent in the sliding window, learns the real limits
from ``X-Rate-Limit-*`` headers, and answers "how long must the next request of this group wait".
faxd spends at most ``share`` of each window, so other
users of the same app and user keep some room, and after a 429 it sends nothing to that group
until Retry-After has passed (each request during a penalty would restart it).

This module must not sleep, read clocks or do I/O: ``now`` is passed in (a monotonic time).
"""

from __future__ import annotations

import bisect
import contextlib
import email.utils
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Final

LIGHT: Final = "Light"
MEDIUM: Final = "Medium"
HEAVY: Final = "Heavy"
AUTH: Final = "Auth"
GROUPS: Final = (LIGHT, MEDIUM, HEAVY, AUTH)
#: The API's version and server info (``GET /restapi``): counted in no group, never waits.
NO_THROTTLING: Final = "NoThrottling"

#: (limit, window seconds) when the server has not told us yet (RingCentral's defaults).
DEFAULT_LIMITS: Final[Mapping[str, tuple[int, float]]] = {
    LIGHT: (50, 60.0),
    MEDIUM: (40, 60.0),
    HEAVY: (10, 60.0),
    AUTH: (5, 60.0),
}
DEFAULT_RETRY_AFTER: Final = 30.0

_MESSAGE = re.compile(r"/message-store/[^/]+$")
_CONTENT = re.compile(r"/message-store/[^/]+/content/")
_SUBSCRIPTION_ITEM = re.compile(r"/subscription/[^/]+$")
_EXTENSION = re.compile(r"/extension/[^/]+$")


_GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_KNOWN = {g.lower(): g for g in GROUPS}


def group_name(header: str | None) -> str | None:
    """The group an ``X-Rate-Limit-Group`` value names: a known group in any case ("light" is
    Light), another plausible name as sent (RingCentral: group names may change), None when absent
    or not a name."""
    if header is None:
        return None
    value = header.strip()
    if not _GROUP_NAME.match(value):
        return None
    return _KNOWN.get(value.lower(), value)


def classify(method: str, path: str) -> str:
    """The throttling group of a request (docs/ringcentral.md §5.2); unknown requests count as Medium.

    The local table: a response's ``X-Rate-Limit-Group`` header, when present, overrides it."""
    method = method.upper()
    path = path.split("?", 1)[0].rstrip("/")
    if method == "GET" and path in ("/restapi", "/restapi/v1.0"):
        return NO_THROTTLING
    if path.startswith("/restapi/oauth/"):
        return AUTH
    if _CONTENT.search(path):
        return MEDIUM
    if path.endswith("/message-sync"):
        return LIGHT
    if path.endswith("/message-store") or _MESSAGE.search(path):
        return LIGHT if method == "GET" else MEDIUM
    if path.endswith("/fax") and method == "POST":
        return HEAVY
    if path.endswith("/subscription") or _SUBSCRIPTION_ITEM.search(path):
        return LIGHT if method == "GET" else MEDIUM
    if path.endswith(("/renew", "/dictionary/fax-cover-page")):
        return LIGHT
    if _EXTENSION.search(path):
        return LIGHT if method == "GET" else MEDIUM  # readExtension (faxd doctor)
    return MEDIUM


@dataclass(slots=True)
class _Group:
    limit: int
    window: float
    sent: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0  # server says our share is used up (Remaining header)
    penalty_until: float = 0.0  # after a 429


class RateBudget:
    """Sliding-window budget per group. Call ``delay``, then ``spent`` without awaiting in between."""

    def __init__(
        self, share: float = 0.8, defaults: Mapping[str, tuple[int, float]] = DEFAULT_LIMITS
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.share = share
        self._defaults = dict(defaults)
        self._groups: dict[str, _Group] = {}

    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            limit, window = self._defaults.get(name, DEFAULT_LIMITS[MEDIUM])
            g = self._groups[name] = _Group(limit, window)
        return g

    def allowed(self, group: str) -> int:
        """Requests faxd may send per window: ``share`` of the limit, at least one."""
        return max(1, math.floor(self._group(group).limit * self.share))

    def limits(self, group: str) -> tuple[int, float]:
        g = self._group(group)
        return g.limit, g.window

    def _expire(self, g: _Group, now: float) -> None:
        while g.sent and g.sent[0] <= now - g.window:
            g.sent.popleft()

    def delay(self, group: str, now: float, n: int = 1) -> float:
        """Seconds to wait before the next ``n`` requests of ``group`` may be sent (0: send now;
        infinite when ``n`` is more than the share of a whole window)."""
        if group == NO_THROTTLING:
            return 0.0
        g = self._group(group)
        self._expire(g, now)
        wait = max(0.0, g.penalty_until - now, g.blocked_until - now)
        allowed = self.allowed(group)
        if n > allowed:
            return math.inf
        if len(g.sent) + n > allowed:
            # The requests may go once enough of the oldest sends have left the window.
            wait = max(wait, self._leaves(g, g.sent[len(g.sent) + n - 1 - allowed]) - now)
        return wait

    @staticmethod
    def _leaves(g: _Group, sent_at: float) -> float:
        """The first time at which ``_expire`` drops a send made at ``sent_at``: ``sent_at + window``,
        nudged past float rounding (60.3 - 60 < 0.3), so that waiting ``delay`` always frees the slot."""
        t = sent_at + g.window
        while sent_at > t - g.window:
            t = math.nextafter(t, math.inf)
        return t

    def room(self, group: str, now: float) -> int:
        """Requests of ``group`` that may be sent now without waiting (0 during a penalty or block)."""
        g = self._group(group)
        self._expire(g, now)
        if g.penalty_until > now or g.blocked_until > now:
            return 0
        return max(0, self.allowed(group) - len(g.sent))

    def spent(self, group: str, now: float) -> None:
        if group == NO_THROTTLING:
            return
        g = self._group(group)
        self._expire(g, now)
        g.sent.append(now)

    def answered(self, group: str, sent_at: float, now: float) -> None:
        """The request sent at ``sent_at`` was answered (or failed) at ``now``.

        RingCentral counts a request when it arrives, which is somewhere between our send and its
        answer: a request that travelled slower than the one sent a window later would put both in
        the server's window. Counting it from the answer keeps our share an upper bound of what the
        server sees, at the cost of one round trip per window.
        """
        sent = self._group(group).sent
        with contextlib.suppress(ValueError):
            sent.remove(sent_at)
            sent.insert(bisect.bisect_right(sent, now), now)

    def moved(self, old: str, new: str, sent_at: float) -> None:
        """The request sent at ``sent_at`` and counted in ``old`` belongs to ``new`` (the server's
        ``X-Rate-Limit-Group`` said so)."""
        if old == new:
            return
        with contextlib.suppress(ValueError):
            self._group(old).sent.remove(sent_at)
        sent = self._group(new).sent
        sent.insert(bisect.bisect_right(sent, sent_at), sent_at)

    def observed(
        self,
        group: str,
        now: float,
        *,
        limit: int | None = None,
        remaining: int | None = None,
        window: float | None = None,
    ) -> None:
        """Learn from ``X-Rate-Limit-Limit/Remaining/Window`` (any may be missing)."""
        g = self._group(group)
        if limit is not None and limit > 0:
            g.limit = limit
        if window is not None and window > 0:
            g.window = window
        if remaining is not None:
            # Others (another process of the same app and user) may have used part of the window:
            # the server's count is the truth. When only our own requests fill it, the sliding window
            # in ``delay`` already knows when the next may go. When others' requests are in it too,
            # we cannot know when theirs leave: once our share is gone, wait a full window.
            self._expire(g, now)
            reserve = g.limit - self.allowed(group)
            others = (g.limit - remaining) - len(g.sent)
            if remaining <= reserve and others > 0:
                g.blocked_until = max(g.blocked_until, now + g.window)

    def penalty(self, group: str, now: float, retry_after: float | None = None) -> None:
        """A 429: send nothing to ``group`` for Retry-After seconds (30 s when absent)."""
        g = self._group(group)
        seconds = DEFAULT_RETRY_AFTER if retry_after is None or retry_after < 0 else retry_after
        g.penalty_until = max(g.penalty_until, now + seconds)

    def penalised(self, group: str, now: float) -> bool:
        return self._group(group).penalty_until > now


def parse_headers(headers: Mapping[str, str]) -> tuple[int | None, int | None, float | None]:
    """(limit, remaining, window) from a response's headers; unparsable values are None."""

    def num(name: str) -> float | None:
        raw = headers.get(name)
        if raw is None:
            return None
        try:
            value = float(raw.strip())
        except ValueError:
            return None
        return value if math.isfinite(value) and value >= 0 else None

    limit, remaining, window = (
        num("X-Rate-Limit-Limit"),
        num("X-Rate-Limit-Remaining"),
        num("X-Rate-Limit-Window"),
    )
    return (
        None if limit is None else int(limit),
        None if remaining is None else int(remaining),
        window,
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds: delta-seconds, or an HTTP-date (RFC 9110 §10.2.3) when ``now`` (the
    wall clock, Unix seconds) is given to measure it against; a date in the past is 0. None when
    absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        if now is None:
            return None
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:  # "-0000": UTC by RFC 5322
            moment = moment.replace(tzinfo=UTC)
        return max(0.0, moment.timestamp() - now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
