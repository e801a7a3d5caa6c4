"""Shared fixtures: a running simulator, a config pointing the daemon at it, short socket paths."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import running  # noqa: F401 - the shared in-process daemon fixture
from fidelity.plugin import rc_spec_validation  # noqa: F401 - every simulator body is checked against the spec

from faxd.config import Config, parse_config
from faxd.sim import SimConfig, Simulator


@pytest.fixture(autouse=True, scope="module")
def _close_stray_event_loop() -> Iterator[None]:
    """Close the event loop that looptime's hook makes the policy create for plain (sync) tests.

    Left open, it is garbage-collected during some later async test, and its ResourceWarning fails that
    test under ``filterwarnings = error``.
    """
    yield
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:
            return
    if not loop.is_running():
        loop.close()
        policy.set_event_loop(None)


_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """faxd honours the proxy variables, as curl does: one set where the tests run must not send the
    daemons under test (in process or in a subprocess) through it. The proxy tests set their own."""
    for name in (*_PROXY_VARIABLES, "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX socket paths max out at about 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="faxd-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=7)


@pytest.fixture
async def sim(sim_config: SimConfig) -> AsyncIterator[Simulator]:
    async with Simulator(sim_config) as simulator:
        yield simulator


@pytest.fixture
def make_config(short_dir: Path) -> Callable[..., Config]:
    """``make_config(sim, **sections)``: a daemon config for ``sim`` living in ``short_dir``."""

    def make(sim: Simulator, **sections: dict[str, Any]) -> Config:
        return daemon_config(sim, short_dir, **sections)

    return make


def daemon_config(sim: Simulator, workdir: Path, **sections: dict[str, Any]) -> Config:
    """A daemon config for ``sim``: secrets in 0600 files, state and socket in ``workdir``."""
    cfg = sim.config
    for name, value in (("client_secret", cfg.client_secret), ("jwt", cfg.jwt)):
        path = workdir / name
        path.write_text(value)
        os.chmod(path, 0o600)
    data: dict[str, Any] = {
        "ringcentral": {
            "server": sim.url,
            "client_id": cfg.client_id,
            "client_secret": {"file": str(workdir / "client_secret")},
            "jwt": {"file": str(workdir / "jwt")},
        },
        "reconcile": {"debounce": 0.05, "max_delay": 0.5},
        "store": {"path": str(workdir / "faxd.db")},
        "events": {"socket": str(workdir / "events.sock")},
        "metrics": {"listen": None},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data, environ={}, base_dir=str(workdir))
