"""The `running` fixture: faxd's daemon.run() in the test's own event loop, ready to serve.

Registered for every test by conftest.py; test modules import :class:`RunningDaemon` for types, and
:func:`started` to run a daemon with a config of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from faxd import daemon
from faxd.config import Config
from faxd.sim import Simulator


@dataclass
class RunningDaemon:
    config: Config
    registry: CollectorRegistry
    stop: asyncio.Event
    task: asyncio.Task[int]

    @property
    def socket(self) -> str:
        return self.config.events.socket


@contextlib.asynccontextmanager
async def started(config: Config) -> AsyncIterator[RunningDaemon]:
    """``daemon.run(config)`` until the block ends; it must be ready first and exit 0 at the end."""
    registry = CollectorRegistry()
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(config, registry=registry, stop=stop, on_ready=ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        raise AssertionError(f"daemon did not start: exit {task.result()}")
    try:
        yield RunningDaemon(config, registry, stop, task)
    finally:
        stop.set()
        async with asyncio.timeout(20):
            assert await task == 0


@pytest.fixture
async def running(sim: Simulator, make_config: Callable[..., Config]) -> AsyncIterator[RunningDaemon]:
    """The daemon against ``sim`` with ``make_config``'s defaults; it must exit 0 at teardown."""
    async with started(make_config(sim)) as faxd:
        yield faxd
