"""``send`` end to end: a socket client → the real daemon → the simulator's fax API, and back as events.

The daemon runs in-process (as in test_e2e.py) against the simulator over real sockets; the client
speaks raw NDJSON on the event socket, like any local program would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_support import RunningDaemon
from socket_client import SocketClient
from test_event_server import EPOCH, Harness, MemoryBackend, seed, start_harness, transition

from faxd.config import DEFAULT_EVENT_SOCKET
from faxd.core.model import FAX_LEVEL, FINAL_STATUSES, Event, event_key
from faxd.sim import SimConfig, Simulator
from faxd.sim.store import TINY_PDF
from tools import require_tool

TIMEOUT = 30


@pytest.fixture
def sim_config() -> SimConfig:
    # Faster outcomes than the default 1-3 s; the timings stay random (seeded).
    return SimConfig(seed=11, default_delay=(0.2, 0.8))


Connect = Callable[[], Awaitable[SocketClient]]


@pytest.fixture
async def connect(running: RunningDaemon) -> AsyncIterator[Connect]:
    """``await connect()``: a client of the running daemon, closed at teardown even if the test fails."""
    clients: list[SocketClient] = []

    async def open_one() -> SocketClient:
        client = await SocketClient.connect(running.socket)
        clients.append(client)
        return client

    yield open_one
    for client in clients:
        await client.close()


def document(name: str, content_type: str, data: bytes) -> dict[str, str]:
    return {"name": name, "content_type": content_type, "data": base64.b64encode(data).decode()}


DOCUMENTS = [
    document("report.pdf", "application/pdf", TINY_PDF),
    document("notes.txt", "text/plain", b"Lab results attached.\n"),
]


async def subscribed(client: SocketClient) -> SocketClient:
    """Subscribe from the hello's head (before anything is sent: no event of ours can be missed)."""
    await client.send({"type": "subscribe", "after_seq": client.hello["head_seq"], "id": "sub"})
    assert (await client.reply("sub"))["type"] == "caught_up"
    return client


async def until_final(client: SocketClient, fax_id: str, recipients: int) -> list[dict[str, Any]]:
    """The fax's events until its status and every recipient are final (others are ignored)."""
    events = [e for e in client.early if e["fax_id"] == fax_id]
    status: dict[int, str] = {}
    for e in events:
        status[event_key(e)[1]] = e["to_status"]

    def done() -> bool:
        keys = [FAX_LEVEL, *range(recipients)]
        return all(status.get(k) in FINAL_STATUSES for k in keys)

    while not done():
        message = await client.recv()
        if message["type"] != "event" or message["fax_id"] != fax_id:
            continue
        events.append(message)
        if message["kind"] in ("status", "recipient"):
            status[event_key(message)[1]] = message["to_status"]
    return events


async def test_send_with_ref_is_accepted_tracked_and_queryable(sim: Simulator, connect: Connect) -> None:
    """Documents + several recipients + ref → accepted; every later event carries the ref; status by
    ref and history work; the same ref is refused for a second fax."""
    client = await subscribed(await connect())
    to = ["+16505550100", "+16505550001", "+16505550004"]  # Sent; LineBusy; Sent then Delivered
    await client.send(
        {
            "type": "send",
            "id": "s1",
            "to": [{"phone": p} for p in to],
            "documents": DOCUMENTS,
            "ref": "order-77",
            "cover_text": "Lab results",
            "cover_index": 2,
            "resolution": "Low",
        }
    )
    accepted = await client.reply("s1")
    assert accepted["type"] == "accepted", accepted
    fax_id = accepted["fax_id"]
    assert (accepted["ref"], accepted["status"]) == ("order-77", "Queued")

    # What reached RingCentral: one POST …/fax with our envelope.
    assert len(sim.requests_to("/fax", "POST")) == 1
    record = sim.message(fax_id)
    assert [r["phoneNumber"] for r in record["to"]] == to
    assert record["faxResolution"] == "Low"
    assert (record["coverIndex"], record["coverPageText"]) == (2, "Lab results")

    events = await until_final(client, fax_id, recipients=3)
    assert events, "no events for the sent fax"
    assert all(e["ref"] == "order-77" for e in events), [e for e in events if e["ref"] != "order-77"]
    assert events[0]["source"] == "send"
    assert {e["source"] for e in events[1:]} <= {"push", "poll", "startup"}
    assert len({e["source"] for e in events}) > 1, "no event after the send's own"
    last = {event_key(e)[1]: e for e in events if e["final"]}
    assert last[1]["error_code"] == "LineBusy"
    assert last[1]["recipient"]["phone"] == "+16505550001"
    assert last[FAX_LEVEL]["to_status"] == "SendingFailed"

    # status by ref: the same fax, with its recipients.
    await client.send({"type": "status", "ref": "order-77", "id": "q"})
    fax = (await client.reply("q"))["fax"]
    assert (fax["fax_id"], fax["ref"]) == (fax_id, "order-77")
    assert [r["phone"] for r in fax["recipients"]] == to
    assert fax["recipients"][1]["status"] == "SendingFailed"
    await client.send({"type": "history", "fax_id": fax_id, "id": "h"})
    history = (await client.reply("h"))["events"]
    # A Delivered that refines a final Sent may be journalled after until_final returned.
    assert [e["seq"] for e in history[: len(events)]] == [e["seq"] for e in events]
    assert all(e["ref"] == "order-77" for e in history)

    # A second fax with the same ref is refused before anything goes to RingCentral.
    await client.send(
        {
            "type": "send",
            "id": "s2",
            "to": [{"phone": "+16505550100"}],
            "documents": DOCUMENTS,
            "ref": "order-77",
        }
    )
    refused = await client.reply("s2")
    assert (refused["type"], refused["code"]) == ("error", "bad_request")
    assert "order-77" in refused["message"]
    assert len(sim.requests_to("/fax", "POST")) == 1


@pytest.mark.parametrize(
    ("request_fields", "rc_code"),
    [
        # The simulator refuses a number that is not 7-15 digits, as RingCentral does.
        ({"to": [{"phone": "+1 650 55"}], "documents": DOCUMENTS}, "CMN-101"),  # 6 digits
        ({"to": [{"phone": "call me maybe"}], "documents": DOCUMENTS}, "CMN-101"),
        # Cover pages are numbered 1-13 in the account (the spec's createFaxMessage).
        ({"to": [{"phone": "+16505550100"}], "documents": DOCUMENTS, "cover_index": 99}, "CMN-101"),
    ],
)
async def test_ringcentral_refusal_comes_back_as_upstream_with_its_code(
    sim: Simulator, connect: Connect, request_fields: dict[str, Any], rc_code: str
) -> None:
    client = await connect()
    await client.send({"type": "send", "id": "bad", "ref": "refused-1", **request_fields})
    error = await client.reply("bad")
    assert error["type"] == "error", error
    assert (error["code"], error["rc_code"]) == ("upstream", rc_code)
    assert error["message"]
    assert len(sim.requests_to("/fax", "POST")) == 1
    # Nothing was journalled and the ref is still free; the connection is still usable.
    await client.send({"type": "status", "ref": "refused-1", "id": "s"})
    assert (await client.reply("s"))["code"] == "not_found"
    await client.send({"type": "list", "active_only": False, "id": "l"})
    assert (await client.reply("l"))["faxes"] == []


async def test_concurrent_sends_with_one_ref_give_one_fax(sim: Simulator, connect: Connect) -> None:
    """Two clients racing with the same ref: exactly one fax is accepted, the other is refused."""
    clients = [await connect(), await connect()]
    request = {"type": "send", "to": [{"phone": "+16505550100"}], "documents": DOCUMENTS, "ref": "race"}
    for i, client in enumerate(clients):
        await client.send({**request, "id": f"r{i}"})
    replies = [await client.reply(f"r{i}") for i, client in enumerate(clients)]
    kinds = sorted(r["type"] for r in replies)
    assert kinds == ["accepted", "error"], replies
    error = next(r for r in replies if r["type"] == "error")
    assert error["code"] == "bad_request", error
    accepted = next(r for r in replies if r["type"] == "accepted")
    await clients[0].send({"type": "status", "ref": "race", "id": "s"})
    assert (await clients[0].reply("s"))["fax"]["fax_id"] == accepted["fax_id"]


# ------------------------------------------------------------------------------------------ the docs' clients

DOC = Path(__file__).resolve().parent.parent / "docs" / "socket-protocol.md"
DOC_SOCKET = DEFAULT_EVENT_SOCKET  # the docs' clients use the default path


def doc_block(language: str, after: str) -> str:
    """The first ```language block of docs/socket-protocol.md after the text ``after``."""
    text = DOC.read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start : text.index("```", start)]


async def run_doc_client(argv: list[str], harness: Harness, cwd: Path) -> str:
    """Run a client from the docs against the harness until the server says bye; its stdout."""
    replayed = asyncio.Event()
    events_after = harness.backend.events_after

    def watched(after_seq: int, limit: int) -> list[Event]:
        chunk = events_after(after_seq, limit)
        if len(chunk) < limit:
            replayed.set()  # the replay's last chunk is written before the writer yields again
        return chunk

    harness.backend.events_after = watched  # type: ignore[method-assign]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            await replayed.wait()
            await harness.server.close()  # bye: the client sees EOF and ends
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_the_python_client_of_the_docs_works_and_resumes(short_dir: Path) -> None:
    """The docs' Python client, pasted as is (but for the socket path), prints every event and
    resumes from its saved cursor on the next run."""
    code = doc_block("python", "A Python client")
    assert len(code.strip().splitlines()) <= 20, "the docs promise a 20-line client"
    assert DOC_SOCKET in code
    sock_dir = short_dir / "s"
    sock_dir.mkdir()
    script = short_dir / "client.py"
    script.write_text(code.replace(DOC_SOCKET, str(sock_dir / "events.sock")))

    h = await start_harness(sock_dir)
    try:
        seed(h.backend, 3)
        out = await run_doc_client([sys.executable, str(script)], h, short_dir)
    finally:
        await h.close()
    assert out.splitlines() == ["1 f0 Queued", "2 f1 Queued", "3 f2 Queued"]
    assert (short_dir / "faxd.cursor").read_text() == f"{EPOCH} 3"

    # Next run: a new daemon over the same journal with more events; only the new ones are printed.
    backend = MemoryBackend()
    backend.commit([e.transition for e in h.backend.journal], publish=False)
    backend.commit([transition("later", "SendingFailed")], publish=False)
    h = await start_harness(sock_dir, backend)
    try:
        out = await run_doc_client([sys.executable, str(script)], h, short_dir)
    finally:
        await h.close()
    assert out.splitlines() == ["4 later SendingFailed"]
    assert (short_dir / "faxd.cursor").read_text() == f"{EPOCH} 4"


async def test_the_socat_jq_one_liner_of_the_docs_works(short_dir: Path) -> None:
    require_tool("socat", "jq")
    line = doc_block("sh", "With `socat` and `jq`").strip()
    assert "\n" not in line, "a one-liner"
    h = await start_harness(short_dir)
    try:
        h.backend.commit(
            [transition("f1", "Queued"), transition("f1", "SendingFailed", error_code="LineBusy")]
        )
        out = await run_doc_client(["sh", "-c", line.replace(DOC_SOCKET, h.path)], h, short_dir)
    finally:
        await h.close()
    assert [json.loads(x) for x in out.splitlines()] == [
        {"seq": 1, "fax_id": "f1", "to_status": "Queued", "error_code": None},
        {"seq": 2, "fax_id": "f1", "to_status": "SendingFailed", "error_code": "LineBusy"},
    ]


async def test_overlapping_sends_with_one_ref_reach_ringcentral_once(
    sim: Simulator, connect: Connect
) -> None:
    """Two clients send with the same ref at the same moment: one fax is sent, the other refused."""
    first, second = await connect(), await connect()
    sim.delay_next_requests(1, 0.5)  # the first send is still waiting on RingCentral...
    request = {"type": "send", "to": [{"phone": "+16505550100"}], "documents": DOCUMENTS, "ref": "twin"}
    await first.send({**request, "id": "a"})
    await second.send({**request, "id": "b"})
    replies = sorted([(await first.reply("a"))["type"], (await second.reply("b"))["type"]])
    assert replies == ["accepted", "error"]
    assert len(sim.requests_to("/fax", "POST")) == 1


async def test_a_send_names_its_cover_page_so_the_accounts_default_does_not_decide(
    sim: Simulator, connect: Connect
) -> None:
    """The spec's fax request: without coverIndex the account's default cover page is attached (the
    simulator's account has one). faxd always sends send.cover_index (default 0: none)."""
    client = await connect()
    request = {"type": "send", "to": [{"phone": "+16505550100"}], "documents": DOCUMENTS}
    await client.send({**request, "id": "plain"})
    plain = await client.reply("plain")
    assert plain["type"] == "accepted", plain
    assert sim.message(plain["fax_id"])["coverIndex"] == 0
    await client.send({**request, "id": "cover", "cover_index": 5, "cover_text": "Hello"})
    cover = await client.reply("cover")
    assert (sim.message(cover["fax_id"])["coverIndex"], sim.message(cover["fax_id"])["coverPageText"]) == (
        5,
        "Hello",
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"to": [{"phone": "+16505550100"}], "cover_text": "only a cover page"}, "documents is required"),
        ({"to": [{"phone": "+16505550100"}], "documents": []}, "documents must not be empty"),
        # send.cover_index is 0 here: the text would have no cover page to be printed on
        ({"to": [{"phone": "+16505550100"}], "documents": DOCUMENTS, "cover_text": "x"}, "cover_index is 0"),
        ({"to": [{"phone": "+16505550100"}], "documents": DOCUMENTS, "cover_index": -1}, "cover_index must"),
    ],
)
async def test_a_send_refused_before_ringcentral(
    sim: Simulator, connect: Connect, fields: dict[str, Any], reason: str
) -> None:
    client = await connect()
    await client.send({"type": "send", "id": "bad", **fields})
    error = await client.reply("bad")
    assert (error["type"], error["code"]) == ("error", "bad_request"), error
    assert reason in error["message"]
    assert sim.requests_to("/fax", "POST") == []
