"""WebSocket liveness when faxd's own event loop stalls: real time, the simulator on its own thread.

A stall of faxd's loop is not a dead path: the gateway answered, faxd just read the pong late. The
simulator runs in another thread (its own loop) so it keeps answering while this loop is blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
from test_ws_session import harness

from faxd.adapters.ws_session import WsSettings
from faxd.sim import SimConfig, Simulator

pytestmark = pytest.mark.looptime(False)

PONG_DELAY = 0.3


@contextlib.contextmanager
def simulator_on_a_thread() -> Iterator[Simulator]:
    started = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with Simulator(SimConfig(seed=5, default_delay=(1000.0, 1000.0))) as sim:
            sim.delay_pongs(PONG_DELAY, PONG_DELAY)
            box.update(sim=sim, loop=asyncio.get_running_loop(), stop=stop)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="simulator")
    thread.start()
    try:
        assert started.wait(30), "the simulator did not start"
        sim = box["sim"]
        assert isinstance(sim, Simulator)
        yield sim
    finally:
        loop, stop = box.get("loop"), box.get("stop")
        if isinstance(loop, asyncio.AbstractEventLoop) and isinstance(stop, asyncio.Event):
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)


async def test_a_stalled_event_loop_does_not_tear_down_a_live_connection() -> None:
    settings = WsSettings(ping_interval=1.0, ping_timeout_min=0.5, ping_timeout=10)
    with simulator_on_a_thread() as sim:
        async with harness(settings=settings, sim=sim) as h:
            await h.resync()
            # The estimate settles on the floor: a steady 0.3 s path, 0.5 s allowed for each pong.
            await h.until(lambda: h.sample("faxd_ws_ping_timeout_seconds") == 0.5, within=60)

            # Stall the loop for 1 s, 0.1 s apart. A ping due during a stall goes out as it ends,
            # so by the second or third stall one begins 0.1 s after a ping: its pong (0.3 s) and
            # its timer (0.5 s) both come due during the stall and are ready in the same loop
            # turn. That must read as a late pong, not a dead path.
            loop = asyncio.get_running_loop()
            stalls = 0
            async with asyncio.timeout(30):
                while h.slow_pongs() == 0:
                    stalled = loop.create_future()
                    loop.call_later(0.1, lambda f=stalled: (time.sleep(1.0), f.set_result(None)))
                    await stalled
                    stalls += 1
            assert stalls <= 4
            assert h.disconnects() == 0
            assert len(h.connects()) == 1
