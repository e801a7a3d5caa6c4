"""``faxd demo``: the whole of faxd on loopback, in a temporary directory, in about ten seconds.

Starts the RingCentral simulator and the daemon in this process, sends sample faxes through the
daemon's event socket that end in every kind of outcome (Sent, SendingFailed with LineBusy, a
multi-recipient fax with mixed results and a late Delivered, an inbound Received), prints each
transition as a socket client receives it, and exits 0 once every fax and recipient is final
(1 with the reason on timeout). The demo is a client of the daemon like any other: it uses only the
socket protocol, and the simulator's own API for the inbound fax.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faxd import daemon, testbed
from faxd.client import format_event
from faxd.logs import configure_logging
from faxd.sim import SimConfig, Simulator

# A one-page PDF is enough: the simulator counts pages, it does not render them.
SAMPLE_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


@dataclass
class Expectation:
    """What one sample fax must reach before the demo is done."""

    ref: str
    to: list[str]
    outcome: dict[int, str]  # recipient index -> terminal status
    fax_id: str | None = None
    seen: dict[int, str] = field(default_factory=dict)
    fax_final: bool = False

    def done(self) -> bool:
        return self.fax_final and all(self.seen.get(i) == s for i, s in self.outcome.items())


SAMPLES = [
    # The simulator's magic numbers (docs/simulator.md): ...0001 busy, ...0002 no answer,
    # ...0004 Sent then Delivered, anything else Sent.
    Expectation("invoice-1001", ["+16505550100"], {0: "Sent"}),
    Expectation("referral-2002", ["+16505550001"], {0: "SendingFailed"}),
    Expectation(
        "lab-results-3003",
        ["+16505550110", "+16505550002", "+16505550004"],
        {0: "Sent", 1: "SendingFailed", 2: "Delivered"},
    ),
]


async def _request(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def _drive(sim: Simulator, socket_path: str, out: Any, color: bool) -> str | None:
    """Send the samples and follow them; None when all are final, else what went wrong."""
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=2**20)
    try:
        hello = json.loads(await reader.readline())
        await _request(writer, {"type": "subscribe", "after_seq": hello["head_seq"], "epoch": hello["epoch"]})
        samples = [Expectation(s.ref, list(s.to), dict(s.outcome)) for s in SAMPLES]
        by_ref = {s.ref: s for s in samples}
        document = {
            "name": "sample.pdf",
            "content_type": "application/pdf",
            "data": base64.b64encode(SAMPLE_PDF).decode(),
        }
        for n, sample in enumerate(samples):
            await _request(
                writer,
                {
                    "type": "send",
                    "id": f"send-{n}",
                    "to": [{"phone": p} for p in sample.to],
                    "documents": [document],
                    "ref": sample.ref,
                },
            )
        inbound_seen = False
        inbound_id: str | None = None
        while not (inbound_seen and all(s.done() for s in samples)):
            line = await reader.readline()
            if not line:
                return "the daemon closed the connection"
            message = json.loads(line)
            kind = message.get("type")
            if kind == "error":
                return f"the daemon answered an error: {message.get('code')}: {message.get('message')}"
            if kind == "accepted":
                by_ref[message["ref"]].fax_id = message["fax_id"]
                if message.get("id") == f"send-{len(samples) - 1}" and inbound_id is None:
                    # All outbound faxes are in; let a fax arrive too.
                    inbound_id = sim.create_inbound_fax(None, "+14155550123", pages=2)
            elif kind == "event":
                print(format_event(message, color=color), file=out, flush=True)
                if _note(message, by_ref):
                    inbound_seen = True
        return None
    finally:
        writer.close()
        await writer.wait_closed()


def _note(event: dict[str, Any], by_ref: dict[str, Expectation]) -> bool:
    """Apply an event to the sample it belongs to; True if it is the inbound fax's arrival."""
    if event["direction"] == "Inbound" and event["to_status"] == "Received":
        return True
    sample = by_ref.get(event.get("ref") or "")
    if sample is None:
        return False
    if event["kind"] == "recipient":
        sample.seen[event["recipient"]["index"]] = event["to_status"]
    elif event["kind"] == "status":
        sample.fax_final = sample.fax_final or event["final"]
        if len(sample.to) == 1 and event["final"]:
            # A one-recipient fax may report the outcome on the fax event alone.
            sample.seen.setdefault(0, event["to_status"])
    return False


async def run(*, give_up_after: float = 90.0, keep: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    color = bool(getattr(out, "isatty", lambda: False)())
    workdir = Path(tempfile.mkdtemp(prefix="faxd-demo-", dir="/tmp"))
    try:
        sim_config = SimConfig(default_delay=(1.0, 4.0))
        async with Simulator(sim_config) as sim:
            config = testbed.load(
                sim,
                workdir,
                reconcile={"debounce": 0.3, "max_delay": 2, "active_poll_interval": 10},
                logging={"level": "warning"},
            )
            configure_logging(level="warning", fmt="console", redact_phi=True, stream=sys.stderr)
            print(f"faxd demo: simulator at {sim.url}, daemon state in {workdir}", file=out)
            print("sending 3 faxes through the daemon's socket; 1 inbound fax will arrive\n", file=out)
            stop = asyncio.Event()
            ready = asyncio.Event()
            problem: str | None = None
            async with asyncio.TaskGroup() as tg:
                daemon_task = tg.create_task(daemon.run(config, stop=stop, on_ready=ready.set))
                waiter = tg.create_task(ready.wait())
                await asyncio.wait([daemon_task, waiter], return_when=asyncio.FIRST_COMPLETED)
                if not ready.is_set():
                    problem = "the daemon did not start"
                    waiter.cancel()
                else:
                    try:
                        async with asyncio.timeout(give_up_after):
                            problem = await _drive(sim, config.events.socket, out, color)
                    except TimeoutError:
                        problem = f"not every fax was final after {give_up_after:g} s"
                    except OSError as exc:
                        problem = f"cannot talk to the daemon: {exc}"
                stop.set()
            code = daemon_task.result()
        if problem is not None:
            print(f"\nfaxd demo FAILED: {problem}", file=sys.stderr)
            return 1
        if code != 0:
            print(f"\nfaxd demo FAILED: the daemon exited with {code}", file=sys.stderr)
            return 1
        print("\nall faxes final; the daemon stopped cleanly.", file=out)
        return 0
    finally:
        if keep:
            print(f"kept {workdir}", file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
