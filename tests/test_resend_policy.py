"""The resend policy (send.retry) without I/O: the rules of faxd.core.resend and the config keys.

The worker against the simulator is tests/test_resend.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from faxd.config import ConfigError, parse_config
from faxd.core.model import EventKind, FaxState, RecipientState
from faxd.core.resend import Attempt, GiveUp, RetryPolicy, decide, mark, targets
from faxd.core.status import diff

EXT = "200000001"


# -- the pure rules ----------------------------------------------------------------------------------


def _fax(*recipients: tuple[str, str, str | None], ref: str | None = "r") -> FaxState:
    rs = tuple(RecipientState(i, phone, status, code) for i, (phone, status, code) in enumerate(recipients))
    statuses = {r.status for r in rs}
    status = "Queued" if "Queued" in statuses else "SendingFailed" if "SendingFailed" in statuses else "Sent"
    return FaxState("f1", EXT, "Outbound", status, recipients=rs, created="2026-01-01T00:00:00Z", ref=ref)


POLICY = RetryPolicy(max_attempts=3, delay=60, backoff=2, max_delay=100, deadline=1000)


def test_waits_grow_by_the_backoff_up_to_max_delay() -> None:
    assert [POLICY.wait_before(n) for n in (1, 2, 3, 4)] == [60, 100, 100, 100]
    assert RetryPolicy(delay=10, backoff=3, max_delay=1e9).wait_before(3) == 90


def test_only_failures_in_the_categories_are_targets() -> None:
    fax = _fax(
        ("+1", "SendingFailed", "LineBusy"),
        ("+2", "Sent", None),
        ("+3", "SendingFailed", "InvalidNumber"),
        ("+4", "SendingFailed", "NoAnswer"),
    )
    assert targets(fax, POLICY) == ("+1", "+4")
    assert targets(fax, RetryPolicy(categories=frozenset({"invalid_number"}))) == ("+3",)


def test_decide_plans_gives_up_or_leaves_alone() -> None:
    busy = _fax(("+1", "SendingFailed", "LineBusy"))
    first = Attempt("r", 1, first_at=0.0)
    assert decide(POLICY, busy, first, now=10).retry_at == 70  # type: ignore[union-attr]
    last = decide(POLICY, busy, Attempt("r", 3, 0.0), now=10)
    assert last is not None
    assert last.gave_up is GiveUp.MAX_ATTEMPTS
    late = decide(POLICY, busy, Attempt("r", 2, 0.0), now=950)  # 950 + 100 > 0 + 1000
    assert late is not None
    assert late.gave_up is GiveUp.DEADLINE
    assert decide(POLICY, _fax(("+1", "Queued", None)), first, now=10) is None  # still in flight
    assert decide(POLICY, _fax(("+1", "SendingFailed", "InvalidNumber")), first, now=10) is None
    assert decide(POLICY, _fax(("+1", "Sent", None)), first, now=10) is None
    assert decide(RetryPolicy(), busy, first, now=10) is None  # max_attempts 1: never


def test_mark_makes_one_logical_fax_of_the_attempts() -> None:
    before = _fax(("+1", "Queued", None), ("+2", "Queued", None), ("+3", "Queued", None))
    after = _fax(
        ("+1", "SendingFailed", "LineBusy"), ("+2", "Sent", None), ("+3", "SendingFailed", "WrongNumber")
    )
    attempt = Attempt("r", 1, 0.0)
    decision = decide(POLICY, after, attempt, now=10)
    marked = {(t.kind, t.recipient_phone): mark(t, attempt, decision) for t in diff(before, after)}
    assert all(t.ref == "r" and t.attempt == 1 for t in marked.values())
    fax_level = marked[(EventKind.STATUS, None)]
    assert (fax_level.final, fax_level.retry_at) == (False, "1970-01-01T00:01:10.000Z")
    assert not marked[(EventKind.RECIPIENT, "+1")].final  # retried
    assert marked[(EventKind.RECIPIENT, "+2")].final  # Sent: never faxed again
    assert marked[(EventKind.RECIPIENT, "+3")].final  # a category not retried: this is its end
    gave_up = decide(POLICY, after, Attempt("r", 3, 0.0), now=10)
    last = [mark(t, Attempt("r", 3, 0.0), gave_up) for t in diff(before, after)]
    assert [t.gave_up for t in last if t.gave_up] == ["max_attempts", "max_attempts"]  # fax and +1
    assert all(t.final for t in last)


# -- config ---------------------------------------------------------------------------------------------

MINIMAL: dict[str, Any] = {
    "ringcentral": {"client_id": "x", "client_secret": {"env": "S"}, "jwt": {"env": "J"}},
}


def _retry(**values: object) -> dict[str, Any]:
    return {**MINIMAL, "send": {"retry": values}}


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("categories", ["busy", "bussy"], "item 1: expected an error category (billing, busy,"),
        ("categories", "busy", "expected a list of error categories"),
        ("max_attempts", 0, "must be >= 1, got 0"),
        ("delay", "soon", 'expected a duration like 1.5, "90s" or "5m", got "soon"'),
        ("backoff", 0.5, "expected a number from 1 to 100, got 0.5"),
        ("deadline", 0, "must be more than 0 seconds, got 0"),
        ("max_delay", "1s", "must be >= send.retry.delay (300), got 1"),
        ("tries", 3, "unknown key"),
    ],
)
def test_bad_retry_values_name_the_key(key: str, value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_retry(**{key: value}), environ={"S": "s", "J": "j"})
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(f"send.retry.{key}: {reason}")


def test_retry_values_parse() -> None:
    config = parse_config(
        _retry(categories=["busy"], max_attempts=4, delay="90s", backoff=1.5, max_delay="10m", deadline="2h"),
        environ={"S": "s", "J": "j"},
    )
    r = config.send.retry
    assert (r.categories, r.max_attempts, r.delay, r.backoff, r.max_delay, r.deadline) == (
        frozenset({"busy"}),
        4,
        90,
        1.5,
        600,
        7200,
    )


def test_check_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(_retry(max_attempts="many")))
    proc = subprocess.run(
        [sys.executable, "-m", "faxd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "S": "s", "J": "j"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 78
    assert 'send.retry.max_attempts: expected an integer, got "many"' in proc.stderr
