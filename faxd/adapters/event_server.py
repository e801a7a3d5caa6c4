"""The event socket: NDJSON over a Unix stream socket for local programs (docs/socket-protocol.md).

Each connection gets ``hello``, may subscribe (replay from a cursor, then live events) and may send
requests (status, list, query, history, send, sync, ping). The daemon calls :meth:`EventServer.publish`
after each journal COMMIT; every subscriber has a bounded queue and its own writer task, so a slow
client is cut off (``slow_consumer``, with the seq to resume after) instead of slowing the publisher or
anyone else.

This module only moves bytes and enforces connection policy. It must not decide anything about faxes, must
not hold the journal (the :class:`Backend` does), and must not log phone numbers or document contents.

Fast path. With one event per :meth:`EventServer.publish` call (one per journal COMMIT), waking 1,000
writer tasks per event costs more than the writes themselves. So ``publish()`` writes a subscriber's lines
straight to its transport when all of these hold, and hands them to the queue and the writer otherwise:

* the subscriber is ``live`` (:class:`~faxd.core.protocol.ClientPhase`): its ``caught_up`` is written (a
  replay in progress owns the stream);
* its queue is empty: once anything is queued, everything goes through the queue until the writer has
  taken it, so lines never overtake each other. The writer moves a whole batch from the queue to the
  transport without an ``await`` in between, so an empty queue means every earlier line is already in
  the transport, ahead of the one being written;
* its transport buffers less than its high-water mark (``get_write_buffer_size()``): a client that is
  not reading falls back to the queue, which stays bounded (``client_queue``) and overflows into
  ``slow_consumer`` exactly as before, with ``covered`` (the resume point) advanced by both paths.

``transport.write()`` never blocks (at worst it appends to the transport's buffer), so the publisher still
never waits on a client. The replay and both live paths pick and encode events in one loop
(:func:`_matching`), which skips seqs the client has already covered: that keeps the replay/live boundary
free of duplicates when an event is published after a replay that already sent it.

A connection's life is an explicit :class:`~faxd.core.protocol.ClientPhase` (handshake, replaying, live,
closed) whose moves the codec allows or refuses; the reader, the writer, the publisher and the heartbeat
read that one field. Nothing is written to a closed connection nor to a closing transport (a peer that
went away before the reader noticed): the publisher closes such a connection once (``reset``), and
every write path goes through ``_Client.writable()``, so asyncio never logs a failed send per write.

Heartbeats come from one server-wide timer (:meth:`EventServer._heartbeat`), armed for the earliest
connection to fall quiet, instead of a timeout on every writer wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from faxd.adapters.metrics import Metrics
from faxd.core.model import DocumentRef, Event, FaxState
from faxd.core.protocol import (
    ClientPhase,
    ErrorCode,
    FetchRequest,
    Filter,
    HistoryRequest,
    ListRequest,
    PageKey,
    PingRequest,
    ProtocolError,
    QueryRequest,
    Request,
    RequestId,
    SendError,
    SendRequest,
    StatusRequest,
    StoredEvent,
    SubscribeRequest,
    SyncRequest,
    encode_accepted,
    encode_bye,
    encode_caught_up,
    encode_error,
    encode_event,
    encode_fax,
    encode_faxes,
    encode_fetched,
    encode_heartbeat,
    encode_hello,
    encode_history,
    encode_ok,
    encode_page,
    encode_pong,
    parse_request,
)

log = structlog.get_logger(__name__)

#: Events read from the journal per replay step; the writer drains between steps.
REPLAY_CHUNK = 500
#: One heartbeat round also serves connections that fall quiet within this fraction of the interval
#: (their heartbeat comes that much early), so a round every few seconds serves any number of clients.
HEARTBEAT_SLACK = 0.05
_ANY = Filter()
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class Backend(Protocol):
    """What the event server needs from the daemon (implemented over the SQLite store)."""

    epoch: str

    def head_seq(self) -> int: ...

    def oldest_seq(self) -> int:
        """Oldest seq still in the journal (``head_seq() + 1`` when it is empty)."""
        ...

    def events_after(self, after_seq: int, limit: int) -> Sequence[Event | StoredEvent]:
        """Up to ``limit`` committed events with ``seq > after_seq``, in seq order (the store hands
        them over as stored, which the codec writes without building an :class:`Event`)."""
        ...

    def fax(self, fax_id: str | None = None, ref: str | None = None) -> FaxState | None: ...

    def faxes(self, active_only: bool) -> list[FaxState]: ...

    def history(self, fax_id: str) -> list[Event]: ...

    async def fax_page(self, query: QueryRequest) -> tuple[Sequence[FaxState], PageKey | None]:
        """One page of a ``query``, and the key to continue after (None on the last page); off the
        event loop, since a sparse filter can scan a whole window of the store."""
        ...

    async def sync(self) -> None: ...

    async def send(self, request: SendRequest) -> FaxState:
        """Send a fax; raises :class:`~faxd.core.protocol.SendError` when it is refused."""
        ...

    async def fetch(self, fax_id: str) -> DocumentRef:
        """Download a received fax's document; raises :class:`~faxd.core.protocol.FetchError`."""
        ...


class SocketSetupError(Exception):
    """The event socket cannot be set up as configured; the message names the key, the reason and the fix."""


def _group_id(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketSetupError(f"events.group: there is no group named {group!r} on this system") from None


def _give_to_group(path: str, group: str | int | None, gid: int) -> None:
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        # Only root may give a file to a group its owner is not in. Under DynamicUser= faxd's user is
        # in no static group unless the unit says so.
        name = group if isinstance(group, str) else f"gid {gid}"
        raise SocketSetupError(
            f"events.group: cannot give the event socket {path} to group {name}: faxd (uid {os.geteuid()}) "
            f"is not a member of it. Under systemd add SupplementaryGroups={group} to faxd.service "
            "(systemctl edit faxd), or let faxd.socket create the socket (SocketGroup=)"
        ) from None


def _bind_hint(path: str, exc: OSError) -> str:
    directory = os.path.dirname(path) or "."
    if exc.errno == errno.ENOENT:
        return f" (no directory {directory}; under systemd, tmpfiles.d/faxd.conf creates /run/faxd)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f" (faxd, uid {os.geteuid()}, may not create files in {directory})"
    return ""


@dataclass(frozen=True)
class EventServerSettings:
    """The ``events:`` section of the config, plus limits the config does not expose."""

    path: str
    mode: int = 0o660
    group: str | int | None = None
    max_clients: int = 64
    client_queue: int = 1000
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    heartbeat_interval: float = 15
    include_numbers: bool = True
    subscribe_timeout: float = 300
    max_line: int = 65536
    max_send_line: int = 75497472
    #: How long a closed connection may take to flush its last lines before it is aborted.
    close_grace: float = 2.0
    #: Bound on :meth:`EventServer.close` waiting for connection tasks (e.g. a ``send`` in progress).
    close_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The connecting process, as the kernel saw it at ``connect()``."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | None) -> PeerCred | None:
    """``SO_PEERCRED`` of a connected Unix socket, or None where the platform has no such option."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


class _Client:
    """One connection: its stream, subscription, live queue and resume point."""

    def __init__(
        self, cid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerCred | None
    ) -> None:
        self.id = cid
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        #: publish() writes directly only while the transport buffers less than this (its high-water mark).
        self.direct_limit = self.transport.get_write_buffer_limits()[1]
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        #: Live events (seq, encoded line) not yet written; bounded by the publisher.
        self.queue: deque[tuple[int, bytes]] = deque()
        self.wakeup = asyncio.Event()
        #: Where the connection is in its life; changed only through :meth:`move`.
        self.phase = ClientPhase.HANDSHAKE
        #: Set by ``subscribe``, with the move to ``replaying``.
        self.subscription: SubscribeRequest | None = None
        #: Every matching event up to this seq has been written (the resume point on overflow).
        self.covered = 0
        #: Why the connection was closed (the ``socket_disconnects`` label), once it is.
        self.close_reason: str | None = None
        self.last_write = self.loop.time()
        self.abort_timer: asyncio.TimerHandle | None = None

    def move(self, to: ClientPhase) -> None:
        """Go to phase ``to``; :class:`~faxd.core.protocol.PhaseError` if the protocol forbids the move."""
        self.phase = self.phase.move(to)

    def writable(self) -> bool:
        """Something may still be written: not closed by us, and the transport not closing. A transport
        whose peer went away closes before the reader notices; writing to it makes asyncio log
        "socket.send() raised exception." for every write."""
        return self.phase is not ClientPhase.CLOSED and not self.transport.is_closing()

    def send(self, line: bytes) -> bool:
        """Queue one line on the transport (never blocks); False once the connection is closed."""
        if not self.writable():
            return False
        self.writer.write(line)
        self.last_write = self.loop.time()
        return True

    async def flush(self) -> None:
        if self.writable():
            await self.writer.drain()

    def may_write_directly(self) -> bool:
        """publish() may write to the transport itself (the module docstring says why)."""
        return (
            self.phase is ClientPhase.LIVE
            and not self.queue
            and self.transport.get_write_buffer_size() < self.direct_limit
        )

    def idle(self) -> bool:
        """Nothing of ours is in flight, so a heartbeat cannot come between a replay or queued lines."""
        phase = self.phase
        return (phase is ClientPhase.HANDSHAKE or phase is ClientPhase.LIVE) and not self.queue

    def log_fields(self) -> dict[str, int | None]:
        peer = self.peer
        return {
            "client": self.id,
            "uid": peer.uid if peer else None,
            "gid": peer.gid if peer else None,
            "pid": peer.pid if peer else None,
        }


class EventServer:
    """Serves the event socket; see the module docstring."""

    def __init__(
        self, settings: EventServerSettings, backend: Backend, metrics: Metrics, *, server_name: str
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = metrics
        self._server_name = server_name
        self._clients: set[_Client] = set()
        self._subscribers: set[_Client] = set()
        self._server: asyncio.Server | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._closing = False
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._next_id = 0
        #: (st_dev, st_ino) of the socket file this server created, so close() unlinks only its own.
        self._bound: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (or adopt ``sock``, e.g. from systemd socket activation) and start accepting."""
        if sock is None:
            sock = await self._bind()
        ready = asyncio.Event()
        self._runner = asyncio.create_task(self._run(ready), name="event-server")
        await ready.wait()
        self._server = await asyncio.start_unix_server(
            self._accept, sock=sock, limit=self._settings.max_send_line
        )
        log.info("socket.listening", path=self._settings.path, mode=oct(self._settings.mode))

    async def close(self, reason: str = "shutdown") -> None:
        """Say ``bye`` to every client, close them, wait (bounded) for their tasks, unlink the socket."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
            self._heartbeat_timer = None
        bye = encode_bye(reason)
        for client in list(self._clients):
            self._kill(client, reason, bye)
        self._stop.set()
        if self._runner is not None:
            _, pending = await asyncio.wait([self._runner], timeout=self._settings.close_timeout)
            if pending:
                log.warning(
                    "socket.close_timeout",
                    clients=len(self._clients),
                    detail="connections still busy at the close deadline are aborted",
                )
                for client in list(self._clients):
                    client.writer.transport.abort()
                self._runner.cancel()
                await asyncio.wait([self._runner])
            elif (exc := self._runner.exception()) is not None:
                raise exc
        if self._server is not None:
            await self._server.wait_closed()
        self._unlink()
        log.info("socket.closed", reason=reason)

    async def _run(self, ready: asyncio.Event) -> None:
        # The TaskGroup outlives start(), so it needs a task of its own; close() awaits that task.
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            ready.set()
            await self._stop.wait()
        self._tg = None

    async def _bind(self) -> socket.socket:
        s = self._settings
        await self._remove_stale(s.path)
        gid = None if s.group is None else _group_id(s.group)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(s.path)
            except OSError as exc:
                raise SocketSetupError(
                    f"events.socket: cannot bind {s.path}: {exc.strerror}{_bind_hint(s.path, exc)}"
                ) from None
            st = os.stat(s.path)
            self._bound = (st.st_dev, st.st_ino)
            # chmod/chown before listen(): until then every connect() is refused, so nobody can get in
            # through the umask's default mode.
            os.chmod(s.path, s.mode)
            if gid is not None:
                _give_to_group(s.path, s.group, gid)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        sock.setblocking(False)
        return sock

    async def _remove_stale(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketSetupError(
                f"events.socket: {path} exists and is not a socket; refusing to replace it"
            )
        try:
            async with asyncio.timeout(1):
                _, writer = await asyncio.open_unix_connection(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("socket.stale_removed", path=path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except PermissionError:
                raise SocketSetupError(
                    f"events.socket: cannot remove the stale socket {path} (owned by uid {st.st_uid}): "
                    "permission denied; remove it by hand"
                ) from None
            return
        except TimeoutError:
            raise RuntimeError(f"{path} is in use (connect timed out)") from None
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        raise RuntimeError(f"another process is serving {path}")

    def _unlink(self) -> None:
        if self._bound is None:
            return
        try:
            st = os.lstat(self._settings.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._bound:
            os.unlink(self._settings.path)
        self._bound = None

    # ------------------------------------------------------------------------------------- publishing

    def publish(self, events: Sequence[Event]) -> None:
        """Hand committed events (in seq order) to every matching subscriber; never blocks.

        Each event is encoded at most once, however many subscribers get it. A live subscriber with an
        empty queue and room in its transport gets its lines written at once (one ``write()``); any other
        gets them queued and its writer woken once (see the module docstring).
        """
        if not self._subscribers or not events:
            return
        limit = self._settings.client_queue
        numbers = self._settings.include_numbers
        lines: list[bytes | None] = [None] * len(events)
        now: float | None = None
        for client in list(self._subscribers):
            sub = client.subscription
            if sub is None or client.phase is ClientPhase.CLOSED:
                continue
            if client.transport.is_closing():
                # The peer went away and the reader has not noticed yet: closed here, once, never
                # written to (every write to a closing transport is a line in asyncio's log).
                self._kill(client, "reset")
                continue
            out = _matching(events, client.covered, sub.filter, lines, numbers)
            if not out:
                continue
            if client.may_write_directly():
                client.transport.write(out[0][1] if len(out) == 1 else b"".join([line for _, line in out]))
                client.covered = out[-1][0]
                if now is None:
                    now = client.loop.time()
                client.last_write = now
            elif len(client.queue) + len(out) > limit:
                self._overflow(client)
            else:
                client.queue.extend(out)
                client.wakeup.set()

    def _overflow(self, client: _Client) -> None:
        resume = client.covered
        log.warning("socket.slow_consumer", resume_after_seq=resume, **client.log_fields())
        message = f"more than {self._settings.client_queue} events queued; resume after seq {resume}"
        line = encode_error(ErrorCode.SLOW_CONSUMER, message, resume_after_seq=resume)
        self._kill(client, "slow_consumer", line)

    def _kill(self, client: _Client, reason: str, last_line: bytes | None = None) -> None:
        """Close a connection from the server side; synchronous so the publisher can use it."""
        if client.phase is ClientPhase.CLOSED:
            return
        if last_line is not None:
            client.send(last_line)
        client.move(ClientPhase.CLOSED)
        client.close_reason = reason
        if client in self._subscribers:
            self._subscribers.discard(client)
            self._metrics.subscribers.set(len(self._subscribers))
        client.queue.clear()
        client.wakeup.set()
        client.writer.close()
        # close() flushes first; a peer that never reads would keep the transport (and the reader
        # waiting for EOF) alive for ever, so it is aborted after a grace period.
        client.abort_timer = client.loop.call_later(self._settings.close_grace, client.writer.transport.abort)

    # ------------------------------------------------------------------------------------- connections

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tg is None or self._closing:
            writer.close()
            return
        self._tg.create_task(self._serve(reader, writer))

    def _allowed(self, peer: PeerCred | None) -> bool:
        s = self._settings
        if not s.allowed_uids and not s.allowed_gids:
            return True
        return peer is not None and (peer.uid in s.allowed_uids or peer.gid in s.allowed_gids)

    async def _refuse(self, writer: asyncio.StreamWriter, code: ErrorCode, message: str) -> None:
        writer.write(encode_error(code, message))
        writer.close()
        try:
            async with asyncio.timeout(self._settings.close_grace):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()
        self._metrics.socket_disconnects.labels(code.value).inc()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_credentials(writer.get_extra_info("socket"))
        peer_fields = {"uid": peer.uid, "gid": peer.gid, "pid": peer.pid} if peer else {}
        if len(self._clients) >= self._settings.max_clients:
            log.warning("socket.busy", max_clients=self._settings.max_clients, **peer_fields)
            await self._refuse(writer, ErrorCode.BUSY, f"more than {self._settings.max_clients} clients")
            return
        if not self._allowed(peer):
            log.warning("socket.unauthorized", **peer_fields)
            await self._refuse(writer, ErrorCode.UNAUTHORIZED, "this uid/gid may not use the socket")
            return
        self._next_id += 1
        client = _Client(self._next_id, reader, writer, peer)
        self._clients.add(client)
        log.info("socket.client_connected", **client.log_fields())
        if self._heartbeat_timer is None:
            self._arm_heartbeat(client.loop.time() + self._settings.heartbeat_interval)
        b = self._backend
        client.send(
            encode_hello(
                server=self._server_name,
                epoch=b.epoch,
                head_seq=b.head_seq(),
                oldest_seq=b.oldest_seq(),
                heartbeat_s=self._settings.heartbeat_interval,
                max_line=self._settings.max_line,
            )
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_loop(client))
                tg.create_task(self._write_loop(client))
        except Exception:  # one client's failure must not take the server down
            log.exception("socket.client_failed", **client.log_fields())
            self._kill(client, "error")
        finally:
            await self._finish(client)

    async def _finish(self, client: _Client) -> None:
        self._kill(client, "eof")
        self._clients.discard(client)
        try:
            async with asyncio.timeout(self._settings.close_grace):
                await client.writer.wait_closed()
        except (TimeoutError, ConnectionError):
            client.writer.transport.abort()
        finally:
            if client.abort_timer is not None:
                client.abort_timer.cancel()
        reason = client.close_reason or "eof"
        self._metrics.socket_disconnects.labels(reason).inc()
        log.info("socket.client_disconnected", reason=reason, **client.log_fields())

    async def _read_loop(self, client: _Client) -> None:
        s = self._settings
        while client.phase is not ClientPhase.CLOSED:
            try:
                if client.phase is ClientPhase.HANDSHAKE:
                    # An unsubscribed connection must keep asking something, or it only holds a slot.
                    async with asyncio.timeout(s.subscribe_timeout):
                        line = await client.reader.readline()
                else:
                    line = await client.reader.readline()
            except TimeoutError:
                self._kill(client, "idle_timeout", encode_bye("idle_timeout"))
                return
            except ValueError:  # over the StreamReader limit (max_send_line): framing is lost
                self._line_too_long(client, s.max_send_line)
                return
            except ConnectionError:
                self._kill(client, "reset")
                return
            if not line.endswith(b"\n"):
                # EOF. A subscriber may half-close (``echo subscribe | socat``) and keep listening.
                if line or client.phase is ClientPhase.HANDSHAKE:
                    self._kill(client, "eof")
                return
            try:
                await self._handle_line(client, line)
            except ConnectionError:
                self._kill(client, "reset")
                return

    def _line_too_long(self, client: _Client, limit: int) -> None:
        log.warning("socket.line_too_long", limit=limit, **client.log_fields())
        message = f"request line longer than {limit} bytes; closing"
        self._kill(client, "line_too_long", encode_error(ErrorCode.BAD_REQUEST, message))

    async def _handle_line(self, client: _Client, line: bytes) -> None:
        if not line.strip():
            return  # people typing into socat press Enter
        big = len(line) > self._settings.max_line
        try:
            # Decoding megabytes of base64 would stall every other client; do it off the loop.
            request = await asyncio.to_thread(parse_request, line) if big else parse_request(line)
        except ProtocolError as exc:
            if big:
                self._line_too_long(client, self._settings.max_line)
            else:
                client.send(encode_error(exc.code, exc.message, exc.request_id))
                await client.flush()
            return
        if big and not isinstance(request, SendRequest):
            self._line_too_long(client, self._settings.max_line)
            return
        try:
            reply = await self._dispatch(client, request)
        except Exception:  # a bug behind one request must not kill the connection
            log.exception("socket.request_failed", request=type(request).__name__)
            reply = encode_error(ErrorCode.INTERNAL, "internal error; see the daemon's log", request.id)
        if reply is not None:
            client.send(reply)
        await client.flush()

    async def _dispatch(self, client: _Client, request: Request) -> bytes | None:
        b = self._backend
        numbers = self._settings.include_numbers
        rid = request.id
        match request:
            case SubscribeRequest():
                return self._subscribe(client, request)
            case PingRequest():
                return encode_pong(rid)
            case StatusRequest(fax_id=fax_id, ref=ref):
                state = b.fax(fax_id=fax_id, ref=ref)
                if state is None:
                    what = f"fax {fax_id}" if fax_id is not None else f"ref {ref}"
                    return encode_error(ErrorCode.NOT_FOUND, f"no {what}", rid)
                return encode_fax(state, include_numbers=numbers, request_id=rid)
            case ListRequest(active_only=active_only):
                return encode_faxes(
                    b.faxes(active_only), b.head_seq(), include_numbers=numbers, request_id=rid
                )
            case QueryRequest():
                return await self._query(request)
            case HistoryRequest(fax_id=fax_id):
                if b.fax(fax_id=fax_id) is None:
                    return encode_error(ErrorCode.NOT_FOUND, f"no fax {fax_id}", rid)
                return encode_history(b.history(fax_id), include_numbers=numbers, request_id=rid)
            case SyncRequest():
                return await self._sync(rid)
            case SendRequest():
                return await self._send(client, request)
            case FetchRequest(fax_id=fax_id):
                return await self._fetch(fax_id, rid)
        raise AssertionError(f"unhandled request {request!r}")

    async def _send(self, client: _Client, request: SendRequest) -> bytes:
        try:
            state = await self._backend.send(request)
        except SendError as exc:
            log.info("socket.send_refused", code=exc.code, rc_code=exc.rc_code, **client.log_fields())
            return encode_error(exc.code, exc.message, request.id, rc_code=exc.rc_code)
        log.info(
            "socket.fax_sent",
            fax_id=state.fax_id,
            recipients=len(request.to),
            documents=len(request.documents),
            **client.log_fields(),
        )
        return encode_accepted(state.fax_id, state.ref, state.status, request.id)

    async def _sync(self, rid: RequestId | None) -> bytes:
        try:
            await self._backend.sync()
        except Exception as exc:  # noqa: BLE001 - reported to the client, and logged
            log.warning("socket.sync_failed", error=str(exc))
            return encode_error(ErrorCode.UPSTREAM, f"sync failed: {exc}", rid)
        return encode_ok(rid)

    async def _fetch(self, fax_id: str, rid: RequestId | None) -> bytes:
        try:
            document = await self._backend.fetch(fax_id)
        except SendError as exc:  # a FetchError, or not connected to RingCentral
            return encode_error(exc.code, exc.message, rid)
        return encode_fetched(fax_id, document, rid)

    async def _query(self, request: QueryRequest) -> bytes:
        """One page of faxes; numbers only when asked for and served at all (events.include_numbers)."""
        b = self._backend
        if request.include_numbers and not self._settings.include_numbers:
            message = "this faxd does not serve phone numbers (events.include_numbers is false)"
            return encode_error(ErrorCode.BAD_REQUEST, message, request.id)
        faxes, next_key = await b.fax_page(request)
        return encode_page(
            faxes, next_key, b.head_seq(), include_numbers=request.include_numbers, request_id=request.id
        )

    def _cursor_problem(self, after_seq: int, epoch: str | None) -> str | None:
        b = self._backend
        if epoch is not None and epoch != b.epoch:
            return f"epoch {epoch} is not this journal's; list, then subscribe from its head_seq"
        oldest, head = b.oldest_seq(), b.head_seq()
        if after_seq < oldest - 1:
            return f"events after seq {after_seq} are no longer kept (oldest is {oldest})"
        if after_seq > head:
            return f"after_seq {after_seq} is ahead of the journal (head is {head})"
        return None

    def _cursor_expired(self, message: str, request_id: str | int | None) -> bytes:
        b = self._backend
        return encode_error(
            ErrorCode.CURSOR_EXPIRED,
            message,
            request_id,
            epoch=b.epoch,
            oldest_seq=b.oldest_seq(),
            head_seq=b.head_seq(),
        )

    def _subscribe(self, client: _Client, request: SubscribeRequest) -> bytes | None:
        if client.phase.subscribed:
            return encode_error(ErrorCode.BAD_REQUEST, "already subscribed on this connection", request.id)
        if request.after_seq is None:
            client.covered = self._backend.head_seq()
        else:
            problem = self._cursor_problem(request.after_seq, request.epoch)
            if problem is not None:
                return self._cursor_expired(problem, request.id)
            client.covered = request.after_seq
        # Registered before the backlog is read (by the writer task): an event committed meanwhile is
        # in the queue, in the replay, or both; the writer drops seqs it has already covered.
        client.subscription = request
        client.move(ClientPhase.REPLAYING)
        self._subscribers.add(client)
        self._metrics.subscribers.set(len(self._subscribers))
        log.info(
            "socket.client_subscribed",
            after_seq=request.after_seq,
            filtered=request.filter != Filter(),
            **client.log_fields(),
        )
        client.wakeup.set()
        return None

    async def _write_loop(self, client: _Client) -> None:
        try:
            while client.phase is not ClientPhase.CLOSED:
                if client.phase is ClientPhase.REPLAYING:
                    await self._replay(client)
                elif client.queue:
                    await self._send_live(client)
                else:
                    client.wakeup.clear()
                    await client.wakeup.wait()
        except ConnectionError:
            self._kill(client, "reset")

    def _arm_heartbeat(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        self._heartbeat_timer = loop.call_at(when, self._heartbeat)

    def _heartbeat(self) -> None:
        """One round: a heartbeat to every idle connection quiet for the interval, then re-arm."""
        self._heartbeat_timer = None
        if self._closing or not self._clients:
            return  # the next connection arms the timer again
        interval = self._settings.heartbeat_interval
        now = asyncio.get_running_loop().time()
        cutoff = now + interval * HEARTBEAT_SLACK - interval  # quiet since before this: heartbeat now
        line: bytes | None = None
        next_due = now + interval
        for client in self._clients:
            if client.last_write > cutoff:
                next_due = min(next_due, client.last_write + interval)
            elif client.idle():
                if line is None:
                    line = encode_heartbeat(self._backend.head_seq())
                client.send(line)
            # else: a replay or queued lines are being written; they are the sign of life.
        self._arm_heartbeat(next_due)

    async def _replay(self, client: _Client) -> None:
        """The journal after the cursor, then ``caught_up``: from ``replaying`` to ``live`` (or closed)."""
        sub = client.subscription
        assert sub is not None
        numbers = self._settings.include_numbers
        if sub.after_seq is not None:
            while client.phase is ClientPhase.REPLAYING:
                last = client.covered
                # Checked right before each read (no await in between): retention pruning cannot
                # slip a gap between the check and the events read.
                if last < self._backend.oldest_seq() - 1:
                    problem = f"events after seq {last} were pruned during the replay"
                    self._kill(client, "cursor_expired", self._cursor_expired(problem, sub.id))
                    return
                chunk = self._backend.events_after(last, REPLAY_CHUNK)
                out = _matching(chunk, last, sub.filter, [None] * len(chunk), numbers)
                # The previous chunk drained to the client while this one was read and encoded.
                await client.flush()
                if out and not client.send(b"".join([line for _, line in out])):  # one write per chunk
                    return
                if chunk:
                    client.covered = max(last, chunk[-1].seq)
                if len(chunk) < REPLAY_CHUNK:
                    break
                # drain() does not yield while the transport has room: a long, mostly filtered-out
                # backlog would otherwise hold the loop for the whole replay.
                await asyncio.sleep(0)
        if client.send(encode_caught_up(client.covered, sub.id)):
            client.move(ClientPhase.LIVE)
            await client.flush()

    async def _send_live(self, client: _Client) -> None:
        batch = client.queue
        client.queue = deque()
        covered = client.covered
        lines = []
        for seq, line in batch:
            if seq > covered:  # else already sent by the replay
                lines.append(line)
                covered = seq
        # One write for the whole batch: a syscall per line would dominate the fan-out's cost.
        if lines and not client.send(b"".join(lines)):
            return
        client.covered = covered
        await client.flush()


def _matching(
    events: Sequence[Event | StoredEvent], after: int, flt: Filter, lines: list[bytes | None], numbers: bool
) -> list[tuple[int, bytes]]:
    """(seq, line) of every event after seq ``after`` that ``flt`` selects, in order: the one filter and
    encoder of the replay and of both live paths. ``lines[i]`` caches the line of ``events[i]``, so one
    publish encodes an event once however many subscribers it goes to."""
    every = flt == _ANY  # the common case: no filter, no per-event test
    out: list[tuple[int, bytes]] = []
    for i, event in enumerate(events):
        seq = event.seq
        if seq <= after or not (every or flt.matches(event)):
            continue
        line = lines[i]
        if line is None:
            line = lines[i] = encode_event(event, include_numbers=numbers)
        out.append((seq, line))
    return out
