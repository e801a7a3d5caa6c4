"""What the five benchmarks of issue 12 (the rate budget) share: builds, a run, ground truth, tallies.

* :class:`Build` - which faxd runs: this checkout, or a git revision (the baseline, ``--baseline REV``),
  extracted with ``git archive`` into /tmp and run with the same venv (``python -m faxd`` from there);
* :func:`side` - one simulator in this process and one faxd subprocess pointed at it, with a
  :class:`common.Tap` on its event socket and :class:`Changes` on the simulator: what every benchmark
  runs once per build, both builds at the same time on their own simulators (same workload, same seed);
* :class:`Changes` - when each fax and recipient took each status in the simulator (event-driven,
  from the simulator's store: the moment its notification goes out);
* :class:`Tally` - what one run measured: outcome latency (change in the simulator -> event on the
  socket), missing outcomes, duplicates, Light requests (from the simulator's request log, the same
  one ``GET /_sim/requests`` serves), the most in any 60 s window, 429s, the longest blind period;
* :func:`plan_faxes` / :func:`drive` - the outbound workload (1-2 recipients, outcomes 2-8 s later).

Times are ``time.monotonic()``, which is the event loop's clock here, so the simulator's request log
and the recorder share it. This module measures; the scripts decide the verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Daemon, Tap, quantile, write_config
from report import Report, add_options

from faxd.core.model import FAX_LEVEL
from faxd.sim import RecipientScript, SimConfig, Simulator

REPO = Path(__file__).resolve().parent.parent
Key = tuple[str, int, str, str]  # (fax id, recipient index or -1, kind, to_status): event_key
#: The commit before the request scheduler was wired in (issue 12): what the benchmarks compare with.
BASELINE = "96bf534"
#: RingCentral's default Light limit (requests per 60 s) and faxd's default rate_share of it.
LIGHT_LIMIT = 50
RATE_SHARE = 0.8
FINAL = ("Sent", "SendingFailed", "Delivered")
#: The fast settings of issue 12's pressure workload ("as a new user would try it").
FAST = {"debounce": 0.2, "max_delay": 1.0, "poll_interval": 5.0, "active_poll_interval": 2.0}


# ----------------------------------------------------------------------------------------- builds


@dataclass(frozen=True)
class Build:
    """A faxd to run: ``name`` in tables, ``rev`` its commit, ``code`` the checkout it runs from."""

    name: str
    rev: str
    code: Path


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def current_build() -> Build:
    rev = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no", "--", "faxd"):
        rev += "+"
    return Build("faxd", rev, REPO)


def baseline_build(rev: str) -> Build:
    """faxd's package as of ``rev`` in /tmp/faxd-baseline-SHORT (made once, then reused)."""
    short = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    target = Path(tempfile.gettempdir()) / f"faxd-baseline-{short}"
    if not (target / "faxd" / "__main__.py").exists():
        staging = Path(tempfile.mkdtemp(prefix=f"faxd-baseline-{short}-", dir=target.parent))
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", short, "faxd"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return Build("baseline", short, target)


def add_baseline_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=BASELINE,
        help=f"also run the same workload against faxd at git revision REV, at the same time on its own"
        f" simulator (default {BASELINE}, before the scheduler was wired); 'none': only this checkout",
    )


def add_common_options(parser: argparse.ArgumentParser, quick: str) -> None:
    """The options every issue-12 script takes: ``--seed``, ``--keep``, ``--baseline``, ``--quick``
    (a reduced profile, described by ``quick``) and ``--results``."""
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the work directories (config, store, log)")
    add_baseline_option(parser)
    add_options(parser, quick)


def run_bench(
    name: str,
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    bench: Callable[[argparse.Namespace, Report], Awaitable[int]],
    ignore: tuple[str, ...] = ("keep",),
) -> int:
    """Run ``bench`` under a :class:`Report` named ``name``; its exit code (1 on a miss)."""
    report = Report.start(name, parser, args, ignore=ignore)
    started = time.monotonic()
    code = asyncio.run(bench(args, report))
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
    return code


def builds(args: argparse.Namespace) -> list[Build]:
    out = [current_build()]
    if args.baseline and args.baseline != "none":
        out.append(baseline_build(args.baseline))
    return out


# ----------------------------------------------------------------------------------------- truth


class Changes:
    """When each outbound fax and recipient first held each status in the simulator."""

    def __init__(self, sim: Simulator, progress: asyncio.Event) -> None:
        self.sim = sim
        self.seen: dict[Key, float] = {}
        self._revision: dict[int, int] = {}
        self.progress = progress

    def _observe(self) -> bool:
        now = time.monotonic()
        for mid, message in self.sim.store.messages.items():
            if self._revision.get(mid) == message.revision or message.direction != "Outbound":
                continue
            self._revision[mid] = message.revision
            fax_id = str(mid)
            self.seen.setdefault((fax_id, FAX_LEVEL, "status", message.message_status), now)
            for i, r in enumerate(message.recipients):
                self.seen.setdefault((fax_id, i, "recipient", r.status), now)
            self.progress.set()
        return False

    async def run(self) -> None:
        await self.sim.wait_for(self._observe)  # never true: re-checked on every change until cancelled

    def outcomes(self, fax_ids: Sequence[str] | None = None) -> dict[Key, float]:
        """The final status of every fax (of ``fax_ids``) and recipient that has one, with when."""
        out: dict[Key, float] = {}
        wanted = None if fax_ids is None else set(fax_ids)
        for mid, message in self.sim.store.messages.items():
            fax_id = str(mid)
            if message.direction != "Outbound" or (wanted is not None and fax_id not in wanted):
                continue
            keys = [(fax_id, FAX_LEVEL, "status", message.message_status)]
            keys += [(fax_id, i, "recipient", r.status) for i, r in enumerate(message.recipients)]
            out.update({k: self.seen[k] for k in keys if k[3] in FINAL and k in self.seen})
        return out

    def all_final(self, fax_ids: Sequence[str] | None = None) -> bool:
        wanted = None if fax_ids is None else set(fax_ids)
        return all(
            message.message_status in FINAL
            for mid, message in self.sim.store.messages.items()
            if message.direction == "Outbound" and (wanted is None or str(mid) in wanted)
        )


# ----------------------------------------------------------------------------------------- one run


@dataclass
class Side:
    """One build's run: its simulator, its faxd, what it saw."""

    build: Build
    sim: Simulator
    daemon: Daemon
    changes: Changes
    recorder: Tap
    work: Path
    progress: asyncio.Event
    started: float  # when faxd was spawned (monotonic)
    exit_code: int | None = None

    async def wait_reported(self, fax_ids: Sequence[str] | None, within: float) -> bool:
        """Until every fax of ``fax_ids`` (None: all) is final and each outcome is on the socket."""

        def done() -> bool:
            if not self.changes.all_final(fax_ids):
                return False
            return all(k in self.recorder.arrived for k in self.changes.outcomes(fax_ids))

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not done():
                    self.progress.clear()
                    await self.progress.wait()
        return done()

    async def restart(self) -> None:
        """A new faxd process on the same config and store, and a new recorder from seq 0."""
        self.daemon = Daemon(self.daemon.config, code=self.build.code)
        await self.daemon.start()
        self.recorder = Tap(self.daemon.socket_path, self.progress)


def sim_config(extensions: int = 1, seed: int = 1) -> SimConfig:
    """RingCentral's default rate limits (Light 50 a minute, 60 s penalty); ``extensions`` ids."""
    exts = tuple(str(200000001 + i) for i in range(extensions))
    return SimConfig(seed=seed, extensions=exts, default_delay=(3600.0, 3600.0))


@contextlib.asynccontextmanager
async def side(
    build: Build, cfg: SimConfig, reconcile: dict[str, Any] | None = None, keep: bool = False
) -> AsyncIterator[Side]:
    """A simulator and faxd (``build``) with ``reconcile`` settings, WebSocket up, recorder subscribed."""
    work = Path(tempfile.mkdtemp(prefix=f"faxd-b12-{build.name}-", dir="/tmp"))
    progress = asyncio.Event()
    async with Simulator(cfg) as sim:
        sections: dict[str, dict[str, Any]] = {"logging": {"level": "info", "format": "json"}}
        if reconcile:
            sections["reconcile"] = reconcile
        config = write_config(work, sim, list(cfg.extensions), **sections)
        daemon = Daemon(config, code=build.code)
        started = time.monotonic()
        s = Side(build, sim, daemon, Changes(sim, progress), Tap("", progress), work, progress, started)
        truth = asyncio.create_task(s.changes.run())
        reading: asyncio.Task[None] | None = None
        try:
            await daemon.start()
            await daemon.wait_ws_up(within=120)
            s.recorder = Tap(daemon.socket_path, progress)
            reading = asyncio.create_task(s.recorder.run())
            await s.recorder.connected.wait()
            yield s
        finally:
            for task in (truth, reading):
                if task is not None:
                    task.cancel()
            await asyncio.gather(truth, *(t for t in (reading,) if t is not None), return_exceptions=True)
            s.exit_code = await s.daemon.stop()
    if keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.asynccontextmanager
async def recording(s: Side) -> AsyncIterator[None]:
    """Run ``s.recorder`` (after :meth:`Side.restart`) for the duration of the block."""
    task = asyncio.create_task(s.recorder.run())
    try:
        await s.recorder.connected.wait()
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ----------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the workload starts
    extension: str
    scripts: tuple[RecipientScript, ...]


def plan_faxes(
    count: int, duration: float, extensions: Sequence[str], seed: int, outcome_after: tuple[float, float]
) -> list[Planned]:
    """``count`` outbound faxes at uniformly random moments over ``duration`` s on random
    ``extensions``: 1-2 recipients each, 70 % Sent, 30 % SendingFailed, each ``outcome_after``
    seconds (uniform) after creation."""
    rng = random.Random(seed)
    plan = []
    for n in range(count):
        scripts = []
        for i in range(rng.randint(1, 2)):
            phone = f"+1650{n:05d}{i:02d}"
            after = rng.uniform(*outcome_after)
            if rng.random() < 0.3:
                code = rng.choice(["LineBusy", "NoAnswer", "CallFailed"])
                scripts.append(RecipientScript(phone, "SendingFailed", code, after=after))
            else:
                scripts.append(RecipientScript(phone, "Sent", after=after))
        plan.append(Planned(rng.uniform(0, duration), rng.choice(list(extensions)), tuple(scripts)))
    return sorted(plan, key=lambda p: p.at)


async def drive(sim: Simulator, plan: Sequence[Planned]) -> list[str]:
    """Create the planned faxes on time; returns their ids."""
    start = time.monotonic()
    ids = []
    for p in plan:
        await asyncio.sleep(max(0.0, start + p.at - time.monotonic()))
        ids.append(sim.create_outbound_fax(p.extension, list(p.scripts)))
    return ids


# ----------------------------------------------------------------------------------------- tallies


def window_max(times: Sequence[float], window: float = 60.0) -> int:
    """The most of ``times`` in any half-open ``window``-second interval."""
    ordered = sorted(times)
    best = low = 0
    for high, t in enumerate(ordered):
        while ordered[low] <= t - window:
            low += 1
        best = max(best, high - low + 1)
    return best


def blind_period(
    outcomes: dict[Key, float], arrived: dict[Key, float], events: Sequence[float], end: float
) -> float:
    """The longest time with an outcome pending (happened, not yet on the socket) and no event at all.

    An outcome never reported counts as pending until ``end``."""
    spans = sorted((t, arrived.get(k, end)) for k, t in outcomes.items())
    longest = 0.0
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    ordered = sorted(events)
    for a, b in merged:
        points = [a, *(e for e in ordered if a < e < b), b]
        longest = max(longest, *(y - x for x, y in itertools.pairwise(points)))
    return longest


@dataclass
class Tally:
    """What one side measured over [since, until]."""

    build: str
    rev: str
    outcomes: int
    reported: int
    duplicates: int
    p50: float
    p90: float
    p99: float
    max: float
    light: int  # Light requests over [since, until]
    light_window_max: int  # most Light requests in any 60 s window of the whole run
    refused_429: int
    blind: float
    latencies: list[float] = field(repr=False, default_factory=list)  # unreported: until the end

    @property
    def missing(self) -> int:
        return self.outcomes - self.reported

    def secs(self, value: float) -> str:
        """A latency as shown: ">=" when outcomes are missing (they count as waiting until the end)."""
        return ("at least " if self.missing else "") + seconds(value)

    @property
    def per_transition(self) -> float:
        return self.light / self.reported if self.reported else float("inf")

    def brief(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k != "latencies"}
        d["per_transition"] = self.per_transition
        return d


def tally(s: Side, since: float, until: float, fax_ids: Sequence[str] | None = None) -> Tally:
    outcomes = s.changes.outcomes(fax_ids)
    arrived = s.recorder.arrived
    lat = [max(0.0, arrived[k] - t) for k, t in outcomes.items() if k in arrived]
    # An outcome never reported waited at least until the end: its latency counts as that (a lower
    # bound), so a run that misses outcomes cannot look faster than one that reports them late.
    unreported = [max(0.0, until - t) for k, t in outcomes.items() if k not in arrived]
    every = lat + unreported
    reqs = [r for r in s.sim.requests if r.group == "Light"]
    light = len([r for r in reqs if since <= r.time <= until])
    dups = sum(n - 1 for k, n in s.recorder.counts.items() if n > 1)
    return Tally(
        build=s.build.name,
        rev=s.build.rev,
        outcomes=len(outcomes),
        reported=len(lat),
        duplicates=dups,
        p50=quantile(every, 0.5),
        p90=quantile(every, 0.9),
        p99=quantile(every, 0.99),
        max=max(every) if every else float("nan"),
        light=light,
        light_window_max=window_max([r.time for r in reqs]),
        refused_429=len([r for r in s.sim.requests if r.status == 429]),
        blind=blind_period(outcomes, arrived, s.recorder.times, until),
        latencies=every,
    )


def versus(mine: str, other: Tally | None, theirs: str) -> str:
    """``mine``, and the baseline's figure beside it when there is a baseline."""
    return mine if other is None else f"{mine} (baseline {other.rev}: {theirs})"


def seconds(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f} s"
