"""Shared fixtures: a running simulator, a config pointing the daemon at it, short socket paths."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import running  # noqa: F401 - the shared in-process daemon fixture
from fidelity.plugin import rc_spec_validation  # noqa: F401 - every simulator body is checked against the spec

from faxd import testbed
from faxd.config import Config
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


#: How the tests run an in-process daemon, beyond faxd.testbed's base: reconciles that do not wait long.
TEST_SECTIONS = {"reconcile": {"debounce": 0.05, "max_delay": 0.5}}


def daemon_config(sim: Simulator, workdir: Path, **sections: dict[str, Any]) -> Config:
    """A daemon config for ``sim``: secrets in 0600 files, state and socket in ``workdir``."""
    return testbed.load(sim, workdir, defaults=TEST_SECTIONS, **sections)
