"""The WSG WebSocket: ConnectionDetails, subscriptions, notifications, heartbeats, recovery."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from sim_helpers import (
    FAX_FILTER,
    INBOUND_FILTER,
    basic,
    connect,
    login,
    next_notification,
    recv,
    subscribe,
)

from faxd.sim import RecipientScript, SimConfig, Simulator


async def heartbeat(ws: aiohttp.ClientWebSocketResponse, mid: str = "hb-1") -> list[Any]:
    """Send a Heartbeat and return every frame up to (excluding) its echo.

    Frames the server queued before it read the heartbeat arrive first, so this is a
    barrier: "no notification before the echo" means none was sent.
    """
    await ws.send_str(json.dumps([{"type": "Heartbeat", "messageId": mid}]))
    before: list[list[Any]] = []
    while True:
        frame = await recv(ws)
        if frame[0]["type"] == "Heartbeat":
            assert frame[0]["messageId"] == mid
            return before
        before.append(frame)


async def client_request(
    ws: aiohttp.ClientWebSocketResponse, method: str, path: str, body: Any = None, mid: str = "r"
) -> list[Any]:
    meta = {"type": "ClientRequest", "messageId": mid, "method": method, "path": path}
    await ws.send_str(json.dumps([meta] if body is None else [meta, body]))
    while True:
        frame = await recv(ws)
        if frame[0]["type"] == "ClientRequest":
            return frame


async def test_connection_details_first(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    meta, body = details
    assert meta["type"] == "ConnectionDetails"
    assert meta["status"] == 200
    assert meta["wsc"]["token"]
    assert meta["wsc"]["sequence"] == 1
    assert "RCRequestId" in meta["headers"]
    assert body["recoveryTimeout"] == 180
    assert body["recoveryBufferSize"] == 100
    assert body["idleTimeout"] == 1800
    assert body["absoluteTimeout"] == 86400
    assert {"creationTime", "maxConnectionsPerSession", "maxActiveRequests"} <= body.keys()
    assert "recoveryState" not in body
    await ws.close()


async def test_connect_without_or_with_bad_access_token(sim: Simulator, http: aiohttp.ClientSession) -> None:
    ws = await http.ws_connect(sim.ws_url)
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4400
    ws = await http.ws_connect(sim.ws_url + "?access_token=bogus")
    frame = await recv(ws)
    assert frame[0]["type"] == "Error"
    assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE


@pytest.mark.parametrize("path", ["/restapi/v1.0/subscription", "/restapi/v1.0/subscription/"])
async def test_subscribe_reply(sim: Simulator, http: aiohttp.ClientSession, path: str) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    meta, info = await subscribe(ws, [FAX_FILTER, INBOUND_FILTER], path)
    assert meta["type"] == "ClientRequest"
    assert meta["messageId"] == "sub-1"
    assert meta["status"] == 200
    assert meta["headers"]["WSG-SubscriptionId"] == info["id"]
    assert "RCRequestId" in meta["headers"]
    required = {"id", "uri", "eventFilters", "deliveryMode", "creationTime", "expirationTime"}
    assert required <= info.keys()
    assert info["status"] == "Active"
    assert info["eventFilters"] == [FAX_FILTER, INBOUND_FILTER]
    assert info["deliveryMode"]["transportType"] == "WebSocket"
    rec = sim.requests_to("/restapi/v1.0/subscription", "POST")
    assert [(r.transport, r.group, r.status) for r in rec] == [("ws", "Medium", 200)]
    await ws.close()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"eventFilters": ["/restapi/v1.0/account/~/extension/~/presence"]}, 400, "SUB-508"),
        ({"eventFilters": ["/restapi/v1.0/account/~/extension/~/fax"]}, 400, "SUB-508"),
        ({"eventFilters": [FAX_FILTER.replace("Fax", "Faxes")]}, 400, "SUB-508"),
        ({"eventFilters": ["/restapi/v1.0/account/~/extension/999/message-store"]}, 403, "SUB-405"),
        ({"eventFilters": []}, 400, "CMN-101"),
    ],
)
async def test_bad_subscription_requests(
    sim: Simulator, http: aiohttp.ClientSession, body: dict[str, Any], status: int, code: str
) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    body = {**body, "deliveryMode": {"transportType": "WebSocket"}}
    meta, err = await client_request(ws, "POST", "/restapi/v1.0/subscription", body)
    assert meta["status"] == status
    assert "headers" in meta
    assert err["errors"][0]["errorCode"] == code
    await ws.close()


async def test_subscription_requires_websocket_delivery(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    meta, _ = await client_request(ws, "POST", "/restapi/v1.0/subscription", {"eventFilters": [FAX_FILTER]})
    assert meta["status"] == 400
    await ws.close()


async def test_heartbeat_echo(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    assert await heartbeat(ws, "beat-42") == []
    assert [r.method for r in sim.requests if r.transport == "ws"][-1] == "Heartbeat"
    await ws.close()


async def test_inbound_fax_notifications(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    _, info = await subscribe(ws, [FAX_FILTER, INBOUND_FILTER])
    mid = sim.create_inbound_fax(None, "+14155550100", pages=3)
    frames = [await next_notification(ws), await next_notification(ws)]
    by_event = {f[1]["event"].rsplit("/", 1)[-1]: f for f in frames}
    store = by_event["message-store?type=Fax"]
    fax = by_event["fax?direction=Inbound"]
    for meta, env in frames:
        assert meta["type"] == "ServerNotification"
        assert meta["wsc"]["sequence"] > 1
        assert env["subscriptionId"] == info["id"]
        assert env["ownerId"] == sim.config.extensions[0]
        assert {"uuid", "event", "timestamp", "subscriptionId", "ownerId", "body"} <= env.keys()
    body = store[1]["body"]
    assert body["extensionId"] == int(sim.config.extensions[0])
    assert body["accountId"] == int(sim.config.account_id)
    assert body["changes"] == [{"type": "Fax", "newCount": 1, "updatedCount": 0, "newMessageIds": [int(mid)]}]
    record = fax[1]["body"]
    assert record["id"] == mid
    assert record["direction"] == "Inbound"
    assert record["messageStatus"] == "Received"
    assert record["faxPageCount"] == 3
    assert record["from"]["phoneNumber"] == "+14155550100"
    seqs = [f[0]["wsc"]["sequence"] for f in frames]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 2
    await ws.close()


@pytest.mark.looptime
async def test_outbound_updates_carry_counts_only(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER, INBOUND_FILTER])
    mid = sim.create_outbound_fax(
        None,
        [RecipientScript("+15550001111", after=5), RecipientScript("+15550002222", after=9)],
    )
    _, new = await next_notification(ws)
    assert new["body"]["changes"][0]["newMessageIds"] == [int(mid)]
    loop = asyncio.get_running_loop()
    _, upd = await next_notification(ws)
    assert loop.time() == pytest.approx(5, abs=0.5)
    assert upd["body"]["changes"] == [{"type": "Fax", "newCount": 0, "updatedCount": 1}]
    assert sim.message(mid)["messageStatus"] == "Queued"
    _, upd = await next_notification(ws)
    assert loop.time() == pytest.approx(9, abs=0.5)
    assert upd["body"]["changes"][0]["updatedCount"] == 1
    assert sim.message(mid)["messageStatus"] == "Sent"
    await ws.close()


async def test_filters_are_honoured(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    outbound_only = "/restapi/v1.0/account/~/extension/~/message-store?type=Fax&direction=Outbound"
    await subscribe(ws, [outbound_only])
    sim.create_inbound_fax(None, "+14155550100")
    assert await heartbeat(ws) == []
    mid = sim.create_outbound_fax(None, [RecipientScript("+15550001111", after=60)])
    frames = await heartbeat(ws)
    assert len(frames) == 1
    assert frames[0][1]["body"]["changes"][0]["newMessageIds"] == [int(mid)]
    await ws.close()


async def test_second_subscription_replaces_the_first(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    _, first = await subscribe(ws, [FAX_FILTER])
    _, second = await subscribe(ws, [INBOUND_FILTER])
    assert first["id"] != second["id"]
    sim.create_inbound_fax(None, "+14155550100")
    frames = await heartbeat(ws)
    assert [f[1]["subscriptionId"] for f in frames] == [second["id"]]
    assert frames[0][1]["event"].endswith("fax?direction=Inbound")
    meta, _ = await client_request(
        ws, "PUT", f"/restapi/v1.0/subscription/{first['id']}", {"eventFilters": [FAX_FILTER]}
    )
    assert meta["status"] == 404
    await ws.close()


async def test_put_and_delete_subscription(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    _, info = await subscribe(ws, [INBOUND_FILTER])
    path = f"/restapi/v1.0/subscription/{info['id']}"
    meta, updated = await client_request(ws, "PUT", path, {"eventFilters": [FAX_FILTER]})
    assert meta["status"] == 200
    assert meta["headers"]["WSG-SubscriptionId"] == info["id"]
    assert updated["eventFilters"] == [FAX_FILTER]
    sim.create_inbound_fax(None, "+14155550100")
    frames = await heartbeat(ws)
    assert [f[1]["event"].rsplit("/", 1)[-1] for f in frames] == ["message-store?type=Fax"]
    meta, *_ = await client_request(ws, "DELETE", path)
    assert 200 <= meta["status"] < 300
    sim.create_inbound_fax(None, "+14155550100")
    assert await heartbeat(ws, "hb-2") == []
    await ws.close()


async def test_unknown_client_request_path(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    meta, err = await client_request(ws, "GET", "/restapi/v1.0/account/~/extension/~")
    assert meta["status"] == 404
    assert err["errors"][0]["errorCode"] == "CMN-120"
    await ws.close()


# -- session recovery -----------------------------------------------------------------------


async def drop_and_wait(sim: Simulator, ws: aiohttp.ClientWebSocketResponse) -> None:
    assert sim.drop_ws() == 1
    msg = await ws.receive()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


async def test_recovery_successful_replays_missed(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    wsc = details[0]["wsc"]["token"]
    _, info = await subscribe(ws, [FAX_FILTER])
    await drop_and_wait(sim, ws)
    first = sim.create_inbound_fax(None, "+14155550100")
    await asyncio.sleep(0)
    second = sim.create_inbound_fax(None, "+14155550101")
    await asyncio.sleep(0)
    # refresh keeps the OAuth session, so recovery works with the new token
    async with http.post(
        sim.url + "/restapi/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]},
        headers={"Authorization": basic(sim)},
    ) as resp:
        tok2 = await resp.json()
    ws2, details2 = await connect(http, sim, tok2, wsc=wsc)
    assert details2[1]["recoveryState"] == "Successful"
    assert "recoveryErrorCode" not in details2[1]
    replay = [await next_notification(ws2), await next_notification(ws2)]
    ids = [f[1]["body"]["changes"][0]["newMessageIds"][0] for f in replay]
    assert ids == [int(first), int(second)]
    assert {f[1]["subscriptionId"] for f in replay} == {info["id"]}
    seqs = [details2[0]["wsc"]["sequence"]] + [f[0]["wsc"]["sequence"] for f in replay]
    assert seqs == sorted(seqs)
    # the subscription survived: new changes still arrive without a new POST
    third = sim.create_inbound_fax(None, "+14155550102")
    _, env = await next_notification(ws2)
    assert env["body"]["changes"][0]["newMessageIds"] == [int(third)]
    await ws2.close()


async def test_recovery_buffer_keeps_the_newest(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(recovery_buffer_size=3)) as sim:
        tok = await login(http, sim)
        ws, details = await connect(http, sim, tok)
        await subscribe(ws, [FAX_FILTER])
        await drop_and_wait(sim, ws)
        ids = []
        for i in range(5):
            ids.append(int(sim.create_inbound_fax(None, f"+1415555010{i}")))
            await asyncio.sleep(0)
        ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
        assert d2[1]["recoveryState"] == "Successful"
        frames = await heartbeat(ws2)
        assert [f[1]["body"]["changes"][0]["newMessageIds"][0] for f in frames] == ids[2:]
        await ws2.close()


@pytest.mark.looptime
async def test_recovery_fails_after_the_window(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    await drop_and_wait(sim, ws)
    await asyncio.sleep(sim.config.recovery_timeout + 1)
    tok = await login(http, sim)  # the access token itself is still fine; a fresh one is too
    ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
    assert d2[1]["recoveryState"] == "Failed"
    assert d2[1]["recoveryErrorCode"]
    assert d2[0]["wsc"]["token"] != details[0]["wsc"]["token"]
    # on Failed the client re-subscribes on the same connection
    meta, _ = await subscribe(ws2, [FAX_FILTER])
    assert meta["status"] == 200
    await ws2.close()


@pytest.mark.looptime
async def test_recovery_within_the_window(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    await drop_and_wait(sim, ws)
    await asyncio.sleep(sim.config.recovery_timeout - 5)
    ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
    assert d2[1]["recoveryState"] == "Successful"
    await ws2.close()


async def test_a_fresh_connect_makes_the_old_sessions_wsc_stale(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    tok = await login(http, sim)
    ws, old = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    await drop_and_wait(sim, ws)
    ws2, new = await connect(http, sim, tok)  # fresh, inside the old session's recovery window
    assert "recoveryState" not in new[1]
    assert new[0]["wsc"]["sequence"] == 1
    await subscribe(ws2, [FAX_FILTER])
    await drop_and_wait(sim, ws2)
    ws3, d3 = await connect(http, sim, tok, wsc=new[0]["wsc"]["token"])
    assert d3[1]["recoveryState"] == "Successful"  # the new session's wsc recovers
    stale, d4 = await connect(http, sim, tok, wsc=old[0]["wsc"]["token"])
    assert (d4[1]["recoveryState"], d4[1]["recoveryErrorCode"]) == ("Failed", "WSG-1001")
    await stale.close()
    await ws3.close()


async def test_recovery_with_a_new_login_fails_1003(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    await drop_and_wait(sim, ws)
    other = await login(http, sim)
    ws2, d2 = await connect(http, sim, other, wsc=details[0]["wsc"]["token"])
    assert (d2[1]["recoveryState"], d2[1]["recoveryErrorCode"]) == ("Failed", "WSG-1003")
    await ws2.close()


async def test_recovery_without_subscription_fails_1005(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    await drop_and_wait(sim, ws)
    ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
    assert (d2[1]["recoveryState"], d2[1]["recoveryErrorCode"]) == ("Failed", "WSG-1005")
    await ws2.close()


async def test_fail_next_recovery_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    await drop_and_wait(sim, ws)
    sim.fail_next_recovery()
    ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
    assert d2[1]["recoveryState"] == "Failed"
    sim.create_inbound_fax(None, "+14155550100")
    assert await heartbeat(ws2) == []  # the old subscription is gone
    await ws2.close()


async def test_malformed_wsc_is_an_error_then_close(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, frame = await connect(http, sim, tok, wsc="not-a-real-token")
    assert frame[0]["type"] == "Error"
    assert frame[1] == {
        "errorCode": "WSG-400",
        "message": "Malformed WebSocket session context token",
    }
    assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE


@pytest.mark.looptime
async def test_idle_timeout(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(idle_timeout=100)) as sim:
        tok = await login(http, sim)
        ws, _ = await connect(http, sim, tok)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(90)
        assert await heartbeat(ws) == []  # activity re-arms the idle timer
        frame = await recv(ws, limit=500)
        assert frame[0]["type"] == "Error"
        assert frame[1]["errorCode"] == "WSG-902"
        assert loop.time() - start == pytest.approx(190, abs=1)
        assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE


@pytest.mark.looptime
async def test_absolute_timeout(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(absolute_timeout=300, idle_timeout=1000)) as sim:
        tok = await login(http, sim)
        ws, details = await connect(http, sim, tok)
        await subscribe(ws, [FAX_FILTER])
        frame = await recv(ws, limit=500)
        assert frame[1]["errorCode"] == "WSG-903"
        assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
        # the session stays recoverable after a forced disconnect
        ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
        assert d2[1]["recoveryState"] == "Successful"
        await ws2.close()
