"""Soak: many faxes through the simulator while faults hit faxd on a schedule; then a tally against
the simulator's ground truth.

    .venv/bin/python bench/soak.py --minutes 10                    # the CI-sized profile
    .venv/bin/python bench/soak.py --minutes 30 --faults ws        # issue 4: a WS fault every 30 s
    .venv/bin/python bench/soak.py --minutes 60 --faxes 10000      # by hand
    .venv/bin/python bench/soak.py --quick                         # 1 minute, 100 faxes, a fault every 10 s

The simulator runs in this process; faxd runs as a real subprocess (`python -m faxd run`), so it can
be killed with SIGKILL and restarted. Three socket clients follow along and resume from their last
seq whenever they are cut off; one of them stalls for 15-30 s now and then. (At the soak's event
rates the kernel's socket buffers absorb such a stall, so the slow_consumer cut-off is proved by
tests/test_event_server.py and bench/fanout.py rather than here; the "slow cut" column counts it if it
happens.) At the end it checks, per client: every final status of every fax and recipient in the
simulator's ground truth was delivered; no (fax, recipient, kind, to_status) arrived with two
different seq; seq had no gaps apart from what the client's filter and resumes explain (none here:
clients are unfiltered). It also counts 429s outside the storms faxd was put through, and the share of
time the WebSocket was up (sampled from /metrics once a second; a black-holed connection counts as
down from the fault until faxd opens a new one, though faxd cannot know sooner).

Targets (issues 8 and 4): every final status reaches every client, no duplicate, no gap, no 429 outside
the storms, exit 0 on SIGTERM; with --faults ws also the WebSocket up >= 99 % of the time. Exit 0 when
everything holds, 1 otherwise. Results go to bench/results/soak[.PROFILE].json; give a by-hand profile
its own file with --results (e.g. bench/results/soak.ws30.json for the 30-minute WebSocket run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from report import Report, add_options, apply_quick

from faxd import testbed
from faxd.core.model import event_key
from faxd.sim import RecipientScript, SimConfig, Simulator

WS_FAULTS = ("drop", "drop_failed_recovery", "blackhole", "malformed", "expire_tokens")
ALL_FAULTS = (*WS_FAULTS, "http_5xx", "stale_sync", "storm", "sigkill")
ERROR_CODES = ("LineBusy", "NoAnswer", "InvalidNumber", "CallDeclined", "NoFaxMachine", "InternalError")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Client:
    """A socket client that resumes from its last seq whenever it is disconnected."""

    name: str
    socket_path: str
    slow: bool = False
    last_seq: int = 0
    epoch: str | None = None
    seen: dict[tuple[str, int, str, str], int] = field(default_factory=dict)  # dedup key -> seq
    duplicates: int = 0
    gaps: int = 0
    reconnects: int = 0
    slow_cutoffs: int = 0
    latest: dict[tuple[str, int], str] = field(default_factory=dict)  # (fax, recipient) -> to_status
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set on every event taken

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.name)
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=2**22)
            except OSError:
                await asyncio.sleep(0.5)  # the daemon is restarting
                continue
            try:
                hello = json.loads(await reader.readline())
                if self.epoch is not None and hello["epoch"] != self.epoch:
                    raise RuntimeError(f"{self.name}: the journal epoch changed")
                self.epoch = hello["epoch"]
                request = {"type": "subscribe", "after_seq": self.last_seq, "epoch": self.epoch}
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                pause_at = time.monotonic() + rng.uniform(15, 30)
                while not stop.is_set():
                    if self.slow and time.monotonic() > pause_at:
                        await asyncio.sleep(rng.uniform(15, 30))  # a consumer that stalls now and then
                        pause_at = time.monotonic() + rng.uniform(60, 120)
                    line = await reader.readline()
                    if not line:
                        break
                    message = json.loads(line)
                    if message["type"] == "error":
                        if message.get("code") == "slow_consumer":
                            self.slow_cutoffs += 1
                            assert message["resume_after_seq"] <= self.last_seq
                        break
                    if message["type"] == "event":
                        self._take(message)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self.reconnects += 1

    def _take(self, event: dict[str, Any]) -> None:
        seq = event["seq"]
        if seq <= self.last_seq:
            return  # at-least-once: a replayed event we already processed (idempotent on seq)
        if seq != self.last_seq + 1:
            self.gaps += 1
        self.last_seq = seq
        key = event_key(event)
        recipient = key[1]
        if key in self.seen and self.seen[key] != seq:
            self.duplicates += 1
        self.seen[key] = seq
        if event["kind"] in ("status", "recipient"):
            self.latest[(event["fax_id"], recipient)] = event["to_status"]
        self.progress.set()


def ground_truth(sim: Simulator) -> dict[tuple[str, int], str]:
    truth: dict[tuple[str, int], str] = {}
    for record in sim.messages():
        if record["type"] != "Fax":
            continue  # the foreign-notification fault creates SMS messages, which faxd rightly ignores
        fax_id = str(record["id"])
        truth[(fax_id, -1)] = record["messageStatus"]
        if record["direction"] == "Outbound":
            for i, to in enumerate(record.get("to", [])):
                truth[(fax_id, i)] = to["messageStatus"]
    return truth


def scripted_outcome(scripts: list[RecipientScript]) -> dict[int, str]:
    """What the simulator will end at for an outbound fax: -1 is the fax, 0.. the recipients."""
    final = {
        i: "Delivered" if s.outcome == "Sent" and s.delivered_after is not None else s.outcome
        for i, s in enumerate(scripts)
    }
    statuses = set(final.values())
    if "SendingFailed" in statuses:
        final[-1] = "SendingFailed"
    else:
        final[-1] = "Delivered" if statuses == {"Delivered"} else "Sent"
    return final


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "faxd", "run", "-c", str(self.config), stdout=out, stderr=out
            )
        self.starts += 1

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            return await self.proc.wait()


async def ws_up(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return False
    return 'faxd_ws_state{faxd_ws_state="up"} 1.0' in text


async def disconnects_by_reason(url: str) -> dict[str, float]:
    """faxd's own count of lost WebSocket connections (since its last start), by reason."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}  # only a report: faxd not answering shows as "none" here and as down samples above
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "faxd_ws_disconnects_total" and sample.value
    }


async def soak(args: argparse.Namespace, report: Report) -> int:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="faxd-soak-", dir="/tmp"))
    faults = WS_FAULTS if args.faults == "ws" else ALL_FAULTS
    duration = args.minutes * 60
    sim_config = SimConfig(seed=args.seed, default_delay=(2.0, 40.0), recovery_timeout=60)
    async with Simulator(sim_config) as sim:
        metrics_port = free_port()
        websocket = {
            key: value
            for key, value in (
                ("ping_interval", args.ping_interval),
                ("ping_timeout_min", args.ping_timeout_min),
                ("ping_timeout", args.ping_timeout),
            )
            if value is not None  # faxd's defaults unless the command line says otherwise
        }
        testbed.write_config(
            sim,
            workdir,
            websocket=websocket,
            reconcile={"active_poll_interval": 30, "poll_interval": 120},
            events={"client_queue": 100},
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
            logging={"level": "info", "format": "json"},
        )
        daemon = Daemon(workdir / "config.yaml", workdir / "faxd.log")
        await daemon.start()
        stop = asyncio.Event()
        progress = asyncio.Event()
        clients = [
            Client("steady", str(workdir / "events.sock"), progress=progress),
            Client("second", str(workdir / "events.sock"), progress=progress),
            Client("slow", str(workdir / "events.sock"), slow=True, progress=progress),
        ]
        loop = asyncio.get_running_loop()
        storms: list[tuple[float, float]] = []
        blackholes: list[float] = []  # loop times of the black-hole faults
        fault_log: list[str] = []
        samples: list[bool] = []
        metric_down = [0]  # samples where faxd itself reported the WebSocket down (or did not answer)
        # A black-holed connection still says "up" until pings notice; count it as down until the
        # daemon opens a new WebSocket.
        deaf_since: list[int] = []  # index into sim.requests when the last black-hole began

        def deaf() -> bool:
            if not deaf_since:
                return False
            if any(r.path == "/ws" for r in sim.requests[deaf_since[-1] :]):
                deaf_since.clear()  # reconnected: the black-hole is over
                return False
            return True

        created = 0
        # Where every fax and recipient will end, from the scripts: a Sent recipient may still become
        # Delivered well after it stopped being Queued, so "nothing Queued" is not "done".
        expected: dict[tuple[str, int], str] = {}
        started = time.monotonic()

        async def generate() -> None:
            nonlocal created
            per_second = args.faxes / duration
            while time.monotonic() - started < duration:
                await asyncio.sleep(rng.expovariate(per_second))
                created += 1
                if rng.random() < 0.2:
                    fax_id = sim.create_inbound_fax(
                        None, f"+1415555{rng.randrange(10000):04d}", pages=rng.randint(1, 9)
                    )
                    expected[(fax_id, -1)] = "Received"
                    continue
                scripts = []
                for _ in range(rng.choice((1, 1, 1, 2, 3))):
                    phone = f"+1650555{rng.randrange(10000):04d}"
                    if rng.random() < 0.3:
                        scripts.append(RecipientScript(phone, "SendingFailed", rng.choice(ERROR_CODES)))
                    else:
                        delivered = rng.uniform(1, 20) if rng.random() < 0.2 else None
                        scripts.append(RecipientScript(phone, "Sent", delivered_after=delivered))
                fax_id = sim.create_outbound_fax(None, scripts, pages=rng.randint(1, 12))
                for index, status in scripted_outcome(scripts).items():
                    expected[(fax_id, index)] = status

        async def inject() -> None:
            # Each fault lands at a random point of its second, so it keeps no fixed phase with
            # faxd's once-a-second pings (phase-locked, every black-hole would be found equally
            # fast or equally slow).
            phase = random.Random(args.seed + 1)
            n = 0
            while time.monotonic() - started < duration:
                due = started + (n + 1) * args.fault_every + phase.random()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                fault = faults[n % len(faults)]
                n += 1
                fault_log.append(fault)
                if fault == "drop":
                    sim.drop_ws()
                elif fault == "drop_failed_recovery":
                    sim.fail_next_recovery()
                    sim.drop_ws()
                elif fault == "blackhole":
                    sim.blackhole_ws()
                    deaf_since.append(len(sim.requests))
                    blackholes.append(loop.time())
                elif fault == "malformed":
                    sim.send_malformed_frame("malformed")
                    sim.send_malformed_frame("oversize")
                    sim.send_foreign_notification("SMS")
                elif fault == "expire_tokens":
                    sim.expire_access_tokens()
                elif fault == "http_5xx":
                    sim.fail_next_requests(5, html=rng.random() < 0.5)
                elif fault == "stale_sync":
                    sim.stale_sync_tokens()
                elif fault == "storm":
                    now = loop.time()
                    storms.append((now, now + 20 + 60))  # the storm plus a full penalty after it
                    sim.rate_limit_storm("Light", 20)
                elif fault == "sigkill":
                    await daemon.kill()
                    await daemon.start()

        async def sample() -> None:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            async with aiohttp.ClientSession() as session:
                await asyncio.sleep(5)  # start-up is not "down"
                while not stop.is_set():
                    metric_up = await ws_up(session, url)
                    samples.append(metric_up and not deaf())
                    if not metric_up:
                        metric_down[0] += 1
                    await asyncio.sleep(1)

        async with asyncio.TaskGroup() as tg:
            for client in clients:
                tg.create_task(client.run(stop))
            sampler = tg.create_task(sample())
            await asyncio.gather(generate(), inject())
            print(f"load done after {time.monotonic() - started:.0f} s; waiting for every fax to be final")
            try:
                async with asyncio.timeout(300):
                    await sim.wait_for(lambda: ground_truth(sim) == expected)
                print(f"every fax final after {time.monotonic() - started:.0f} s; waiting for the clients")
            except TimeoutError:
                print("the simulator did not reach the scripted outcomes within 300 s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(300):
                    while any(any(c.latest.get(k) != v for k, v in expected.items()) for c in clients):
                        progress.clear()
                        await progress.wait()
            print(f"clients done after {time.monotonic() - started:.0f} s")
            lost = await disconnects_by_reason(f"http://127.0.0.1:{metrics_port}/metrics")
            stop.set()
            sampler.cancel()
        code = await daemon.stop()

    truth = ground_truth(sim)
    requests_429 = [r for r in sim.requests if r.status == 429]
    outside = [r for r in requests_429 if not any(a <= r.time <= b for a, b in storms)]
    up = sum(samples) / len(samples) if samples else 0.0
    print()
    print(f"duration            {args.minutes} min, fault every {args.fault_every} s ({args.faults})")
    pings = {
        "ping_interval": args.ping_interval,
        "ping_timeout_min": args.ping_timeout_min,
        "ping_timeout": args.ping_timeout,
    }
    given = ", ".join(f"{k} {v:g} s" for k, v in pings.items() if v is not None)
    print(f"websocket pings     {given or 'faxd defaults'}")
    print(f"faxes created       {created}  (keys checked: {len(truth)})")
    print(f"faults injected     {len(fault_log)}: " + ", ".join(f"{f} x{fault_log.count(f)}" for f in faults))
    print(f"daemon starts       {daemon.starts}; exit on SIGTERM: {code}")
    print(f"WebSocket up        {up:.2%} of {len(samples)} samples ({metric_down[0]} reported down by faxd)")
    ws_opened = [r.time for r in sim.requests if r.path == "/ws"]
    noticed = sorted(min((t - at for t in ws_opened if t >= at), default=float("inf")) for at in blackholes)
    if noticed:
        print(
            f"black-holes         {len(noticed)}, replaced after median {statistics.median(noticed):.2f} s,"
            f" max {noticed[-1]:.2f} s"
        )
    reasons = ", ".join(f"{reason} {count:g}" for reason, count in sorted(lost.items()))
    print(f"ws disconnects      {reasons or 'none'} (faxd's count since its last start)")
    print(f"429s outside storms {len(outside)} (all 429s: {len(requests_429)})")
    print()
    print(f"{'client':8} {'events':>7} {'missing':>8} {'dups':>5} {'gaps':>5} {'resumes':>8} {'slow cut':>9}")
    missing_total = duplicates = gaps = 0
    for c in clients:
        wrong = [(k, v, c.latest.get(k)) for k, v in truth.items() if c.latest.get(k) != v]
        missing = len(wrong)
        for k, v, got in wrong[:5]:
            print(f"  {c.name}: fax {k[0]} recipient {k[1]}: truth {v}, client saw {got}")
        row = (c.name, c.last_seq, missing, c.duplicates, c.gaps, c.reconnects, c.slow_cutoffs)
        print("{:8} {:7} {:8} {:5} {:5} {:8} {:9}".format(*row))
        missing_total += missing
        duplicates += c.duplicates
        gaps += c.gaps
        columns = ("events", "missing", "dups", "gaps", "resumes")
        report.figure(f"client_{c.name}", dict(zip(columns, row[1:6], strict=True)))
    checked = f"{len(truth)} keys x {len(clients)} clients"
    goal = "soak: every final status reaches every client"
    report.target("missing", 8, goal, missing_total, "==", 0, f"{missing_total} missing ({checked})")
    report.target(
        "duplicates", 8, "soak: no transition delivered twice", duplicates, "==", 0, f"{duplicates}"
    )
    report.target("gaps", 8, "soak: no seq gap", gaps, "==", 0, f"{gaps}")
    report.target("no_429", 8, "soak: no 429 outside the storms", len(outside), "==", 0, f"{len(outside)}")
    report.target("clean_exit", 8, "soak: faxd exits 0 on SIGTERM", code, "==", 0, f"exit {code}")
    if args.faults == "ws":
        shown = f"{up:.2%} of {len(samples)} samples"
        report.target("ws_up", 4, "soak: WebSocket up >= 99 % of the time", up, ">=", 0.99, shown)
    else:
        report.figure("ws_up", up)
    report.figure("faxes", created)
    report.figure("faults", {f: fault_log.count(f) for f in faults})
    report.figure("daemon_starts", daemon.starts)
    report.figure("ws_disconnects", lost)
    if noticed:
        report.figure("blackhole_replaced_median_s", statistics.median(noticed))
    code = report.finish(args.results)
    if code == 0 and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"state and log kept in {workdir}")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--faxes", type=int, default=2000, help="faxes created over the run")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults")
    parser.add_argument("--faults", choices=("ws", "all"), default="all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ping-interval", type=float, help="websocket.ping_interval (default: faxd's)")
    parser.add_argument("--ping-timeout-min", type=float, help="websocket.ping_timeout_min (default: faxd's)")
    parser.add_argument("--ping-timeout", type=float, help="websocket.ping_timeout (default: faxd's)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    add_options(parser, "--minutes 1 --faxes 100 --fault-every 10")
    args = parser.parse_args()
    apply_quick(args, minutes=1.0, faxes=100, fault_every=10.0)
    report = Report.start("soak", parser, args, ignore=("keep",))
    return asyncio.run(soak(args, report))


if __name__ == "__main__":
    sys.exit(main())
