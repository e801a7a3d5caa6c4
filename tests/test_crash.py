"""kill -9 at random moments: the journal stays intact, and a resuming client gets every final
transition exactly once.

A subprocess daemon (``python -m faxd run -c FILE``) runs against the simulator, which lives in the
test process and keeps changing faxes. The daemon is killed with SIGKILL at a random moment, 20 times
(every other one once that incarnation has started journalling), and restarted each time; a socket
client follows each incarnation, resuming from the last seq it got. At least half the kills must
have landed while journalling was under way (the journal grew in that incarnation, its newest row a
moment before the kill).
At the end the database passes ``PRAGMA integrity_check`` and the client's events hold every final
status the simulator holds, with no (fax, recipient, kind, to_status) twice and no seq gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from socket_client import SocketClient

from faxd import testbed
from faxd.client import ConnectionLost
from faxd.core.model import FAX_LEVEL, event_key
from faxd.core.status import parse_time
from faxd.sim import RecipientScript, SimConfig, Simulator

KILLS = 20
#: A kill this soon after the incarnation's newest commit landed while journalling was under way.
UNDER_WAY = 1.5
Key = tuple[str, int, str, str]  # a dedup key (faxd.core.model.event_key)
LIMITS = {  # every start logs in afresh (Auth); keep the simulator from refusing that
    "Light": (100000, 60, 60),  # faxd keeps a 20 % reserve of what the server reports left
    "Medium": (1000, 60, 60),
    "Heavy": (100, 60, 60),
    "Auth": (1000, 60, 60),
}


class Follower:
    """A socket client that resumes from the last seq it received, across daemon incarnations."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self.epoch: str | None = None
        self.changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    async def follow(self) -> None:
        """Connect (waiting for the daemon's socket), subscribe after ``last_seq``, read until EOF."""
        for _ in range(500):
            try:
                client = await SocketClient.connect(self.socket, hello=False)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.01)  # another process: nothing to await but its socket file
        else:
            return
        try:
            async for message in client.messages():
                if message["type"] == "hello":
                    self.epoch = self.epoch or message["epoch"]
                    assert message["epoch"] == self.epoch, "the journal's epoch changed"
                    await client.send({"type": "subscribe", "after_seq": self.last_seq, "epoch": self.epoch})
                elif message["type"] == "event":
                    assert message["seq"] == self.last_seq + 1, "a seq was skipped or repeated"
                    self.events.append(message)
                    self.changed.set()
        except ConnectionLost:  # killed while we subscribed
            pass
        finally:
            await client.close()

    def keys(self) -> list[Key]:
        return [event_key(e) for e in self.events]


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: when, and the journal before that incarnation started and right after the kill."""

    killed_at: float  # Unix time
    rows_before: int
    rows_at_kill: int
    last_commit: float | None  # Unix time of the newest journal row (its observed_at)

    def journalling(self, within: float) -> bool:
        """This incarnation committed transitions, the newest less than ``within`` s before the kill."""
        recent = self.last_commit is not None and self.killed_at - self.last_commit < within
        return self.rows_at_kill > self.rows_before and recent


def journal_rows(db_path: Path) -> int:
    return journal_tail(db_path)[0]


def journal_tail(db_path: Path) -> tuple[int, float | None]:
    """Rows in the journal and when the newest was observed; (0, None) before the first start."""
    if not db_path.exists():
        return 0, None
    db = sqlite3.connect(db_path)
    try:
        count, newest = db.execute("SELECT COUNT(*), MAX(observed_at) FROM journal").fetchone()
    finally:
        db.close()
    return count, parse_time(newest)


def truth(sim: Simulator) -> set[Key]:
    out: set[Key] = set()
    for m in sim.messages():
        out.add((str(m["id"]), FAX_LEVEL, "status", m["messageStatus"]))
        if m["direction"] == "Outbound":
            for i, r in enumerate(m["to"]):
                out.add((str(m["id"]), i, "recipient", r["messageStatus"]))
    return out


async def make_faxes(
    sim: Simulator, rng: random.Random, stop: asyncio.Event, ends: dict[str, list[str]]
) -> None:
    """Faxes of every kind until ``stop``; ``ends`` gets each outbound fax's final recipient statuses."""
    n = 0
    while not stop.is_set():
        n += 1
        if n % 7 == 0:
            sim.create_inbound_fax(None, f"+1415555{n:04d}")
        else:
            scripts = []
            for i in range(rng.randint(1, 3)):
                phone = f"+1650{n:04d}{i:03d}"
                roll = rng.random()
                after = rng.uniform(0.1, 2.0)
                if roll < 0.5:
                    scripts.append(RecipientScript(phone, "Sent", after=after))
                elif roll < 0.7:
                    scripts.append(
                        RecipientScript(phone, "Sent", after=after, delivered_after=rng.uniform(0.1, 1))
                    )
                else:
                    code = rng.choice(["LineBusy", "NoAnswer", "InvalidNumber", "NoFaxMachine"])
                    scripts.append(RecipientScript(phone, "SendingFailed", code, after=after))
            fid = sim.create_outbound_fax(None, scripts)
            ends[fid] = ["Delivered" if x.delivered_after else x.outcome for x in scripts]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(0.05, 0.3)):
                await stop.wait()


@pytest.mark.timeout(90)
async def test_sigkill_at_random_moments_loses_nothing_and_repeats_nothing(short_dir: Path) -> None:
    rng = random.Random(20261124)
    async with Simulator(SimConfig(seed=11, rate_limits=LIMITS)) as sim:
        config = testbed.write_config(
            sim,
            short_dir,
            reconcile={"debounce": 0.05, "max_delay": 0.3, "poll_interval": 2, "active_poll_interval": 0.5},
            logging={"level": "warning"},
        )
        follower = Follower(str(short_dir / "events.sock"))
        stop_making = asyncio.Event()
        ends: dict[str, list[str]] = {}
        maker = asyncio.create_task(make_faxes(sim, rng, stop_making, ends))

        async def start() -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "faxd",
                "run",
                "-c",
                str(config),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            return proc, asyncio.create_task(follower.follow())

        kills: list[Kill] = []
        for n in range(KILLS):
            rows_before = journal_rows(short_dir / "faxd.db")
            proc, follow = await start()
            if n % 2:
                # Steady state: a random moment once this incarnation has journalled something. How
                # long start-up takes depends on the machine's load, so a kill timed from the spawn
                # alone may land before any journalling, however long the test runs.
                async with asyncio.timeout(30):
                    while follower.last_seq <= rows_before:
                        follower.changed.clear()
                        await follower.changed.wait()
                moment = rng.uniform(0.0, 0.5)
            else:
                moment = rng.uniform(0.3, 1.5)  # anywhere from start-up to steady state
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(moment):
                    await proc.wait()
            assert proc.returncode is None, "the daemon exited on its own"
            killed_at = time.time()
            proc.kill()
            await proc.wait()
            kills.append(Kill(killed_at, rows_before, *journal_tail(short_dir / "faxd.db")))
            follow.cancel()  # it got EOF already, or is still waiting for a socket that will not come
            with contextlib.suppress(asyncio.CancelledError):
                await follow

        stop_making.set()
        await maker
        # Let every fax finish, then one last daemon must catch up with all of it.
        async with asyncio.timeout(10):
            await sim.wait_for(
                lambda: all(
                    [r["messageStatus"] for r in sim.message(f)["to"]] == end for f, end in ends.items()
                )
            )
        expected = truth(sim)
        proc, follow = await start()
        try:
            async with asyncio.timeout(30):
                while not expected <= set(follower.keys()):
                    follower.changed.clear()
                    await follower.changed.wait()
        finally:
            proc.terminate()
            assert await proc.wait() == 0
            async with asyncio.timeout(5):
                await follow

    # The kills must have hit a daemon that was journalling: it had committed in this incarnation and
    # its newest commit was recent (faxes change every 0.05-0.3 s, so commits keep coming).
    under_way = [k for k in kills if k.journalling(within=UNDER_WAY)]
    assert len(under_way) >= KILLS // 2, [
        (k.rows_at_kill - k.rows_before, k.last_commit and round(k.killed_at - k.last_commit, 3))
        for k in kills
    ]
    keys = follower.keys()
    assert len(keys) == len(set(keys)), "a transition was delivered twice"
    assert expected <= set(keys)
    assert len(sim.messages()) > 40
    db = sqlite3.connect(short_dir / "faxd.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (journalled,) = db.execute("SELECT COUNT(*) FROM journal").fetchone()
        assert journalled == len(keys)
    finally:
        db.close()
