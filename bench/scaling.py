"""Scaling: how faxd's figures grow with faxes in flight (100 -> 10,000) and with extensions (1 -> 100).

    .venv/bin/python bench/scaling.py                          # both sweeps, ~4 minutes
    .venv/bin/python bench/scaling.py --in-flight 100 1000 --extensions 1 10 --plot docs/bench-scaling.png
    .venv/bin/python bench/scaling.py --quick                  # 100 and 1,000 in flight, 1 and 10 extensions

Each point is a fresh simulator (in this process, rate limits set high) and a fresh faxd subprocess with
an empty store, defaults except ``poll_interval``/``active_poll_interval`` (one hour: no timed poll lands
inside a measurement).

* in-flight sweep (one extension): faxd starts, then N outbound faxes that stay Queued are created in
  batches of 500 (each batch is one hint; faxd picks them up by ISync) until faxd reports N in flight.
* extension sweep (1,000 faxes in flight spread over E extensions): the faxes exist before faxd starts;
  "start-up sync" is READY=1 -> every extension reconciled and all 1,000 tracked.

Then, per point: RSS; PROBES probe faxes change status 2 s apart (each one a leading-edge push reconcile):
hint -> event latency at the socket client (p50 and max), REST requests per push reconcile and the mean
reconcile duration (faxd's own histogram); finally a ``sync`` request on the socket (what a safety poll
does: every extension, ISync plus a bulk GET of every fax in flight): its REST requests and wall time,
and how many minutes of RingCentral's default Light budget (50/min, of which faxd spends 80 %) it costs.
The first row of each sweep is the baseline the others are divided by.

Targets, from what docs/bench-perf.md claims holds at every size: a push reconcile costs one REST request
(<= 1.1 on average over the probes); every probe's change reaches the socket client, the slowest within
debounce + max_delay (6 s, the latency target); a safety poll costs no more than one ISync per extension
plus one bulk GET per 50 faxes in flight. Exit 0 when all hold at every point, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass

from common import (
    Daemon,
    Tap,
    Truth,
    cleanup,
    metric_sum,
    ms,
    print_machine,
    quantile,
    request,
    sim_config,
    table,
    workdir,
    write_config,
)
from report import Report, add_options, apply_quick

from faxd.sim import RecipientScript, Simulator

LIGHT_PER_MINUTE = 50 * 0.8  # RingCentral's default Light limit times faxd's default rate_share
BULK_IDS = 50  # ids per bulk GET (faxd/adapters/reconcile.py)
LATENCY_BOUND = 1.0 + 5.0  # faxd's default debounce + max_delay


@dataclass
class Point:
    label: str
    value: int
    rss: float = 0.0
    startup: float = float("nan")
    push_requests: float = 0.0
    reconcile_ms: float = 0.0
    p50_ms: float = 0.0
    max_ms: float = 0.0
    poll_requests: int = 0
    poll_s: float = 0.0
    poll_bound: int = 0  # one ISync per extension + one bulk GET per BULK_IDS faxes in flight on it
    probes_seen: int = 0

    @property
    def budget_minutes(self) -> float:
        return self.poll_requests / LIGHT_PER_MINUTE


async def measure(
    label: str, value: int, extensions: int, faxes: int, before_start: bool, probes: int, seed: int
) -> Point:
    rng = random.Random(seed)
    point = Point(label, value)
    cfg = sim_config(extensions=extensions, seed=seed)
    exts = list(cfg.extensions)
    work = workdir("scaling")
    async with Simulator(cfg) as sim:

        def create(count: int, start: int) -> None:
            for n in range(start, start + count):
                script = RecipientScript(f"+1650{n:07d}", "Sent", after=3600)
                sim.create_outbound_fax(exts[n % len(exts)], [script])

        if before_start:
            create(faxes, 0)
        reconcile = {"poll_interval": 3600, "active_poll_interval": 3600}
        daemon = Daemon(write_config(work, sim, exts, reconcile=reconcile))
        await daemon.start()
        ready_at = time.monotonic()
        tap = Tap(daemon.socket_path)
        truth = Truth(sim)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(tap.run()), tg.create_task(truth.run())]
            await daemon.wait_ws_up()
            if before_start:
                name = 'faxd_reconciles_total{result="ok",trigger="startup"}'
                await daemon.wait_metric(name, lambda v: v >= len(exts))
                await daemon.wait_metric("faxd_faxes_in_flight", lambda v: v >= faxes)
                point.startup = time.monotonic() - ready_at
            else:
                for start in range(0, faxes, 500):
                    create(min(500, faxes - start), start)
                    await asyncio.sleep(0.3)
                await daemon.wait_metric("faxd_faxes_in_flight", lambda v: v >= faxes)
            await asyncio.sleep(1.0)
            point.rss = daemon.rss_mb()[0]

            # Probes: leading-edge push reconciles, 2 s apart.
            plan = []
            for i in range(probes):
                ext = rng.choice(exts)
                fax_id = sim.create_outbound_fax(
                    ext, [RecipientScript(f"+1415{i:07d}", "Sent", after=3 + 2 * i)]
                )
                truth.watch(fax_id, ext)
                plan.append(fax_id)
            await tap.wait_for([(f, -1, "status", "Queued") for f in plan], within=30)
            await asyncio.sleep(1.5)  # the creation reconcile is done
            before, mark = await daemon.metrics(), len(sim.requests)
            await tap.wait_for([(f, -1, "status", "Sent") for f in plan], within=3 + 2 * probes + 60)
            after = await daemon.metrics()
            http = sum(1 for r in sim.requests[mark:] if r.transport == "http")
            reconciles = metric_sum(after, "faxd_reconciles_total") - metric_sum(
                before, "faxd_reconciles_total"
            )
            took = metric_sum(after, "faxd_reconcile_duration_seconds_sum") - metric_sum(
                before, "faxd_reconcile_duration_seconds_sum"
            )
            point.push_requests = http / max(1.0, reconciles)
            point.reconcile_ms = ms(took / max(1.0, reconciles))
            lat = [
                tap.arrived[(f, -1, "status", "Sent")] - truth.seen[(f, -1, "status", "Sent")]
                for f in plan
                if (f, -1, "status", "Sent") in tap.arrived
            ]
            point.probes_seen = len(lat)
            point.p50_ms, point.max_ms = ms(quantile(lat, 0.5)), ms(quantile(lat, 1.0))

            # A safety poll, asked for on the socket.
            per_ext = [sum(1 for n in range(faxes) if n % len(exts) == i) for i in range(len(exts))]
            point.poll_bound = sum(1 + -(-n // BULK_IDS) for n in per_ext)
            mark = len(sim.requests)
            started = time.monotonic()
            reply = await request(daemon.socket_path, {"type": "sync"})
            point.poll_s = time.monotonic() - started
            point.poll_requests = sum(1 for r in sim.requests[mark:] if r.transport == "http")
            if reply.get("type") != "ok":
                print(f"  sync answered {reply}")
            for task in tasks:
                task.cancel()
        await daemon.stop()
    cleanup(work, keep=False)
    return point


def render(title: str, points: list[Point], startup: bool) -> str:
    base = points[0]
    headers = [title, "RSS MiB", "x"]
    if startup:
        headers += ["start-up sync s"]
    headers += ["push: req/reconcile", "push: reconcile ms", "hint->event p50 ms", "x", "max ms"]
    headers += ["poll: requests", "poll: s", "poll: Light budget min"]
    rows = []
    for p in points:
        row: list[object] = [p.value, p.rss, p.rss / base.rss]
        if startup:
            row.append(p.startup)
        row += [p.push_requests, p.reconcile_ms, p.p50_ms, p.p50_ms / base.p50_ms, p.max_ms]
        row += [p.poll_requests, p.poll_s, p.budget_minutes]
        rows.append(row)
    return table(headers, rows)


def plot(path: str, in_flight: list[Point], extensions: list[Point]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, points, xlabel in ((axes[0], in_flight, "faxes in flight"), (axes[1], extensions, "extensions")):
        if not points:
            continue
        xs = [p.value for p in points]
        ax.plot(xs, [p.rss for p in points], "o-", label="RSS (MiB)")
        ax.plot(xs, [p.p50_ms for p in points], "s-", label="hint->event p50 (ms)")
        ax.plot(xs, [p.reconcile_ms for p in points], "^-", label="push reconcile (ms)")
        ax.plot(xs, [p.poll_requests for p in points], "d-", label="requests per safety poll")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("faxd scaling (bench/scaling.py)")
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


async def bench(args: argparse.Namespace, report: Report) -> int:
    in_flight: list[Point] = []
    for n in args.in_flight:
        print(f"in flight {n} ...", flush=True)
        in_flight.append(await measure("in flight", n, 1, n, False, args.probes, args.seed))
    ext_points: list[Point] = []
    for e in args.extensions:
        print(f"extensions {e} ...", flush=True)
        ext_points.append(await measure("extensions", e, e, args.ext_faxes, True, args.probes, args.seed))
    print_machine()
    print(
        f"faxd defaults (debounce 1 s, max_delay 5 s) except poll intervals 1 h; rate limits off;"
        f" {args.probes} probes per point; x = ratio to the first row"
    )
    if in_flight:
        print()
        print(render("faxes in flight (1 extension)", in_flight, False))
    if ext_points:
        print()
        print(render(f"extensions ({args.ext_faxes} faxes in flight)", ext_points, True))
    if args.plot:
        plot(args.plot, in_flight, ext_points)
    points = in_flight + ext_points
    if not points:
        return report.finish(args.results)  # nothing measured: a miss
    where = {id(p): f"{p.value} {'in flight' if p.label == 'in flight' else 'extensions'}" for p in points}
    worst = max(points, key=lambda p: p.push_requests)
    report.target(
        "push_requests",
        8,
        "scaling: one REST request per push reconcile at every size (<= 1.1 on average)",
        worst.push_requests,
        "<=",
        1.1,
        f"at most {worst.push_requests:.2f} ({where[id(worst)]})",
    )
    slowest = max(points, key=lambda p: p.max_ms)
    report.target(
        "latency",
        8,
        f"scaling: every probe's change reaches the client within {LATENCY_BOUND:g} s at every size",
        max(p.max_ms for p in points) / 1000 if all(p.probes_seen == args.probes for p in points) else None,
        "<=",
        LATENCY_BOUND,
        f"slowest {slowest.max_ms / 1000:.2f} s ({where[id(slowest)]});"
        f" {sum(p.probes_seen for p in points)}/{args.probes * len(points)} probes seen",
    )
    dearest = max(points, key=lambda p: p.poll_requests / max(1, p.poll_bound))
    report.target(
        "poll_requests",
        8,
        f"scaling: a safety poll <= one ISync per extension + one bulk GET per {BULK_IDS} faxes in flight",
        dearest.poll_requests / max(1, dearest.poll_bound),
        "<=",
        1.0,
        f"at most {dearest.poll_requests} of {dearest.poll_bound} requests ({where[id(dearest)]})",
    )
    report.figure("points", [vars(p) | {"budget_minutes": p.budget_minutes} for p in points])
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in-flight", type=int, nargs="*", default=[100, 1000, 10_000])
    parser.add_argument("--extensions", type=int, nargs="*", default=[1, 10, 100])
    parser.add_argument("--ext-faxes", type=int, default=1000, help="faxes in flight in the extension sweep")
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib: pip install -e '.[bench]')")
    parser.add_argument("--seed", type=int, default=1)
    add_options(parser, "--in-flight 100 1000 --extensions 1 10 --probes 4")
    args = parser.parse_args()
    apply_quick(args, in_flight=[100, 1000], extensions=[1, 10], probes=4)
    report = Report.start("scaling", parser, args, ignore=("plot",))
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(bench(args, report))
        print(f"\n(bench took {time.monotonic() - started:.0f} s)")
        return code
    return 130


if __name__ == "__main__":
    sys.exit(main())
