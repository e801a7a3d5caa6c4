"""The request scheduler wired to the reconciler and the REST client, against the simulator over real
loopback sockets, on fake loop time (looptime). Each test asserts the sequence of requests the
simulator recorded: which extension's request went when, and in which rate-limit group.

Hints come from the test (the daemon's WebSocket hands them over the same way: ``ReconcileWork.ask``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from faxd.adapters.metrics import Metrics
from faxd.adapters.reconcile import Reconciler, ReconcileSettings, ReconcileWork
from faxd.adapters.rest import Document, RingCentral, Stopping
from faxd.adapters.scheduling import RequestDriver
from faxd.adapters.store import Store
from faxd.core.model import Event
from faxd.core.scheduler import Priority, Scheduler, SchedulerSettings, ext_key
from faxd.sim import RecipientScript, RecordedRequest, SimConfig, Simulator

pytestmark = pytest.mark.looptime


def exts(n: int) -> tuple[str, ...]:
    return tuple(f"20000{i:04d}" for i in range(1, n + 1))


@dataclass
class H:
    sim: Simulator
    rc: RingCentral
    driver: RequestDriver
    work: ReconcileWork
    reconciler: Reconciler
    events: list[tuple[float, Event]]
    published: asyncio.Event
    registry: CollectorRegistry

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def ask(self, ext: str, priority: Priority, reason: str) -> None:
        self.work.ask(ext, priority, reason)

    async def settled(self, *extensions: str, within: float = 600) -> None:
        async with asyncio.timeout(within):
            await self.driver.settled(ext_key(e) for e in extensions)

    def light(self, since: float = 0.0) -> list[RecordedRequest]:
        return [r for r in self.sim.requests if r.group == "Light" and r.time >= since]

    def syncs(self, since: float = 0.0) -> list[tuple[str, float, int]]:
        """(extension, loop time, status) of each message-sync since ``since``."""
        return [
            (_ext_of(r), r.time, r.status) for r in self.sim.requests_to("/message-sync") if r.time >= since
        ]

    async def until_reported(self, fax_id: str, status: str, within: float) -> float:
        """When the fax-level ``status`` of ``fax_id`` was published (waiting for it)."""
        async with asyncio.timeout(within):
            while (at := self.reported(fax_id, status)) is None:
                self.published.clear()
                await self.published.wait()
        return at

    def reported(self, fax_id: str, status: str) -> float | None:
        """When the fax-level ``status`` of ``fax_id`` was published."""
        for at, event in self.events:
            t = event.transition
            if t.fax_id == fax_id and t.recipient_index is None and t.to_status == status:
                return at
        return None


def _ext_of(r: RecordedRequest) -> str:
    return r.raw_path.split("/extension/", 1)[1].split("/", 1)[0]


@asynccontextmanager
async def harness(
    tmp_path: Path, config: SimConfig, *, sched: dict[str, Any] | None = None, **reconcile: Any
) -> AsyncIterator[H]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    events: list[tuple[float, Event]] = []
    async with Simulator(config) as sim, aiohttp.ClientSession() as http:
        rc = RingCentral(
            http,
            server=sim.url,
            client_id=config.client_id,
            client_secret=config.client_secret,
            jwt=config.jwt,
            metrics=metrics,
        )
        store = Store(tmp_path / "faxd.db")
        store.open()
        loop = asyncio.get_running_loop()

        published = asyncio.Event()

        def publish(new: Sequence[Event]) -> None:
            events.extend((loop.time(), e) for e in new)
            published.set()

        settings = ReconcileSettings(**{"debounce": 0.5, "max_delay": 2.0, **reconcile})
        reconciler = Reconciler(rc, store, metrics, publish, settings)
        s = SchedulerSettings(
            **{
                "debounce": settings.debounce,
                "max_delay": settings.max_delay,
                "poll_interval": settings.poll_interval,
                "active_poll_interval": settings.active_poll_interval,
                **(sched or {}),
            }
        )
        scheduler = Scheduler(rc.budget, s, poll_cost=lambda key, kind: work.poll_cost(key, kind))
        driver = RequestDriver(scheduler, metrics)
        work = ReconcileWork(driver, reconciler)
        rc.use_gate(driver)
        task = asyncio.create_task(driver.run())
        try:
            await rc.login()  # through the gate: a USER grant of one Auth request
            yield H(sim, rc, driver, work, reconciler, events, published, registry)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            store.close()


def windows_within(requests: Sequence[RecordedRequest], share: int, window: float = 60.0) -> bool:
    times = [r.time for r in requests]
    return all(len([t for t in times if start <= t < start + window]) <= share for start in times)


async def test_work_goes_by_priority_and_the_rest_is_paced(tmp_path: Path) -> None:
    e = exts(6)
    async with harness(tmp_path, SimConfig(seed=1, extensions=e)) as h:
        start = h.now()
        classes = [
            Priority.SAFETY_POLL,
            Priority.ACTIVE_POLL,
            Priority.RESYNC,
            Priority.SETTLE,
            Priority.PUSH,
            Priority.USER,
        ]
        for ext, priority in zip(e, classes, strict=True):
            h.ask(ext, priority, "poll" if priority > Priority.RESYNC else "request")
        await h.settled(*e)
        syncs = h.syncs(start)
        # Strictly by class: user, push, settle, resync, active poll, safety poll.
        assert [x for x, _, _ in syncs] == list(reversed(e))
        times = [round(t - start, 2) for _, t, _ in syncs]
        # The Light bucket (4) pays the first three at once, less the push reserve for work below push;
        # then one request per refill interval (36 a minute over 60 s: 1.67 s), no burst.
        assert times[:3] == [0.0, 0.0, 0.0]
        gaps = [b - a for a, b in itertools.pairwise(times[2:])]
        assert all(1.6 <= g <= 1.75 for g in gaps), times
        waited = h.registry.get_sample_value("faxd_sched_wait_seconds_count", {"priority": "safety_poll"})
        assert waited == 1.0


async def test_a_hint_is_served_within_seconds_while_start_up_syncs_and_polls_queue(tmp_path: Path) -> None:
    """40 extensions: the start-up syncs alone are a minute of Light budget. A fax that changes on one
    of them meanwhile is reported within seconds, and Light stays within faxd's share."""
    e = exts(40)
    config = SimConfig(seed=2, extensions=e)
    async with harness(tmp_path, config, poll_interval=20.0, active_poll_interval=10.0) as h:
        start = h.now()
        h.driver.set_extensions(ext_key(x) for x in e)
        for x in e:
            h.ask(x, Priority.RESYNC, "startup")
        late = e[-3]
        await asyncio.sleep(10)
        assert h.driver.busy([ext_key(late)])  # its start-up sync still waits for headroom
        fax = h.sim.create_outbound_fax(late, [RecipientScript("+16505550100", "Sent", after=1.0)])
        hinted = h.now()
        h.ask(late, Priority.PUSH, "push")
        await asyncio.sleep(1.0)
        h.ask(late, Priority.PUSH, "push")  # Queued -> Sent
        sent = await h.until_reported(fax, "Sent", within=30)
        first = next(t for x, t, _ in h.syncs(hinted) if x == late)
        assert first - hinted <= 2.5, "the hint waited behind the start-up syncs"
        assert sent - (hinted + 1.0) <= 4.0
        # Polls every 20 s of 40 extensions want more than the paced share: they take the headroom,
        # forever, and never more than faxd's share of any window.
        async with asyncio.timeout(300):
            await h.sim.wait_for(lambda: {x for x, _, s in h.syncs(start) if s == 200} == set(e))
        await asyncio.sleep(120)
        light = h.light(start)
        assert windows_within(light, 40)
        assert len([r for r in light if r.time >= start + 60]) >= 60  # the paced share is spent
        assert not [r for r in h.sim.requests if r.status == 429]


@pytest.mark.parametrize("html", [False, True], ids=["json", "html"])
async def test_a_burst_of_5xx_backs_off_at_most_10_s_and_a_change_after_it_is_reported_within_the_cap(
    tmp_path: Path, html: bool
) -> None:
    a, b = exts(2)
    async with harness(tmp_path, SimConfig(seed=3, extensions=(a, b))) as h:
        h.ask(a, Priority.RESYNC, "startup")
        h.ask(b, Priority.RESYNC, "startup")
        await h.settled(a, b)
        h.sim.fail_next_requests(10, status=503, html=html, retry_after=None)
        start = h.now()
        h.ask(a, Priority.PUSH, "push")
        async with asyncio.timeout(300):
            await h.sim.wait_for(lambda: len([r for r in h.sim.requests if r.status == 503]) == 10)
        failed = [t for x, t, s in h.syncs(start) if s == 503]
        gaps = [round(y - x, 2) for x, y in itertools.pairwise(failed)]
        assert gaps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0]  # bounded: 10 s at most
        # RingCentral answers again; a fax changes on the extension in backoff and is hinted.
        fax = h.sim.create_outbound_fax(a, [RecipientScript("+16505550100", after=3600)])
        hinted = h.now()
        h.ask(a, Priority.PUSH, "push")
        reported = await h.until_reported(fax, "Queued", within=60)
        assert reported - hinted <= 10.0 + 0.5


async def test_a_5xx_retry_after_holds_back_its_own_key_not_the_group(tmp_path: Path) -> None:
    """docs/scheduler.md §5: a Retry-After on a 5xx is honoured for the key that got it; another
    extension's hint still goes at once."""
    a, b = exts(2)
    async with harness(tmp_path, SimConfig(seed=4, extensions=(a, b))) as h:
        h.ask(a, Priority.RESYNC, "startup")
        h.ask(b, Priority.RESYNC, "startup")
        await h.settled(a, b)
        await asyncio.sleep(10)  # the bucket refills
        h.sim.fail_next_requests(1, status=503, retry_after=30)
        start = h.now()
        h.ask(a, Priority.PUSH, "push")
        async with asyncio.timeout(5):
            await h.sim.wait_for(lambda: any(s == 503 for _, _, s in h.syncs(start)))
        h.ask(b, Priority.PUSH, "push")
        await h.settled(a, b)
        syncs = [(x, round(t - start, 2), s) for x, t, s in h.syncs(start)]
        assert syncs[0] == (a, 0.0, 503)
        assert syncs[1][0] == b
        assert syncs[1][1] <= 1.0  # not held by a's Retry-After
        assert syncs[2][0] == a
        assert syncs[2][1] >= 30.0  # a's retry obeys it


async def test_a_429_holds_every_request_of_the_group_until_the_penalty_ends(tmp_path: Path) -> None:
    a, b = exts(2)
    async with harness(tmp_path, SimConfig(seed=5, extensions=(a, b))) as h:
        h.ask(a, Priority.RESYNC, "startup")
        h.ask(b, Priority.RESYNC, "startup")
        await h.settled(a, b)
        await asyncio.sleep(10)
        h.sim.rate_limit_storm("Light", 5.0)
        start = h.now()
        h.ask(a, Priority.PUSH, "push")
        async with asyncio.timeout(5):
            await h.sim.wait_for(lambda: any(r.status == 429 for r in h.light(start)))
        h.ask(b, Priority.USER, "request")  # even user work of the group waits for the penalty
        await asyncio.sleep(1)
        assert h.driver.status() == "rate-limited: Light, next slot in 4 s"  # STATUS= says so
        await h.settled(a, b)
        light = h.light(start)
        refused = [r for r in light if r.status == 429]
        assert len(refused) == 1
        t429 = refused[0].time
        after = [r for r in light if r.time > t429]
        assert after, "the work never went again"
        assert min(r.time for r in after) - t429 >= 5.0 - 0.05
        assert {_ext_of(r) for r in after if r.path.endswith("/message-sync")} == {a, b}


async def test_while_push_is_down_extensions_with_faxes_in_flight_are_polled_every_5_s(
    tmp_path: Path,
) -> None:
    a, b = exts(2)
    async with harness(tmp_path, SimConfig(seed=6, extensions=(a, b)), active_poll_interval=60.0) as h:
        fax = h.sim.create_outbound_fax(a, [RecipientScript("+16505550100", after=3600)])
        h.driver.set_extensions([ext_key(a), ext_key(b)])
        h.driver.set_push(True)
        h.ask(a, Priority.RESYNC, "startup")
        h.ask(b, Priority.RESYNC, "startup")
        await h.settled(a, b)
        assert [f.fax_id for f in h.reconciler.in_flight()] == [fax]
        up = h.now() + 0.001  # after the start-up syncs
        await asyncio.sleep(30)
        assert h.syncs(up) == []  # push works: the active poll is a minute away
        down = h.now()
        h.driver.set_push(False)
        await asyncio.sleep(30)
        polled = [t - down for x, t, _ in h.syncs(down) if x == a]
        assert len(polled) >= 5, polled  # every 5 s while push is down, not every minute
        assert all(5.0 - 0.05 <= y - x <= 6.0 for x, y in itertools.pairwise(polled)), polled
        assert [x for x, _, _ in h.syncs(down) if x == b] == []  # nothing in flight: safety poll only
        gets = [r for r in h.sim.requests_to("/message-store/{messageId}") if r.time >= down]
        assert len(gets) == len(polled)  # each poll is a check: the fax in flight read by id


async def test_a_request_made_outside_any_grant_is_budgeted_and_fails_at_stop_without_waiting(
    tmp_path: Path,
) -> None:
    """An adapter calling a REST method directly (here send_fax, Heavy: 8 a minute at the default
    share) gets a one-request grant: the ninth waits for the window instead of being sent, and a
    stop fails it at once (Stopping) rather than waiting for the budget."""
    (a,) = exts(1)
    async with harness(tmp_path, SimConfig(seed=9, extensions=(a,))) as h:
        pdf = Document("a.pdf", "application/pdf", b"%PDF-1.4 a")
        start = h.now()
        for _ in range(8):
            await h.rc.send_fax(a, to=["+16505550100"], documents=[pdf])
        assert h.now() - start < 0.01
        ninth = asyncio.create_task(h.rc.send_fax(a, to=["+16505550100"], documents=[pdf]))
        await asyncio.sleep(30)
        assert not ninth.done()
        assert len(h.sim.requests_to("/fax", "POST")) == 8
        assert "rate-limited: Heavy" in h.driver.status()
        stopping = h.now()
        async with asyncio.timeout(1):
            await h.driver.drain()
        with pytest.raises(Stopping):
            await ninth
        assert h.now() - stopping < 0.01
        assert len(h.sim.requests_to("/fax", "POST")) == 8


async def test_a_check_bigger_than_its_grant_reads_the_rest_at_its_next_grant(tmp_path: Path) -> None:
    """160 faxes in flight: a poll's check needs an ISync and four bulk GETs, more than a poll may
    reserve (3 of the 4 Light tokens; one is kept for push). It reads what its grant pays for, commits,
    ends deferred, and its next grant reads only the rest: every fax once, then the check is done."""
    (a,) = exts(1)
    async with harness(tmp_path, SimConfig(seed=10, extensions=(a,))) as h:
        ids = [
            h.sim.create_outbound_fax(a, [RecipientScript(f"+165055{i:05d}", after=3600)]) for i in range(160)
        ]
        h.ask(a, Priority.RESYNC, "startup")
        await h.settled(a)
        assert len(h.reconciler.in_flight()) == 160
        await asyncio.sleep(10)  # the bucket refills
        start = h.now()
        h.ask(a, Priority.ACTIVE_POLL, "poll")
        await h.settled(a)
        bulk = [r for r in h.sim.requests_to("/message-store/{messageId}") if r.time >= start]
        read = [r.raw_path.split("?", 1)[0].rsplit("/", 1)[1].split(",") for r in bulk]
        assert sorted(fax_id for chunk in read for fax_id in chunk) == sorted(ids)  # each exactly once
        syncs = h.syncs(start)
        assert len(syncs) == 2  # two grants of the same work: the second went on where the first stopped
        assert syncs[1][1] - syncs[0][1] >= 1.6  # the second waited for budget, it did not borrow
        assert not [r for r in h.sim.requests if r.status == 429]
