"""Helpers for the operations tests: a real ``faxd run`` subprocess, its notify socket and its log lines.

Everything here waits on events (a log line, a datagram, a process exit), never on a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from faxd import testbed
from faxd.sim import Simulator

FAXD = [sys.executable, "-m", "faxd"]
Line = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: How the ops tests run a daemon subprocess, beyond faxd.testbed's base: quick reconciles, JSON logs
#: the tests read.
OPS_SECTIONS = {
    "reconcile": {"debounce": 0.05, "max_delay": 0.5},
    "logging": {"format": "json", "level": "info"},
}


def write_config(workdir: Path, sim: Simulator, **sections: Mapping[str, Any]) -> Path:
    """A config file for ``sim`` in ``workdir`` (secrets in 0600 files); returns its path."""
    return testbed.write_config(sim, workdir, defaults=OPS_SECTIONS, **sections)


class NotifySocket:
    """An ``AF_UNIX``/``SOCK_DGRAM`` socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def next(self) -> str:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        text = data.decode()
        self.messages.append(text)
        return text

    async def wait_for(self, predicate: Callable[[str], bool]) -> str:
        while not predicate(message := await self.next()):
            pass
        return message

    def drain(self) -> None:
        """Take what is already queued (after the sender exited)."""
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """A running ``faxd run`` (or anything that execs it) whose stdout is parsed as JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[Line] = []
        self.raw: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="daemon-stdout")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                parsed = json.loads(text)
                if isinstance(parsed, dict):
                    self.lines.append(parsed)
            self._changed.set()
        self._changed.set()

    @property
    def events(self) -> list[str]:
        return [str(line.get("event")) for line in self.lines]

    async def wait_line(self, predicate: Callable[[Line], bool], start: int = 0) -> Line:
        """The first log line from index ``start`` on that matches; fails if the process ends first."""
        seen = start
        while True:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            if self._reader.done():
                raise AssertionError(f"faxd exited without logging it; last lines: {self.raw[-10:]}")
            self._changed.clear()
            await self._changed.wait()

    async def wait_raw(self, text: str) -> str:
        """The first output line (JSON or not) containing ``text``."""
        seen = 0
        while True:
            for raw in self.raw[seen:]:
                if text in raw:
                    return raw
            seen = len(self.raw)
            if self._reader.done():
                raise AssertionError(f"process exited without printing {text!r}; last: {self.raw[-10:]}")
            self._changed.clear()
            await self._changed.wait()

    async def wait_event(self, event: str, start: int = 0) -> Line:
        return await self.wait_line(lambda line: line.get("event") == event, start)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        code = await self.proc.wait()
        await self._reader
        return code

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()


def shell_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an administrator's shell: no $CREDENTIALS_DIRECTORY (it exists only inside
    the unit) and no FAXD_* overrides, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY" and not k.startswith("FAXD_")}
    return {**env, **(extra or {})}


async def run_faxd(
    *args: str, env: Mapping[str, str] | None = None, merge_stderr: bool = False, within: float = 60.0
) -> tuple[int, str, str]:
    """``python -m faxd ARGS`` to its end: (exit code, stdout, stderr); ``env`` replaces the environment
    (default: this process's); with ``merge_stderr`` stderr is in stdout and the third item is ""."""
    proc = await asyncio.create_subprocess_exec(
        *FAXD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        env=dict(os.environ if env is None else env),
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), (err or b"").decode()


@contextlib.asynccontextmanager
async def daemon(
    config: Path, *, env: Mapping[str, str] | None = None, argv: list[str] | None = None
) -> AsyncIterator[Daemon]:
    """``faxd run -c config`` (or ``argv``), stderr merged into stdout; killed if still running at exit."""
    proc = await asyncio.create_subprocess_exec(
        *(argv or [*FAXD, "run", "-c", str(config)]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    running = Daemon(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
        await running.wait()


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


def status_of(message: str) -> str | None:
    for field in message.split("\n"):
        if field.startswith("STATUS="):
            return field.removeprefix("STATUS=")
    return None


def ws_up(message: str) -> bool:
    status = status_of(message)
    return status is not None and status.startswith("WebSocket up") and "last sync never" not in status


async def until(condition: Callable[[], bool], within: float = 60) -> None:
    """Wait for a condition nothing announces (a metric, a store row, the simulator's request log, a
    file another process writes): polls it, it does not sleep for things to settle."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - a condition without a callback
            await asyncio.sleep(0.01)
