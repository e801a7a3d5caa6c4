"""The outlets in process: a real store, a real aiohttp receiver on loopback verifying signatures with
the standardwebhooks package, real hook scripts. Timings are shortened by config (retry_initial,
timeout), never slept through.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from ops_support import until
from prometheus_client import CollectorRegistry
from webhook_receiver import Receiver

from faxd.adapters import outlets as outlets_module
from faxd.adapters.metrics import Metrics
from faxd.adapters.outlets import Ledger, Outlets, open_ledger
from faxd.adapters.store import Journalled, Store
from faxd.config import OutletConfig, OutletFilterConfig, Secret, outlet_settings
from faxd.core.model import Event, EventKind, Source, Transition

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def journal(
    store: Store, n: int, *, observed: datetime | None = None, direction: str = "Outbound", final: bool = True
) -> list[Event]:
    """``n`` new events, one per new fax."""
    first = store.head_seq() + 1
    transitions = [
        Journalled(
            Transition(EventKind.STATUS, f"f{first + i}", "200", direction, "Queued", "Sent", final),
            Source.POLL,
        )
        for i in range(n)
    ]
    return store.commit([], transitions, observed_at=iso(observed or datetime.now(UTC)))


def webhook(url: str, **overrides: Any) -> OutletConfig:
    settings: dict[str, Any] = {
        "type": "webhook",
        "url": url,
        "secret": Secret(SECRET, ("env", "TEST_SECRET")),
        "timeout": 2.0,
        "retry_initial": 0.01,
        "retry_max": 0.05,
        **overrides,
    }
    return OutletConfig(**settings)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "faxd.db")
    s.open()
    yield s
    s.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(SECRET)
    await r.start()
    yield r
    await r.stop()


def value(metrics: Metrics, name: str, outlet: str = "o") -> float:
    got = metrics.registry.get_sample_value(name, {"outlet": outlet})
    assert got is not None, name
    return got


async def committed(metrics: Metrics, seq: int, outlet: str = "o") -> None:
    """Until the outlet has committed its cursor at ``seq`` (its flush when it catches up)."""
    await until(
        lambda: metrics.registry.get_sample_value("faxd_outlet_cursor_seq", {"outlet": outlet}) == seq
    )


class Running:
    """Outlets.run() as a task, cancelled (as the supervisor does on stop) at the end."""

    def __init__(self, outlets: Outlets) -> None:
        self.outlets = outlets
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Outlets:
        await self.outlets.__aenter__()
        self.task = asyncio.create_task(self.outlets.run())
        return self.outlets

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.outlets.__aexit__(None, None, None)


async def started(store: Store, name: str = "o") -> None:
    """Until the outlet has taken its cursor (it then reads the journal or waits)."""
    await until(lambda: name in Ledger(store.db).names())


def new_outlet_at_zero(store: Store, name: str = "o") -> None:
    """As if the outlet had been configured before the events were journalled."""
    Ledger(store.db).cursor(name, new_at=0)


async def test_failures_on_schedule_retry_in_order_and_4xx_parks(
    store: Store, metrics: Metrics, receiver: Receiver
) -> None:
    new_outlet_at_zero(store)
    journal(store, 8)
    receiver.script = {
        1: (503, {}),  # seq 1 retried
        3: "hang",  # seq 2 times out
        4: (429, {"Retry-After": "1"}),  # seq 2 again: honour Retry-After
        6: (404, {}),  # seq 3 parked
        7: (400, {}),  # seq 4 parked
        8: (408, {}),  # seq 5 retried
    }
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url)}), store, metrics)):
        await committed(metrics, 8)
    assert receiver.bad_signatures == 0
    assert receiver.delivered == [1, 2, 5, 6, 7, 8]
    attempts = [r.seq for r in receiver.requests]
    assert attempts == [1, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7, 8]
    # the same webhook-id on every attempt of one event
    ids = {r.seq: {x.webhook_id for x in receiver.requests if x.seq == r.seq} for r in receiver.requests}
    assert all(len(v) == 1 for v in ids.values())
    assert ids[2] == {f"{store.epoch}:2"}
    # Retry-After: 1 was waited for, although the backoff was at most 0.05 s
    assert receiver.requests[4].body["seq"] == 2
    dead = Ledger(store.db).dead_letters("o")
    assert [(d.seq, d.reason, d.attempts) for d in dead] == [(3, "HTTP 404", 1), (4, "HTTP 400", 1)]
    assert json.loads(dead[0].event)["fax_id"] == "f3"
    assert Ledger(store.db).cursor("o", new_at=0) == 8  # committed when the outlet stopped
    assert value(metrics, "faxd_outlet_delivered_total") == 6
    assert value(metrics, "faxd_outlet_dead_lettered_total") == 2
    assert value(metrics, "faxd_outlet_failed_attempts_total") == 6
    assert value(metrics, "faxd_outlet_retrying") == 0


async def test_retry_after_is_waited_for(store: Store, metrics: Metrics, receiver: Receiver) -> None:
    new_outlet_at_zero(store)
    journal(store, 1)
    receiver.script = {1: (503, {"Retry-After": "1"})}
    loop = asyncio.get_running_loop()
    times: list[float] = []
    receiver.before_reply = lambda _: times.append(loop.time())
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url)}), store, metrics)):
        await receiver.wait_for(lambda r: r.delivered == [1])
    assert times[1] - times[0] >= 1.0  # the backoff alone would have been 0.05 s at most


async def test_receiver_killed_and_restarted(store: Store, metrics: Metrics, receiver: Receiver) -> None:
    new_outlet_at_zero(store)
    journal(store, 3)
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url)}), store, metrics)) as outlets:
        await receiver.wait_for(lambda r: r.delivered == [1, 2, 3])
        await receiver.stop()
        outlets.published(journal(store, 3))
        # connection refused, retried with backoff
        await until(lambda: value(metrics, "faxd_outlet_failed_attempts_total") >= 3)
        assert value(metrics, "faxd_outlet_retrying") == 1
        assert value(metrics, "faxd_outlet_lag_events") == 3
        assert value(metrics, "faxd_outlet_lag_seconds") > 0
        await receiver.start()  # the same port
        await committed(metrics, 6)
        assert value(metrics, "faxd_outlet_lag_events") == 0
        assert value(metrics, "faxd_outlet_lag_seconds") == 0
    assert receiver.delivered == [1, 2, 3, 4, 5, 6]
    assert Ledger(store.db).dead_letters("o") == []


async def test_publish_wakes_the_outlet(
    store: Store, metrics: Metrics, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outlets_module, "IDLE_CHECK", 3600.0)  # only a publish can wake it now
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url)}), store, metrics)) as outlets:
        await started(store)
        outlets.published(journal(store, 2))
        await receiver.wait_for(lambda r: r.delivered == [1, 2], within=10)


async def test_a_new_outlet_starts_at_the_head_and_replay_goes_back(
    store: Store, metrics: Metrics, receiver: Receiver, tmp_path: Path
) -> None:
    journal(store, 3)  # before the outlet existed
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url)}), store, metrics)) as outlets:
        await started(store)
        outlets.published(journal(store, 2))
        await receiver.wait_for(lambda r: r.delivered == [4, 5])
        # faxd outlets replay o --from-seq 2, from another connection (another process in real life)
        other = open_ledger(tmp_path / "faxd.db", write=True)
        assert other.request_replay("o", 2)
        assert not other.request_replay("nope", 2)
        other.db.close()
        await receiver.wait_for(lambda r: r.delivered == [4, 5, 2, 3, 4, 5])


async def test_too_old_events_are_dead_lettered_and_the_outlet_goes_on(
    store: Store, metrics: Metrics, receiver: Receiver
) -> None:
    new_outlet_at_zero(store)
    journal(store, 1, observed=datetime.now(UTC) - timedelta(hours=2))
    journal(store, 1)
    receiver.by_seq = {1: (503, {}), 2: (503, {})}
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url, max_age=3600)}), store, metrics)):
        await receiver.wait_for(lambda r: r.delivered == [2])
    dead = Ledger(store.db).dead_letters("o")
    assert [d.seq for d in dead] == [1]
    assert "max_age" in dead[0].reason


async def test_filter_skips_but_the_cursor_moves_on(
    store: Store, metrics: Metrics, receiver: Receiver
) -> None:
    new_outlet_at_zero(store)
    journal(store, 1, direction="Inbound")
    journal(store, 1, final=False)
    journal(store, 1)
    flt = OutletFilterConfig(directions=frozenset({"outbound"}), final_only=True)
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url, filter=flt)}), store, metrics)):
        await committed(metrics, 3)
    assert receiver.delivered == [3]
    assert Ledger(store.db).cursor("o", new_at=0) == 3
    assert receiver.requests[0].body["direction"] == "Outbound"
    assert receiver.requests[0].body["recipient"] is None


async def test_tls_is_verified(store: Store, metrics: Metrics, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    receiver = Receiver(SECRET, tls=server_ctx)
    await receiver.start()
    try:
        new_outlet_at_zero(store, "trusted")
        new_outlet_at_zero(store, "untrusted")
        journal(store, 1)
        outlets = {
            "trusted": webhook(receiver.url, ca_file=str(ca_file)),
            "untrusted": webhook(receiver.url),  # the system's CAs do not know this one
        }
        async with Running(Outlets(outlet_settings(outlets), store, metrics)):
            await receiver.wait_for(lambda r: r.delivered == [1])
            await until(lambda: value(metrics, "faxd_outlet_failed_attempts_total", "untrusted") >= 2)
        assert receiver.delivered == [1]  # only the trusted outlet ever got through
        assert value(metrics, "faxd_outlet_delivered_total", "untrusted") == 0
    finally:
        await receiver.stop()


# -- exec hooks ---------------------------------------------------------------------------------------

HOOK = r"""#!/bin/sh
# args: OUT_DIR literal-arg ; the event JSON on stdin
out="$1"
body=$(cat)
echo "start $FAXD_EVENT_SEQ" >> "$out/log"
printf '%s\n' "$body" > "$out/body-$FAXD_EVENT_SEQ"
env | grep '^FAXD_\|^PATH=\|^SECRET' | sort > "$out/env-$FAXD_EVENT_SEQ"
echo "$2" > "$out/arg2"
if [ "$FAXD_EVENT_SEQ" = 2 ] && [ "$FAXD_ATTEMPT" = 1 ]; then
  echo "end $FAXD_EVENT_SEQ fail" >> "$out/log"; exit 3
fi
if [ "$FAXD_EVENT_SEQ" = 3 ] && [ "$FAXD_ATTEMPT" = 1 ]; then exec sleep 30; fi
echo "end $FAXD_EVENT_SEQ" >> "$out/log"
"""


def hook_script(tmp_path: Path) -> Path:
    script = tmp_path / "hook.sh"
    script.write_text(HOOK)
    script.chmod(stat.S_IRWXU)
    (tmp_path / "out").mkdir()
    return script


def hook(script: Path, out: Path, **overrides: Any) -> OutletConfig:
    settings: dict[str, Any] = {
        "type": "exec",
        "command": (str(script), str(out), "a b; rm -rf /tmp/x"),
        "timeout": 6.0,  # seq 3 hangs until killed; the others, even on a loaded machine, do not
        "retry_initial": 0.01,
        "retry_max": 0.05,
        **overrides,
    }
    return OutletConfig(**settings)


async def wait_file(path: Path, text: str) -> None:
    await until(lambda: path.exists() and text in path.read_text())


async def test_exec_hook_gets_stdin_env_and_retries(
    store: Store, metrics: Metrics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "must-not-leak")
    out = tmp_path / "out"
    script = hook_script(tmp_path)
    new_outlet_at_zero(store)
    journal(store, 4)
    async with Running(Outlets(outlet_settings({"o": hook(script, out)}), store, metrics)):
        await wait_file(out / "log", "end 4")
    log = (out / "log").read_text().split("\n")
    # in order, seq 2 retried after exit 3, seq 3 retried after the timeout killed it
    assert log[:-1] == [
        "start 1",
        "end 1",
        "start 2",
        "end 2 fail",
        "start 2",
        "end 2",
        "start 3",
        "start 3",
        "end 3",
        "start 4",
        "end 4",
    ]
    body = json.loads((out / "body-2").read_text())
    assert body["type"] == "event"
    assert body["seq"] == 2
    assert body["fax_id"] == "f2"
    env = dict(line.split("=", 1) for line in (out / "env-2").read_text().splitlines())
    assert env["FAXD_EVENT_SEQ"] == "2"
    assert env["FAXD_FAX_ID"] == "f2"
    assert env["FAXD_STATUS"] == "Sent"
    assert env["FAXD_ATTEMPT"] == "2"
    assert env["FAXD_EVENT_ID"] == f"{store.epoch}:2"
    assert "SECRET_TOKEN" not in env  # faxd's environment is not passed on
    assert (out / "arg2").read_text() == "a b; rm -rf /tmp/x\n"  # no shell
    assert value(metrics, "faxd_outlet_failed_attempts_total") == 2
    assert value(metrics, "faxd_outlet_delivered_total") == 4


CONCURRENT_HOOK = r"""#!/bin/sh
out="$1"
cat > /dev/null
echo "start $FAXD_EVENT_SEQ" >> "$out/log"
sleep 0.3
echo "end $FAXD_EVENT_SEQ" >> "$out/log"
"""


async def test_exec_concurrency_is_bounded(store: Store, metrics: Metrics, tmp_path: Path) -> None:
    script = tmp_path / "hook.sh"
    script.write_text(CONCURRENT_HOOK)
    script.chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    out.mkdir()
    new_outlet_at_zero(store)
    journal(store, 6)
    cfg = hook(script, out, concurrency=2, timeout=10.0)
    async with Running(Outlets(outlet_settings({"o": cfg}), store, metrics)):
        await committed(metrics, 6)
    running = peak = 0
    for line in (out / "log").read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    assert peak == 2
    assert Ledger(store.db).cursor("o", new_at=0) == 6


async def test_stop_commits_what_was_delivered_and_aborts_the_rest(
    store: Store, metrics: Metrics, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outlets_module, "BATCH", 1)
    monkeypatch.setattr(outlets_module, "FLUSH_INTERVAL", 3600.0)  # only the stop commits
    new_outlet_at_zero(store)
    journal(store, 4)
    receiver.by_seq = {3: "hang"}
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url, timeout=60)}), store, metrics)):
        await receiver.wait_for(lambda r: [x.seq for x in r.requests] == [1, 2, 3])
    # cancelled mid-request: 1 and 2 are committed, 3 (in flight) will be sent again
    assert Ledger(store.db).cursor("o", new_at=0) == 2


async def test_events_pruned_before_delivery_are_reported(
    store: Store, metrics: Metrics, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    new_outlet_at_zero(store)
    journal(store, 2, observed=datetime.now(UTC) - timedelta(days=40))
    journal(store, 1)
    store.prune(before=iso(datetime.now(UTC) - timedelta(days=30)))
    async with Running(Outlets(outlet_settings({"o": webhook(receiver.url)}), store, metrics)):
        await committed(metrics, 3)
    assert receiver.delivered == [3]
    assert "outlet.events_pruned" in capsys.readouterr().out
