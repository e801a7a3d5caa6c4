"""100 extensions under one JWT (issue 12, benchmark 3): default settings, 1,000 faxes an hour.

    .venv/bin/python bench/many_extensions.py              # 10 minutes of real time, baseline beside it
    .venv/bin/python bench/many_extensions.py --minutes 30
    .venv/bin/python bench/many_extensions.py --quick      # 1 minute, 25 s of tail

The simulator has EXTENSIONS (100) extensions on one account, RingCentral's default rate limits (Light
50 a minute); faxd (a subprocess) lists them all in ``ringcentral.extensions`` and otherwise runs its
defaults (``debounce`` 1 s, ``max_delay`` 5 s, polls every 300 s / 60 s with faxes in flight). From the
moment faxd is ready (its start-up syncs still going, as after any restart) faxes arrive at random at
RATE an hour on random extensions for MINUTES minutes, 1-2 recipients each, outcomes 2-8 s after
creation; then up to TAIL seconds for the rest to be reported. The baseline build (``--baseline``) runs
the same workload at the same time on its own simulator.

Targets (issue 12): every outcome on the socket; change -> event p99 <= 10 s; at most 50 Light
requests (RingCentral's limit) in every 60 s window of the run, start-up included; zero 429. Exit 0
when all hold, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from budget import (
    LIGHT_LIMIT,
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


async def one(build: Build, args: argparse.Namespace) -> tuple[Tally, int]:
    cfg = sim_config(extensions=args.extensions, seed=args.seed)
    duration = args.minutes * 60.0
    plan = plan_faxes(round(args.rate * duration / 3600.0), duration, cfg.extensions, args.seed, (2.0, 8.0))
    async with side(build, cfg, None, args.keep) as s:
        since = time.monotonic()
        startup = len([r for r in s.sim.requests if r.group == "Light"])
        ids = await drive(s.sim, plan)
        await asyncio.sleep(max(0.0, since + duration - time.monotonic()))
        await s.wait_reported(ids, within=8.0 + args.tail)
        return tally(s, since, time.monotonic(), ids), startup


async def bench(args: argparse.Namespace, report: Report) -> int:
    sides = builds(args)
    print(
        f"{args.extensions} extensions, {args.rate:g} faxes an hour for {args.minutes:g} min;"
        f" builds: {', '.join(f'{b.name} {b.rev}' for b in sides)}",
        flush=True,
    )
    results = await asyncio.gather(*(one(b, args) for b in sides))
    (mine, _), base = results[0], (results[1][0] if len(results) > 1 else None)
    print_machine()
    print("faxd defaults (debounce 1 s, max_delay 5 s, poll_interval 300 s, active_poll_interval 60 s)")
    rows = [
        (
            f"{t.build} {t.rev}",
            f"{t.reported}/{t.outcomes}",
            t.p50,
            t.p99,
            t.max,
            startup,
            t.light,
            t.light_window_max,
            t.refused_429,
            t.blind,
        )
        for t, startup in results
    ]
    print()
    print(
        table(
            [
                "build",
                "outcomes reported",
                "p50 s",
                "p99 s",
                "max s",
                "Light before the load",
                "Light during it",
                "Light max/60 s",
                "429s",
                "blind s",
            ],
            rows,
        )
    )
    n = args.extensions
    report.target(
        "complete",
        12,
        f"{n} extensions: every outcome on the socket",
        mine.missing,
        "==",
        0,
        versus(f"{mine.reported}/{mine.outcomes}", base, f"{base.reported}/{base.outcomes}" if base else ""),
    )
    report.target(
        "p99",
        12,
        f"{n} extensions: change -> event p99 <= 10 s",
        mine.p99,
        "<=",
        10.0,
        versus(mine.secs(mine.p99), base, base.secs(base.p99) if base else ""),
    )
    report.target(
        "light",
        12,
        f"{n} extensions: <= {LIGHT_LIMIT} Light a minute in every 60 s window",
        mine.light_window_max,
        "<=",
        LIGHT_LIMIT,
        versus(f"at most {mine.light_window_max}", base, str(base.light_window_max) if base else ""),
    )
    report.target(
        "no_429",
        12,
        f"{n} extensions: zero 429",
        mine.refused_429,
        "==",
        0,
        versus(f"{mine.refused_429} 429s", base, str(base.refused_429) if base else ""),
    )
    for t, startup in results:
        report.figure(t.build, {**t.brief(), "light_before_load": startup})
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extensions", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="faxes an hour")
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of load (real time)")
    parser.add_argument(
        "--tail", type=float, default=120.0, help="seconds to wait for stragglers after the last outcome"
    )
    add_common_options(parser, "--minutes 1 --tail 25")
    args = parser.parse_args()
    apply_quick(args, minutes=1.0, tail=25.0)
    return run_bench("many_extensions", parser, args, bench)


if __name__ == "__main__":
    sys.exit(main())
