"""Per-group rate limits: headers, 429 + Retry-After, the penalty trap, storms, recording."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from sim_helpers import EXT, bearer, login

from faxd.sim import SimConfig, Simulator


async def list_messages(
    http: aiohttp.ClientSession, sim: Simulator, token: dict[str, Any]
) -> tuple[int, dict[str, str], Any]:
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(token)) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_headers_on_every_response(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    status, headers, _ = await list_messages(http, sim, tok)
    assert status == 200
    assert headers["X-Rate-Limit-Group"] == "light"
    assert headers["X-Rate-Limit-Limit"] == "50"
    assert headers["X-Rate-Limit-Remaining"] == "49"
    assert headers["X-Rate-Limit-Window"] == "60"
    # errors carry them too
    status, headers, _ = await list_messages(http, sim, {"access_token": "bad"})
    assert status == 401
    assert headers["X-Rate-Limit-Remaining"] == "48"


async def test_auth_group_429(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)  # 1 of 5
    for _ in range(4):
        async with http.post(sim.url + "/restapi/oauth/wstoken", headers=bearer(tok)) as resp:
            assert resp.status == 200
    async with http.post(sim.url + "/restapi/oauth/wstoken", headers=bearer(tok)) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "60"
        assert resp.headers["X-Rate-Limit-Group"] == "auth"
        assert resp.headers["X-Rate-Limit-Remaining"] == "0"
        body = await resp.json()
    assert body["errorCode"] == "CMN-301"
    assert body["message"] == "Request rate exceeded"
    assert body["errors"][0]["errorCode"] == "CMN-301"
    spent = [r for r in sim.requests if r.group == "Auth"]
    assert [r.status for r in spent] == [200] * 5 + [429]
    # other groups are unaffected
    assert (await list_messages(http, sim, tok))[0] == 200


@pytest.mark.looptime
async def test_penalty_restarts_on_requests_during_it(http: aiohttp.ClientSession) -> None:
    config = SimConfig(rate_limits={"Light": (2, 60, 60), "Auth": (5, 60, 60)})
    async with Simulator(config) as sim:
        tok = await login(http, sim)
        assert (await list_messages(http, sim, tok))[0] == 200
        assert (await list_messages(http, sim, tok))[0] == 200
        assert (await list_messages(http, sim, tok))[0] == 429  # penalty starts at t=0
        await asyncio.sleep(50)
        assert (await list_messages(http, sim, tok))[0] == 429  # restarts: now ends at t=110
        await asyncio.sleep(50)
        assert (await list_messages(http, sim, tok))[0] == 429  # t=100: restarts again
        await asyncio.sleep(61)
        status, headers, _ = await list_messages(http, sim, tok)
        assert status == 200
        assert headers["X-Rate-Limit-Remaining"] == "1"


@pytest.mark.looptime
async def test_sliding_window(http: aiohttp.ClientSession) -> None:
    config = SimConfig(rate_limits={"Light": (3, 60, 60), "Auth": (5, 60, 60)})
    async with Simulator(config) as sim:
        tok = await login(http, sim)
        assert (await list_messages(http, sim, tok))[0] == 200  # t=0
        await asyncio.sleep(30)
        assert (await list_messages(http, sim, tok))[0] == 200  # t=30
        assert (await list_messages(http, sim, tok))[0] == 200  # t=30
        await asyncio.sleep(31)  # t=61: the t=0 request left the window
        status, headers, _ = await list_messages(http, sim, tok)
        assert status == 200
        assert headers["X-Rate-Limit-Remaining"] == "0"


async def test_disabled_limits_never_429(http: aiohttp.ClientSession) -> None:
    config = SimConfig(rate_limits={"Light": (1, 60, 60), "Auth": (5, 60, 60)})
    config.rate_limits_enabled = False
    async with Simulator(config) as sim:
        tok = await login(http, sim)
        for _ in range(3):
            status, headers, _ = await list_messages(http, sim, tok)
            assert status == 200
            assert "X-Rate-Limit-Limit" in headers


@pytest.mark.looptime
async def test_storm_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    sim.rate_limit_storm("Light", 30)
    status, headers, body = await list_messages(http, sim, tok)
    assert status == 429
    assert headers["Retry-After"] == "30"
    assert body["errorCode"] == "CMN-301"
    await asyncio.sleep(31)
    assert (await list_messages(http, sim, tok))[0] == 200


async def test_a_request_counted_in_another_group(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """The server's group (limits and X-Rate-Limit-Group) can differ from the spec's table."""
    tok = await login(http, sim)
    status, _ = await control_post(
        http, sim, "faults/rate-limit-group", {"method": "GET", "path": "/message-sync", "group": "Heavy"}
    )
    assert status == 200
    async with http.get(sim.url + EXT + "/message-sync", headers=bearer(tok)) as resp:
        assert resp.status == 200
        assert resp.headers["X-Rate-Limit-Group"] == "heavy"
        assert resp.headers["X-Rate-Limit-Limit"] == "10"
    assert sim.requests[-1].group == "Heavy"
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
        assert resp.headers["X-Rate-Limit-Group"] == "light"  # the others keep the spec's group
    status, _ = await control_post(
        http, sim, "faults/rate-limit-group", {"method": "GET", "path": "/message-sync", "group": "Nope"}
    )
    assert status == 400


async def control_post(
    http: aiohttp.ClientSession, sim: Simulator, path: str, body: dict[str, str]
) -> tuple[int, object]:
    async with http.post(sim.url + "/_sim/" + path, json=body) as resp:
        return resp.status, await resp.json()
