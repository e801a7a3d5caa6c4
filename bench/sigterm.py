"""Stop (issue 12, benchmark 5): SIGTERM at the worst moment, then a restart that loses nothing.

    .venv/bin/python bench/sigterm.py                  # budget, backoff, in-flight; baseline beside it
    .venv/bin/python bench/sigterm.py --quick          # fewer faxes, shorter bounds

Three cases, each on its own simulator (default rate limits) and faxd (defaults), all at the same time,
the baseline build's too (``--baseline``). Per case a first fax is reported (faxd is up), then a fault
is set and FAXES faxes are created (1-2 recipients, outcomes 0.5-OUTCOMES s later) whose hints run into it:

* ``budget``: the simulator answers every Light request 429 (``rate-limit-storm``, Retry-After up to
  120 s): faxd has no budget and waits for the penalty to end; SIGTERM after the first 429;
* ``backoff``: every message-store and message-sync request gets 503 (``fail-requests``): faxd backs
  off between retries; SIGTERM after the second 503;
* ``in-flight``: the next REST request is held 60 s (``delay-requests``); SIGTERM while it is held.

Measured: SIGTERM -> process exit (killed after 30 s) and the exit code. Then the fault is cleared,
faxd is started again on the same store, and a socket client subscribed from seq 0 waits (up to WITHIN
seconds) for every outcome of those faxes; every event key must come exactly once (the journal of
both runs, replayed).

Targets (issue 12): exit 0 within 5 s in every case; after the restart every outcome reported, none
twice. Exit 0 when both hold, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass

from budget import Build, add_common_options, builds, recording, run_bench, side, sim_config
from common import print_machine, table
from report import Report, apply_quick

from faxd.sim import RecipientScript, Simulator

CASES = ("budget", "backoff", "in-flight")
STOP_WITHIN = 5.0


@dataclass
class Case:
    build: str
    rev: str
    case: str
    exit_code: int | None  # None: it had to be killed
    stop_s: float  # SIGTERM -> exit
    outcomes: int
    missing: int
    duplicates: int


def arm(sim: Simulator, case: str) -> None:
    if case == "budget":
        sim.rate_limit_storm("Light", 120)
    elif case == "backoff":
        sim.fail_next_requests(10**6, status=503, match="/message-")
    else:
        sim.delay_next_requests(1, 60)


def disarm(sim: Simulator, case: str) -> None:
    if case == "budget":
        sim.rate_limit_storm("Light", 0)
    elif case == "backoff":
        sim.fail_next_requests(0)
    # in-flight: the held request was the only one delayed


async def worst_moment(sim: Simulator, case: str, mark: int) -> None:
    """Until faxd is where the case wants it: refused for budget, in backoff, or with a request held."""
    if case == "budget":
        await sim.wait_for(lambda: any(r.status == 429 for r in sim.requests[mark:]))
    elif case == "backoff":
        await sim.wait_for(lambda: sum(1 for r in sim.requests[mark:] if r.status >= 500) >= 2)
    else:
        # The held request is not recorded until it is answered: the fault's counter says it arrived.
        # Nothing to await for that, so look every 20 ms.
        while sim.rest.faults.delay_next > 0:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.02)


async def stop(proc: asyncio.subprocess.Process) -> tuple[int | None, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            code: int | None = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        code = None
    return code, time.monotonic() - started


async def case(build: Build, kind: str, args: argparse.Namespace) -> Case:
    cfg = sim_config(seed=args.seed)
    ext = cfg.extensions[0]
    rng = random.Random(args.seed)
    async with side(build, cfg, None, args.keep) as s:
        sim = s.sim
        warm = sim.create_outbound_fax(ext, [RecipientScript("+16505550100", "Sent", after=0.5)])
        if not await s.wait_reported([warm], within=60.0):
            raise RuntimeError(f"{build.name}/{kind}: the warm-up fax was not reported within 60 s")
        mark = len(sim.requests)
        arm(sim, kind)
        ids = [warm]
        for n in range(args.faxes):
            scripts = [
                RecipientScript(
                    f"+1650556{n:02d}{i:02d}",
                    rng.choice(["Sent", "SendingFailed"]),
                    after=rng.uniform(0.5, args.outcomes),
                )
                for i in range(rng.randint(1, 2))
            ]
            ids.append(sim.create_outbound_fax(ext, scripts))
        async with asyncio.timeout(60):
            await worst_moment(sim, kind, mark)
        assert s.daemon.proc is not None
        code, took = await stop(s.daemon.proc)
        disarm(sim, kind)
        await s.restart()
        async with recording(s):
            await s.wait_reported(ids, within=args.within)
            outcomes = s.changes.outcomes(ids)
            missing = len([k for k in outcomes if k not in s.recorder.arrived])
            dups = sum(n - 1 for n in s.recorder.counts.values() if n > 1)
    return Case(build.name, build.rev, kind, code, took, len(outcomes), missing, dups)


async def bench(args: argparse.Namespace, report: Report) -> int:
    sides = builds(args)
    print(
        f"cases {', '.join(args.cases)} on builds {', '.join(f'{b.name} {b.rev}' for b in sides)} ...",
        flush=True,
    )
    cases = await asyncio.gather(*(case(b, k, args) for b in sides for k in args.cases))
    print_machine()
    print(f"faxd defaults; {args.faxes} faxes per case, outcomes 0.5-{args.outcomes:g} s after creation")
    rows = [
        (
            f"{c.build} {c.rev}",
            c.case,
            "killed" if c.exit_code is None else c.exit_code,
            c.stop_s,
            f"{c.outcomes - c.missing}/{c.outcomes}",
            c.duplicates,
        )
        for c in cases
    ]
    print()
    print(
        table(
            ["build", "case", "exit code", "SIGTERM -> exit s", "outcomes after restart", "duplicates"], rows
        )
    )
    mine = [c for c in cases if c.build == "faxd"]
    base = [c for c in cases if c.build != "faxd"]

    def exits(group: list[Case]) -> str:
        return ", ".join(
            f"{c.case}: {'killed' if c.exit_code is None else f'exit {c.exit_code}'} in {c.stop_s:.2f} s"
            for c in group
        )

    def losses(group: list[Case]) -> str:
        return ", ".join(
            f"{c.case}: {c.outcomes - c.missing}/{c.outcomes}, {c.duplicates} twice" for c in group
        )

    clean = all(c.exit_code == 0 for c in mine)
    slowest = max((c.stop_s for c in mine), default=float("nan"))
    shown = exits(mine) + (f" (baseline {base[0].rev}: {exits(base)})" if base else "")
    report.target(
        "exit",
        12,
        "stop: SIGTERM at the worst moment (budget, backoff, in flight) exits 0 within 5 s",
        slowest if clean else None,
        "<=",
        STOP_WITHIN,
        shown,
    )
    lost = sum(c.missing + c.duplicates for c in mine)
    shown = losses(mine) + (f" (baseline {base[0].rev}: {losses(base)})" if base else "")
    report.target(
        "nothing_lost", 12, "stop: after restart every outcome reported exactly once", lost, "==", 0, shown
    )
    report.figure("cases", [asdict(c) for c in cases])
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--faxes", type=int, default=8, help="faxes created into the fault, per case")
    parser.add_argument("--outcomes", type=float, default=15.0, help="latest outcome, seconds after creation")
    parser.add_argument(
        "--within", type=float, default=150.0, help="seconds after the restart to wait for every outcome"
    )
    add_common_options(parser, "--faxes 4 --outcomes 6 --within 45")
    args = parser.parse_args()
    apply_quick(args, faxes=4, outcomes=6.0, within=45.0)
    return run_bench("sigterm", parser, args, bench)


if __name__ == "__main__":
    sys.exit(main())
