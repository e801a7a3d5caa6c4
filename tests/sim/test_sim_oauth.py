"""OAuth flows and errors, wstoken, and the 401 shapes of API calls."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from sim_helpers import EXT, JWT_GRANT, basic, bearer, login, ws_token

from faxd.sim import SimConfig, Simulator

REQUIRED = {"access_token", "expires_in", "scope", "token_type", "session_id"}


async def post_token(
    http: aiohttp.ClientSession, sim: Simulator, data: dict[str, str], auth: str | None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": auth} if auth else {}
    async with http.post(sim.url + "/restapi/oauth/token", data=data, headers=headers) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def get_list(http: aiohttp.ClientSession, sim: Simulator, headers: dict[str, str]) -> Any:
    async with http.get(sim.url + EXT + "/message-store", headers=headers) as resp:
        return resp.status, await resp.json()


async def test_jwt_grant_returns_token_info(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    assert tok.keys() >= REQUIRED
    assert tok["token_type"] == "bearer"
    assert tok["expires_in"] == 3600
    assert tok["refresh_token_expires_in"] == 604800
    assert tok["owner_id"] == sim.config.extensions[0]
    assert tok["refresh_token"]
    assert tok["endpoint_id"]
    status, body = await get_list(http, sim, bearer(tok))
    assert status == 200, body


async def test_each_jwt_grant_is_a_new_session(sim: Simulator, http: aiohttp.ClientSession) -> None:
    a = await login(http, sim)
    b = await login(http, sim)
    assert a["session_id"] != b["session_id"]


async def test_client_id_in_body_and_ttl_params_are_tolerated(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, tok = await post_token(
        http,
        sim,
        {
            "grant_type": JWT_GRANT,
            "assertion": sim.config.jwt,
            "client_id": sim.config.client_id,
            "access_token_ttl": "600",
            "refresh_token_ttl": "604800",
        },
        None,
    )
    assert status == 200, tok
    assert tok["expires_in"] == 600


@pytest.mark.parametrize(
    ("auth", "data", "status", "error", "code"),
    [
        (None, {}, 401, "invalid_client", "OAU-123"),
        ("Basic " + "Zm9vOmJhcg==", {}, 401, "invalid_client", "OAU-146"),
        ("good", {"assertion": "wrong-jwt"}, 400, "invalid_grant", "OAU-140"),
        ("good", {"grant_type": "password"}, 400, "unsupported_grant_type", "OAU-112"),
    ],
)
async def test_token_errors(
    sim: Simulator,
    http: aiohttp.ClientSession,
    auth: str | None,
    data: dict[str, str],
    status: int,
    error: str,
    code: str,
) -> None:
    form = {"grant_type": JWT_GRANT, "assertion": sim.config.jwt, **data}
    got, body = await post_token(http, sim, form, basic(sim) if auth == "good" else auth)
    assert got == status
    assert body["error"] == error
    assert body["errors"][0]["errorCode"] == code


async def test_refresh_invalidates_old_access_token_and_is_single_use(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    first = await login(http, sim)
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    status, second = await post_token(http, sim, form, basic(sim))
    assert status == 200, second
    assert second["session_id"] == first["session_id"]
    assert second["access_token"] != first["access_token"]
    status, body = await get_list(http, sim, bearer(first))
    assert status == 401
    assert body["errors"][0]["errorCode"] == "OAU-128"
    status, body = await get_list(http, sim, bearer(second))
    assert status == 200
    status, body = await post_token(http, sim, form, basic(sim))
    assert status == 400
    assert body["error"] == "invalid_grant"


async def test_refresh_with_extra_params_like_the_sdks(sim: Simulator, http: aiohttp.ClientSession) -> None:
    first = await login(http, sim)
    form = {
        "grant_type": "refresh_token",
        "refresh_token": first["refresh_token"],
        "access_token_ttl": "3600",
        "refresh_token_ttl": "604800",
        "client_id": sim.config.client_id,
    }
    status, body = await post_token(http, sim, form, None)
    assert status == 200, body
    assert body["refresh_token"] != first["refresh_token"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "OAU-123"),
        ({"Authorization": "Bearer garbage"}, "OAU-129"),
    ],
)
async def test_api_call_auth_errors(
    sim: Simulator, http: aiohttp.ClientSession, headers: dict[str, str], code: str
) -> None:
    status, body = await get_list(http, sim, headers)
    assert status == 401
    assert body["errors"][0]["errorCode"] == code
    assert body["errorCode"] == code


@pytest.mark.looptime
async def test_access_token_expires_on_loop_time(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig(access_token_ttl=600)) as sim:
        tok = await login(http, sim)
        assert tok["expires_in"] == 600
        await asyncio.sleep(599)
        assert (await get_list(http, sim, bearer(tok)))[0] == 200
        await asyncio.sleep(2)
        status, body = await get_list(http, sim, bearer(tok))
        assert status == 401
        assert body["errors"][0]["errorCode"] == "OAU-128"


async def test_expire_access_tokens_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    assert sim.expire_access_tokens() == 1
    status, body = await get_list(http, sim, bearer(tok))
    assert (status, body["errors"][0]["errorCode"]) == (401, "OAU-128")
    form = {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]}
    status, fresh = await post_token(http, sim, form, basic(sim))
    assert status == 200
    assert (await get_list(http, sim, bearer(fresh)))[0] == 200


async def test_revoke_kills_the_whole_session(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    other = await login(http, sim)
    async with http.post(
        sim.url + "/restapi/oauth/revoke",
        data={"token": tok["access_token"]},
        headers={"Authorization": basic(sim)},
    ) as resp:
        assert resp.status == 200
    assert (await get_list(http, sim, bearer(tok)))[0] == 401
    status, body = await post_token(
        http, sim, {"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]}, basic(sim)
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await get_list(http, sim, bearer(other)))[0] == 200


async def test_wstoken_lowercase_bearer_any_content_type(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    async with http.post(
        sim.url + "/restapi/oauth/wstoken",
        headers={
            "Authorization": f"bearer {tok['access_token']}",
            "Content-Type": "application/json",
        },
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["uri"] == sim.url.replace("http://", "ws://") + "/ws"
    assert "?" not in body["uri"]
    assert body["ws_access_token"]
    assert body["expires_in"] == sim.config.ws_token_ttl
    # the token can be used twice within its lifetime (@rc-ex/ws does that)
    for _ in range(2):
        ws = await http.ws_connect(f"{body['uri']}?access_token={body['ws_access_token']}")
        msg = await ws.receive_json()
        assert msg[0]["type"] == "ConnectionDetails"
        await ws.close()


async def test_wstoken_requires_a_valid_token(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with http.post(
        sim.url + "/restapi/oauth/wstoken", headers={"Authorization": "Bearer nope"}
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["errors"][0]["errorCode"] == "OAU-129"
    tok = await login(http, sim)
    body = await ws_token(http, sim, tok)
    assert body["ws_access_token"].startswith("WSAT")
