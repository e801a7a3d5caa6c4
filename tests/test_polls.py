"""The poll schedule on passed-in time: staggering, safety and active intervals, outage, hand-out once."""

from __future__ import annotations

import math

import pytest

from faxd.core.polls import PollKind, PollSchedule, ReconcileTimers, Timer


def schedule() -> PollSchedule[str]:
    return PollSchedule(interval=300.0, active_interval=60.0, outage_interval=5.0)


def test_new_keys_are_spread_over_one_interval() -> None:
    p = schedule()
    p.set_keys(["a", "b", "c"], now=0.0)
    assert [p.due_at(k) for k in "abc"] == [100.0, 200.0, 300.0]
    assert p.next_wake() == 100.0
    assert p.due(99.0) == []
    assert p.due(100.0) == [("a", PollKind.SAFETY)]


def test_due_hands_a_key_out_once_until_it_is_checked() -> None:
    p = schedule()
    p.set_keys(["a"], now=0.0)
    assert p.due(300.0) == [("a", PollKind.SAFETY)]
    assert p.due(301.0) == []  # waiting for its check in the scheduler's queue
    p.checked("a", 350.0)
    assert p.due_at("a") == 650.0
    assert p.due(650.0) == [("a", PollKind.SAFETY)]


def test_a_lost_poll_is_asked_again_one_interval_later() -> None:
    p = schedule()
    p.set_keys(["a"], now=0.0)
    p.due(300.0)
    assert p.due(599.0) == []
    assert p.due(600.0) == [("a", PollKind.SAFETY)]


def test_any_check_restarts_the_clock() -> None:
    p = schedule()
    p.set_keys(["a"], now=0.0)
    p.checked("a", 250.0)  # a start-up sync, a settle check, a client's sync...
    assert p.due(300.0) == []
    assert p.due_at("a") == 550.0


def test_active_keys_poll_at_the_active_interval_and_faster_while_push_is_down() -> None:
    p = schedule()
    p.set_keys(["a", "b"], now=0.0)
    p.set_active(["a", "unknown"])
    assert p.due_at("a") == 60.0  # counted from when it was added (its last check)
    assert p.due_at("b") == 300.0
    p.set_push(False)
    assert p.due_at("a") == 5.0
    assert p.due(5.0) == [("a", PollKind.ACTIVE)]
    p.checked("a", 6.0)
    assert p.due_at("a") == 11.0
    p.set_push(True)
    assert p.due_at("a") == 66.0
    p.set_active([])
    assert p.due_at("a") == 306.0


def test_a_key_whose_push_alone_is_refused_polls_as_if_push_were_down() -> None:
    p = schedule()
    p.set_keys(["a", "b", "c"], now=0.0)
    p.set_active(["a", "b"])
    p.set_unpushed(["b", "c", "unknown"])
    assert [p.due_at(k) for k in "abc"] == [60.0, 5.0, 300.0]  # c: nothing in flight, safety only
    p.set_unpushed([])
    assert p.due_at("b") == 60.0
    p.set_unpushed(["b"])
    p.set_keys(["a", "c"], now=1.0)  # b is gone, and so is its refusal
    p.set_keys(["a", "b", "c"], now=2.0)
    p.set_active(["b"])
    assert p.due_at("b") == 62.0


def test_oldest_due_first() -> None:
    p = schedule()
    p.set_keys(["a", "b", "c"], now=0.0)
    for key, at in (("a", 50.0), ("b", 10.0), ("c", 30.0)):
        p.checked(key, at)
    assert [k for k, _ in p.due(1000.0)] == ["b", "c", "a"]


def test_keys_come_and_go() -> None:
    p = schedule()
    p.set_keys(["a", "b"], now=0.0)
    p.set_active(["b"])
    p.set_keys(["b", "c"], now=10.0)
    assert p.keys() == ["b", "c"]
    assert p.is_active("b")
    assert p.due_at("c") == 310.0
    p.checked("gone", 20.0)  # ignored


def test_staleness_is_the_longest_time_without_a_check() -> None:
    p = schedule()
    assert p.staleness(5.0) == 0.0
    p.set_keys(["a", "b"], now=0.0)
    p.checked("a", 40.0)
    assert p.staleness(100.0) == 100.0


def test_configure_applies_new_intervals_from_the_last_check() -> None:
    p = schedule()
    p.set_keys(["a"], now=0.0)
    p.checked("a", 10.0)
    p.configure(30.0, 10.0, 2.0)
    assert p.due_at("a") == 40.0
    with pytest.raises(ValueError, match="positive"):
        p.configure(0.0, 10.0, 2.0)


# -- ReconcileTimers: retention and settle checks ----------------------------------------------------


def timers(prune_interval: float | None = None) -> ReconcileTimers[str]:
    return ReconcileTimers(0.0, prune_interval=prune_interval, settle_quiet=0.5)


def test_retention_runs_at_the_start_and_every_interval_and_never_without_one() -> None:
    t = timers(1000.0)
    assert t.due(0.0) == [Timer.PRUNE]
    assert t.next_wake() == 1000.0
    assert t.due(999.9) == []
    assert t.due(1500.0) == [Timer.PRUNE]  # late: once, counted from now
    assert t.next_wake() == 2500.0
    never = timers(None)
    assert never.due(0.0) == []
    assert never.next_wake() == math.inf


def test_a_settle_check_is_asked_when_due_then_not_again_within_the_quiet_period() -> None:
    t = timers()
    assert not t.settle_due(10.0, 12.0, "e1")  # not due yet
    assert t.next_wake((12.0, "e1")) == 12.0
    assert t.settle_due(12.0, 12.0, "e1")
    assert not t.settle_due(12.1, 12.0, "e1")  # the check in progress has not settled it yet
    assert t.next_wake((12.0, "e1")) == 12.5
    assert t.settle_due(12.1, 12.0, "e2")  # another extension's wait is its own
    assert t.settle_due(12.5, 12.0, "e1")


def test_a_safety_poll_is_put_off_only_once_until_its_key_is_checked() -> None:
    polls: PollSchedule[str] = PollSchedule(5.0, 2.0)
    polls.set_keys(["a"], 0.0)
    assert polls.due(5.0) == [("a", PollKind.SAFETY)]
    assert polls.put_off("a", 5.0)
    assert polls.due(6.9) == []
    assert polls.due(7.0) == [("a", PollKind.SAFETY)]
    assert not polls.put_off("a", 7.0)  # a second time: no, the poll goes (merged or on its own)
    polls.checked("a", 7.5)
    assert polls.due(12.5) == [("a", PollKind.SAFETY)]
    assert polls.put_off("a", 12.5)  # checked since: it may be put off again
