"""The outlets (docs/outlets.md): exec hooks and signed webhooks fed from the journal, each from its own
durable cursor in the store.

One :class:`Outlet` per ``outlets.NAME`` of the config reads the journal after its cursor in batches,
skips what its filter does not want, delivers the rest in seq order (a hook with ``concurrency`` > 1
runs up to that many at once within a batch) and retries each event until it is delivered or given
up into the dead-letter table (the policy is :mod:`faxd.core.outlets`). The cursor moves only past
a batch whose every event is done, and is committed to the store at most every
:data:`FLUSH_INTERVAL` while events flow, when the outlet catches up and when it stops: a crash
redelivers at most the events after the last commit (at least once, never lost). The outlet sleeps
until the engine publishes new events (:meth:`Outlets.published`), or :data:`IDLE_CHECK` passes (a
replay asked for by ``faxd outlets replay``, which writes only the store, is taken then).

Functions at the end serve the ``faxd outlets`` commands, which read (and for a replay, write) the
store directly and so need no secret.

This module must not decide policy (backoff, what a status means: the core does), put a signing
secret or a hook's environment in a log line, or run a hook through a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import structlog

from faxd import __version__
from faxd.adapters.metrics import Metrics
from faxd.adapters.store import Store
from faxd.core.model import Event
from faxd.core.outlets import (
    Attempt,
    GiveUp,
    Outcome,
    OutletSettings,
    after_failure,
    classify_status,
    exit_outcome,
    hook_environment,
    parse_retry_after,
    webhook_headers,
    webhook_id,
)
from faxd.core.protocol import StoredEvent, encode_event
from faxd.core.status import parse_time

log = structlog.get_logger(__name__)

#: Events read from the journal at once; the cursor moves by whole batches.
BATCH = 200
#: Longest time delivered events wait for their cursor commit while events keep flowing.
FLUSH_INTERVAL = 0.5
#: How often an idle outlet looks for a replay request (written by another process).
IDLE_CHECK = 1.0
#: A hook gets this long after SIGTERM (timeout, shutdown) before SIGKILL.
HOOK_KILL_GRACE = 1.0
#: The variables of faxd's own environment a hook inherits; nothing else (faxd's may hold secrets).
HOOK_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the store's outlet tables -----------------------------------------------------------------------


@dataclass(frozen=True)
class OutletState:
    """One row of ``faxd outlets``."""

    name: str
    cursor: int
    head_seq: int
    lag_seconds: float
    dead_letters: int
    updated_at: str
    replay_from: int | None


@dataclass(frozen=True)
class DeadLetter:
    """One event an outlet gave up on."""

    seq: int
    epoch: str
    fax_id: str | None
    attempts: int
    reason: str
    parked_at: str
    event: str


class Ledger:
    """The outlet tables of the store (migration 3): cursors, replay requests, dead letters."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def cursor(self, name: str, *, new_at: int) -> int:
        """The committed cursor of ``name``; a new outlet starts at ``new_at`` (the journal's head: it
        gets the events from now on, and older ones only when replayed)."""
        self.db.execute(
            "INSERT INTO outlet_cursors (name, cursor, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (name, new_at, _now_iso()),
        )
        (cursor,) = self.db.execute("SELECT cursor FROM outlet_cursors WHERE name = ?", (name,)).fetchone()
        return int(cursor)

    def commit(self, name: str, cursor: int) -> None:
        self.db.execute(
            "UPDATE outlet_cursors SET cursor = ?, updated_at = ? WHERE name = ?", (cursor, _now_iso(), name)
        )

    def take_replay(self, name: str) -> int | None:
        """The seq a replay asked ``name`` to start from, once (the request is cleared)."""
        row = self.db.execute(
            "SELECT replay_from FROM outlet_cursors WHERE name = ? AND replay_from IS NOT NULL", (name,)
        ).fetchone()
        if row is None:
            return None
        self.db.execute(
            "UPDATE outlet_cursors SET replay_from = NULL WHERE name = ? AND replay_from = ?", (name, row[0])
        )
        return int(row[0])

    def request_replay(self, name: str, from_seq: int) -> bool:
        """Ask the outlet ``name`` to deliver again from ``from_seq``; False if there is no such outlet."""
        cursor = self.db.execute("UPDATE outlet_cursors SET replay_from = ? WHERE name = ?", (from_seq, name))
        return cursor.rowcount == 1

    def dead_letter(self, name: str, event: StoredEvent, body: bytes, attempts: int, reason: str) -> None:
        fax_id = json.loads(body).get("fax_id")
        self.db.execute(
            "INSERT INTO outlet_dead_letters (outlet, epoch, seq, fax_id, attempts, reason, parked_at, event)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (outlet, epoch, seq) DO UPDATE SET"
            " attempts = excluded.attempts, reason = excluded.reason, parked_at = excluded.parked_at",
            (name, event.epoch, event.seq, fax_id, attempts, reason, _now_iso(), body.decode()),
        )

    def dead_letters(self, name: str, limit: int = 1000) -> list[DeadLetter]:
        rows = self.db.execute(
            "SELECT seq, epoch, fax_id, attempts, reason, parked_at, event FROM outlet_dead_letters"
            " WHERE outlet = ? ORDER BY parked_at, seq LIMIT ?",
            (name, limit),
        )
        return [DeadLetter(*row) for row in rows]

    def names(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT name FROM outlet_cursors ORDER BY name")]

    def states(self, now: float) -> list[OutletState]:
        """Every outlet the store knows, with its lag behind the journal's head."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'journal'").fetchone()
        head = 0 if row is None else int(row[0])
        out: list[OutletState] = []
        for name, cursor, replay_from, updated_at in self.db.execute(
            "SELECT name, cursor, replay_from, updated_at FROM outlet_cursors ORDER BY name"
        ).fetchall():
            nxt = self.db.execute(
                "SELECT observed_at FROM journal WHERE seq > ? ORDER BY seq LIMIT 1", (cursor,)
            ).fetchone()
            since = parse_time(nxt[0]) if nxt else None
            (dead,) = self.db.execute(
                "SELECT COUNT(*) FROM outlet_dead_letters WHERE outlet = ?", (name,)
            ).fetchone()
            lag = max(0.0, now - since) if since is not None else 0.0
            out.append(OutletState(name, cursor, head, lag, int(dead), updated_at, replay_from))
        return out


def open_ledger(database: str | Path, *, write: bool) -> Ledger:
    """The outlet tables of the store file at ``database`` (which must exist), for the CLI; read-only
    unless ``write``. Safe while faxd runs (WAL: readers never block its writer)."""
    path = Path(database)
    if not path.is_file():
        raise FileNotFoundError(f"no store at {path}")
    uri = f"file:{quote(str(path.absolute()))}?mode={'rw' if write else 'ro'}"
    db = sqlite3.connect(uri, uri=True, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    try:
        db.execute("SELECT 1 FROM outlet_cursors LIMIT 1")
    except sqlite3.OperationalError:
        db.close()
        raise FileNotFoundError(f"{path} has no outlet tables (faxd has not run this version yet)") from None
    return Ledger(db)


# -- senders: one attempt to deliver one event ---------------------------------------------------------


class Sender(Protocol):
    """Makes one delivery attempt of one event (``body``: its wire JSON)."""

    async def attempt(self, event: StoredEvent, body: bytes, number: int) -> Attempt: ...

    async def aclose(self) -> None: ...


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verified TLS: the system's trust store, or only ``ca_file`` when given."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class WebhookSender:
    """POSTs an event, signed per Standard Webhooks, on a kept-alive connection; no redirects followed,
    no proxy from the environment."""

    def __init__(self, cfg: OutletSettings) -> None:
        assert cfg.url is not None
        self._url = cfg.url
        self._key = cfg.key
        connector = aiohttp.TCPConnector(ssl=tls_context(cfg.ca_file), limit=1)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": f"faxd/{__version__}"},
            timeout=aiohttp.ClientTimeout(total=cfg.timeout),
        )

    async def attempt(self, event: StoredEvent, body: bytes, number: int) -> Attempt:
        headers = webhook_headers(self._key, webhook_id(event.epoch, event.seq), int(time.time()), body)
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                # Only the status matters; a small body is read to keep the connection, a big one
                # is not (leaving the context then closes the connection).
                await resp.content.read(65536)
                outcome = classify_status(resp.status)
                retry_after = None
                if outcome is Outcome.RETRY:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                return Attempt(outcome, f"HTTP {resp.status}", retry_after)
        except TimeoutError:
            return Attempt(Outcome.RETRY, "timeout")
        except aiohttp.ClientError as exc:
            return Attempt(Outcome.RETRY, f"connection failed ({type(exc).__name__})")

    async def aclose(self) -> None:
        await self._session.close()


class ExecSender:
    """Runs the hook's argv (no shell) in its own process group, the event JSON on its stdin; its
    stdout is discarded, its stderr is faxd's (the journal)."""

    def __init__(self, cfg: OutletSettings, environ: dict[str, str] | None = None) -> None:
        assert cfg.command
        self._name = cfg.name
        self._argv = cfg.command
        self._timeout = cfg.timeout
        env = os.environ if environ is None else environ
        self._base = {k: env[k] for k in HOOK_INHERITED_ENV if k in env}
        self._base.setdefault("PATH", DEFAULT_PATH)

    async def attempt(self, event: StoredEvent, body: bytes, number: int) -> Attempt:
        env = hook_environment(json.loads(body), outlet=self._name, attempt=number, base=self._base)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return Attempt(Outcome.RETRY, f"cannot run {self._argv[0]}: {exc.strerror}")
        try:
            async with asyncio.timeout(self._timeout):
                await proc.communicate(body + b"\n")
        except TimeoutError:
            await _stop_group(proc)
            return Attempt(Outcome.RETRY, f"timeout after {self._timeout:g}s")
        except BaseException:
            await _stop_group(proc)
            raise
        assert proc.returncode is not None
        return exit_outcome(proc.returncode)

    async def aclose(self) -> None:
        return None


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the hook's process group, SIGKILL after :data:`HOOK_KILL_GRACE`; waits for it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            async with asyncio.timeout(HOOK_KILL_GRACE):
                await asyncio.shield(proc.wait())
            return
        except TimeoutError:
            continue


# -- one outlet ------------------------------------------------------------------------------------------


class Outlet:
    """One outlet's delivery loop (see the module's docstring)."""

    def __init__(
        self,
        cfg: OutletSettings,
        sender: Sender,
        store: Store,
        metrics: Metrics,
        rand: Callable[[], float] = random.random,
    ) -> None:
        name = self.name = cfg.name
        self._cfg = cfg
        self._sender = sender
        self._store = store
        self._ledger = Ledger(store.db)
        self._metrics = metrics
        self._rand = rand
        self._filter = cfg.filter
        self._policy = cfg.retry
        self._wake = asyncio.Event()
        self.cursor = 0  # every event up to here is done; committed at most FLUSH_INTERVAL late
        self._committed = 0
        self._flushed_at = 0.0
        self._pending_since: float | None = None  # observed_at of the oldest event not done yet
        for family in (metrics.outlet_delivered, metrics.outlet_failed, metrics.outlet_dead_lettered):
            family.labels(name)
        metrics.outlet_retrying.labels(name).set(0)
        metrics.outlet_lag_seconds.labels(name).set_function(self._lag_seconds)
        metrics.outlet_lag_events.labels(name).set_function(self._lag_events)

    def _lag_seconds(self) -> float:
        since = self._pending_since
        return 0.0 if since is None else max(0.0, time.time() - since)

    def _lag_events(self) -> float:
        return float(max(0, self._store.head_seq() - self.cursor))

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self.cursor = self._committed = self._ledger.cursor(self.name, new_at=self._store.head_seq())
        self._metrics.outlet_cursor.labels(self.name).set(self.cursor)
        log.info("outlet.started", outlet=self.name, type=self._cfg.kind, cursor=self.cursor)
        try:
            while True:
                self._wake.clear()
                self._take_replay()
                batch = self._store.events_after(self.cursor, BATCH)
                if not batch:
                    self._pending_since = None
                    self._flush()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(IDLE_CHECK):
                            await self._wake.wait()
                    continue
                if batch[0].seq > self.cursor + 1:
                    log.warning(
                        "outlet.events_pruned",
                        outlet=self.name,
                        after_seq=self.cursor,
                        next_seq=batch[0].seq,
                        detail="the journal was pruned (store.retention_days) before this outlet got them",
                    )
                await self._deliver_batch(batch)
                self.cursor = batch[-1].seq
                if time.monotonic() - self._flushed_at >= FLUSH_INTERVAL:
                    self._flush()
        finally:
            self._flush()

    def _flush(self) -> None:
        if self.cursor != self._committed:
            self._ledger.commit(self.name, self.cursor)
            self._committed = self.cursor
            self._metrics.outlet_cursor.labels(self.name).set(self.cursor)
        self._flushed_at = time.monotonic()

    def _take_replay(self) -> None:
        from_seq = self._ledger.take_replay(self.name)
        if from_seq is None:
            return
        oldest = self._store.oldest_seq()
        start = max(from_seq, oldest)
        self.cursor = start - 1
        self._flush()
        log.warning(
            "outlet.replay", outlet=self.name, from_seq=from_seq, oldest_seq=oldest, cursor=self.cursor
        )

    async def _deliver_batch(self, batch: Sequence[StoredEvent]) -> None:
        wanted = [event for event in batch if self._filter.matches(event)]
        if not wanted:
            return
        self._pending_since = parse_time(wanted[0].observed_at)
        if self._cfg.concurrency == 1:
            for event in wanted:
                self._pending_since = parse_time(event.observed_at)
                await self._deliver(event)
            return
        slots = asyncio.Semaphore(self._cfg.concurrency)

        async def one(event: StoredEvent) -> None:
            try:
                await self._deliver(event)
            finally:
                slots.release()

        async with asyncio.TaskGroup() as tg:
            for event in wanted:
                await slots.acquire()
                tg.create_task(one(event))

    async def _deliver(self, event: StoredEvent) -> None:
        """Attempt ``event`` until it is delivered or given up (dead-lettered)."""
        body = encode_event(event, include_numbers=self._cfg.include_numbers)[:-1]
        observed = parse_time(event.observed_at) or time.time()
        failures = 0
        retrying = False
        try:
            while True:
                attempt = await self._sender.attempt(event, body, failures + 1)
                if attempt.outcome is Outcome.DELIVERED:
                    self._metrics.outlet_delivered.labels(self.name).inc()
                    if failures:
                        log.info(
                            "outlet.delivered_after_retry",
                            outlet=self.name,
                            seq=event.seq,
                            attempts=failures + 1,
                        )
                    return
                failures += 1
                self._metrics.outlet_failed.labels(self.name).inc()
                step = after_failure(
                    self._policy,
                    attempt,
                    failures=failures,
                    observed_at=observed,
                    now=time.time(),
                    rand=self._rand(),
                )
                if isinstance(step, GiveUp):
                    self._give_up(event, body, failures, step.reason)
                    return
                if not retrying:
                    retrying = True
                    self._metrics.outlet_retrying.labels(self.name).inc()
                log.warning(
                    "outlet.attempt_failed",
                    outlet=self.name,
                    seq=event.seq,
                    attempt=failures,
                    reason=attempt.reason,
                    retry_in=round(step.delay, 2),
                )
                await asyncio.sleep(step.delay)
        finally:
            if retrying:
                self._metrics.outlet_retrying.labels(self.name).dec()

    def _give_up(self, event: StoredEvent, body: bytes, attempts: int, reason: str) -> None:
        self._ledger.dead_letter(self.name, event, body, attempts, reason)
        self._metrics.outlet_dead_lettered.labels(self.name).inc()
        log.error("outlet.dead_lettered", outlet=self.name, seq=event.seq, attempts=attempts, reason=reason)


# -- every outlet ------------------------------------------------------------------------------------------


class Outlets:
    """The configured outlets: opened (HTTP sessions) as an async context, woken by each publish, run
    as one task of the supervisor."""

    def __init__(self, outlets: Sequence[OutletSettings], store: Store, metrics: Metrics) -> None:
        self._outlets: list[Outlet] = []
        for cfg in outlets:
            sender: Sender = WebhookSender(cfg) if cfg.kind == "webhook" else ExecSender(cfg)
            self._outlets.append(Outlet(cfg, sender, store, metrics))

    async def __aenter__(self) -> Outlets:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for outlet in self._outlets:
            await outlet._sender.aclose()

    def published(self, _: Sequence[Event]) -> None:
        for outlet in self._outlets:
            outlet.wake()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for outlet in self._outlets:
                tg.create_task(outlet.run(), name=f"outlet-{outlet.name}")


def outlet_states(ledger: Ledger) -> list[dict[str, Any]]:
    """``faxd outlets --json``: one object per outlet."""
    return [
        {
            "name": s.name,
            "cursor": s.cursor,
            "head_seq": s.head_seq,
            "lag_events": max(0, s.head_seq - s.cursor),
            "lag_seconds": round(s.lag_seconds, 1),
            "dead_letters": s.dead_letters,
            "updated_at": s.updated_at,
            "replay_from": s.replay_from,
        }
        for s in ledger.states(time.time())
    ]
