"""Message store REST: single/bulk GET, list, delete, attachment content, message-sync."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from sim_helpers import EXT, bearer, login

from faxd.sim import RecipientScript, SimConfig, Simulator

MULTIPART_JSON = "application/vnd.ringcentral.multipart+json"


@pytest.fixture
async def token(sim: Simulator, http: aiohttp.ClientSession) -> dict[str, Any]:
    return await login(http, sim)


async def get(
    http: aiohttp.ClientSession,
    sim: Simulator,
    token: dict[str, Any],
    path: str,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.get(
        sim.url + EXT + path, headers={**bearer(token), **(headers or {})}, params=params
    ) as resp:
        if resp.content_type == "application/json" or resp.content_type == MULTIPART_JSON:
            body: Any = json.loads(await resp.text())
        else:
            body = await resp.read()
        return resp.status, body, resp


async def test_get_single_message(sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]) -> None:
    mid = sim.create_outbound_fax(None, [RecipientScript("+15550001111", after=100)], pages=2)
    status, body, resp = await get(http, sim, token, f"/message-store/{mid}")
    assert status == 200
    assert resp.content_type == "application/json"
    assert body == sim.message(mid)
    assert body["id"] == int(mid)
    assert body["type"] == "Fax"
    assert body["direction"] == "Outbound"
    assert body["messageStatus"] == "Queued"
    assert body["faxPageCount"] == 2
    assert body["to"][0]["messageStatus"] == "Queued"
    assert body["to"][0]["recipientId"]
    assert body["uri"].endswith(f"/message-store/{mid}")
    # also with explicit ids instead of ~
    ext = sim.config.extensions[0]
    path = f"/restapi/v1.0/account/{sim.config.account_id}/extension/{ext}/message-store/{mid}"
    async with http.get(sim.url + path, headers=bearer(token)) as resp2:
        assert resp2.status == 200


async def test_get_unknown_message_404(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    status, body, _ = await get(http, sim, token, "/message-store/12345")
    assert status == 404
    assert body["errors"][0]["errorCode"] == "CMN-102"


async def test_bulk_get_multipart_json(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    a = sim.create_inbound_fax(None, "+14155550100")
    b = sim.create_outbound_fax(None, [RecipientScript("+15550001111", after=100)])
    status, body, resp = await get(
        http, sim, token, f"/message-store/{a},{b},111", headers={"Accept": MULTIPART_JSON}
    )
    assert status == 207
    assert resp.content_type == MULTIPART_JSON
    assert [e["resourceId"] for e in body] == [a, b, "111"]
    assert [e["status"] for e in body] == [200, 200, 404]
    assert body[0]["body"] == sim.message(a)
    assert body[2]["body"]["errors"][0]["errorCode"] == "CMN-102"


async def test_bulk_get_multipart_mixed(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    a = sim.create_inbound_fax(None, "+14155550100")
    b = sim.create_inbound_fax(None, "+14155550101")
    async with http.get(sim.url + EXT + f"/message-store/{a},{b}", headers=bearer(token)) as resp:
        assert resp.status == 207
        assert resp.content_type == "multipart/mixed"
        reader = aiohttp.MultipartReader(resp.headers, resp.content)
        parts = []
        while True:
            part = await reader.next()
            if part is None:
                break
            assert isinstance(part, aiohttp.BodyPartReader)
            assert part.headers["Content-Type"] == "application/json"
            parts.append(json.loads(await part.text()))
    summary, *records = parts
    assert [r["status"] for r in summary["response"]] == [200, 200]
    assert summary["response"][0]["href"].endswith(f"/message-store/{a}")
    assert summary["response"][0]["responseDescription"] == "OK"
    assert [r["id"] for r in records] == [int(a), int(b)]


async def test_list_filters_and_paging(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    inbound = [sim.create_inbound_fax(None, f"+1415555010{i}") for i in range(3)]
    outbound = sim.create_outbound_fax(None, [RecipientScript("+15550001111", after=100)])
    status, body, _ = await get(http, sim, token, "/message-store", messageType="Fax")
    assert status == 200
    assert {"records", "paging", "navigation", "uri"} <= body.keys()
    assert len(body["records"]) == 4
    assert body["records"][0]["id"] == int(outbound)  # newest first
    status, body, _ = await get(http, sim, token, "/message-store", direction="Inbound", perPage="2")
    assert [r["id"] for r in body["records"]] == [int(inbound[2]), int(inbound[1])]
    assert body["paging"] == {
        "page": 1,
        "perPage": 2,
        "pageStart": 0,
        "pageEnd": 1,
        "totalPages": 2,
        "totalElements": 3,
    }
    next_uri = body["navigation"]["nextPage"]["uri"]
    async with http.get(next_uri, headers=bearer(token)) as resp:
        page2 = await resp.json()
    assert [r["id"] for r in page2["records"]] == [int(inbound[0])]
    assert "nextPage" not in page2["navigation"]
    status, body, _ = await get(http, sim, token, "/message-store", messageType="SMS")
    assert body["records"] == []
    status, body, _ = await get(http, sim, token, "/message-store", messageType="Bogus")
    assert status == 400
    assert body["errors"][0]["errorCode"] == "CMN-101"
    status, body, _ = await get(
        http,
        sim,
        token,
        "/message-store",
        dateFrom="2001-01-01T00:00:00Z",
        dateTo="2001-01-02T00:00:00Z",
    )
    assert body["records"] == []


async def test_delete_marks_deleted_and_hides_from_list(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    mid = sim.create_inbound_fax(None, "+14155550100")
    async with http.delete(sim.url + EXT + f"/message-store/{mid}", headers=bearer(token)) as r:
        assert r.status == 204
        assert r.headers["X-Rate-Limit-Group"] == "medium"
    assert sim.message(mid)["availability"] == "Deleted"
    _, body, _ = await get(http, sim, token, "/message-store")
    assert body["records"] == []
    _, body, _ = await get(http, sim, token, "/message-store", availability="Deleted")
    assert [r["id"] for r in body["records"]] == [int(mid)]


async def test_attachment_content(sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]) -> None:
    mid = sim.create_inbound_fax(None, "+14155550100")
    uri = sim.message(mid)["attachments"][0]["uri"]
    async with http.get(uri, headers=bearer(token)) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/pdf"
        assert (await resp.read()).startswith(b"%PDF")


async def test_message_sync_full_and_incremental(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    old = sim.create_inbound_fax(None, "+14155550100")
    sent = sim.create_outbound_fax(None, [RecipientScript("+15550001111", after=100)])
    status, full, _ = await get(http, sim, token, "/message-sync", syncType="FSync", messageType="Fax")
    assert status == 200
    assert {r["id"] for r in full["records"]} == {int(old), int(sent)}
    info = full["syncInfo"]
    assert info["syncType"] == "FSync"
    assert info["olderRecordsExist"] is False
    assert {"syncToken", "syncTime"} <= info.keys()
    # nothing changed yet
    _, inc, _ = await get(http, sim, token, "/message-sync", syncType="ISync", syncToken=info["syncToken"])
    assert inc["records"] == []
    assert inc["syncInfo"]["syncType"] == "ISync"
    # a fax is sent and finishes (after=0), a new one arrives, the old one is deleted
    fax = sim.create_outbound_fax(None, [RecipientScript("+15550001111", after=0)])
    async with asyncio.timeout(5):
        await sim.wait_for_status(fax, "Sent")
    new = sim.create_inbound_fax(None, "+14155550101")
    async with http.delete(sim.url + EXT + f"/message-store/{old}", headers=bearer(token)) as r:
        assert r.status == 204
    _, inc2, _ = await get(
        http,
        sim,
        token,
        "/message-sync",
        syncType="ISync",
        syncToken=inc["syncInfo"]["syncToken"],
    )
    by_id = {r["id"]: r for r in inc2["records"]}
    assert set(by_id) == {int(fax), int(new), int(old)}
    assert by_id[int(fax)]["messageStatus"] == "Sent"
    assert by_id[int(old)] == {"id": int(old), "availability": "Deleted"}
    _, inc3, _ = await get(
        http,
        sim,
        token,
        "/message-sync",
        syncType="ISync",
        syncToken=inc2["syncInfo"]["syncToken"],
    )
    assert inc3["records"] == []


async def test_message_sync_record_count(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    for i in range(3):
        sim.create_inbound_fax(None, f"+1415555010{i}")
    _, full, _ = await get(http, sim, token, "/message-sync", syncType="FSync", recordCount="2")
    assert len(full["records"]) == 2
    assert full["syncInfo"]["olderRecordsExist"] is True


async def test_message_sync_stale_token_msg_333(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    status, body, _ = await get(http, sim, token, "/message-sync", syncType="ISync", syncToken="made-up")
    assert status == 400
    assert body["errors"][0]["errorCode"] == "MSG-333"
    _, full, _ = await get(http, sim, token, "/message-sync", syncType="FSync")
    assert sim.stale_sync_tokens() == 1
    status, body, _ = await get(
        http,
        sim,
        token,
        "/message-sync",
        syncType="ISync",
        syncToken=full["syncInfo"]["syncToken"],
    )
    assert status == 400
    assert body["errorCode"] == "MSG-333"
    # The other way RingCentral refuses a token (ringcentral-js-widgets handles both alike).
    _, full, _ = await get(http, sim, token, "/message-sync", syncType="FSync")
    assert sim.stale_sync_tokens("CMN-101") == 1
    status, body, _ = await get(
        http, sim, token, "/message-sync", syncType="ISync", syncToken=full["syncInfo"]["syncToken"]
    )
    assert status == 400
    assert body["errors"][0] == {
        "errorCode": "CMN-101",
        "message": "Parameter [syncToken] value is invalid",
        "parameterName": "syncToken",
    }
    with pytest.raises(ValueError, match="code must be one of"):
        sim.stale_sync_tokens("CMN-999")


class _Wall:
    """A wall clock the test moves (creation times and sync frames follow it)."""

    def __init__(self) -> None:
        self.now = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_isync_date_from_redefines_the_sync_frame(http: aiohttp.ClientSession) -> None:
    """The message-sync guide: on an ISync, dateFrom "modifies the time range of SyncFrame"."""
    wall = _Wall()
    async with Simulator(SimConfig(seed=7), wall_clock=wall) as sim:
        token = await login(http, sim)
        start = wall.now
        older = sim.create_inbound_fax(None, "+14155550100")
        wall.now = start + timedelta(days=2)
        newer = sim.create_inbound_fax(None, "+14155550101")
        since = (start - timedelta(days=1)).isoformat()
        _, full, _ = await get(http, sim, token, "/message-sync", syncType="FSync", dateFrom=since)
        assert {r["id"] for r in full["records"]} == {int(older), int(newer)}
        for mid in (older, newer):
            sim.store.delete(sim.store.messages[int(mid)])
        # A later dateFrom shrinks the frame: the change to the older fax is not reported.
        later = (start + timedelta(days=1)).isoformat()
        token_1 = full["syncInfo"]["syncToken"]
        _, shrunk, _ = await get(
            http, sim, token, "/message-sync", syncType="ISync", syncToken=token_1, dateFrom=later
        )
        assert shrunk["records"] == [{"id": int(newer), "availability": "Deleted"}]
        # The same token without dateFrom keeps the frame of the full sync.
        _, kept, _ = await get(http, sim, token, "/message-sync", syncType="ISync", syncToken=token_1)
        assert {r["id"] for r in kept["records"]} == {int(older), int(newer)}
        # An earlier dateFrom widens it: what is alive in the added range comes back in full.
        wall.now = start - timedelta(days=3)
        oldest = sim.create_inbound_fax(None, "+14155550102")
        wall.now = start + timedelta(days=2)
        earlier = (start - timedelta(days=5)).isoformat()
        _, widened, _ = await get(
            http,
            sim,
            token,
            "/message-sync",
            syncType="ISync",
            syncToken=shrunk["syncInfo"]["syncToken"],
            dateFrom=earlier,
        )
        assert [r["id"] for r in widened["records"]] == [int(oldest)]
        assert widened["records"][0]["messageStatus"] == "Received"
