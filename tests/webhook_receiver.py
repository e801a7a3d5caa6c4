"""A webhook receiver on loopback for the outlet tests and the benchmark: a real aiohttp server that
checks every request's Standard Webhooks signature with the ``standardwebhooks`` package (not faxd's
code), answers from a script of failures, and can be stopped and started again on the same port.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """One request, verified."""

    seq: int
    webhook_id: str
    status: int  # what the receiver answered (0: it never answered: a timeout)
    body: dict[str, Any]


#: A reply for a request: a status, optionally with headers; or "hang" (never answer in time).
Reply = tuple[int, dict[str, str]] | str


@dataclass
class Receiver:
    secret: str
    #: Replies by request number (1-based, every request counts); any other request gets 200.
    script: dict[int, Reply] = field(default_factory=dict)
    #: Or by the event's seq, for its first attempt only.
    by_seq: dict[int, Reply] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    hang_for: float = 30.0
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    bad_signatures: int = 0
    #: Called with each verified request before it is answered (may block it: kill tests).
    before_reply: Callable[[Received], Any] | None = None
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def delivered(self) -> list[int]:
        """The seqs answered with a 2xx, in the order they arrived."""
        return [r.seq for r in self.requests if 200 <= r.status < 300]

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls, reuse_address=True)
        await site.start()
        if not self.port:
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, predicate: Callable[[Receiver], bool], within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    def _reply_for(self, number: int, seq: int) -> Reply:
        if number in self.script:
            return self.script[number]
        if seq in self.by_seq and seq not in {r.seq for r in self.requests[:-1]}:
            return self.by_seq[seq]
        return (200, {})

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            data = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=401)
        seq = int(data["seq"])
        received = Received(seq, request.headers["webhook-id"], 0, data)
        self.requests.append(received)
        reply = self._reply_for(len(self.requests), seq)
        if self.before_reply is not None:
            result = self.before_reply(received)
            if asyncio.iscoroutine(result):
                await result
        if reply == "hang":
            self._changed.set()
            await asyncio.sleep(self.hang_for)
            return web.Response(status=200)
        assert not isinstance(reply, str)
        status, headers = reply
        received.status = status
        self._changed.set()
        return web.Response(status=status, headers=headers, text=json.dumps({"ok": status < 300}))
