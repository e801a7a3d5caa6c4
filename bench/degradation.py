"""Degradation curve (issue 12, benchmark 2): latency and blind periods as demand passes the Light budget.

    .venv/bin/python bench/degradation.py            # 0.5x to 3x; writes docs/bench-degradation.png
    .venv/bin/python bench/degradation.py --demand 1 3 --plot /tmp/d.png
    .venv/bin/python bench/degradation.py --quick             # 1x and 3x, 12 s of load each

Demand is counted in faxes a minute against faxd's Light share (RingCentral's 50 a minute x rate_share
0.8 = 40): demand 1x is 40 faxes a minute, as many as faxd could spend one Light request on each.
Per point, a fresh simulator (default rate limits) and faxd with issue 12's fast settings
(``debounce: 0.2``, ``max_delay: 1``, ``poll_interval: 5``, ``active_poll_interval: 2``, one
extension); for DURATION seconds faxes arrive at random at that rate (1-2 recipients, outcomes 2-8 s
after creation), then up to TAIL seconds for the rest to be reported. The baseline build
(``--baseline``) runs each point at the same time on its own simulator.

Per point: p50 and p99 of change -> event (an outcome never reported counts as waiting until the end),
and the longest blind period: the longest time during which some outcome had happened and was not yet
reported while no event at all reached the socket.

Targets (issue 12): no blind period over 10 s at any demand; p99 grows at most linearly with
demand/budget, i.e. p99(x) <= p99(x0) * x / x0 at every point x, where x0 is the lowest demand and
p99(x0) is taken as at least max_delay (1 s: below that the ratio is noise) and at most 10 s (a p99 that
is already a blind period at the lowest demand is no base to grow from: without that cap a faxd that is
deaf at every demand would pass). Exit 0 when both hold.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from budget import (
    FAST,
    LIGHT_LIMIT,
    RATE_SHARE,
    REPO,
    Build,
    Tally,
    add_common_options,
    builds,
    drive,
    plan_faxes,
    run_bench,
    side,
    sim_config,
    tally,
)
from common import print_machine, table
from report import Report, apply_quick

DEFAULT_PLOT = REPO / "docs" / "bench-degradation.png"
BLIND_TARGET = 10.0


async def point(build: Build, demand: float, args: argparse.Namespace) -> Tally:
    cfg = sim_config(seed=args.seed)
    per_minute = demand * LIGHT_LIMIT * RATE_SHARE
    count = max(1, round(per_minute * args.duration / 60.0))
    plan = plan_faxes(count, args.duration, cfg.extensions, args.seed, (2.0, 8.0))
    async with side(build, cfg, FAST, args.keep) as s:
        since = time.monotonic()
        ids = await drive(s.sim, plan)
        await s.wait_reported(ids, within=8.0 + args.tail)
        return tally(s, since, time.monotonic(), ids)


def plot(path: Path, demands: list[float], series: dict[str, list[Tally]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for n, (name, points) in enumerate(series.items()):
        style = "-" if n == 0 else "--"
        # One colour per measure, one line style per build.
        ax.plot(demands, [p.p50 for p in points], "o" + style, color="C0", label=f"{name}: p50")
        ax.plot(demands, [p.p99 for p in points], "s" + style, color="C1", label=f"{name}: p99")
        ax.plot(
            demands, [p.blind for p in points], "^" + style, color="C3", label=f"{name}: longest blind period"
        )
    ax.axhline(BLIND_TARGET, color="grey", linewidth=0.8, linestyle=":", label="blind period target (10 s)")
    ax.set_xlabel(f"demand (x faxd's Light share: 1x = {LIGHT_LIMIT * RATE_SHARE:g} faxes a minute)")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("faxd under demand past the Light budget (bench/degradation.py)")
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


async def bench(args: argparse.Namespace, report: Report) -> int:
    sides = builds(args)
    demands = sorted(args.demand)
    series: dict[str, list[Tally]] = {f"{b.name} {b.rev}": [] for b in sides}
    for x in demands:
        print(f"demand {x:g}x ({x * LIGHT_LIMIT * RATE_SHARE:g} faxes a minute) ...", flush=True)
        for b, t in zip(sides, await asyncio.gather(*(point(b, x, args) for b in sides)), strict=True):
            series[f"{b.name} {b.rev}"].append(t)
    print_machine()
    print(f"faxd reconcile settings {FAST}; {args.duration:g} s of load per point")
    rows = []
    for name, points in series.items():
        for x, t in zip(demands, points, strict=True):
            rows.append(
                (
                    name,
                    f"{x:g}x",
                    f"{t.reported}/{t.outcomes}",
                    t.p50,
                    t.p99,
                    t.max,
                    t.blind,
                    t.light_window_max,
                )
            )
    print()
    print(
        table(["build", "demand", "reported", "p50 s", "p99 s", "max s", "blind s", "Light max/60 s"], rows)
    )
    plot_path = Path(args.plot) if args.plot else (DEFAULT_PLOT if report.profile == "default" else None)
    if plot_path is not None:
        plot(plot_path, demands, series)
    mine = series[next(iter(series))]
    base = series[list(series)[1]] if len(series) > 1 else None
    rev = sides[1].rev if len(sides) > 1 else ""

    def worst_blind(points: list[Tally]) -> tuple[float, float]:
        i = max(range(len(points)), key=lambda j: points[j].blind)
        return points[i].blind, demands[i]

    def growth(points: list[Tally]) -> tuple[float, float]:
        """The largest p99(x) / (p99(x0) x / x0), and at which demand."""
        anchor = min(max(points[0].p99, FAST["max_delay"]), BLIND_TARGET)
        ratios = [p.p99 / (anchor * x / demands[0]) for x, p in zip(demands, points, strict=True)]
        i = max(range(len(ratios)), key=lambda j: ratios[j])
        return ratios[i], demands[i]

    blind, at = worst_blind(mine)
    shown = f"longest {blind:.1f} s (at {at:g}x)"
    if base:
        b_blind, b_at = worst_blind(base)
        shown += f" (baseline {rev}: {b_blind:.1f} s at {b_at:g}x)"
    report.target(
        "blind", 12, "degradation: no blind period over 10 s at any demand", blind, "<=", 10.0, shown
    )
    ratio, at = growth(mine)
    p99s = ", ".join(f"{p.p99:.1f}" for p in mine)
    shown = f"{ratio:.2f} x linear (at {at:g}x; p99 {p99s} s at {', '.join(f'{x:g}x' for x in demands)})"
    if base:
        b_ratio, b_at = growth(base)
        shown += f" (baseline {rev}: {b_ratio:.2f} x at {b_at:g}x)"
    report.target(
        "p99_linear",
        12,
        "degradation: p99 grows at most linearly with demand/budget"
        " (p99(x) <= p99(x0) x/x0, p99(x0) taken in [1, 10] s)",
        ratio if len(demands) > 1 else None,
        "<=",
        1.0,
        shown,
    )
    for name, points in series.items():
        report.figure(name, [{"demand": x, **t.brief()} for x, t in zip(demands, points, strict=True)])
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--demand",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 1.5, 2.0, 3.0],
        help="multiples of the Light share",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per point")
    parser.add_argument(
        "--tail", type=float, default=60.0, help="seconds to wait for stragglers after the last outcome"
    )
    parser.add_argument(
        "--plot", help=f"write the PNG here (default profile: {DEFAULT_PLOT.relative_to(REPO)})"
    )
    add_common_options(parser, "--demand 1 3 --duration 12 --tail 20")
    args = parser.parse_args()
    apply_quick(args, demand=[1.0, 3.0], duration=12.0, tail=20.0)
    return run_bench("degradation", parser, args, bench, ignore=("keep", "plot"))


if __name__ == "__main__":
    sys.exit(main())
