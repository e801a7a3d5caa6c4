"""faxd under systemd: the notify protocol of a real daemon process, socket activation, SIGTERM with work
in flight, and the unit file itself (``systemd-analyze verify`` and ``security``)."""

from __future__ import annotations

import asyncio
import ctypes
import grp
import itertools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_support import FAXD, Daemon, NotifySocket, daemon, status_of, write_config, ws_up

from faxd import credentials
from faxd.adapters.notify import Notifier, listen_fds
from faxd.adapters.store import Store
from faxd.config import DEFAULT_EVENT_SOCKET, EventsConfig
from faxd.daemon import DRAIN_DEADLINE
from faxd.sim import RecipientScript, Simulator
from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
#: Issue 12: SIGTERM exits 0 within this many seconds, whatever faxd is waiting for.
STOP_WITHIN = 5.0
UNIT = ROOT / "systemd" / "faxd.service"
SOCKET_UNIT = ROOT / "systemd" / "faxd.socket"


# ---------------------------------------------------------------------------------------- notify protocol


async def test_notifier_is_a_no_op_without_notify_socket() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.watchdog()
    notifier.close()


async def test_notifier_speaks_to_an_abstract_socket_and_keeps_status_on_one_line() -> None:
    name = f"faxd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert notifier.watchdog_interval == 1.5
        notifier.ready("line one\nREADY=1 forged")
        notifier.status("line one\nREADY=1 forged")  # unchanged: not sent again
        notifier.reloading()
        notifier.close()
        first = server.recv(4096).decode()
        reloading = server.recv(4096).decode()
    assert first == "READY=1\nSTATUS=line one READY=1 forged"
    fields = reloading.split("\n")
    assert fields[0] == "RELOADING=1"
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", fields[1])


async def test_watchdog_of_another_pid_is_not_ours() -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None


async def test_listen_fds_ignores_fds_meant_for_another_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "events"}
    assert listen_fds(env) == {}
    assert env == {}, "the variables must not leak to children"


async def test_notify_sequence_of_a_real_daemon(sim: Simulator, short_dir: Path) -> None:
    """READY=1 (with a STATUS) first, STATUS lines as the WebSocket comes up, WATCHDOG=1 at half of
    WATCHDOG_USEC, then STOPPING=1 on SIGTERM and nothing but watchdog pings after it."""
    config = write_config(short_dir, sim)
    notify = NotifySocket(short_dir / "notify")
    usec = 400_000
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(usec)}
    try:
        async with asyncio.timeout(30), daemon(config, env=env) as faxd:
            first = await notify.next()
            await notify.wait_for(ws_up)
            pings: list[float] = []
            while len(pings) < 4:
                if await notify.next() == "WATCHDOG=1":
                    pings.append(time.monotonic())
            faxd.signal(signal.SIGTERM)
            assert await faxd.wait() == 0
        notify.drain()
    finally:
        notify.close()
    messages = notify.messages
    assert first.startswith("READY=1\nSTATUS=")
    assert messages.count(first) == 1
    assert not any("READY=1" in m for m in messages[1:]), "READY=1 is sent once"
    statuses = [status_of(m) for m in messages if status_of(m) is not None]
    assert any(s and s.startswith("WebSocket down") for s in statuses)
    assert any(s and s.startswith("WebSocket up") for s in statuses)
    stopping = [i for i, m in enumerate(messages) if m.startswith("STOPPING=1")]
    assert len(stopping) == 1
    assert all(m == "WATCHDOG=1" for m in messages[stopping[0] + 1 :])
    assert all(m in ("WATCHDOG=1",) or "STATUS=" in m for m in messages)
    # Half of WATCHDOG_USEC (0.2 s) between pings; systemd would act only after a full 0.4 s.
    median = sorted(b - a for a, b in itertools.pairwise(pings))[1]
    assert usec / 4e6 < median < usec / 1e6


# ---------------------------------------------------------------------------------------- socket activation


async def test_socket_activation_serves_the_inherited_socket(sim: Simulator, short_dir: Path) -> None:
    require_tool("systemd-socket-activate")
    config = write_config(short_dir, sim, events={"socket": "configured.sock"})
    listen = short_dir / "activated.sock"
    argv = [
        "systemd-socket-activate",
        "-l",
        str(listen),
        "--fdname=events",
        *FAXD,
        "run",
        "-c",
        str(config),
    ]
    async with asyncio.timeout(30), daemon(config, argv=argv) as faxd:
        # systemd-socket-activate starts faxd on the first connection; the kernel queues it meanwhile.
        await faxd.wait_raw("Listening on")
        reader, writer = await asyncio.open_unix_connection(str(listen))
        hello = json.loads(await reader.readline())
        assert hello["type"] == "hello"
        writer.close()
        await writer.wait_closed()
        line = await faxd.wait_event("socket.activated")
        assert line["level"] == "info"
        assert not (short_dir / "configured.sock").exists(), "the configured path must not be bound"
        faxd.signal(signal.SIGTERM)
        assert await faxd.wait() == 0
    assert listen.exists(), "the socket belongs to systemd: faxd must not unlink it"


# ---------------------------------------------------------------------------------------- SIGTERM


async def test_sigterm_with_work_in_flight_journals_everything_and_exits_0(
    sim: Simulator, short_dir: Path
) -> None:
    """A change faxd has heard of (a push hint waiting out a long debounce) is reconciled and journalled
    by the drain before exit 0, well within the drain deadline."""
    config = write_config(
        short_dir,
        sim,
        reconcile={"debounce": 20, "max_delay": 30},
        logging={"format": "json", "level": "debug"},
    )
    async with asyncio.timeout(30), daemon(config) as faxd:
        await faxd.wait_event("upstream.logged_in")
        await faxd.wait_event("ws.subscribed")
        start = len(faxd.lines)
        fax_id = sim.create_outbound_fax(None, [RecipientScript("+16505550100", after=3600)])
        await faxd.wait_event("ws.hint_queued", start)
        signalled = time.monotonic()
        faxd.signal(signal.SIGTERM)
        assert await faxd.wait() == 0
        took = time.monotonic() - signalled
    assert took < STOP_WITHIN
    events = faxd.events
    assert events.index("daemon.stopping") < events.index("daemon.stopped")
    store = Store(short_dir / "faxd.db")
    store.open()
    try:
        history = store.history(fax_id)
    finally:
        store.close()
    assert history, "the fax faxd had heard of must be journalled before exit"
    assert history[-1].transition.to_status == "Queued"


@pytest.mark.parametrize("waiting_for", ["429 penalty", "spent budget", "slow request"])
async def test_sigterm_while_waiting_exits_0_within_5_s_and_a_restart_catches_up(
    sim: Simulator, short_dir: Path, waiting_for: str
) -> None:
    """SIGTERM while the reconcile of a pushed change waits for RingCentral (a 429 penalty, its own
    Light share spent, a request that takes long): exit 0 within 5 s; the next start reports the
    change, once."""
    reconcile: dict[str, Any] = {"debounce": 0.2, "max_delay": 1}
    logging = {"format": "json", "level": "debug"}
    if waiting_for == "spent budget":
        # A Light group of 2 a minute: faxd's share of it (80 %) is spent by the start-up sync.
        sim.config.rate_limits["Light"] = (2, 60, 60)
    config = write_config(short_dir, sim, reconcile=reconcile, logging=logging)
    notify = NotifySocket(short_dir / "notify")
    try:
        async with asyncio.timeout(45):
            async with daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
                await faxd.wait_event("ws.subscribed")
                start = len(faxd.lines)
                if waiting_for == "429 penalty":
                    sim.rate_limit_storm("Light", 600)
                elif waiting_for == "slow request":
                    sim.delay_next_requests(1, 20)
                fax_id = sim.create_outbound_fax(None, [RecipientScript("+16505550100", after=3600)])
                await faxd.wait_event("ws.hint_queued", start)
                if waiting_for == "429 penalty":
                    await faxd.wait_event("api.rate_limited", start)
                if waiting_for != "slow request":
                    # The scheduler holds the hinted reconcile back for the budget (or the penalty), and
                    # STATUS= says so (refreshed at least every 5 s).
                    await faxd.wait_event("sched.budget_limited", start)
                    limited = await notify.wait_for(lambda m: "rate-limited: Light" in (status_of(m) or ""))
                    assert re.search(r"; rate-limited: Light, next slot in \d+ s", status_of(limited) or "")
                # A slow request: the reconcile's request is held by the server, sent now or by the drain.
                signalled = time.monotonic()
                faxd.signal(signal.SIGTERM)
                assert await faxd.wait() == 0
                took = time.monotonic() - signalled
            assert took < STOP_WITHIN, f"stop took {took:.1f} s"
            assert "daemon.stopped" in faxd.events
            if waiting_for == "slow request":
                assert "daemon.drain_timeout" in faxd.events  # the drain deadline cut the request off
            else:
                # Not sent rather than waited for: the drain ends at once, well within its deadline.
                assert "sched.closed" in faxd.events
                assert "daemon.drain_timeout" not in faxd.events
                assert _history(short_dir, fax_id) == [], "nothing may be journalled without an answer"

            sim.limiter.reset()
            config = write_config(short_dir, sim, reconcile={"debounce": 0.2}, logging=logging)
            async with daemon(config) as faxd:
                await faxd.wait_line(lambda line: line.get("event") == "reconcile.done")
                faxd.signal(signal.SIGTERM)
                assert await faxd.wait() == 0
    finally:
        notify.close()
    history = _history(short_dir, fax_id)
    assert [e.transition.to_status for e in history if e.transition.recipient_index is None] == ["Queued"]
    transitions = [e.transition for e in history]
    assert len(set(transitions)) == len(transitions), "a transition journalled twice"


def _history(workdir: Path, fax_id: str) -> list[Any]:
    store = Store(workdir / "faxd.db")
    store.open()
    try:
        return list(store.history(fax_id))
    finally:
        store.close()


# ---------------------------------------------------------------------------------------- the unit


def _unit_copy(tmp: Path) -> list[Path]:
    """The units with ExecStart pointing at an interpreter that exists (verify checks the binary)."""
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=/opt/faxd/bin/faxd run", text, re.M)
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m faxd", text, flags=re.M)
    (tmp / "faxd.service").write_text(text)
    shutil.copy(SOCKET_UNIT, tmp / "faxd.socket")
    return [tmp / "faxd.socket", tmp / "faxd.service"]


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_the_required_settings() -> None:
    s = _unit_settings()
    assert s["Type"] == ["notify"]
    assert s["RestartSec"] == ["30s"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    stop = float(s["TimeoutStopSec"][0].removesuffix("s"))
    assert stop > DRAIN_DEADLINE + 5, "systemd must not kill faxd while it drains"
    assert "PrivateUsers" not in s, "PrivateUsers= breaks SO_PEERCRED"
    assert "ProcSubset" not in s, "ProcSubset=pid hides /proc/stat and every process_* metric"
    assert any(v.startswith("ringcentral-jwt:") for v in s["LoadCredentialEncrypted"])
    assert "WatchdogSec" in s


def test_unit_verifies_clean_and_scores_at_most_2(tmp_path: Path) -> None:
    require_tool("systemd-analyze")
    units = _unit_copy(tmp_path)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    ours = [ln for ln in verify.stderr.splitlines() if str(tmp_path) in ln]
    assert not ours, f"verify warnings about our units: {ours}"
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(units[1])],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for faxd\.service: (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match[1]) <= 2.0
    assert security.returncode == 0


# ---------------------------------------------------------------------------------------- one socket path

TMPFILES = ROOT / "systemd" / "tmpfiles.d" / "faxd.conf"
SYSUSERS = ROOT / "systemd" / "sysusers.d" / "faxd.conf"


def _settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_one_default_socket_path_everywhere() -> None:
    """The code default, the shipped config, faxd.socket, the directory the units prepare, and the
    docs all name the same socket."""
    path = EventsConfig().socket
    assert path == DEFAULT_EVENT_SOCKET
    assert yaml.safe_load((ROOT / "config.yaml").read_text())["events"]["socket"] == path
    assert _settings(SOCKET_UNIT)["ListenStream"] == [path]
    directory = os.path.dirname(path)
    tmpfiles = [line.split() for line in TMPFILES.read_text().splitlines() if line and line[0] != "#"]
    assert tmpfiles == [["d", directory, "3770", "root", "faxd-clients", "-"]]
    service = _settings(UNIT)
    assert "RuntimeDirectory" not in service, "systemd would chown it and delete it with the socket in it"
    assert service["ReadWritePaths"] == [f"-{directory}"]
    assert service["SupplementaryGroups"] == ["faxd-clients"]
    assert any(line.split()[:2] == ["g", "faxd-clients"] for line in SYSUSERS.read_text().splitlines())
    socket_doc = (ROOT / "docs" / "socket-protocol.md").read_text()
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert f"default `{path}`" in socket_doc
    assert path in operations
    for text in (socket_doc, operations, (ROOT / "config.yaml").read_text(), SOCKET_UNIT.read_text()):
        assert "/run/faxd.sock" not in text, "the old socket path"


def test_check_config_looks_for_credentials_where_the_unit_loads_them() -> None:
    for value in _unit_settings()["LoadCredentialEncrypted"]:
        name, _, path = value.partition(":")
        assert credentials.unit_files(name)[0] == credentials.CredentialFile("LoadCredentialEncrypted", path)


def test_tmpfiles_and_sysusers_prepare_the_socket_directory(tmp_path: Path) -> None:
    """What boot does, into a scratch root: the group, then /run/faxd as root:faxd-clients 3770."""
    require_tool("systemd-sysusers", "systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", tmp_path / "etc" / name)
    for tool, config in (("systemd-sysusers", SYSUSERS), ("systemd-tmpfiles", TMPFILES)):
        args = [
            tool,
            f"--root={tmp_path}",
            *(["--create"] if tool == "systemd-tmpfiles" else []),
            str(config),
        ]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    gid = next(
        int(line.split(":")[2])
        for line in (tmp_path / "etc" / "group").read_text().splitlines()
        if line.startswith("faxd-clients:")
    )
    st = (tmp_path / "run" / "faxd").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o3770, 0, gid)


# ---------------------------------------------------------------------------------------- events.group


_PR_CAPBSET_DROP, _CAP_CHOWN = 24, 0  # <linux/prctl.h>, <linux/capability.h>


def _without_cap_chown() -> None:
    """preexec_fn: root without CAP_CHOWN after exec, so the kernel's ordinary rule applies: the
    owner may give a file only to a group it is in (as the unit's dynamic user, which has no
    capabilities)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_CAPBSET_DROP, _CAP_CHOWN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_CHOWN)")


def _group_cases() -> tuple[dict[str, Any], grp.struct_group, grp.struct_group] | None:
    """(how to spawn faxd, a group it is in, a group it is not in), or None if this host has no two
    such groups. As root faxd runs without CAP_CHOWN and with one supplementary group, like the
    unit's dynamic user with SupplementaryGroups=."""
    if os.geteuid() == 0:
        others = [g for g in grp.getgrall() if g.gr_gid != 0]
        if len(others) < 2:
            return None
        member, stranger = others[0], others[1]
        return {"extra_groups": [member.gr_gid], "preexec_fn": _without_cap_chown}, member, stranger
    mine = set(os.getgroups()) - {os.getegid()}
    member_g = next((g for g in grp.getgrall() if g.gr_gid in mine), None)
    stranger_g = next((g for g in grp.getgrall() if g.gr_gid not in os.getgroups() and g.gr_gid), None)
    if member_g is None or stranger_g is None:
        return None
    return {}, member_g, stranger_g


GROUP_CASES = _group_cases()
needs_groups = pytest.mark.skipif(GROUP_CASES is None, reason="needs two groups besides root's")


def _group_config(workdir: Path, group: str | None) -> Path:
    data = {
        "ringcentral": {
            "server": "http://127.0.0.1:1",  # nothing listens: faxd retries, the socket is up meanwhile
            "client_id": "app",
            "client_secret": {"env": "FAXD_TEST_SECRET"},
            "jwt": {"env": "FAXD_TEST_JWT"},
        },
        "store": {"path": "faxd.db"},
        "events": {"socket": "events.sock", "group": group},
        "metrics": {"listen": None},
        "logging": {"format": "json"},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _spawn(config: Path, spawn: dict[str, Any]) -> Daemon:
    env = {**os.environ, "FAXD_TEST_SECRET": "s", "FAXD_TEST_JWT": "j", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = await asyncio.create_subprocess_exec(
        *FAXD, "run", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, **spawn,
    )  # fmt: skip
    return Daemon(proc)


@needs_groups
async def test_events_group_of_a_group_faxd_is_in(short_dir: Path) -> None:
    assert GROUP_CASES is not None
    spawn, member, _ = GROUP_CASES
    faxd = await _spawn(_group_config(short_dir, member.gr_name), spawn)
    try:
        async with asyncio.timeout(30):
            await faxd.wait_event("socket.listening")
            st = (short_dir / "events.sock").stat()
            faxd.signal(signal.SIGTERM)
            assert await faxd.wait() == 0
    finally:
        if faxd.proc.returncode is None:
            faxd.proc.kill()
            await faxd.wait()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (member.gr_gid, 0o660)


@needs_groups
async def test_events_group_of_a_group_faxd_is_not_in_is_a_clear_error(short_dir: Path) -> None:
    assert GROUP_CASES is not None
    spawn, _, stranger = GROUP_CASES
    faxd = await _spawn(_group_config(short_dir, stranger.gr_name), spawn)
    async with asyncio.timeout(30):
        assert await faxd.wait() == 78
    (line,) = [line for line in faxd.lines if line.get("event") == "daemon.cannot_run"]
    uid = os.geteuid()
    assert line["reason"] == (
        f"events.group: cannot give the event socket {short_dir / 'events.sock'} to group "
        f"{stranger.gr_name}: faxd (uid {uid}) is not a member of it. Under systemd add "
        f"SupplementaryGroups={stranger.gr_name} to faxd.service (systemctl edit faxd), or let "
        "faxd.socket create the socket (SocketGroup=)"
    )
    assert not (short_dir / "events.sock").exists(), "the half-made socket is removed"


async def test_events_group_that_does_not_exist_is_a_clear_error(short_dir: Path) -> None:
    faxd = await _spawn(_group_config(short_dir, "no-such-faxd-group"), {})
    async with asyncio.timeout(30):
        assert await faxd.wait() == 78
    assert any(
        line.get("reason") == "events.group: there is no group named 'no-such-faxd-group' on this system"
        for line in faxd.lines
    ), faxd.raw[-5:]


async def test_status_names_extensions_ringcentral_does_not_know(sim: Simulator, short_dir: Path) -> None:
    """A mistyped (or deleted) extension: RingCentral answers 404 CMN-102 extensionId. STATUS= says so,
    faxd keeps running and the other extension is tracked."""
    config = write_config(short_dir, sim, ringcentral={"extensions": ["~", "299999999"]})
    notify = NotifySocket(short_dir / "notify")
    try:
        async with asyncio.timeout(30), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
            line = await notify.wait_for(
                lambda m: "1 configured extension(s) not found by RingCentral" in (status_of(m) or "")
            )
            faxd.signal(signal.SIGTERM)
            assert await faxd.wait() == 0
    finally:
        notify.close()
    assert (status_of(line) or "").startswith("WebSocket ")
    refused = [r for r in sim.requests_to("/message-sync") if "/extension/299999999/" in r.raw_path]
    assert refused
    assert {r.status for r in refused} == {404}
    assert any(
        r.status == 200 and "/extension/200000001/" in r.raw_path for r in sim.requests_to("/message-sync")
    )
