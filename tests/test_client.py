"""The CLI side (faxd.client) against a live EventServer over a real Unix socket."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_event_server import EPOCH, Harness, start_harness, transition

from faxd import client
from faxd.core.protocol import SendError


class Lines(io.StringIO):
    """A StringIO that lets a test await the n-th written line instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def write(self, text: str) -> int:
        self.changed.set()
        return super().write(text)

    async def wait_lines(self, count: int) -> list[str]:
        while len(self.getvalue().splitlines()) < count:
            self.changed.clear()
            async with asyncio.timeout(10):
                await self.changed.wait()
        return self.getvalue().splitlines()


@pytest.fixture
async def h(short_dir: Path) -> AsyncIterator[Harness]:
    harness = await start_harness(short_dir)
    yield harness
    await harness.close()


def seed_two_faxes(h: Harness) -> None:
    h.backend.commit(
        [
            transition("100", "Queued", ref="order-1"),
            transition("200", "Queued", index=0),
            transition("100", "SendingFailed", from_status="Queued", ref="order-1", error_code="LineBusy"),
            transition("200", "Queued", index=1, phone="+15550002222"),
        ]
    )


# ------------------------------------------------------------------------------------------ watch


async def test_watch_json_replay(h: Harness) -> None:
    seed_two_faxes(h)
    out, err = io.StringIO(), io.StringIO()
    code = await client.watch(h.path, after_seq=1, json_out=True, out=out, err=err, follow=False)
    assert code == 0
    assert err.getvalue() == ""
    events = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [e["seq"] for e in events] == [2, 3, 4]
    assert all(e["type"] == "event" and e["epoch"] == EPOCH for e in events)


async def test_watch_filters_by_fax_and_ref(h: Harness) -> None:
    seed_two_faxes(h)
    out = io.StringIO()
    assert await client.watch(h.path, after_seq=0, fax_ids=["200"], json_out=True, out=out, follow=False) == 0
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [2, 4]
    out = io.StringIO()
    assert (
        await client.watch(h.path, after_seq=0, refs=["order-1"], json_out=True, out=out, follow=False) == 0
    )
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [1, 3]


async def test_watch_readable_lines(h: Harness) -> None:
    seed_two_faxes(h)
    out = io.StringIO()
    assert await client.watch(h.path, after_seq=2, json_out=False, out=out, follow=False) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "#3" in lines[0]
    assert "fax 100" in lines[0]
    assert "recipient 0 +15550001111" in lines[0]
    assert "Queued → SendingFailed" in lines[0]
    assert "LineBusy (busy, retryable)" in lines[0]
    assert "final" in lines[0]
    assert "ref=order-1" in lines[0]
    assert "\033[" not in out.getvalue()  # not a TTY: no colour
    # Aligned: the transition column starts at the same place on every line.
    assert lines[0].index("→") == lines[1].index("→")


async def test_watch_follows_live_and_reports_a_shutdown(h: Harness) -> None:
    """Live events are printed as they come; bye ends the watch with exit 1 and the seq to resume after."""
    seed_two_faxes(h)
    out, err = Lines(), io.StringIO()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(client.watch(h.path, after_seq=3, json_out=True, out=out, err=err))
        await out.wait_lines(1)  # the replayed seq 4: the subscription is live now
        h.backend.commit([transition("300", "Delivered")])
        await out.wait_lines(2)
        await h.server.close()
    assert task.result() == 1
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [4, 5]
    assert err.getvalue() == "faxd watch: faxd closed the connection (shutdown); resume with --after-seq 5\n"


async def test_watch_cursor_expired(h: Harness) -> None:
    seed_two_faxes(h)
    h.backend.prune(3)
    err = io.StringIO()
    assert await client.watch(h.path, after_seq=1, json_out=True, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith("faxd watch: cursor_expired: ")
    assert err.getvalue().count("\n") == 1


# ------------------------------------------------------------------------------------------ unreachable


async def test_no_socket_is_exit_2(short_dir: Path) -> None:
    err = io.StringIO()
    code = await client.watch(
        str(short_dir / "nope.sock"), after_seq=None, json_out=True, out=io.StringIO(), err=err
    )
    assert code == 2
    assert err.getvalue() == f"faxd watch: faxd is not running (no socket at {short_dir / 'nope.sock'})\n"


async def test_nobody_listening_is_exit_2(short_dir: Path) -> None:
    path = str(short_dir / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # bound, not listening: a daemon that died
        err = io.StringIO()
        assert await client.status(path, json_out=False, out=io.StringIO(), err=err) == 2
    assert "faxd is not running (nothing listens on" in err.getvalue()


#: Run as ``python -c WITHOUT_DAC_OVERRIDE ARGS...``: drop from the capability bounding set what lets root
#: ignore file modes, then exec ``python ARGS...``. An exec grants root only what the bounding set holds,
#: so the program runs as root (reading a checkout only root may read) but subject to file modes.
WITHOUT_DAC_OVERRIDE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0) != 0 and os.geteuid() == 0:  # PR_CAPBSET_DROP
        sys.exit(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


async def test_permission_denied_is_exit_2(h: Harness) -> None:
    """``faxd status`` by someone the socket's mode keeps out: exit 2, "permission denied". Root ignores
    file modes (CAP_DAC_OVERRIDE), and CI runs as root, so the command runs in a process without it."""
    os.chmod(h.path, 0o000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WITHOUT_DAC_OVERRIDE,
        *("-m", "faxd", "status", "--socket", h.path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 2, (out, err)
    assert "permission denied" in err.decode(), err


async def test_refused_by_the_server_is_exit_2(short_dir: Path) -> None:
    harness = await start_harness(short_dir, max_clients=0)
    try:
        err = io.StringIO()
        assert await client.history(harness.path, "1", json_out=False, out=io.StringIO(), err=err) == 2
        assert err.getvalue().startswith("faxd history: faxd refused the connection: busy: ")
    finally:
        await harness.close()


# ------------------------------------------------------------------------------------------ status, history


async def test_status_of_one_fax(h: Harness) -> None:
    seed_two_faxes(h)
    out = io.StringIO()
    assert await client.status(h.path, fax_id="100", json_out=False, out=out) == 0
    text = out.getvalue()
    assert text.splitlines()[0] == "fax 100  Outbound  Sent  final"
    assert "  ref        order-1" in text
    assert "#0  +15550001111      SendingFailed  LineBusy" in text

    out = io.StringIO()
    assert await client.status(h.path, ref="order-1", json_out=True, out=out) == 0
    assert json.loads(out.getvalue())["fax_id"] == "100"


async def test_status_table_of_faxes_in_flight(h: Harness) -> None:
    seed_two_faxes(h)
    out = io.StringIO()
    assert await client.status(h.path, json_out=False, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["FAX", "ID", "DIR", "STATUS", "RECIPIENTS", "REF", "MODIFIED"]
    assert lines[1].split() == ["200", "out", "Queued", "0/2", "final", "-", "-"]
    assert len(lines) == 2

    out = io.StringIO()
    assert await client.status(h.path, json_out=True, out=out) == 0
    reply = json.loads(out.getvalue())
    assert reply["head_seq"] == 4
    assert [f["fax_id"] for f in reply["faxes"]] == ["200"]


async def test_status_empty_and_not_found(h: Harness) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert await client.status(h.path, json_out=False, out=out) == 0
    assert out.getvalue() == "no faxes in flight\n"
    assert await client.status(h.path, fax_id="404", json_out=False, out=out, err=err) == 1
    assert err.getvalue() == "faxd status: not_found: no fax 404\n"


async def test_history(h: Harness) -> None:
    seed_two_faxes(h)
    out = io.StringIO()
    assert await client.history(h.path, "100", json_out=True, out=out) == 0
    assert [json.loads(x)["to_status"] for x in out.getvalue().splitlines()] == ["Queued", "SendingFailed"]
    out = io.StringIO()
    assert await client.history(h.path, "100", json_out=False, out=out) == 0
    assert len(out.getvalue().splitlines()) == 2
    err = io.StringIO()
    assert await client.history(h.path, "404", json_out=False, out=out, err=err) == 1
    assert err.getvalue() == "faxd history: not_found: no fax 404\n"


# ------------------------------------------------------------------------------------------ send


@pytest.fixture
def pdf(short_dir: Path) -> str:
    path = short_dir / "letter.pdf"
    path.write_bytes(b"%PDF-1.4 fake")
    return str(path)


async def test_send_prints_the_fax_id(h: Harness, pdf: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await client.send(
        h.path,
        to=["+15551230000"],
        files=[pdf],
        ref="order-9",
        cover_text="Hi",
        resolution="Low",
        out=out,
        err=err,
    )
    assert (code, out.getvalue(), err.getvalue()) == (0, "9001\n", "")
    sent = h.backend.sent[0]
    assert sent.documents[0].name == "letter.pdf"
    assert sent.documents[0].content_type == "application/pdf"
    assert sent.documents[0].data == b"%PDF-1.4 fake"
    assert (sent.ref, sent.cover_text, sent.resolution) == ("order-9", "Hi", "Low")
    assert sent.cover_index is None  # not given: the daemon's send.cover_index applies


async def test_send_passes_the_cover_index_and_needs_a_document(h: Harness, pdf: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await client.send(h.path, to=["+15551230000"], files=[pdf], cover_index=3, out=out, err=err)
    assert code == 0, err.getvalue()
    assert h.backend.sent[0].cover_index == 3
    code = await client.send(h.path, to=["+15551230000"], files=[], out=out, err=err)
    assert (code, err.getvalue()) == (2, "faxd send: a fax needs at least one document\n")
    assert len(h.backend.sent) == 1


async def _send_and_finish(h: Harness, pdf: str, *outcomes: tuple[str, str | None]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    phones = [f"+1555123000{i}" for i in range(len(outcomes))]
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(client.send(h.path, to=phones, files=[pdf], wait=True, out=out, err=err))
        await h.backend.sent_event.wait()
        fax_id = str(9000 + len(h.backend.sent))
        for index, (status, error_code) in enumerate(outcomes):
            h.backend.commit(
                [
                    transition(
                        fax_id,
                        status,
                        index=index,
                        from_status="Queued",
                        phone=phones[index],
                        error_code=error_code,
                    )
                ]
            )
    return task.result(), out.getvalue(), err.getvalue()


async def test_send_wait_success(h: Harness, pdf: str) -> None:
    code, out, err = await _send_and_finish(h, pdf, ("Sent", None), ("Delivered", None))
    assert (code, out) == (0, "9001\n")
    assert "Queued → Sent" in err
    assert "Queued → Delivered" in err


async def test_send_wait_failure_names_the_reason(h: Harness, pdf: str) -> None:
    code, out, err = await _send_and_finish(h, pdf, ("Delivered", None), ("SendingFailed", "LineBusy"))
    assert (code, out) == (1, "9001\n")
    assert err.splitlines()[-1] == "faxd send: fax 9001 recipient 1 +15551230001 SendingFailed: LineBusy"


async def test_send_refused_upstream(h: Harness, pdf: str) -> None:
    h.backend.send_error = SendError("upstream", "Document too large", rc_code="FAX-101")
    err = io.StringIO()
    assert await client.send(h.path, to=["+1555"], files=[pdf], out=io.StringIO(), err=err) == 1
    assert err.getvalue() == "faxd send: send failed: upstream: Document too large (FAX-101)\n"


async def test_send_unreadable_file(h: Harness, short_dir: Path) -> None:
    err = io.StringIO()
    missing = str(short_dir / "missing.pdf")
    assert await client.send(h.path, to=["+1555"], files=[missing], out=io.StringIO(), err=err) == 2
    assert err.getvalue() == f"faxd send: cannot read {missing}: No such file or directory\n"
    assert h.backend.sent == []


# ------------------------------------------------------------------------------------------ format_event


EVENT = {
    "type": "event",
    "seq": 17,
    "kind": "recipient",
    "fax_id": "1234567",
    "direction": "Outbound",
    "ref": None,
    "recipient": {"index": 1, "phone": "+15551234567"},
    "from_status": "Queued",
    "to_status": "SendingFailed",
    "final": True,
    "error_code": "LineBusy",
    "error_category": "busy",
    "retryable": True,
    "observed_at": "not a time",
}


async def test_format_event_plain() -> None:  # async: see test_protocol's stray-loop note
    text = client.format_event(EVENT, color=False)
    assert text.split() == [
        "--:--:--", "#17", "fax", "1234567", "recipient", "1", "+15551234567",
        "Queued", "→", "SendingFailed", "LineBusy", "(busy,", "retryable)", "final",
    ]  # fmt: skip


async def test_format_event_colour_and_other_kinds() -> None:
    coloured = client.format_event(EVENT, color=True)
    assert "\033[31mSendingFailed\033[0m" in coloured
    status = client.format_event(
        {
            **EVENT,
            "kind": "status",
            "recipient": None,
            "to_status": "Sent",
            "error_code": None,
            "from_status": None,
        },
        color=False,
    )
    assert "outbound fax" in status
    assert "new → Sent" in status
    stalled = client.format_event(
        {**EVENT, "kind": "stalled", "recipient": None, "final": False}, color=False
    )
    assert "stalled" in stalled
    assert "final" not in stalled
