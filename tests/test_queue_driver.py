"""The request driver (faxd.adapters.scheduling) on fake time (looptime), with recording runners: what
runs when, how outcomes reach the scheduler, callers waiting for a grant, and the drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import ApiError, BudgetDeferred, RateLimited, Stopping, _permit
from faxd.adapters.scheduling import RequestDriver
from faxd.core.ratebudget import HEAVY, LIGHT, MEDIUM, RateBudget
from faxd.core.scheduler import Grant, Outcome, Priority, Scheduler, SchedulerSettings, Work, ext_key


@dataclass
class Runs:
    """Each background grant run: (key id, priority, loop time); can fail or hold the next ones."""

    log: list[tuple[str, Priority, float]] = field(default_factory=list)
    fail: dict[str, list[BaseException]] = field(default_factory=dict)
    hold: asyncio.Event | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, grant: Grant) -> Outcome | None:
        at = asyncio.get_running_loop().time()
        permit = _permit.get()
        assert permit is not None
        for group, n in grant.cost.items():  # the requests, as rest.py sends them
            assert all(permit.take(group, at) for _ in range(n))
        self.log.append((grant.key[1], grant.priority, at))
        self.changed.set()
        if self.hold is not None:
            await self.hold.wait()
        errors = self.fail.get(grant.key[1])
        if errors:
            raise errors.pop(0)
        return None

    async def until(self, count: int) -> None:
        async with asyncio.timeout(300):
            while len(self.log) < count:
                self.changed.clear()
                await self.changed.wait()

    def times(self, key: str) -> list[float]:
        return [round(t, 3) for k, _, t in self.log if k == key]


@dataclass
class Harness:
    driver: RequestDriver
    runs: Runs
    metrics: Metrics

    def submit(self, ext: str, priority: Priority, cost: int = 1) -> None:
        self.driver.submit(Work(ext_key(ext), priority, frozenset({priority.name.lower()}), {LIGHT: cost}))


@asynccontextmanager
async def harness() -> AsyncIterator[Harness]:
    """Started inside each test: the loop's (fake) clock must be the one the scheduler first reads."""
    metrics = Metrics(CollectorRegistry())
    sched = Scheduler(RateBudget(0.8), SchedulerSettings(debounce=0.5, max_delay=2.0))
    driver = RequestDriver(sched, metrics)
    runs = Runs()
    driver.register("ext", runs.run)
    task = asyncio.create_task(driver.run())
    try:
        yield Harness(driver, runs, metrics)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def now() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.looptime
async def test_work_goes_by_priority_one_reconcile_at_a_time() -> None:
    async with harness() as h:
        h.runs.hold = asyncio.Event()
        h.submit("first", Priority.SAFETY_POLL)
        await h.runs.until(1)
        # While "first" runs, work of every class queues; it goes highest class first.
        for ext, priority in [
            ("safety", Priority.SAFETY_POLL),
            ("active", Priority.ACTIVE_POLL),
            ("resync", Priority.RESYNC),
            ("settle", Priority.SETTLE),
            ("push", Priority.PUSH),
            ("user", Priority.USER),
        ]:
            h.submit(ext, priority)
        await asyncio.sleep(5)  # budget enough for all of them meanwhile
        assert len(h.runs.log) == 1  # MAX_RUNNING: one reconcile at a time
        h.runs.hold.set()
        await h.runs.until(7)
        assert [k for k, _, _ in h.runs.log] == [
            "first",
            "user",
            "push",
            "settle",
            "resync",
            "active",
            "safety",
        ]
        depth = h.metrics.registry.get_sample_value("faxd_sched_queue_depth", {"priority": "push"})
        assert depth == 0


@pytest.mark.looptime
async def test_errors_back_off_per_key_capped_and_a_429_holds_the_group() -> None:
    async with harness() as h:
        start = now()
        h.runs.fail["e1"] = [ApiError(503, "http_503") for _ in range(6)]
        h.submit("e1", Priority.PUSH)
        await h.runs.until(7)
        gaps = [round(b - a, 3) for a, b in zip(h.runs.times("e1"), h.runs.times("e1")[1:], strict=False)]
        assert gaps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # bounded backoff: never more than 10 s
        assert h.driver.sched.failures(ext_key("e1")) == 0  # the success reset it
        # A 429 is no failure of the key: the whole group waits out the penalty, then the work goes again.
        h.runs.fail["e2"] = [RateLimited(429, "CMN-301", "", group=LIGHT, retry_after=20.0)]
        t429 = now()
        h.submit("e2", Priority.PUSH)
        await h.runs.until(8)
        h.submit("e3", Priority.USER)  # another key of the group, submitted during the penalty
        await h.runs.until(10)
        later = [(k, round(t - t429, 3)) for k, _, t in h.runs.log[7:]]
        assert later[0] == ("e2", 0.0)
        assert {k for k, _ in later[1:]} == {"e2", "e3"}
        assert all(t >= 20.0 for _, t in later[1:]), later
        assert start < t429


@pytest.mark.looptime
async def test_execute_runs_under_its_grant_and_runs_again_after_a_deferral() -> None:
    async with harness() as h:
        seen: list[tuple[float, bool]] = []

        async def download() -> str:
            permit = _permit.get()
            assert permit is not None
            # The reserved Medium request may go; a second one only if the budget allows it now.
            seen.append((now(), permit.take(MEDIUM, now())))
            if len(seen) == 1:
                raise BudgetDeferred(MEDIUM)
            return "document"

        work = Work(("doc", "42"), Priority.PUSH, frozenset({"doc"}), {MEDIUM: 1})
        assert await h.driver.execute(work, download) == "document"
        assert [ok for _, ok in seen] == [True, True]
        assert not h.driver.sched.is_running(("doc", "42"))
        # An error ends the work: not retried by the scheduler, raised to the caller.

        async def refused() -> None:
            raise ApiError(400, "CMN-100")

        send = Work(("send", "r1"), Priority.USER, frozenset({"send"}), {HEAVY: 1})
        with pytest.raises(ApiError, match="CMN-100"):
            await h.driver.execute(send, refused)
        assert h.driver.sched.pending(("send", "r1")) is None


@pytest.mark.looptime
async def test_a_caller_waits_for_budget_bounded_and_gives_the_grant_back_when_it_gives_up() -> None:
    async with harness() as h:
        # Heavy: 8 a minute at the default share, not paced: the ninth waits for the window.
        async def nothing() -> None:
            permit = _permit.get()
            assert permit is not None
            assert permit.take(HEAVY, now())  # the request, as rest.py sends it

        start = now()
        for i in range(8):
            await h.driver.execute(Work(("send", str(i)), Priority.USER, frozenset(), {HEAVY: 1}), nothing)
        assert now() - start == pytest.approx(0.0)
        with pytest.raises(ApiError, match="budget"):
            await h.driver.execute(
                Work(("send", "9"), Priority.USER, frozenset(), {HEAVY: 1}), nothing, wait=5
            )
        assert now() - start == pytest.approx(5.0)
        await h.driver.execute(Work(("send", "10"), Priority.USER, frozenset(), {HEAVY: 1}), nothing)
        assert now() - start == pytest.approx(60.0, abs=0.01)  # when the first send left the window
        assert h.driver.sched.running == 0


@pytest.mark.looptime
async def test_drain_finishes_running_work_drops_polls_and_fails_waiters() -> None:
    async with harness() as h:
        h.runs.hold = asyncio.Event()
        h.submit("running", Priority.PUSH)
        await h.runs.until(1)
        h.submit("poll", Priority.SAFETY_POLL)

        async def nothing() -> None:
            return None

        waiter = asyncio.create_task(
            h.driver.execute(Work(("send", "x"), Priority.USER, frozenset(), {LIGHT: 1}), nothing, wait=60)
        )
        # Spend the rest of Light so that the user work cannot go at once.
        h.driver.sched.budget.penalty(LIGHT, now(), 30.0)
        drain = asyncio.create_task(h.driver.drain())
        await asyncio.sleep(1)
        assert not drain.done()  # the running reconcile is waited for
        assert h.driver.submit(Work(ext_key("new"), Priority.PUSH)) is False
        h.runs.hold.set()
        async with asyncio.timeout(1):
            await drain
        with pytest.raises(Stopping):
            await waiter
        assert [k for k, _, _ in h.runs.log] == ["running"]
        assert h.driver.sched.is_idle()


@pytest.mark.looptime
async def test_forty_start_up_syncs_and_polls_are_paced_without_spinning() -> None:
    async with harness() as h:
        """The first 40 keys' start-up work and then their polls every 20 s: one grant per refill interval
        for 200 s. A due time a hair after ``now`` (float rounding) once made the loop spin at one instant:
        fake time never advanced and this test never ended."""
        sched = h.driver.sched
        sched.configure(
            SchedulerSettings(debounce=0.5, max_delay=2.0, poll_interval=20.0, active_poll_interval=10.0)
        )
        keys = [f"e{i:02d}" for i in range(40)]
        h.driver.set_extensions(ext_key(k) for k in keys)
        for k in keys:
            h.submit(k, Priority.RESYNC)
        await asyncio.sleep(200)
        # 4 at once, then 0.6 a second (Light at the default share, paced).
        assert 4 + 0.6 * 200 - 2 <= len(h.runs.log) <= 4 + 0.6 * 200 + 1
        resyncs = [k for k, p, _ in h.runs.log if p is Priority.RESYNC]
        assert resyncs == keys  # all start-up work before any poll, in order
