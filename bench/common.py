"""Helpers shared by bench/latency.py, bench/footprint.py and bench/scaling.py.

* :func:`machine` — what the figures were measured on (nproc, CPU, RAM, Python, faxd commit, date);
* :class:`Daemon` — faxd as a real subprocess (``python -m faxd run``) with a ``$NOTIFY_SOCKET`` bound here,
  so start-up is timed to the ``READY=1`` datagram and RSS is read from ``/proc/PID/status``;
* :class:`Tap` — a socket client recording when each event (fax, recipient, kind, to_status) arrived;
* :class:`Truth` — when each watched fax took each status in the simulator (event-driven ``wait_for``);
* :class:`Floor` — the latency floor: its own OAuth login, ws token and WSG subscription (plain aiohttp),
  and on each hint exactly one GET of the message that changed (it is told which by :class:`Truth`);
* :func:`build_store` — a store with many faxes and journal rows, written through the real ``Store.commit``;
* small things: :func:`quantile`, :func:`table`, :func:`scrape`, :func:`big_limits`.

Times are ``time.monotonic()`` (the event loop's clock here; system-wide, so comparable with the daemon's
process), in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from report import machine

from faxd import testbed
from faxd.adapters.store import Journalled, Store
from faxd.core.model import EventKind, FaxState, RecipientState, Source, Transition, event_key
from faxd.sim import SimConfig, Simulator

REPO = Path(__file__).resolve().parent.parent
Key = tuple[str, int, str, str]  # (fax id, recipient index or -1, kind, to_status)


# ----------------------------------------------------------------------------------------- reporting


def print_machine() -> None:
    print("machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()))


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1000.0


# ----------------------------------------------------------------------------------------- simulator


def big_limits() -> dict[str, tuple[int, int, int]]:
    """Rate limits so high that no client is ever throttled (throttling is api_efficiency's topic)."""
    return dict.fromkeys(("Light", "Medium", "Heavy", "Auth"), (1_000_000, 60, 60))


def sim_config(*, extensions: int = 1, seed: int = 1, limits: bool = False) -> SimConfig:
    exts = tuple(str(200000001 + i) for i in range(extensions))
    cfg = SimConfig(seed=seed, extensions=exts, default_delay=(3600.0, 3600.0))
    if not limits:
        cfg.rate_limits = big_limits()
    return cfg


class Truth:
    """When each watched fax (and recipient) first held each status in the simulator."""

    def __init__(
        self, sim: Simulator, on_change: Callable[[str, str, str, float], None] | None = None
    ) -> None:
        self.sim = sim
        self.watched: dict[str, str] = {}  # fax id -> extension
        self.seen: dict[Key, float] = {}
        self.on_change = on_change  # (fax id, extension, status, time) for each fax-level change

    def watch(self, fax_id: str, extension_id: str) -> None:
        self.watched[fax_id] = extension_id
        self._observe()

    def _observe(self) -> bool:
        now = time.monotonic()
        for fax_id, ext in self.watched.items():
            m = self.sim.message(fax_id)
            key = (fax_id, -1, "status", m["messageStatus"])
            if key not in self.seen:
                self.seen[key] = now
                if self.on_change is not None:
                    self.on_change(fax_id, ext, m["messageStatus"], now)
            for i, r in enumerate(m.get("to") or []):
                self.seen.setdefault((fax_id, i, "recipient", r["messageStatus"]), now)
        return False

    async def run(self) -> None:
        await self.sim.wait_for(self._observe)  # never true: re-checked on every change until cancelled


@dataclass
class Tap:
    """A socket client subscribed from seq 0: when each event key first arrived, every arrival, how
    often each key came. ``changed`` is set on every event (pass one event to share it with others)."""

    path: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: dict[Key, float] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # every event's arrival
    counts: Counter[Key] = field(default_factory=Counter)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.path, limit=2**24)
        try:
            hello = json.loads(await reader.readline())
            sub = {"type": "subscribe", "after_seq": 0, "epoch": hello["epoch"]}
            writer.write(json.dumps(sub).encode() + b"\n")
            await writer.drain()
            self.connected.set()
            while line := await reader.readline():
                now = time.monotonic()
                msg = json.loads(line)
                if msg.get("type") != "event":
                    continue
                key = event_key(msg)
                self.times.append(now)
                self.counts[key] += 1
                self.arrived.setdefault(key, now)
                self.changed.set()
        finally:
            writer.close()

    async def wait_for(self, keys: Iterable[Key], within: float) -> bool:
        wanted = list(keys)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not all(k in self.arrived for k in wanted):
                    self.changed.clear()
                    await self.changed.wait()
        return all(k in self.arrived for k in wanted)


async def request(path: str, message: dict[str, Any], within: float = 600.0) -> dict[str, Any]:
    """One request on the event socket; the first reply that is not a hello/heartbeat/event."""
    reader, writer = await asyncio.open_unix_connection(path, limit=2**24)
    try:
        async with asyncio.timeout(within):
            await reader.readline()  # hello
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            while True:
                reply = json.loads(await reader.readline())
                if reply.get("type") not in ("hello", "heartbeat", "event"):
                    return dict(reply)
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------- the floor


class Floor:
    """The latency floor: on the same WSG hint faxd gets, exactly one GET of the message that changed.

    Its own client (plain aiohttp): JWT login, ``/restapi/oauth/wstoken``, the WebSocket, one subscription
    to the same event filters faxd uses. Which message changed is not in an ``updatedCount`` hint; the
    floor is an oracle and is told by :class:`Truth` (:meth:`changed`). It cannot be beaten by any client
    that has to find out what changed, so it is the bound faxd is compared with.
    """

    def __init__(self, sim: Simulator, extensions: Sequence[str]) -> None:
        self.sim = sim
        self.extensions = list(extensions)
        self.pending: dict[str, list[tuple[str, str]]] = {e: [] for e in extensions}  # ext -> [(fax, status)]
        self.found: dict[tuple[str, str], float] = {}  # (fax, status) -> when the GET returned it
        self.gets = 0
        self.hints = 0
        self._token = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._unmatched: dict[str, float] = {}  # ext -> when a status hint found nothing pending
        self._session: aiohttp.ClientSession | None = None
        self.subscribed = asyncio.Event()
        self.progress = asyncio.Event()  # set whenever a GET found a change

    async def wait_found(self, wanted: Sequence[tuple[str, str]], within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not all(w in self.found for w in wanted):
                    self.progress.clear()
                    await self.progress.wait()
        return all(w in self.found for w in wanted)

    def changed(self, fax_id: str, extension_id: str, status: str, when: float) -> None:
        if when - self._unmatched.get(extension_id, -1e9) < 0.5:
            self._unmatched.pop(extension_id)
            self._spawn(extension_id, fax_id, status)  # its hint came first
        else:
            self.pending[extension_id].append((fax_id, status))

    def _spawn(self, ext: str, fax_id: str, status: str) -> None:
        task = asyncio.get_running_loop().create_task(self._get(ext, fax_id, status))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        cfg = self.sim.config
        async with aiohttp.ClientSession() as session:
            self._session = session
            auth = aiohttp.BasicAuth(cfg.client_id, cfg.client_secret)
            form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": cfg.jwt}
            async with session.post(f"{self.sim.url}/restapi/oauth/token", data=form, auth=auth) as resp:
                self._token = (await resp.json())["access_token"]
            bearer = {"Authorization": f"Bearer {self._token}"}
            async with session.post(f"{self.sim.url}/restapi/oauth/wstoken", headers=bearer) as resp:
                ws = await resp.json()
            async with session.ws_connect(f"{ws['uri']}?access_token={ws['ws_access_token']}") as sock:
                filters = []
                for ext in self.extensions:
                    base = f"/restapi/v1.0/account/~/extension/{ext}"
                    filters += [f"{base}/message-store?type=Fax", f"{base}/fax?direction=Inbound"]
                meta = {"type": "ClientRequest", "messageId": "floor-1", "method": "POST"}
                meta["path"] = "/restapi/v1.0/subscription"
                body = {"eventFilters": filters, "deliveryMode": {"transportType": "WebSocket"}}
                await sock.send_str(json.dumps([meta, body]))
                async for msg in sock:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    frame = json.loads(msg.data)
                    kind = frame[0].get("type")
                    if kind == "ClientRequest" and frame[0].get("messageId") == "floor-1":
                        self.subscribed.set()
                    elif kind == "ServerNotification":
                        self._hint(frame[1])

    def _hint(self, envelope: dict[str, Any]) -> None:
        body = envelope.get("body") or {}
        ext = str(body.get("extensionId") or "")
        if ext not in self.pending or not any(c.get("updatedCount") for c in body.get("changes") or []):
            return  # new-message and inbound-record hints: not a status change
        self.hints += 1
        todo, self.pending[ext] = self.pending[ext], []
        if not todo:
            self._unmatched[ext] = time.monotonic()
        for fax_id, status in todo:
            self._spawn(ext, fax_id, status)

    async def _get(self, ext: str, fax_id: str, status: str) -> None:
        assert self._session is not None
        self.gets += 1
        url = f"{self.sim.url}/restapi/v1.0/account/~/extension/{ext}/message-store/{fax_id}"
        async with self._session.get(url, headers={"Authorization": f"Bearer {self._token}"}) as resp:
            record = await resp.json()
        if record.get("messageStatus") == status:
            self.found.setdefault((fax_id, status), time.monotonic())
            self.progress.set()


# ----------------------------------------------------------------------------------------- the daemon


def write_config(
    workdir: Path, sim: Simulator, extensions: Sequence[str], **sections: dict[str, Any]
) -> Path:
    """A daemon config for ``sim`` in ``workdir`` (secrets in 0600 files); ``sections`` override keys."""
    bench = {
        "ringcentral": {"extensions": list(extensions)},
        "events": {"client_queue": 100_000},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "logging": {"level": "info", "format": "json"},
    }
    return testbed.write_config(sim, workdir, defaults=bench, **sections)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"faxd-{prefix}-", dir="/tmp"))


class Daemon:
    """faxd as a subprocess; ``start`` returns the seconds from spawn to the ``READY=1`` datagram, and
    ``accepting`` holds the seconds from spawn to the event socket's first ``hello``."""

    def __init__(self, config: Path, *, code: Path | None = None) -> None:
        self.config = config
        #: The checkout whose ``faxd`` package runs (cwd and ``$PYTHONPATH``); None: this one's.
        self.code = code
        self.dir = config.parent
        self.proc: asyncio.subprocess.Process | None = None
        self.metrics_url = f"http://{yaml.safe_load(config.read_text())['metrics']['listen']}/metrics"
        self.socket_path = str(self.dir / "events.sock")
        self.accepting: float | None = None

    async def _probe_socket(self, started: float) -> None:
        """Connect to the event socket until it answers ``hello``; the time goes to ``accepting``.

        Another process binds it: there is nothing to await, so try every 5 ms (the resolution).
        """
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.005)
                continue
            try:
                if (await reader.readline()).startswith(b'{"type":"hello"'):
                    self.accepting = time.monotonic() - started
                    return
            finally:
                writer.close()

    async def start(self, within: float = 120.0) -> float:
        notify_path = str(self.dir / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.setblocking(False)
        loop = asyncio.get_running_loop()
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        if self.code is not None:
            # ``python -m`` puts its cwd first on sys.path, ahead of the venv's editable install.
            env["PYTHONPATH"] = str(self.code)
        try:
            with (self.dir / "faxd.log").open("ab") as log:
                started = time.monotonic()
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "faxd",
                    "run",
                    "-c",
                    str(self.config),
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=self.code,
                )
            probe = asyncio.create_task(self._probe_socket(started))
            try:
                async with asyncio.timeout(within):
                    while True:
                        data = await loop.sock_recv(notify, 65536)
                        if "READY=1" in data.decode(errors="replace").split("\n"):
                            ready = time.monotonic() - started
                            break
                    await probe  # the socket is bound before READY: it answers at once now
                return ready
            finally:
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
        finally:
            notify.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM = peak RSS) in MiB."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        values = {m[1]: int(m[2]) / 1024 for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}
        return values["VmRSS"], values["VmHWM"]

    async def metrics(self) -> dict[str, float]:
        return await scrape(self.metrics_url)

    async def wait_ws_up(self, within: float = 60.0) -> None:
        await self.wait_metric('faxd_ws_state{faxd_ws_state="up"}', lambda v: v == 1.0, within)

    async def wait_metric(
        self, name: str, predicate: Callable[[float], bool], within: float = 300.0
    ) -> float:
        """Poll the daemon's /metrics (another process: nothing to await) until ``predicate(value)``."""
        async with asyncio.timeout(within):
            while True:
                value = (await self.metrics()).get(name, 0.0)
                if predicate(value):
                    return value
                await asyncio.sleep(0.1)

    async def stop(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return -1
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


async def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {sample name with labels: value}; {} when unreachable."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def metric_sum(samples: dict[str, float], prefix: str) -> float:
    """Sum of every sample whose name (with labels) starts with ``prefix``."""
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def cleanup(path: Path, keep: bool) -> None:
    if keep:
        print(f"work directory kept: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- a big store


def build_store(path: Path, faxes: int, journal_rows: int, *, batch: int = 2000) -> float:
    """Write ``faxes`` final outbound faxes (one recipient each) and ``journal_rows`` transitions through
    the real :meth:`Store.commit`, in batches; return the seconds it took.

    Each fax gets up to three transitions (fax Queued, fax Sent or SendingFailed, recipient likewise), so
    ``journal_rows`` <= 3 * ``faxes``. Timestamps are recent, so no retention prune removes them.
    """
    if journal_rows > 3 * faxes:
        raise ValueError("at most three journal rows per fax")
    started = time.monotonic()
    store = Store(path)
    store.open()
    now = dt.datetime.now(dt.UTC)
    iso = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    per_fax, extra = divmod(journal_rows, faxes)
    try:
        for start in range(0, faxes, batch):
            states: list[FaxState] = []
            journal: list[Journalled] = []
            for n in range(start, min(faxes, start + batch)):
                fax_id = str(900_000_000_000 + n)
                failed = n % 5 == 0
                status = "SendingFailed" if failed else "Sent"
                code = "LineBusy" if failed else None
                phone = f"+1650{n % 10_000_000:07d}"
                created = (now - dt.timedelta(seconds=n)).isoformat(timespec="milliseconds")
                created = created.replace("+00:00", "Z")
                rec = RecipientState(0, phone, status, code)
                states.append(
                    FaxState(fax_id, "200000001", "Outbound", status, "Alive", (rec,), 1, created, created)
                )
                moves = [
                    Transition(EventKind.STATUS, fax_id, "200000001", "Outbound", None, "Queued", False),
                    Transition(EventKind.STATUS, fax_id, "200000001", "Outbound", "Queued", status, True),
                    Transition(
                        EventKind.RECIPIENT,
                        fax_id,
                        "200000001",
                        "Outbound",
                        "Queued",
                        status,
                        True,
                        0,
                        phone,
                        code,
                    ),
                ]
                journal += [Journalled(t, Source.PUSH) for t in moves[: per_fax + (1 if n < extra else 0)]]
            store.commit(states, journal, observed_at=iso)
    finally:
        store.close()
    return time.monotonic() - started
