"""Loopback helpers shared by the simulator tests (plain functions, no fixtures)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp

from faxd.sim import Simulator

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FAX_FILTER = "/restapi/v1.0/account/~/extension/~/message-store?type=Fax"
INBOUND_FILTER = "/restapi/v1.0/account/~/extension/~/fax?direction=Inbound"
EXT = "/restapi/v1.0/account/~/extension/~"
PDF = b"%PDF-1.4\n1 0 obj<</Type/Page>>endobj\n2 0 obj<</Type/Page>>endobj\n%%EOF\n"


def basic(sim: Simulator) -> str:
    raw = f"{sim.config.client_id}:{sim.config.client_secret}".encode()
    return "Basic " + base64.b64encode(raw).decode()


async def login(http: aiohttp.ClientSession, sim: Simulator) -> dict[str, Any]:
    async with http.post(
        sim.url + "/restapi/oauth/token",
        data={"grant_type": JWT_GRANT, "assertion": sim.config.jwt},
        headers={"Authorization": basic(sim)},
    ) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


def bearer(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['access_token']}"}


async def ws_token(http: aiohttp.ClientSession, sim: Simulator, token: dict[str, Any]) -> dict[str, Any]:
    async with http.post(sim.url + "/restapi/oauth/wstoken", headers=bearer(token)) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def recv(ws: aiohttp.ClientWebSocketResponse, limit: float = 5) -> list[Any]:
    """The next frame, parsed; fails if none arrives within ``limit`` loop seconds."""
    async with asyncio.timeout(limit):
        msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    frame: list[Any] = json.loads(msg.data)
    return frame


async def connect(
    http: aiohttp.ClientSession,
    sim: Simulator,
    token: dict[str, Any],
    wsc: str | None = None,
) -> tuple[aiohttp.ClientWebSocketResponse, list[Any]]:
    """Open the WSG socket; returns it and the ConnectionDetails frame."""
    wst = await ws_token(http, sim, token)
    url = f"{wst['uri']}?access_token={wst['ws_access_token']}"
    if wsc is not None:
        url += f"&wsc={wsc}"
    ws = await http.ws_connect(url)
    details = await recv(ws)
    return ws, details


async def subscribe(
    ws: aiohttp.ClientWebSocketResponse, filters: list[str], path: str = "/restapi/v1.0/subscription"
) -> list[Any]:
    await ws.send_str(
        json.dumps(
            [
                {"type": "ClientRequest", "messageId": "sub-1", "method": "POST", "path": path},
                {"eventFilters": filters, "deliveryMode": {"transportType": "WebSocket"}},
            ]
        )
    )
    return await recv(ws)


async def next_notification(ws: aiohttp.ClientWebSocketResponse, limit: float = 10) -> list[Any]:
    """The next ServerNotification frame (skipping other frame types)."""
    while True:
        frame = await recv(ws, limit)
        if frame[0]["type"] == "ServerNotification":
            return frame
