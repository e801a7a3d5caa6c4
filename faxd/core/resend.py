"""The resend policy (``send.retry``): which failed faxes faxd sends again, when, and when it gives up.

A fax faxd sent with a ``ref`` is one *logical fax*. Each try is a RingCentral message of its own:
attempt 1 is the fax as sent, attempt n+1 is RingCentral's resend (``originalMessageId``) of attempt n.
Once an attempt is over (no recipient in flight), :func:`decide` looks at its recipients:

* the recipients that failed with an error category in :attr:`RetryPolicy.categories` (default
  ``busy`` and ``no_answer``; :mod:`faxd.core.taxonomy`) are the *targets*; none: nothing to do;
* the next attempt is due :meth:`RetryPolicy.wait_before` seconds after this one ended (``delay``,
  times ``backoff`` per attempt, at most ``max_delay``);
* faxd gives up when this was attempt ``max_attempts`` (HylaFAX's ``maxdials``), or when the next
  attempt would start after ``deadline`` seconds from attempt 1's creation (HylaFAX's ``killtime``).

A resend goes only to the targets (the resend request's ``to``): recipients that were ``Sent``, or
failed in a category the policy does not retry, are never faxed again. :func:`mark` shows the client
one logical fax: every transition of an attempt carries the ref and the attempt number; while another
attempt is planned, the failures it will retry (the fax's status and the targets' recipient events)
are ``final: false`` with ``retry_at``; when faxd gives up, those final events carry ``gave_up``.

Pure: no I/O, no clock reads; ``now`` (Unix time) is an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum

from faxd.core.model import EventKind, FaxState, FaxStatus, Transition
from faxd.core.taxonomy import FAX_ERROR_CODES, UNKNOWN, classify

#: Every error category a policy may name (:mod:`faxd.core.taxonomy`).
CATEGORIES = frozenset({c.category for c in FAX_ERROR_CODES.values()} | {UNKNOWN.category})
_FAILED = frozenset({FaxStatus.SENDING_FAILED.value, FaxStatus.DELIVERY_FAILED.value})
#: ``to_status`` of the event that says faxd gave up after the last attempt had already ended.
GAVE_UP = "GaveUp"


class GiveUp(StrEnum):
    """Why faxd stopped resending a logical fax (the ``gave_up`` field of its final event)."""

    MAX_ATTEMPTS = "max_attempts"  # the last failure was attempt max_attempts
    DEADLINE = "deadline"  # the next attempt would start after the deadline
    REFUSED = "refused"  # RingCentral refused the resend request (a 4xx other than 408/429)
    INTERRUPTED = "interrupted"  # faxd stopped during a resend request: its outcome is unknown


@dataclass(frozen=True)
class RetryPolicy:
    """``send.retry``: which failures are resent, how often, how far apart, until when."""

    categories: frozenset[str] = frozenset({"busy", "no_answer"})
    max_attempts: int = 1  # 1 = never resend
    delay: float = 300.0  # seconds from the end of attempt 1 to attempt 2
    backoff: float = 2.0  # each further wait is this many times the previous one
    max_delay: float = 3600.0
    deadline: float = 10800.0  # seconds from attempt 1's creation after which no attempt starts

    @property
    def enabled(self) -> bool:
        return self.max_attempts > 1

    def wait_before(self, attempt: int) -> float:
        """Seconds from the end of attempt ``attempt`` to the start of the next one."""
        return float(min(self.max_delay, self.delay * self.backoff ** max(0, attempt - 1)))


@dataclass(frozen=True)
class Attempt:
    """Which try of which logical fax one message is."""

    ref: str
    number: int
    first_at: float  # Unix time attempt 1 was created: the deadline counts from it


@dataclass(frozen=True)
class Decision:
    """What follows an attempt that ended with failures the policy retries."""

    targets: tuple[str, ...]  # phone numbers of the recipients to send to again
    retry_at: float | None = None  # Unix time of the next attempt; None when faxd gives up
    gave_up: GiveUp | None = None


def targets(state: FaxState, policy: RetryPolicy) -> tuple[str, ...]:
    """The phone numbers of ``state``'s recipients that failed in a category ``policy`` retries."""
    out: list[str] = []
    for r in state.recipients:
        klass = classify(r.error_code)
        retried = klass is not None and klass.category in policy.categories
        if r.status in _FAILED and r.phone and retried and r.phone not in out:
            out.append(r.phone)
    return tuple(out)


def decide(policy: RetryPolicy, state: FaxState, attempt: Attempt, now: float) -> Decision | None:
    """What follows ``attempt`` (whose message is ``state``) at ``now``; None while it is in flight,
    or when it has no failure the policy retries (the attempt's own events are then the end)."""
    if not policy.enabled or state.in_flight or state.direction != "Outbound":
        return None
    again = targets(state, policy)
    if not again:
        return None
    if attempt.number >= policy.max_attempts:
        return Decision(again, gave_up=GiveUp.MAX_ATTEMPTS)
    at = now + policy.wait_before(attempt.number)
    if at > attempt.first_at + policy.deadline:
        return Decision(again, gave_up=GiveUp.DEADLINE)
    return Decision(again, retry_at=at)


def retry_delay(policy: RetryPolicy, attempt: Attempt, now: float, wanted: float) -> float | None:
    """When a resend request that failed for a passing reason (5xx, 429, no answer) is tried again:
    ``wanted`` seconds from ``now``; None when that is after the deadline (faxd gives up)."""
    at = now + wanted
    return None if at > attempt.first_at + policy.deadline else at


def iso(ts: float) -> str:
    """Unix time as the journal writes times (ISO 8601 UTC, milliseconds, ``Z``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_retried(t: Transition, decision: Decision) -> bool:
    """Whether ``t`` is one of the failures ``decision`` is about: the fax's failed status, or the
    failure of a target recipient (by phone number, as a resend addresses it)."""
    if not t.final or t.to_status not in _FAILED:
        return False
    if t.kind is EventKind.STATUS:
        return True
    return t.kind is EventKind.RECIPIENT and t.recipient_phone in decision.targets


def mark(t: Transition, attempt: Attempt, decision: Decision | None) -> Transition:
    """``t`` as the client sees it: its logical fax's ref and attempt number; a failure that will be
    retried is not final and says when; a failure faxd gives up on says why."""
    marked = replace(t, ref=attempt.ref, attempt=attempt.number)
    if decision is None or not is_retried(t, decision):
        return marked
    if decision.retry_at is not None:
        return replace(marked, final=False, retry_at=iso(decision.retry_at))
    assert decision.gave_up is not None
    return replace(marked, gave_up=decision.gave_up.value)


def gave_up(
    fax_id: str, extension_id: str, status: str | None, attempt: Attempt, reason: GiveUp
) -> Transition:
    """The final event of a logical fax whose planned resend did not happen (refused, interrupted, or
    the deadline passed while the request was retried): kind ``resend``, on its last attempt's message
    (``fax_id``, last seen in ``status``)."""
    return Transition(
        kind=EventKind.RESEND,
        fax_id=fax_id,
        extension_id=extension_id,
        direction="Outbound",
        from_status=status,
        to_status=GAVE_UP,
        final=True,
        ref=attempt.ref,
        attempt=attempt.number,
        gave_up=reason.value,
    )
