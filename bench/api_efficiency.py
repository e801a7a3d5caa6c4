"""API efficiency: faxd against the client RingCentral's 2016 advice describes, on the simulator.

    .venv/bin/python bench/api_efficiency.py                       # 200 faxes over 60 s (the issue's profile)
    .venv/bin/python bench/api_efficiency.py --faxes 50 --duration 15
    .venv/bin/python bench/api_efficiency.py --quick                # 40 faxes over 15 s, 30 s of tail

Both clients watch the same workload, each on its own simulator with RingCentral's default rate limits
(Light 50 requests per 60 s, 60 s penalty): FAXES outbound faxes, created at random moments over
DURATION seconds, with 1-3 recipients each and mixed outcomes (Sent, Sent then Delivered,
SendingFailed with several codes), finishing 1-8 s after creation.

* faxd: the daemon in this process (``faxd.daemon.run``), defaults except the store and socket paths;
  a socket client subscribed from seq 0 records when each event arrives.
* baseline: a WSG subscription to the Fax box (faxd's own WebSocket session, so only the reaction
  differs) and, on every Fax hint, ``GET message-store?messageType=Fax&direction=Outbound``, diffed
  with what it saw before. A 429 makes that request wait Retry-After and try again.

Ground truth: every status the simulator's messages take (fax level and per recipient), with the loop
time it first held. Latency = when a client found a transition minus when it happened in the simulator
(a hint is sent the same moment). Prints one table.

Targets (issue 5): faxd spends <= 1/10 of the baseline's Light requests per final transition found,
receives zero 429s, and misses nothing (finds every fax's and recipient's final status). Exit 0 when
all three hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from report import Report, add_options, apply_quick

from faxd import daemon, testbed
from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import RingCentral
from faxd.adapters.ws_session import WsSession, WsSettings
from faxd.core.model import FAX_LEVEL, event_key
from faxd.core.wsg import Hint, event_filters
from faxd.logs import configure_logging
from faxd.sim import RecipientScript, SimConfig, Simulator

Key = tuple[str, int, str]  # (fax, recipient or FAX_LEVEL, status): event_key without the kind
EXT = "200000001"


@dataclass
class Result:
    name: str
    found: dict[Key, float] = field(default_factory=dict)  # key -> loop time found
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, key: Key, now: float) -> None:
        if key not in self.found:
            self.found[key] = now
            self.changed.set()

    light: int = 0
    refused: int = 0


class Truth:
    """Records every status the simulator's faxes take, with the loop time it was first seen."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.seen: dict[Key, float] = {}

    def observe(self) -> bool:
        now = asyncio.get_running_loop().time()
        for m in self.sim.messages():
            fid = str(m["id"])
            self.seen.setdefault((fid, FAX_LEVEL, m["messageStatus"]), now)
            for i, r in enumerate(m.get("to") or []):
                self.seen.setdefault((fid, i, r["messageStatus"]), now)
        return False

    def transitions(self) -> dict[Key, float]:
        """Every change, including a Sent that became Delivered before anyone could look."""
        return {k: t for k, t in self.seen.items() if k[2] != "Queued"}

    def finals(self) -> dict[Key, float]:
        """The outcome of every fax and recipient: what "nothing missed" is measured on."""
        out: dict[Key, float] = {}
        for m in self.sim.messages():
            fid = str(m["id"])
            keys = [(fid, FAX_LEVEL, m["messageStatus"])]
            keys += [(fid, i, r["messageStatus"]) for i, r in enumerate(m.get("to") or [])]
            out.update({k: self.seen[k] for k in keys if k in self.seen})
        return out

    def all_final(self) -> bool:
        return all(m["messageStatus"] != "Queued" for m in self.sim.messages()) and all(
            r["messageStatus"] != "Queued" for m in self.sim.messages() for r in m.get("to") or []
        )


def workload(faxes: int, duration: float, seed: int) -> list[tuple[float, list[RecipientScript]]]:
    rng = random.Random(seed)
    plan = []
    for n in range(faxes):
        scripts = []
        for i in range(rng.randint(1, 3)):
            phone = f"+1650{n:04d}{i:03d}"
            after = rng.uniform(1.0, 8.0)
            roll = rng.random()
            if roll < 0.5:
                scripts.append(RecipientScript(phone, "Sent", after=after))
            elif roll < 0.7:
                scripts.append(RecipientScript(phone, "Sent", after=after, delivered_after=rng.uniform(1, 5)))
            else:
                code = rng.choice(["LineBusy", "NoAnswer", "InvalidNumber", "NoFaxMachine", "CallFailed"])
                scripts.append(RecipientScript(phone, "SendingFailed", code, after=after))
        plan.append((rng.uniform(0, duration), scripts))
    return sorted(plan, key=lambda p: p[0])


async def drive(sim: Simulator, plan: list[tuple[float, list[RecipientScript]]]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for at, scripts in plan:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        sim.create_outbound_fax(None, scripts)


async def run_faxd(sim: Simulator, workdir: Path, result: Result, done: asyncio.Event) -> None:
    config = testbed.load(sim, workdir, logging={"level": "warning"})
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(
        daemon.run(config, registry=CollectorRegistry(), stop=stop, on_ready=ready.set)
    )
    await ready.wait()
    reader, writer = await asyncio.open_unix_connection(config.events.socket, limit=2**22)
    hello = json.loads(await reader.readline())
    writer.write(json.dumps({"type": "subscribe", "after_seq": 0, "epoch": hello["epoch"]}).encode() + b"\n")
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while line := await reader.readline():
            e = json.loads(line)
            if e["type"] == "event" and e["kind"] in ("status", "recipient"):
                fax_id, index, _, to_status = event_key(e)
                result.add((fax_id, index, to_status), loop.time())

    reading = asyncio.create_task(read())
    await done.wait()
    stop.set()
    await task
    reading.cancel()
    writer.close()


async def run_baseline(sim: Simulator, result: Result, done: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    metrics = Metrics(CollectorRegistry())
    async with aiohttp.ClientSession() as http:
        rc = RingCentral(
            http,
            server=sim.url,
            client_id=sim.config.client_id,
            client_secret=sim.config.client_secret,
            jwt=sim.config.jwt,
            metrics=metrics,
        )
        await rc.login()
        url = f"{sim.url}/restapi/v1.0/account/~/extension/~/message-store"
        params = [("messageType", "Fax"), ("direction", "Outbound"), ("perPage", "1000")]
        tasks: set[asyncio.Task[None]] = set()

        async def list_and_diff() -> None:
            while True:
                token = (await rc._ensure_token()).access
                async with http.get(url, params=params, headers={"Authorization": f"Bearer {token}"}) as r:
                    body = await r.json()
                    if r.status == 429:
                        await asyncio.sleep(float(r.headers.get("Retry-After", "60")))
                        continue
                if r.status != 200:
                    return
                now = loop.time()
                for m in body["records"]:
                    fid = str(m["id"])
                    result.add((fid, FAX_LEVEL, m["messageStatus"]), now)
                    for i, rec in enumerate(m.get("to") or []):
                        result.add((fid, i, rec["messageStatus"]), now)
                return

        def on_hint(_: Hint) -> None:
            task = asyncio.create_task(list_and_diff())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        ws = WsSession(
            rc,
            filters=event_filters([EXT]),
            settings=WsSettings(),
            metrics=metrics,
            on_hint=on_hint,
            on_resync=lambda: None,
        )
        session = asyncio.create_task(ws.run())
        await done.wait()
        session.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(session, *tasks, return_exceptions=True)


async def one(
    name: str, plan: list[tuple[float, list[RecipientScript]]], tail: float
) -> tuple[Result, Truth]:
    result = Result(name)
    async with Simulator(SimConfig(seed=1)) as sim:
        truth = Truth(sim)
        watching = asyncio.create_task(sim.wait_for(truth.observe))
        done = asyncio.Event()
        with tempfile.TemporaryDirectory(prefix="faxd-b-", dir="/tmp") as tmp:
            client = asyncio.create_task(
                run_faxd(sim, Path(tmp), result, done) if name == "faxd" else run_baseline(sim, result, done)
            )
            await asyncio.sleep(1.0)  # let the client log in and subscribe before the workload starts
            start = len(sim.requests)
            await drive(sim, plan)
            # The tail: until the client has found every transition, or ``tail`` seconds.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tail):
                    while not (truth.all_final() and set(truth.finals()) <= set(result.found)):
                        result.changed.clear()
                        await result.changed.wait()
            done.set()
            await client
            served = sim.requests[start:]
            result.light = len([r for r in served if r.group == "Light" and r.transport == "http"])
            result.refused = len([r for r in served if r.status == 429])
        watching.cancel()
    return result, truth


@dataclass
class Tally:
    """What one client achieved against the ground truth."""

    light: int
    per_transition: float  # Light requests per final transition found
    refused: int  # 429 answers
    found: int  # final transitions found
    finals: int  # final transitions that happened
    changes: int  # every change seen
    all_changes: int
    median: float
    p99: float


def tally(result: Result, truth: Truth) -> Tally:
    real = truth.finals()
    found = {k: t for k, t in result.found.items() if k in real}
    changes = len([k for k in result.found if k in truth.transitions()])
    latencies = sorted(max(0.0, t - real[k]) for k, t in found.items())
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    median = statistics.median(latencies) if latencies else float("nan")
    per = result.light / len(found) if found else float("inf")
    return Tally(
        result.light,
        per,
        result.refused,
        len(found),
        len(real),
        changes,
        len(truth.transitions()),
        median,
        p99,
    )


def row(name: str, t: Tally) -> list[str]:
    return [
        name,
        str(t.light),
        f"{t.per_transition:.3f}",
        str(t.refused),
        f"{t.found}/{t.finals}",
        f"{t.changes}/{t.all_changes}",
        f"{t.median:.2f} s",
        f"{t.p99:.2f} s",
    ]


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faxes", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--tail", type=float, default=90.0, help="seconds to wait for stragglers")
    parser.add_argument("--seed", type=int, default=5)
    add_options(parser, "--faxes 40 --duration 15 --tail 30")
    args = parser.parse_args()
    apply_quick(args, faxes=40, duration=15.0, tail=30.0)
    report = Report.start("api_efficiency", parser, args)
    configure_logging(level="warning", fmt="console", redact_phi=True, stream=sys.stderr)
    plan = workload(args.faxes, args.duration, args.seed)
    started = time.monotonic()
    (faxd, t1), (base, t2) = await asyncio.gather(
        one("faxd", plan, args.tail), one("baseline (list on every hint)", plan, args.tail)
    )
    header = [
        "client",
        "Light requests",
        "requests/transition",
        "429s",
        "final transitions found",
        "all changes seen",
        "median",
        "p99",
    ]
    mine, theirs = tally(faxd, t1), tally(base, t2)
    rows = [header, row(faxd.name, mine), row(base.name, theirs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(
        f"{args.faxes} faxes over {args.duration:g} s, seed {args.seed}; Python {platform.python_version()}"
    )
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"(wall time {time.monotonic() - started:.0f} s)")
    ratio = mine.per_transition / theirs.per_transition if theirs.per_transition else float("inf")
    report.target(
        "requests",
        5,
        "faxd <= 1/10 of the baseline's Light requests per final transition",
        ratio,
        "<=",
        0.1,
        f"{mine.per_transition:.3f} vs {theirs.per_transition:.3f} requests/transition"
        f" ({ratio:.3g} of the baseline)",
    )
    report.target("no_429", 5, "faxd receives zero 429s", mine.refused, "==", 0, f"{mine.refused} 429s")
    report.target(
        "nothing_missed",
        5,
        "faxd finds every final transition",
        mine.found,
        "==",
        mine.finals,
        f"{mine.found}/{mine.finals} final transitions",
    )
    report.figure("faxd", vars(mine))
    report.figure("baseline", vars(theirs))
    return report.finish(args.results)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
