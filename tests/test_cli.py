"""The ``faxd`` command as people run it: real subprocesses, real exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import yaml

from faxd.sim import Simulator

FAXD = [sys.executable, "-m", "faxd"]


async def faxd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *FAXD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(path: Path, sim_url: str, workdir: Path, **extra: object) -> None:
    for name, value in (("client_secret", "faxd-sim-secret"), ("jwt", "faxd-sim-jwt")):
        (workdir / name).write_text(value)
        os.chmod(workdir / name, 0o600)
    data = {
        "ringcentral": {
            "server": sim_url,
            "client_id": "faxd-sim-client",
            "client_secret": {"file": "client_secret"},
            "jwt": {"file": "jwt"},
        },
        "store": {"path": "faxd.db"},
        "events": {"socket": "events.sock"},
        "metrics": {"listen": None},
        "logging": {"format": "json"},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))


async def test_check_config_accepts_a_good_file_and_masks_secrets(short_dir: Path) -> None:
    write_config(short_dir / "config.yaml", "http://127.0.0.1:1", short_dir)
    code, out, err = await faxd("check-config", "-c", str(short_dir / "config.yaml"))
    assert code == 0, err
    assert "faxd-sim-secret" not in out
    assert "faxd-sim-jwt" not in out
    assert "client_secret" in out


async def test_check_config_names_every_bad_key_and_exits_78(short_dir: Path) -> None:
    write_config(
        short_dir / "config.yaml",
        "http://127.0.0.1:1",
        short_dir,
        reconcile={"debounce": "fast"},
        bogus={"x": 1},
    )
    os.chmod(short_dir / "jwt", 0o644)
    code, _, err = await faxd("check-config", "-c", str(short_dir / "config.yaml"))
    assert code == 78
    assert "reconcile.debounce" in err
    assert "bogus" in err
    assert "ringcentral.jwt" in err
    assert "faxd-sim-jwt" not in err


async def test_missing_config_file_exits_78(short_dir: Path) -> None:
    code, _, err = await faxd("check-config", "-c", str(short_dir / "nope.yaml"))
    assert code == 78
    assert "nope.yaml" in err


async def test_sigterm_stops_the_daemon_in_order_with_exit_0(sim: Simulator, short_dir: Path) -> None:
    write_config(short_dir / "config.yaml", sim.url, short_dir)
    proc = await asyncio.create_subprocess_exec(
        *FAXD,
        "run",
        "-c",
        str(short_dir / "config.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[dict[str, object]] = []
    async with asyncio.timeout(30):
        # SIGTERM once it has logged in to RingCentral, so there is a session to close.
        while not lines or lines[-1]["event"] != "logged in to RingCentral":
            line = await proc.stdout.readline()
            assert line, "faxd exited early"
            lines.append(json.loads(line))
        proc.send_signal(signal.SIGTERM)
        rest, _ = await proc.communicate()
    lines.extend(json.loads(x) for x in rest.decode().splitlines() if x.strip())
    assert proc.returncode == 0
    events = [str(line["event"]) for line in lines]
    assert events.index("faxd started") < events.index("faxd stopped")
    assert not (short_dir / "events.sock").exists(), "the socket file must be unlinked on exit"
    for line in lines:
        assert "faxd-sim-jwt" not in json.dumps(line)


async def test_simulate_takes_its_own_options_and_serves(short_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        *FAXD,
        "simulate",
        "--listen",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        first = await proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first.decode()
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/_sim/info") as r:
            info = await r.json()
        proc.send_signal(signal.SIGINT)
        await proc.communicate()
    assert info["extensions"] == ["200000001"]
    assert proc.returncode == 0


async def test_demo_shows_every_kind_of_outcome_and_exits_0() -> None:
    code, out, err = await faxd("demo", "--timeout", "45")
    assert code == 0, err
    assert "all faxes final; the daemon stopped cleanly." in out
    lines = out.splitlines()
    # Each kind of outcome the demo promises, as a socket client printed it.
    assert any("Queued → Sent" in line and "final" in line for line in lines)
    assert any("SendingFailed" in line and "LineBusy (busy, retryable)" in line for line in lines)
    assert any("SendingFailed" in line and "NoAnswer" in line for line in lines)
    assert any("Sent → Delivered" in line for line in lines)
    assert any("inbound fax" in line and "Received" in line for line in lines)
    seqs = [int(word[1:]) for line in lines for word in line.split() if word.startswith("#")]
    assert seqs == list(range(1, len(seqs) + 1)), "seq strictly increasing, no gaps"
