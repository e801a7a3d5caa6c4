"""A small HTTP proxy on loopback for the proxy tests, the kind a clinic puts between faxd and the internet.

It opens CONNECT tunnels and forwards plain http requests given in absolute form (``GET http://h:p/x``),
records every request it gets (:class:`Seen`: method, target, Proxy-Authorization, its answer, and the
first request path inside a plain tunnel or of a forwarded connection), can demand Basic credentials
(407 without them), refuse every request with a status, send names to other addresses (``hosts``: a
name only the proxy can resolve proves that nothing went around it) and cut every open tunnel.
A forwarded connection is piped as it is after its first request, so only that one is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from urllib.parse import urlsplit


@dataclass
class Seen:
    method: str
    target: str  # host:port the client asked for (of the URL, for a forwarded request)
    authorization: str | None  # the Proxy-Authorization header as received
    status: int  # what the proxy answered: 200 (tunnel open or request forwarded), 403, 407, 502
    at: float  # loop time of the answer
    path: str | None = None  # the first request's path (no query), when the proxy could read it


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class ConnectProxy:
    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        refuse: int | None = None,
        hosts: Mapping[str, str] | None = None,
    ) -> None:
        self.expected = basic(*credentials) if credentials else None
        self.refuse = refuse
        self.hosts = dict(hosts or {})
        self.seen: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._tunnels: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, username: str, password: str) -> str:
        return f"http://{username}:{password}@127.0.0.1:{self.port}"

    def tunnels(self) -> list[Seen]:
        """The CONNECT requests the proxy granted."""
        return [s for s in self.seen if s.method == "CONNECT" and s.status == 200]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds; checked again after every request and every tunnel's end."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    def cut(self) -> int:
        """Abort every open tunnel (both sides); returns how many sockets were cut."""
        writers, self._tunnels = self._tunnels, set()
        for writer in writers:
            writer.transport.abort()
        return len(writers)

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def _record(self, seen: Seen) -> Seen:
        self.seen.append(seen)
        self._changed.set()
        return seen

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._tunnels.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tunnels.discard(writer)
            writer.transport.abort()
            self._handlers.discard(task)
            self._changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, sep, value in (line.partition(":") for line in lines[1:])
            if sep
        }
        authorization = headers.get("proxy-authorization")
        loop = asyncio.get_running_loop()
        if method == "CONNECT":
            hostport, path = target, None
        else:
            parts = urlsplit(target)
            hostport, path = f"{parts.hostname}:{parts.port or 80}", parts.path
        status = self.refuse
        if status is None and self.expected is not None and authorization != self.expected:
            status = 407
        if status is not None:
            challenge = 'Proxy-Authenticate: Basic realm="clinic"\r\n' if status == 407 else ""
            writer.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{challenge}"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            self._record(Seen(method, hostport, authorization, status, loop.time(), path))
            await writer.drain()
            return
        host, _, port = hostport.rpartition(":")
        host = host.strip("[]")
        try:
            up_reader, up_writer = await asyncio.open_connection(self.hosts.get(host, host), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self._record(Seen(method, hostport, authorization, 502, loop.time(), path))
            await writer.drain()
            return
        self._tunnels.add(up_writer)
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                seen = self._record(Seen(method, hostport, authorization, 200, loop.time()))
                first = await reader.read(65536)
                if first[:4] in (b"GET ", b"POST"):  # plain http inside: the path is readable
                    seen.path = urlsplit(first.split(b" ", 2)[1].decode("latin-1")).path
                    self._changed.set()
                up_writer.write(first)
            else:
                self._record(Seen(method, hostport, authorization, 200, loop.time(), path))
                up_writer.write(head)
            await up_writer.drain()
            await _pipe_both(reader, writer, up_reader, up_writer)
        finally:
            self._tunnels.discard(up_writer)
            up_writer.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Both directions until either ends; then the tunnel is over for both sides."""
    tasks = [asyncio.create_task(_pipe(reader, up_writer)), asyncio.create_task(_pipe(up_reader, writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
