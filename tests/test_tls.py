"""TLS: one verified context for REST and WS, with an optional ``ca_file``. The simulator serves HTTPS and
WSS with a certificate from a trustme CA: the right CA works end to end, a wrong CA or a certificate for
another host name is refused."""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from ops_support import NotifySocket, daemon, write_config, ws_up

from faxd.daemon import ssl_context
from faxd.sim import SimConfig, Simulator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def https_sim(ca: trustme.CA, hostname: str) -> AsyncIterator[Simulator]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(server)
    async with Simulator(SimConfig(seed=7), ssl_context=server) as sim:
        yield sim


@pytest.fixture
async def sim_127(ca: trustme.CA) -> AsyncIterator[Simulator]:
    """HTTPS on 127.0.0.1 with a certificate for 127.0.0.1 (what the URLs say)."""
    async for sim in https_sim(ca, "127.0.0.1"):
        yield sim


@pytest.fixture
async def sim_other_name(ca: trustme.CA) -> AsyncIterator[Simulator]:
    """HTTPS on 127.0.0.1 with a certificate for another name."""
    async for sim in https_sim(ca, "faxd.example"):
        yield sim


async def test_the_context_verifies_and_needs_tls_1_2() -> None:
    ctx = ssl_context(None)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_the_right_ca_works_for_rest_and_websocket(
    sim_127: Simulator, ca: trustme.CA, short_dir: Path
) -> None:
    assert sim_127.url.startswith("https://")
    ca.cert_pem.write_to_path(str(short_dir / "ca.pem"))
    config = write_config(short_dir, sim_127, ringcentral={"ca_file": "ca.pem"})
    notify = NotifySocket(short_dir / "notify")
    try:
        async with asyncio.timeout(30), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
            await notify.wait_for(ws_up)  # REST login, message-sync, then WSS subscribed
            faxd.signal(signal.SIGTERM)
            assert await faxd.wait() == 0
    finally:
        notify.close()
    assert sim_127.requests_to("/ws"), "the WebSocket went over TLS too"


async def _refused(sim: Simulator, short_dir: Path, ca_file: Path | None) -> None:
    ringcentral = {"ca_file": ca_file.name} if ca_file else {}
    config = write_config(short_dir, sim, ringcentral=ringcentral)
    async with asyncio.timeout(30), daemon(config) as faxd:
        failed = await faxd.wait_event("auth.login_failed")
        assert failed["code"] == "connection"
        assert await faxd.stop() == 0
    assert not sim.requests, "nothing may reach a server that failed verification"


async def test_a_wrong_ca_is_refused(sim_127: Simulator, short_dir: Path) -> None:
    trustme.CA().cert_pem.write_to_path(str(short_dir / "other-ca.pem"))
    await _refused(sim_127, short_dir, short_dir / "other-ca.pem")


async def test_system_trust_does_not_cover_a_private_ca(sim_127: Simulator, short_dir: Path) -> None:
    await _refused(sim_127, short_dir, None)


async def test_a_certificate_for_another_host_is_refused(
    sim_other_name: Simulator, ca: trustme.CA, short_dir: Path
) -> None:
    ca.cert_pem.write_to_path(str(short_dir / "ca.pem"))
    await _refused(sim_other_name, short_dir, short_dir / "ca.pem")


async def test_nothing_turns_verification_off() -> None:
    pattern = re.compile(r"ssl\s*=\s*False|verify_ssl\s*=\s*False|CERT_NONE|check_hostname\s*=\s*False")
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "faxd").rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert not offenders
