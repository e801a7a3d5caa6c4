"""The client commands as a user runs them: ``python -m faxd watch|status|history|send --socket PATH``
in a subprocess, against the real daemon (in this process) and the simulator.

Output and exit codes are what is checked: 0 success, 1 a failure faxd reported (a fax that failed, a
lost connection), 2 faxd unreachable. Simulator magic numbers (docs/simulator.md): …0001 ends
``SendingFailed``/``LineBusy``, …0004 is ``Sent`` then ``Delivered``, anything else ``Sent``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import RunningDaemon
from ops_support import run_faxd

from faxd.sim import SimConfig
from faxd.sim.store import TINY_PDF

TIMEOUT = 30
REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXD_", "PYTHON"))}
    env["PYTHONPATH"] = str(REPO)
    return env


async def faxd(*args: str) -> tuple[int, str, str]:
    """Run ``python -m faxd ARGS``; (exit code, stdout, stderr)."""
    return await run_faxd(*args, env=_env(), within=TIMEOUT)


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=3, default_delay=(0.2, 0.6))


@pytest.fixture
def pdf(short_dir: Path) -> str:
    path = short_dir / "report.pdf"
    path.write_bytes(TINY_PDF)
    return str(path)


async def test_send_wait_success_then_status_and_history(running: RunningDaemon, pdf: str) -> None:
    """send --wait exits 0 when every recipient succeeds; status and history show the fax."""
    code, out, err = await faxd(
        "send", "--socket", running.socket, "--to", "+16505550100", "--to", "+16505550004",
        "--ref", "cli-ok", "--resolution", "High", "--wait", pdf,
    )  # fmt: skip
    assert code == 0, err
    fax_id = out.strip()
    assert fax_id.isdigit(), out
    progress = err.splitlines()
    assert progress, "send --wait prints progress on stderr"
    assert all(f"fax {fax_id}" in line for line in progress), err
    assert any("recipient 0 +16505550100" in line and "→ Sent" in line for line in progress), err
    assert not any(line.startswith("faxd send:") for line in progress), err

    code, out, err = await faxd("status", "--socket", running.socket, fax_id)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"fax {fax_id}  Outbound  ")
    assert "  ref        cli-ok" in lines
    assert any(line.startswith("  #0  +16505550100") and "Sent" in line for line in lines), out
    assert any(line.startswith("  #1  +16505550004") for line in lines), out

    code, out, err = await faxd("status", "--socket", running.socket, "--ref", "cli-ok", "--json")
    assert (code, err) == (0, "")
    fax = json.loads(out)
    assert (fax["fax_id"], fax["ref"]) == (fax_id, "cli-ok")

    code, out, err = await faxd("history", "--socket", running.socket, fax_id, "--json")
    assert (code, err) == (0, "")
    events = [json.loads(line) for line in out.splitlines()]
    assert events, out
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert {e["fax_id"] for e in events} == {fax_id}
    assert all(e["ref"] == "cli-ok" for e in events)
    assert events[0]["source"] == "send"

    code, out, err = await faxd("history", "--socket", running.socket, fax_id)
    assert (code, err) == (0, "")
    assert len(out.splitlines()) == len(events)
    assert all(f"fax {fax_id}" in line and "ref=cli-ok" in line for line in out.splitlines())


async def test_send_wait_failure_exits_1_with_the_reason(running: RunningDaemon, pdf: str) -> None:
    code, out, err = await faxd(
        "send", "--socket", running.socket, "--to", "+16505550100", "--to", "+16505550001", "--wait", pdf
    )
    assert code == 1, err
    fax_id = out.strip()
    assert fax_id.isdigit(), out
    last = err.splitlines()[-1]
    assert last == f"faxd send: fax {fax_id} recipient 1 +16505550001 SendingFailed: LineBusy", err
    # Only the failed recipient is named as a failure.
    assert sum(line.startswith("faxd send:") for line in err.splitlines()) == 1

    code, out, err = await faxd("status", "--socket", running.socket)  # nothing left in flight
    assert (code, out, err) == (0, "no faxes in flight\n", "")


async def test_send_errors_are_one_line(running: RunningDaemon, pdf: str, short_dir: Path) -> None:
    # RingCentral refuses the number: upstream, with its code.
    code, out, err = await faxd("send", "--socket", running.socket, "--to", "12", pdf)
    assert (code, out) == (1, "")
    assert err.startswith("faxd send: send failed: upstream: ")
    assert err.endswith("(CMN-101)\n")
    assert err.count("\n") == 1
    # A file that cannot be read never reaches the daemon.
    code, out, err = await faxd("send", "--socket", running.socket, "--to", "+16505550100", "nope.pdf")
    assert (code, out) == (2, "")
    assert err == "faxd send: cannot read nope.pdf: No such file or directory\n"
    # A cover text with no cover page (send.cover_index 0 and no --cover-index) would be lost.
    code, out, err = await faxd(
        "send", "--socket", running.socket, "--to", "+16505550100", "--cover-text", "x", pdf
    )
    assert (code, out) == (1, "")
    assert err.startswith("faxd send: send failed: bad_request: cover_text is printed on a cover page")
    # No document: argparse refuses before anything is sent.
    code, out, err = await faxd("send", "--socket", running.socket, "--to", "+16505550100")
    assert (code, out) == (2, "")
    assert "the following arguments are required: files" in err
    # Unknown fax.
    code, out, err = await faxd("status", "--socket", running.socket, "999")
    assert (code, out, err) == (1, "", "faxd status: not_found: no fax 999\n")


async def test_watch_follows_live_and_reports_the_shutdown(running: RunningDaemon, pdf: str) -> None:
    """watch prints replayed and live events (NDJSON or aligned lines) until the daemon stops; then it
    exits 1 with the seq to resume after."""
    env = _env()
    spawn = [sys.executable, "-m", "faxd", "watch", "--socket", running.socket]
    as_json = await asyncio.create_subprocess_exec(
        *spawn, "--json", "--after-seq", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO,
    )  # fmt: skip
    readable = await asyncio.create_subprocess_exec(
        *spawn, "--ref", "watched", "--after-seq", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        code, out, err = await faxd(
            "send", "--socket", running.socket, "--to", "+16505550001", "--ref", "watched", "--wait", pdf
        )
        assert code == 1, err
        fax_id = out.strip()
        assert readable.stdout is not None
        assert as_json.stdout is not None
        events: list[dict[str, object]] = []
        async with asyncio.timeout(TIMEOUT):
            while not any(e["fax_id"] == fax_id and e["kind"] == "status" and e["final"] for e in events):
                events.append(json.loads(await as_json.stdout.readline()))
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert all(e["type"] == "event" for e in events)
        lines: list[str] = []
        async with asyncio.timeout(TIMEOUT):
            while not any("outbound fax" in line and " final" in line for line in lines):
                lines.append((await readable.stdout.readline()).decode().rstrip("\n"))

        running.stop.set()
        async with asyncio.timeout(20):
            assert await running.task == 0
            json_rest, json_err = await as_json.communicate()
            text_rest, text_err = await readable.communicate()
        assert as_json.returncode == 1
        events.extend(json.loads(line) for line in json_rest.splitlines())  # printed before the bye
        last_seq = events[-1]["seq"]
        assert json_err.decode() == (
            f"faxd watch: faxd closed the connection (shutdown); resume with --after-seq {last_seq}\n"
        )
        lines.extend(text_rest.decode().splitlines())
        text = "\n".join(lines)
        assert len(lines) == sum(e["ref"] == "watched" for e in events), text
        assert any("→ Queued" in line for line in lines), text  # the send's own events
        assert all(f"fax {fax_id}" in line and "ref=watched" in line for line in lines), text
        assert any("LineBusy (busy, retryable)" in line and "final" in line for line in lines), text
        assert len({line.index("→") for line in lines}) == 1, "the transition column is aligned"
        assert readable.returncode == 1
        assert "faxd closed the connection (shutdown)" in text_err.decode()
    finally:
        for proc in (as_json, readable):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_daemon_not_running_is_one_line_and_exit_2(short_dir: Path) -> None:
    missing = str(short_dir / "missing.sock")
    dead = str(short_dir / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(dead)  # bound, never listening: what a crashed daemon leaves behind
        cases = [
            (["status"], missing, f"no socket at {missing}"),
            (["watch", "--json"], dead, f"nothing listens on {dead}"),
            (["history", "1"], dead, f"nothing listens on {dead}"),
        ]
        for command, path, why in cases:
            result = subprocess.run(
                [sys.executable, "-m", "faxd", *command, "--socket", path],
                capture_output=True, text=True, env=_env(), cwd=REPO, timeout=TIMEOUT, check=False,
            )  # fmt: skip
            assert result.returncode == 2, result
            assert result.stdout == ""
            assert result.stderr == f"faxd {command[0]}: faxd is not running ({why})\n"


# ------------------------------------------------------------------------- where the clients find the socket


async def client(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m faxd ARGS`` in a shell's environment: no $CREDENTIALS_DIRECTORY, no FAXD_* unless given."""
    base = {k: v for k, v in _env().items() if k != "CREDENTIALS_DIRECTORY"}
    return await run_faxd(*args, env={**base, **(env or {})}, within=TIMEOUT)


def daemon_style_config(path: Path, socket_path: str, **extra: object) -> Path:
    """The production shape: secrets are {credential:} (readable only inside the unit), a custom socket."""
    path.write_text(
        json.dumps(
            {
                "ringcentral": {
                    "client_id": "app",
                    "client_secret": {"credential": "ringcentral-client-secret"},
                    "jwt": {"credential": "ringcentral-jwt"},
                },
                "events": {"socket": socket_path},
                **extra,
            }
        )
    )
    return path


async def test_clients_read_the_socket_from_a_config_whose_secrets_they_cannot_read(
    running: RunningDaemon, short_dir: Path
) -> None:
    config = daemon_style_config(short_dir / "config.yaml", running.socket, websocket={"ping_interval": "x"})
    code, out, err = await client("status", "-c", str(config))
    assert (code, out, err) == (0, "no faxes in flight\n", "")
    code, out, err = await client("history", "-c", str(config), "999")  # answered by the daemon
    assert (code, out, err) == (1, "", "faxd history: not_found: no fax 999\n")
    code, out, err = await client("status", env={"FAXD_CONFIG": str(config)})
    assert (code, out, err) == (0, "no faxes in flight\n", "")


async def test_faxd_socket_overrides_the_config_and_socket_overrides_both(
    running: RunningDaemon, short_dir: Path
) -> None:
    nowhere = str(short_dir / "nowhere.sock")
    config = daemon_style_config(short_dir / "config.yaml", nowhere)
    code, _, err = await client("status", "-c", str(config))
    assert (code, err) == (2, f"faxd status: faxd is not running (no socket at {nowhere})\n")
    code, out, err = await client("status", "-c", str(config), env={"FAXD_SOCKET": running.socket})
    assert (code, out, err) == (0, "no faxes in flight\n", "")
    code, out, err = await client(
        "status", "-c", str(config), "--socket", running.socket, env={"FAXD_SOCKET": nowhere}
    )
    assert (code, out, err) == (0, "no faxes in flight\n", "")
    # Neither needs a config at all, not even a readable one.
    missing = str(short_dir / "missing.yaml")
    code, out, err = await client("status", "-c", missing, env={"FAXD_SOCKET": running.socket})
    assert (code, out, err) == (0, "no faxes in flight\n", "")


async def test_a_config_the_client_cannot_use_is_an_error_not_a_default(short_dir: Path) -> None:
    missing = short_dir / "missing.yaml"
    code, out, err = await client("status", "-c", str(missing))
    assert (code, out) == (78, "")
    assert err == (
        f"faxd status: cannot take the event socket from {missing}:\n"
        f"  {missing}: cannot read the config file: No such file or directory\n"
        "fix the config or name the event socket with --socket PATH or $FAXD_SOCKET\n"
    )
    bad = daemon_style_config(short_dir / "bad.yaml", "x.sock", events={"socket": "x.sock", "mode": 660})
    code, out, err = await client("watch", env={"FAXD_CONFIG": str(bad)})
    assert (code, out) == (78, "")
    assert err.splitlines()[1] == '  events.mode: expected an octal mode string like "0660" (quoted), got 660'


@pytest.mark.skipif(
    os.path.lexists("/etc/faxd/config.yaml"), reason="this machine has an /etc/faxd/config.yaml"
)
async def test_without_any_config_the_client_uses_the_default_socket() -> None:
    code, _, err = await client("status")
    assert (code, err) == (2, "faxd status: faxd is not running (no socket at /run/faxd/events.sock)\n")
