"""``faxd watch`` as a user runs it (issue 15, part 4): the subscription filters, ``--follow`` across
daemon restarts (SIGTERM and SIGKILL) with every event printed exactly once in seq order, and colours
only on a terminal and never with ``NO_COLOR``.

faxd and the watcher are real subprocesses; the simulator runs in this process. Simulator magic numbers
(docs/simulator.md): …0001 ends ``SendingFailed``/``LineBusy``, …0004 is ``Sent`` then ``Delivered``,
anything else ``Sent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import RunningDaemon
from ops_support import FAXD, daemon, run_faxd, write_config

from faxd import client
from faxd.sim import SimConfig, Simulator
from faxd.sim.store import TINY_PDF

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60


#: Every start of faxd logs in afresh (Auth); keep the simulator from refusing that.
LIMITS = {"Light": (100000, 60, 60), "Medium": (1000, 60, 60), "Heavy": (100, 60, 60), "Auth": (1000, 60, 60)}
#: A restarted faxd finds what changed while it was down by polling: poll soon.
QUICK_POLLS = {"debounce": 0.05, "max_delay": 0.3, "poll_interval": 2, "active_poll_interval": 0.5}


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=5, default_delay=(0.2, 0.5), rate_limits=LIMITS)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXD_", "PYTHON", "NO_COLOR"))}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


async def send(sock: str, pdf: Path, to: str, *, wait: bool = True) -> str:
    args = ["send", "--socket", sock, "--to", to, str(pdf)]
    code, out, err = await run_faxd(*args, *(["--wait"] if wait else []), env=_env(), within=TIMEOUT)
    assert code in (0, 1), err  # 1: the fax failed, as …0001 does
    assert out.strip().isdigit(), (out, err)
    return out.strip()


class Watcher:
    """A ``faxd watch --json`` subprocess; its events as they arrive, its stderr when it ends."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))
            self._changed.set()
        self._changed.set()

    async def until(self, predicate: Any) -> None:
        """Wait until ``predicate(events)`` holds; fails if the watcher exits first."""
        while not predicate(self.events):
            if self._reader.done():
                raise AssertionError(f"faxd watch exited: {await self.stop()}")
            self._changed.clear()
            await self._changed.wait()

    async def stop(self) -> str:
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()
        await self._reader
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()


@contextlib.asynccontextmanager
async def watcher(*args: str) -> AsyncIterator[Watcher]:
    proc = await asyncio.create_subprocess_exec(
        *FAXD, "watch", "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    w = Watcher(proc)
    try:
        yield w
    finally:
        await w.stop()


async def head_seq(sock: str) -> int:
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        hello = json.loads(await reader.readline())
    finally:
        writer.close()
        await writer.wait_closed()
    return int(hello["head_seq"])


def _final(events: list[dict[str, Any]], fax_id: str, status: str) -> bool:
    return any(
        e["fax_id"] == fax_id and e["to_status"] == status and e["kind"] == "recipient" for e in events
    )


async def test_follow_resumes_across_restarts_without_loss_or_duplicates(
    sim: Simulator, short_dir: Path
) -> None:
    config = write_config(short_dir, sim, reconcile=QUICK_POLLS)
    sock = str(short_dir / "events.sock")
    pdf = short_dir / "a.pdf"
    pdf.write_bytes(TINY_PDF)
    async with daemon(config) as first:
        await first.wait_event("daemon.started")
        async with watcher("--follow", "--after-seq", "0", "--socket", sock) as w:
            one = await send(sock, pdf, "+16505550100")
            await w.until(lambda ev: _final(ev, one, "Sent"))

            # SIGTERM: the watcher gets `bye shutdown` and waits for the new faxd.
            first.signal(signal.SIGTERM)
            assert await first.wait() == 0
            async with daemon(config) as second:
                await second.wait_event("daemon.started")
                two = await send(sock, pdf, "+16505550001")
                await w.until(lambda ev: _final(ev, two, "SendingFailed"))
                # SIGKILL while a fax is in flight: its later events are journalled by the next faxd
                # (start-up reconcile) and replayed to the watcher from its cursor.
                three = await send(sock, pdf, "+16505550004", wait=False)
                second.proc.kill()
                await second.wait()
            async with daemon(config) as third:
                await third.wait_event("daemon.started")
                four = await send(sock, pdf, "+16505550100")
                await w.until(lambda ev: _final(ev, three, "Delivered") and _final(ev, four, "Sent"))
                head = await head_seq(sock)
                await w.until(lambda ev: ev[-1]["seq"] >= head)
                seqs = [e["seq"] for e in w.events]
                assert seqs == list(range(1, head + 1)), "every event exactly once, in seq order"
                assert len({e["epoch"] for e in w.events}) == 1
                db = sqlite3.connect(f"file:{short_dir / 'faxd.db'}?mode=ro", uri=True)
                try:
                    journal = [
                        seq for (seq,) in db.execute("SELECT seq FROM journal WHERE seq <= ?", (head,))
                    ]
                finally:
                    db.close()
                assert journal == seqs
                err = await w.stop()
    assert w.proc.returncode == -signal.SIGTERM, err
    assert err.count("reconnecting") == 2, err  # once per outage, not once per attempt


async def test_follow_waits_for_a_daemon_that_is_not_there_yet(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim, reconcile=QUICK_POLLS)
    sock = str(short_dir / "events.sock")
    pdf = short_dir / "a.pdf"
    pdf.write_bytes(TINY_PDF)
    async with watcher("--follow", "--after-seq", "0", "--socket", sock) as w:
        async with daemon(config) as d:
            await d.wait_raw("daemon.started")
            fax_id = await send(sock, pdf, "+16505550100")
            await w.until(lambda ev: _final(ev, fax_id, "Sent"))
        assert [e["seq"] for e in w.events] == list(range(1, len(w.events) + 1))


async def test_filters_select_events(running: RunningDaemon, short_dir: Path) -> None:
    sock = running.socket
    pdf = short_dir / "a.pdf"
    pdf.write_bytes(TINY_PDF)
    ok = await send(sock, pdf, "+16505550100")
    failed = await send(sock, pdf, "+16505550001")
    args = ["--after-seq", "0", "--socket", sock, "--final-only", "--status", "sendingfailed"]
    async with watcher(*args, "--direction", "outbound", "--extension", "200000001") as w:
        # A second failure is the marker: once it is printed, everything before it was filtered.
        marker = await send(sock, pdf, "+16505550001")
        await w.until(lambda ev: any(e["fax_id"] == marker for e in ev))
        assert {e["fax_id"] for e in w.events} == {failed, marker}
        assert all(e["final"] and e["to_status"] == "SendingFailed" for e in w.events)
        assert ok not in {e["fax_id"] for e in w.events}


# ------------------------------------------------------------------------------------------- colours


async def _first_line_on_a_terminal(sock: str, **env: str) -> bytes:
    """The first line ``faxd watch --after-seq 0`` prints with its stdout on a pseudo-terminal."""
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *FAXD, "watch", "--after-seq", "0", "--socket", sock,
        stdout=slave, stderr=asyncio.subprocess.PIPE, env=_env(**env),
    )  # fmt: skip
    os.close(slave)
    loop = asyncio.get_running_loop()
    received = bytearray()
    arrived = asyncio.Event()

    def readable() -> None:
        with contextlib.suppress(OSError):  # EIO once the child has gone
            received.extend(os.read(master, 4096))
        arrived.set()

    os.set_blocking(master, False)
    loop.add_reader(master, readable)
    try:
        async with asyncio.timeout(TIMEOUT):
            while b"\n" not in received:
                arrived.clear()
                await arrived.wait()
    finally:
        loop.remove_reader(master)
        proc.terminate()
        await proc.wait()
        os.close(master)
    return bytes(received.split(b"\n", 1)[0])


async def test_colours_only_on_a_terminal_and_never_with_no_color(
    running: RunningDaemon, short_dir: Path
) -> None:
    pdf = short_dir / "a.pdf"
    pdf.write_bytes(TINY_PDF)
    fax_id = await send(running.socket, pdf, "+16505550100")
    plain_env = _env()
    coloured = await _first_line_on_a_terminal(running.socket)
    assert b"\x1b[" in coloured, coloured
    assert b"#1" in coloured
    assert b"\x1b[" in await _first_line_on_a_terminal(running.socket, NO_COLOR="")  # empty: not set
    no_color = await _first_line_on_a_terminal(running.socket, NO_COLOR="1")
    assert b"#1" in no_color
    assert b"\x1b[" not in no_color, no_color
    # Not a terminal (a pipe): no colours either.
    code, out, _ = await run_faxd(
        "history", "--socket", running.socket, fax_id, env=plain_env, within=TIMEOUT
    )
    assert code == 0
    assert "Sent" in out
    assert "\x1b[" not in out


async def test_follow_ends_on_a_store_restored_under_a_new_epoch(sim: Simulator, short_dir: Path) -> None:
    """A restored journal hands out seqs the watcher has seen: it must stop, not skip or repeat."""
    config = write_config(short_dir, sim, reconcile=QUICK_POLLS)
    sock = str(short_dir / "events.sock")
    pdf = short_dir / "a.pdf"
    pdf.write_bytes(TINY_PDF)
    backup = str(short_dir / "backup.db")
    async with daemon(config) as first, watcher("--follow", "--after-seq", "0", "--socket", sock) as w:
        await first.wait_event("daemon.started")
        fax_id = await send(sock, pdf, "+16505550100")
        await w.until(lambda ev: _final(ev, fax_id, "Sent"))
        code, _, err = await run_faxd(
            "store", "backup", "-c", str(config), backup, env=_env(), within=TIMEOUT
        )
        assert code == 0, err
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0
        code, _, err = await run_faxd(
            "store", "restore", "-c", str(config), backup, env=_env(), within=TIMEOUT
        )
        assert code == 0, err
        async with daemon(config) as second:
            await second.wait_event("daemon.started")
            async with asyncio.timeout(TIMEOUT):
                code = await w.proc.wait()
            err = await w.stop()
    assert code == 1, err
    assert "cursor_expired" in err


async def test_follow_resumes_after_being_cut_off_as_a_slow_consumer(short_dir: Path) -> None:
    """A faxd that cuts the watcher off (slow_consumer) is asked again from the watcher's cursor.

    The peer here is a scripted socket server speaking the protocol, so the cut-off lands exactly
    after seq 2 (a real slow consumer depends on the machine's speed)."""
    path = str(short_dir / "scripted.sock")
    subscribes: list[dict[str, Any]] = []

    def event(seq: int) -> bytes:
        return json.dumps({"type": "event", "seq": seq, "epoch": "e1", "kind": "status", "fax_id": "1",
                           "to_status": "Sent", "final": True}).encode() + b"\n"  # fmt: skip

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"type":"hello","proto":1,"epoch":"e1","head_seq":2,"oldest_seq":1}\n')
        subscribes.append(json.loads(await reader.readline()))
        if len(subscribes) == 1:
            writer.write(event(1) + event(2))
            writer.write(b'{"type":"error","code":"slow_consumer","message":"queue","resume_after_seq":2}\n')
        else:
            writer.write(b'{"type":"caught_up","seq":2}\n' + event(3))
            writer.write(b'{"type":"bye","reason":"idle_timeout"}\n')  # not cured by reconnecting
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path)
    out, err = io.StringIO(), io.StringIO()
    try:
        async with asyncio.timeout(TIMEOUT):
            code = await client.watch(path, after_seq=0, json_out=True, out=out, err=err, reconnect=True)
    finally:
        server.close()
        await server.wait_closed()
    assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()] == [1, 2, 3]
    assert [(s.get("after_seq"), s.get("epoch")) for s in subscribes] == [(0, "e1"), (2, "e1")]
    assert code == 1
    assert "slow_consumer" in err.getvalue()
    assert "faxd closed the connection (idle_timeout)" in err.getvalue()
