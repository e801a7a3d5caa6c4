"""End to end: the daemon against the simulator over real sockets, observed by socket clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from daemon_support import RunningDaemon
from prometheus_client import CollectorRegistry
from socket_client import SocketClient

from faxd import daemon
from faxd.config import Config
from faxd.core.model import FAX_LEVEL, event_key
from faxd.sim import RecipientScript, SimConfig, Simulator


async def collect_until_final(
    client: SocketClient, expected: dict[tuple[str, int], str]
) -> list[dict[str, Any]]:
    """Events until every (fax, recipient) in ``expected`` has reached its expected final status."""
    events: list[dict[str, Any]] = []
    reached: set[tuple[str, int]] = set()
    while reached != set(expected):
        event = await client.next_of("event")
        events.append(event)
        k = event_key(event)[:2]
        if k in expected and event["to_status"] == expected[k] and event["kind"] in ("status", "recipient"):
            reached.add(k)
    return events


async def test_outcomes_reach_a_socket_client_exactly_and_replay_resumes(
    sim: Simulator, running: RunningDaemon
) -> None:
    client = await SocketClient.connect(running.socket)
    hello = client.hello
    assert hello["proto"] == 1
    await client.send({"type": "subscribe", "after_seq": 0, "epoch": hello["epoch"]})
    assert (await client.next_of("caught_up"))["seq"] == hello["head_seq"]

    sent = sim.create_outbound_fax(None, [RecipientScript("+16505550100", "Sent", after=1.0)])
    busy = sim.create_outbound_fax(
        None, [RecipientScript("+16505550101", "SendingFailed", error_code="LineBusy", after=1.2)]
    )
    mixed = sim.create_outbound_fax(
        None,
        [
            RecipientScript("+16505550102", "Sent", after=0.8),
            RecipientScript("+16505550103", "SendingFailed", error_code="NoAnswer", after=1.4),
        ],
    )
    inbound = sim.create_inbound_fax(None, "+14155550123", pages=3)

    expected: dict[tuple[str, int], str] = {
        (sent, FAX_LEVEL): "Sent",
        (sent, 0): "Sent",
        (busy, FAX_LEVEL): "SendingFailed",
        (busy, 0): "SendingFailed",
        (mixed, FAX_LEVEL): "SendingFailed",
        (mixed, 0): "Sent",
        (mixed, 1): "SendingFailed",
        (inbound, FAX_LEVEL): "Received",
    }
    events = await collect_until_final(client, expected)

    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq has gaps"
    # Each (fax, recipient) moves along one chain: every from_status is the previous to_status.
    last: dict[tuple[str, int], str | None] = {}
    for e in events:
        if e["kind"] in ("status", "recipient"):
            k = event_key(e)[:2]
            start = None if e["kind"] == "status" else last.get(k, "Queued")
            assert e["from_status"] == last.get(k, start), e
            last[k] = e["to_status"]
    assert {k: last[k] for k in expected} == expected

    finals = {event_key(e)[:2]: e for e in events if e["final"]}
    assert finals[(busy, 0)]["error_code"] == "LineBusy"
    assert finals[(busy, 0)]["error_category"] == "busy"
    assert finals[(busy, 0)]["retryable"] is True
    assert finals[(busy, FAX_LEVEL)]["error_code"] == "LineBusy"
    assert finals[(mixed, 1)]["error_code"] == "NoAnswer"
    assert finals[(mixed, 0)]["error_code"] is None
    assert finals[(mixed, 0)]["recipient"]["phone"] == "+16505550102"
    assert finals[(inbound, FAX_LEVEL)]["direction"] == "Inbound"
    assert finals[(inbound, FAX_LEVEL)]["pages"] == 3
    assert all(e["epoch"] == hello["epoch"] for e in events)

    # A second client that saw up to the middle resumes and gets exactly the rest, then caught_up.
    middle = events[len(events) // 2]["seq"]
    late = await SocketClient.connect(running.socket)
    await late.subscribe(after_seq=middle)
    replayed = []
    while True:
        message = await late.next_of("event", "caught_up")
        if message["type"] == "caught_up":
            break
        replayed.append(message)
    assert replayed == [e for e in events if e["seq"] > middle]
    assert message["seq"] == events[-1]["seq"]
    await late.close()
    await client.close()

    assert (
        running.registry.get_sample_value(
            "faxd_transitions_total", {"direction": "Outbound", "to_status": "SendingFailed"}
        )
        == 2.0
    )


async def test_a_stale_epoch_is_refused_with_cursor_expired(running: RunningDaemon) -> None:
    client = await SocketClient.connect(running.socket)
    await client.send({"type": "subscribe", "after_seq": 0, "epoch": "not-this-journal"})
    reply = await client.next_of("error")
    assert reply["code"] == "cursor_expired"
    await client.close()


@pytest.mark.parametrize(
    "sim_config",
    # A roomier Auth group than RingCentral's 5/min: this test is about the order of grants, and the
    # budget would otherwise (rightly) hold the JWT grant back for a minute.
    [
        SimConfig(
            seed=7,
            rate_limits={
                "Light": (50, 60, 60),
                "Medium": (40, 60, 60),
                "Heavy": (10, 60, 60),
                "Auth": (20, 60, 60),
            },
        )
    ],
)
async def test_credentials_revoked_mid_run_exit_78_without_a_login_storm(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(make_config(sim), registry=CollectorRegistry(), on_ready=ready.set))
    async with asyncio.timeout(30):
        await ready.wait()
        await sim.wait_for(lambda: bool(sim.requests_to("/subscription", "POST")))
        # An admin revokes the app's session and replaces the JWT credential.
        sim.config.jwt = "a-newer-jwt"
        for session in list(sim.tokens.sessions.values()):
            sim.tokens.revoke(None, {"token": next(iter(session.access_tokens))})
        sim.drop_ws()
        assert await task == 78
    grants = [r.status for r in sim.requests_to("/restapi/oauth/token")]
    assert grants == [200, 400, 400], "login; then one refresh and one JWT grant, both refused; then stop"


async def test_credentials_refused_at_start_exit_78_after_one_grant(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    """A JWT RingCentral refuses at the first login: exit 78 (the unit's RestartPreventExitStatus), with
    no retry, since a restart would not help either."""
    config = make_config(sim)
    sim.config.jwt = "another-jwt"  # the one in faxd's secret file is no longer valid
    async with asyncio.timeout(30):
        assert await daemon.run(config, registry=CollectorRegistry()) == 78
    assert [r.status for r in sim.requests_to("/restapi/oauth/token")] == [400]
