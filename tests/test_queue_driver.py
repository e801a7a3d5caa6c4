"""The async driver of the keyed queue on fake time (looptime): when reconciles run, and how many."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from faxd.adapters.metrics import Metrics
from faxd.adapters.reconcile import ReconcileQueue
from faxd.adapters.rest import ApiError
from faxd.core.debounce import KeyedQueue


@dataclass
class FakeReconciler:
    """Records each reconcile (key, reasons, start time); can hold one open or fail the next ones."""

    runs: list[tuple[str, set[str], float]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    hold: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def reconcile(self, key: str, reasons: set[str]) -> None:
        self.runs.append((key, set(reasons), asyncio.get_running_loop().time()))
        self.started.set()
        async with self.changed:
            self.changed.notify_all()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail.get(key, 0) > 0:
            self.fail[key] -= 1
            raise ApiError(503, "http_503")

    async def until(self, count: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.runs) >= count)


@dataclass
class Driver:
    queue: ReconcileQueue
    rec: FakeReconciler

    def times(self) -> list[float]:
        return [round(t, 3) for _, _, t in self.rec.runs]


@pytest.fixture
async def driver() -> AsyncIterator[Driver]:
    rec = FakeReconciler()
    keyed = KeyedQueue(debounce=1.0, max_delay=5.0, backoff_base=2.0, backoff_cap=30.0)
    queue = ReconcileQueue(keyed, rec, Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    task = asyncio.create_task(queue.run())
    try:
        yield Driver(queue, rec)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def at(t: float) -> Any:
    """Sleep until loop time ``t`` (fake time: instant)."""
    return asyncio.sleep(max(0.0, t - asyncio.get_running_loop().time()))


@pytest.mark.looptime
async def test_isolated_hint_runs_at_once_and_a_burst_after_it_waits_the_quiet_period(driver: Driver) -> None:
    start = asyncio.get_running_loop().time()
    driver.queue.hint("e1", "push")
    await driver.rec.until(1)
    for t in (0.2, 0.4, 0.6, 0.8):
        await at(start + t)
        driver.queue.hint("e1", "push")
    await driver.rec.until(2)
    await driver.queue.wait_idle()
    assert [t - start for t in driver.times()] == pytest.approx([0.0, 1.8])  # last hint + debounce
    assert driver.rec.runs[1][1] == {"push"}


@pytest.mark.looptime
async def test_a_hint_soon_after_a_reconcile_waits_only_for_the_rest_of_the_window(driver: Driver) -> None:
    start = asyncio.get_running_loop().time()
    driver.queue.hint("e1", "push")
    await driver.rec.until(1)
    await driver.queue.wait_idle()
    await at(start + 0.7)
    driver.queue.hint("e1", "push")
    await driver.rec.until(2)
    await driver.queue.wait_idle()
    # Due at the first reconcile + debounce (1.0), not hint + debounce (1.7): same rate, shorter wait.
    assert [t - start for t in driver.times()] == pytest.approx([0.0, 1.0])


@pytest.mark.looptime
async def test_a_busy_key_is_served_every_max_delay(driver: Driver) -> None:
    start = asyncio.get_running_loop().time()
    driver.queue.hint("e1", "push")
    await driver.rec.until(1)
    hints = []
    t = 0.25
    while t < 12:
        await at(start + t)
        driver.queue.hint("e1", "push")
        hints.append(start + t)
        t += 0.25
    await driver.queue.wait_idle()
    runs = driver.times()
    # max_delay bounds the wait of every hint, even for a key that never goes quiet.
    waits = [min(r for r in runs if r >= h) - h for h in hints]
    assert max(waits) <= 5.0 + 1e-6
    assert len(runs) <= 5  # 47 hints, a handful of reconciles


@pytest.mark.looptime
async def test_hints_during_processing_cause_exactly_one_more_reconcile(driver: Driver) -> None:
    driver.rec.hold = asyncio.Event()
    driver.queue.hint("e1", "push")
    await driver.rec.started.wait()
    for reason in ("push", "push", "poll", "push"):
        driver.queue.hint("e1", reason)
    assert len(driver.rec.runs) == 1  # never twice at once
    driver.rec.hold.set()
    await driver.queue.wait_idle()
    assert [(k, r) for k, r, _ in driver.rec.runs] == [("e1", {"push"}), ("e1", {"push", "poll"})]


@pytest.mark.looptime
async def test_errors_back_off_per_key_and_success_resets(driver: Driver) -> None:
    start = asyncio.get_running_loop().time()
    driver.rec.fail["e1"] = 3
    driver.queue.hint("e1", "push")
    driver.queue.hint("e2", "push")  # another key is not held up by e1's errors
    await driver.rec.until(5)  # e1: 0, 2, 6, 14 (ok); e2: 0 (ok)
    await driver.queue.wait_idle()
    e1 = [t - start for k, _, t in driver.rec.runs if k == "e1"]
    assert e1 == pytest.approx([0.0, 2.0, 6.0, 14.0])
    assert driver.queue.queue.failures("e1") == 0
    # After the success a new failure starts from the base again.
    driver.rec.fail["e1"] = 1
    await at(start + 20)
    driver.queue.hint("e1", "push")
    await driver.queue.wait_idle()
    e1 = [t - start for k, _, t in driver.rec.runs if k == "e1"]
    assert e1[-2:] == pytest.approx([20.0, 22.0])


@pytest.mark.looptime
async def test_drain_runs_pending_keys_now_drops_new_hints_and_does_not_retry(driver: Driver) -> None:
    start = asyncio.get_running_loop().time()
    driver.queue.hint("e1", "push")
    await driver.rec.until(1)
    await driver.queue.wait_idle()
    driver.queue.hint("e1", "push")  # quiet period: due at start + 1
    driver.queue.hint("e2", "poll")
    await driver.rec.until(2)  # e2 at once (isolated)
    driver.rec.fail["e1"] = 5
    async with asyncio.timeout(1):
        await driver.queue.drain()
    assert [(k, round(t - start, 3)) for k, _, t in driver.rec.runs] == [
        ("e1", 0.0),
        ("e2", 0.0),
        ("e1", 0.0),
    ]
    driver.queue.hint("e3", "push")
    await at(start + 10)
    assert len(driver.rec.runs) == 3  # e1's failure was not retried, e3 was dropped
