"""Webhook outlets: delivered throughput and journal → receiver lag, to one and to ten receivers.

    .venv/bin/python bench/outlets.py                # 5,000 events; paced 30 s at 200 (ten: 100) events/s
    .venv/bin/python bench/outlets.py --quick        # 2,000 events; paced phase 10 s

faxd's side is the real outlet code (faxd.adapters.outlets.Outlets over a real Store, WAL,
synchronous=FULL, cursor commits included) in this process, pinned to one CPU. The receivers are
aiohttp servers on loopback in another process (pinned to the other CPU when there is one), one port
per receiver, each verifying every Standard Webhooks signature with the standardwebhooks package and
answering 204.

Phase 1, throughput: ``--events`` events are journalled before the outlets start (cursor 0); the time
from start until every receiver has had every event. Phase 2, lag: events are journalled and published
at ``--rate`` per second for ``--seconds``, as the engine does; the lag of each event is its arrival at
the receiver minus its ``observed_at`` (the commit). Both phases run with one outlet → one receiver,
then ten outlets → ten receivers (each outlet delivers every event, in order, one at a time).

Targets (issue 15): >= 1,000 events/s to one local receiver on one core; every event delivered to
every receiver, in order, with a valid signature.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from report import Report, add_options, apply_quick

from faxd.adapters.metrics import Metrics
from faxd.adapters.outlets import Ledger, Outlets
from faxd.adapters.store import Journalled, Store
from faxd.config import OutletConfig, Secret, outlet_settings
from faxd.core.model import EventKind, Source, Transition
from faxd.logs import configure_logging

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the receivers' process ------------------------------------------------------------------------------


def receivers(count: int, cpu: int | None, commands: Any, replies: Any) -> None:
    """``count`` receivers; reports ports, then per command ("expect", total) "done" once every receiver
    has had ``total`` events, and on ("stats",) the counters and lags."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    asyncio.run(_serve(count, commands, replies))


async def _serve(count: int, commands: Any, replies: Any) -> None:
    from aiohttp import web
    from standardwebhooks.webhooks import Webhook

    verifier = Webhook(SECRET)
    state: dict[str, Any] = {"counts": [0] * count, "last": [0] * count, "bad": 0, "disorder": 0}
    state["lags"] = []
    state["expect"] = None
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def handler(index: int) -> Any:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            now = time.time()
            try:
                event = verifier.verify(body, dict(request.headers))
            except Exception:
                state["bad"] += 1
                return web.Response(status=400)
            seq = event["seq"]
            if seq != state["last"][index] + 1:
                state["disorder"] += 1
            state["last"][index] = seq
            state["counts"][index] += 1
            observed = datetime.fromisoformat(event["observed_at"].replace("Z", "+00:00")).timestamp()
            state["lags"].append(now - observed)
            expect = state["expect"]
            if expect is not None and min(state["last"]) >= expect:
                done.set()
            return web.Response(status=204)

        return handle

    runners = []
    ports = []
    for i in range(count):
        app = web.Application()
        app.router.add_post("/hook", handler(i))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        server = site._server
        assert server is not None
        ports.append(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    replies.put(ports)
    while True:
        command = await loop.run_in_executor(None, commands.get)
        if command[0] == "expect":
            state["expect"] = command[1]
            done.clear()
            if min(state["last"]) >= command[1]:
                done.set()
            await done.wait()
            replies.put(("done", time.time()))
        elif command[0] == "reset":
            state["lags"] = []
            replies.put("ok")
        elif command[0] == "stats":
            replies.put({k: state[k] for k in ("counts", "last", "bad", "disorder", "lags")})
        else:
            break
    for runner in runners:
        await runner.cleanup()


# -- faxd's side ----------------------------------------------------------------------------------------


def journal(store: Store, n: int) -> None:
    first = store.head_seq() + 1
    transitions = [
        Journalled(
            Transition(
                EventKind.RECIPIENT, f"28173{first + i}", "62223441004", "Outbound", "Queued", "Sent",
                True, 0, "+15551230000", None, None, None, 2, "2026-11-23T19:52:00.123Z", f"o-{first + i}",
            ),
            Source.PUSH,
        )
        for i in range(n)
    ]  # fmt: skip
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    store.commit([], transitions, observed_at=now)


async def run_phase(
    store: Store, ports: list[int], args: argparse.Namespace, commands: Any, replies: Any
) -> dict[str, Any]:
    """Throughput from a pre-filled journal, then the paced lag phase, for len(ports) outlets."""
    metrics = Metrics(CollectorRegistry())
    configs = {
        f"r{i}": OutletConfig(
            type="webhook",
            url=f"http://127.0.0.1:{port}/hook",
            secret=Secret(SECRET, ("env", "BENCH")),
            timeout=10.0,
        )
        for i, port in enumerate(ports)
    }
    base = store.head_seq()
    for name in configs:
        Ledger(store.db).cursor(name, new_at=base)
    journal(store, args.events)
    target = base + args.events
    cpu0, t0 = time.process_time(), time.time()
    outlets = Outlets(outlet_settings(configs), store, metrics)
    async with outlets:
        task = asyncio.create_task(outlets.run())
        try:
            commands.put(("expect", target))
            _, finished = await asyncio.to_thread(replies.get)
            burst_s, burst_cpu = finished - t0, time.process_time() - cpu0
            commands.put(("reset",))
            await asyncio.to_thread(replies.get)
            # paced: like the engine, commit and publish, args.rate events a second
            rate = args.rate if len(ports) == 1 else args.rate_ten
            interval = 1.0 / rate
            total = int(rate * args.seconds)
            start = time.monotonic()
            for i in range(total):
                journal(store, 1)
                outlets.published([])
                delay = start + (i + 1) * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            commands.put(("expect", target + total))
            await asyncio.to_thread(replies.get)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    commands.put(("stats",))
    stats: dict[str, Any] = await asyncio.to_thread(replies.get)
    lags = stats["lags"]
    return {
        "receivers": len(ports),
        "events": args.events,
        "burst_s": burst_s,
        "burst_cpu_s": burst_cpu,
        "rate": args.events * len(ports) / burst_s,
        "rate_per_outlet": args.events / burst_s,
        "paced_events": total,
        "paced_rate": rate,
        "lag_p50_ms": quantile(lags, 0.5) * 1000,
        "lag_p99_ms": quantile(lags, 0.99) * 1000,
        "lag_max_ms": max(lags, default=float("nan")) * 1000,
        "bad_signatures": stats["bad"],
        "out_of_order": stats["disorder"],
        "complete": all(last == target + total for last in stats["last"]),
    }


def measure(count: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    cpus = sorted(os.sched_getaffinity(0))
    receiver_cpu = cpus[1] if len(cpus) > 1 else None
    worker = ctx.Process(target=receivers, args=(count, receiver_cpu, commands, replies), daemon=True)
    worker.start()
    try:
        ports = replies.get(timeout=60)
        store = Store(tmp / f"faxd-{count}.db")
        store.open()
        try:
            return asyncio.run(run_phase(store, ports, args, commands, replies))
        finally:
            store.close()
    finally:
        commands.put(("stop",))
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000, help="journalled before the outlets start")
    parser.add_argument("--rate", type=float, default=200.0, help="paced phase, one receiver: events/s")
    parser.add_argument(
        "--rate-ten", type=float, default=100.0, help="paced phase, ten receivers: events/s (x10 deliveries)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="paced phase: how long")
    add_options(parser, "--events 2000 --seconds 10")
    args = parser.parse_args(argv)
    apply_quick(args, events=2000, seconds=10.0)
    report = Report.start("outlets", parser, args)
    configure_logging(level="warning", fmt="console", redact_phi=True, stream=sys.stderr)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # faxd's side: one core
    tmp = Path(tempfile.mkdtemp(prefix="faxd-bench-", dir="/tmp"))
    try:
        one = measure(1, args, tmp)
        ten = measure(10, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        "| receivers | burst: events/s delivered (per outlet) | faxd CPU for the burst"
        " | paced lag p50 / p99 / max |"
    )
    print("|---|---|---|---|")
    for r in (one, ten):
        print(
            f"| {r['receivers']} | {r['rate']:,.0f} ({r['rate_per_outlet']:,.0f}) | {r['burst_cpu_s']:.2f} s"
            f" for {r['events'] * r['receivers']:,} | {r['lag_p50_ms']:.1f} / {r['lag_p99_ms']:.1f} /"
            f" {r['lag_max_ms']:.1f} ms at {r['paced_rate']:g} events/s |"
        )
    report.target(
        "one_receiver_rate",
        15,
        "webhooks: >= 1,000 events/s to one local receiver, faxd on one core",
        one["rate"],
        ">=",
        1000,
        f"{one['rate']:,.0f} events/s ({args.events:,} events; ten receivers: {ten['rate']:,.0f} in all)",
    )
    faults = sum(r["bad_signatures"] + r["out_of_order"] for r in (one, ten))
    complete = one["complete"] and ten["complete"]
    report.target(
        "complete",
        15,
        "webhooks: every event to every receiver, in order, signature valid",
        0 if complete else 1 + faults,
        "==",
        0,
        "all, in order, signed" if complete and not faults else f"incomplete or {faults} bad/out of order",
    )
    for label, r in (("one", one), ("ten", ten)):
        for key, value in r.items():
            report.figure(f"{label}.{key}", value)
    return report.finish(args.results)


if __name__ == "__main__":
    sys.exit(main())
