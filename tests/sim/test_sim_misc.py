"""Spec-schema conformance of responses, the websockets client, the loop wall clock, the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from email.feedparser import FeedParser
from typing import Any

import aiohttp
import pytest
import websockets
from fidelity.spec import load_spec
from sim_helpers import EXT, FAX_FILTER, PDF, bearer, connect, login, subscribe, ws_token

from faxd.sim import RecipientScript, SimConfig, Simulator, loop_wall_clock
from faxd.sim.cli import _listen, banner, build_parser


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    result: dict[str, Any] = load_spec()["components"]["schemas"]
    return result


def validate(schemas: dict[str, Any], name: str, instance: Any) -> None:
    import jsonschema  # type: ignore[import-untyped]

    # OpenAPI 3.0 schemas are close enough to draft 4 for these components
    root = {"components": {"schemas": schemas}, **schemas[name]}
    jsonschema.Draft4Validator(root, format_checker=jsonschema.FormatChecker()).validate(instance)


async def test_responses_match_spec_schemas(
    schemas: dict[str, Any], sim: Simulator, http: aiohttp.ClientSession
) -> None:
    tok = await login(http, sim)
    validate(schemas, "TokenInfo", tok)
    validate(schemas, "WsTokenResponse", await ws_token(http, sim, tok))
    mid = sim.create_outbound_fax(None, [RecipientScript("+15550001111", "SendingFailed", after=0)])
    inbound = sim.create_inbound_fax(None, "+14155550100")
    async with asyncio.timeout(5):
        await sim.wait_for_status(mid, "SendingFailed")
    validate(schemas, "GetMessageInfoResponse", sim.message(mid))
    validate(schemas, "GetMessageInfoResponse", sim.message(inbound))
    async with http.get(sim.url + EXT + "/message-store", headers=bearer(tok)) as resp:
        validate(schemas, "GetMessageList", await resp.json())
    async with http.get(sim.url + EXT + "/message-sync?syncType=FSync", headers=bearer(tok)) as r:
        validate(schemas, "GetMessageSyncResponse", await r.json())
    async with http.get(
        sim.url + EXT + f"/message-store/{mid},{inbound}",
        headers={**bearer(tok), "Accept": "application/vnd.ringcentral.multipart+json"},
    ) as resp:
        validate(schemas, "GetMessageMultiResponse", json.loads(await resp.text()))
    form = aiohttp.FormData()
    form.add_field(
        "json", json.dumps({"to": [{"phoneNumber": "+15551234567"}]}), content_type="application/json"
    )
    form.add_field("attachment", PDF, content_type="application/pdf", filename="a.pdf")
    async with http.post(sim.url + EXT + "/fax", data=form, headers=bearer(tok)) as resp:
        validate(schemas, "FaxResponse", await resp.json())
    async with http.get(sim.url + EXT + "/message-store/1", headers=bearer(tok)) as resp:
        validate(schemas, "ApiErrorResponseModel", await resp.json())
    ws, _ = await connect(http, sim, tok)
    _meta, info = await subscribe(ws, [FAX_FILTER])
    validate(schemas, "SubscriptionInfo", info)
    await ws.close()


async def test_multipart_mixed_parses_like_the_python_sdk(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    tok = await login(http, sim)
    a = sim.create_inbound_fax(None, "+14155550100")
    async with http.get(sim.url + EXT + f"/message-store/{a},999", headers=bearer(tok)) as resp:
        parser = FeedParser()
        for key, value in resp.headers.items():
            parser.feed(f"{key}:{value}\r\n")
        parser.feed("\r\n")
        parser.feed(await resp.text())
    payload = parser.close().get_payload()
    assert isinstance(payload, list)
    parts = [json.loads(str(part.get_payload())) for part in payload if not isinstance(part, str)]
    statuses = parts[0]
    assert len(statuses["response"]) == len(parts) - 1 == 2
    assert parts[1]["id"] == int(a)
    assert parts[2]["errors"][0]["errorCode"] == "CMN-102"


async def test_websockets_client_ping_and_frames(sim: Simulator, http: aiohttp.ClientSession) -> None:
    tok = await login(http, sim)
    wst = await ws_token(http, sim, tok)
    async with websockets.connect(f"{wst['uri']}?access_token={wst['ws_access_token']}") as ws:
        details = json.loads(await ws.recv())
        assert details[0]["type"] == "ConnectionDetails"
        pong = await ws.ping()
        async with asyncio.timeout(5):
            await pong
        await ws.send(
            json.dumps(
                [
                    {
                        "type": "ClientRequest",
                        "messageId": "m1",
                        "method": "POST",
                        "path": "/restapi/v1.0/subscription/",
                    },
                    {
                        "eventFilters": ["/restapi/v1.0/account/~/extension/~/fax?direction=Inbound"],
                        "deliveryMode": {"transportType": "WebSocket"},
                    },
                ]
            )
        )
        reply = json.loads(await ws.recv())
        assert reply[0]["headers"]["WSG-SubscriptionId"] == reply[1]["id"]


@pytest.mark.looptime
async def test_loop_wall_clock_moves_with_fake_time() -> None:
    async with Simulator(SimConfig(), wall_clock=loop_wall_clock()) as sim:
        mid = sim.create_outbound_fax(None, [RecipientScript("+15550001111", after=300)])
        await asyncio.sleep(301)
        record = sim.message(mid)
        created = record["creationTime"]
        modified = record["lastModifiedTime"]
    from faxd.sim.common import parse_iso

    assert (parse_iso(modified) - parse_iso(created)).total_seconds() == pytest.approx(300, abs=1)


def test_cli_parsing_and_banner() -> None:
    assert _listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert _listen("[::1]:9") == ("::1", 9)
    args = build_parser().parse_args(["--listen", "127.0.0.1:0", "--seed", "5"])
    assert args.seed == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--listen", "nope"])
    sim = Simulator()
    sim.url = "http://127.0.0.1:1234"
    text = banner(sim)
    assert "http://127.0.0.1:1234" in text
    assert sim.config.client_secret in text
    assert sim.config.jwt in text


async def test_cli_runs_until_sigint(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "faxd.sim",
        "--listen",
        "127.0.0.1:0",
        "--seed",
        "1",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        async with http.get(url + "/_sim/info") as resp:
            assert (await resp.json())["url"] == url
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            rest = await proc.stdout.read()
            code = await proc.wait()
    assert code == 0
    assert b"stopped" in rest
