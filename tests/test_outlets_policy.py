"""The outlets' pure policy (faxd.core.outlets): outcomes, backoff, giving up, signatures, hook env."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from hypothesis import given, strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from faxd.core.outlets import (
    Attempt,
    GiveUp,
    Outcome,
    Retry,
    RetryPolicy,
    after_failure,
    classify_status,
    decode_secret,
    exit_outcome,
    hook_environment,
    parse_retry_after,
    sign,
    webhook_headers,
    webhook_id,
)

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (301, Outcome.PARK),
        (400, Outcome.PARK),
        (401, Outcome.PARK),
        (404, Outcome.PARK),
        (408, Outcome.RETRY),
        (410, Outcome.PARK),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
    ],
)
def test_status_classes(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_retry_after_as_seconds_or_date() -> None:
    now = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 7 ", now) == 7.0
    assert parse_retry_after("Wed, 02 Dec 2026 10:01:30 GMT", now) == 90.0
    assert parse_retry_after("Wed, 02 Dec 2026 09:00:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) is None


@given(failures=st.integers(1, 200), rand=st.floats(0, 1, exclude_max=True))
def test_backoff_grows_to_the_cap_with_at_most_half_jitter(failures: int, rand: float) -> None:
    policy = RetryPolicy(initial=1.0, cap=300.0)
    base = min(300.0, 2.0 ** (failures - 1))
    assert base / 2 <= policy.delay(failures, rand) <= base


def test_park_gives_up_at_once_and_retry_waits() -> None:
    policy = RetryPolicy(initial=2.0, cap=60.0, max_age=3600.0)
    park = after_failure(policy, Attempt(Outcome.PARK, "HTTP 404"), failures=1, observed_at=0, now=1, rand=0)
    assert park == GiveUp("HTTP 404")
    retry = after_failure(
        policy, Attempt(Outcome.RETRY, "HTTP 503"), failures=3, observed_at=0, now=1, rand=0
    )
    assert retry == Retry(4.0)  # 2 * 2**2 = 8, jittered down to its half at rand=0


def test_retry_after_longer_than_the_backoff_is_honoured() -> None:
    policy = RetryPolicy(initial=1.0, cap=60.0, max_age=3600.0)
    attempt = Attempt(Outcome.RETRY, "HTTP 429", retry_after=120.0)
    assert after_failure(policy, attempt, failures=1, observed_at=0, now=10, rand=0.5) == Retry(120.0)


def test_max_age_caps_the_wait_then_gives_up() -> None:
    policy = RetryPolicy(initial=100.0, cap=1000.0, max_age=60.0)
    attempt = Attempt(Outcome.RETRY, "timeout")
    # 10 s before the deadline: one last attempt at the deadline, not after the 100 s backoff
    assert after_failure(policy, attempt, failures=1, observed_at=0, now=50, rand=1) == Retry(10.0)
    given_up = after_failure(policy, attempt, failures=2, observed_at=0, now=60, rand=1)
    assert isinstance(given_up, GiveUp)
    assert "timeout" in given_up.reason
    assert "max_age" in given_up.reason


def test_signature_verifies_with_the_reference_library() -> None:
    key = decode_secret(SECRET)
    body = b'{"type":"event","seq":7,"epoch":"e"}'
    ts = int(datetime.now(UTC).timestamp())
    headers = webhook_headers(key, webhook_id("e", 7), ts, body)
    assert Webhook(SECRET).verify(body, headers) == {"type": "event", "seq": 7, "epoch": "e"}
    # the same as the library computes, byte for byte
    assert headers["webhook-signature"] == Webhook(SECRET).sign(
        "e:7", datetime.fromtimestamp(ts, UTC), body.decode()
    )
    tampered = {**headers, "webhook-id": "e:8"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, tampered)


def test_unprefixed_secret_signs_the_same() -> None:
    assert decode_secret(SECRET.removeprefix("whsec_")) == decode_secret(SECRET)
    assert sign(decode_secret(SECRET), "a", 1, b"x").startswith("v1,")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not base64 at all!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "decodes to 5"),
        ("whsec_" + base64.b64encode(bytes(65)).decode(), "decodes to 65"),
    ],
)
def test_bad_secrets_are_refused_without_showing_them(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        decode_secret(text)
    assert text not in str(info.value)


def test_webhook_id_is_stable_per_epoch_and_seq() -> None:
    assert webhook_id("ep", 5) == webhook_id("ep", 5)
    assert len({webhook_id("ep", 5), webhook_id("ep", 6), webhook_id("other", 5)}) == 3


def test_hook_environment_carries_the_main_fields() -> None:
    event = {
        "type": "event",
        "seq": 12,
        "epoch": "ep",
        "kind": "recipient",
        "fax_id": "99",
        "extension_id": "200",
        "direction": "Outbound",
        "ref": None,
        "recipient": {"index": 0, "phone": None},
        "from_status": "Queued",
        "to_status": "SendingFailed",
        "final": True,
        "error_code": "LineBusy",
        "error_category": "busy",
        "retryable": True,
        "pages": 2,
        "rc_modified": "2026-12-02T10:00:00Z",
        "observed_at": "2026-12-02T10:00:01Z",
        "source": "push",
    }
    env = hook_environment(event, outlet="notify", attempt=3, base={"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["FAXD_EVENT_SEQ"] == "12"
    assert env["FAXD_EVENT_ID"] == "ep:12"
    assert env["FAXD_FAX_ID"] == "99"
    assert env["FAXD_STATUS"] == "SendingFailed"
    assert env["FAXD_FINAL"] == "true"
    assert env["FAXD_REF"] == ""
    assert env["FAXD_RECIPIENT_INDEX"] == "0"
    assert env["FAXD_ERROR_CATEGORY"] == "busy"
    assert env["FAXD_ATTEMPT"] == "3"
    assert env["FAXD_OUTLET"] == "notify"


def test_exit_codes() -> None:
    assert exit_outcome(0).outcome is Outcome.DELIVERED
    assert exit_outcome(1) == Attempt(Outcome.RETRY, "exit 1")
    assert exit_outcome(-9) == Attempt(Outcome.RETRY, "killed by signal 9")
