"""Run an official client as a real subprocess and await the JSON lines it prints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from faxd.sim import Simulator

CLIENTS = Path(__file__).resolve().parent / "clients"
EVENT_TIMEOUT = 20.0


class ClientProcess:
    """A client subprocess printing one JSON object per line (``{"event": …}``) on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self._stderr.append(line.decode(errors="replace"))

    def _context(self) -> str:
        events = "\n  ".join(json.dumps(e)[:300] for e in self.events) or "(none)"
        stderr = "".join(self._stderr)[-3000:] or "(empty)"
        return f"{self.name}: events so far:\n  {events}\nstderr:\n{stderr}"

    async def next_event(self, name: str, within: float = EVENT_TIMEOUT) -> dict[str, Any]:
        """Read lines until the event ``name`` (earlier events are kept in :attr:`events`)."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(within):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        await self.proc.wait()
                        await self._stderr_task
                        raise AssertionError(
                            f"{self.name} exited ({self.proc.returncode}) before {name!r}\n{self._context()}"
                        )
                    try:
                        event: dict[str, Any] = json.loads(line)
                    except ValueError:
                        self._stderr.append("stdout: " + line.decode(errors="replace"))
                        continue
                    self.events.append(event)
                    if event.get("event") == name:
                        return event
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {name!r} within {within} s\n{self._context()}") from None

    async def exit_code(self, within: float = EVENT_TIMEOUT) -> int:
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            await self._stderr_task
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task


@contextlib.asynccontextmanager
async def run_client(argv: list[str], *, name: str, cwd: Path | None = None) -> AsyncIterator[ClientProcess]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = ClientProcess(proc, name)
    try:
        yield client
    finally:
        await client.kill()


def credentials(sim: Simulator) -> list[str]:
    cfg = sim.config
    return [sim.url, cfg.client_id, cfg.client_secret, cfg.jwt]


def node_script(npm_dir: Path, name: str) -> Path:
    """A copy of ``clients/<name>`` beside the npm cache's node_modules (ESM resolves from there)."""
    target_dir = npm_dir / "scripts"
    target_dir.mkdir(exist_ok=True)
    target = target_dir / name
    tmp = target_dir / f".{name}.{os.getpid()}"
    shutil.copyfile(CLIENTS / name, tmp)
    tmp.replace(target)
    return target
