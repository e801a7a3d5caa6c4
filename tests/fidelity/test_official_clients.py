"""The official RingCentral clients, unmodified, against the simulator (issue 3, proof 2).

Each client runs as a real subprocess talking to an in-process :class:`Simulator` over
loopback; the test awaits the JSON lines the client prints and checks both what the client
saw and what the simulator recorded. The clients are installed once into a cache dir
(tests/fidelity/installs.py); an install failure fails these tests, it never skips them. Without node
(or npm, before the first install) on PATH the JS clients' tests skip, or fail under FAXD_REQUIRE_TOOLS=1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fidelity.harness import credentials, node_script, run_client

from faxd.sim import RecordedRequest, SimConfig, Simulator

pytestmark = pytest.mark.timeout(300)  # a cold install of the clients is part of the first test

INBOUND_FAX = "/restapi/v1.0/account/~/extension/~/fax?direction=Inbound"
MESSAGE_STORE = "/restapi/v1.0/account/~/extension/~/message-store"
FAX_STORE = MESSAGE_STORE + "?type=Fax"
SUBSCRIPTION = "/restapi/v1.0/subscription"


def sequence(sim: Simulator) -> list[tuple[str, str, int]]:
    """What the client did, in order: (method, route template, status); Heartbeats left out."""
    return [(r.method, r.path, r.status) for r in sim.requests if r.method != "Heartbeat"]


def ws_connects(sim: Simulator) -> list[RecordedRequest]:
    return [r for r in sim.requests if r.path == "/ws"]


async def test_python_sdk_receives_an_inbound_fax(py_sdk_python: Path) -> None:
    async with Simulator(SimConfig(seed=3)) as sim:
        argv = [str(py_sdk_python), str(Path(__file__).parent / "clients" / "py_sdk.py")]
        argv += [*credentials(sim), "--count", "2", INBOUND_FAX, MESSAGE_STORE]
        async with run_client(argv, name="ringcentral 0.9.2") as client:
            subscribed = await client.next_event("subscriptionCreated")
            fax_id = sim.create_inbound_fax(None, "+14155550123", pages=2)
            first = await client.next_event("notification")
            second = await client.next_event("notification")
            await client.next_event("done")
            assert await client.exit_code() == 0

        frames = [first["frame"], second["frame"]]
        for meta, body in frames:
            assert meta["type"] == "ServerNotification"
            assert body["subscriptionId"] == subscribed["id"]
        by_event = {body["event"].rsplit("/", 1)[1]: body["body"] for _, body in frames}
        record = by_event["fax?direction=Inbound"]
        assert record["id"] == fax_id
        assert record["direction"] == "Inbound"
        assert record["messageStatus"] == "Received"
        assert record["faxPageCount"] == 2
        assert by_event["message-store"]["changes"] == [
            {"type": "Fax", "newCount": 1, "updatedCount": 0, "newMessageIds": [int(fax_id)]}
        ]
        assert sequence(sim) == [
            ("POST", "/restapi/oauth/token", 200),
            ("POST", "/restapi/oauth/wstoken", 200),
            ("GET", "/ws", 101),
            ("POST", SUBSCRIPTION, 200),
        ]
        subscribe = sim.requests_to(SUBSCRIPTION, "POST")[0]
        assert (subscribe.transport, subscribe.raw_path) == ("ws", SUBSCRIPTION + "/")  # trailing slash


async def test_ringcentral_subscriptions_receives_an_inbound_fax(npm_dir: Path) -> None:
    async with Simulator(SimConfig(seed=4)) as sim:
        argv = ["node", str(node_script(npm_dir, "rc_subscriptions.mjs")), *credentials(sim), "1", FAX_STORE]
        async with run_client(argv, name="@ringcentral/subscriptions 5.0.11") as client:
            subscribed = await client.next_event("subscribed")
            fax_id = sim.create_inbound_fax(None, "+14155550124")
            note = await client.next_event("notification")
            await client.next_event("done")
            assert await client.exit_code() == 0

        assert note["body"]["subscriptionId"] == subscribed["subscriptionId"]
        assert note["body"]["body"]["changes"][0]["newMessageIds"] == [int(fax_id)]
        assert sequence(sim) == [
            ("POST", "/restapi/oauth/token", 200),
            ("POST", "/restapi/oauth/wstoken", 200),
            ("GET", "/ws", 101),
            ("POST", SUBSCRIPTION, 200),
            ("DELETE", SUBSCRIPTION + "/{subscriptionId}", 204),
            ("POST", "/restapi/oauth/revoke", 200),
        ]


async def test_rc_ex_ws_receives_a_notification(npm_dir: Path) -> None:
    async with Simulator(SimConfig(seed=5)) as sim:
        argv = ["node", str(node_script(npm_dir, "rc_ex_ws.mjs")), *credentials(sim), "1", "300", FAX_STORE]
        async with run_client(argv, name="@rc-ex/ws 1.4.2") as client:
            subscribed = await client.next_event("subscribed")
            fax_id = sim.create_inbound_fax(None, "+14155550125")
            note = await client.next_event("notification")
            await client.next_event("done")
            assert await client.exit_code() == 0

        assert note["subscriptionId"] == subscribed["subscriptionId"]
        assert note["body"]["body"]["changes"][0]["newMessageIds"] == [int(fax_id)]
        assert sequence(sim) == [
            ("POST", "/restapi/oauth/token", 200),
            ("POST", "/restapi/oauth/wstoken", 200),
            ("GET", "/ws", 101),
            ("POST", SUBSCRIPTION, 200),
            ("DELETE", SUBSCRIPTION + "/{subscriptionId}", 204),
            ("POST", "/restapi/oauth/revoke", 200),
        ]


async def test_rc_ex_ws_recovers_a_dropped_session_and_gets_the_missed_notification(npm_dir: Path) -> None:
    async with Simulator(SimConfig(seed=6)) as sim:
        argv = ["node", str(node_script(npm_dir, "rc_ex_ws.mjs")), *credentials(sim), "2", "300", FAX_STORE]
        async with run_client(argv, name="@rc-ex/ws 1.4.2") as client:
            subscribed = await client.next_event("subscribed")
            sim.create_inbound_fax(None, "+14155550126")
            await client.next_event("notification")
            assert sim.drop_ws() == 1
            missed = sim.create_inbound_fax(None, "+14155550127")  # buffered for the session
            recovered = await client.next_event("autoRecoverSuccess")
            replayed = await client.next_event("notification")
            await client.next_event("done")
            assert await client.exit_code() == 0

        assert recovered["subscriptionId"] == subscribed["subscriptionId"]
        assert replayed["subscriptionId"] == subscribed["subscriptionId"]
        assert replayed["body"]["body"]["changes"][0]["newMessageIds"] == [int(missed)]
        assert "autoRecoverFailed" not in [e["event"] for e in client.events]
        assert len(sim.requests_to(SUBSCRIPTION, "POST")) == 1  # no new subscription
        first, second = ws_connects(sim)
        assert "wsc=" not in first.raw_path
        assert "wsc=" in second.raw_path
        # @rc-ex/ws reuses its cached ws token for the reconnect (docs/ringcentral.md §2.1)
        assert len(sim.requests_to("/restapi/oauth/wstoken")) == 1
        assert first.raw_path.split("&")[0] == second.raw_path.split("&")[0]


async def test_rc_ex_ws_resubscribes_when_recovery_fails(npm_dir: Path) -> None:
    async with Simulator(SimConfig(seed=7)) as sim:
        argv = ["node", str(node_script(npm_dir, "rc_ex_ws.mjs")), *credentials(sim), "2", "300", FAX_STORE]
        async with run_client(argv, name="@rc-ex/ws 1.4.2") as client:
            subscribed = await client.next_event("subscribed")
            sim.create_inbound_fax(None, "+14155550128")
            await client.next_event("notification")
            sim.fail_next_recovery()
            assert sim.drop_ws() == 1
            lost = sim.create_inbound_fax(None, "+14155550129")  # lost with the session
            failed = await client.next_event("autoRecoverFailed")  # emitted after the re-subscribe
            after = sim.create_inbound_fax(None, "+14155550130")
            note = await client.next_event("notification")
            await client.next_event("done")
            assert await client.exit_code() == 0

        assert failed["subscriptionId"] != subscribed["subscriptionId"]
        assert note["subscriptionId"] == failed["subscriptionId"]
        assert note["body"]["body"]["changes"][0]["newMessageIds"] == [int(after)]
        assert int(lost) not in [
            i for e in client.events if e["event"] == "notification" for i in _new_ids(e)
        ]
        posts = sim.requests_to(SUBSCRIPTION, "POST")
        assert [(p.transport, p.status) for p in posts] == [("ws", 200), ("ws", 200)]
        _, second = ws_connects(sim)
        assert "wsc=" in second.raw_path
        assert posts[1].time > second.time  # re-subscribed on the new connection


def _new_ids(event: dict[str, object]) -> list[int]:
    body = event["body"]
    assert isinstance(body, dict)
    return [i for change in body["body"]["changes"] for i in change.get("newMessageIds", [])]


async def test_clients_can_run_side_by_side(npm_dir: Path, py_sdk_python: Path) -> None:
    """All three at once on one simulator: one inbound fax reaches every subscription.

    Three logins plus three ws tokens are 6 Auth-group requests: over RingCentral's default
    5 a minute (the JS SDK's wstoken got the 429), so this test raises the Auth limit.
    """
    limits = {**SimConfig().rate_limits, "Auth": (10, 60, 60)}
    async with Simulator(SimConfig(seed=8, rate_limits=limits)) as sim:
        py = [str(py_sdk_python), str(Path(__file__).parent / "clients" / "py_sdk.py")]
        py += [*credentials(sim), "--count", "1", INBOUND_FAX]
        subs = ["node", str(node_script(npm_dir, "rc_subscriptions.mjs")), *credentials(sim), "1", FAX_STORE]
        rcex = ["node", str(node_script(npm_dir, "rc_ex_ws.mjs")), *credentials(sim), "1", "300", FAX_STORE]
        async with (
            run_client(py, name="ringcentral 0.9.2") as a,
            run_client(subs, name="@ringcentral/subscriptions") as b,
            run_client(rcex, name="@rc-ex/ws") as c,
        ):
            await asyncio.gather(
                a.next_event("subscriptionCreated"), b.next_event("subscribed"), c.next_event("subscribed")
            )
            sim.create_inbound_fax(None, "+14155550131")
            await asyncio.gather(*(x.next_event("done") for x in (a, b, c)))
            assert [await x.exit_code() for x in (a, b, c)] == [0, 0, 0]
        assert len(sim.requests_to(SUBSCRIPTION, "POST")) == 3


async def test_rc_ex_ws_misses_what_happens_while_notifications_are_paused(npm_dir: Path) -> None:
    async with Simulator(SimConfig(seed=9)) as sim:
        argv = ["node", str(node_script(npm_dir, "rc_ex_ws.mjs")), *credentials(sim), "1", "300", FAX_STORE]
        async with run_client(argv, name="@rc-ex/ws 1.4.2") as client:
            await client.next_event("subscribed")
            sim.pause_notifications()
            sim.create_inbound_fax(None, "+14155550132")  # never announced
            sim.resume_notifications()
            after = sim.create_inbound_fax(None, "+14155550133")
            note = await client.next_event("notification")
            await client.next_event("done")
            assert await client.exit_code() == 0
        assert note["body"]["body"]["changes"][0]["newMessageIds"] == [int(after)]


async def test_ringcentral_sdk_waits_out_slow_requests(npm_dir: Path) -> None:
    async with Simulator(SimConfig(seed=10)) as sim:
        sim.delay_next_requests(2, 0.5)  # the login and the wstoken are held
        argv = ["node", str(node_script(npm_dir, "rc_subscriptions.mjs")), *credentials(sim), "1", FAX_STORE]
        async with run_client(argv, name="@ringcentral/subscriptions 5.0.11") as client:
            await client.next_event("subscribed")
            sim.create_inbound_fax(None, "+14155550134")
            await client.next_event("done")
            assert await client.exit_code() == 0
        assert [r.status for r in sim.requests[:2]] == [200, 200]
