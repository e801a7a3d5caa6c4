"""``faxd simulate``: run the simulator in the foreground until SIGINT/SIGTERM.

Prints the URL and the credentials a daemon (or an official SDK) should be configured with on
stdout; its log events (``sim.*``, e.g. ``sim.fault_injected``) go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from faxd.logs import configure_logging
from faxd.sim.config import SimConfig
from faxd.sim.server import Simulator


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faxd simulate", description="Run the RingCentral simulator on loopback."
    )
    parser.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1 and a free port)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for random fax timing")
    return parser


def banner(sim: Simulator) -> str:
    c = sim.config
    return "\n".join(
        [
            f"RingCentral simulator listening on {sim.url}",
            f"  server (API base URL): {sim.url}",
            f"  client id:             {c.client_id}",
            f"  client secret:         {c.client_secret}",
            f"  JWT credential:        {c.jwt}",
            f"  account / extension:   {c.account_id} / {c.extensions[0]}",
            f"  control API:           {sim.url}/_sim/info",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


async def serve(host: str, port: int, seed: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with Simulator(SimConfig(seed=seed), host=host, port=port) as sim:
        sys.stdout.write(banner(sim))
        sys.stdout.flush()
        await stop.wait()
    sys.stdout.write("simulator stopped\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host, port = args.listen
    # stdout is the banner (scripts read the URL from it); the log goes beside it.
    configure_logging(level="info", fmt="auto", redact_phi=True, stream=sys.stderr)
    try:
        asyncio.run(serve(host, port, args.seed))
    except OSError as exc:
        sys.stderr.write(f"faxd simulate: cannot listen on {host}:{port}: {exc}\n")
        return 1
    return 0
