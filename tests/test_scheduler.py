"""The request scheduler on passed-in time: priorities, reserves, pacing, fairness, adaptive debounce,
backoff, Retry-After, 429, push outage, shutdown, and the share invariant (hypothesis).

Default numbers used below: a share of 0.8 gives Light 40 requests a minute; the pacing bucket holds
4 tokens and refills at (40 - 4) / 60 = 0.6 a second (one every 1.67 s); the push reserve is 1 token.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from faxd.core.ratebudget import HEAVY, LIGHT, MEDIUM, NO_THROTTLING, RateBudget
from faxd.core.scheduler import (
    Grant,
    Outcome,
    Priority,
    Result,
    Scheduler,
    SchedulerSettings,
    Work,
    ext_key,
)

RATE = 0.6  # Light tokens a second with the defaults
TICK = 1 / RATE

A, B, C, D = ext_key("a"), ext_key("b"), ext_key("c"), ext_key("d")


def sched(share: float = 0.8, **kw: Any) -> Scheduler:
    return Scheduler(RateBudget(share), SchedulerSettings(**kw))


def work(key: tuple[str, str], priority: Priority, *reasons: str, **cost: int) -> Work:
    return Work(key, priority, frozenset(reasons), cost or {LIGHT: 1})


def run(s: Scheduler, grant: Grant, now: float, outcome: Outcome | None = None) -> None:
    """Send every reserved request of ``grant`` at ``now`` and end it."""
    for group, n in grant.cost.items():
        for _ in range(n):
            assert s.take(grant, group, now)
    s.done(grant, now, outcome or Outcome.ok())


def grant_now(s: Scheduler, now: float) -> Grant:
    g = s.next(now)
    assert g is not None
    return g


def drain_light(s: Scheduler, now: float, n: int = 4) -> None:
    """Spend ``n`` Light tokens at ``now`` with user work (an empty bucket when n = 4)."""
    s.submit(Work(("user", "drain"), Priority.USER, cost={LIGHT: n}), now)
    run(s, grant_now(s, now), now)


# ---------------------------------------------------------------------- a driver on fake time


@dataclass
class Driver:
    """Runs the scheduler like the adapter will: next / take / done, sleeping until next_wake."""

    s: Scheduler
    latency: float = 0.3
    concurrency: int = 1
    outcome: Callable[[Grant, float], Outcome] = lambda g, t: Outcome.ok()
    now: float = 0.0
    sent: list[tuple[float, str]] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)
    running: list[tuple[float, int, Grant]] = field(default_factory=list)
    inputs: list[tuple[float, int, Work]] = field(default_factory=list)
    hints: list[tuple[float, tuple[str, str]]] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (now, effective debounce)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def at(self, t: float, w: Work) -> None:
        heapq.heappush(self.inputs, (t, next(self._seq), w))
        if w.priority is Priority.PUSH:
            self.hints.append((t, w.key))

    def _start(self) -> None:
        while len(self.running) < self.concurrency:
            g = self.s.next(self.now)
            if g is None:
                return
            for group, n in g.cost.items():
                for _ in range(n):
                    assert self.s.take(g, group, self.now)
                    self.sent.append((self.now, group))
            self.grants.append(g)
            heapq.heappush(self.running, (self.now + self.latency, g.id, g))

    def run(self, until: float) -> None:
        while True:
            while self.inputs and self.inputs[0][0] <= self.now:
                self.s.submit(heapq.heappop(self.inputs)[2], self.now)
            self._start()
            self.samples.append((self.now, self.s.effective_debounce(self.now)))
            times = [self.running[0][0]] if self.running else []
            if self.inputs:
                times.append(self.inputs[0][0])
            if len(self.running) < self.concurrency:
                wake = self.s.next_wake(self.now)
                if wake is not None:
                    assert wake > self.now, "next_wake must not ask for a busy loop"
                    times.append(wake)
            following = min(times, default=math.inf)
            if following > until:
                self.now = until
                return
            self.now = following
            while self.running and self.running[0][0] <= self.now:
                _, _, g = heapq.heappop(self.running)
                self.s.done(g, self.now, self.outcome(g, self.now))

    def hint_delays(self, before: float = math.inf) -> list[float]:
        """For each push hint (sent before ``before``): seconds until the key's next push grant."""
        by_key: dict[tuple[str, str], list[float]] = {}
        for g in self.grants:
            if Priority.PUSH in g.priorities:
                by_key.setdefault(g.key, []).append(g.granted_at)
        out = []
        for t, key in sorted(self.hints):
            if t >= before:
                break
            later = [x for x in by_key.get(key, []) if x >= t]
            out.append(min(later) - t if later else math.inf)
        return out

    def light_times(self) -> list[float]:
        return [t for t, g in self.sent if g == LIGHT]


def most_in_any_window(times: list[float], window: float = 60.0) -> int:
    """The most requests in any window (t - window, t], RateBudget's definition."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


# ---------------------------------------------------------------------- priorities and coalescing


PAIRS = list(itertools.combinations(list(Priority), 2))


@pytest.mark.parametrize(("high", "low"), PAIRS, ids=[f"{h.name}>{lo.name}" for h, lo in PAIRS])
def test_strict_priority_even_when_the_lower_class_asked_first(high: Priority, low: Priority) -> None:
    s = sched(paced=frozenset())
    s.submit(work(B, low), 0.0)
    s.submit(work(A, high), 1.0)
    assert grant_now(s, 1.0).key == A
    assert grant_now(s, 1.0).key == B


def test_oldest_first_within_a_priority() -> None:
    s = sched(paced=frozenset())
    for i, key in enumerate([C, A, B]):
        s.submit(work(key, Priority.RESYNC), float(i))
    assert [grant_now(s, 5.0).key for _ in range(3)] == [C, A, B]


def test_work_for_one_key_coalesces_with_its_highest_priority() -> None:
    s = sched()
    s.submit(work(A, Priority.SAFETY_POLL, "poll"), 0.0)
    s.submit(work(A, Priority.RESYNC, "startup", Light=2), 0.0)
    s.submit(work(A, Priority.SETTLE, "settle"), 0.0)
    assert s.depth()[Priority.SETTLE] == 1
    assert sum(s.depth().values()) == 1
    g = grant_now(s, 0.0)
    assert g.priority is Priority.SETTLE
    assert g.reasons == {"poll", "startup", "settle"}
    assert dict(g.cost) == {LIGHT: 2}
    assert g.checks
    assert s.next(0.0) is None


def test_a_key_is_never_handed_out_twice_at_once() -> None:
    s = sched(debounce=1.0)
    s.submit(work(A, Priority.PUSH, "push"), 0.0)
    g = grant_now(s, 0.0)
    s.submit(work(A, Priority.PUSH, "push"), 0.2)
    s.submit(work(A, Priority.USER, "request"), 0.3)
    assert s.next(0.3) is None
    assert s.depth()[Priority.USER] == 1  # waiting for the running key
    run(s, g, 0.5)
    again = grant_now(s, 0.5)
    assert again.key == A
    assert again.reasons == {"push", "request"}
    assert again.priority is Priority.USER


def test_push_hints_debounce_like_the_keyed_queue() -> None:
    s = sched(debounce=1.0, max_delay=5.0)
    s.submit(work(A, Priority.PUSH), 0.0)
    assert s.due_at(A) == 0.0  # an idle key: leading edge
    run(s, grant_now(s, 0.0), 0.1)
    s.submit(work(A, Priority.PUSH), 0.5)
    assert s.due_at(A) == pytest.approx(1.1)  # what is left of the quiet period after the last grant
    t, g = 0.5, None
    while g is None and t < 20:
        s.submit(work(A, Priority.PUSH), t)
        g = s.next(t)
        t += 0.25
    t -= 0.25
    assert g is not None
    assert t == pytest.approx(5.5)  # the burst began at 0.5: served at most max_delay later
    assert g.waited == pytest.approx(5.0)


def test_settle_work_is_due_at_its_time_and_apart_from_earlier_work() -> None:
    s = sched()
    s.submit(work(A, Priority.SETTLE, "settle"), 0.0, at=30.0)
    s.submit(work(A, Priority.PUSH, "push"), 1.0)
    push = grant_now(s, 1.0)
    assert push.reasons == {"push"}  # the settle check is not due yet: not merged
    run(s, push, 1.5)
    assert s.next(29.9) is None
    assert s.next_wake(2.0) == 30.0
    g = grant_now(s, 30.0)
    assert (g.key, g.reasons) == (A, frozenset({"settle"}))
    assert not s.is_idle()


# ---------------------------------------------------------------------- reserves and pacing


def test_polls_spend_only_the_headroom_and_leave_the_push_reserve() -> None:
    s = sched()
    for i in range(10):
        s.submit(work(ext_key(f"p{i}"), Priority.SAFETY_POLL, "poll"), 0.0)
    polls = []
    while (g := s.next(0.0)) is not None:
        polls.append(g)
    assert len(polls) == 3  # 4 tokens, 1 kept for push
    s.submit(work(A, Priority.PUSH, "push"), 0.0)
    push = grant_now(s, 0.0)
    assert push.key == A
    assert push.waited == 0.0
    # The next poll waits for two tokens (one to spend, one to keep): 2 refill intervals.
    assert s.next_wake(0.0) == pytest.approx(2 * TICK, abs=1e-3)


def test_the_push_reserve_guard() -> None:
    """Without a reserve, polls take the last token and the push hint waits a refill interval."""
    s = sched(push_reserve=0)
    for i in range(10):
        s.submit(work(ext_key(f"p{i}"), Priority.SAFETY_POLL, "poll"), 0.0)
    while s.next(0.0) is not None:
        pass
    s.submit(work(A, Priority.PUSH, "push"), 0.0)
    assert s.next(0.0) is None


def test_hints_in_their_quiet_period_hold_their_tokens_against_polls() -> None:
    s = sched(debounce=1.0)
    for key in (A, B):  # B's grant ends at 0: its next hint waits out a quiet period
        s.submit(work(key, Priority.PUSH), 0.0)
    run(s, grant_now(s, 0.0), 0.0)
    run(s, grant_now(s, 0.0), 0.0)
    s.submit(work(B, Priority.PUSH), 0.0)
    s.submit(work(C, Priority.RESYNC, "startup"), 0.0)
    # Two tokens left: one for the push reserve, one claimed by B's pending hint.
    assert s.next(0.5) is None
    assert grant_now(s, 1.0).key == B
    assert s.next(1.0) is None  # C now needs 2 tokens with 1.6 left


def test_a_due_item_that_does_not_fit_holds_back_its_group_only() -> None:
    s = sched(debounce=0.0)
    drain_light(s, 0.0, n=3)  # 1 token left
    s.submit(work(A, Priority.PUSH, Light=2), 0.0)
    s.submit(work(B, Priority.PUSH), 0.1)  # would fit, but A asked first
    s.submit(Work(("send", "r1"), Priority.USER, cost={HEAVY: 1}), 0.2)
    g = grant_now(s, 0.2)
    assert g.key == ("send", "r1")
    assert s.next(0.2) is None
    t = s.next_wake(0.2)
    assert t is not None
    assert t == pytest.approx(TICK, abs=1e-3)  # A's second token
    assert grant_now(s, t).key == A


def test_a_cost_above_the_bucket_is_capped_and_extras_go_through_take() -> None:
    s = sched()
    s.submit(work(A, Priority.SETTLE, "settle", Light=10), 0.0)
    g = grant_now(s, 0.0)
    assert dict(g.cost) == {LIGHT: 3}  # the bucket (4) less the push reserve
    for _ in range(3):
        assert s.take(g, LIGHT, 0.0)
    assert not s.take(g, LIGHT, 0.0)  # an extra would eat the push reserve
    s.done(g, 0.0, Outcome.deferred())
    s.submit(work(B, Priority.SETTLE, "settle"), 0.0)
    later = s.next_wake(0.0)
    assert later is not None
    again = grant_now(s, later)
    assert again.key == A  # deferred work keeps its place: first in its priority
    assert again.waited == pytest.approx(later)


def test_extra_requests_never_jump_higher_work() -> None:
    s = sched(paced=frozenset())
    s.submit(work(A, Priority.SAFETY_POLL, "poll"), 0.0)
    g = grant_now(s, 0.0)
    assert s.take(g, LIGHT, 0.0)
    assert s.take(g, LIGHT, 0.0)  # an extra, with room to spare
    s.submit(work(B, Priority.USER, "request"), 0.0)
    assert not s.take(g, LIGHT, 0.0)  # B is due and higher: it goes first
    assert s.take(g, MEDIUM, 0.0)  # another group is not held back


def test_requests_of_no_group_need_no_budget() -> None:
    s = sched()
    drain_light(s, 0.0)
    s.submit(work(A, Priority.USER), 0.0)
    s.budget.penalty(LIGHT, 0.0, 5.0)
    g = grant_now(s, 10.0)
    for _ in range(100):
        assert s.take(g, NO_THROTTLING, 10.0)  # GET /restapi
    assert s.budget_of(LIGHT, 10.0).room == 35


def test_unused_reserved_requests_go_back_to_the_bucket() -> None:
    s = sched()
    s.submit(work(A, Priority.USER, Light=3), 0.0)
    g = grant_now(s, 0.0)
    assert s.take(g, LIGHT, 0.0)
    s.done(g, 0.0, Outcome.ok())
    assert s.budget_of(LIGHT, 0.0).tokens == pytest.approx(3.0)
    assert s.budget_of(LIGHT, 0.0).room == 39


def test_pacing_over_ten_minutes_of_demand() -> None:
    """Heavy poll, settle and resync load plus push hints on 100 extensions: Light stays within the
    share in every 60 s window, is spent evenly (no blind period), and every hint is served within a
    few seconds."""
    rng = random.Random(12)
    s = sched(debounce=0.2, max_delay=1.0, poll_interval=30.0, active_poll_interval=5.0)
    keys = [ext_key(str(i)) for i in range(100)]
    s.set_extensions(keys, 0.0)
    s.set_active(keys[:20])
    d = Driver(s)
    for key in keys:
        d.at(0.0, work(key, Priority.RESYNC, "startup"))
    t = 0.0
    while t < 600:
        t += rng.expovariate(0.3)
        d.at(t, work(rng.choice(keys), Priority.PUSH, "push"))
    for _ in range(100):
        d.at(rng.uniform(0, 600), work(rng.choice(keys), Priority.SETTLE, "settle"))
    d.run(600.0)

    light = d.light_times()
    assert most_in_any_window(light) <= 40
    # The demand always exceeds the share: it is all spent, evenly.
    assert len(light) >= 0.95 * RATE * 600
    assert max(b - a for a, b in itertools.pairwise(light)) <= 2 * TICK + 1e-6
    delays = d.hint_delays(before=590.0)
    assert max(delays) <= 5.0
    assert sorted(delays)[int(0.9 * len(delays))] <= 1.5


def test_a_burst_of_demand_is_spread_not_spent_at_once() -> None:
    """The cliff of issue 12: 200 hints at once used to take 40 requests in seconds, then wait a
    minute. Paced, the first minute spends the bucket then one request per refill interval."""
    s = sched(paced=frozenset({LIGHT}))
    d = Driver(s, latency=0.1)
    for i in range(200):
        d.at(0.0, work(ext_key(str(i)), Priority.PUSH, "push"))
    d.run(120.0)
    light = d.light_times()
    assert most_in_any_window(light) <= 40
    first_ten = [t for t in light if t < 10.0]
    assert len(first_ten) <= 4 + math.ceil(10 * RATE)
    assert max(b - a for a, b in itertools.pairwise(light)) == pytest.approx(TICK, abs=1e-3)


def test_start_up_of_40_extensions_leaves_room_for_push() -> None:
    """Issue 12's report: 40 extensions' start-up syncs and polls took the whole minute's budget and
    faxd reported nothing more that minute. Now the syncs spread over the headroom and hints go first."""
    s = sched(poll_interval=20.0, active_poll_interval=10.0)
    keys = [ext_key(str(i)) for i in range(40)]
    s.set_extensions(keys, 0.0)
    d = Driver(s)
    for key in keys:
        d.at(0.0, work(key, Priority.RESYNC, "startup"))
    rng = random.Random(3)
    for i in range(16):  # 16 faxes on random extensions over 40 s
        d.at(2.5 * i + rng.uniform(0, 2), work(rng.choice(keys), Priority.PUSH, "push"))
    d.run(120.0)
    assert max(d.hint_delays()) <= 2 * TICK + 0.5
    synced = {g.key: g.granted_at for g in d.grants if "startup" in g.reasons}
    assert set(synced) == set(keys)
    # 40 syncs and 16 pushes at one token each, less the bucket's 4 and the hints that met a sync.
    assert max(synced.values()) <= 56 * TICK
    assert most_in_any_window(d.light_times()) <= 40


# ---------------------------------------------------------------------- fairness and adaptive debounce


def test_fairness_across_100_keys() -> None:
    s = sched(debounce=1.0, max_delay=5.0)
    keys = [ext_key(str(i)) for i in range(100)]
    d = Driver(s)
    for i, key in enumerate(keys):
        for k in range(120):  # a hint every 5 s for 10 minutes, keys staggered
            d.at(k * 5.0 + i * 0.05, work(key, Priority.PUSH, "push"))
    d.run(600.0)
    counts = Counter(g.key for g in d.grants)
    assert set(counts) == set(keys)  # nobody starves
    assert max(counts.values()) - min(counts.values()) <= 1  # round-robin
    assert max(g.waited for g in d.grants) <= 100 * TICK + 5.0
    assert most_in_any_window(d.light_times()) <= 40


def test_effective_debounce_grows_by_one_refill_interval_per_waiting_key() -> None:
    s = sched(debounce=0.5)
    assert s.effective_debounce(0.0) == 0.5
    drain_light(s, 0.0)
    values = [s.effective_debounce(0.0)]
    for i in range(20):
        s.submit(work(ext_key(str(i)), Priority.PUSH), 0.0)
        values.append(s.effective_debounce(0.0))
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert values[0] == pytest.approx(TICK)
    assert steps == pytest.approx([TICK] * 20)  # linear in demand: no jump to a window


def test_latency_degrades_gradually_with_demand() -> None:
    worst: list[float] = []
    for n in (1, 2, 4, 8, 16, 32):
        s = sched(debounce=0.2, max_delay=1.0)
        d = Driver(s, latency=0.1)
        for i in range(n):
            for k in range(600):  # every key hinted every 0.5 s for 300 s
                d.at(k * 0.5 + i * 0.01, work(ext_key(str(i)), Priority.PUSH, "push"))
        d.run(300.0)
        waits = [g.waited for g in d.grants if g.granted_at > 60.0]  # steady state
        worst.append(max(waits))
        # The reported effective debounce (the wait of a hint for one more key) stays in step.
        steady = [q for t, q in d.samples if t > 60.0]
        assert max(steady) <= (n + 1) * TICK + 0.2
        assert max(waits) <= n * TICK + 0.2
        assert most_in_any_window(d.light_times()) <= 40
    assert worst == sorted(worst)
    assert worst[0] <= TICK + 0.2  # one key asking more than the share: one refill interval


def test_scarcity_turns_off_the_leading_edge() -> None:
    s = sched(debounce=1.0)
    drain_light(s, 0.0)
    s.submit(work(A, Priority.PUSH), 0.0)
    assert s.due_at(A) == 1.0  # no token to spend at once: let the burst coalesce


# ---------------------------------------------------------------------- errors


def test_transient_errors_back_off_to_a_cap_of_ten_seconds() -> None:
    s = sched(paced=frozenset())
    s.submit(work(A, Priority.PUSH), 0.0)
    now, delays = 0.0, []
    for _ in range(7):
        g = grant_now(s, now)
        run(s, g, now, Outcome.error())
        due = s.due_at(A)
        assert due is not None
        delays.append(due - now)
        assert s.next(now) is None
        now = due
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert s.failures(A) == 7
    run(s, grant_now(s, now), now)
    assert s.failures(A) == 0


def test_a_backoff_delays_only_its_own_key() -> None:
    s = sched(paced=frozenset())
    s.submit(work(A, Priority.PUSH), 0.0)
    run(s, grant_now(s, 0.0), 0.0, Outcome.error())
    s.submit(work(B, Priority.SAFETY_POLL, "poll"), 0.1)
    assert grant_now(s, 0.1).key == B


def test_retry_after_on_a_5xx_is_honoured_until_the_api_answers_again() -> None:
    s = sched(paced=frozenset())
    s.submit(work(A, Priority.PUSH), 0.0)
    run(s, grant_now(s, 0.0), 0.0, Outcome.error(retry_after=60.0))
    assert s.due_at(A) == 60.0
    s.submit(work(A, Priority.PUSH), 2.0)  # a hint, but nothing has answered since
    assert s.due_at(A) == 60.0
    s.submit(work(B, Priority.PUSH), 5.0)
    run(s, grant_now(s, 5.0), 5.0)  # the API answers again
    s.submit(work(A, Priority.PUSH), 6.0)
    assert s.due_at(A) == 16.0  # within the cap of the hint
    assert grant_now(s, 16.0).key == A


def test_retry_after_is_bounded() -> None:
    s = sched(paced=frozenset())
    s.submit(work(A, Priority.PUSH), 0.0)
    run(s, grant_now(s, 0.0), 0.0, Outcome.error(retry_after=1e9))
    assert s.due_at(A) == 300.0


def test_user_and_resync_work_end_a_backoff() -> None:
    s = sched(paced=frozenset())
    s.submit(work(A, Priority.PUSH), 0.0)
    run(s, grant_now(s, 0.0), 0.0, Outcome.error(retry_after=60.0))
    s.submit(work(A, Priority.RESYNC, "resync"), 3.0)
    g = grant_now(s, 3.0)
    assert g.reasons == {"resync"}
    assert g.priority is Priority.PUSH  # it keeps its place as a push


def test_work_that_arrived_while_its_key_ran_joins_the_retry() -> None:
    """A poll that fails is retried; a user request for its key that came while it ran is not lost
    behind it: the retry carries both reasons, the larger cost and the user's priority."""
    s = sched(paced=frozenset())
    s.submit(work(A, Priority.SAFETY_POLL, "poll"), 0.0)
    g = grant_now(s, 0.0)
    s.submit(work(A, Priority.USER, "request", Light=2), 0.5)
    assert s.next(0.5) is None  # the key is running
    run(s, g, 1.0, Outcome.error())
    assert s.due_at(A) == 2.0
    retry = grant_now(s, 2.0)
    assert retry.priority is Priority.USER
    assert retry.reasons == {"poll", "request"}
    assert dict(retry.cost) == {LIGHT: 2}


def test_failed_work_is_not_retried() -> None:
    s = sched()
    send = ("send", "r1")
    s.submit(Work(send, Priority.USER, cost={HEAVY: 1}), 0.0)
    g = grant_now(s, 0.0)
    assert s.take(g, HEAVY, 0.0)
    s.done(g, 0.1, Outcome.failed())  # a send that RingCentral refused: the client hears of it
    assert s.pending(send) is None
    assert s.failures(send) == 0
    assert s.is_idle()


def test_finished_one_off_keys_do_not_pile_up() -> None:
    s = sched(debounce=1.0)
    for i in range(1000):
        now = 10.0 * i  # within Heavy's share
        s.submit(Work(("send", str(i)), Priority.USER, cost={HEAVY: 1}), now)
        run(s, grant_now(s, now), now)
    assert len(s._last_done) <= 65


def test_a_429_stops_the_whole_group_until_the_penalty_ends() -> None:
    s = sched()
    s.submit(work(A, Priority.PUSH), 0.0)
    g = grant_now(s, 0.0)
    assert s.take(g, LIGHT, 0.0)
    s.done(g, 0.0, Outcome.rate_limited(LIGHT, 20.0))
    assert s.failures(A) == 0
    s.submit(work(B, Priority.USER, "request"), 1.0)
    s.submit(Work(("send", "r1"), Priority.USER, cost={HEAVY: 1}), 1.0)
    assert grant_now(s, 1.0).key == ("send", "r1")  # Heavy is not penalised
    assert s.next(1.0) is None
    assert s.next_wake(1.0) == pytest.approx(20.0, abs=1e-3)
    assert s.status(1.0) == "rate-limited: Light, next slot in 19 s"
    assert s.next(19.99) is None
    first = grant_now(s, 20.0)
    assert first.key == B  # user first, then A in its place
    assert grant_now(s, 20.0).key == A


def test_take_says_no_during_a_penalty() -> None:
    s = sched()
    s.submit(work(A, Priority.USER), 0.0)
    g = grant_now(s, 0.0)
    assert s.take(g, LIGHT, 0.0)
    s.budget.penalty(LIGHT, 0.0, 10.0)
    assert not s.take(g, LIGHT, 1.0)


# ---------------------------------------------------------------------- push down, polls


def test_push_down_frees_the_reserve_for_polling_faxes_in_flight() -> None:
    s = sched(active_poll_interval=60.0, outage_poll_interval=2.0)
    s.set_extensions([A, B], 0.0)
    s.set_active([A])
    drain_light(s, 0.0)
    s.set_push(False)
    assert s.next_wake(0.0) == 2.0  # A's outage poll
    s.submit(work(B, Priority.SAFETY_POLL, "poll"), 2.0)
    g = grant_now(s, 2.0)  # 1.2 tokens: only the push reserve is left, and it is free now
    assert g.key == A
    assert g.priority is Priority.ACTIVE_POLL
    assert s.next(2.0) is None  # a safety poll still spends only headroom


def test_with_push_up_active_polls_keep_off_the_reserve() -> None:
    s = sched()
    drain_light(s, 0.0)
    s.submit(work(A, Priority.ACTIVE_POLL, "poll"), 2.0)
    assert s.next(2.0) is None
    s.set_push(False)
    assert grant_now(s, 2.0).key == A


def test_polls_become_work_and_any_check_resets_them() -> None:
    s = sched(poll_interval=30.0, active_poll_interval=10.0)
    s.set_extensions([A, B, C, D], 0.0)  # spread over one interval: due at 7.5, 15, 22.5, 30
    s.set_active([B])
    g = grant_now(s, 7.5)
    assert (g.key, g.priority, g.reasons) == (A, Priority.SAFETY_POLL, frozenset({"poll"}))
    run(s, g, 7.5)
    b_due = s.polls.due_at(B)
    s.submit(work(B, Priority.PUSH, "push"), 8.0)
    run(s, grant_now(s, 8.0), 8.0)  # a plain push of a key with faxes in flight is no check
    s.submit(work(C, Priority.SETTLE, "settle"), 8.0)
    run(s, grant_now(s, 8.0), 8.0)  # a settle check is
    s.submit(work(D, Priority.PUSH, "push"), 9.0)
    run(s, grant_now(s, 9.0), 9.0)  # and so is a plain push of a key with none in flight (its ISync)
    assert s.polls.due_at(A) == 37.5
    assert s.polls.due_at(B) == b_due
    assert s.polls.due_at(C) == 38.0
    assert s.polls.due_at(D) == 39.0


def test_a_poll_asked_while_its_key_runs_a_check_is_dropped() -> None:
    s = sched(poll_interval=30.0)
    s.set_extensions([A], 0.0)
    s.submit(work(A, Priority.RESYNC, "startup"), 29.0)
    g = grant_now(s, 29.0)
    assert s.next(30.0) is None  # the poll fell due while A runs
    run(s, g, 31.0)
    assert s.is_idle()


def test_a_starved_safety_poll_joins_the_active_polls() -> None:
    s = sched(poll_interval=30.0, active_poll_interval=5.0, paced=frozenset())
    s.submit(work(A, Priority.SAFETY_POLL, "poll"), 0.0)
    s.submit(work(B, Priority.ACTIVE_POLL, "poll"), 10.0)
    assert grant_now(s, 10.0).key == B
    s.submit(work(B, Priority.ACTIVE_POLL, "poll"), 20.0)
    s.submit(work(C, Priority.ACTIVE_POLL, "poll"), 25.0)
    assert grant_now(s, 30.0).key == A  # waited an interval: first among the active polls by age


# ---------------------------------------------------------------------- shutdown


def test_close_hands_out_only_what_fits_now_and_retries_nothing() -> None:
    s = sched(debounce=1.0)
    s.submit(work(ext_key("busy"), Priority.PUSH), 0.0)
    failing = grant_now(s, 0.0)
    s.submit(work(A, Priority.RESYNC, "startup"), 0.0)
    s.submit(work(B, Priority.SAFETY_POLL, "poll"), 0.0)
    s.submit(work(C, Priority.SETTLE, "settle"), 0.0, at=50.0)
    s.submit(work(ext_key("late"), Priority.PUSH), 0.0)
    dropped = s.close(0.5)
    assert {w.key for w in dropped} == {A, B, C}  # C's settle check was not due yet
    assert not s.submit(work(ext_key("new"), Priority.USER), 0.5)
    # The pending push is due now (its quiet period would have ended at 1.0).
    assert grant_now(s, 0.5).key == ext_key("late")
    assert s.next_wake(0.5) is None
    run(s, failing, 0.6, Outcome.error())
    assert s.due_at(ext_key("busy")) is None  # not retried
    assert s.close(1.0) == []


def test_after_close_nothing_waits_for_budget() -> None:
    s = sched()
    drain_light(s, 0.0)
    s.submit(work(A, Priority.USER, "request"), 0.0)
    s.submit(work(B, Priority.PUSH, "push"), 0.0)
    assert s.close(0.0) == []
    assert s.next(0.0) is None
    assert s.next_wake(0.0) is None  # the driver does not sleep for budget: the drain is over
    assert {w.key for w in s.abandon()} == {A, B}
    assert s.is_idle()


# ---------------------------------------------------------------------- observability


def test_snapshot_as_plain_data() -> None:
    s = sched(debounce=0.5)
    drain_light(s, 0.0)
    s.submit(work(A, Priority.PUSH), 0.0)
    s.submit(work(B, Priority.SAFETY_POLL, "poll"), 0.0)
    s.submit(work(C, Priority.SAFETY_POLL, "poll"), 0.0)
    snap = s.snapshot(0.6)
    assert snap.depth[Priority.PUSH] == 1
    assert snap.depth[Priority.SAFETY_POLL] == 2
    assert snap.running == 0
    light = snap.budgets[LIGHT]
    assert (light.allowed, light.window, light.room) == (40, 60.0, 36)
    assert light.tokens == pytest.approx(0.36)
    assert light.next_slot == pytest.approx((1 - 0.36) / RATE)
    assert snap.budgets[HEAVY].tokens is None
    assert snap.effective_debounce == pytest.approx((2 - 0.36) / RATE)
    assert snap.status == "rate-limited: Light, next slot in 2 s"
    assert s.snapshot(20.0).status == ""  # A got its token; polls waiting are no limit


def test_validation() -> None:
    s = sched()
    with pytest.raises(ValueError, match="at least one request"):
        s.submit(Work(A, Priority.PUSH, cost={}), 0.0)
    with pytest.raises(ValueError, match="not running"):
        s.done(Grant(99, A, Priority.PUSH, frozenset(), frozenset(), {}, 0.0, 0.0), 0.0, Outcome.ok())
    with pytest.raises(ValueError, match="max_delay"):
        SchedulerSettings(debounce=2.0, max_delay=1.0)
    assert Outcome.rate_limited(LIGHT).result is Result.RATE_LIMITED


# ---------------------------------------------------------------------- the share invariant


@dataclass(frozen=True)
class Op:
    kind: str
    step: float  # seconds before the operation
    key: int = 0
    priority: Priority = Priority.PUSH
    cost: int = 1  # Light requests
    result: Result = Result.OK
    extras: int = 0  # extra requests the grant tries to take


OPS = st.one_of(
    st.builds(
        Op,
        kind=st.just("submit"),
        step=st.floats(0, 3),
        key=st.integers(0, 5),
        priority=st.sampled_from(Priority),
        cost=st.integers(1, 6),
    ),
    st.builds(Op, kind=st.just("next"), step=st.floats(0, 5)),
    st.builds(Op, kind=st.just("push"), step=st.floats(0, 1), key=st.integers(0, 1)),
    st.builds(
        Op,
        kind=st.just("done"),
        step=st.floats(0, 2),
        result=st.sampled_from(Result),
        extras=st.integers(0, 4),
    ),
)
OUTCOMES = {
    Result.OK: Outcome.ok(),
    Result.FAILED: Outcome.failed(),
    Result.ERROR: Outcome.error(retry_after=5.0),
    Result.RATE_LIMITED: Outcome.rate_limited(LIGHT, 7.0),
    Result.DEFERRED: Outcome.deferred(),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(OPS, max_size=150),
    share=st.sampled_from([0.1, 0.5, 0.8, 1.0]),
    reserve=st.integers(0, 3),
    burst=st.sampled_from([0.05, 0.1, 0.5, 1.0]),
)
def test_never_more_than_the_share_in_any_window(
    ops: list[Op], share: float, reserve: int, burst: float
) -> None:
    """Whatever is asked, granted, taken as extras, failed or deferred: Light requests stay within
    the share in every window, nothing goes during a 429 penalty, no key runs twice at once, and
    next_wake never asks for a busy loop."""
    s = Scheduler(
        RateBudget(share),
        SchedulerSettings(
            push_reserve=reserve, burst_fraction=burst, poll_interval=20.0, active_poll_interval=4.0
        ),
    )
    s.set_extensions([ext_key(str(k)) for k in range(6)], 0.0)
    s.set_active([ext_key("0"), ext_key("1")])
    allowed = s.budget.allowed(LIGHT)
    now = 0.0
    sent: list[float] = []
    running: list[Grant] = []
    penalty_until = -1.0
    for op in ops:
        now += op.step
        if op.kind == "submit":
            s.submit(Work(ext_key(str(op.key)), op.priority, frozenset(), {LIGHT: op.cost}), now)
        elif op.kind == "push":
            s.set_push(bool(op.key))
        elif op.kind == "next":
            while (g := s.next(now)) is not None:
                assert g.key not in {r.key for r in running}
                assert now >= penalty_until
                running.append(g)
            wake = s.next_wake(now)
            assert wake is None or wake > now
        elif running:
            g = running.pop(0)
            for _ in range(g.cost[LIGHT]):
                assert s.take(g, LIGHT, now)
                sent.append(now)
            for _ in range(op.extras):
                if s.take(g, LIGHT, now):
                    assert now >= penalty_until
                    sent.append(now)
            if op.result is Result.RATE_LIMITED:
                penalty_until = max(penalty_until, now + 7.0)
            s.done(g, now, OUTCOMES[op.result])
        assert most_in_any_window(sent) <= allowed


def test_an_active_poll_does_not_ride_on_a_hinted_key_while_push_works() -> None:
    """A poll merged into a push item would make the hint wait for the poll's bulk reads (2 tokens
    here instead of 1). While push works it is put off by one active period; while push is down it
    merges as before (the poll is what finds the changes then)."""
    s = Scheduler(
        RateBudget(0.8),
        SchedulerSettings(debounce=0.2, max_delay=1.0, poll_interval=300.0, active_poll_interval=2.0),
        poll_cost=lambda key, kind: {LIGHT: 2},
    )
    s.set_extensions([A], 0.0)
    s.set_active([A])
    s.submit(work(A, Priority.PUSH, "push"), 1.9)
    pushed = grant_now(s, 1.9)
    assert s.next(2.0) is None  # the active poll falls due while the push runs: put off
    run(s, pushed, 2.05)
    s.submit(work(A, Priority.PUSH, "push"), 2.1)  # and while the next hint waits its quiet period
    again = grant_now(s, 2.25)
    assert (again.priority, dict(again.cost), again.checks) == (Priority.PUSH, {LIGHT: 1}, False)
    run(s, again, 2.3)
    assert s.next(3.9) is None
    polled = grant_now(s, 4.0)  # one active period after it was put off
    assert (polled.priority, dict(polled.cost), polled.checks) == (Priority.ACTIVE_POLL, {LIGHT: 2}, True)
    run(s, polled, 4.0)
    # Push down: the active poll (every 5 s now) merges into the hinted item and makes it a check.
    s.set_push(False)
    s.submit(work(A, Priority.PUSH, "push"), 9.0)
    merged = grant_now(s, 9.0)
    assert (merged.priority, merged.checks) == (Priority.PUSH, True)


def test_a_safety_poll_is_put_off_for_a_hinted_key_and_the_push_is_its_check() -> None:
    """A safety poll merged into a push item would make the hint wait for its bulk reads too. While
    push works it is put off by one active period; a key with a safety poll has no faxes in flight,
    so the push that ends is all the poll would have read, and counts as its check. Push down: the
    poll merges at once (the poll is what finds the changes then)."""
    s = Scheduler(
        RateBudget(0.8),
        SchedulerSettings(debounce=0.2, max_delay=1.0, poll_interval=5.0, active_poll_interval=2.0),
        poll_cost=lambda key, kind: {LIGHT: 2},
    )
    s.set_extensions([A], 0.0)  # no faxes in flight: only the safety poll, due at 5.0
    s.submit(work(A, Priority.PUSH, "push"), 4.9)
    pushed = grant_now(s, 4.9)
    assert s.next(5.0) is None  # the safety poll falls due while the push runs: put off
    run(s, pushed, 5.05)
    assert s.polls.due_at(A) == pytest.approx(10.05)  # the push was the check
    s.submit(work(A, Priority.PUSH, "push"), 5.1)  # the next hint is not made to wait for a poll
    again = grant_now(s, 5.3)
    assert (again.priority, dict(again.cost), again.checks) == (Priority.PUSH, {LIGHT: 1}, False)
    run(s, again, 5.3)
    assert s.next(10.2) is None
    polled = grant_now(s, 10.3)  # no hint for an interval: polled on its own
    assert (polled.priority, dict(polled.cost), polled.checks) == (Priority.SAFETY_POLL, {LIGHT: 2}, True)
    run(s, polled, 10.3)
    s.set_push(False)
    s.submit(work(A, Priority.PUSH, "push"), 15.2)
    assert grant_now(s, 15.35).checks is True


@pytest.mark.parametrize("active", [True, False])
def test_a_hint_takes_the_place_of_a_waiting_poll_while_push_works(active: bool) -> None:
    """The same rule when the hint comes second: a poll waiting for headroom is not what a push hint
    merges into (it would wait for the poll's bulk reads). The poll goes back to the schedule and is
    offered again one active period later (a safety poll: once, as above)."""
    s = Scheduler(
        RateBudget(0.8),
        SchedulerSettings(debounce=0.2, max_delay=1.0, poll_interval=5.0, active_poll_interval=2.0),
        poll_cost=lambda key, kind: {LIGHT: 2},
    )
    s.set_extensions([A], 0.0)
    if active:
        s.set_active([A])
    due = 2.0 if active else 5.0
    drain_light(s, due - 0.1)
    assert s.next(due) is None  # the poll waits for headroom (three tokens: its two, the reserve)
    s.submit(work(A, Priority.PUSH, "push"), due + 0.1)
    assert s.next(due + 1.5) is None  # the first token comes 1.7 s after the drain
    pushed = grant_now(s, due + 1.6)
    assert (pushed.priority, dict(pushed.cost), pushed.checks) == (Priority.PUSH, {LIGHT: 1}, False)
    run(s, pushed, due + 1.6)
    polled = next(g for t in range(100) if (g := s.next(due + 1.6 + t * 0.1)) is not None)
    assert (polled.priority, dict(polled.cost), polled.checks) == (
        Priority.ACTIVE_POLL if active else Priority.SAFETY_POLL,
        {LIGHT: 2},
        True,
    )
