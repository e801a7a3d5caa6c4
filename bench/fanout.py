"""Fan-out of the event socket: N subscribed clients, M events published through a real EventServer.

    .venv/bin/python bench/fanout.py                                   # 1,000 clients, 10,000 events
    .venv/bin/python bench/fanout.py --quick                           # 1,000 clients, 500 events
    .venv/bin/python bench/fanout.py --rate 50 --events 3000           # paced: latency below saturation
    .venv/bin/python bench/fanout.py --batch 10                        # 10 events per publish() call

This process runs only the server (EventServer over an in-memory journal, as the daemon runs it over
SQLite: publish() after each commit); the clients live in ``--workers`` separate processes, so the CPU
time and RSS printed for the server are its own. Each client subscribes without a filter and counts
every line; the publish time of every seq is in shared memory, so a client computes the
publish → receive latency of each delivery (CLOCK_MONOTONIC is system-wide) into a histogram.

``--rate 0`` (default) publishes as fast as the loop allows (batches of ``--batch`` events, by default
one per ``publish()`` as the daemon does after each COMMIT, yielding to the writers between batches):
deliveries/s is then the delivered throughput, and the latency is mostly queueing. ``--rate N`` publishes
N events/s: the latency of a server that keeps up, but its deliveries/s is the pace, not a capacity, so
a paced run does not check the throughput target.

Targets (issue 6): delivered throughput >= 50,000 deliveries/s (unpaced runs; the server is one thread,
so on one core), p99 publish -> receive < 100 ms, every client gets every event. Exit 0 when all hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import multiprocessing as mp
import os
import pstats
import re
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from report import Report, add_options, apply_quick

from faxd.adapters.event_server import EventServer, EventServerSettings
from faxd.adapters.metrics import Metrics
from faxd.core.model import Event, EventKind, FaxState, Source, Transition
from faxd.core.protocol import PageKey, QueryRequest, SendRequest
from faxd.logs import configure_logging

EPOCH = "00000000-0000-4000-8000-00000000bench"
BUCKET_S = 0.0001  # latency histogram resolution: 0.1 ms
_SEQ = re.compile(rb'"seq":(\d+)')


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------ server side


class Journal:
    """The Backend of the event server, in memory: what the daemon's store does minus durability."""

    def __init__(self) -> None:
        self.epoch = EPOCH
        self.events: list[Event] = []

    def head_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def oldest_seq(self) -> int:
        return self.events[0].seq if self.events else 1

    def events_after(self, after_seq: int, limit: int) -> list[Event]:
        start = after_seq - self.oldest_seq() + 1 if self.events else 0
        return self.events[max(0, start) : max(0, start) + limit]

    def fax(self, fax_id: str | None = None, ref: str | None = None) -> FaxState | None:
        return None

    def faxes(self, active_only: bool) -> list[FaxState]:
        return []

    def history(self, fax_id: str) -> list[Event]:
        return []

    async def fax_page(self, query: QueryRequest) -> tuple[list[FaxState], PageKey | None]:
        return [], None

    async def sync(self) -> None:
        return None

    async def send(self, request: SendRequest) -> FaxState:
        raise NotImplementedError

    def commit(self, count: int) -> list[Event]:
        events = []
        for _ in range(count):
            seq = self.head_seq() + 1
            fax = 2817364000 + seq // 3
            t = Transition(
                kind=EventKind.RECIPIENT,
                fax_id=str(fax),
                extension_id="62223441004",
                direction="Outbound",
                from_status="Queued",
                to_status="SendingFailed" if seq % 7 == 0 else "Sent",
                final=True,
                recipient_index=seq % 3,
                recipient_phone="+15551230000",
                error_code="LineBusy" if seq % 7 == 0 else None,
                error_category="busy" if seq % 7 == 0 else None,
                retryable=True if seq % 7 == 0 else None,
                pages=2,
                rc_modified="2026-11-23T19:52:00.123Z",
                ref=f"order-{fax}",
            )
            event = Event(seq, self.epoch, t, "2026-11-23T19:52:01.456Z", Source.PUSH)
            self.events.append(event)
            events.append(event)
        return events


@dataclass
class Result:
    wall_s: float
    deliveries: int
    server_cpu_s: float
    rss_start_kib: int
    rss_end_kib: int
    rss_peak_kib: int
    hist: Counter[int]
    slow_consumers: int


async def serve(args: argparse.Namespace, path: str, pub_times: Any, ready: Any, results: Any) -> Result:
    journal = Journal()
    metrics = Metrics(CollectorRegistry())
    settings = EventServerSettings(
        path=path,
        max_clients=args.clients + 10,
        client_queue=args.queue,
        heartbeat_interval=3600,
        subscribe_timeout=3600,
    )
    server = EventServer(settings, journal, metrics, server_name="faxd/bench")
    await server.start()
    rss_start = _rss_kib()
    ctx = mp.get_context("spawn")
    per_worker = [
        args.clients // args.workers + (i < args.clients % args.workers) for i in range(args.workers)
    ]
    workers = [
        ctx.Process(target=client_worker, args=(path, n, args.events, pub_times, ready, results), daemon=True)
        for n in per_worker
    ]
    for w in workers:
        w.start()
    try:
        for _ in workers:  # every client subscribed (caught_up)
            await asyncio.to_thread(ready.get)
        started = time.monotonic()
        cpu_started = time.process_time()
        published = 0
        interval = args.batch / args.rate if args.rate else 0.0
        while published < args.events:
            count = min(args.batch, args.events - published)
            events = journal.commit(count)
            now = time.monotonic()
            for e in events:
                pub_times[e.seq] = now
            server.publish(events)
            published += count
            if interval:
                await asyncio.sleep(max(0.0, started + published / args.rate - time.monotonic()))
            else:
                await asyncio.sleep(0)
        hist: Counter[int] = Counter()
        deliveries = 0
        last_receive = started
        for _ in workers:
            got, worker_hist, worker_last = await asyncio.to_thread(results.get)
            deliveries += got
            hist.update(worker_hist)
            last_receive = max(last_receive, worker_last)
        cpu = time.process_time() - cpu_started
        slow = metrics.registry.get_sample_value("faxd_socket_disconnects_total", {"reason": "slow_consumer"})
        result = Result(
            wall_s=last_receive - started,
            deliveries=deliveries,
            server_cpu_s=cpu,
            rss_start_kib=rss_start,
            rss_end_kib=_rss_kib(),
            rss_peak_kib=_rss_kib("VmHWM"),
            hist=hist,
            slow_consumers=int(slow or 0),
        )
    finally:
        await server.close()
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    return result


# ------------------------------------------------------------------------------------------ client side


class _Counter(asyncio.Protocol):
    """One subscribed connection: counts event lines and bins their publish → receive latency."""

    def __init__(self, expected: int, pub_times: Any, hist: Counter[int], done: asyncio.Future[None]) -> None:
        self.expected = expected
        self.pub_times = pub_times
        self.hist = hist
        self.done = done
        self.tail = b""
        self.events = 0
        self.caught_up = asyncio.get_running_loop().create_future()
        self.last = 0.0

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        end = data.rfind(b"\n")
        if end < 0:
            self.tail += data
            return
        chunk, self.tail = self.tail + data[: end + 1], data[end + 1 :]
        if not self.caught_up.done():
            if b'"caught_up"' in chunk:
                self.caught_up.set_result(None)
            return
        pub = self.pub_times
        hist = self.hist
        seqs = _SEQ.findall(chunk)
        for seq in seqs:
            hist[int((now - pub[int(seq)]) / BUCKET_S)] += 1
        self.events += len(seqs)
        self.last = now
        if self.events >= self.expected and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed after {self.events} events"))


async def _clients(
    path: str, count: int, events: int, pub_times: Any, ready: Any
) -> tuple[int, Counter[int], float]:
    loop = asyncio.get_running_loop()
    hist: Counter[int] = Counter()
    protocols: list[_Counter] = []
    transports = []
    dones: list[asyncio.Future[None]] = []
    gate = asyncio.Semaphore(50)  # the listen backlog is 100

    async def one() -> None:
        done: asyncio.Future[None] = loop.create_future()
        async with gate:
            transport, protocol = await loop.create_unix_connection(
                lambda: _Counter(events, pub_times, hist, done), path
            )
            transport.write(b'{"type":"subscribe"}\n')
            await protocol.caught_up
        protocols.append(protocol)
        transports.append(transport)
        dones.append(done)

    await asyncio.gather(*(one() for _ in range(count)))
    ready.put(count)
    results = await asyncio.gather(*dones, return_exceptions=True)
    for t in transports:
        t.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        print(f"worker {os.getpid()}: {len(failed)} connections failed: {failed[0]}", file=sys.stderr)
    return sum(p.events for p in protocols), hist, max((p.last for p in protocols), default=0.0)


def client_worker(path: str, count: int, events: int, pub_times: Any, ready: Any, results: Any) -> None:
    _raise_fd_limit()
    results.put(asyncio.run(_clients(path, count, events, pub_times, ready)))


# ------------------------------------------------------------------------------------------ report


def percentile(hist: Counter[int], q: float) -> float:
    total = sum(hist.values())
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) * BUCKET_S
    return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--batch", type=int, default=1, help="events per publish() call")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s to publish; 0: as fast as possible")
    parser.add_argument("--queue", type=int, default=1000, help="events.client_queue")
    parser.add_argument("--profile", action="store_true", help="cProfile the server; top 25 on stderr")
    add_options(parser, "--events 500 (1,000 clients still: throughput depends on the fan-out width)")
    args = parser.parse_args(argv)
    apply_quick(args, events=500)
    report = Report.start("fanout", parser, args, ignore=("profile", "workers"))
    configure_logging(level="warning", fmt="console", redact_phi=True, stream=sys.stderr)
    _raise_fd_limit()
    tmp = tempfile.mkdtemp(prefix="faxd-bench-", dir="/tmp")
    ctx = mp.get_context("spawn")
    pub_times: Synchronized[float] | Any = ctx.Array("d", args.events + 1, lock=False)
    ready, results = ctx.Queue(), ctx.Queue()
    profiler = cProfile.Profile() if args.profile else None
    try:
        if profiler is not None:
            profiler.enable()
        r = asyncio.run(serve(args, os.path.join(tmp, "events.sock"), pub_times, ready, results))
    finally:
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        shutil.rmtree(tmp, ignore_errors=True)
    expected = args.clients * args.events
    rate = f"{args.rate:g} events/s" if args.rate else "as fast as possible"
    rows = [
        ("clients x events", f"{args.clients:,} x {args.events:,} ({rate}, batches of {args.batch})"),
        ("deliveries", f"{r.deliveries:,} of {expected:,}; slow_consumer cut-offs: {r.slow_consumers}"),
        ("wall time, first publish → last receive", f"{r.wall_s:.2f} s"),
        ("deliveries/s (wall)", f"{r.deliveries / r.wall_s:,.0f}"),
        ("server CPU", f"{r.server_cpu_s:.2f} s ({100 * r.server_cpu_s / r.wall_s:.0f}% of one core)"),
        ("deliveries per server CPU-second", f"{r.deliveries / r.server_cpu_s:,.0f}"),
        ("latency publish → receive p50", f"{percentile(r.hist, 0.50) * 1000:.1f} ms"),
        ("latency publish → receive p99", f"{percentile(r.hist, 0.99) * 1000:.1f} ms"),
        ("latency max", f"{percentile(r.hist, 1.0) * 1000:.1f} ms"),
        (
            "server RSS before clients / after / peak",
            f"{r.rss_start_kib / 1024:.0f} / {r.rss_end_kib / 1024:.0f} / {r.rss_peak_kib / 1024:.0f} MiB",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    throughput = r.deliveries / r.wall_s if r.wall_s > 0 else 0.0
    p99 = percentile(r.hist, 0.99) * 1000
    shape = f"{args.clients:,} clients x {args.events:,} events, {args.batch} per publish()"
    if args.rate:
        report.note(
            f"paced at {args.rate:g} events/s: deliveries/s is the pace, so throughput is not checked"
        )
    else:
        report.target(
            "throughput",
            6,
            "fan-out delivered throughput >= 50,000 deliveries/s (one server thread)",
            throughput,
            ">=",
            50_000,
            f"{throughput:,.0f}/s ({shape}, server at {100 * r.server_cpu_s / r.wall_s:.0f}% of a core)",
        )
    report.target(
        "p99", 6, "fan-out p99 publish -> receive < 100 ms", p99, "<", 100, f"{p99:.1f} ms ({shape})"
    )
    report.target(
        "complete",
        6,
        "fan-out: every client gets every event (no slow_consumer cut-off)",
        r.deliveries if not r.slow_consumers else -1,
        "==",
        expected,
        f"{r.deliveries:,} of {expected:,} deliveries, {r.slow_consumers} cut-offs",
    )
    for name, value in (
        ("deliveries", r.deliveries),
        ("wall_s", r.wall_s),
        ("deliveries_per_s", throughput),
        ("server_cpu_s", r.server_cpu_s),
        ("deliveries_per_server_cpu_s", r.deliveries / r.server_cpu_s if r.server_cpu_s else None),
        ("p50_ms", percentile(r.hist, 0.50) * 1000),
        ("p99_ms", p99),
        ("max_ms", percentile(r.hist, 1.0) * 1000),
        ("rss_start_mib", r.rss_start_kib / 1024),
        ("rss_end_mib", r.rss_end_kib / 1024),
        ("rss_peak_mib", r.rss_peak_kib / 1024),
    ):
        report.figure(name, value)
    return report.finish(args.results)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
