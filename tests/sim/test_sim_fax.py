"""POST …/fax in every encoding the SDKs use, its errors, and the fax lifecycle engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from sim_helpers import EXT, FAX_FILTER, PDF, bearer, connect, login, next_notification, subscribe

from faxd.sim import RecipientScript, SimConfig, Simulator


@pytest.fixture
async def token(sim: Simulator, http: aiohttp.ClientSession) -> dict[str, Any]:
    return await login(http, sim)


def json_part_form(
    envelope: dict[str, Any], json_name: str = "json", file_name: str = "attachment"
) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(json_name, json.dumps(envelope), content_type="application/json", filename="request.json")
    form.add_field(file_name, PDF, content_type="application/pdf", filename="doc.pdf")
    return form


async def send(
    http: aiohttp.ClientSession,
    sim: Simulator,
    token: dict[str, Any],
    data: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        sim.url + EXT + "/fax", data=data, headers={**bearer(token), **(headers or {})}
    ) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("json_name", "file_name"),
    [("json", "attachment"), ("request.json", "attachments")],
)
async def test_send_fax_form_data_json_part(
    sim: Simulator,
    http: aiohttp.ClientSession,
    token: dict[str, Any],
    json_name: str,
    file_name: str,
) -> None:
    envelope = {
        "to": [{"phoneNumber": "+15551234567", "name": "Bob"}],
        "faxResolution": "High",
        "coverPageText": "hello",
    }
    status, body = await send(http, sim, token, json_part_form(envelope, json_name, file_name))
    assert status == 200, body
    assert body["messageStatus"] == "Queued"
    assert body["type"] == "Fax"
    assert body["direction"] == "Outbound"
    assert body["faxResolution"] == "High"
    assert body["coverPageText"] == "hello"
    assert body["coverIndex"] == sim.config.default_cover_index == 1  # none asked: the account's default
    assert body["faxPageCount"] == 2
    assert isinstance(body["id"], int)
    (to,) = body["to"]
    assert to["phoneNumber"] == "+15551234567"
    assert to["name"] == "Bob"
    assert to["messageStatus"] == "Queued"
    assert to["recipientId"]
    assert sim.message(str(body["id"]))["messageStatus"] == "Queued"
    rec = sim.requests_to("/fax")
    assert [(r.group, r.status) for r in rec] == [("Heavy", 200)]


async def test_send_fax_plain_form_fields(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    form = aiohttp.FormData()
    form.add_field("to", "+15551234567")
    form.add_field("to", "(555) 123-4568")
    form.add_field("faxResolution", "Low")
    form.add_field("coverIndex", "0")
    form.add_field("attachment", PDF, content_type="application/pdf", filename="a.pdf")
    status, body = await send(http, sim, token, form)
    assert status == 200, body
    assert [t["phoneNumber"] for t in body["to"]] == ["+15551234567", "+15551234568"]
    assert body["coverIndex"] == 0
    assert body["faxResolution"] == "Low"


async def test_send_fax_multipart_mixed(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    with aiohttp.MultipartWriter("mixed") as mp:
        mp.append_json({"to": [{"phoneNumber": "+15551234567"}]})
        mp.append(b"plain text document", {"Content-Type": "text/plain"})
    status, body = await send(http, sim, token, mp)
    assert status == 200, body
    assert body["to"][0]["phoneNumber"] == "+15551234567"
    assert body["faxPageCount"] == 1


@pytest.mark.parametrize(
    ("envelope", "with_file", "status", "code"),
    [
        ({"to": [{"phoneNumber": "+15551234567"}]}, False, 400, "MSG-347"),
        ({"to": [{"phoneNumber": "not a number"}]}, True, 400, "CMN-101"),
        ({"to": [{"phoneNumber": "123"}]}, True, 400, "CMN-101"),
        ({"to": []}, True, 400, "CMN-101"),
        ({"to": [{"phoneNumber": "+15551234567"}], "faxResolution": "Ultra"}, True, 400, "CMN-101"),
    ],
)
async def test_send_fax_errors(
    sim: Simulator,
    http: aiohttp.ClientSession,
    token: dict[str, Any],
    envelope: dict[str, Any],
    with_file: bool,
    status: int,
    code: str,
) -> None:
    form = aiohttp.FormData()
    form.add_field("json", json.dumps(envelope), content_type="application/json")
    if with_file:
        form.add_field("attachment", PDF, content_type="application/pdf", filename="a.pdf")
    else:
        form.add_field("unrelated", "x")  # keep it multipart
    got, body = await send(http, sim, token, form)
    assert got == status
    assert body["errors"][0]["errorCode"] == code
    assert sim.store.messages == {}


async def test_send_fax_unsupported_media_type(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    status, body = await send(http, sim, token, b"hello", headers={"Content-Type": "text/plain"})
    assert status == 415
    assert body["errors"][0]["errorCode"] == "MSG-348"


async def test_send_fax_is_announced_as_new(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    ws, _ = await connect(http, sim, token)
    await subscribe(ws, [FAX_FILTER])
    status, body = await send(http, sim, token, json_part_form({"to": [{"phoneNumber": "+15551234567"}]}))
    assert status == 200
    _, env = await next_notification(ws)
    assert env["body"]["changes"][0]["newMessageIds"] == [body["id"]]
    await ws.close()


# -- lifecycle --------------------------------------------------------------------------------


async def wait_status(sim: Simulator, mid: str, status: str, limit: float = 60) -> float:
    """Loop seconds until the fax reaches ``status`` (event-driven, fake time)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(limit):
        await sim.wait_for_status(mid, status)
    return loop.time() - start


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("suffix", "status", "error"),
    [
        ("0001", "SendingFailed", "LineBusy"),
        ("0002", "SendingFailed", "NoAnswer"),
        ("0003", "SendingFailed", "InvalidNumber"),
        ("5555", "Sent", None),
    ],
)
async def test_magic_numbers(
    sim: Simulator,
    http: aiohttp.ClientSession,
    token: dict[str, Any],
    suffix: str,
    status: str,
    error: str | None,
) -> None:
    _, body = await send(http, sim, token, json_part_form({"to": [{"phoneNumber": "+1555123" + suffix}]}))
    mid = str(body["id"])
    took = await wait_status(sim, mid, status)
    low, high = sim.config.default_delay
    if suffix == "0003":
        assert took < low  # fails fast
    else:
        assert low - 0.1 <= took <= high + 0.1
    recipient = sim.message(mid)["to"][0]
    assert recipient["messageStatus"] == status
    assert recipient.get("faxErrorCode") == error


@pytest.mark.looptime
async def test_magic_number_delivered(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    _, body = await send(http, sim, token, json_part_form({"to": [{"phoneNumber": "+15551230004"}]}))
    mid = str(body["id"])
    await wait_status(sim, mid, "Sent")
    await wait_status(sim, mid, "Delivered")


@pytest.mark.looptime
async def test_set_outcome_scripts_api_faxes(
    sim: Simulator, http: aiohttp.ClientSession, token: dict[str, Any]
) -> None:
    sim.set_outcome("+1 555 123 0001", RecipientScript("x", "Sent", after=7))
    _, body = await send(http, sim, token, json_part_form({"to": [{"phoneNumber": "+15551230001"}]}))
    took = await wait_status(sim, str(body["id"]), "Sent")
    assert took == pytest.approx(7, abs=0.1)


@pytest.mark.looptime
async def test_aggregate_status_and_last_modified(http: aiohttp.ClientSession) -> None:
    async with Simulator(SimConfig()) as sim:
        mid = sim.create_outbound_fax(
            None,
            [
                RecipientScript("+15550000010", "Sent", after=2, delivered_after=3),
                RecipientScript("+15550000020", "SendingFailed", "CallFailed", after=4),
                RecipientScript("+15550000030", "Sent", after=6, delivered_after=1),
            ],
        )
        seen = [sim.message(mid)]
        for t in (2.5, 4.5, 5.5, 6.5, 7.5):
            await asyncio.sleep(t - asyncio.get_running_loop().time())
            seen.append(sim.message(mid))
        assert [m["messageStatus"] for m in seen] == [
            "Queued",  # 0: all queued
            "Queued",  # 2.5: one sent, others queued
            "Queued",  # 4.5: one failed, one still queued
            "Queued",  # 5.5: first delivered, third still queued
            "SendingFailed",  # 6.5: none queued, one failed
            "SendingFailed",  # 7.5: third delivered too; the failure still dominates
        ]
        final = seen[-1]["to"]
        assert [r["messageStatus"] for r in final] == ["Delivered", "SendingFailed", "Delivered"]
        assert final[1]["faxErrorCode"] == "CallFailed"
        stamps = [m["lastModifiedTime"] for m in seen]
        assert stamps == sorted(stamps)
        assert len(set(stamps)) == len(stamps)


@pytest.mark.looptime
async def test_all_delivered_is_delivered() -> None:
    async with Simulator() as sim:
        mid = sim.create_outbound_fax(None, [RecipientScript("+15550000010", after=1, delivered_after=1)])
        await asyncio.sleep(1.5)
        assert sim.message(mid)["messageStatus"] == "Sent"
        await asyncio.sleep(1)
        assert sim.message(mid)["messageStatus"] == "Delivered"


def test_recipient_script_validation() -> None:
    assert RecipientScript("1", "SendingFailed").error_code == "LineBusy"
    with pytest.raises(ValueError, match="outcome"):
        RecipientScript("1", "Delivered")
    with pytest.raises(ValueError, match="error_code"):
        RecipientScript("1", "Sent", error_code="LineBusy")
