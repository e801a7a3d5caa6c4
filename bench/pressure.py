"""Pressure (issue 12, benchmark 1): a burst of faxes under fast settings, against the Light budget.

    .venv/bin/python bench/pressure.py                 # 200 faxes over 30 s, baseline 96bf534 beside it
    .venv/bin/python bench/pressure.py --baseline none # this checkout only
    .venv/bin/python bench/pressure.py --quick         # 80 faxes over 12 s, 30 s of tail

The workload a new user tries: faxd (a subprocess) with ``debounce: 0.2``, ``max_delay: 1``,
``poll_interval: 5``, ``active_poll_interval: 2``, one extension, RingCentral's default rate limits
(Light 50 a minute; faxd's share 40); FAXES outbound faxes created at random moments over DURATION
seconds in the simulator, 1-2 recipients each (70 % Sent, 30 % SendingFailed), each recipient's outcome
2-8 s after creation. The same workload runs at the same time against the baseline build on its own
simulator (``--baseline``). Latency: the simulator's change (its notification leaves then) -> the
event on a socket client. Light requests: the simulator's request log.

Targets (issue 12): every outcome reported; Light requests within faxd's share (40) in every 60 s
window; zero 429; latency max <= 5 s and p90 <= 1.5 s; Light requests per final transition <= 0.05.
It also says where faxd sits on the curve p90 ~ 0.9 T / N (N requests spread evenly over a busy period
of T seconds). Exit 0 when every target holds, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from budget import (
    FAST,
    LIGHT_LIMIT,
    RATE_SHARE,
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
    versus,
)
from common import print_machine, table
from report import Report, apply_quick


async def one(build: Build, args: argparse.Namespace) -> tuple[Tally, dict[str, float]]:
    cfg = sim_config(seed=args.seed)
    plan = plan_faxes(args.faxes, args.duration, cfg.extensions, args.seed, (2.0, 8.0))
    async with side(build, cfg, FAST, args.keep) as s:
        since = time.monotonic()
        ids = await drive(s.sim, plan)
        await s.wait_reported(ids, within=8.0 + args.tail)
        until = time.monotonic()
        t = tally(s, since, until, ids)
        changes = sorted(s.changes.outcomes(ids).values())
        busy = changes[-1] - changes[0] if changes else float("nan")
        light_busy = len(
            [r for r in s.sim.requests if r.group == "Light" and changes and changes[0] <= r.time <= until]
        )
    curve = 0.9 * busy / light_busy if light_busy else float("nan")
    return t, {"busy_s": busy, "light_in_busy": light_busy, "curve_p90_s": curve}


async def bench(args: argparse.Namespace, report: Report) -> int:
    sides = builds(args)
    print(
        f"{args.faxes} faxes over {args.duration:g} s;"
        f" builds: {', '.join(f'{b.name} {b.rev}' for b in sides)}"
    )
    results = await asyncio.gather(*(one(b, args) for b in sides))
    mine, curve = results[0]
    base = results[1][0] if len(results) > 1 else None
    print_machine()
    print(
        f"faxd reconcile settings {FAST}; Light limit {LIGHT_LIMIT}/60 s,"
        f" faxd's share {LIGHT_LIMIT * RATE_SHARE:g}"
    )
    rows = []
    for t, c in results:
        rows.append(
            (
                f"{t.build} {t.rev}",
                f"{t.reported}/{t.outcomes}",
                t.p50,
                t.p90,
                t.max,
                t.light,
                t.per_transition,
                t.light_window_max,
                t.refused_429,
                t.blind,
                c["curve_p90_s"],
            )
        )
    print()
    print(
        table(
            [
                "build",
                "outcomes reported",
                "p50 s",
                "p90 s",
                "max s",
                "Light",
                "Light/transition",
                "Light max/60 s",
                "429s",
                "blind s",
                "curve p90 0.9T/N s",
            ],
            rows,
        )
    )
    share = LIGHT_LIMIT * RATE_SHARE
    report.target(
        "complete",
        12,
        "pressure: every outcome reported on the socket",
        mine.missing,
        "==",
        0,
        versus(f"{mine.reported}/{mine.outcomes}", base, f"{base.reported}/{base.outcomes}" if base else ""),
    )
    report.target(
        "share",
        12,
        f"pressure: Light requests within faxd's share ({share:g}) in every 60 s window",
        mine.light_window_max,
        "<=",
        share,
        versus(f"at most {mine.light_window_max}", base, str(base.light_window_max) if base else ""),
    )
    report.target(
        "no_429",
        12,
        "pressure: zero 429",
        mine.refused_429,
        "==",
        0,
        versus(f"{mine.refused_429} 429s", base, str(base.refused_429) if base else ""),
    )
    report.target(
        "max",
        12,
        "pressure: change -> event max <= 5 s",
        mine.max,
        "<=",
        5.0,
        versus(mine.secs(mine.max), base, base.secs(base.max) if base else ""),
    )
    report.target(
        "p90",
        12,
        "pressure: change -> event p90 <= 1.5 s",
        mine.p90,
        "<=",
        1.5,
        versus(mine.secs(mine.p90), base, base.secs(base.p90) if base else ""),
    )
    report.target(
        "per_transition",
        12,
        "pressure: Light requests per final transition <= 0.05",
        mine.per_transition,
        "<=",
        0.05,
        versus(
            f"{mine.per_transition:.3f} ({mine.light} for {mine.reported})",
            base,
            f"{base.per_transition:.3f}" if base else "",
        ),
    )
    where = mine.p90 / curve["curve_p90_s"] if curve["curve_p90_s"] else float("nan")
    report.note(
        f"on the curve p90 ~ 0.9 T / N: busy period T {curve['busy_s']:.1f} s,"
        f" N {curve['light_in_busy']} Light requests in it, so evenly spaced reconciles would give"
        f" p90 {curve['curve_p90_s']:.2f} s; faxd's p90 {mine.p90:.2f} s is {where:.2f} x that"
    )
    for t, c in results:
        report.figure(t.build, {**t.brief(), **c})
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faxes", type=int, default=200)
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds over which the faxes are created"
    )
    parser.add_argument(
        "--tail", type=float, default=90.0, help="seconds to wait for stragglers after the last outcome"
    )
    add_common_options(parser, "--faxes 80 --duration 12 --tail 30")
    args = parser.parse_args()
    apply_quick(args, faxes=80, duration=12.0, tail=30.0)
    return run_bench("pressure", parser, args, bench)


if __name__ == "__main__":
    sys.exit(main())
