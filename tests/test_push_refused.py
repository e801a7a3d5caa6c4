"""RingCentral refusing part of the subscription, seen from outside: STATUS=, the metric, one log line, and
the refused extension still tracked (by polling). faxd runs as a subprocess against the simulator."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from ops_support import NotifySocket, daemon, free_port, scrape, status_of, write_config

from faxd.client import Connection
from faxd.sim import RecipientScript, SimConfig, Simulator

OWN, OTHER = "200000001", "200000002"


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=7, extensions=(OWN, OTHER))


async def test_a_refused_extension_is_surfaced_once_and_tracked_by_polling(
    sim: Simulator, short_dir: Path
) -> None:
    sim.refuse_subscriptions("forbidden", [OTHER])  # 403 SUB-405 for any request naming OTHER
    port = free_port()
    config = write_config(
        short_dir,
        sim,
        ringcentral={"extensions": [OWN, OTHER]},
        reconcile={"poll_interval": 2, "active_poll_interval": 1},
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    notify = NotifySocket(short_dir / "notify")
    try:
        async with asyncio.timeout(60), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
            message = await notify.wait_for(lambda m: "push refused" in (status_of(m) or ""))
            status = status_of(message) or ""
            assert status.startswith("WebSocket up;"), status  # the user's own extension has push
            assert "push refused for 1 extension (SUB-405), polled" in status
            code, text = await scrape(port)
            assert code == 200
            assert "faxd_ws_disabled_filters 2.0" in text.splitlines()

            async with await Connection.open(str(short_dir / "events.sock")) as conn:
                reply = await conn.request({"type": "subscribe", "after_seq": conn.hello["head_seq"]})
                assert reply["type"] == "caught_up"
                fax = sim.create_outbound_fax(OTHER, [RecipientScript("+16505550100", after=1)])
                while True:
                    event = await conn.recv()
                    if event.get("fax_id") == fax and event.get("kind") == "status" and event["final"]:
                        break
            # Found without push: by a poll, or by the resync that follows the subscription when the
            # paced budget let that wait long enough to merge with the polls (its source is startup).
            assert (event["to_status"], event["source"] in ("poll", "startup")) == ("Sent", True)
            refused = [line for line in faxd.lines if line.get("event") == "ws.push_refused"]
            assert [(line["extension"], line["reason"], line["level"]) for line in refused] == [
                (OTHER, "SUB-405", "warning")
            ]
            faxd.signal(signal.SIGTERM)
            assert await faxd.wait() == 0
    finally:
        notify.close()
