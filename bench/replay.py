"""Replay of a long journal to one client: ``subscribe`` with ``after_seq: 0`` over N journalled events.

    .venv/bin/python bench/replay.py                     # 100,000 events
    .venv/bin/python bench/replay.py --quick             # 20,000 events

The journal is the daemon's real SQLite store (faxd.adapters.store.Store, WAL, synchronous=FULL),
filled through Store.commit in transactions of ``--per-commit`` transitions. The server is a real
EventServer in this process over a Backend that reads the store the way the daemon's does; the client
is a separate process that subscribes from seq 0 and counts lines until ``caught_up``. Reported:
events/s from the subscribe request to ``caught_up`` (client's clock), the server's CPU time for it,
and how long filling the journal took.

Targets (issue 6): replay >= 50,000 events/s, and every journalled event replayed. Exit 0 when both hold.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from report import Report, add_options, apply_quick

from faxd.adapters.event_server import EventServer, EventServerSettings
from faxd.adapters.metrics import Metrics
from faxd.adapters.store import Journalled, Store
from faxd.core.model import Event, EventKind, FaxState, Source, Transition
from faxd.core.protocol import PageKey, QueryRequest, SendRequest, StoredEvent
from faxd.logs import configure_logging


class StoreBackend:
    """The journal half of the daemon's Backend, over the real store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.epoch = store.epoch

    def head_seq(self) -> int:
        return self.store.head_seq()

    def oldest_seq(self) -> int:
        return self.store.oldest_seq()

    def events_after(self, after_seq: int, limit: int) -> list[StoredEvent]:
        return self.store.events_after(after_seq, limit)

    def fax(self, fax_id: str | None = None, ref: str | None = None) -> FaxState | None:
        return None

    def faxes(self, active_only: bool) -> list[FaxState]:
        return []

    def history(self, fax_id: str) -> list[Event]:
        return self.store.history(fax_id)

    async def fax_page(self, query: QueryRequest) -> tuple[list[FaxState], PageKey | None]:
        return [], None

    async def sync(self) -> None:
        return None

    async def send(self, request: SendRequest) -> FaxState:
        raise NotImplementedError


def fill(store: Store, events: int, per_commit: int) -> float:
    """Journal ``events`` transitions (two per recipient: Queued, then Sent or SendingFailed)."""
    started = time.perf_counter()
    n = 0
    while n < events:
        batch = []
        for i in range(n, min(events, n + per_commit)):
            fax, second = divmod(i, 2)
            busy = fax % 7 == 0
            to_status = ("SendingFailed" if busy else "Sent") if second else "Queued"
            t = Transition(
                kind=EventKind.RECIPIENT,
                fax_id=str(2817364000 + fax),
                extension_id="62223441004",
                direction="Outbound",
                from_status="Queued" if second else None,
                to_status=to_status,
                final=bool(second),
                recipient_index=0,
                recipient_phone="+15551230000",
                error_code="LineBusy" if busy and second else None,
                error_category="busy" if busy and second else None,
                retryable=True if busy and second else None,
                pages=2,
                rc_modified="2026-11-23T19:52:00.123Z",
                ref=f"order-{fax}",
            )
            batch.append(Journalled(t, Source.PUSH))
        store.commit([], batch, observed_at="2026-11-23T19:52:01.456Z")
        n += len(batch)
    return time.perf_counter() - started


def client(path: str, results: Any) -> None:
    """Subscribe from 0 and read until caught_up; report (events, seconds, last seq)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        stream = sock.makefile("rb", buffering=1 << 20)
        stream.readline()  # hello
        started = time.perf_counter()
        sock.sendall(b'{"type":"subscribe","after_seq":0}\n')
        events = 0
        for line in stream:
            if line.startswith(b'{"type":"event"'):
                events += 1
            elif line.startswith(b'{"type":"caught_up"'):
                break
        results.put((events, time.perf_counter() - started))


async def serve(path: str, store: Store) -> tuple[int, float, float]:
    metrics = Metrics(CollectorRegistry())
    server = EventServer(
        EventServerSettings(path=path), StoreBackend(store), metrics, server_name="faxd/bench"
    )
    await server.start()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=client, args=(path, results), daemon=True)
    try:
        cpu = time.process_time()
        worker.start()
        events, seconds = await asyncio.to_thread(results.get)
        cpu = time.process_time() - cpu
    finally:
        await server.close()
        worker.join(timeout=10)
    return events, seconds, cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--per-commit", type=int, default=1000, help="transitions per Store.commit")
    add_options(parser, "--events 20000")
    args = parser.parse_args(argv)
    apply_quick(args, events=20_000)
    report = Report.start("replay", parser, args)
    configure_logging(level="warning", fmt="console", redact_phi=True, stream=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="faxd-bench-", dir="/tmp")
    try:
        store = Store(Path(tmp) / "faxd.db")
        store.open()
        try:
            fill_s = fill(store, args.events, args.per_commit)
            events, seconds, cpu = asyncio.run(serve(os.path.join(tmp, "events.sock"), store))
        finally:
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ("journalled events", f"{args.events:,} (filled in {fill_s:.1f} s, {args.per_commit} per commit)"),
        ("replayed to the client", f"{events:,}"),
        ("subscribe → caught_up", f"{seconds:.2f} s"),
        ("replay rate", f"{events / seconds:,.0f} events/s"),
        ("server CPU", f"{cpu:.2f} s ({events / cpu:,.0f} events per CPU-second)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    rate = events / seconds if seconds > 0 else 0.0
    report.target(
        "rate",
        6,
        "replay >= 50,000 events/s (subscribe -> caught_up, from SQLite)",
        rate,
        ">=",
        50_000,
        f"{rate:,.0f} events/s ({events:,} events)",
    )
    report.target(
        "complete",
        6,
        "replay: every journalled event arrives",
        events,
        "==",
        args.events,
        f"{events:,} of {args.events:,}",
    )
    for name, value in (("events", events), ("seconds", seconds), ("server_cpu_s", cpu), ("fill_s", fill_s)):
        report.figure(name, value)
    return report.finish(args.results)


if __name__ == "__main__":
    sys.exit(main())
