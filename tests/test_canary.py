"""Canary: known fake secrets and phone numbers go through a daemon at debug level, through faults and
errors, and none of them (nor any token the simulator issued) may show up in a log line, in /metrics
or in an sd_notify message."""

from __future__ import annotations

import asyncio
import base64
import signal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from ops_support import NotifySocket, daemon, free_port, scrape, status_of, write_config, ws_up
from socket_client import SocketClient
from webhook_receiver import Receiver

from faxd.sim import RecipientScript, SimConfig, Simulator

CLIENT_ID = "canary-client-id"
CLIENT_SECRET = "CanaryClientSecret-4b1d9e7a55"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYW5hcnktNGIxZDllIn0.Q2FuYXJ5U2lnbmF0dXJlLTRiMWQ5ZQ"
PHONES = ("+16505550123", "+16505550177", "+14155550199", "+12125550142")
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"CanaryWebhookSecret-4b1d9e7a55-xyz").decode()


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=11, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, jwt=JWT)


async def _events_until_final(client: SocketClient, fax_ids: set[str]) -> None:
    """Read the event stream until every fax of ``fax_ids`` had a final event."""
    waiting = set(fax_ids)
    while waiting:
        message = await client.recv()
        if message.get("type") == "event" and message.get("final") and message.get("kind") == "status":
            waiting.discard(str(message["fax_id"]))


def issued_tokens(sim: Simulator) -> set[str]:
    """Every access, refresh, ws access and wsc token the simulator handed out."""
    tokens = set(sim.tokens._access) | set(sim.tokens._refresh)
    for request in sim.requests:
        if request.path == "/ws":
            query = parse_qs(urlsplit(request.raw_path).query)
            tokens.update(query.get("access_token", []))
            tokens.update(query.get("wsc", []))
    return {t for t in tokens if t}


async def test_no_secret_token_or_number_leaks(sim: Simulator, short_dir: Path) -> None:
    port = free_port()
    # A webhook outlet whose receiver fails now and then: its secret and the numbers it is sent
    # (include_numbers) must not reach the logs either.
    receiver = Receiver(WEBHOOK_SECRET, by_seq={1: (503, {}), 2: (404, {})})
    await receiver.start()
    secret_file = short_dir / "webhook-secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(WEBHOOK_SECRET)
    outlet = {"type": "webhook", "url": receiver.url, "secret": {"file": "webhook-secret"}}
    outlet |= {"include_numbers": True, "retry_initial": 0.05}
    config = write_config(
        short_dir,
        sim,
        logging={"format": "json", "level": "debug"},
        metrics={"listen": f"127.0.0.1:{port}"},
        outlets={"ehr": outlet},
    )
    notify = NotifySocket(short_dir / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    try:
        async with asyncio.timeout(45), daemon(config, env=env) as faxd:
            await notify.wait_for(ws_up)
            client = await SocketClient.connect(str(short_dir / "events.sock"))
            await client.send({"type": "subscribe"})

            sim.send_malformed_frame()
            await faxd.wait_event("ws.bad_frame")

            # An expired access token (401, refresh, retry) while faxes come and go.
            sim.expire_access_tokens()
            outbound = sim.create_outbound_fax(
                None,
                [
                    RecipientScript(PHONES[0], after=0.2),
                    RecipientScript(PHONES[1], outcome="SendingFailed", after=0.3),
                ],
            )
            inbound = sim.create_inbound_fax(None, PHONES[2])
            await _events_until_final(client, {outbound, inbound})

            # A dropped WebSocket: down, then recovered with the wsc token.
            sim.drop_ws()
            await notify.wait_for(lambda m: (status_of(m) or "").startswith("WebSocket down"))
            await notify.wait_for(ws_up)

            # RingCentral failing: 503s while a new fax needs a reconcile.
            sim.fail_next_requests(3)
            start = len(faxd.lines)
            sim.create_outbound_fax(None, [RecipientScript(PHONES[3], after=0.1)])
            await faxd.wait_event("api.server_error", start)
            await receiver.wait_for(lambda r: 1 in r.delivered)
            assert any(PHONES[0] in str(r.body) for r in receiver.requests), "the receiver got the numbers"

            status, metrics = await scrape(port)
            assert status == 200
            await client.close()
            faxd.signal(signal.SIGTERM)
            assert await faxd.wait() == 0
        notify.drain()
    finally:
        notify.close()
        await receiver.stop()

    assert any(line["level"] == "debug" for line in faxd.lines), "the canary must run at debug level"
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    tokens = issued_tokens(sim)
    assert len(tokens) >= 5, "expected access, refresh, ws and wsc tokens to have been issued"
    webhook_key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_")).decode()
    canaries = {
        CLIENT_SECRET,
        JWT,
        basic,
        WEBHOOK_SECRET,
        webhook_key,
        *PHONES,
        *(p.lstrip("+") for p in PHONES),
        *tokens,
    }
    outputs = {
        "log": "\n".join(faxd.raw),
        "metrics": metrics,
        "sd_notify": "\n".join(notify.messages),
    }
    for where, text in outputs.items():
        leaked = sorted(c[:12] + "…" for c in canaries if c in text)
        assert not leaked, f"found in {where}: {leaked}"
