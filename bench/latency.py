"""Latency: a status change in the simulator → the event on a socket client, against the floor.

    .venv/bin/python bench/latency.py                      # 200 changes, ~1 per second, 4 extensions
    .venv/bin/python bench/latency.py --changes 100 --rtt 0.1   # every REST answer 100 ms late (a WAN)
    .venv/bin/python bench/latency.py --quick              # 40 changes

One simulator (in this process) serves two clients watching the same workload at the same time:

* faxd, a real subprocess (``python -m faxd run``) with its default reconcile settings unless told
  otherwise (``--debounce``, ``--max-delay``), and a socket client (in this process) subscribed from seq 0;
* the floor (bench/common.py ``Floor``): its own login and WSG subscription to the same filters; on each
  status hint it makes exactly one GET of the message that changed (it is told which: an oracle) and is
  done when the answer shows the new status.

Workload: CHANGES outbound faxes (one recipient each: 70 % Sent, 30 % SendingFailed) are created at the
start, spread over EXTENSIONS extensions; their status changes come later, one at a time, at random
(exponential gaps, mean GAP seconds overall), so per extension some changes arrive after a quiet period
(faxd's leading edge: reconciled at once) and some within the debounce window (coalesced, served later).
Latency = when a client had the new status - when the simulator made the change. Rate limits are set
high: throttling is bench/api_efficiency.py's subject. Prints the table.

Targets (issue 8): p50 <= 1.5 x the floor's p50; p99 <= debounce + max_delay; every change seen by both
clients. Exit 0 when all hold, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time

from common import (
    Daemon,
    Floor,
    Tap,
    Truth,
    cleanup,
    metric_sum,
    ms,
    print_machine,
    quantile,
    sim_config,
    table,
    workdir,
    write_config,
)
from report import Report, add_options, apply_quick

from faxd.sim import RecipientScript, Simulator


async def bench(args: argparse.Namespace, report: Report) -> int:
    rng = random.Random(args.seed)
    cfg = sim_config(extensions=args.extensions, seed=args.seed)
    exts = list(cfg.extensions)
    work = workdir("latency")
    async with Simulator(cfg) as sim:
        if args.rtt:
            sim.delay_next_requests(10**9, args.rtt)
        reconcile = {"debounce": args.debounce, "max_delay": args.max_delay}
        daemon = Daemon(write_config(work, sim, exts, reconcile=reconcile))
        ready = await daemon.start()
        await daemon.wait_ws_up()
        floor = Floor(sim, exts)

        def on_change(fax_id: str, ext: str, status: str, when: float) -> None:
            if status != "Queued":
                floor.changed(fax_id, ext, status, when)

        truth = Truth(sim, on_change)
        tap = Tap(daemon.socket_path)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(floor.run()), tg.create_task(truth.run()), tg.create_task(tap.run())]
            async with asyncio.timeout(30):
                await floor.subscribed.wait()
            # The workload: every fax now, each status change later, one at a time.
            at = args.lead
            plan: list[tuple[str, str]] = []
            for n in range(args.changes):
                at += max(0.01, rng.expovariate(1.0 / args.gap))
                ext = rng.choice(exts)
                phone = f"+1650555{n:04d}"
                if rng.random() < 0.3:
                    script = RecipientScript(phone, "SendingFailed", "NoAnswer", after=at)
                else:
                    script = RecipientScript(phone, "Sent", after=at)
                fax_id = sim.create_outbound_fax(ext, [script])
                truth.watch(fax_id, ext)
                plan.append((fax_id, script.outcome))
            before = await daemon.metrics()
            requests_before = len(sim.requests)
            print(f"faxd READY after {ready:.2f} s; {args.changes} changes over ~{at:.0f} s ...", flush=True)
            keys = [(fax_id, -1, "status", outcome) for fax_id, outcome in plan]
            await tap.wait_for(keys, within=at + 120)
            await floor.wait_found(plan, within=30)
            after = await daemon.metrics()
            rss, _ = daemon.rss_mb()
            for task in tasks:
                task.cancel()
        code = await daemon.stop()
        http = [r for r in sim.requests[requests_before:] if r.transport == "http"]

    faxd_lat, floor_lat = [], []
    for fax_id, outcome in plan:
        changed = truth.seen.get((fax_id, -1, "status", outcome))
        got = tap.arrived.get((fax_id, -1, "status", outcome))
        floor_got = floor.found.get((fax_id, outcome))
        if changed is None or got is None or floor_got is None:
            continue
        faxd_lat.append(got - changed)
        floor_lat.append(floor_got - changed)
    missing = len(plan) - len(faxd_lat)
    reconciles = metric_sum(after, "faxd_reconciles_total") - metric_sum(before, "faxd_reconciles_total")
    faxd_requests = len(http) - floor.gets

    print_machine()
    print(
        f"faxd config: reconcile.debounce {args.debounce} s, max_delay {args.max_delay} s, other keys default"
        f" (poll_interval 300 s, active_poll_interval 60 s); logging info/json; REST answers delayed"
        f" {ms(args.rtt):.0f} ms; {len(exts)} extension(s); mean gap between changes {args.gap} s;"
        f" faxd exit on SIGTERM {code}; RSS at the end {rss:.1f} MiB"
    )
    rows = []
    for q in (0.5, 0.9, 0.99, 1.0):
        a, b = quantile(faxd_lat, q), quantile(floor_lat, q)
        rows.append((f"p{int(q * 100)}" if q < 1 else "max", ms(a), ms(b), a / b if b else float("nan")))
    print()
    print(table(["latency (ms)", "faxd", "floor", "faxd / floor"], rows))
    leading = sum(1 for v in faxd_lat if v < args.debounce / 2)
    print()
    print(
        table(
            ["", "faxd", "floor"],
            [
                ("changes measured", len(faxd_lat), len(floor_lat)),
                ("served at once (< debounce/2)", leading, len(floor_lat)),
                ("REST requests during the run", faxd_requests, floor.gets),
                ("reconciles", int(reconciles), "n/a"),
                ("requests per change", faxd_requests / max(1, len(plan)), floor.gets / max(1, len(plan))),
            ],
        )
    )
    p50, floor_p50 = quantile(faxd_lat, 0.5), quantile(floor_lat, 0.5)
    p99 = quantile(faxd_lat, 0.99)
    bound = args.debounce + args.max_delay
    ratio = p50 / floor_p50 if floor_p50 else float("nan")
    report.target(
        "p50",
        8,
        "latency p50 <= 1.5 x the one-GET floor's p50",
        ratio,
        "<=",
        1.5,
        f"{ratio:.2f} x ({ms(p50):.1f} vs {ms(floor_p50):.1f} ms)",
    )
    report.target(
        "p99",
        8,
        f"latency p99 <= debounce + max_delay ({bound:g} s)",
        p99,
        "<=",
        bound,
        f"{p99:.2f} s",
    )
    report.target(
        "complete",
        8,
        "latency: every change seen by faxd and the floor",
        len(faxd_lat),
        "==",
        len(plan),
        f"{len(faxd_lat)}/{len(plan)} changes",
    )
    for q in (0.5, 0.9, 0.99, 1.0):
        name = f"p{int(q * 100)}" if q < 1 else "max"
        report.figure(f"faxd_{name}_ms", ms(quantile(faxd_lat, q)))
        report.figure(f"floor_{name}_ms", ms(quantile(floor_lat, q)))
    report.figure("served_at_once", leading)
    report.figure("faxd_requests_per_change", faxd_requests / max(1, len(plan)))
    report.figure("ready_s", ready)
    if missing:
        print(f"{missing} changes were not seen by both clients")
    cleanup(work, args.keep)
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=200, help="status changes measured")
    parser.add_argument(
        "--gap", type=float, default=1.0, help="mean seconds between changes (all extensions)"
    )
    parser.add_argument("--extensions", type=int, default=4)
    parser.add_argument("--lead", type=float, default=8.0, help="seconds before the first change")
    parser.add_argument("--debounce", type=float, default=1.0, help="faxd reconcile.debounce")
    parser.add_argument("--max-delay", type=float, default=5.0, help="faxd reconcile.max_delay")
    parser.add_argument(
        "--rtt", type=float, default=0.0, help="seconds every REST answer is held (both clients)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, store, log)")
    add_options(parser, "--changes 40")
    args = parser.parse_args()
    apply_quick(args, changes=40)
    report = Report.start("latency", parser, args, ignore=("keep",))
    with contextlib.suppress(KeyboardInterrupt):
        started = time.monotonic()
        code = asyncio.run(bench(args, report))
        print(f"\n(bench took {time.monotonic() - started:.0f} s)")
        return code
    return 130


if __name__ == "__main__":
    sys.exit(main())
