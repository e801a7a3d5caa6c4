"""Fixtures for the simulator tests: a started Simulator on port 0 and an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from fidelity.plugin import rc_spec_validation  # noqa: F401  (autouse: every body vs the spec)

from faxd.sim import SimConfig, Simulator


@pytest.fixture
def config() -> SimConfig:
    return SimConfig(seed=7)


@pytest.fixture
async def sim(config: SimConfig) -> AsyncIterator[Simulator]:
    async with Simulator(config) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
