"""A RingCentral simulator for faxd's tests and demo: a real aiohttp server on loopback.

It speaks the protocol described in ``docs/ringcentral.md`` (OAuth, the WSG
WebSocket with session recovery, message store, message-sync, fax send, rate limits) and
adds a control API under ``/_sim/`` for scripting faxes and injecting faults.
See ``docs/simulator.md``.

Modules: :mod:`.config` (knobs, scripts), :mod:`.common` (helpers), :mod:`.auth` (OAuth state),
:mod:`.store` (message store + lifecycle engine), :mod:`.events` (filters, notification
bodies), :mod:`.ratelimit`, :mod:`.rest` (REST endpoints), :mod:`.wsg` (WebSocket gateway),
:mod:`.control` (``/_sim/`` API), :mod:`.server` (:class:`Simulator`), :mod:`.cli`. Their layers
(cli over server over control | rest | wsg over the state) are an import-linter contract.
"""

from faxd.sim.common import RecordedRequest, loop_wall_clock
from faxd.sim.config import RecipientScript, SimConfig
from faxd.sim.server import Simulator

__all__ = ["RecipientScript", "RecordedRequest", "SimConfig", "Simulator", "loop_wall_clock"]
