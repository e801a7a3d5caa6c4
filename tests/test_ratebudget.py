"""Rate budget per RingCentral group: classification, share of the window, headers, 429 penalty."""

from __future__ import annotations

import pytest

from faxd.core.ratebudget import (
    AUTH,
    HEAVY,
    LIGHT,
    MEDIUM,
    RateBudget,
    classify,
    group_name,
    parse_headers,
    parse_retry_after,
)

EXT = "/restapi/v1.0/account/~/extension/200000001"


@pytest.mark.parametrize(
    ("method", "path", "group"),
    [
        ("POST", "/restapi/oauth/token", AUTH),
        ("POST", "/restapi/oauth/revoke", AUTH),
        ("POST", "/restapi/oauth/wstoken", AUTH),
        ("GET", f"{EXT}/message-sync?syncType=FSync", LIGHT),
        ("GET", f"{EXT}/message-store", LIGHT),
        ("GET", f"{EXT}/message-store/123", LIGHT),
        ("GET", f"{EXT}/message-store/1,2,3", LIGHT),
        ("GET", f"{EXT}/message-store/123/content/456", MEDIUM),
        ("PUT", f"{EXT}/message-store/123", MEDIUM),
        ("DELETE", f"{EXT}/message-store", MEDIUM),
        ("POST", f"{EXT}/fax", HEAVY),
        ("POST", "/restapi/v1.0/subscription", MEDIUM),
        ("PUT", "/restapi/v1.0/subscription/abc", MEDIUM),
        ("GET", "/restapi/v1.0/subscription/abc", LIGHT),
        ("POST", "/restapi/v1.0/subscription/abc/renew", LIGHT),
        ("GET", "/restapi/v1.0/dictionary/fax-cover-page", LIGHT),
        ("GET", EXT, LIGHT),  # readExtension (faxd doctor)
        ("PUT", EXT, MEDIUM),
        ("GET", "/restapi/v1.0/something-else", MEDIUM),
    ],
)
def test_classify(method: str, path: str, group: str) -> None:
    assert classify(method, path) == group


@pytest.mark.parametrize(
    ("group", "share", "allowed"),
    [(LIGHT, 0.8, 40), (MEDIUM, 0.8, 32), (HEAVY, 0.8, 8), (AUTH, 0.8, 4), (AUTH, 0.1, 1), (AUTH, 1.0, 5)],
)
def test_default_limits_and_share(group: str, share: float, allowed: int) -> None:
    b = RateBudget(share)
    assert b.allowed(group) == allowed
    for i in range(allowed):
        assert b.delay(group, 10.0 + i) == 0
        b.spent(group, 10.0 + i)
    # The next one waits until the first send leaves the 60 s window.
    assert b.delay(group, 10.0 + allowed) == pytest.approx(60 - allowed)
    assert b.delay(group, 70.0) == 0


def test_sliding_window_frees_one_slot_at_a_time() -> None:
    b = RateBudget(1.0, {AUTH: (2, 10.0)})
    b.spent(AUTH, 0)
    b.spent(AUTH, 4)
    assert b.delay(AUTH, 5) == 5
    assert b.delay(AUTH, 10) == 0
    b.spent(AUTH, 10)
    assert b.delay(AUTH, 11) == 3  # now waiting for the send at t=4


def test_groups_are_independent() -> None:
    b = RateBudget(1.0, {AUTH: (1, 60.0), LIGHT: (1, 60.0)})
    b.spent(AUTH, 0)
    assert b.delay(AUTH, 1) > 0
    assert b.delay(LIGHT, 1) == 0


def test_delay_for_several_requests_and_room() -> None:
    b = RateBudget(0.8)  # Light: 40 a minute
    for i in range(38):
        b.spent(LIGHT, float(i))
    assert b.room(LIGHT, 38.0) == 2
    assert b.delay(LIGHT, 38.0, n=2) == 0
    # Three need the oldest send (t=0) to leave the window; four need t=1 to leave too.
    assert b.delay(LIGHT, 38.0, n=3) == pytest.approx(22.0)
    assert b.delay(LIGHT, 38.0, n=4) == pytest.approx(23.0)
    assert b.delay(LIGHT, 38.0, n=41) == float("inf")
    b.penalty(LIGHT, 38.0, 5.0)
    assert b.room(LIGHT, 38.0) == 0
    assert b.room(LIGHT, 43.0) == 2


@pytest.mark.parametrize("sent_at", [0.3, 0.1, 0.7, 1e-3, 12345.678])
def test_waiting_the_delay_always_frees_the_slot(sent_at: float) -> None:
    # 0.3 + 60 is 60.3, but 60.3 - 60 is 0.29999999999999716: the send would still count there.
    b = RateBudget(0.02)  # Light: 1 a minute
    b.spent(LIGHT, sent_at)
    now = sent_at + 60.0
    wait = b.delay(LIGHT, now)
    assert wait >= 0
    assert b.delay(LIGHT, now + wait) == 0
    assert b.room(LIGHT, now + wait) == 1


@pytest.mark.parametrize(
    ("headers", "expected_limit", "expected_window", "delay_after"),
    [
        ({"X-Rate-Limit-Limit": "10", "X-Rate-Limit-Window": "30"}, 10, 30.0, 0.0),
        # remaining 2 of 10 with share 0.8: our 8 are used (by whoever) -> a full window.
        (
            {"X-Rate-Limit-Limit": "10", "X-Rate-Limit-Remaining": "2", "X-Rate-Limit-Window": "30"},
            10,
            30,
            30.0,
        ),
        (
            {"X-Rate-Limit-Limit": "10", "X-Rate-Limit-Remaining": "3", "X-Rate-Limit-Window": "30"},
            10,
            30,
            0.0,
        ),
        ({"X-Rate-Limit-Remaining": "0"}, 50, 60.0, 60.0),
        ({"X-Rate-Limit-Limit": "junk"}, 50, 60.0, 0.0),
        ({}, 50, 60.0, 0.0),
    ],
)
def test_observed_headers(
    headers: dict[str, str], expected_limit: int, expected_window: float, delay_after: float
) -> None:
    b = RateBudget(0.8)
    limit, remaining, window = parse_headers(headers)
    b.observed(LIGHT, 100.0, limit=limit, remaining=remaining, window=window)
    assert b.limits(LIGHT) == (expected_limit, expected_window)
    assert b.delay(LIGHT, 100.0) == pytest.approx(delay_after)


def test_lower_limit_from_headers_throttles_sooner() -> None:
    b = RateBudget(0.5)
    b.observed(HEAVY, 0, limit=4, window=60)
    b.spent(HEAVY, 0)
    assert b.delay(HEAVY, 1) == 0
    b.spent(HEAVY, 1)
    assert b.delay(HEAVY, 2) == pytest.approx(58)


@pytest.mark.parametrize(("retry_after", "expected"), [(12.0, 12.0), (None, 30.0), (0.0, 0.0), (-1, 30.0)])
def test_penalty_blocks_the_group(retry_after: float | None, expected: float) -> None:
    b = RateBudget()
    b.penalty(LIGHT, 100.0, retry_after)
    assert b.delay(LIGHT, 100.0) == pytest.approx(expected)
    assert b.delay(MEDIUM, 100.0) == 0
    assert b.delay(LIGHT, 100.0 + expected) == 0


def test_penalty_never_shortens() -> None:
    b = RateBudget()
    b.penalty(AUTH, 0, 60)
    b.penalty(AUTH, 1, 5)
    assert b.penalised(AUTH, 30)
    assert b.delay(AUTH, 30) == pytest.approx(30)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), (" 2.5 ", 2.5), (None, None), ("soon", None), ("-3", None), ("inf", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_share_validated() -> None:
    with pytest.raises(ValueError, match="share"):
        RateBudget(0)


def test_own_requests_filling_the_share_wait_only_for_the_oldest_to_leave() -> None:
    # RingCentral's Auth group: 5 a minute, faxd's share 4. The server's Remaining counts only ours.
    b = RateBudget(0.8)
    for t, remaining in ((0.0, 4), (20.0, 3), (30.0, 2), (40.0, 1)):
        b.spent(AUTH, t)
        b.observed(AUTH, t, limit=5, remaining=remaining, window=60)
    assert b.delay(AUTH, 41.0) == pytest.approx(19.0)  # the send at t=0 leaves at t=60, not t=100


def test_others_in_the_window_block_a_full_window_once_the_share_is_gone() -> None:
    b = RateBudget(0.8)
    b.spent(AUTH, 0.0)
    # One request of ours, yet only one left: someone else spent three, and we can't know when
    # theirs leave the window.
    b.observed(AUTH, 0.0, limit=5, remaining=1, window=60)
    assert b.delay(AUTH, 1.0) == pytest.approx(59.0)


NOW = 1_445_412_460.0  # Wed, 21 Oct 2015 07:27:40 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Wed, 21 Oct 2015 07:28:00 GMT", 20.0),  # RFC 9110's example, 20 s ahead
        ("Wed, 21 Oct 2015 07:28:00 -0000", 20.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # already past: go now
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
        ("30", 30.0),
    ],
)
def test_parse_retry_after_http_date(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_an_http_date_needs_the_wall_clock() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("light", LIGHT),
        ("LIGHT", LIGHT),
        (" Heavy ", HEAVY),
        ("auth", AUTH),
        ("Custom-2", "Custom-2"),  # a group this table does not know, kept as sent
        ("", None),
        ("not a group!", None),
        (None, None),
    ],
)
def test_group_name_from_the_header(header: str | None, expected: str | None) -> None:
    assert group_name(header) == expected


def test_a_request_moved_to_the_servers_group() -> None:
    b = RateBudget(share=1.0, defaults={LIGHT: (2, 60.0), HEAVY: (2, 60.0)})
    b.spent(LIGHT, 0.0)
    b.spent(HEAVY, 5.0)
    b.spent(LIGHT, 1.0)
    b.moved(LIGHT, HEAVY, 1.0)  # the server counted the request sent at 1.0 in Heavy
    assert b.delay(LIGHT, 2.0) == 0  # one left in Light's window
    assert b.delay(HEAVY, 2.0) == pytest.approx(59.0)  # Heavy is full until 1.0 leaves its window
    b.moved(HEAVY, HEAVY, 1.0)
    assert b.delay(HEAVY, 2.0) == pytest.approx(59.0)


def test_a_request_counts_from_its_answer_so_a_slow_one_cannot_crowd_the_servers_window() -> None:
    """RingCentral counts a request on arrival, somewhere between send and answer: the slot is held
    until the answer, so the request after a full window cannot reach the server inside it."""
    b = RateBudget(share=1.0, defaults={LIGHT: (2, 10.0)})
    b.spent(LIGHT, 0.0)
    b.answered(LIGHT, 0.0, 0.5)  # a slow answer: the server may have counted it as late as 0.5
    b.spent(LIGHT, 1.0)
    b.answered(LIGHT, 1.0, 1.1)
    assert b.delay(LIGHT, 10.0) == pytest.approx(0.5)  # not 0: the first may have arrived at 0.5
    assert b.delay(LIGHT, 10.5) == 0.0
    b.answered(LIGHT, 99.0, 100.0)  # an unknown send changes nothing
    assert b.delay(LIGHT, 10.5) == 0.0
