"""faxd as a subprocess with a webhook outlet, SIGKILLed while a delivery is in flight and started
again: every journalled event reaches the receiver at least once, in seq order, none skipped. Then
the ``faxd outlets`` commands, against the same store while the daemon runs.

The journal is written before faxd starts (a store whose outlet was configured earlier, cursor 0),
so the test controls exactly which events exist; the receiver (tests/webhook_receiver.py) verifies
every signature with the standardwebhooks package and fails on a schedule.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from daemon_support import started
from ops_support import daemon, run_faxd, write_config
from webhook_receiver import Received, Receiver

from faxd import testbed
from faxd.adapters import outlets as outlets_module
from faxd.adapters.outlets import Ledger
from faxd.adapters.store import Journalled, Store
from faxd.core.model import EventKind, Source, Transition
from faxd.sim import RecipientScript, Simulator

EVENTS = 400
KILL_AT = 150  # the request faxd is killed during


def prepare_store(path: Path, n: int) -> str:
    store = Store(path)
    store.open()
    try:
        Ledger(store.db).cursor("ehr", new_at=0)
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        transitions = [
            Journalled(
                Transition(EventKind.STATUS, f"f{i}", "200", "Outbound", "Queued", "Sent", True), Source.POLL
            )
            for i in range(1, n + 1)
        ]
        store.commit([], transitions, observed_at=now)
        return store.epoch
    finally:
        store.close()


def assert_in_order_without_gaps(delivered: list[int], restarts: int) -> None:
    """Within an incarnation seqs only go up by one (or repeat: an answer faxd timed out on); across a
    restart they may go back (at least once), never forward past an undelivered one."""
    rewinds = 0
    for before, after in itertools.pairwise(delivered):
        assert after <= before + 1, f"seq {before + 1} was skipped"
        if after < before:
            rewinds += 1
    assert rewinds <= restarts


async def test_sigkill_mid_delivery_loses_nothing(sim: Simulator, short_dir: Path) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    secret_file = short_dir / "webhook-secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(secret)
    epoch = prepare_store(short_dir / "faxd.db", EVENTS)

    receiver = Receiver(secret)
    receiver.script = {20: (503, {}), 40: (500, {"Retry-After": "0"}), 60: "hang"}
    hold = asyncio.Event()
    held = asyncio.Event()

    async def block_the_kill_request(received: Received) -> None:
        if len(receiver.requests) == KILL_AT:
            held.set()
            await hold.wait()

    receiver.before_reply = block_the_kill_request
    receiver.hang_for = 5.0
    await receiver.start()
    outlet = {
        "type": "webhook",
        "url": receiver.url,
        "secret": {"file": "webhook-secret"},
        "timeout": 1,
        "retry_initial": 0.05,
        "retry_max": 0.2,
    }
    config = write_config(short_dir, sim, outlets={"ehr": outlet})
    try:
        async with daemon(config) as first:
            await asyncio.wait_for(held.wait(), 120)
            first.signal(signal.SIGKILL)
            assert await first.wait() == -signal.SIGKILL
        before_kill = list(receiver.delivered)
        assert before_kill, "nothing was delivered before the kill"
        assert before_kill[-1] < EVENTS
        hold.set()  # the killed delivery's answer goes nowhere
        async with daemon(config) as second:
            await receiver.wait_for(lambda r: set(r.delivered) >= set(range(1, EVENTS + 1)), within=45)
            # faxd outlets while the daemon runs: straight from the store
            code, out, err = await run_faxd("outlets", "-c", str(config), "--json")
            assert code == 0, err
            (state,) = [json.loads(line) for line in out.splitlines()]
            assert state["name"] == "ehr"
            assert state["head_seq"] == EVENTS
            code, out, err = await run_faxd(
                "outlets", "replay", "ehr", "--from-seq", str(EVENTS - 2), "-c", str(config)
            )
            assert code == 0, err
            await receiver.wait_for(
                lambda r: (
                    r.delivered[-3:] == [EVENTS - 2, EVENTS - 1, EVENTS] and len(r.delivered) > EVENTS + 2
                )
            )
            assert await second.stop() == 0
    finally:
        await receiver.stop()

    assert receiver.bad_signatures == 0
    delivered = receiver.delivered
    assert set(delivered) == set(range(1, EVENTS + 1))
    assert_in_order_without_gaps(delivered, restarts=2)  # the SIGKILL, the replay
    assert {r.webhook_id for r in receiver.requests if r.seq == 1} == {f"{epoch}:1"}
    # after a clean stop the cursor is committed at the head: a restart would deliver nothing again
    store = Store(short_dir / "faxd.db")
    store.open()
    try:
        assert Ledger(store.db).cursor("ehr", new_at=0) == EVENTS
        assert Ledger(store.db).dead_letters("ehr") == []
    finally:
        store.close()


async def test_outlets_cli_names_unknown_outlets_and_lists_dead_letters(tmp_path: Path) -> None:
    store = Store(tmp_path / "faxd.db")
    store.open()
    try:
        events = store.commit(
            [],
            [
                Journalled(
                    Transition(EventKind.STATUS, "f1", "200", "Outbound", "Queued", "Sent", True), Source.POLL
                )
            ],
            observed_at="2026-12-02T10:00:00.000Z",
        )
        ledger = Ledger(store.db)
        ledger.cursor("ehr", new_at=1)
        stored = store.events_after(0, 10)
        ledger.dead_letter("ehr", stored[0], b'{"type":"event","seq":1,"fax_id":"f1"}', 1, "HTTP 404")
    finally:
        store.close()
    assert events
    db = str(tmp_path / "faxd.db")
    code, out, err = await run_faxd("outlets", "dead-letter", "ehr", "--db", db, "--json")
    assert code == 0, err
    (dead,) = [json.loads(line) for line in out.splitlines()]
    assert dead["seq"] == 1
    assert dead["reason"] == "HTTP 404"
    assert dead["event"]["fax_id"] == "f1"
    code, out, err = await run_faxd("outlets", "--db", db)
    assert code == 0, err
    assert "ehr: cursor 1 of 1 (lag 0 events" in out
    assert "1 dead-lettered" in out
    code, _, err = await run_faxd("outlets", "replay", "nope", "--from-seq", "1", "--db", db)
    assert code == 1
    assert "no outlet 'nope'" in err
    assert "known: ehr" in err
    code, _, err = await run_faxd("outlets", "--db", str(tmp_path / "missing.db"))
    assert code == 1
    assert "no store at" in err


async def test_sigterm_during_a_hanging_delivery_stops_within_5_s(sim: Simulator, short_dir: Path) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    secret_file = short_dir / "webhook-secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(secret)
    prepare_store(short_dir / "faxd.db", 3)
    receiver = Receiver(secret, by_seq={2: "hang"}, hang_for=60.0)
    await receiver.start()
    outlet = {"type": "webhook", "url": receiver.url, "secret": {"file": "webhook-secret"}, "timeout": 60}
    config = write_config(short_dir, sim, outlets={"ehr": outlet})
    try:
        async with daemon(config) as running:
            await receiver.wait_for(lambda r: [x.seq for x in r.requests] == [1, 2], within=45)
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await running.stop() == 0
            assert loop.time() - started < 5.0
    finally:
        await receiver.stop()
    store = Store(short_dir / "faxd.db")
    store.open()
    try:
        # the batch holding the abandoned delivery is not committed: it goes again at the next start
        assert Ledger(store.db).cursor("ehr", new_at=0) == 0
    finally:
        store.close()


HOOK = """#!/bin/sh
cat > /dev/null
echo "$FAXD_EVENT_SEQ $FAXD_FAX_ID $FAXD_STATUS" >> "$1"
"""


async def test_the_daemon_hands_live_events_to_its_outlets(
    sim: Simulator, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outlets_module, "IDLE_CHECK", 3600.0)  # only the engine's publish can wake them
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    secret_file = short_dir / "webhook-secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(secret)
    script = short_dir / "hook.sh"
    script.write_text(HOOK)
    script.chmod(0o700)
    hook_log = short_dir / "hook.log"
    receiver = Receiver(secret)
    await receiver.start()
    outlets = {
        "ehr": {"type": "webhook", "url": receiver.url, "secret": {"file": "webhook-secret"}},
        "notify": {"type": "exec", "command": [str(script), str(hook_log)], "filter": {"final_only": True}},
    }
    config = testbed.load(
        sim, short_dir, defaults={"reconcile": {"debounce": 0.05, "max_delay": 0.5}}, outlets=outlets
    )
    try:
        async with started(config) as faxd:
            fax_id = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=0.3)])
            await receiver.wait_for(
                lambda r: any(x.body["fax_id"] == fax_id and x.body["final"] for x in r.requests), within=30
            )
            async with asyncio.timeout(30):
                while not (hook_log.exists() and fax_id in hook_log.read_text()):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # the hook, another process, writes it: nothing to await
            delivered = faxd.registry.get_sample_value("faxd_outlet_delivered_total", {"outlet": "ehr"})
            assert delivered is not None
            assert delivered >= 1
    finally:
        await receiver.stop()
    assert receiver.bad_signatures == 0
    assert receiver.delivered == sorted(receiver.delivered)
    # the hook ran for the final events only, in order
    lines = [line.split() for line in hook_log.read_text().splitlines()]
    assert lines
    assert all(fax == fax_id for _, fax, _ in lines)
    assert [int(seq) for seq, _, _ in lines] == sorted(int(seq) for seq, _, _ in lines)
