"""The keyed work queue on passed-in time: dirty set, processing set, quiet period, bound, backoff."""

from __future__ import annotations

import pytest

from faxd.core.debounce import KeyedQueue


@pytest.fixture
def q() -> KeyedQueue:
    return KeyedQueue(debounce=1.0, max_delay=5.0, backoff_base=2.0, backoff_cap=30.0)


def test_isolated_hint_is_due_at_once(q: KeyedQueue) -> None:
    q.add("e1", "push", now=100.0)
    assert q.next_deadline() == 100.0
    assert q.pop(100.0) == ("e1", {"push"})


def test_burst_coalesces_into_one_item_with_all_reasons(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", 0.1, ok=True)
    # A second burst right after: not isolated any more, so the quiet period applies.
    for t in (0.5, 0.7, 0.9):
        q.add("e1", "push", now=t)
    q.add("e1", "poll", now=1.0)
    assert q.depth == 1
    assert q.next_deadline() == pytest.approx(2.0)
    assert q.pop(1.9) is None
    assert q.pop(2.0) == ("e1", {"push", "poll"})


def test_busy_key_is_served_within_max_delay(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", 0.0, ok=True)
    t = 0.25
    while t < 20:
        q.add("e1", "push", now=t)
        if q.pop(t) is not None:
            break
        t += 0.25
    # A hint every 0.25 s keeps sliding the quiet period; the first of the burst came at 0.25, so the
    # key is served at 0.25 + max_delay.
    assert t == pytest.approx(5.25)


def test_hint_during_processing_requeues_once_after_done(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    assert q.pop(0.0) is not None
    q.add("e1", "push", now=0.2)
    q.add("e1", "poll", now=0.3)
    assert q.depth == 0  # not pending twice while processing
    assert q.pop(0.3) is None  # and never handed out twice at once
    q.done("e1", 0.5, ok=True)
    assert q.depth == 1
    assert q.pop(1.49) is None
    assert q.pop(1.5) == ("e1", {"push", "poll"})


def test_errors_back_off_exponentially_and_reset_on_success(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    delays = []
    now = 0.0
    for _ in range(6):
        item = q.pop(now)
        assert item is not None
        delay = q.done("e1", now, ok=False)
        assert delay is not None
        delays.append(delay)
        now += delay
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert q.pop(now) == ("e1", {"retry"})
    assert q.done("e1", now, ok=True) is None
    assert q.failures("e1") == 0
    assert q.is_idle()


def test_keys_are_independent_and_most_overdue_first(q: KeyedQueue) -> None:
    q.add("a", "poll", now=0.0)
    q.add("b", "push", now=0.0)
    q.pop(0.0)
    q.pop(0.0)
    q.done("b", 0.0, ok=True)
    q.done("a", 0.4, ok=True)
    q.add("b", "push", now=0.2)  # due 1.0 (b done at 0.0 + debounce)
    q.add("a", "push", now=0.5)  # due 1.4 (a done at 0.4 + debounce)
    assert q.pop(2.0) == ("b", {"push"})
    assert q.pop(2.0) == ("a", {"push"})


def test_a_hint_soon_after_done_waits_only_for_the_rest_of_the_window(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", 0.2, ok=True)
    q.add("e1", "push", now=0.9)
    assert q.next_deadline() == pytest.approx(1.2)  # last done + debounce, not 0.9 + debounce
    assert q.pop(1.19) is None  # the rate cap holds: never within debounce of the last reconcile
    assert q.pop(1.2) == ("e1", {"push"})


@pytest.mark.parametrize(
    ("done_at", "hint_at", "due"),
    [
        (0.0, 0.1, 1.0),  # early in the window: most of it is left
        (0.0, 0.99, 1.0),  # late in the window: almost served at once
        (0.0, 1.0, 1.0),  # the window is over: leading edge, due now
        (0.0, 3.0, 3.0),  # long idle: leading edge
        (2.0, 2.5, 3.0),
    ],
)
def test_first_hint_after_done_is_due_at_last_done_plus_debounce_or_now(
    q: KeyedQueue, done_at: float, hint_at: float, due: float
) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", done_at, ok=True)
    q.add("e1", "push", now=hint_at)
    assert q.next_deadline() == pytest.approx(due)


def test_later_hints_of_the_burst_still_slide_the_quiet_period_within_max_delay(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", 0.0, ok=True)
    q.add("e1", "push", now=0.5)  # due 1.0
    q.add("e1", "poll", now=0.8)  # a second hint of the burst: quiet period from it, 1.8
    assert q.next_deadline() == pytest.approx(1.8)
    for t in (1.5, 2.3, 3.1, 3.9, 4.7, 5.4):  # each within the quiet period of the one before
        q.add("e1", "push", now=t)
    assert q.next_deadline() == pytest.approx(5.5)  # first hint (0.5) + max_delay


def test_immediate_skips_the_quiet_period(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", 0.0, ok=True)
    q.add("e1", "push", now=0.1)
    q.add("e1", "resync", now=0.2, immediate=True)
    assert q.pop(0.2) == ("e1", {"push", "resync"})


def test_flush_makes_everything_due(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", 0.0, ok=False)  # due at 2.0
    q.flush(0.5)
    assert q.pop(0.5) == ("e1", {"retry"})


# -- the client-go contract, as a table --------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "expected_delays"),
    [
        (1, [2.0]),
        (3, [2.0, 4.0, 8.0]),
        (6, [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),  # capped at backoff_cap
    ],
)
def test_backoff_doubles_per_key_up_to_the_cap(
    q: KeyedQueue, failures: int, expected_delays: list[float]
) -> None:
    now = 0.0
    q.add("e1", "push", now)
    delays = []
    for _ in range(failures):
        item = q.pop(now)
        assert item is not None
        delay = q.done("e1", now, ok=False)
        assert delay is not None
        delays.append(delay)
        now += delay
    assert delays == expected_delays
    assert q.failures("e1") == failures


def test_success_resets_the_backoff_of_that_key_only(q: KeyedQueue) -> None:
    for key in ("e1", "e2"):
        q.add(key, "push", 0.0)
        q.pop(0.0)
        assert q.done(key, 0.0, ok=False) == 2.0
    q.pop(2.0)
    q.pop(2.0)
    assert q.done("e1", 2.0, ok=True) is None
    assert q.done("e2", 2.0, ok=False) == 4.0
    assert (q.failures("e1"), q.failures("e2")) == (0, 2)
    q.add("e1", "push", 10.0)
    q.pop(10.0)
    assert q.done("e1", 10.0, ok=False) == 2.0  # starts again from the base


def test_a_failure_known_to_last_waits_at_least_as_asked(q: KeyedQueue) -> None:
    q.add("e1", "push", 0.0)
    q.pop(0.0)
    assert q.done("e1", 0.0, ok=False, at_least=600.0) == 600.0  # beyond the cap too
    assert q.next_deadline() == 600.0
    q.add("e1", "poll", 10.0)  # a plain hint does not cut it short
    assert q.pop(599.0) is None
    assert q.pop(600.0) == ("e1", {"retry", "poll"})
    assert q.done("e1", 600.0, ok=False, at_least=1.0) == 4.0  # the backoff when it is longer


def test_a_plain_hint_does_not_cut_a_backoff_short_but_an_immediate_one_does(q: KeyedQueue) -> None:
    q.add("e1", "push", 0.0)
    q.pop(0.0)
    q.done("e1", 0.0, ok=False)  # retry at 2.0
    q.add("e1", "push", 0.5)
    assert q.next_deadline() == 2.0
    assert q.pop(1.9) is None
    q.add("e1", "resync", 1.0, immediate=True)
    assert q.pop(1.0) == ("e1", {"retry", "push", "resync"})


def test_a_failure_with_hints_during_processing_keeps_their_reasons(q: KeyedQueue) -> None:
    q.add("e1", "push", 0.0)
    q.pop(0.0)
    q.add("e1", "poll", 0.2)
    assert q.done("e1", 0.5, ok=False) == 2.0
    assert q.depth == 1
    assert q.pop(2.5) == ("e1", {"retry", "poll"})


def test_many_hints_before_processing_collapse_into_one_item(q: KeyedQueue) -> None:
    for i in range(100):
        q.add("e1", "push", 0.0 + i * 0.001)
    assert q.depth == 1
    assert q.pop(0.1) == ("e1", {"push"})
    assert q.pop(10.0) is None


def test_keys_are_independent_and_the_most_overdue_goes_first(q: KeyedQueue) -> None:
    q.add("e2", "push", 0.0)
    q.add("e1", "push", 0.5)
    assert q.pop(1.0) == ("e2", {"push"})
    assert q.pop(1.0) == ("e1", {"push"})  # both processing at once: different keys


def test_shut_down_drops_new_hints_runs_what_is_pending_now_and_retries_nothing(q: KeyedQueue) -> None:
    q.add("e1", "push", 0.0)
    q.pop(0.0)
    q.done("e1", 0.0, ok=True)
    q.add("e1", "push", 0.1)  # done at 0.0: due at 1.0
    q.add("e2", "push", 0.1)
    q.pop(0.1)  # e2 processing
    q.add("e2", "poll", 0.2)  # hint during processing, before the shutdown
    q.shut_down(0.3)
    assert q.closed
    assert q.add("e3", "push", 0.3) is False
    assert q.depth == 1  # e1, made due now
    assert q.next_deadline() == 0.3
    assert q.pop(0.3) == ("e1", {"push"})
    assert q.done("e1", 0.4, ok=False) is None  # no retry while draining
    q.done("e2", 0.4, ok=True)
    assert q.pop(0.4) == ("e2", {"poll"})  # the hint taken before the shutdown runs at once
    q.done("e2", 0.5, ok=True)
    assert q.is_idle()


def test_retime_shapes_the_next_burst_and_refuses_a_bound_below_the_quiet_period(q: KeyedQueue) -> None:
    q.add("e1", "push", now=0.0)
    q.pop(0.0)
    q.done("e1", 0.0, ok=True)
    q.add("e1", "push", now=0.5)  # pending under the old timings: due at 1.0 (rate cap)
    q.retime(3.0, 4.0)
    assert q.next_deadline() == pytest.approx(1.0), "a pending key keeps its due time"
    q.add("e1", "push", now=0.9)  # the next hint slides it by the new quiet period, within the new bound
    assert q.next_deadline() == pytest.approx(3.9)
    q.add("e1", "push", now=3.8)
    assert q.next_deadline() == pytest.approx(4.5), "first hint at 0.5 + the new max_delay"
    with pytest.raises(ValueError, match="max_delay"):
        q.retime(2.0, 1.0)
    assert (q.debounce, q.max_delay) == (3.0, 4.0)
