"""The done-queue and the audit export (issue 15, part 4) as a user runs them: ``faxd status --all``
and ``faxd export`` in subprocesses against the real daemon (in this process) and the simulator, on a
real store seeded before the daemon starts. The store's paging itself: tests/test_audit_store.py.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from daemon_support import RunningDaemon, started
from ops_support import run_faxd
from test_audit_store import fax

from faxd.adapters.store import Journalled, Store
from faxd.config import Config
from faxd.core.model import EventKind, Source, Transition
from faxd.sim import Simulator

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60

#: Where the faxes start: recent enough that retention keeps them, whole seconds.
RECENT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


def _recent(second: int) -> str:
    return (RECENT + timedelta(seconds=second)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXD_", "PYTHON", "NO_COLOR"))}
    env["PYTHONPATH"] = str(REPO)
    return env


async def faxd(*args: str) -> tuple[int, str, str]:
    return await run_faxd(*args, env=_env(), within=TIMEOUT)


#: The store the daemon starts on: 7 final faxes created RECENT + 0 to 6 s, recipients +165055500NN,
#: one of them failed with LineBusy (to +16505550001).
SEEDED = 7


def _seed(config: Config) -> None:
    s = Store(config.store.path)
    s.open()
    try:
        faxes = [
            fax(n, _recent(n), phone=f"+165055500{n:02d}", status="SendingFailed" if n == 1 else "Sent")
            for n in range(SEEDED)
        ]
        moves = [
            Journalled(
                Transition(EventKind.STATUS, f.fax_id, f.extension_id, f.direction, None, f.status, True),
                Source.POLL,
            )
            for f in faxes
        ]
        s.commit(faxes, moves, observed_at=_recent(0))
    finally:
        s.close()


async def test_status_all_and_export_on_a_running_daemon(
    sim: Simulator, make_config: Callable[..., Config], short_dir: Path
) -> None:
    config = make_config(sim)
    _seed(config)
    async with started(config) as running:
        sock = running.socket
        window = ("--since", _recent(0), "--until", _recent(60))

        code, out, err = await faxd("status", "--all", "--socket", sock, *window)
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["CREATED", "FAX", "ID"]
        assert [line.split()[2] for line in lines[1:]] == [f"{700000 + n}" for n in range(SEEDED)]
        failed = next(line for line in lines if "700001" in line)
        assert "SendingFailed" in failed
        assert "LineBusy (busy)" in failed
        assert "+1650" not in out, "numbers are redacted unless --numbers"

        code, out, _ = await faxd("status", "--all", "--socket", sock, *window, "--status", "SendingFailed")
        assert code == 0
        assert [line.split()[2] for line in out.splitlines()[1:]] == ["700001"]
        code, out, _ = await faxd("status", "--all", "--socket", sock, *window, "--to", "+16505550003")
        assert code == 0
        assert [line.split()[2] for line in out.splitlines()[1:]] == ["700003"]
        code, out, _ = await faxd(
            "status", "--all", "--socket", sock, *window, "--numbers", "--to", "16505550003"
        )
        assert code == 0
        assert "+16505550003" in out
        code, out, _ = await faxd("status", "--all", "--socket", sock, "--since", _recent(5), "--json")
        assert code == 0
        assert [json.loads(line)["fax_id"] for line in out.splitlines()] == ["700005", "700006"]
        code, out, _ = await faxd("status", "--all", "--socket", sock, "--since", "1h")  # none of them
        assert (code, out) == (0, "no faxes match\n")
        code, out, _ = await faxd("status", "--all", "--socket", sock)  # the last 24 h: all of them
        assert code == 0
        assert len(out.splitlines()) == SEEDED + 1

        # CSV: parsed back, one row per recipient, numbers redacted by default.
        code, out, err = await faxd("export", "--socket", sock, *window, "--format", "csv")
        assert code == 0, err
        assert "7 faxes, 7 csv records (phone numbers redacted)" in err
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [r["fax_id"] for r in rows] == [f"{700000 + n}" for n in range(SEEDED)]
        busy = rows[1]
        assert (busy["fax_status"], busy["recipient_status"], busy["error_code"], busy["error_category"]) == (
            "SendingFailed", "SendingFailed", "LineBusy", "busy",
        )  # fmt: skip
        assert busy["created"] == _recent(1)
        assert busy["final"] == "true"
        assert all(r["recipient_phone"] == "" for r in rows)

        # NDJSON into a file: 0600, every fax once, numbers only with --numbers.
        target = short_dir / "audit.ndjson"
        code, _, err = await faxd(
            "export", "--socket", sock, *window, "--format", "ndjson", "--numbers", "-o", str(target),
            "--until", _recent(3),
        )  # fmt: skip
        assert code == 0, err
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        faxes = [json.loads(line) for line in target.read_text().splitlines()]
        assert [f["fax_id"] for f in faxes] == ["700000", "700001", "700002"]
        assert faxes[1]["recipients"][0] == {
            "index": 0, "phone": "+16505550001", "status": "SendingFailed",
            "error_code": "LineBusy", "error_category": "busy",
        }  # fmt: skip
        leftovers = [name for name in os.listdir(short_dir) if name.startswith(".audit")]
        assert leftovers == [], "no temporary file left behind"


async def test_numbers_are_refused_when_the_daemon_does_not_serve_them(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    config = make_config(sim, events={"include_numbers": False})
    _seed(config)
    async with started(config) as running:
        args = ("--socket", running.socket, "--since", _recent(0))
        code, _, err = await faxd("export", *args, "--numbers")
        assert code == 1
        assert "events.include_numbers is false" in err
        code, out, err = await faxd("export", *args, "--format", "ndjson")
        assert code == 0, err
        assert len(out.splitlines()) == SEEDED


async def test_a_sent_fax_is_in_the_done_queue(running: RunningDaemon, short_dir: Path) -> None:
    """A fax sent through the simulator shows up, with its outcome, in the last 24 h."""
    pdf = short_dir / "a.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%%EOF\n")
    code, out, err = await faxd(
        "send", "--socket", running.socket, "--to", "+16505550001", "--ref", "audit-1", "--wait", str(pdf)
    )
    assert code == 1, err  # …0001: LineBusy
    fax_id = out.strip()
    code, out, err = await faxd("export", "--socket", running.socket, "--since", "1h", "--format", "ndjson")
    assert code == 0, err
    (fax,) = [json.loads(line) for line in out.splitlines()]
    assert (fax["fax_id"], fax["ref"], fax["final"]) == (fax_id, "audit-1", True)
    assert fax["recipients"][0]["error_code"] == "LineBusy"


async def test_bad_command_lines(running: RunningDaemon) -> None:
    code, _, err = await faxd("export", "--socket", running.socket, "--since", "last tuesday")
    assert code == 2
    assert "is neither a duration" in err
    code, _, err = await faxd("export", "--socket", running.socket)
    assert code == 2
    assert "--since" in err
    code, _, err = await faxd("status", "--socket", running.socket, "--to", "+16505550001")
    assert code == 2
    assert "need --all" in err
    code, _, err = await faxd("status", "--socket", running.socket, "--all", "123")
    assert code == 2
    assert "takes no ID" in err


async def test_export_pages_through_a_window_bigger_than_a_page(
    sim: Simulator, make_config: Callable[..., Config]
) -> None:
    """1,001 faxes are three pages of the client's 500: every fax once, in creation order."""
    config = make_config(sim)
    total = 1001
    s = Store(config.store.path)
    s.open()
    try:
        s.commit([fax(n, _recent(n // 3)) for n in range(total)], [], observed_at=_recent(0))
    finally:
        s.close()
    async with started(config) as running:
        code, out, err = await faxd(
            "export", "--socket", running.socket, "--since", _recent(0), "--format", "ndjson"
        )
    assert code == 0, err
    ids = [json.loads(line)["fax_id"] for line in out.splitlines()]
    # Three faxes share each second: ties go by id, across page boundaries too.
    assert ids == [f"{700000 + n}" for n in range(total)]


async def test_an_export_cut_short_leaves_no_file(short_dir: Path) -> None:
    """faxd goes away after the first page: the export fails, and neither the named file nor a
    temporary one is left (a scripted peer, so the cut falls between pages every time)."""
    path = str(short_dir / "scripted.sock")
    target = short_dir / "audit.csv"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"type":"hello","proto":1,"epoch":"e1","head_seq":0,"oldest_seq":1}\n')
        request = json.loads(await reader.readline())
        page = {"type": "page", "faxes": [{"fax_id": "1", "recipients": []}], "next": "1.0~1"}
        writer.write(json.dumps({**page, "id": request["id"]}).encode() + b"\n")
        await writer.drain()
        await reader.readline()  # the request for the second page, never answered
        writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        code, _, err = await faxd("export", "--socket", path, "--since", "1d", "-o", str(target))
    finally:
        server.close()
        await server.wait_closed()
    assert code == 1
    assert "connection to faxd lost" in err
    assert os.listdir(short_dir) == ["scripted.sock"], "no export file, complete or partial"
