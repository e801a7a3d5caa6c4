"""The resend policy (send.retry): the pure rules, then the worker against the simulator's scripted
outcomes (in-process, on looptime's fake clock), then the daemon killed and restarted between attempts.

The engine harness here is the real thing minus the WebSocket: real REST client, real SQLite store, the
reconcile queue and its timers (an active poll every second finds each outcome), and the
:class:`Resender` with its review hook; every clock is the event loop's, so the backoff waits take no
real time.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_support import started
from ops_support import daemon, run_faxd, write_config
from prometheus_client import CollectorRegistry
from socket_client import SocketClient
from structlog.testing import capture_logs

from faxd.adapters.metrics import Metrics
from faxd.adapters.reconcile import Reconciler, ReconcileSettings, ReconcileWork, timers_forever
from faxd.adapters.resend import Resender
from faxd.adapters.rest import Document, RingCentral
from faxd.adapters.scheduling import RequestDriver
from faxd.adapters.store import Store
from faxd.config import Config
from faxd.core.model import Event, EventKind
from faxd.core.protocol import SendError, encode_event
from faxd.core.resend import RetryPolicy
from faxd.core.scheduler import Priority, Scheduler, SchedulerSettings, ext_key
from faxd.sim import RecipientScript, SimConfig, Simulator, loop_wall_clock

EXT = "200000001"
BUSY = "+16505550111"
DOC = Document("a.txt", "text/plain", b"hello")


# -- the worker, in-process on fake time -------------------------------------------------------------------


@dataclass
class Harness:
    sim: Simulator
    store: Store
    reconciler: Reconciler
    resender: Resender
    registry: CollectorRegistry
    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def of(self, ref: str) -> list[Event]:
        return [e for e in self.events if e.transition.ref == ref]

    async def until(self, done: Callable[[], bool], within: float = 3600) -> None:
        async with asyncio.timeout(within):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    async def final(self, ref: str, within: float = 3600) -> Event:
        """The logical fax's one final fax-level (or resend) event."""

        def ended() -> list[Event]:
            return [
                e
                for e in self.of(ref)
                if e.transition.final and e.transition.kind in (EventKind.STATUS, EventKind.RESEND)
            ]

        await self.until(lambda: bool(ended()), within)
        return ended()[0]

    def messages_to(self, phone: str) -> list[dict[str, Any]]:
        return [
            m for m in self.sim.messages() if any(t.get("phoneNumber") == phone for t in m.get("to") or [])
        ]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@asynccontextmanager
async def harness(
    sim: Simulator, db: Path, policy: RetryPolicy, sent_settle: float = 0.0
) -> AsyncIterator[Harness]:
    """The engine and a :class:`Resender` against ``sim``, on the simulator's (fake) wall clock."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def wall() -> float:
        return CLOCK[0]().timestamp()

    tasks: list[asyncio.Task[Any]] = []
    async with aiohttp.ClientSession() as session:
        cfg = sim.config
        rc = RingCentral(
            session,
            server=sim.url,
            client_id=cfg.client_id,
            client_secret=cfg.client_secret,
            jwt=cfg.jwt,
            metrics=metrics,
        )
        await rc.login()
        store = Store(db)
        store.open()
        settings = ReconcileSettings(
            debounce=0.05, max_delay=0.2, active_poll_interval=1.0, sent_settle=sent_settle
        )
        h: Harness | None = None

        def publish(new: Sequence[Event]) -> None:
            assert h is not None
            h.events.extend(new)
            h.changed.set()

        reconciler = Reconciler(rc, store, metrics, publish, settings, wall=wall)
        resender = Resender(policy, rc, reconciler, metrics, wall=wall)
        h = Harness(sim, store, reconciler, resender, registry)
        sched_settings = SchedulerSettings(
            debounce=0.05, max_delay=0.2, active_poll_interval=settings.active_poll_interval
        )
        sched = Scheduler(rc.budget, sched_settings, poll_cost=lambda key, kind: work.poll_cost(key, kind))
        driver = RequestDriver(sched, metrics)
        work = ReconcileWork(driver, reconciler)
        rc.use_gate(driver)  # the resender's requests are scheduled like the daemon's
        driver.set_extensions([ext_key(EXT)])
        connected = asyncio.Event()
        connected.set()
        tasks.append(asyncio.create_task(driver.run()))
        tasks.append(asyncio.create_task(timers_forever(work)))
        tasks.append(asyncio.create_task(resender.run(connected)))
        work.ask(EXT, Priority.RESYNC, "startup")
        try:
            yield h
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            store.close()


#: The wall clock of the simulator of the running test, which the harness's faxd reads too.
CLOCK: list[Callable[[], datetime]] = []


@asynccontextmanager
async def fake_time_sim() -> AsyncIterator[Simulator]:
    """A simulator whose wall clock (creationTime, ...) moves with the loop's fake time."""
    CLOCK[:] = [loop_wall_clock()]
    async with Simulator(SimConfig(seed=7), wall_clock=CLOCK[0]) as sim:
        yield sim


def _script(outcome: str, code: str | None = None) -> RecipientScript:
    return RecipientScript(BUSY, outcome, code, after=5)


def _sends(sim: Simulator) -> list[float]:
    """Loop times of the POSTs to …/fax (sends and resends) RingCentral answered."""
    return [r.time for r in sim.requests_to("/fax", "POST") if r.status == 200]


@pytest.mark.looptime
async def test_busy_busy_sent_is_one_logical_fax_sent_on_the_third_attempt(tmp_path: Path) -> None:
    policy = RetryPolicy(max_attempts=5, delay=60, backoff=2, max_delay=3600, deadline=3600)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
        first = await h.reconciler.send(
            EXT, to=[BUSY], documents=[DOC], ref="r1", cover_text=None, resolution=None
        )
        # The second attempt was created busy too; the third will be sent.
        await h.until(lambda: any(e.transition.attempt == 2 for e in h.of("r1")))
        sim.set_outcome(BUSY, _script("Sent"))
        final = await h.final("r1")
        assert (final.transition.to_status, final.transition.attempt, final.transition.gave_up) == (
            "Sent",
            3,
            None,
        )
        events = h.of("r1")
        assert {e.transition.attempt for e in events} == {1, 2, 3}
        failures = [e.transition for e in events if e.transition.to_status == "SendingFailed"]
        assert len(failures) == 4  # fax and recipient of attempts 1 and 2
        assert all(not t.final and t.retry_at for t in failures)
        assert [e for e in events if e.transition.final and e.transition.kind is EventKind.STATUS] == [final]
        assert len({e.transition.fax_id for e in events}) == 3
        assert first.fax_id == events[0].transition.fax_id
        sends = _sends(sim)
        assert len(sends) == 3 == len(h.messages_to(BUSY))  # no duplicate resend
        # each attempt waited its backoff after the previous one ended (5 s after it was sent)
        assert sends[1] - sends[0] >= 5 + 60 - 0.5
        assert sends[2] - sends[1] >= 5 + 120 - 0.5
        assert h.metric("faxd_resends_total", result="sent") == 2
        assert h.metric("faxd_resend_gave_up_total", reason="max_attempts") == 0
        # a replay from the store writes what the live events said
        stored = {s.seq: encode_event(s, include_numbers=True) for s in h.store.events_after(0, 1000)}
        assert [stored[e.seq] for e in events] == [encode_event(e, include_numbers=True) for e in events]


@pytest.mark.looptime
async def test_busy_every_time_gives_up_after_max_attempts(tmp_path: Path) -> None:
    policy = RetryPolicy(max_attempts=3, delay=30, backoff=1, max_delay=30, deadline=3600)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
        await h.reconciler.send(EXT, to=[BUSY], documents=[DOC], ref="r2", cover_text=None, resolution=None)
        final = await h.final("r2")
        t = final.transition
        assert (t.to_status, t.attempt, t.gave_up, t.error_category) == (
            "SendingFailed",
            3,
            "max_attempts",
            "busy",
        )
        await asyncio.sleep(600)  # nothing more is sent, however long faxd waits
        assert len(_sends(sim)) == 3 == len(h.messages_to(BUSY))
        finals = [e for e in h.of("r2") if e.transition.final]
        assert {e.transition.attempt for e in finals} == {3}  # attempts 1 and 2 never said final
        assert h.metric("faxd_resend_gave_up_total", reason="max_attempts") == 1
        assert h.metric("faxd_resends_planned") == 0


@pytest.mark.looptime
async def test_the_deadline_ends_the_retries(tmp_path: Path) -> None:
    # Attempt 1 ends at 5 s, attempt 2 starts at 65 s and ends at 70 s; a third would start at
    # 130 s, after the 100 s deadline.
    policy = RetryPolicy(max_attempts=10, delay=60, backoff=1, max_delay=60, deadline=100)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "NoAnswer"))
        await h.reconciler.send(EXT, to=[BUSY], documents=[DOC], ref="r3", cover_text=None, resolution=None)
        final = await h.final("r3")
        assert (final.transition.attempt, final.transition.gave_up) == (2, "deadline")
        assert len(_sends(sim)) == 2
        assert h.metric("faxd_resend_gave_up_total", reason="deadline") == 1


@pytest.mark.looptime
async def test_a_category_not_retried_is_not_resent_nor_is_a_fax_without_ref(tmp_path: Path) -> None:
    policy = RetryPolicy(max_attempts=3, delay=10, deadline=3600)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "InvalidNumber"))
        await h.reconciler.send(EXT, to=[BUSY], documents=[DOC], ref="r4", cover_text=None, resolution=None)
        busy = "+16505550001"  # LineBusy, but sent without a ref: not faxd's logical fax
        anonymous = await h.reconciler.send(
            EXT, to=[busy], documents=[DOC], ref=None, cover_text=None, resolution=None
        )
        final = await h.final("r4")
        assert (final.transition.attempt, final.transition.gave_up, final.transition.error_category) == (
            1,
            None,
            "invalid_number",
        )
        await h.until(
            lambda: any(e.transition.fax_id == anonymous.fax_id and e.transition.final for e in h.events)
        )
        await asyncio.sleep(600)
        assert len(_sends(sim)) == 2
        plain = [e.transition for e in h.events if e.transition.fax_id == anonymous.fax_id]
        assert all(t.attempt is None and t.retry_at is None for t in plain)
        assert h.metric("faxd_resends_total", result="sent") == 0


@pytest.mark.looptime
async def test_a_resend_goes_only_to_the_recipients_that_were_busy(tmp_path: Path) -> None:
    sent, invalid = "+16505550100", "+16505550003"
    policy = RetryPolicy(max_attempts=2, delay=10, deadline=3600)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
        sim.set_outcome(sent, RecipientScript(sent, "Sent", after=2))
        await h.reconciler.send(
            EXT, to=[BUSY, sent, invalid], documents=[DOC], ref="r5", cover_text=None, resolution=None
        )
        await h.until(lambda: h.metric("faxd_resends_planned") == 1)
        sim.set_outcome(BUSY, _script("Sent"))  # the line is free for attempt 2
        final = await h.final("r5")
        assert (final.transition.attempt, final.transition.to_status) == (2, "Sent")
        second = sim.message(final.transition.fax_id)
        assert [t["phoneNumber"] for t in second["to"]] == [BUSY]
        assert len(h.messages_to(sent)) == 1 == len(h.messages_to(invalid))
        first_attempt = {
            e.transition.recipient_phone: e.transition
            for e in h.of("r5")
            if e.transition.attempt == 1 and e.transition.kind is EventKind.RECIPIENT
        }
        assert first_attempt[sent].final
        assert first_attempt[invalid].final
        assert not first_attempt[BUSY].final
        assert first_attempt[BUSY].retry_at


@pytest.mark.looptime
async def test_a_failed_resend_request_is_tried_again_and_a_refused_one_gives_up(tmp_path: Path) -> None:
    policy = RetryPolicy(max_attempts=3, delay=10, deadline=3600)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
        await h.reconciler.send(EXT, to=[BUSY], documents=[DOC], ref="r6", cover_text=None, resolution=None)
        await h.until(lambda: h.metric("faxd_resends_planned") == 1)
        sim.fail_next_requests(1, status=503, match="/fax")
        await h.until(lambda: any(e.transition.attempt == 2 for e in h.of("r6")))
        assert h.metric("faxd_resends_total", result="failed") == 1
        posts = list(sim.requests_to("/fax", "POST"))
        assert [r.status for r in posts] == [200, 503, 200]
        assert posts[2].time - posts[1].time >= 60 - 0.5  # REQUEST_RETRY
        sim.fail_next_requests(1, status=403, match="/fax")
        final = await h.final("r6")
        t = final.transition
        assert (t.kind, t.to_status, t.attempt, t.gave_up, t.from_status) == (
            EventKind.RESEND,
            "GaveUp",
            2,
            "refused",
            "SendingFailed",
        )
        assert h.metric("faxd_resend_gave_up_total", reason="refused") == 1
        assert len(h.messages_to(BUSY)) == 2


@pytest.mark.looptime
async def test_a_resend_cut_short_is_not_repeated_after_a_restart(tmp_path: Path) -> None:
    """A row left ``resending`` (faxd died during the request) may have reached RingCentral: the next
    start does not send it again, and the logical fax ends ``gave_up: interrupted``."""
    policy = RetryPolicy(max_attempts=3, delay=10, deadline=3600)
    async with fake_time_sim() as sim:
        async with harness(sim, tmp_path / "db", policy) as h:
            sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
            await h.reconciler.send(
                EXT, to=[BUSY], documents=[DOC], ref="r7", cover_text=None, resolution=None
            )
            await h.until(lambda: h.metric("faxd_resends_planned") == 1)
            (plan,) = h.resender.book.open_rows("planned")
            sim.delay_next_requests(1, 30)  # the resend request is held 30 s by the simulator ...
            assert plan.retry_at is not None
            await asyncio.sleep(plan.retry_at - CLOCK[0]().timestamp() + 1)  # ... and is out now
            assert [r.fax_id for r in h.resender.book.open_rows("resending")] == [plan.fax_id]
            posts = len(sim.requests_to("/fax", "POST"))
        # the harness is gone (the request cancelled mid-way); a new one on the same store
        async with harness(sim, tmp_path / "db", policy) as h2:
            final = await h2.final("r7")
            await asyncio.sleep(600)
        assert (final.transition.gave_up, final.transition.attempt) == ("interrupted", 1)
        assert len(sim.requests_to("/fax", "POST")) == posts
        assert h2.metric("faxd_resend_gave_up_total", reason="interrupted") == 1


@pytest.mark.looptime
async def test_a_try_due_while_faxd_was_down_past_the_deadline_is_not_made(tmp_path: Path) -> None:
    policy = RetryPolicy(max_attempts=3, delay=60, deadline=120)
    async with fake_time_sim() as sim:
        async with harness(sim, tmp_path / "db", policy) as h:
            sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
            await h.reconciler.send(
                EXT, to=[BUSY], documents=[DOC], ref="r8", cover_text=None, resolution=None
            )
            await h.until(lambda: h.metric("faxd_resends_planned") == 1)
        await asyncio.sleep(300)  # faxd is down: the planned try (at 65 s) and the deadline pass
        async with harness(sim, tmp_path / "db", policy) as h2:
            final = await h2.final("r8")
        t = final.transition
        assert (t.kind, t.to_status, t.attempt, t.gave_up) == (EventKind.RESEND, "GaveUp", 1, "deadline")
        assert len(_sends(sim)) == 1


@pytest.mark.looptime
async def test_a_later_change_to_a_try_that_was_resent_plans_nothing_again(tmp_path: Path) -> None:
    """The decision about a try is made once: the try's message deleted later (a new transition of an
    old try) is reported with its ref and attempt, and resends nothing."""
    policy = RetryPolicy(max_attempts=3, delay=10, deadline=3600)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
        first = await h.reconciler.send(
            EXT, to=[BUSY], documents=[DOC], ref="r9", cover_text=None, resolution=None
        )
        await h.until(lambda: h.metric("faxd_resends_planned") == 1)
        sim.set_outcome(BUSY, _script("Sent"))
        final = await h.final("r9")
        assert final.transition.attempt == 2
        sim.store.delete(sim.store.get(EXT, first.fax_id))  # as if deleted in the RingCentral app
        await h.until(lambda: any(e.transition.kind is EventKind.AVAILABILITY for e in h.of("r9")))
        await asyncio.sleep(600)
        (deleted,) = [e.transition for e in h.of("r9") if e.transition.kind is EventKind.AVAILABILITY]
        assert (deleted.fax_id, deleted.attempt, deleted.to_status) == (first.fax_id, 1, "Deleted")
        assert len(_sends(sim)) == 2
        assert h.metric("faxd_resends_planned") == 0


@pytest.mark.looptime
async def test_a_resend_that_would_wait_for_budget_while_faxd_stops_stays_planned(tmp_path: Path) -> None:
    policy = RetryPolicy(max_attempts=3, delay=60, deadline=3600)
    async with fake_time_sim() as sim:
        async with harness(sim, tmp_path / "db", policy) as h:
            sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
            await h.reconciler.send(
                EXT, to=[BUSY], documents=[DOC], ref="r10", cover_text=None, resolution=None
            )
            await h.until(lambda: h.metric("faxd_resends_planned") == 1)
            sim.rate_limit_storm("Heavy", 1000)  # a 429 with Retry-After 1000: the Heavy budget waits
            with pytest.raises(SendError):
                await h.reconciler.send(
                    EXT, to=["+16505550100"], documents=[DOC], ref=None, cover_text=None, resolution=None
                )
            h.reconciler.rc.stop_waiting()  # what the daemon's stop does
            with capture_logs() as logs:
                await asyncio.sleep(120)  # the resend is due at 65 s
            assert [e["event"] for e in logs if e["event"].startswith("resend.")] == ["resend.deferred"]
            assert [r.fax_id for r in h.resender.book.open_rows("planned")] == [
                h.of("r10")[0].transition.fax_id
            ]
        await asyncio.sleep(1000)  # the storm is over; faxd starts again
        sim.set_outcome(BUSY, _script("Sent"))
        async with harness(sim, tmp_path / "db", policy) as h2:
            final = await h2.final("r10")
        assert (final.transition.attempt, final.transition.to_status) == (2, "Sent")


@pytest.mark.looptime
async def test_with_a_settle_period_the_settled_event_of_the_last_try_is_the_end(tmp_path: Path) -> None:
    """``reconcile.sent_settle``: the last try's ``Sent`` waits to settle; the ``settled`` event (made
    for a fax the batch did not change) carries the ref and the attempt too."""
    policy = RetryPolicy(max_attempts=3, delay=10, deadline=3600)
    async with fake_time_sim() as sim, harness(sim, tmp_path / "db", policy, sent_settle=30) as h:
        sim.set_outcome(BUSY, _script("SendingFailed", "LineBusy"))
        await h.reconciler.send(EXT, to=[BUSY], documents=[DOC], ref="r11", cover_text=None, resolution=None)
        await h.until(lambda: h.metric("faxd_resends_planned") == 1)
        sim.set_outcome(BUSY, _script("Sent"))
        await h.until(lambda: any(e.transition.kind is EventKind.SETTLED for e in h.of("r11")))
        finals = [e.transition for e in h.of("r11") if e.transition.final]
        assert {(t.kind, t.attempt) for t in finals} == {(EventKind.SETTLED, 2)}


# -- the daemon, killed between attempts ---------------------------------------------------------------


async def _events_of(
    client: SocketClient, ref: str, done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while not out or not done(out[-1]):
            message = await client.recv(within=30)
            if message.get("type") == "event" and message.get("ref") == ref:
                out.append(message)
    return out


async def test_a_restart_between_attempts_resumes_the_timer_with_the_right_attempt(
    sim: Simulator, short_dir: Path
) -> None:
    config = write_config(
        short_dir,
        sim,
        send={"retry": {"max_attempts": 4, "delay": "2s", "backoff": 1, "max_delay": "2s", "deadline": "5m"}},
        # Three starts in a minute spend the Auth group's budget (5 a minute) on tokens: the third
        # WebSocket waits for it, so outcomes are found by the active poll.
        reconcile={"debounce": 0.05, "max_delay": 0.5, "active_poll_interval": 1},
    )
    sim.set_outcome(BUSY, RecipientScript(BUSY, "SendingFailed", "LineBusy", after=0.3))
    socket_path = str(short_dir / "events.sock")
    doc = {"name": "a.txt", "content_type": "text/plain", "data": "aGkK"}
    seen: list[dict[str, Any]] = []
    async with daemon(config) as faxd:
        await faxd.wait_event("daemon.started")
        client = await SocketClient.subscribed(socket_path)
        await client.send({"type": "send", "to": [{"phone": BUSY}], "documents": [doc], "ref": "k1", "id": 1})
        seen += await _events_of(
            client, "k1", lambda e: e["kind"] == "status" and e["to_status"] == "SendingFailed"
        )
        await client.close()
        assert (seen[-1]["attempt"], seen[-1]["final"]) == (1, False)
        await faxd.wait_event("resend.planned")
        faxd.signal(signal.SIGKILL)
        await faxd.wait()
    assert len(sim.requests_to("/fax", "POST")) == 1
    async with daemon(config) as faxd:
        await faxd.wait_event("daemon.started")
        client = await SocketClient.subscribed(socket_path, after_seq=seen[-1]["seq"])
        second = await _events_of(client, "k1", lambda e: e["attempt"] == 2 and e["kind"] == "status")
        sim.set_outcome(BUSY, RecipientScript(BUSY, "Sent", after=0.3))
        # attempt 2 was created busy; kill faxd again while attempt 3 waits, then let it finish
        more = await _events_of(
            client,
            "k1",
            lambda e: e["kind"] == "status" and e["to_status"] == "SendingFailed" and e["attempt"] == 2,
        )
        await client.close()
        assert (more[-1]["final"], more[-1]["retry_at"] is not None) == (False, True)
        await faxd.wait_event("resend.planned")
        faxd.signal(signal.SIGKILL)
        await faxd.wait()
    async with daemon(config) as faxd:
        await faxd.wait_event("daemon.started")
        client = await SocketClient.subscribed(socket_path, after_seq=more[-1]["seq"])
        last = await _events_of(client, "k1", lambda e: e["final"] and e["kind"] == "status")
        await client.close()
        assert await faxd.stop() == 0
    assert [e["attempt"] for e in seen + second + more + last] == sorted(
        e["attempt"] for e in seen + second + more + last
    )
    assert (last[-1]["to_status"], last[-1]["attempt"], last[-1]["gave_up"]) == ("Sent", 3, None)
    messages = [m for m in sim.messages() if m["direction"] == "Outbound"]
    assert len(messages) == 3  # one per attempt: nothing resent twice across the restarts
    assert all(m["to"][0]["phoneNumber"] == BUSY for m in messages)


async def test_send_wait_follows_the_tries_of_a_logical_fax(
    sim: Simulator, make_config: Callable[..., Config], short_dir: Path
) -> None:
    """``faxd send --wait --ref`` does not stop at a failure faxd resends: it follows the next try,
    and its verdict is each recipient's last outcome (0: the busy one got it on try 2)."""
    sent = "+16505550100"
    config = make_config(sim, send={"retry": {"max_attempts": 3, "delay": "1s", "deadline": "5m"}})
    sim.set_outcome(BUSY, RecipientScript(BUSY, "SendingFailed", "LineBusy", after=0.3))
    sim.set_outcome(sent, RecipientScript(sent, "Sent", after=0.1))
    doc = short_dir / "a.txt"
    doc.write_text("hello")
    async with started(config) as faxd:
        watcher = await SocketClient.subscribed(faxd.socket)
        cli = asyncio.create_task(
            run_faxd(
                "send", "--socket", faxd.socket, "--to", BUSY, "--to", sent, "--ref", "w1", "--wait", str(doc)
            )
        )
        await _events_of(watcher, "w1", lambda e: e["kind"] == "status" and e.get("retry_at") is not None)
        sim.set_outcome(BUSY, RecipientScript(BUSY, "Sent", after=0.3))
        code, _out, err = await cli
        await watcher.close()
    assert code == 0, err
    tries = [line for line in err.splitlines() if "ref=w1" in line]
    assert any("attempt 1" in line and "retry at" in line for line in tries), err
    assert any("attempt 2" in line and "→ Sent" in line and "final" in line for line in tries), err
    assert len([m for m in sim.messages() if m["direction"] == "Outbound"]) == 2
