"""Fault injection (Python API and /_sim/faults/* endpoints) and the control API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest
from sim_helpers import (
    EXT,
    FAX_FILTER,
    INBOUND_FILTER,
    bearer,
    connect,
    login,
    next_notification,
    recv,
    subscribe,
    ws_token,
)

from faxd.sim import SimConfig, Simulator


async def control(
    http: aiohttp.ClientSession, sim: Simulator, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, sim.url + "/_sim/" + path, json=body) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def barrier(ws: aiohttp.ClientWebSocketResponse, mid: str = "hb") -> list[Any]:
    """Frames received before the echo of a Heartbeat sent now."""
    await ws.send_str(json.dumps([{"type": "Heartbeat", "messageId": mid}]))
    frames: list[list[Any]] = []
    while True:
        frame = await recv(ws)
        if frame[0]["type"] == "Heartbeat":
            return frames
        frames.append(frame)


async def test_control_info_and_fax_creation(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, info = await control(http, sim, "GET", "info")
    assert status == 200
    assert info["clientId"] == sim.config.client_id
    assert info["jwt"] == sim.config.jwt
    status, out = await control(
        http,
        sim,
        "POST",
        "faxes/outbound",
        {"recipients": [{"phone": "+15550001111", "after": 100}, "+15550002222"], "pages": 4},
    )
    assert status == 200
    assert out["message"]["faxPageCount"] == 4
    assert len(out["message"]["to"]) == 2
    status, inbound = await control(http, sim, "POST", "faxes/inbound", {"from": "+14155550100"})
    assert status == 200
    assert inbound["message"]["messageStatus"] == "Received"
    status, listing = await control(http, sim, "GET", "messages")
    assert [r["id"] for r in listing["records"]] == [int(out["id"]), int(inbound["id"])]
    status, one = await control(http, sim, "GET", f"messages/{inbound['id']}")
    assert one == sim.message(inbound["id"])
    status, _ = await control(http, sim, "GET", "messages/42")
    assert status == 404
    status, err = await control(http, sim, "POST", "faxes/outbound", {"recipients": []})
    assert status == 400
    assert "recipients" in err["error"]


@pytest.mark.looptime
async def test_control_outcome_and_request_log(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, _ = await control(
        http,
        sim,
        "POST",
        "outcomes",
        {"phone": "+15557770000", "outcome": "SendingFailed", "errorCode": "NoFaxMachine"},
    )
    assert status == 200
    script = sim.store.script_for("+15557770000")
    assert (script.outcome, script.error_code) == ("SendingFailed", "NoFaxMachine")
    tok = await login(http, sim)
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)):
        pass
    status, log = await control(http, sim, "GET", "requests")
    assert [(r["method"], r["path"], r["group"]) for r in log["requests"]] == [
        ("POST", "/restapi/oauth/token", "Auth"),
        ("GET", "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-store", "Light"),
    ]
    assert all(not r["path"].startswith("/_sim") for r in log["requests"])
    status, _ = await control(http, sim, "DELETE", "requests")
    assert sim.requests == []


async def test_drop_ws_endpoint_is_recoverable(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    _status, body = await control(http, sim, "POST", "faults/drop-ws")
    assert body == {"dropped": 1}
    msg = await ws.receive()
    assert msg.type != aiohttp.WSMsgType.TEXT
    mid = sim.create_inbound_fax(None, "+14155550100")
    ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
    assert d2[1]["recoveryState"] == "Successful"
    _, env = await next_notification(ws2)
    assert env["body"]["changes"][0]["newMessageIds"] == [int(mid)]
    await ws2.close()


async def test_pause_and_resume_notifications(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    await control(http, sim, "POST", "faults/pause-notifications")
    lost = sim.create_inbound_fax(None, "+14155550100")
    assert await barrier(ws) == []
    assert sim.message(lost)["messageStatus"] == "Received"  # the change did happen
    await control(http, sim, "POST", "faults/resume-notifications")
    seen = sim.create_inbound_fax(None, "+14155550101")
    frames = await barrier(ws, "hb2")
    assert [f[1]["body"]["changes"][0]["newMessageIds"] for f in frames] == [[int(seen)]]
    await ws.close()


async def test_fail_requests_json_and_html(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    await control(http, sim, "POST", "faults/fail-requests", {"count": 2})
    for _ in range(2):
        async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
            assert resp.status == 503
            assert (await resp.json())["errors"][0]["errorCode"] == "CMN-201"
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
        assert resp.status == 200
    sim.fail_next_requests(1, html=True)
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
        assert resp.status == 503
        assert resp.content_type == "text/html"
    assert [r.status for r in sim.requests[-4:]] == [503, 503, 200, 503]
    # With "match", only the requests that contain it fail; the others pass untouched.
    await control(http, sim, "POST", "faults/fail-requests", {"count": 1, "match": "syncType=FSync"})
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
        assert resp.status == 200
    sync = sim.url + EXT + "/message-sync"
    for expected in (503, 200):
        async with http.get(sync, params={"syncType": "FSync"}, headers=bearer(tok)) as resp:
            assert resp.status == expected


@pytest.mark.looptime
async def test_delay_requests(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    status, _ = await control(http, sim, "POST", "faults/delay-requests", {"count": 1, "seconds": 20})
    assert status == 200
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
        assert resp.status == 200
    assert loop.time() - start == pytest.approx(20, abs=1)


async def test_storm_and_expire_and_stale_endpoints(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    status, _ = await control(http, sim, "POST", "faults/rate-limit-storm", {"group": "Light", "seconds": 30})
    assert status == 200
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
        assert resp.status == 429
    status, _ = await control(http, sim, "POST", "faults/rate-limit-storm", {"group": "Nope"})
    assert status == 400
    status, body = await control(http, sim, "POST", "faults/expire-tokens")
    assert body == {"expired": 1}
    status, body = await control(http, sim, "POST", "faults/stale-sync-tokens")
    assert body == {"staled": 0}
    status, _ = await control(http, sim, "POST", "faults/fail-next-recovery", {"code": "WSG-1009"})
    assert status == 200
    status, _ = await control(http, sim, "POST", "faults/bulk-get", {"mode": "sideways"})
    assert status == 400


async def test_bulk_get_faults(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ids = [sim.create_inbound_fax(None, f"+1415555010{i}") for i in range(3)]
    status, _ = await control(http, sim, "POST", "faults/bulk-get", {"mode": "shuffle"})
    assert status == 200
    accept = {"Accept": "application/vnd.ringcentral.multipart+json"}
    path = sim.url + EXT + "/message-store/" + ",".join([*ids, "1"])
    async with http.get(path, headers={**bearer(tok), **accept}) as resp:
        entries = json.loads(await resp.text())
    # ids and statuses in request order; the records of one status in reverse order
    assert [(e["resourceId"], e["status"]) for e in entries] == [(i, 200) for i in ids] + [("1", 404)]
    assert [e["body"]["id"] for e in entries[:3]] == [int(i) for i in reversed(ids)]
    await control(http, sim, "POST", "faults/bulk-get", {"mode": "unasked"})
    async with http.get(sim.url + EXT + "/message-store/" + ",".join(ids[:2]), headers=bearer(tok)) as resp:
        text = await resp.text()
    assert resp.status == 207
    assert f"/message-store/{ids[2]}" in text  # the last id answered by the one not asked
    async with http.get(path, headers={**bearer(tok), **accept}) as resp:  # count 1: over
        assert [e["body"].get("id") for e in json.loads(await resp.text())][:3] == [int(i) for i in ids]


@pytest.mark.looptime
async def test_blackhole_loses_frames_without_closing(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, details = await connect(http, sim, tok)
    await subscribe(ws, [FAX_FILTER])
    _status, body = await control(http, sim, "POST", "faults/blackhole-ws")
    assert body == {"blackholed": 1}
    sim.create_inbound_fax(None, "+14155550100")
    await ws.send_str(json.dumps([{"type": "Heartbeat", "messageId": "x"}]))
    with pytest.raises(TimeoutError):
        await recv(ws, limit=120)  # nothing at all, not even the heartbeat echo
    assert not ws.closed
    # the client gives up and recovers: the session is fine, but the frames are lost
    await ws.close()
    ws2, d2 = await connect(http, sim, tok, wsc=details[0]["wsc"]["token"])
    assert d2[1]["recoveryState"] == "Successful"
    assert await barrier(ws2) == []
    await ws2.close()


async def test_malformed_and_oversize_frames(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    _, body = await control(http, sim, "POST", "faults/malformed-frame")
    assert body == {"sent": 1}
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.TEXT
    with pytest.raises(ValueError, match="Expecting"):
        json.loads(msg.data)
    _status, body = await control(
        http, sim, "POST", "faults/malformed-frame", {"kind": "oversize", "size": 5 * 1024 * 1024}
    )
    assert body == {"sent": 1}
    msg = await ws.receive()  # aiohttp's client refuses frames above 4 MiB
    assert msg.type != aiohttp.WSMsgType.TEXT
    await ws.close()


async def test_foreign_notification(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    ws, _ = await connect(http, sim, tok)
    _, info = await subscribe(ws, [FAX_FILTER, INBOUND_FILTER])
    status, body = await control(http, sim, "POST", "faults/foreign-notification")
    assert status == 200
    frames = await barrier(ws)
    assert len(frames) == 1
    env = frames[0][1]
    assert env["subscriptionId"] == info["id"]
    assert env["body"]["changes"] == [
        {"type": "SMS", "newCount": 1, "updatedCount": 0, "newMessageIds": [int(body["id"])]}
    ]
    assert sim.message(body["id"])["type"] == "SMS"
    await ws.close()


@pytest.mark.looptime
async def test_delay_pongs_holds_each_pong_in_order(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    wst = await ws_token(http, sim, tok)
    # autoping=False: the client sees every PONG frame, in the order it arrived.
    async with http.ws_connect(f"{wst['uri']}?access_token={wst['ws_access_token']}", autoping=False) as ws:
        await recv(ws)  # ConnectionDetails
        status, body = await control(http, sim, "POST", "faults/delay-pongs", {"min": 2, "max": 3})
        assert (status, body) == (200, {"ok": True})
        loop = asyncio.get_running_loop()
        sent = loop.time()
        for payload in (b"1", b"2", b"3"):
            await ws.ping(payload)
        arrived = []
        for _ in range(3):
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.PONG
            arrived.append((msg.data, loop.time() - sent))
        assert [data for data, _ in arrived] == [b"1", b"2", b"3"]  # a path delivers in order
        assert 2 <= arrived[0][1] <= 3.1
        assert arrived[-1][1] <= 3.1  # the delays overlap; they do not add up
        await control(http, sim, "POST", "faults/delay-pongs", {"max": 0})
        before = loop.time()
        await ws.ping(b"4")
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"4")
        assert loop.time() - before < 0.5
    status, body = await control(http, sim, "POST", "faults/delay-pongs", {"min": 3, "max": 1})
    assert status == 400
    assert "low <= high" in body["error"]


async def test_remove_extension(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    mid = sim.create_inbound_fax(None, "+14155550100")
    ext = sim.config.extensions[0]
    status, _ = await control(http, sim, "POST", "faults/remove-extension", {"extensionId": ext})
    assert status == 200
    for path in ("/message-sync", f"/message-store/{mid}"):
        async with http.get(sim.url + EXT + path, headers=bearer(tok)) as resp:
            assert resp.status == 404
            error = (await resp.json())["errors"][0]
            assert (error["errorCode"], error["parameterName"]) == ("CMN-102", "extensionId")
    await control(http, sim, "POST", "faults/remove-extension", {"extensionId": ext, "restore": True})
    async with http.get(sim.url + EXT + f"/message-store/{mid}", headers=bearer(tok)) as resp:
        assert resp.status == 200
    status, _ = await control(http, sim, "POST", "faults/remove-extension", {"extensionId": "1"})
    assert status == 400


@pytest.mark.looptime
async def test_ignore_heartbeats_leaves_them_unanswered_but_counted_as_activity(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator(SimConfig(idle_timeout=100)) as sim:
        tok = await login(http, sim)
        ws, _ = await connect(http, sim, tok)
        status, _ = await control(http, sim, "POST", "faults/ignore-heartbeats", {"on": True})
        assert status == 200
        for n in range(5):  # 5 x 60 s: well past idle_timeout, kept alive by the Heartbeats alone
            await ws.send_str(json.dumps([{"type": "Heartbeat", "messageId": f"hb-{n}"}]))
            with pytest.raises(TimeoutError):
                await recv(ws, limit=60)  # no echo, and no WSG-902 either
        assert len(sim.requests_to("Heartbeat")) == 5
        await control(http, sim, "POST", "faults/ignore-heartbeats", {"on": False})
        assert await barrier(ws) == []  # answered again
        await ws.close()


@pytest.mark.looptime
async def test_wan_path_pongs_are_heavy_tailed_in_order_and_sometimes_lost(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator(SimConfig(seed=11, idle_timeout=10_000)) as sim:  # pings are no activity
        tok = await login(http, sim)
        wst = await ws_token(http, sim, tok)
        url = f"{wst['uri']}?access_token={wst['ws_access_token']}"
        async with http.ws_connect(url, autoping=False) as ws:
            await recv(ws)  # ConnectionDetails
            status, _ = await control(http, sim, "POST", "faults/wan-path", {"on": True})
            assert status == 200
            loop = asyncio.get_running_loop()
            sent: dict[bytes, float] = {}
            waits: dict[bytes, float] = {}
            order: list[int] = []

            async def read_pongs() -> None:
                while True:
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.PONG
                    order.append(int.from_bytes(msg.data, "big"))
                    waits[msg.data] = loop.time()

            reader = asyncio.create_task(read_pongs())
            for n in range(2000):  # a ping a second, like faxd
                payload = n.to_bytes(2, "big")
                sent[payload] = loop.time()
                await ws.ping(payload)
                await asyncio.sleep(1)
            await asyncio.sleep(10)  # fake time: the last pongs' longest possible delay
            assert not reader.done()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await control(http, sim, "POST", "faults/wan-path", {"on": False})
        assert order == sorted(order)  # a path delivers in order
        lost = len(sent) - len(waits)
        assert lost == sim.gateway.pongs_lost >= 1
        delays = sorted(at - sent[p] for p, at in waits.items())
        assert 0.015 < delays[len(delays) // 2] < 0.1  # mostly tens of milliseconds
        assert delays[-1] > 1  # with spikes
        assert delays[-1] < 4


@pytest.mark.looptime
async def test_refused_upgrades_then_expired_ws_tokens(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    wst = await ws_token(http, sim, tok)
    url = f"{wst['uri']}?access_token={wst['ws_access_token']}"
    status, _ = await control(http, sim, "POST", "faults/refuse-ws-upgrades", {"seconds": 4})
    assert status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url)
    assert refused.value.status == 503
    await asyncio.sleep(4)
    async with http.ws_connect(url) as ws:  # the same ws token: the refusal did not spend it
        assert (await recv(ws))[0]["type"] == "ConnectionDetails"
    status, body = await control(http, sim, "POST", "faults/expire-ws-tokens")
    assert body == {"expired": 1}
    async with http.ws_connect(url) as ws:
        frame = await recv(ws)
        assert frame[1] == {"errorCode": "WSG-401", "message": "Invalid or expired access token"}
    assert [r.status for r in sim.requests if r.path == "/ws"] == [503, 101, 4401]
    status, body = await control(http, sim, "POST", "faults/refuse-ws-upgrades", {"status": 200})
    assert status == 400


async def test_refuse_subscriptions(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(extensions=("200000001", "200000002"))) as sim:
        own = "/restapi/v1.0/account/~/extension/200000001/message-store?type=Fax"
        other = "/restapi/v1.0/account/~/extension/200000002/message-store?type=Fax"
        tok = await login(http, sim)
        ws, _ = await connect(http, sim, tok)
        body = {"how": "disabled", "extensions": ["200000002"]}
        status, _ = await control(http, sim, "POST", "faults/refuse-subscriptions", body)
        assert status == 200
        meta, info = await subscribe(ws, [own, other])
        assert meta["status"] == 200
        assert info["eventFilters"] == [own]
        assert info["disabledFilters"] == [
            {
                "filter": other,
                "reason": "PermissionDenied",
                "message": "Not allowed subscribe for messages to other extensions",
            }
        ]
        sim.create_inbound_fax("200000002", "+14155550100")
        assert await barrier(ws) == []  # nothing for the refused extension
        sim.create_inbound_fax("200000001", "+14155550100")
        assert len(await barrier(ws, "hb-2")) == 1

        sim.refuse_subscriptions("forbidden", ["200000002"])
        meta, body = await subscribe(ws, [own, other])
        assert (meta["status"], body["errorCode"]) == (403, "SUB-405")
        meta, _ = await subscribe(ws, [own])
        assert meta["status"] == 200
        sim.refuse_subscriptions("permission")
        meta, body = await subscribe(ws, [own])
        assert (meta["status"], body["errorCode"]) == (403, "SUB-528")
        sim.refuse_subscriptions("off")
        meta, info = await subscribe(ws, [own, other])
        assert meta["status"] == 200
        assert "disabledFilters" not in info
        status, err = await control(http, sim, "POST", "faults/refuse-subscriptions", {"how": "forbidden"})
        assert status == 400
        assert "needs the extensions" in err["error"]
        await ws.close()
