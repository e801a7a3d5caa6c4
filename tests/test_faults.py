"""The daemon under notification and request faults the other suites don't cover: duplicated and
delayed notifications, slow RingCentral answers. Every outcome must still arrive exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from socket_client import SocketClient

from faxd import daemon
from faxd.config import Config
from faxd.core.model import FAX_LEVEL, event_key
from faxd.sim import RecipientScript, Simulator

Key = tuple[str, int, str, str]


class Follower:
    """The events of a socket client subscribed from seq 0."""

    def __init__(self, client: SocketClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []

    async def until_final(self, expected: dict[tuple[str, int], str]) -> None:
        async with asyncio.timeout(30):
            while any(self.latest().get(k) != v for k, v in expected.items()):
                message = await self.client.recv()
                if message["type"] == "event":
                    self.events.append(message)

    def latest(self) -> dict[tuple[str, int], str]:
        out: dict[tuple[str, int], str] = {}
        for e in self.events:
            if e["kind"] in ("status", "recipient"):
                out[event_key(e)[:2]] = e["to_status"]
        return out

    def keys(self) -> list[Key]:
        return [event_key(e) for e in self.events]


@pytest.fixture
async def follower(
    sim: Simulator, make_config: Callable[..., Config]
) -> AsyncIterator[tuple[Follower, CollectorRegistry]]:
    config = make_config(sim)
    registry = CollectorRegistry()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(daemon.run(config, registry=registry, stop=stop, on_ready=ready.set))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    client = await SocketClient.subscribed(config.events.socket)
    async with asyncio.timeout(10):
        await sim.wait_for(lambda: bool(sim.requests_to("/subscription", "POST")))
    try:
        yield Follower(client), registry
    finally:
        await client.close()
        stop.set()
        async with asyncio.timeout(20):
            assert await task == 0


def outcomes(sim: Simulator, scripts: list[list[RecipientScript]]) -> dict[tuple[str, int], str]:
    expected: dict[tuple[str, int], str] = {}
    for recipients in scripts:
        fax = sim.create_outbound_fax(None, recipients)
        statuses = [r.outcome for r in recipients]
        expected[(fax, FAX_LEVEL)] = "SendingFailed" if "SendingFailed" in statuses else "Sent"
        for i, status in enumerate(statuses):
            expected[(fax, i)] = status
    return expected


SCRIPTS = [
    [RecipientScript("+16505550100", after=0.3)],
    [RecipientScript("+16505550101", "SendingFailed", "LineBusy", after=0.5)],
    [RecipientScript("+16505550102", after=0.4), RecipientScript("+16505550103", "SendingFailed", after=0.6)],
]


async def test_duplicated_notifications_coalesce_and_journal_once(
    sim: Simulator, follower: tuple[Follower, CollectorRegistry]
) -> None:
    client, registry = follower
    sim.duplicate_notifications(4)
    expected = outcomes(sim, SCRIPTS)
    await client.until_final(expected)
    keys = client.keys()
    assert len(keys) == len(set(keys)), "a transition was delivered twice"
    hints = registry.get_sample_value("faxd_ws_hints_total") or 0
    syncs = len(sim.requests_to("/message-sync"))
    assert hints >= 4 * 3, "every notification arrived four times"
    assert syncs < hints, "duplicated hints coalesce into fewer reconciles"


async def test_delayed_notifications_still_find_every_outcome(
    sim: Simulator, follower: tuple[Follower, CollectorRegistry]
) -> None:
    client, _ = follower
    sim.delay_notifications(1.5)
    expected = outcomes(sim, SCRIPTS)
    await client.until_final(expected)
    assert {e["source"] for e in client.events} <= {"push", "poll", "startup"}
    keys = client.keys()
    assert len(keys) == len(set(keys))


async def test_slow_ringcentral_answers_delay_but_lose_nothing(
    sim: Simulator, follower: tuple[Follower, CollectorRegistry]
) -> None:
    client, _ = follower
    sim.delay_next_requests(3, 1.0)  # the next reconciles wait on RingCentral while hints keep coming
    expected = outcomes(sim, SCRIPTS)
    await client.until_final(expected)
    keys = client.keys()
    assert len(keys) == len(set(keys))
    seqs = [e["seq"] for e in client.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
