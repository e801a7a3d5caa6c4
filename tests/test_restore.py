"""A restored store is a new journal to socket clients: `faxd store backup` while faxd runs, `faxd store
restore` once it is stopped, and a client resuming from a cursor the restore took away gets
``cursor_expired`` instead of silently missing the events journalled again under the same seqs.

The daemon runs in-process against the simulator; the store commands run as the admin runs them, in a
subprocess, with a config whose secrets they cannot read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ops_support import run_faxd, shell_env
from prometheus_client import CollectorRegistry
from socket_client import SocketClient

from faxd import daemon
from faxd.config import Config
from faxd.sim import Simulator

TIMEOUT = 30


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        daemon.run(config, registry=CollectorRegistry(), stop=stop, on_ready=ready.set)
    )
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert not task.done(), f"daemon did not start: exit {task.result()}"
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(20):
            assert await task == 0


async def store_command(*args: str) -> tuple[int, str, str]:
    return await run_faxd("store", *args, env=shell_env(), within=TIMEOUT)


def final_of(fax_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["type"] == "event" and m["fax_id"] == fax_id and m["final"]


async def test_a_client_resuming_across_a_restore_gets_cursor_expired(
    sim: Simulator, make_config: Callable[..., Config], short_dir: Path
) -> None:
    config = make_config(sim)
    admin_config = short_dir / "admin.yaml"
    admin_config.write_text(
        json.dumps(
            {
                "ringcentral": {
                    "client_id": "x",
                    "jwt": {"credential": "j"},
                    "client_secret": {"credential": "s"},
                },
                "store": {"path": config.store.path},
            }
        )
    )
    backup_file = short_dir / "backup.db"

    async with serving(config):
        client = await SocketClient.connect(config.events.socket)
        hello = client.hello
        await client.send({"type": "subscribe", "after_seq": 0})
        before = sim.create_inbound_fax(None, "+16505550123")
        await client.until(final_of(before))

        code, out, err = await store_command("backup", "-c", str(admin_config), str(backup_file))
        assert code == 0, err
        assert out.startswith(f"backed up {config.store.path} to {backup_file}: epoch {hello['epoch']}, ")

        lost = [sim.create_inbound_fax(None, f"+1650555020{i}") for i in range(3)]
        seen: dict[str, int] = {}
        while set(seen) != set(lost):
            event = await client.until(lambda m: m["type"] == "event" and m["final"])
            seen[event["fax_id"]] = event["seq"]
        cursor = (hello["epoch"], max(seen.values()))  # what a client saves after processing

        code, out, err = await store_command("restore", "-c", str(admin_config), str(backup_file))
        assert (code, out) == (1, "")
        assert "is in use (faxd is running?): stop faxd first" in err
        await client.close()

    code, out, err = await store_command("restore", "-c", str(admin_config), str(backup_file))
    assert code == 0, err
    assert "clients resuming an older cursor get cursor_expired" in out

    async with serving(config):
        # faxd re-syncs from the backup's sync token: the lost faxes are journalled again, under seqs
        # the client already processed, and the journal grows past the saved cursor.
        watcher = await SocketClient.connect(config.events.socket)
        hello = watcher.hello
        assert hello["epoch"] != cursor[0]
        await watcher.send({"type": "subscribe", "after_seq": 0})
        later = sim.create_inbound_fax(None, "+16505550999")
        journalled: dict[str, int] = {}
        while not {*lost, later} <= set(journalled):
            event = await watcher.until(lambda m: m["type"] == "event" and m["final"])
            journalled[event["fax_id"]] = event["seq"]
        assert max(journalled.values()) > cursor[1], "the journal has grown past the saved cursor"
        assert min(journalled[fax_id] for fax_id in lost) <= cursor[1], "seqs the client saw are reused"
        await watcher.close()

        resumer = await SocketClient.connect(config.events.socket)
        await resumer.send({"type": "subscribe", "after_seq": cursor[1], "epoch": cursor[0], "id": "r"})
        reply = await resumer.until(lambda m: m.get("id") == "r" or m["type"] == "event")
        assert reply["type"] == "error", f"resumed silently past re-journalled events: {reply}"
        assert reply["code"] == "cursor_expired"
        assert reply["epoch"] == hello["epoch"]
        assert reply["head_seq"] >= cursor[1]
        await resumer.close()
