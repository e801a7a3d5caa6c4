"""Liveness on a realistic WAN path: no healthy connection cut, a dead one still replaced within 10 s.

    .venv/bin/python -u bench/liveness.py                  # 60 minutes on the path, then 3 black-holes
    .venv/bin/python -u bench/liveness.py --minutes 5      # a quick look

faxd runs as a real subprocess with its default `websocket` settings (or those given by `--ping-*`)
against the simulator (in this process), whose pongs come back like over a WAN path for the whole run
(`Simulator.wan_path`: mostly tens of milliseconds, one in twenty some hundreds, about 18 spikes of
1-3 s and 7 lost pongs an hour at faxd's ping a second; see faxd/sim/wsg.py). RingCentral's default
rate limits apply, so every reconnect spends a ws token from the Auth group as it would in production.

Phase 1 (`--minutes`): nothing else happens. Every connection faxd loses is a false disconnect: the
simulator never drops one in this phase. Phase 2: `--blackholes` times, the open connection goes
silent (no frames, no pongs, no close); the replacement time is from the fault to the simulator
accepting faxd's next WebSocket (faxd needs a new ws token and a TCP+TLS-less loopback connect, so on
a real path add a round trip or two).

Verdict: false disconnects == 0 and every black-hole replaced within `--replace-within` (10 s).
Exit 0 when both hold, 1 otherwise. Progress goes to stdout every `--report-every` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from common import Daemon, cleanup, metric_sum, print_machine, sim_config, workdir, write_config

from faxd.sim import RecordedRequest, Simulator

DISCONNECTS = "faxd_ws_disconnects_total"
QUOTE_BRACE = '"}'


def pongs_over(samples: dict[str, float], seconds: str) -> float:
    """Pongs that took longer than ``seconds`` (a bucket bound of faxd's RTT histogram)."""
    count = samples.get("faxd_ws_ping_rtt_seconds_count", 0.0)
    return count - samples.get(f'faxd_ws_ping_rtt_seconds_bucket{{le="{seconds}"}}', 0.0)


def accepted(sim: Simulator) -> list[RecordedRequest]:
    """The WebSocket connections the simulator accepted, oldest first."""
    return [r for r in sim.requests if r.path == "/ws" and r.status == 101]


def reasons(samples: dict[str, float]) -> str:
    found = [
        f"{key.split('reason=', 1)[1].strip(QUOTE_BRACE)} {value:g}"
        for key, value in sorted(samples.items())
        if key.startswith(DISCONNECTS + "{") and value
    ]
    return ", ".join(found) or "none"


async def liveness(args: argparse.Namespace) -> int:
    print_machine()
    work = workdir("liveness")
    config = sim_config(seed=args.seed, limits=True)  # RingCentral's default limits: Auth 5 a minute
    async with Simulator(config) as sim:
        sim.wan_path()
        ext = config.extensions[0]
        pings = {
            "ping_interval": args.ping_interval,
            "ping_timeout_min": args.ping_timeout_min,
            "ping_timeout": args.ping_timeout,
        }
        websocket = {k: v for k, v in pings.items() if v is not None}
        daemon = Daemon(write_config(work, sim, [ext], logging={"level": "warning"}, websocket=websocket))
        await daemon.start()
        code = -1
        try:
            await daemon.wait_ws_up()
            loop = asyncio.get_running_loop()
            started = loop.time()
            end = started + args.minutes * 60
            next_report = started + args.report_every
            samples: dict[str, float] = {}
            while loop.time() < end:
                await asyncio.sleep(min(5.0, max(0.0, end - loop.time())))
                samples = await daemon.metrics() or samples
                if loop.time() >= next_report:
                    next_report += args.report_every
                    pings = samples.get("faxd_ws_ping_rtt_seconds_count", 0)
                    print(
                        f"{(loop.time() - started) / 60:5.1f} min: pings {pings:.0f},"
                        f" pongs > 1 s {pongs_over(samples, '1.0'):.0f}, lost {sim.gateway.pongs_lost},"
                        f" pong timeout now {samples.get('faxd_ws_ping_timeout_seconds', 0):.2f} s,"
                        f" disconnects: {reasons(samples)}",
                        flush=True,
                    )
            samples = await daemon.metrics() or samples
            false_disconnects = metric_sum(samples, DISCONNECTS)
            phase1 = dict(samples)

            replaced: list[float] = []
            for n in range(args.blackholes):
                await daemon.wait_ws_up()
                await asyncio.sleep(args.blackhole_gap)  # a few pongs: the estimate is the path's again
                opened = len(accepted(sim))
                at = loop.time()
                sim.blackhole_ws()
                async with asyncio.timeout(120):
                    await sim.wait_for(lambda before=opened: len(accepted(sim)) > before)
                new = accepted(sim)[opened]
                replaced.append(new.time - at)
                print(f"black-hole {n + 1}: replaced after {replaced[-1]:.2f} s", flush=True)
            samples = await daemon.metrics() or samples
        finally:
            code = await daemon.stop()

    print()
    given = ", ".join(f"{k} {v:g} s" for k, v in websocket.items())
    print(f"path                 simulator wan_path, {args.minutes:g} min, seed {args.seed}")
    print(f"websocket pings      {given or 'faxd defaults'}")
    print(
        f"pings                {phase1.get('faxd_ws_ping_rtt_seconds_count', 0):.0f}"
        f" (pongs > 0.5 s: {pongs_over(phase1, '0.5'):.0f}, > 1 s: {pongs_over(phase1, '1.0'):.0f},"
        f" > 2.5 s: {pongs_over(phase1, '2.5'):.0f}; lost: {sim.gateway.pongs_lost})"
    )
    print(f"false disconnects    {false_disconnects:g} ({reasons(phase1)})")
    if replaced:
        median = statistics.median(replaced)
        print(
            f"black-holes          {len(replaced)}, replaced after median {median:.2f} s,"
            f" max {max(replaced):.2f} s (target <= {args.replace_within:g} s)"
        )
    print(f"faxd exit on SIGTERM {code}")
    ok = false_disconnects == 0 and len(replaced) == args.blackholes
    ok = ok and all(r <= args.replace_within for r in replaced) and code == 0
    print("\nRESULT", "PASS" if ok else "FAIL", flush=True)
    cleanup(work, keep=args.keep or not ok)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes", type=float, default=60, help="minutes on the WAN path before the black-holes"
    )
    parser.add_argument("--blackholes", type=int, default=3)
    parser.add_argument("--blackhole-gap", type=float, default=20.0, help="seconds up before each black-hole")
    parser.add_argument("--replace-within", type=float, default=10.0)
    parser.add_argument("--report-every", type=float, default=300.0, help="seconds between progress lines")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ping-interval", type=float, help="websocket.ping_interval (default: faxd's)")
    parser.add_argument("--ping-timeout-min", type=float, help="websocket.ping_timeout_min (default: faxd's)")
    parser.add_argument("--ping-timeout", type=float, help="websocket.ping_timeout (default: faxd's)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    started = time.monotonic()
    try:
        return asyncio.run(liveness(parser.parse_args()))
    finally:
        print(f"took {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
