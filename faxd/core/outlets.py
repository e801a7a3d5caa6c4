"""Policy of the outlets (exec hooks and webhooks, docs/outlets.md): what an attempt's outcome means, how
long to wait before the next one, when to give an event up, and how a webhook is signed.

An outlet delivers the journal's events at least once, in seq order, from a durable cursor. Each
attempt ends in one :class:`Outcome`: ``delivered``, ``retry`` (a 5xx, 408, 429, a timeout, a
connection error, a hook's non-zero exit) or ``park`` (a 4xx the receiver will answer again: retrying
cannot help, so the event goes to the dead-letter table and the outlet goes on). A retried event
waits an exponential backoff with jitter, at least what ``Retry-After`` asked, and is dead-lettered
once an attempt fails more than ``max_age`` after the event was journalled.

Signatures follow the Standard Webhooks specification (v1: HMAC-SHA256 over ``id.timestamp.body``,
base64, with a ``whsec_``-prefixed base64 secret); the tests check them with the ``standardwebhooks``
package's verifier, an implementation independent of this one.

This module must not do I/O, read a clock or a random source (callers pass ``now`` and ``rand``), or
log; a secret passed in must never appear in a return value other than a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Final, Literal

from faxd.core.protocol import Filter

#: Shortest and longest webhook secret, in bytes once decoded (Standard Webhooks: 24 to 64).
SECRET_MIN_BYTES: Final = 24
SECRET_MAX_BYTES: Final = 64
SECRET_PREFIX: Final = "whsec_"


class Outcome(StrEnum):
    """How one delivery attempt ended."""

    DELIVERED = "delivered"
    RETRY = "retry"
    PARK = "park"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt's result: the outcome, a short reason for logs and the dead-letter table (never a
    secret or a body), and the receiver's ``Retry-After`` in seconds, if it gave one."""

    outcome: Outcome
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between attempts of one event, and when to give it up (seconds)."""

    initial: float = 1.0
    cap: float = 300.0
    max_age: float = 86400.0

    def delay(self, failures: int, rand: float) -> float:
        """The wait after the ``failures``-th failed attempt (1, 2, ...): ``initial * 2**(failures-1)``
        capped at ``cap``, of which a random half (``rand`` in [0, 1)) is taken off so that outlets
        failing together do not retry in step."""
        base = min(self.cap, self.initial * 2.0 ** min(failures - 1, 62))
        return base / 2 + base / 2 * rand


@dataclass(frozen=True)
class OutletSettings:
    """What one outlet runs with (``outlets.NAME`` of the config, made by
    :func:`faxd.config.outlet_settings`); ``key`` is the decoded signing secret of a webhook."""

    name: str
    kind: Literal["webhook", "exec"]
    retry: RetryPolicy
    timeout: float
    filter: Filter = field(default_factory=Filter)
    include_numbers: bool = False
    url: str | None = None
    key: bytes = field(default=b"", repr=False)
    ca_file: str | None = None
    command: tuple[str, ...] = ()
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class Retry:
    """Attempt again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Put the event into the dead-letter table, with ``reason``."""

    reason: str


def after_failure(
    policy: RetryPolicy, attempt: Attempt, *, failures: int, observed_at: float, now: float, rand: float
) -> Retry | GiveUp:
    """What to do after a failed attempt (the ``failures``-th in a row) of an event journalled at
    ``observed_at`` (Unix time).

    A parked attempt gives up at once. A retry gives up when the event is ``max_age`` old; otherwise
    it waits the backoff or the receiver's ``Retry-After``, whichever is longer, but never past the
    event's ``max_age``, so that one last attempt is made then.
    """
    if attempt.outcome is Outcome.PARK:
        return GiveUp(attempt.reason)
    deadline = observed_at + policy.max_age
    if now >= deadline:
        return GiveUp(f"{attempt.reason}; undelivered after max_age ({policy.max_age:g}s)")
    delay = max(policy.delay(failures, rand), attempt.retry_after or 0.0)
    return Retry(min(delay, deadline - now))


def classify_status(status: int) -> Outcome:
    """A webhook receiver's HTTP status: any 2xx delivers; 408, 429 and 5xx are worth retrying; any
    other answer (3xx, 4xx) would be the same next time, so the event is parked."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in (408, 429) or status >= 500:
        return Outcome.RETRY
    return Outcome.PARK


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP-date, RFC 9110 §10.2.3);
    None when absent or unreadable. A date in the past means 0."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT; a zone-less one is read as such
        return None
    return max(0.0, when.timestamp() - now)


# --------------------------------------------------------------------------------------------- signing


def decode_secret(text: str) -> bytes:
    """The key bytes of a Standard Webhooks secret (base64, optionally prefixed ``whsec_``);
    ValueError, naming no part of the secret, when it is not one."""
    body = text.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"a webhook secret is base64 (optionally prefixed {SECRET_PREFIX}), e.g. from"
            " `head -c 32 /dev/urandom | base64`; this one is not valid base64"
        ) from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(
            f"a webhook secret must decode to {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes;"
            f" this one decodes to {len(key)}"
        )
    return key


def webhook_id(epoch: str, seq: int) -> str:
    """The ``webhook-id`` of the event ``seq`` of the journal ``epoch``: the same on every attempt and
    after restarts, so receivers can drop repeats; a restored journal (new epoch) gets new ids."""
    return f"{epoch}:{seq}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def webhook_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (``timestamp``: Unix seconds of the attempt)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
        "content-type": "application/json",
    }


# --------------------------------------------------------------------------------------------- exec hooks


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def hook_environment(
    event: Mapping[str, Any], *, outlet: str, attempt: int, base: Mapping[str, str]
) -> dict[str, str]:
    """The environment of a hook run for ``event`` (its wire object, as POSTed and written to the
    hook's stdin): ``base`` plus one ``FAXD_*`` variable per main field ("" for null; booleans as
    ``true``/``false``). docs/outlets.md lists them."""
    recipient = event.get("recipient") or {}
    fields = {
        "FAXD_OUTLET": outlet,
        "FAXD_ATTEMPT": attempt,
        "FAXD_EVENT_ID": webhook_id(str(event["epoch"]), int(event["seq"])),
        "FAXD_EVENT_SEQ": event["seq"],
        "FAXD_EVENT_EPOCH": event["epoch"],
        "FAXD_EVENT_KIND": event.get("kind"),
        "FAXD_FAX_ID": event.get("fax_id"),
        "FAXD_EXTENSION_ID": event.get("extension_id"),
        "FAXD_DIRECTION": event.get("direction"),
        "FAXD_REF": event.get("ref"),
        "FAXD_FROM_STATUS": event.get("from_status"),
        "FAXD_STATUS": event.get("to_status"),
        "FAXD_FINAL": event.get("final"),
        "FAXD_ERROR_CODE": event.get("error_code"),
        "FAXD_ERROR_CATEGORY": event.get("error_category"),
        "FAXD_RETRYABLE": event.get("retryable"),
        "FAXD_PAGES": event.get("pages"),
        "FAXD_RECIPIENT_INDEX": recipient.get("index"),
        "FAXD_RECIPIENT_PHONE": recipient.get("phone"),
        "FAXD_OBSERVED_AT": event.get("observed_at"),
    }
    return {**base, **{name: _env_value(value) for name, value in fields.items()}}


def exit_outcome(returncode: int) -> Attempt:
    """A hook's exit: 0 delivers; anything else (a signal too) is retried."""
    if returncode == 0:
        return Attempt(Outcome.DELIVERED, "exit 0")
    if returncode < 0:
        return Attempt(Outcome.RETRY, f"killed by signal {-returncode}")
    return Attempt(Outcome.RETRY, f"exit {returncode}")
