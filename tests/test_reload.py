"""SIGHUP: RELOADING=1 … READY=1 around a re-read of the config file; what can change is applied live
(log level, extensions → a PUT of the WS subscription, timings), the rest is named and kept."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from ops_support import NotifySocket, daemon, write_config
from prometheus_client import CollectorRegistry

from faxd.adapters.metrics import Metrics
from faxd.adapters.notify import Notifier
from faxd.adapters.rest import RingCentral
from faxd.adapters.store import Store
from faxd.config import Config, merge_reload, reloadable_keys
from faxd.daemon import Engine, Reloadable, Reloader, Route, Status, Upstream
from faxd.sim import RecipientScript, SimConfig, Simulator

SECOND_EXT = "200000002"


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=7, extensions=("200000001", SECOND_EXT))


def edit(path: Path, **sections: dict[str, Any]) -> None:
    data = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path.write_text(yaml.safe_dump(data))


async def test_sighup_applies_log_level_and_extensions(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim)
    notify = NotifySocket(short_dir / "notify")
    try:
        async with asyncio.timeout(30), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
            await notify.wait_for(lambda m: m.startswith("READY=1"))
            await faxd.wait_event("ws.subscribed")
            assert not any(line["level"] == "debug" for line in faxd.lines)
            assert not sim.requests_to("/subscription/{subscriptionId}", "PUT")

            edit(config, ringcentral={"extensions": ["~", SECOND_EXT]}, logging={"level": "debug"})
            start = len(faxd.lines)
            faxd.signal(signal.SIGHUP)
            reloading = await notify.wait_for(lambda m: "RELOADING=1" in m)
            assert "MONOTONIC_USEC=" in reloading
            await notify.wait_for(lambda m: m.startswith("READY=1"))
            done = await faxd.wait_event("reload.applied", start)
            assert set(done["applied"]) == {"ringcentral.extensions", "logging.level"}
            assert done["restart_needed"] == []
            (put,) = sim.requests_to("/subscription/{subscriptionId}", "PUT")
            assert put.status == 200

            # The new extension's notifications now arrive, and debug lines are written.
            after = len(faxd.lines)
            sim.create_outbound_fax(SECOND_EXT, [RecipientScript("+16505550111", after=0.1)])
            hint = await faxd.wait_event("ws.hint_queued", after)
            assert hint["level"] == "debug"
            assert hint["extension"] == SECOND_EXT
            assert await faxd.stop() == 0
    finally:
        notify.close()


async def test_bad_config_on_reload_keeps_the_old_one_and_restart_keys_are_named(
    sim: Simulator, short_dir: Path
) -> None:
    config = write_config(short_dir, sim)
    notify = NotifySocket(short_dir / "notify")
    try:
        async with asyncio.timeout(30), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
            await notify.wait_for(lambda m: m.startswith("READY=1"))
            await faxd.wait_event("upstream.logged_in")

            good = config.read_text()
            edit(config, reconcile={"debounce": "fast"}, bogus={"x": 1})
            start = len(faxd.lines)
            faxd.signal(signal.SIGHUP)
            failed = await faxd.wait_event("reload.failed", start)
            assert failed["level"] == "error"
            assert any("reconcile.debounce" in p for p in failed["problems"])
            assert any("bogus" in p for p in failed["problems"])
            await notify.wait_for(lambda m: m.startswith("READY=1"))

            config.write_text(good)
            edit(config, store={"path": "other.db"}, metrics={"listen": "127.0.0.1:1"})
            start = len(faxd.lines)
            faxd.signal(signal.SIGHUP)
            warned = await faxd.wait_event("reload.restart_needed", start)
            assert set(warned["keys"]) == {"store.path", "metrics.listen"}
            await notify.wait_for(lambda m: m.startswith("READY=1"))
            assert not (short_dir / "other.db").exists()
            assert await faxd.stop() == 0
    finally:
        notify.close()


async def test_merge_reload_keeps_what_needs_a_restart(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    old = make_config(sim)
    new = make_config(
        sim,
        ringcentral={"extensions": ["~", "5"]},
        reconcile={"poll_interval": 30},
        events={"max_clients": 3},
        logging={"level": "debug"},
    )
    merged, applied, restart = merge_reload(old, new)
    assert sorted(applied) == ["logging.level", "reconcile.poll_interval", "ringcentral.extensions"]
    assert restart == ["events.max_clients"]
    assert merged.events == old.events
    assert merged.ringcentral.extensions == ("~", "5")
    assert merged.reconcile.poll_interval == 30
    assert merge_reload(merged, new)[2] == ["events.max_clients"], "named again on the next reload"


def test_reloadable_keys_are_marked_on_the_schema() -> None:
    """What a SIGHUP applies is marked on the config fields (``reload=True``); this pins the set, so that
    marking a key is a decision taken together with the daemon part that applies it."""
    assert reloadable_keys() == {
        "ringcentral.extensions",
        *(f"websocket.{k}" for k in ("heartbeat_interval", "ping_interval", "ping_timeout_min")),
        "websocket.ping_timeout",
        "websocket.max_message_bytes",
        *(f"reconcile.{k}" for k in ("debounce", "max_delay", "poll_interval", "active_poll_interval")),
        *(f"reconcile.{k}" for k in ("sent_settle", "stall_after", "rate_share")),
        "logging.level",
        "logging.format",
        "logging.redact_phi",
    }


async def test_a_reload_hands_each_part_its_own_new_settings(
    sim: Simulator, make_config: Callable[..., Config], short_dir: Path
) -> None:
    """The reloader gives old and new config to each part; each takes over the keys it owns: the queue's
    timings, the reconciler's settings, the rate share, the readiness threshold. Restart keys stay."""
    old = make_config(sim)
    new = make_config(
        sim,
        reconcile={"debounce": 0.5, "max_delay": 2, "rate_share": 0.5, "poll_interval": 30},
        events={"max_clients": 3},
    )
    metrics = Metrics(CollectorRegistry())
    store = Store(old.store.path)
    store.open()
    notifier = Notifier({})
    try:
        async with aiohttp.ClientSession() as session:
            rc = RingCentral(
                session, server=sim.url, client_id="id", client_secret="s", jwt="j", metrics=metrics
            )
            engine = Engine(old, rc, store, metrics, lambda events: None)
            status = Status(old, notifier, metrics, store, engine.reconciler)
            upstream = Upstream(old, rc, engine.work, metrics, status, Route.of(old.ringcentral))
            parts: list[Reloadable] = [engine, upstream, status]
            reloader = Reloader(old, None, parts, notifier=notifier, metrics=metrics, status=status)
            metrics.last_sync.set(time.time() - 300)  # fresh for a 300 s poll, stale for a 30 s one
            before = (await status.ready())[1]
            await reloader.apply(new)
            after = (await status.ready())[1]
    finally:
        store.close()
    assert (engine.scheduler.settings.debounce, engine.scheduler.settings.max_delay) == (0.5, 2)
    assert engine.scheduler.polls.interval == 30
    assert engine.reconciler.settings.poll_interval == 30
    assert rc.budget.share == 0.5
    assert reloader.config.reconcile == new.reconcile
    assert reloader.config.events == old.events, "a key that needs a restart keeps its old value"
    assert before == "websocket not subscribed"
    assert after == "websocket not subscribed; last sync older than 120s"
    assert metrics.reloads.labels("ok")._value.get() == 1
