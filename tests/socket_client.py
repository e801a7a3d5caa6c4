"""The tests' client of the event socket, on :class:`faxd.client.Connection` (what ``faxd watch``,
``status`` and ``send`` speak through).

Every read is bounded by a timeout, and a connection the daemon closed fails the test with what the
test was waiting for. The raw streams stay reachable (``send(bytes)``, ``writer``, ``expect_eof``) for
the protocol tests that send broken lines or half-close. Event keys are :func:`faxd.core.model.event_key`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from faxd.client import ClientError, Connection, ConnectionLost

TIMEOUT = 30.0
Message = dict[str, Any]


class SocketClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = Connection(reader, writer)
        #: Events that arrived while :meth:`reply` waited for a reply.
        self.early: list[Message] = []

    @classmethod
    async def connect(cls, path: str, *, hello: bool = True, limit: int = 2**24) -> SocketClient:
        """Connect and read ``hello`` (``hello=False``: leave it unread). The StreamReader keeps up to
        2 x ``limit`` bytes in memory: a small limit makes a slow client."""
        reader, writer = await asyncio.open_unix_connection(path, limit=limit)
        client = cls(reader, writer)
        if hello:
            first = await client.recv()
            assert first["type"] == "hello", first
            client.conn.hello = first
        return client

    @classmethod
    async def subscribed(cls, path: str, after_seq: int = 0) -> SocketClient:
        """Connect and subscribe after ``after_seq`` within the hello's epoch."""
        client = await cls.connect(path)
        await client.subscribe(after_seq)
        return client

    @property
    def hello(self) -> Message:
        return self.conn.hello

    async def send(self, message: Message | bytes) -> None:
        """One request line, or raw bytes sent as they are."""
        if isinstance(message, bytes):
            self.writer.write(message)
            await self.writer.drain()
        else:
            await self.conn.send(message)

    async def subscribe(self, after_seq: int = 0) -> None:
        """Subscribe after ``after_seq`` within the hello's epoch (replies are not waited for)."""
        await self.send({"type": "subscribe", "after_seq": after_seq, "epoch": self.hello["epoch"]})

    async def recv(self, within: float = TIMEOUT) -> Message:
        """The next message, whatever its type."""
        try:
            async with asyncio.timeout(within):
                return await self.conn.recv()
        except ClientError as exc:
            raise AssertionError(f"no next message: {exc}") from None

    async def until(self, done: Callable[[Message], bool], within: float = TIMEOUT) -> Message:
        """The first message for which ``done`` holds; the ones before it are dropped."""
        async with asyncio.timeout(within):
            while not done(message := await self.recv()):
                pass
        return message

    async def next_of(self, *types: str) -> Message:
        """The next message of one of ``types``; others are dropped."""
        return await self.until(lambda m: m["type"] in types)

    async def recv_type(self, kind: str) -> Message:
        """The next message but heartbeats, which must be of ``kind``."""
        message = await self.until(lambda m: m["type"] != "heartbeat")
        assert message["type"] == kind, message
        return message

    async def final(self, fax_id: str) -> Message:
        """The next final event of ``fax_id``."""
        return await self.until(lambda m: m["type"] == "event" and m["fax_id"] == fax_id and m["final"])

    async def reply(self, request_id: str) -> Message:
        """The reply to the request with ``request_id``; events that arrive meanwhile go to :attr:`early`."""
        while True:
            message = await self.recv()
            if message.get("id") == request_id:
                return message
            assert message["type"] in ("event", "heartbeat"), message
            if message["type"] == "event":
                self.early.append(message)

    async def events_until(self, seq: int) -> list[Message]:
        """Events (and nothing else but heartbeats and caught_up) up to one with ``seq`` or later."""
        events: list[Message] = []
        while not events or events[-1]["seq"] < seq:
            message = await self.recv()
            if message["type"] == "event":
                events.append(message)
            else:
                assert message["type"] in ("heartbeat", "caught_up"), message
        return events

    async def messages(self) -> AsyncIterator[Message]:
        """Every message until the daemon closes the connection (no timeout: bound it in the caller)."""
        while True:
            try:
                message = await self.conn.recv()
            except ConnectionLost:
                return
            yield message

    async def expect_eof(self) -> None:
        """The server closed the connection (a reset counts: it closed with our bytes unread)."""
        try:
            async with asyncio.timeout(TIMEOUT):
                rest = await self.reader.read()
        except ConnectionResetError:
            return
        assert rest == b"", rest

    async def close(self) -> None:
        await self.conn.close()
