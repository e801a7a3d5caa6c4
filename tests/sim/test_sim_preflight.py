"""The simulator modes ``faxd doctor`` is tested with, driven through the control API as an integration
would drive them: ``GET /restapi`` and readExtension, a skewed ``Date``, a token scope, message reads
refused with 403 ``CMN-408``, subscriptions refused (``SUB-405``/``SUB-528``) or answered with
``disabledFilters``. Every body is checked against the spec (autouse fixture)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
from sim_helpers import EXT, bearer, login

from faxd.sim import SimConfig, Simulator

OWNER, OTHER = "200000001", "200000002"
OTHER_FILTER = f"/restapi/v1.0/account/~/extension/{OTHER}/message-store?type=Fax"


@pytest.fixture
def config() -> SimConfig:
    return SimConfig(seed=7, extensions=(OWNER, OTHER))


async def control(http: aiohttp.ClientSession, sim: Simulator, fault: str, body: dict[str, Any]) -> int:
    async with http.post(f"{sim.url}/_sim/faults/{fault}", json=body) as resp:
        return resp.status


async def test_api_versions_and_extension_info(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/restapi") as resp:
        assert resp.status == 401, "the spec's OAuth security applies to readAPIVersions too"
        assert "X-Rate-Limit-Group" not in resp.headers, "NoThrottling"
    token = await login(http, sim)
    async with http.get(sim.url + "/restapi", headers=bearer(token)) as resp:
        assert resp.status == 200
        assert (await resp.json())["apiVersions"][0]["uriString"] == "v1.0"
    async with http.get(sim.url + EXT, headers=bearer(token)) as resp:
        assert resp.status == 200
        assert resp.headers["X-Rate-Limit-Group"] == "light"
        info = await resp.json()
    assert (info["id"], info["status"], info["type"]) == (int(OWNER), "Enabled", "User")
    async with http.get(sim.url + "/restapi/v1.0/account/~/extension/999", headers=bearer(token)) as resp:
        assert resp.status == 404
        assert (await resp.json())["errorCode"] == "CMN-102"
    assert [r.group for r in sim.requests if r.path.endswith("{extensionId}")] == ["Light", "Light"]


async def test_skew_date(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert await control(http, sim, "skew-date", {"seconds": 600}) == 200
    async with http.get(sim.url + "/restapi") as resp:
        served = parsedate_to_datetime(resp.headers["Date"])
    assert 595 < (served - datetime.now(UTC)).total_seconds() < 605
    assert await control(http, sim, "skew-date", {"seconds": 0}) == 200
    async with http.get(sim.url + "/restapi") as resp:
        served = parsedate_to_datetime(resp.headers["Date"])
    assert abs((served - datetime.now(UTC)).total_seconds()) < 5


async def test_token_scope(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert (await login(http, sim))["scope"].split() == [
        "ReadMessages", "Faxes", "EditMessages", "WebSocket", "SubscriptionWebSocket", "ReadAccounts",
    ]  # fmt: skip
    assert await control(http, sim, "token-scope", {"scope": "ReadMessages"}) == 200
    assert (await login(http, sim))["scope"] == "ReadMessages"
    assert await control(http, sim, "token-scope", {}) == 400


async def test_deny_message_reads(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert await control(http, sim, "deny-message-reads", {"extensionIds": [OTHER]}) == 200
    token = await login(http, sim)
    other = f"/restapi/v1.0/account/~/extension/{OTHER}"
    for path in ("/message-store", "/message-sync?syncType=FSync", "/message-store/1"):
        async with http.get(sim.url + other + path, headers=bearer(token)) as resp:
            assert resp.status == 403, path
            body = await resp.json()
        assert body["errorCode"] == "CMN-408"
        assert body["errors"][0]["permissionName"] == "ReadMessages"
    async with http.get(sim.url + other, headers=bearer(token)) as resp:
        assert resp.status == 200, "the extension itself stays visible"
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(token)) as resp:
        assert resp.status == 200, "only the named extension is refused"
    assert await control(http, sim, "deny-message-reads", {"extensionIds": []}) == 200
    async with http.get(sim.url + other + "/message-store", headers=bearer(token)) as resp:
        assert resp.status == 200
    assert await control(http, sim, "deny-message-reads", {"extensionIds": ["999"]}) == 400
