"""The spec validator itself: it finds the spec, catches violations, and sees every kind of body."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from fidelity.spec import SpecMissing, SpecValidator, spec_path

from faxd.sim import SimConfig, Simulator
from faxd.sim.observe import ServedJson

EXT = "/restapi/v1.0/account/~/extension/~"
FILTERS = [EXT + "/fax?direction=Inbound", EXT + "/message-store?type=Fax"]
PDF = b"%PDF-1.4\n1 0 obj<</Type/Page>>endobj\n%%EOF\n"
MESSAGE = "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-store/{messageId}"


async def test_a_missing_spec_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FAXD_RC_SPEC", str(tmp_path / "nope.yml"))
    with pytest.raises(SpecMissing, match=r"OpenAPI spec is missing: expected .*nope\.yml"):
        spec_path()


async def test_the_validator_rejects_what_the_spec_forbids(rc_spec_validation: SpecValidator) -> None:
    v = rc_spec_validation

    def check(body: object, status: int = 200, path: str = MESSAGE) -> list[str]:
        return v.check(ServedJson("http", "response", "GET", path, status, "application/json", body))

    assert check({"id": 1, "type": "Fax", "messageStatus": "Sent"}) == []
    assert any("'Lost' is not one of" in e for e in check({"id": 1, "messageStatus": "Lost"}))
    assert any("is not of type 'integer'" in e for e in check({"id": "1"}))
    assert any("date-time" in e for e in check({"creationTime": "yesterday"}))
    assert any("'errors' is a required property" in e for e in check({"errorCode": "CMN-102"}, 404))
    token = v.check(
        ServedJson("http", "response", "POST", "/restapi/oauth/token", 200, "application/json", {})
    )
    assert any("'access_token' is a required property" in e for e in token)
    note = ServedJson(
        "ws",
        "ServerNotification",
        "",
        "/restapi/v1.0/account/1/extension/2/message-store",
        200,
        "application/json",
        {"body": {"changes": [{"type": "Fax", "newCount": "1"}]}},
    )
    assert any("is not of type 'integer'" in e for e in v.check(note))
    unknown = ServedJson("ws", "ServerNotification", "", "/restapi/v1.0/account/1/presence", 200, "", {})
    assert any("no schema" in e for e in v.check(unknown))


async def test_every_kind_of_body_is_validated(rc_spec_validation: SpecValidator) -> None:
    """Drive every endpoint (successes and errors) and check the validator saw each one."""
    v = rc_spec_validation
    before = dict(v.seen)
    config = SimConfig(seed=1, rate_limits={**SimConfig().rate_limits, "Light": (5, 60, 60)})
    async with Simulator(config) as sim, aiohttp.ClientSession() as http:
        cfg = sim.config
        async with http.post(
            sim.url + "/restapi/oauth/token",
            data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": cfg.jwt},
            headers={"Authorization": aiohttp.encode_basic_auth(cfg.client_id, cfg.client_secret)},
        ) as r:
            auth = {"Authorization": "Bearer " + (await r.json())["access_token"]}
        async with http.post(sim.url + "/restapi/oauth/wstoken", headers=auth) as r:
            wst = await r.json()
        base = sim.url + EXT
        async with http.ws_connect(f"{wst['uri']}?access_token={wst['ws_access_token']}") as ws:
            meta = {
                "type": "ClientRequest",
                "messageId": "1",
                "method": "POST",
                "path": "/restapi/v1.0/subscription",
            }
            await ws.receive_json()  # ConnectionDetails
            await ws.send_json(
                [meta, {"eventFilters": FILTERS, "deliveryMode": {"transportType": "WebSocket"}}]
            )
            assert (await ws.receive_json())[0]["status"] == 200
            inbound = sim.create_inbound_fax(None, "+14155550100")
            for _ in FILTERS:
                assert (await ws.receive_json())[0]["type"] == "ServerNotification"
        form = aiohttp.FormData()
        form.add_field("json", '{"to": [{"phoneNumber": "+16505550100"}]}', content_type="application/json")
        form.add_field("attachment", PDF, filename="a.pdf", content_type="application/pdf")
        async with http.post(base + "/fax", data=form, headers=auth) as r:
            assert r.status == 200
        for url, headers in (
            (f"{base}/message-store/{inbound}", auth),
            (f"{base}/message-store/{inbound},1", auth),
            (f"{base}/message-store", {}),
            (f"{base}/message-sync?syncToken=bogus", auth),
            (f"{base}/message-store", auth),
            (f"{base}/message-store", auth),
        ):
            async with http.get(url, headers=headers) as r:
                await r.read()
    seen = {k for k, n in v.seen.items() if n > before.get(k, 0)}
    kinds = {(k[0], k[3]) for k in seen}
    assert {
        ("response", 200),
        ("response", 401),
        ("response", 429),
        ("response", 400),
    } <= kinds
    assert {("part", 200), ("part", 404), ("ClientRequest", 200), ("ConnectionDetails", 200)} <= kinds
    events = {k[2].rsplit("/", 1)[1] for k in seen if k[0] == "ServerNotification"}
    assert events == {"fax?direction=Inbound", "message-store?type=Fax"}
