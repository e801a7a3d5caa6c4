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
import pytest
import yaml
from ops_support import run_faxd, shell_env

from faxd import testbed
from faxd.sim import Simulator

FAXD = [sys.executable, "-m", "faxd"]


async def faxd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return await run_faxd(*args, env={**os.environ, **(env or {})})


async def test_check_config_accepts_a_good_file_and_masks_secrets(short_dir: Path) -> None:
    testbed.write_config("http://127.0.0.1:1", short_dir, logging={"format": "json"})
    code, out, err = await faxd("check-config", "-c", str(short_dir / "config.yaml"))
    assert code == 0, err
    assert "faxd-sim-secret" not in out
    assert "faxd-sim-jwt" not in out
    assert "client_secret" in out


async def test_check_config_names_every_bad_key_and_exits_78(short_dir: Path) -> None:
    testbed.write_config(
        "http://127.0.0.1:1",
        short_dir,
        logging={"format": "json"},
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
    testbed.write_config(sim, short_dir, logging={"format": "json"})
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
        while not lines or lines[-1]["event"] != "upstream.logged_in":
            line = await proc.stdout.readline()
            assert line, "faxd exited early"
            lines.append(json.loads(line))
        proc.send_signal(signal.SIGTERM)
        rest, _ = await proc.communicate()
    lines.extend(json.loads(x) for x in rest.decode().splitlines() if x.strip())
    assert proc.returncode == 0
    events = [str(line["event"]) for line in lines]
    assert events.index("daemon.started") < events.index("daemon.stopped")
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


# ------------------------------------------------------------------- credentials from a shell, the clients

CREDENTIAL_CONFIG = {
    "ringcentral": {
        "server": "http://127.0.0.1:1",
        "client_id": "faxd-sim-client",
        "client_secret": {"credential": "ringcentral-client-secret"},
        "jwt": {"credential": "ringcentral-jwt"},
    },
    "store": {"path": "faxd.db"},
    "metrics": {"listen": None},
    "logging": {"format": "json"},
}


def no_credentials() -> dict[str, str]:
    return shell_env()


async def test_check_config_from_a_shell_defers_credentials_and_says_how_to_check_them(
    short_dir: Path,
) -> None:
    config = short_dir / "config.yaml"
    config.write_text(yaml.safe_dump(CREDENTIAL_CONFIG))
    code, out, err = await run_faxd("check-config", "-c", str(config), env=no_credentials())
    assert code == 0, err
    assert yaml.safe_load(out)["ringcentral"]["jwt"] == {"credential": "ringcentral-jwt"}
    lines = err.splitlines()
    assert lines[0] == "faxd check-config: the config is valid, but these credentials were not checked:"
    assert lines[1].startswith("  ringcentral.client_secret: {credential: ringcentral-client-secret}: ")
    assert lines[2].startswith("  ringcentral.jwt: {credential: ringcentral-jwt}: ")
    assert "LoadCredentialEncrypted= needs systemd >= 250" in err
    command = lines[-1].strip()
    assert command.startswith("systemd-run --quiet --pipe --wait --collect -p DynamicUser=yes ")
    assert f"check-config -c {config}" in command
    for name in ("ringcentral-jwt", "ringcentral-client-secret"):
        assert f"-p LoadCredentialEncrypted={name}:/etc/credstore.encrypted/faxd.{name} " in command


async def test_check_config_from_a_shell_still_fails_on_everything_else(short_dir: Path) -> None:
    data = {**CREDENTIAL_CONFIG, "reconcile": {"debounce": "fast"}}
    data["ringcentral"] = {**CREDENTIAL_CONFIG["ringcentral"], "server": "http://rc.example.com"}
    (short_dir / "config.yaml").write_text(yaml.safe_dump(data))
    code, out, err = await run_faxd(
        "check-config", "-c", str(short_dir / "config.yaml"), env=no_credentials()
    )
    assert (code, out) == (78, "")
    assert "reconcile.debounce" in err
    assert "ringcentral.server: plain http:// would send the client secret and the JWT in clear text" in err
    assert "ringcentral.jwt" not in err, "a credential that cannot be read from a shell is not a problem"


async def test_check_config_under_the_units_credentials_checks_them(short_dir: Path) -> None:
    """What the systemd-run command does: $CREDENTIALS_DIRECTORY is set, and a missing one fails."""
    (short_dir / "creds").mkdir()
    (short_dir / "creds" / "ringcentral-jwt").write_text("jwt")
    (short_dir / "config.yaml").write_text(yaml.safe_dump(CREDENTIAL_CONFIG))
    env = {**no_credentials(), "CREDENTIALS_DIRECTORY": str(short_dir / "creds")}
    code, _, err = await run_faxd("check-config", "-c", str(short_dir / "config.yaml"), env=env)
    assert code == 78
    assert (
        f"ringcentral.client_secret: secret file {short_dir}/creds/ringcentral-client-secret does not" in err
    )
    (short_dir / "creds" / "ringcentral-client-secret").write_text("secret")
    code, _, err = await run_faxd("check-config", "-c", str(short_dir / "config.yaml"), env=env)
    assert (code, err) == (0, "")


async def test_run_without_its_credentials_still_exits_78(short_dir: Path) -> None:
    (short_dir / "config.yaml").write_text(yaml.safe_dump(CREDENTIAL_CONFIG))
    code, _, err = await run_faxd("run", "-c", str(short_dir / "config.yaml"), env=no_credentials())
    assert code == 78
    assert "ringcentral.jwt: {credential: ringcentral-jwt} needs $CREDENTIALS_DIRECTORY" in err
    assert not (short_dir / "faxd.db").exists(), "nothing starts on a config that failed"


async def test_store_commands_need_a_config_or_db_and_read_only_the_store_section(short_dir: Path) -> None:
    env = {**no_credentials(), "FAXD_CONFIG": str(short_dir / "absent.yaml")}
    code, out, err = await run_faxd("store", "backup", str(short_dir / "b.db"), env=env)
    assert (code, out) == (78, "")
    assert f"cannot take the store from {short_dir / 'absent.yaml'}" in err
    config = short_dir / "config.yaml"
    config.write_text(yaml.safe_dump({**CREDENTIAL_CONFIG, "websocket": {"ping_interval": "x"}}))
    code, out, err = await run_faxd("store", "backup", "-c", str(config), str(short_dir / "b.db"), env=env)
    assert (code, out) == (1, "")
    assert err == f"faxd store backup: no store at {short_dir / 'faxd.db'}\n"


@pytest.mark.skipif(
    os.path.lexists("/etc/faxd/config.yaml"), reason="this machine has an /etc/faxd/config.yaml"
)
async def test_store_commands_never_fall_back_to_a_default_store(short_dir: Path) -> None:
    code, out, err = await run_faxd("store", "restore", str(short_dir / "b.db"), env=no_credentials())
    assert (code, out) == (78, "")
    assert err == (
        "faxd store: there is no /etc/faxd/config.yaml: name the config with -c FILE"
        " or the store with --db PATH\n"
    )
