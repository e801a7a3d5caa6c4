"""The reconcile engine against the simulator over real sockets.

Two ways in: the whole daemon in-process (push hints over the WSG WebSocket, events on the socket) for
what depends on notifications, and a harness of the engine alone (real REST client, real SQLite store,
the request scheduler's driver and the timers, no WebSocket: hints come from the test) for the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from socket_client import SocketClient
from structlog.testing import capture_logs

from faxd import daemon
from faxd.adapters.metrics import Metrics
from faxd.adapters.reconcile import Reconciler, ReconcileSettings, ReconcileWork, timers_forever
from faxd.adapters.rest import RingCentral
from faxd.adapters.scheduling import RequestDriver
from faxd.adapters.store import Store
from faxd.config import Config
from faxd.core.model import FAX_LEVEL, Event, EventKind, event_key
from faxd.core.scheduler import Priority, Scheduler, SchedulerSettings, ext_key
from faxd.core.status import parse_time
from faxd.sim import RecipientScript, RecordedRequest, SimConfig, Simulator
from faxd.sim.observe import ServedJson

EXT = "200000001"
Key = tuple[str, int, str, str]  # (fax, recipient or FAX_LEVEL, kind, to_status): a dedup key


def truth(sim: Simulator, ids: Sequence[str] | None = None) -> set[Key]:
    """The final (fax, recipient) statuses the simulator holds now, as event keys."""
    out: set[Key] = set()
    for m in sim.messages():
        if ids is not None and str(m["id"]) not in ids:
            continue
        out.add((str(m["id"]), FAX_LEVEL, "status", m["messageStatus"]))
        for i, r in enumerate(m.get("to") or [] if m["direction"] == "Outbound" else []):
            out.add((str(m["id"]), i, "recipient", r["messageStatus"]))
    return out


def all_final(sim: Simulator, ids: Sequence[str]) -> Callable[[], bool]:
    def check() -> bool:
        return all(sim.message(i)["messageStatus"] not in ("Queued",) for i in ids)

    return check


# -- the daemon in-process, observed by a socket client ------------------------------------------


@dataclass
class Watcher:
    """The events of a socket client subscribed from seq 0, read as they arrive."""

    client: SocketClient
    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for message in self.client.messages():
            if message["type"] == "event":
                async with self.arrived:
                    self.events.append(message)
                    self.arrived.notify_all()

    def keys(self) -> set[Key]:
        return {event_key(e) for e in self.events}

    async def until(self, wanted: set[Key], within: float = 20) -> None:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: wanted <= self.keys())


@asynccontextmanager
async def running(sim: Simulator, config: Config) -> AsyncIterator[tuple[Watcher, CollectorRegistry]]:
    registry = CollectorRegistry()
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(config, registry=registry, stop=stop, on_ready=ready.set))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    assert ready.is_set(), "daemon did not start"
    watcher = Watcher(await SocketClient.subscribed(config.events.socket))
    watcher.task = asyncio.create_task(watcher._read())
    try:
        yield watcher, registry
    finally:
        stop.set()
        async with asyncio.timeout(20):
            assert await task == 0
        watcher.task.cancel()
        await watcher.client.close()


def no_duplicates(events: Sequence[dict[str, Any]]) -> None:
    keys = [event_key(e) for e in events]
    assert len(keys) == len(set(keys)), "a transition was journalled twice"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))


async def ws_subscribed(sim: Simulator) -> None:
    """Until the daemon's WSG subscription exists."""
    async with asyncio.timeout(10):
        await sim.wait_for(lambda: any(s.subscription is not None for s in sim.gateway.sessions.values()))


async def test_a_burst_of_hints_coalesces_into_few_message_syncs(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    config = make_config(sim, reconcile={"debounce": 0.3, "max_delay": 1.0})
    async with running(sim, config) as (watcher, registry):
        await ws_subscribed(sim)
        # 20 faxes created outside faxd, each finishing in its own notification, 20 ms apart.
        ids = [
            sim.create_outbound_fax(None, [RecipientScript(f"+1650555{i:04d}", "Sent", after=1.0 + i * 0.02)])
            for i in range(20)
        ]
        before = len(sim.requests_to("/message-sync"))
        first = sim.message(ids[0])
        await watcher.until(truth_after(sim, ids))
        syncs = len(sim.requests_to("/message-sync")) - before
        hints = registry.get_sample_value("faxd_ws_hints_total")
    assert first["messageStatus"] == "Queued"
    assert hints is not None
    assert hints >= 20
    assert syncs <= 6, f"{syncs} message-syncs for {hints} hints"
    outside = [e for e in watcher.events if e["fax_id"] in ids]
    assert all(e["ref"] is None and e["direction"] == "Outbound" for e in outside)
    assert {e["source"] for e in outside if e["final"]} == {"push"}
    no_duplicates(watcher.events)


def truth_after(sim: Simulator, ids: Sequence[str]) -> set[Key]:
    """The final keys of ``ids`` as their scripts will end (Sent for every recipient here)."""
    return {(i, FAX_LEVEL, "status", "Sent") for i in ids} | {(i, 0, "recipient", "Sent") for i in ids}


async def full_sync_follows_msg_333(sim: Simulator, registry: CollectorRegistry) -> None:
    """Until the message-sync that follows the first MSG-333, which must be an FSync of the same
    reconcile: no reconcile failed (a failure would be retried after a backoff), and it came at once or,
    when the grant had reserved only the ISync and the Light bucket was empty, as the same work's
    next grant (deferred, not failed: within one refill interval, 1.7 s at the default share)."""

    def after_stale() -> list[RecordedRequest] | None:
        syncs = sim.requests_to("/message-sync")
        stale = next((i for i, r in enumerate(syncs) if r.status == 400), None)
        return None if stale is None or len(syncs) <= stale + 1 else syncs[stale:]

    async with asyncio.timeout(20):
        await sim.wait_for(lambda: after_stale() is not None)
    stale, following = after_stale() or []
    assert "syncType=FSync" in following.raw_path, f"after MSG-333 came {following.raw_path}"
    assert following.time - stale.time < 2.0, "the FSync came from a retry, not from the same reconcile"
    errors = [
        s.value
        for family in registry.collect()
        if family.name == "faxd_reconciles"
        for s in family.samples
        if s.labels.get("result") == "error"
    ]
    assert sum(errors) == 0


async def test_msg_333_runs_a_full_sync_and_repeats_nothing(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    async with running(sim, make_config(sim)) as (watcher, registry):
        await ws_subscribed(sim)
        first = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.2)])
        await watcher.until(truth_after(sim, [first]))
        assert sim.stale_sync_tokens() >= 1
        second = sim.create_outbound_fax(
            None, [RecipientScript("+16505550101", "SendingFailed", "LineBusy", after=0.3)]
        )
        await full_sync_follows_msg_333(sim, registry)
        await watcher.until({(second, 0, "recipient", "SendingFailed")})
    no_duplicates(watcher.events)


async def test_with_notifications_lost_polls_alone_find_every_change(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    config = make_config(sim, reconcile={"poll_interval": 1.0, "active_poll_interval": 0.3})
    async with running(sim, config) as (watcher, registry):
        await ws_subscribed(sim)
        sim.pause_notifications()
        ids = [
            sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.4)]),
            sim.create_outbound_fax(
                None,
                [
                    RecipientScript("+16505550101", "Sent", after=0.5, delivered_after=0.3),
                    RecipientScript("+16505550102", "SendingFailed", "NoAnswer", after=0.6),
                ],
            ),
            sim.create_inbound_fax(None, "+14155550123"),
        ]
        await sim.wait_for(lambda: sim.message(ids[1])["to"][0]["messageStatus"] == "Delivered")
        await watcher.until(truth(sim, ids))
        missed = registry.get_sample_value("faxd_missed_by_push_total")
    # The first sight may come from the resync that follows the subscription; every later change
    # (the faxes finish after it) can only have been found by a poll.
    mine = [e for e in watcher.events if e["fax_id"] in ids and e["to_status"] not in ("Queued", "Received")]
    assert {e["source"] for e in mine} == {"poll"}
    assert missed is not None
    assert missed >= len([e for e in mine if e["kind"] in ("status", "recipient")])
    no_duplicates(watcher.events)


async def test_multi_recipient_mixed_outcomes(sim: Simulator, make_config: Callable[..., Config]) -> None:
    async with running(sim, make_config(sim)) as (watcher, _registry):
        await ws_subscribed(sim)
        fid = sim.create_outbound_fax(
            None,
            [
                RecipientScript("+16505550100", "Sent", after=0.3),
                RecipientScript("+16505550101", "SendingFailed", "NoAnswer", after=0.5),
                # Delivered well after Sent: a push reconcile may wait for the paced Light budget
                # (one token every 1.7 s once start-up has spent the burst).
                RecipientScript("+16505550102", "Sent", after=0.4, delivered_after=4.0),
            ],
        )
        await sim.wait_for(lambda: sim.message(fid)["to"][2]["messageStatus"] == "Delivered")
        await watcher.until(truth(sim, [fid]))
    finals = {event_key(e)[1]: e for e in watcher.events if e["fax_id"] == fid and e["final"]}
    assert finals[0]["to_status"] == "Sent"
    assert (finals[1]["to_status"], finals[1]["error_category"], finals[1]["retryable"]) == (
        "SendingFailed",
        "no_answer",
        True,
    )
    assert finals[FAX_LEVEL]["to_status"] == "SendingFailed"
    delivered = [
        e for e in watcher.events if e["fax_id"] == fid and e["recipient"] and e["recipient"]["index"] == 2
    ]
    assert [e["to_status"] for e in delivered] == ["Sent", "Delivered"]
    no_duplicates(watcher.events)


async def test_a_429_storm_pauses_the_group_then_converges(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    async with running(sim, make_config(sim)) as (watcher, registry):
        await ws_subscribed(sim)
        await sim.wait_for(lambda: len(sim.requests_to("/message-sync")) >= 1)
        sim.rate_limit_storm("Light", 2.0)
        fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.2)])
        await watcher.until(truth_after(sim, [fid]))
        limited = registry.get_sample_value("faxd_rate_limited_total", {"group": "Light"})
        remaining = registry.get_sample_value("faxd_rate_limit_remaining", {"group": "Light"})
    refused = [r for r in sim.requests if r.group == "Light" and r.status == 429]
    assert len(refused) == 1
    assert limited == 1.0
    t429 = refused[0].time
    during = [r for r in sim.requests if r.group == "Light" and t429 < r.time < t429 + 2.0 - 0.05]
    assert during == [], "requests were sent during the penalty"
    assert remaining is not None
    assert remaining > 0
    no_duplicates(watcher.events)


async def test_with_the_fax_state_lost_only_the_journal_keeps_each_transition_once(
    make_config: Callable[..., Config],
) -> None:
    """The reconciler's memory and the stored fax rows and sync tokens are gone, the journal is not (a
    state table restored from an older copy, say). The restart's FSync reads every fax as never seen,
    the diff gives back transitions the journal already holds, and the store's dedup of (fax, recipient,
    kind, to_status) is all that stands between them and a second event with a new seq."""
    # Two starts log in and open a WebSocket twice: more Auth requests than faxd's share of 5 a minute.
    limits = {**SimConfig().rate_limits, "Auth": (50, 60, 60)}
    async with Simulator(SimConfig(seed=7, rate_limits=limits)) as sim:
        await _lose_the_state_and_restart(sim, make_config(sim))


async def _lose_the_state_and_restart(sim: Simulator, config: Config) -> None:
    async with running(sim, config) as (watcher, _):
        await ws_subscribed(sim)
        ids = [
            sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.1)]),
            sim.create_outbound_fax(
                None, [RecipientScript("+16505550101", "SendingFailed", "LineBusy", after=0.15)]
            ),
            sim.create_outbound_fax(
                None,
                [
                    RecipientScript("+16505550102", "Sent", after=0.1, delivered_after=0.1),
                    RecipientScript("+16505550103", "Sent", after=0.2),
                ],
            ),
        ]
        await sim.wait_for(lambda: sim.message(ids[2])["to"][0]["messageStatus"] == "Delivered")
        await watcher.until(truth(sim, ids))
        before = [event_key(e) for e in watcher.events]
    with sqlite3.connect(config.store.path) as db:
        lost = db.execute("SELECT count(*) FROM faxes").fetchone()[0]
        db.execute("DELETE FROM recipients")
        db.execute("DELETE FROM faxes")
        db.execute("DELETE FROM sync_tokens")
    assert lost == len(ids)
    async with running(sim, config) as (watcher, _):
        await ws_subscribed(sim)
        # The marker is found by a reconcile that comes after the start-up FSync (or is that FSync),
        # so once it arrives every repeat the FSync could have journalled has been published.
        marker = sim.create_outbound_fax(None, [RecipientScript("+16505550104", "Sent", after=0.1)])
        await watcher.until(truth_after(sim, [marker]))
    assert [event_key(e) for e in watcher.events if e["fax_id"] != marker] == before
    no_duplicates(watcher.events)


async def test_a_429_holds_back_every_flow_of_the_group_not_only_the_one_refused(
    make_config: Callable[..., Config],
) -> None:
    """Two extensions need Light requests during a 429 storm. The refused reconcile's own retry waits
    out Retry-After anyway (its backoff); the other extension's reconcile comes next and must wait
    for the group's penalty too, or it walks into the storm (at RingCentral, every request during a
    penalty restarts it)."""
    second = "200000002"
    async with Simulator(SimConfig(seed=7, extensions=(EXT, second))) as sim:
        config = make_config(sim, ringcentral={"extensions": ["~", second]})
        async with running(sim, config) as (watcher, registry):
            await ws_subscribed(sim)
            await sim.wait_for(lambda: len(sim.requests_to("/message-sync")) >= 2)  # both started up
            sim.rate_limit_storm("Light", 2.0)
            ids = [
                sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.2)]),
                sim.create_outbound_fax(second, [RecipientScript("+16505550101", "Sent", after=0.2)]),
            ]
            await watcher.until(truth_after(sim, ids))
            limited = registry.get_sample_value("faxd_rate_limited_total", {"group": "Light"})
    refused = [r for r in sim.requests if r.group == "Light" and r.status == 429]
    assert len(refused) == 1, [(r.path, round(r.time - refused[0].time, 2)) for r in refused]
    assert limited == 1.0
    t429 = refused[0].time
    during = [r.path for r in sim.requests if r.group == "Light" and t429 < r.time < t429 + 2.0 - 0.05]
    assert during == [], "requests were sent during the penalty"
    no_duplicates(watcher.events)


# -- the engine alone ----------------------------------------------------------------------------


@dataclass
class Engine:
    rc: RingCentral
    store: Store
    reconciler: Reconciler
    driver: RequestDriver
    work: ReconcileWork
    registry: CollectorRegistry
    events: list[Event]
    changed: asyncio.Condition

    def keys(self) -> set[Key]:
        return {e.transition.dedup_key for e in self.events}

    async def until(self, wanted: set[Key], within: float = 20) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: wanted <= self.keys())

    def hint(self, reason: str) -> None:
        """Ask for a reconcile of EXT as the daemon would for ``reason``."""
        self.work.ask(EXT, PRIORITY[reason], reason)

    async def idle(self) -> None:
        """Until EXT is neither pending nor running."""
        await self.driver.settled([ext_key(EXT)])

    async def reconcile(self, *reasons: str) -> None:
        for reason in reasons:
            self.hint(reason)
        async with asyncio.timeout(20):
            await self.idle()


PRIORITY = {
    "push": Priority.PUSH,
    "startup": Priority.RESYNC,
    "resync": Priority.RESYNC,
    "request": Priority.USER,
    "settle": Priority.SETTLE,
    "poll": Priority.ACTIVE_POLL,
}


@asynccontextmanager
async def engine(
    sim: Simulator,
    db: Path,
    *,
    backoff: float = 2.0,
    wall: Callable[[], float] | None = None,
    **settings: Any,
) -> AsyncIterator[Engine]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    events: list[Event] = []
    changed = asyncio.Condition()

    def publish(new: Sequence[Event]) -> None:
        events.extend(new)

        async def notify() -> None:
            async with changed:
                changed.notify_all()

        tasks.append(asyncio.create_task(notify()))

    tasks: list[asyncio.Task[Any]] = []
    cfg = sim.config
    async with aiohttp.ClientSession() as session:
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
        s = ReconcileSettings(**{"debounce": 0.05, "max_delay": 0.2, **settings})
        reconciler = Reconciler(rc, store, metrics, publish, s, **({"wall": wall} if wall else {}))
        sched_settings = SchedulerSettings(
            debounce=s.debounce,
            max_delay=s.max_delay,
            poll_interval=s.poll_interval,
            active_poll_interval=s.active_poll_interval,
            backoff_base=backoff,
            backoff_cap=5.0,
            retry_after_cap=s.missing_extension_retry,
        )
        sched = Scheduler(rc.budget, sched_settings, poll_cost=lambda key, kind: work.poll_cost(key, kind))
        driver = RequestDriver(sched, metrics)
        work = ReconcileWork(driver, reconciler)
        rc.use_gate(driver)
        driver.set_extensions([ext_key(EXT)])
        tasks.append(asyncio.create_task(driver.run()))
        tasks.append(asyncio.create_task(timers_forever(work)))
        try:
            yield Engine(rc, store, reconciler, driver, work, registry, events, changed)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            store.close()


async def test_errors_back_off_then_converge_and_success_resets_the_backoff(
    sim: Simulator, tmp_path: Path
) -> None:
    async with engine(sim, tmp_path / "db", backoff=0.2) as e:
        await e.reconcile("startup")
        fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.1)])
        await sim.wait_for_status(fid, "Sent")
        start = len(sim.requests)
        sim.fail_next_requests(3)
        e.hint("push")
        await e.until(truth_after(sim, [fid]))
        served = [r for r in sim.requests[start:] if r.path.endswith("/message-sync")]
        assert [r.status for r in served] == [503, 503, 503, 200]
        gaps = [b.time - a.time for a, b in itertools.pairwise(served)]
        assert gaps[0] >= 0.2 - 0.01
        assert gaps[1] >= 0.4 - 0.01
        assert gaps[2] >= 0.8 - 0.01
        assert e.driver.sched.failures(ext_key(EXT)) == 0
        assert (
            e.registry.get_sample_value("faxd_reconciles_total", {"trigger": "push", "result": "error"})
            == 1.0
        )


async def test_full_sync_frame_too_small_is_widened(sim: Simulator, tmp_path: Path) -> None:
    ids = [
        sim.create_outbound_fax(None, [RecipientScript(f"+165055501{i:02d}", "Sent", after=0.05)])
        for i in range(5)
    ]
    await sim.wait_for(all_final(sim, ids))
    async with engine(sim, tmp_path / "db", fsync_record_count=2) as e:
        await e.reconcile("startup")
        assert truth(sim, ids) <= e.keys()
        fsyncs = [r for r in sim.requests_to("/message-sync") if "FSync" in r.raw_path]
        assert len(fsyncs) == 2
        assert "recordCount=8" in fsyncs[1].raw_path


async def test_deleted_and_vanished_faxes_become_availability_events(sim: Simulator, tmp_path: Path) -> None:
    async with engine(sim, tmp_path / "db") as e:
        done = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.05)])
        gone = sim.create_outbound_fax(None, [RecipientScript("+16505550101", "Sent", after=60)])
        await sim.wait_for_status(done, "Sent")
        await e.reconcile("startup")
        sim.store.delete(sim.store.messages[int(done)])  # ISync: id + availability only
        del sim.store.messages[int(gone)]  # metadata gone: the bulk GET answers 404
        await e.reconcile("poll")
        await e.until(
            {(done, FAX_LEVEL, "availability", "Deleted"), (gone, FAX_LEVEL, "availability", "Purged")}
        )
        assert e.reconciler.in_flight() == []
        await e.reconcile("poll")  # nothing new: idempotent
        keys = [(x.transition.dedup_key) for x in e.events]
        assert len(keys) == len(set(keys))


async def test_in_flight_faxes_are_tracked_across_a_restart(sim: Simulator, tmp_path: Path) -> None:
    db = tmp_path / "db"
    async with engine(sim, db) as e:
        fid = sim.create_outbound_fax(
            None, [RecipientScript("+16505550100", "SendingFailed", "LineBusy", after=0.5)]
        )
        await e.reconcile("startup")
        assert [f.fax_id for f in e.reconciler.in_flight()] == [fid]
        first = list(e.events)
    await sim.wait_for_status(fid, "SendingFailed")
    sim.stale_sync_tokens()  # even the token is lost: FSync, then the tracked fax by id
    async with engine(sim, db) as e:
        assert [f.fax_id for f in e.reconciler.in_flight()] == [fid]
        e.hint("startup")
        await full_sync_follows_msg_333(sim, e.registry)
        await e.until({(fid, 0, "recipient", "SendingFailed")})
        assert all(x.seq > first[-1].seq for x in e.events)
        assert not {x.transition.dedup_key for x in e.events} & {x.transition.dedup_key for x in first}


async def test_sent_settles_only_after_holding_and_delivered_needs_no_settling(
    sim: Simulator, tmp_path: Path
) -> None:
    async with engine(sim, tmp_path / "db", sent_settle=0.6) as e:
        await e.reconcile("startup")
        plain = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.1)])
        moving = sim.create_outbound_fax(
            None, [RecipientScript("+16505550104", "Sent", after=0.1, delivered_after=0.2)]
        )
        await sim.wait_for(lambda: sim.message(plain)["messageStatus"] == "Sent")
        e.hint("push")
        await e.until({(plain, FAX_LEVEL, "settled", "Sent"), (plain, 0, "settled", "Sent")})
        await sim.wait_for_status(moving, "Delivered")
        e.hint("push")
        await e.until({(moving, 0, "recipient", "Delivered")})
        sent = {
            (x.transition.fax_id, x.transition.recipient_index): x
            for x in e.events
            if x.transition.to_status == "Sent"
            and x.transition.kind in (EventKind.STATUS, EventKind.RECIPIENT)
        }
        assert not sent[(plain, None)].transition.final
        assert not sent[(plain, 0)].transition.final
        settled = [x for x in e.events if x.transition.kind is EventKind.SETTLED]
        assert {(x.transition.fax_id, x.transition.recipient_index) for x in settled} == {
            (plain, None),
            (plain, 0),
        }
        for x in settled:
            since = sent[(x.transition.fax_id, x.transition.recipient_index)].observed_at
            assert x.transition.final
            assert parse_time(x.observed_at) - parse_time(since) >= 0.6 - 0.01  # type: ignore[operator]


async def test_when_the_budget_is_spent_work_waits_and_nothing_is_refused(tmp_path: Path) -> None:
    limits = {"Light": (5, 2, 2), "Medium": (40, 60, 60), "Heavy": (10, 60, 60), "Auth": (50, 60, 60)}
    async with Simulator(SimConfig(seed=3, rate_limits=limits)) as sim, engine(sim, tmp_path / "db") as e:
        await e.reconcile("startup")  # learns Light 5 per 2 s: faxd may send 4
        ids = []
        for i in range(10):
            ids.append(
                sim.create_outbound_fax(None, [RecipientScript(f"+165055502{i:02d}", "Sent", after=0.01)])
            )
            await sim.wait_for(all_final(sim, ids))
            await e.reconcile("request")
        await e.until(truth(sim, ids))
        light = [r for r in sim.requests if r.group == "Light"]
        assert all(r.status != 429 for r in light)
        for r in light:  # never more than 4 in any 2 s window
            assert len([x for x in light if r.time <= x.time < r.time + 2.0]) <= 4


async def test_hints_during_a_reconcile_cause_exactly_one_more(sim: Simulator, tmp_path: Path) -> None:
    async with engine(sim, tmp_path / "db") as e:
        await e.reconcile("startup")
        fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.05)])
        await sim.wait_for_status(fid, "Sent")
        before = len(sim.requests_to("/message-sync"))
        started = asyncio.Event()
        reconcile = e.reconciler.reconcile

        async def observed(
            key: str, reasons: set[str], *, check: bool | None = None, retry: bool = False
        ) -> None:
            started.set()
            await reconcile(key, reasons, check=check, retry=retry)

        e.reconciler.reconcile = observed  # type: ignore[method-assign]
        e.hint("push")
        await started.wait()
        assert e.driver.sched.is_running(ext_key(EXT))
        for reason in ("push", "push", "poll", "push", "push"):
            e.hint(reason)
        async with asyncio.timeout(10):
            await e.idle()
        assert len(sim.requests_to("/message-sync")) - before == 2
        await e.until(truth(sim, [fid]))


# -- memory holds only what can still change; the rest is read from the store on demand -----------


async def test_a_fax_finished_long_ago_is_read_from_the_store_when_it_changes(
    sim: Simulator, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.05)])
    await sim.wait_for_status(fid, "Sent")
    async with engine(sim, db) as e:
        await e.reconcile("startup")
        await e.until(truth_after(sim, [fid]))
        assert fid not in e.reconciler.faxes  # final: dropped from memory once committed
        first = list(e.events)
    async with engine(sim, db) as e:
        assert e.reconciler.faxes == {}  # nothing in flight: nothing loaded at start-up
        assert e.reconciler.fax(fid) is not None  # but readable on demand
        # ISync returns the deleted fax as id + availability only: only a known fax can use it.
        sim.store.delete(sim.store.messages[int(fid)])
        await e.reconcile("push")
        await e.until({(fid, FAX_LEVEL, "availability", "Deleted")})
        await e.reconcile("push", "poll")  # nothing new: idempotent
        assert [(x.transition.kind, x.transition.from_status, x.transition.to_status) for x in e.events] == [
            (EventKind.AVAILABILITY, "Alive", "Deleted")
        ]
        assert all(x.seq > first[-1].seq for x in e.events)
        assert e.reconciler.faxes == {}


async def test_a_late_move_of_a_fax_not_in_memory_has_the_right_from_status(
    sim: Simulator, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    fid = sim.create_outbound_fax(
        None, [RecipientScript("+16505550100", "Sent", after=0.05, delivered_after=1.0)]
    )
    await sim.wait_for_status(fid, "Sent")
    async with engine(sim, db) as e:
        await e.reconcile("startup")
        await e.until(truth_after(sim, [fid]))
        first = {x.transition.dedup_key for x in e.events}
    assert sim.message(fid)["to"][0]["messageStatus"] == "Sent", "delivered too early for this test"
    async with engine(sim, db) as e:
        assert e.reconciler.faxes == {}
        await sim.wait_for(lambda: sim.message(fid)["to"][0]["messageStatus"] == "Delivered")
        e.hint("push")
        await e.until({(fid, 0, "recipient", "Delivered"), (fid, FAX_LEVEL, "status", "Delivered")})
        await e.reconcile("startup")  # FSync returns the fax again: nothing repeated
        moves = {
            (x.transition.recipient_index, x.transition.from_status, x.transition.to_status) for x in e.events
        }
        assert len(e.events) == 2
        assert moves == {(None, "Sent", "Delivered"), (0, "Sent", "Delivered")}
        assert not {x.transition.dedup_key for x in e.events} & first


async def test_only_in_flight_faxes_are_held_and_the_index_follows_them(
    sim: Simulator, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    done = [
        sim.create_outbound_fax(None, [RecipientScript(f"+165055503{i:02d}", "Sent", after=0.05)])
        for i in range(5)
    ]
    slow = sim.create_outbound_fax(None, [RecipientScript("+16505550399", "Sent", after=0.6)])
    await sim.wait_for(all_final(sim, done))
    async with engine(sim, db) as e:
        await e.reconcile("startup")
        assert set(e.reconciler.faxes) == {slow}
        assert [f.fax_id for f in e.reconciler.tracked(EXT)] == [slow]
        assert e.reconciler.active_extensions() == [EXT]
        assert e.reconciler.in_flight_count() == 1
        assert e.registry.get_sample_value("faxd_faxes_in_flight") == 1.0
        await sim.wait_for_status(slow, "Sent")
        e.hint("push")
        await e.until(truth_after(sim, [slow]))
        assert e.reconciler.faxes == {}
        assert e.reconciler.active_extensions() == []
        assert e.registry.get_sample_value("faxd_faxes_in_flight") == 0.0
        assert {f.fax_id for f in e.store.recent_faxes(10)} == {*done, slow}


async def test_sent_waiting_to_settle_is_held_across_a_restart_and_dropped_once_settled(
    sim: Simulator, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.05)])
    await sim.wait_for_status(fid, "Sent")
    async with engine(sim, db, sent_settle=3600) as e:
        await e.reconcile("startup")
        await e.until({(fid, FAX_LEVEL, "status", "Sent")})
        assert set(e.reconciler.faxes) == {fid}  # final status, but waiting to settle
    async with engine(sim, db, sent_settle=0.3) as e:
        assert set(e.reconciler.faxes) == {fid}  # re-armed from the journal
        assert e.reconciler.in_flight() == []
        assert e.reconciler.next_settle() is not None
        await e.until({(fid, FAX_LEVEL, "settled", "Sent"), (fid, 0, "settled", "Sent")})
        assert e.reconciler.faxes == {}
        assert e.reconciler.next_settle() is None


async def test_with_sent_settle_0_start_up_does_not_scan_the_journal(sim: Simulator, tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.open()

    def scan() -> list[Any]:
        raise AssertionError("unsettled_sent() read the journal with sent_settle 0")

    store.unsettled_sent = scan  # type: ignore[method-assign]
    try:
        metrics = Metrics(CollectorRegistry())
        Reconciler(None, store, metrics, lambda _: None, ReconcileSettings())  # type: ignore[arg-type]
    finally:
        store.close()


async def test_status_history_and_list_of_an_old_fax_over_the_socket_after_a_restart(
    sim: Simulator, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(sim)
    async with running(sim, config) as (watcher, _):
        await ws_subscribed(sim)
        sent = await ask(
            config,
            {
                "type": "send",
                "to": [{"phone": "+16505550100"}],
                "documents": [{"name": "a.txt", "content_type": "text/plain", "data": "aGkK"}],
                "ref": "old-1",
            },
        )
        assert sent["type"] == "accepted", sent
        fid = sent["fax_id"]
        await watcher.until({(fid, FAX_LEVEL, "status", "Sent"), (fid, 0, "recipient", "Sent")})
        seqs = [e["seq"] for e in watcher.events if e["fax_id"] == fid]
        newer = sim.create_outbound_fax(None, [RecipientScript("+16505550101", "Sent", after=0.05)])
        await watcher.until(truth_after(sim, [newer]))
    async with running(sim, config):  # a new daemon: the fax is final, so it is not in memory
        by_id = await ask(config, {"type": "status", "fax_id": fid})
        by_ref = await ask(config, {"type": "status", "ref": "old-1"})
        history = await ask(config, {"type": "history", "fax_id": fid})
        everything = await ask(config, {"type": "list", "active_only": False})
        monkeypatch.setattr(daemon._Backend, "list_all_limit", 1)
        newest = await ask(config, {"type": "list", "active_only": False})
        active = await ask(config, {"type": "list", "active_only": True})
        unknown = await ask(config, {"type": "status", "fax_id": "404404"})
    assert by_id["type"] == "fax", by_id
    assert (by_id["fax"]["status"], by_id["fax"]["ref"], by_id["fax"]["in_flight"]) == (
        "Sent",
        "old-1",
        False,
    )
    assert by_ref["fax"] == by_id["fax"]
    assert [e["seq"] for e in history["events"]] == seqs
    assert [f["fax_id"] for f in everything["faxes"]] == [newer, fid]  # newest first
    assert [f["fax_id"] for f in newest["faxes"]] == [newer]  # bounded by list_all_limit
    assert active["faxes"] == []
    assert (unknown["type"], unknown["code"]) == ("error", "not_found")


async def ask(config: Config, request: dict[str, Any]) -> dict[str, Any]:
    """One request on a connection of its own; the reply (events and heartbeats are skipped)."""
    client = await SocketClient.connect(config.events.socket)
    try:
        await client.send({**request, "id": "q"})
        return await client.until(lambda m: m.get("id") == "q", within=20)
    finally:
        await client.close()


async def test_a_clients_sync_returns_once_every_extension_was_checked_even_under_poll_load(
    make_config: Callable[..., Config],
) -> None:
    """``sync`` is USER work for every extension: the reply comes after a check of each that began
    after the request, although polls of two extensions every second (more than the paced Light
    share) keep them pending for good: "nothing pending" would never come."""
    second = "200000002"
    async with Simulator(SimConfig(seed=8, extensions=(EXT, second))) as sim:
        reconcile = {"poll_interval": 1, "active_poll_interval": 1}
        config = make_config(sim, ringcentral={"extensions": ["~", second]}, reconcile=reconcile)
        async with running(sim, config):
            await ws_subscribed(sim)
            sim.pause_notifications()  # only a check can find it
            fid = sim.create_outbound_fax(second, [RecipientScript("+16505550100", "Sent", after=0.1)])
            await sim.wait_for_status(fid, "Sent")
            asked = asyncio.get_running_loop().time()
            reply = await ask(config, {"type": "sync"})
            assert reply["type"] == "ok"
            status = await ask(config, {"type": "status", "fax_id": fid})
            assert status["fax"]["status"] == "Sent", status  # known once sync has returned
            checked = [
                r for r in sim.requests_to("/message-sync") if r.time >= asked and f"/{second}/" in r.raw_path
            ]
            assert checked, "no sync of the extension after the request"


async def test_a_stall_is_found_by_a_poll_once_not_by_every_push(sim: Simulator, tmp_path: Path) -> None:
    async with engine(sim, tmp_path / "db", stall_after=0.0) as e:
        await e.reconcile("startup")  # FSync first (a full sync checks stalls too)
        fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=60)])
        e.hint("push")
        await e.until({(fid, FAX_LEVEL, "status", "Queued")})
        assert [x for x in e.events if x.transition.kind is EventKind.STALLED] == []
        await e.reconcile("poll")
        await e.until({(fid, FAX_LEVEL, "stalled", "Queued")})
        await e.reconcile("poll", "push")
        assert len([x for x in e.events if x.transition.kind is EventKind.STALLED]) == 1
        assert e.reconciler.tracker.is_stalled(fid)  # not checked (nor journalled) again


class Wall:
    """One wall clock for the simulator (creation times) and the reconciler; the test moves it."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def sim(self) -> datetime:
        return self.now

    def faxd(self) -> float:
        return self.now.timestamp()


async def test_isync_keeps_the_frame_of_the_full_sync(tmp_path: Path) -> None:
    """An ISync sends the token alone: a dateFrom of "now - fsync_days" would move the frame's start
    (the message-sync guide: dateFrom on an ISync modifies the sync frame) and drop changes to faxes
    older than that."""
    wall = Wall()
    async with Simulator(SimConfig(seed=7), wall_clock=wall.sim) as sim:
        async with engine(sim, tmp_path / "db", wall=wall.faxd) as e:
            fid = sim.create_inbound_fax(None, "+14155550123")
            await e.reconcile("startup")
            assert {(fid, FAX_LEVEL, "status", "Received")} <= e.keys()
            wall.now += timedelta(days=8)  # the fax is now older than fsync_days (7)
            sim.store.delete(sim.store.messages[int(fid)])
            await e.reconcile("push")
            assert {(fid, FAX_LEVEL, "availability", "Deleted")} <= e.keys()
        isyncs = [r.raw_path for r in sim.requests_to("/message-sync") if "syncType=ISync" in r.raw_path]
        assert isyncs
        assert all("dateFrom" not in raw for raw in isyncs)


def syncs_since(sim: Simulator, start: int) -> list[tuple[str, int]]:
    """(syncType, status) of every message-sync served since request ``start``."""
    return [
        ("ISync" if "syncType=ISync" in r.raw_path else "FSync", r.status)
        for r in sim.requests[start:]
        if r.path.endswith("/message-sync")
    ]


@pytest.mark.parametrize("code", ["CMN-101", "MSG-333"])
async def test_a_refused_sync_token_is_dropped_for_one_full_sync(
    sim: Simulator, tmp_path: Path, code: str
) -> None:
    """RingCentral refuses a sync token with MSG-333 or CMN-101 "Parameter [syncToken] value is
    invalid": either way the token is dropped and one full sync runs (no retrying the same token)."""
    async with engine(sim, tmp_path / "db", backoff=0.2) as e:
        fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.1)])
        await e.reconcile("startup")
        await sim.wait_for_status(fid, "Sent")
        assert sim.stale_sync_tokens(code) == 1
        start = len(sim.requests)
        await e.reconcile("push")
        await e.until(truth_after(sim, [fid]))
        assert syncs_since(sim, start) == [("ISync", 400), ("FSync", 200)]
        assert e.registry.get_sample_value("faxd_sync_token_resets_total", {"code": code}) == 1
        await e.reconcile("push")  # the new token works
        assert syncs_since(sim, start)[2:] == [("ISync", 200)]
        assert e.registry.get_sample_value("faxd_full_sync_failing") == 0


async def test_when_the_full_sync_fails_too_it_backs_off_and_is_counted(
    sim: Simulator, tmp_path: Path
) -> None:
    async with engine(sim, tmp_path / "db", backoff=0.2) as e:
        await e.reconcile("startup")
        sim.stale_sync_tokens("CMN-101")
        sim.fail_next_requests(3, status=503, match="syncType=FSync")
        start = len(sim.requests)
        e.hint("push")
        async with asyncio.timeout(20):
            # The second refused full sync is only sent after faxd handled the first one.
            await sim.wait_for(lambda: syncs_since(sim, start).count(("FSync", 503)) >= 2)
        assert e.registry.get_sample_value("faxd_full_sync_failing") == 1
        assert e.reconciler.problems() == ["full sync failing for 1 extension(s)"]
        async with asyncio.timeout(20):
            await sim.wait_for(lambda: ("FSync", 200) in syncs_since(sim, start))
            await e.idle()
        # The refused token was presented once; then full syncs only, further and further apart.
        assert syncs_since(sim, start) == [("ISync", 400)] + [("FSync", 503)] * 3 + [("FSync", 200)]
        fsyncs = [r.time for r in sim.requests[start:] if "syncType=FSync" in r.raw_path]
        gaps = [b - a for a, b in itertools.pairwise(fsyncs)]
        assert gaps[0] >= 0.2 - 0.01
        assert gaps[1] >= 0.4 - 0.01
        assert gaps[2] >= 0.8 - 0.01
        assert e.registry.get_sample_value("faxd_full_sync_failing") == 0
        assert e.reconciler.problems() == []


@pytest.mark.looptime
async def test_a_deleted_extension_purges_nothing_and_is_retried_slowly(tmp_path: Path) -> None:
    """404 CMN-102 naming extensionId (the extension was deleted, or is mistyped) is a configuration
    problem: the extension's faxes in flight stay in flight (a 404 naming the message would be
    "Purged"), it is logged once, counted, named in STATUS= and retried every 10 minutes."""
    armed = False

    def delete_after_the_sync(served: ServedJson) -> None:
        nonlocal armed
        if armed and served.path.endswith("/message-sync"):
            armed = False
            sim.remove_extension(EXT)  # between the sync and the GET of the faxes in flight

    sim = Simulator(SimConfig(seed=7), response_observer=delete_after_the_sync)
    async with sim, engine(sim, tmp_path / "db") as e:
        fid = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=3600)])
        await e.reconcile("startup")
        assert [f.fax_id for f in e.reconciler.in_flight()] == [fid]
        armed = True

        def refused() -> list[RecordedRequest]:
            return [r for r in sim.requests if r.status == 404]

        with capture_logs() as logs:
            e.hint("poll")
            async with asyncio.timeout(700):
                await sim.wait_for(lambda: len(refused()) == 1)
                # ... and again, ten minutes later: now the sync itself is refused
                await sim.wait_for(lambda: len(refused()) == 2)
            assert e.registry.get_sample_value("faxd_extensions_not_found") == 1
            assert e.reconciler.problems() == ["1 configured extension(s) not found by RingCentral"]
            sim.remove_extension(EXT, restore=True)
            async with asyncio.timeout(700):
                await sim.wait_for(lambda: sim.requests[-1].time > refused()[-1].time)
                await e.idle()
        assert sim.requests[-1].status == 200
        refusals = refused()
        assert refusals[0].path.endswith("/message-store/{messageId}")
        assert refusals[1].path.endswith("/message-sync")
        assert refusals[1].time - refusals[0].time >= 600 - 0.05
        assert [f.fax_id for f in e.reconciler.in_flight()] == [fid]
        assert not [x for x in e.events if x.transition.kind is EventKind.AVAILABILITY]
        assert e.registry.get_sample_value("faxd_extensions_not_found") == 0
        assert e.reconciler.problems() == []
        errors = [entry for entry in logs if entry["log_level"] == "error"]
        assert len(errors) == 1  # logged once, not on every retry
        assert errors[0]["extension"] == EXT
