"""The event socket over real Unix sockets, against a small in-memory Backend, read by the tests'
socket client (tests/socket_client.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import socket
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from prometheus_client import CollectorRegistry
from socket_client import SocketClient
from structlog.testing import capture_logs
from test_protocol import ERROR_CODES, FUZZ_EXAMPLES, request_lines

from faxd.adapters import event_server as es
from faxd.adapters.event_server import EventServer, EventServerSettings, SocketSetupError, peer_credentials
from faxd.adapters.metrics import Metrics
from faxd.core.model import (
    FINAL_STATUSES,
    Event,
    EventKind,
    FaxState,
    RecipientState,
    Source,
    Transition,
)
from faxd.core.protocol import PageKey, QueryRequest, SendError, SendRequest

EPOCH = "3f1c7a2e-0000-4000-8000-000000000001"
TIMEOUT = 10


# ------------------------------------------------------------------------------------------ helpers


def transition(
    fax_id: str,
    to_status: str,
    *,
    index: int | None = 0,
    from_status: str | None = None,
    direction: str = "Outbound",
    extension_id: str = "111",
    ref: str | None = None,
    error_code: str | None = None,
    phone: str | None = "+15550001111",
) -> Transition:
    return Transition(
        kind=EventKind.RECIPIENT if index is not None else EventKind.STATUS,
        fax_id=fax_id,
        extension_id=extension_id,
        direction=direction,
        from_status=from_status,
        to_status=to_status,
        final=to_status in FINAL_STATUSES,
        recipient_index=index,
        recipient_phone=phone if index is not None else None,
        error_code=error_code,
        error_category="busy" if error_code == "LineBusy" else None,
        retryable=True if error_code == "LineBusy" else None,
        ref=ref,
    )


class MemoryBackend:
    """A journal and fax table in memory: what the daemon's SQLite store does, minus durability."""

    def __init__(self, epoch: str = EPOCH) -> None:
        self.epoch = epoch
        self.journal: list[Event] = []
        self.states: dict[str, FaxState] = {}
        self.last_seq = 0
        self.sync_calls = 0
        self.sent: list[SendRequest] = []
        self.send_error: SendError | None = None
        self.send_gate: asyncio.Event | None = None  # when set, send() waits for it
        self.send_started = asyncio.Event()
        self.sent_event = asyncio.Event()
        self.publish: Callable[[list[Event]], None] = lambda events: None
        self._next_fax = 9000

    # The Backend protocol
    def head_seq(self) -> int:
        return self.last_seq

    def oldest_seq(self) -> int:
        return self.journal[0].seq if self.journal else self.last_seq + 1

    def events_after(self, after_seq: int, limit: int) -> list[Event]:
        return [e for e in self.journal if e.seq > after_seq][:limit]

    def fax(self, fax_id: str | None = None, ref: str | None = None) -> FaxState | None:
        if fax_id is not None:
            return self.states.get(fax_id)
        return next((s for s in self.states.values() if s.ref == ref), None)

    def faxes(self, active_only: bool) -> list[FaxState]:
        return [s for s in self.states.values() if s.in_flight or not active_only]

    def history(self, fax_id: str) -> list[Event]:
        return [e for e in self.journal if e.transition.fax_id == fax_id]

    async def fax_page(self, query: QueryRequest) -> tuple[list[FaxState], PageKey | None]:
        return [], None

    async def sync(self) -> None:
        self.sync_calls += 1

    async def send(self, request: SendRequest) -> FaxState:
        self.send_started.set()
        if self.send_gate is not None:
            await self.send_gate.wait()
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(request)
        self._next_fax += 1
        fax_id = str(self._next_fax)
        recipients = tuple(
            RecipientState(index=i, phone=r.phone, status="Queued") for i, r in enumerate(request.to)
        )
        self.states[fax_id] = FaxState(
            fax_id=fax_id, extension_id="111", direction="Outbound", status="Queued",
            recipients=recipients, ref=request.ref,
        )  # fmt: skip
        self.commit(
            [transition(fax_id, "Queued", index=r.index, phone=r.phone, ref=request.ref) for r in recipients]
        )
        self.sent_event.set()
        return self.states[fax_id]

    # Test controls
    def commit(self, transitions: list[Transition], *, publish: bool = True) -> list[Event]:
        """Journal transitions (and apply them to the fax table), then publish, like the daemon."""
        events = []
        for t in transitions:
            self.last_seq += 1
            events.append(Event(self.last_seq, self.epoch, t, "2026-01-02T03:04:05Z", Source.PUSH))
            self._apply(t)
        self.journal.extend(events)
        if publish:
            self.publish(events)
        return events

    def _apply(self, t: Transition) -> None:
        state = self.states.get(t.fax_id) or FaxState(
            fax_id=t.fax_id, extension_id=t.extension_id, direction=t.direction, status="Queued", ref=t.ref
        )
        if t.kind is EventKind.STATUS:
            state = replace(state, status=t.to_status)
        elif t.recipient_index is not None:
            others = [r for r in state.recipients if r.index != t.recipient_index]
            mine = RecipientState(t.recipient_index, t.recipient_phone, t.to_status, t.error_code)
            state = replace(state, recipients=tuple(sorted([*others, mine], key=lambda r: r.index)))
            done = all(r.status in FINAL_STATUSES for r in state.recipients)
            state = replace(state, status="Sent" if done else "Queued")
        self.states[t.fax_id] = state

    def prune(self, upto: int) -> None:
        self.journal = [e for e in self.journal if e.seq > upto]


class Harness:
    def __init__(
        self, server: EventServer, backend: MemoryBackend, settings: EventServerSettings, metrics: Metrics
    ):
        self.server = server
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.path = settings.path
        self.clients: list[SocketClient] = []

    async def connect(self, **kwargs: Any) -> SocketClient:
        client = await SocketClient.connect(self.path, **kwargs)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self.server.close()

    def disconnects(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value("faxd_socket_disconnects_total", {"reason": reason})
        return value or 0.0

    def subscribers(self) -> float:
        return self.metrics.registry.get_sample_value("faxd_socket_subscribers") or 0.0


async def start_harness(directory: Path, backend: MemoryBackend | None = None, **overrides: Any) -> Harness:
    settings = EventServerSettings(path=str(directory / "events.sock"), **overrides)
    backend = backend or MemoryBackend()
    metrics = Metrics(CollectorRegistry())
    server = EventServer(settings, backend, metrics, server_name="faxd/test")
    backend.publish = server.publish
    await server.start()
    return Harness(server, backend, settings, metrics)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def harness(short_dir: Path, settings_overrides: dict[str, Any]) -> AsyncIterator[Harness]:
    h = await start_harness(short_dir, **settings_overrides)
    yield h
    await h.close()


def seed(backend: MemoryBackend, count: int) -> None:
    backend.commit([transition(f"f{i % 5}", "Queued", index=i % 3) for i in range(count)], publish=False)


# ------------------------------------------------------------------------------------------ handshake


async def test_hello_comes_first(harness: Harness) -> None:
    """The server speaks first, with the journal's epoch and bounds."""
    seed(harness.backend, 3)
    client = await harness.connect(hello=False)
    hello = await client.recv()
    assert hello == {
        "type": "hello",
        "proto": 1,
        "server": "faxd/test",
        "epoch": EPOCH,
        "head_seq": 3,
        "oldest_seq": 1,
        "heartbeat_s": 15,
        "max_line": 65536,
    }


async def test_peer_credentials_reads_so_peercred() -> None:
    """SO_PEERCRED names this very process on both ends of a socketpair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = peer_credentials(a)
    assert cred is not None
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())


# ------------------------------------------------------------------------------------------ subscribe


async def test_replay_then_caught_up_then_live(harness: Harness) -> None:
    """after_seq replays the journal after it, then caught_up (echoing the id), then live events."""
    seed(harness.backend, 5)
    client = await harness.connect()
    await client.send({"type": "subscribe", "after_seq": 2, "epoch": EPOCH, "id": "s1"})
    replayed = [await client.recv_type("event") for _ in range(3)]
    assert [e["seq"] for e in replayed] == [3, 4, 5]
    assert replayed[0]["epoch"] == EPOCH
    assert await client.recv_type("caught_up") == {"type": "caught_up", "seq": 5, "id": "s1"}
    assert harness.subscribers() == 1
    harness.backend.commit([transition("f9", "Sent", ref="abc")])
    live = await client.recv_type("event")
    assert live["seq"] == 6
    assert live["fax_id"] == "f9"
    assert live["ref"] == "abc"
    assert live["recipient"] == {"index": 0, "phone": "+15550001111"}


async def test_after_seq_zero_replays_everything(harness: Harness) -> None:
    seed(harness.backend, 4)
    client = await harness.connect()
    await client.send({"type": "subscribe", "after_seq": 0})
    assert [e["seq"] for e in await client.events_until(4)] == [1, 2, 3, 4]
    assert (await client.recv_type("caught_up"))["seq"] == 4


async def test_without_after_seq_only_live_events(harness: Harness) -> None:
    """No after_seq: caught_up at the head at once, then only events committed later."""
    seed(harness.backend, 4)
    client = await harness.connect()
    await client.send({"type": "subscribe"})
    assert (await client.recv_type("caught_up"))["seq"] == 4
    harness.backend.commit([transition("f1", "Sent")])
    assert (await client.recv_type("event"))["seq"] == 5


async def test_replay_is_filtered(harness: Harness) -> None:
    """The filter applies to the replay too; caught_up still reports the journal position."""
    seed(harness.backend, 10)  # fax ids f0..f4 round robin
    client = await harness.connect()
    await client.send({"type": "subscribe", "after_seq": 0, "filter": {"fax_ids": ["f1"]}})
    events = [await client.recv_type("event") for _ in range(2)]
    assert [(e["seq"], e["fax_id"]) for e in events] == [(2, "f1"), (7, "f1")]
    assert (await client.recv_type("caught_up"))["seq"] == 10


async def test_numbers_can_be_withheld(short_dir: Path) -> None:
    """include_numbers=false blanks phone numbers in events and fax objects."""
    h = await start_harness(short_dir, include_numbers=False)
    try:
        h.backend.commit([transition("f1", "Queued")], publish=False)
        client = await h.connect()
        await client.send({"type": "subscribe", "after_seq": 0})
        assert (await client.recv_type("event"))["recipient"] == {"index": 0, "phone": None}
        await client.recv_type("caught_up")
        await client.send({"type": "status", "fax_id": "f1"})
        assert (await client.recv_type("fax"))["fax"]["recipients"][0]["phone"] is None
        await client.close()
    finally:
        await h.close()


BOUNDARY_ITERATIONS = 1000
BOUNDARY_EVENTS = 30


async def _publish_with_yields(
    backend: MemoryBackend, rng: random.Random, joins: dict[int, list[asyncio.Event]]
) -> None:
    """Commit, maybe yield (a subscriber may register between COMMIT and publish), then publish; before
    event ``i``, let the subscribers waiting in ``joins[i]`` go."""
    for i in range(BOUNDARY_EVENTS):
        for join in joins.get(i, []):
            join.set()
        events = backend.commit([transition(f"p{i}", "Queued")], publish=False)
        if rng.random() < 0.5:
            await asyncio.sleep(0)
        backend.publish(events)
        if rng.random() < 0.5:
            await asyncio.sleep(0)


async def _subscribe_when(
    client: SocketClient, join: asyncio.Event, cursor: Callable[[], int | None]
) -> tuple[int, list[int], int]:
    """Subscribe once ``join`` is set, from ``cursor()`` (None: live only); read up to ``caught_up``.

    Returns where the stream starts (the cursor, or caught_up's seq for live only), the seqs received
    before caught_up, and caught_up's seq.
    """
    await join.wait()
    after = cursor()
    request: dict[str, Any] = {"type": "subscribe", "epoch": EPOCH}
    if after is not None:
        request["after_seq"] = after
    await client.send(request)
    seqs: list[int] = []
    while True:
        message = await client.recv()
        if message["type"] == "caught_up":
            caught_up = int(message["seq"])
            return (caught_up if after is None else after), seqs, caught_up
        assert message["type"] == "event", message
        seqs.append(message["seq"])


async def test_no_gap_no_duplicate_at_the_replay_live_boundary(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events committed while a subscriber joins arrive exactly once, in seq order, across 1,000 runs.

    Each iteration has its own server and journal (seeded at random, possibly empty) and two subscribers
    that join at random points while a publisher commits 30 events, yielding at random points, including
    between COMMIT and publish: one resumes from a random cursor (old, or the head at that moment), the
    other subscribes live only. A subscriber registered only once its replay is done misses what is
    published in between: the live-only one whenever its writer runs after a publish, the resuming one
    whenever the writer's last flush yields, which is what ``drain()`` does when the transport is at
    its high-water mark (a client reading slowly). On loopback it never is, so ``drain()`` here yields
    at random first. A marker event published after everyone is caught up ends every stream, so a gap
    is an assertion at once, not a timeout.
    """
    monkeypatch.setattr(es, "REPLAY_CHUNK", 3)  # several awaits inside the replay
    drain_rng = random.Random()
    real_drain = asyncio.StreamWriter.drain

    async def drain_that_may_yield(writer: asyncio.StreamWriter) -> None:
        if drain_rng.random() < 0.5:
            await asyncio.sleep(0)
        await real_drain(writer)

    monkeypatch.setattr(asyncio.StreamWriter, "drain", drain_that_may_yield)
    live_only_joined_mid_stream = resumed_mid_stream = 0
    for iteration in range(BOUNDARY_ITERATIONS):
        rng = random.Random(iteration)
        drain_rng.seed(iteration)
        h = await start_harness(short_dir)
        try:
            backend = h.backend
            seed(backend, rng.randrange(0, 20))
            start = backend.head_seq()
            end = start + BOUNDARY_EVENTS
            old_cursor = rng.randrange(0, start + 1)
            at_head = rng.random() < 0.5
            joins: dict[int, list[asyncio.Event]] = {}
            resume_join, live_join = asyncio.Event(), asyncio.Event()
            for join in (resume_join, live_join):
                joins.setdefault(rng.randrange(0, BOUNDARY_EVENTS), []).append(join)
            resuming, live_only = await h.connect(), await h.connect()
            resume_from: Callable[[], int | None] = backend.head_seq if at_head else (lambda c=old_cursor: c)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_publish_with_yields(backend, rng, joins))
                resumed = tg.create_task(_subscribe_when(resuming, resume_join, resume_from))
                live = tg.create_task(_subscribe_when(live_only, live_join, lambda: None))
            backend.commit([transition("marker", "Sent")])  # seq end + 1, after both are caught up
            for client, task, name in ((resuming, resumed, "resuming"), (live_only, live, "live only")):
                first, seqs, _ = task.result()
                seqs += [e["seq"] for e in await client.events_until(end + 1)]
                assert seqs == list(range(first + 1, end + 2)), f"iteration {iteration}, {name}"
            live_only_joined_mid_stream += live.result()[2] < end
            resumed_mid_stream += resumed.result()[2] < end
        finally:
            await h.close()
    # The boundary was crossed while events were flowing, not only after the publisher had finished.
    assert live_only_joined_mid_stream > BOUNDARY_ITERATIONS // 4
    assert resumed_mid_stream > BOUNDARY_ITERATIONS // 4


async def test_cursor_expired_keeps_the_connection(harness: Harness) -> None:
    """A cursor older than the journal keeps, or from another epoch, is refused; list + subscribe works."""
    seed(harness.backend, 20)
    harness.backend.prune(9)  # oldest kept: 10
    client = await harness.connect()
    await client.send({"type": "subscribe", "after_seq": 5, "epoch": EPOCH, "id": 1})
    error = await client.recv_type("error")
    assert error["code"] == "cursor_expired"
    assert (error["oldest_seq"], error["head_seq"], error["id"]) == (10, 20, 1)
    await client.send({"type": "subscribe", "after_seq": 9, "epoch": "another-journal"})
    assert (await client.recv_type("error"))["code"] == "cursor_expired"
    await client.send({"type": "subscribe", "after_seq": 21, "epoch": EPOCH})
    assert (await client.recv_type("error"))["code"] == "cursor_expired"
    # oldest_seq - 1 is still fine: nothing after it is missing.
    await client.send({"type": "subscribe", "after_seq": 9, "epoch": EPOCH})
    assert [e["seq"] for e in await client.events_until(20)] == list(range(10, 21))
    assert (await client.recv_type("caught_up"))["seq"] == 20


async def test_second_subscribe_is_refused(harness: Harness) -> None:
    client = await harness.connect()
    await client.send({"type": "subscribe"})
    await client.recv_type("caught_up")
    await client.send({"type": "subscribe", "id": 2})
    error = await client.recv_type("error")
    assert (error["code"], error["id"]) == ("bad_request", 2)


async def test_requests_work_on_a_subscribed_connection(harness: Harness) -> None:
    client = await harness.connect()
    await client.send({"type": "subscribe"})
    await client.recv_type("caught_up")
    await client.send({"type": "ping", "id": 7})
    assert await client.recv_type("pong") == {"type": "pong", "id": 7}


async def test_half_closed_subscriber_keeps_receiving(harness: Harness) -> None:
    """``echo subscribe | socat`` half-closes after the request and must still get events."""
    client = await harness.connect()
    await client.send({"type": "subscribe"})
    client.writer.write_eof()
    await client.recv_type("caught_up")
    harness.backend.commit([transition("f1", "Sent")])
    assert (await client.recv_type("event"))["seq"] == 1


async def test_many_clients_with_different_filters(harness: Harness) -> None:
    """Each of many concurrent subscribers gets exactly the events its filter selects."""
    filters: list[tuple[dict[str, Any], Callable[[Transition], bool]]] = [
        ({}, lambda t: True),
        ({"fax_ids": ["a", "b"]}, lambda t: t.fax_id in ("a", "b")),
        ({"refs": ["r1"]}, lambda t: t.ref == "r1"),
        ({"extensions": ["222"]}, lambda t: t.extension_id == "222"),
        ({"directions": ["inbound"]}, lambda t: t.direction == "Inbound"),
        (
            {"to_status": ["sendingfailed", "Delivered"]},
            lambda t: t.to_status in ("SendingFailed", "Delivered"),
        ),
        ({"final_only": True}, lambda t: t.final),
        ({"fax_ids": ["a"], "final_only": True}, lambda t: t.fax_id == "a" and t.final),
    ]
    rng = random.Random(5)
    transitions = [
        transition(
            rng.choice("abcde"),
            rng.choice(["Queued", "Sent", "Delivered", "SendingFailed", "Received"]),
            direction=rng.choice(["Outbound", "Inbound"]),
            extension_id=rng.choice(["111", "222"]),
            ref=rng.choice([None, "r1", "r2"]),
        )
        for _ in range(300)
    ]
    clients = []
    for flt, _ in filters * 3:
        client = await harness.connect()
        await client.send({"type": "subscribe", "filter": flt})
        await client.recv_type("caught_up")
        clients.append(client)
    assert harness.subscribers() == len(clients)
    for i in range(0, len(transitions), 7):
        harness.backend.commit(transitions[i : i + 7])
    # One last event that every filter selects marks the end of each stream.
    harness.backend.commit([transition("a", "Delivered", ref="r1", extension_id="222", direction="Inbound")])
    end_seq = harness.backend.head_seq()
    for client, (_, wanted) in zip(clients, filters * 3, strict=True):
        got = [e["seq"] for e in await client.events_until(end_seq)]
        expected = [seq for seq, t in enumerate(transitions, start=1) if wanted(t)]
        assert got == [*expected, end_seq]


_STATUSES = ["Queued", "Sent", "Delivered", "SendingFailed", "Received"]
_END_MARKERS = [
    transition("end", "Delivered", direction=direction, extension_id="999", ref="end")
    for direction in ("Outbound", "Inbound")
]


def _random_filter(rng: random.Random) -> dict[str, Any]:
    """A filter over fax a..h, refs r1..r3, extensions 111..333; it always selects an end marker."""
    flt: dict[str, Any] = {}
    if rng.random() < 0.5:
        flt["fax_ids"] = [*rng.sample("abcdefgh", rng.randint(1, 4)), "end"]
    if rng.random() < 0.4:
        flt["refs"] = [*rng.sample(["r1", "r2", "r3"], rng.randint(1, 2)), "end"]
    if rng.random() < 0.3:
        flt["extensions"] = [*rng.sample(["111", "222", "333"], rng.randint(1, 2)), "999"]
    if rng.random() < 0.3:
        flt["directions"] = [rng.choice(["outbound", "Inbound", "OUTBOUND", "inbound"])]
    if rng.random() < 0.3:
        chosen = rng.sample(_STATUSES, rng.randint(1, 3))
        flt["to_status"] = [rng.choice([s, s.lower(), s.upper()]) for s in chosen] + ["Delivered"]
    if rng.random() < 0.2:
        flt["final_only"] = True
    return flt


def _selects(flt: dict[str, Any], t: Transition) -> bool:
    """The filter semantics of docs/socket-protocol.md, written independently of Filter.matches."""

    def folded(name: str) -> list[str]:
        return [x.casefold() for x in flt.get(name, [])]

    return (
        (not flt.get("final_only") or t.final)
        and (not flt.get("fax_ids") or t.fax_id in flt["fax_ids"])
        and (not flt.get("refs") or t.ref in flt["refs"])
        and (not flt.get("extensions") or t.extension_id in flt["extensions"])
        and (not flt.get("directions") or t.direction.casefold() in folded("directions"))
        and (not flt.get("to_status") or t.to_status.casefold() in folded("to_status"))
    )


@pytest.mark.parametrize("settings_overrides", [{"max_clients": 200, "client_queue": 100_000}])
async def test_100_concurrent_clients_with_different_filters_get_exactly_their_events(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 clients with 100 random filters connect and subscribe (half replaying from a random cursor,
    half live only) while events are being published; each gets exactly the events after its start
    point that its filter selects, in seq order, with no duplicate."""
    monkeypatch.setattr(es, "REPLAY_CHUNK", 7)
    rng = random.Random(100)
    backend = harness.backend

    def random_transition() -> Transition:
        return transition(
            rng.choice("abcdefgh"),
            rng.choice(_STATUSES),
            direction=rng.choice(["Outbound", "Inbound"]),
            extension_id=rng.choice(["111", "222", "333"]),
            ref=rng.choice([None, "r1", "r2", "r3"]),
            index=rng.choice([None, 0, 1]),
        )

    backend.commit([random_transition() for _ in range(200)], publish=False)
    filters = [_random_filter(rng) for _ in range(100)]
    cursors = [rng.randrange(0, 201) if i % 2 == 0 else None for i in range(100)]
    started: list[int] = [0] * 100
    received: list[list[int]] = [[] for _ in range(100)]

    async def run_client(i: int) -> None:
        client = await harness.connect()
        request: dict[str, Any] = {"type": "subscribe", "filter": filters[i], "id": i}
        if cursors[i] is not None:
            request["after_seq"] = cursors[i]
        await client.send(request)
        markers = sum(1 for t in _END_MARKERS if _selects(filters[i], t))
        caught_up = False
        while markers or not caught_up:  # the replay itself may hold the markers
            message = await client.recv()
            if message["type"] == "caught_up":
                assert message["id"] == i
                caught_up = True
                cursor = cursors[i]
                started[i] = cursor if cursor is not None else message["seq"]
            elif message["type"] == "event":
                received[i].append(message["seq"])
                markers -= message["fax_id"] == "end"
            else:
                assert message["type"] == "heartbeat", message

    async def publish() -> None:
        for _ in range(100):
            backend.commit([random_transition() for _ in range(rng.randint(1, 10))])
            await asyncio.sleep(0)  # let clients connect, subscribe and replay in between
        backend.commit(_END_MARKERS)

    async with asyncio.TaskGroup() as tg:
        for i in range(100):
            tg.create_task(run_client(i))
        tg.create_task(publish())
    assert harness.subscribers() == 100
    journal = {e.seq: e.transition for e in backend.journal}
    live_only_started_late = 0
    for i in range(100):
        expected = [seq for seq, t in sorted(journal.items()) if seq > started[i] and _selects(filters[i], t)]
        assert received[i] == expected, (i, filters[i], cursors[i])
        live_only_started_late += cursors[i] is None and started[i] > 200
    assert live_only_started_late > 0, "no subscriber joined while events were being published"


# ------------------------------------------------------------------------------------------ slow clients


async def test_slow_consumer_is_cut_off_with_its_resume_point(short_dir: Path) -> None:
    """A subscriber that stops reading gets slow_consumer with the last seq written; others get everything."""
    h = await start_harness(short_dir, client_queue=8)
    try:
        slow = await h.connect(limit=1024)
        fast = await h.connect()
        for client in (slow, fast):
            await client.send({"type": "subscribe"})
            await client.recv_type("caught_up")
        fast_events: list[dict[str, Any]] = []

        async def read_fast() -> None:
            fast_events.extend(await fast.events_until(4000))

        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(read_fast())
            for i in range(4000):
                # publish() is synchronous: it cannot block on the slow client by construction.
                h.backend.commit([transition(f"x{i}", "Queued")])
                if i % 4 == 0:
                    await asyncio.sleep(0)  # let the writers run, as the daemon's loop would
            await reader
        assert [e["seq"] for e in fast_events] == list(range(1, 4001))

        # Now read what the slow client was sent: events in order, then the error, then EOF.
        seqs = []
        while True:
            message = await slow.recv()
            if message["type"] != "event":
                break
            seqs.append(message["seq"])
            # Publishing is over: a client never cut off has every event queued for it. Fail at the
            # last one rather than wait for a line that will never come.
            assert seqs[-1] < 4000, "the slow client was sent every event: never cut off"
        assert message["type"] == "error"
        assert message["code"] == "slow_consumer"
        assert seqs == list(range(1, len(seqs) + 1))
        assert message["resume_after_seq"] == seqs[-1]
        assert seqs[-1] < 4000
        await slow.expect_eof()
        assert h.disconnects("slow_consumer") == 1
        assert h.subscribers() == 1
    finally:
        await h.close()


def _disconnect_lines(logs: list[dict[str, Any]], client_id: int) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "socket.client_disconnected" and e.get("client") == client_id]


def _send_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "socket.send() raised exception" in r.getMessage()]


async def test_a_cut_off_slow_consumer_is_never_written_to_again(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stops reading is cut off while publishes go on: one disconnect line for it, and
    asyncio never complains of writes to its closing transport."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    h = await start_harness(short_dir, client_queue=8)
    with capture_logs() as logs:
        try:
            slow = await h.connect(limit=1024)
            await slow.send({"type": "subscribe"})
            await slow.recv_type("caught_up")
            for i in range(2000):
                h.backend.commit([transition(f"x{i}", "Queued")])
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let the writer run, as the daemon's loop would
            # The client goes away without reading; the server still publishes.
            slow.writer.transport.abort()
            for i in range(2000, 2300):
                h.backend.commit([transition(f"x{i}", "Queued")])
        finally:
            await h.close()
    assert h.disconnects("slow_consumer") == 1
    assert [e["event"] for e in logs].count("socket.slow_consumer") == 1
    assert [e["reason"] for e in _disconnect_lines(logs, 1)] == ["slow_consumer"]
    assert _send_errors(caplog) == []


async def test_a_peer_that_vanished_is_closed_once_not_written_to(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer is gone before the server's reader noticed (its transport is closing after the first
    failed write) and 300 publishes follow at once: the connection is closed once, never written to."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    h = await start_harness(short_dir)
    with capture_logs() as logs:
        try:
            gone = await h.connect()
            await gone.send({"type": "subscribe"})
            await gone.recv_type("caught_up")
            # Synchronous: the server's reader gets no chance to see the EOF before the publishes.
            gone.writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            for i in range(300):
                h.backend.commit([transition(f"y{i}", "Queued")])
        finally:
            await h.close()
    assert _send_errors(caplog) == []
    lines = _disconnect_lines(logs, 1)
    assert len(lines) == 1, lines
    assert h.subscribers() == 0


class _CountingTransport:
    """Wraps a client's transport on the server side and counts publish()'s direct writes."""

    def __init__(self, inner: asyncio.WriteTransport) -> None:
        self.inner = inner
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("settings_overrides", [{"client_queue": 100_000}])
async def test_order_is_kept_when_direct_writes_and_the_queue_alternate(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live client that stops reading mid-stream fills its transport, so publish() switches from
    writing directly to queueing; as it reads again (with events still being published while the
    transport and the queue drain), publish() goes back to writing directly. Over several such rounds
    (1-3 events per publish, the writer running at random points) the client gets every event once,
    in seq order."""
    client = await harness.connect(limit=1024)  # the StreamReader stops reading at 2 KiB unread
    await client.send({"type": "subscribe"})
    await client.recv_type("caught_up")
    (server_side,) = harness.server._subscribers
    # A small kernel buffer: the transport's own buffer fills after a few hundred events.
    server_side.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    counting = _CountingTransport(server_side.transport)
    monkeypatch.setattr(server_side, "transport", counting)
    rng = random.Random(6)
    backend = harness.backend
    paths: list[str] = []  # per publish(): "direct" or "queued"

    def publish() -> None:
        before = counting.writes
        backend.commit([transition(f"o{backend.head_seq()}", "Queued") for _ in range(rng.randint(1, 3))])
        paths.append("direct" if counting.writes > before else "queued")

    received: list[int] = []
    for _ in range(4):
        # Live and keeping up: every publish is a direct write.
        for _ in range(20):
            publish()
            received += [e["seq"] for e in await client.events_until(backend.head_seq())]
        assert paths[-20:] == ["direct"] * 20
        # Stalled: publish until the queue has been in use for 50 publishes in a row.
        while paths[-50:] != ["queued"] * 50:
            publish()
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # the writer moves the queue into the transport
        assert server_side.transport.get_write_buffer_size() > 0
        # Read again, publishing as the transport drains, until publish() writes directly again.
        while paths[-10:] != ["direct"] * 10:
            publish()
            for _ in range(rng.randint(1, 8)):
                message = await client.recv()
                assert message["type"] == "event", message
                received.append(message["seq"])
        received += [e["seq"] for e in await client.events_until(backend.head_seq())]
        assert not server_side.queue
    switches = sum(a != b for a, b in itertools.pairwise(paths))
    assert switches >= 7, paths
    assert received == list(range(1, backend.head_seq() + 1))
    assert harness.disconnects("slow_consumer") == 0


@pytest.mark.looptime
async def test_heartbeats_from_one_timer_only_to_quiet_connections(harness: Harness) -> None:
    """The server-wide heartbeat timer serves each connection on its own schedule: an idle one every
    interval, a subscriber receiving events only once it has been quiet for the interval."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    idle = await harness.connect()
    busy = await harness.connect()
    await busy.send({"type": "subscribe"})
    await busy.recv_type("caught_up")
    got: dict[str, list[tuple[str, float]]] = {"idle": [], "busy": []}

    async def read(name: str, client: SocketClient, count: int) -> None:
        while len(got[name]) < count:
            message = await client.recv(within=100)
            got[name].append((message["type"], round(loop.time() - started, 1)))

    async def publish() -> None:
        for _ in range(4):  # at 10, 20, 30 and 40 s; then quiet
            await asyncio.sleep(10)
            harness.backend.commit([transition("f1", "Sent")])

    async with asyncio.TaskGroup() as tg:
        tg.create_task(read("idle", idle, 4))
        tg.create_task(read("busy", busy, 5))
        tg.create_task(publish())
    assert got["idle"] == [("heartbeat", 15.0), ("heartbeat", 30.0), ("heartbeat", 45.0), ("heartbeat", 60.0)]
    assert got["busy"] == [
        ("event", 10.0),
        ("event", 20.0),
        ("event", 30.0),
        ("event", 40.0),
        ("heartbeat", 55.0),
    ]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("line", "reply_id"),
    [
        (b"not json\n", None),
        (b"[1,2]\n", None),
        (b'{"type":"nope","id":"x"}\n', "x"),
        (b'{"type":"status","fax_id":5,"id":3}\n', 3),
        (b'{"type":"subscribe","after_seq":"1"}\n', None),
        (b"\xff\xfe\n", None),
        (b"[" * 5000 + b"\n", None),
        (b'{"a":{"b":{"c":{"d":{"e":{"f":1}}}}},"type":"ping"}\n', None),
        (
            b'{"type":"send","to":[{"phone":"+1555"}],"documents":[{"name":"a","content_type":"x","data":"@@"}]}\n',
            None,
        ),
    ],
)
async def test_bad_lines_get_an_error_and_keep_the_connection(
    harness: Harness, line: bytes, reply_id: object
) -> None:
    client = await harness.connect()
    await client.send(line)
    error = await client.recv_type("error")
    assert error["code"] == "bad_request"
    assert error.get("id") == reply_id
    await client.send({"type": "ping"})
    assert await client.recv_type("pong") == {"type": "pong"}


async def test_blank_lines_are_ignored(harness: Harness) -> None:
    client = await harness.connect()
    await client.send(b"\n  \n")
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"


@pytest.mark.parametrize("settings_overrides", [{"max_line": 1024, "max_send_line": 1 << 20}])
async def test_over_long_lines_close_the_connection(harness: Harness) -> None:
    """Over max_line (and not a send), or over max_send_line: an error, then the server closes."""
    client = await harness.connect()
    await client.send(json.dumps({"type": "ping", "pad": "x" * 2000}).encode() + b"\n")
    assert (await client.recv_type("error"))["code"] == "bad_request"
    await client.expect_eof()

    client = await harness.connect()
    # No newline at all. Written without drain(): the server closes with our bytes unread, which
    # resets our sending side, but the error line is already in our receive queue.
    client.writer.write(b"x" * (2 << 20))
    error = await client.recv_type("error")
    assert "longer than" in error["message"]
    await client.expect_eof()
    assert harness.disconnects("line_too_long") == 2


@pytest.mark.parametrize("settings_overrides", [{"max_line": 1024, "max_send_line": 1 << 20}])
async def test_send_may_use_the_larger_limit(harness: Harness) -> None:
    client = await harness.connect()
    document = {"name": "a.pdf", "content_type": "application/pdf", "data": "QUJD" * 2000}
    await client.send({"type": "send", "to": [{"phone": "+15551230000"}], "documents": [document]})
    assert (await client.recv_type("accepted"))["status"] == "Queued"
    assert harness.backend.sent[0].documents[0].data == b"ABC" * 2000


@pytest.mark.parametrize("settings_overrides", [{"max_clients": 2}])
async def test_max_clients_busy(harness: Harness) -> None:
    await harness.connect()
    await harness.connect()
    third = await harness.connect(hello=False)
    assert (await third.recv())["code"] == "busy"
    await third.expect_eof()
    assert harness.disconnects("busy") == 1


async def test_allow_lists_are_enforced(short_dir: Path) -> None:
    h = await start_harness(short_dir, allowed_uids=(os.getuid() + 4242,), allowed_gids=(os.getgid() + 4242,))
    try:
        client = await h.connect(hello=False)
        assert (await client.recv())["code"] == "unauthorized"
        await client.expect_eof()
        assert h.disconnects("unauthorized") == 1
    finally:
        await h.close()
    h = await start_harness(short_dir, allowed_gids=(os.getgid(),))
    try:
        await h.connect()  # asserts hello
    finally:
        await h.close()


# ------------------------------------------------------------------------------------------ requests


async def test_status_list_history_sync_ping(harness: Harness) -> None:
    b = harness.backend
    b.commit(
        [transition("f1", "Queued", ref="mine"), transition("f1", "SendingFailed", error_code="LineBusy")]
    )
    b.commit([transition("f2", "Queued", index=0), transition("f2", "Queued", index=1)])
    client = await harness.connect()

    await client.send({"type": "status", "fax_id": "f1", "id": 1})
    reply = await client.recv_type("fax")
    assert reply["id"] == 1
    assert reply["fax"]["recipients"] == [
        {"index": 0, "phone": "+15550001111", "status": "SendingFailed", "error_code": "LineBusy"}
    ]
    assert reply["fax"]["final"] is True
    await client.send({"type": "status", "ref": "mine"})
    assert (await client.recv_type("fax"))["fax"]["fax_id"] == "f1"
    await client.send({"type": "status", "fax_id": "nope"})
    assert (await client.recv_type("error"))["code"] == "not_found"

    await client.send({"type": "list", "active_only": True})
    reply = await client.recv_type("faxes")
    assert [f["fax_id"] for f in reply["faxes"]] == ["f2"]
    assert reply["head_seq"] == 4
    await client.send({"type": "list", "active_only": False})
    assert {f["fax_id"] for f in (await client.recv_type("faxes"))["faxes"]} == {"f1", "f2"}

    await client.send({"type": "history", "fax_id": "f1"})
    events = (await client.recv_type("history"))["events"]
    assert [(e["seq"], e["to_status"]) for e in events] == [(1, "Queued"), (2, "SendingFailed")]
    await client.send({"type": "history", "fax_id": "nope", "id": "h"})
    assert await client.recv_type("error") == {
        "type": "error", "code": "not_found", "message": "no fax nope", "id": "h"
    }  # fmt: skip

    await client.send({"type": "sync", "id": 9})
    assert await client.recv_type("ok") == {"type": "ok", "id": 9}
    assert b.sync_calls == 1
    await client.send({"type": "ping"})
    assert await client.recv_type("pong") == {"type": "pong"}


async def test_send_accepted_and_refused(harness: Harness) -> None:
    client = await harness.connect()
    request = {
        "type": "send", "id": "s", "to": [{"phone": "+15551230000"}], "ref": "order-7",
        "documents": [{"name": "a.txt", "content_type": "text/plain", "data": "aGVsbG8="}],
        "resolution": "Low", "cover_text": "hi",
    }  # fmt: skip
    await client.send(request)
    reply = await client.recv_type("accepted")
    assert reply == {"type": "accepted", "fax_id": "9001", "ref": "order-7", "status": "Queued", "id": "s"}
    sent = harness.backend.sent[0]
    assert (sent.resolution, sent.cover_text, sent.documents[0].data) == ("Low", "hi", b"hello")

    harness.backend.send_error = SendError("upstream", "FaxDocument is too large", rc_code="FAX-101")
    await client.send(request)
    assert await client.recv_type("error") == {
        "type": "error", "code": "upstream", "message": "FaxDocument is too large", "rc_code": "FAX-101",
        "id": "s",
    }  # fmt: skip


async def test_backend_bug_is_an_internal_error_not_a_crash(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(active_only: bool) -> list[FaxState]:
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.backend, "faxes", broken)
    client = await harness.connect()
    await client.send({"type": "list"})
    assert (await client.recv_type("error"))["code"] == "internal"
    await client.send({"type": "ping"})
    assert (await client.recv_type("pong"))["type"] == "pong"


# ------------------------------------------------------------------------------------------ timers


@pytest.mark.looptime
async def test_heartbeat_when_idle(harness: Harness) -> None:
    seed(harness.backend, 2)
    client = await harness.connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await client.recv(within=100) == {"type": "heartbeat", "head_seq": 2}
    assert loop.time() - started == pytest.approx(15, abs=0.5)


@pytest.mark.looptime
@pytest.mark.parametrize("settings_overrides", [{"subscribe_timeout": 30, "heartbeat_interval": 100}])
async def test_idle_unsubscribed_client_is_closed(harness: Harness) -> None:
    client = await harness.connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send({"type": "ping"})
    await client.recv_type("pong")
    assert await client.recv(within=100) == {"type": "bye", "reason": "idle_timeout"}
    await client.expect_eof()
    assert loop.time() - started == pytest.approx(30, abs=0.5)
    assert harness.disconnects("idle_timeout") == 1


# ------------------------------------------------------------------------------------------ lifecycle


async def test_socket_file_mode_stale_socket_and_unlink(short_dir: Path) -> None:
    """A stale socket is replaced, the mode is applied, and close() removes the file."""
    path = short_dir / "events.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: a crashed daemon's leftover
    stale.close()
    h = await start_harness(short_dir, mode=0o600)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # A second server must not steal a live socket.
        other = EventServer(h.settings, MemoryBackend(), Metrics(CollectorRegistry()), server_name="x")
        with pytest.raises(RuntimeError, match="another process"):
            await other.start()
        await h.connect()
    finally:
        await h.close()
    assert not path.exists()


async def test_refuses_to_replace_a_regular_file(short_dir: Path) -> None:
    (short_dir / "events.sock").write_text("precious")
    with pytest.raises(SocketSetupError, match="exists and is not a socket; refusing to replace it"):
        await start_harness(short_dir)
    assert (short_dir / "events.sock").read_text() == "precious"


async def test_close_says_bye_to_everyone_and_is_bounded(short_dir: Path) -> None:
    """close() sends bye, closes every client (even one stuck in a request), and returns in time."""
    h = await start_harness(short_dir, close_timeout=0.5)
    h.backend.send_gate = asyncio.Event()  # send() never finishes
    subscribed = await h.connect()
    await subscribed.send({"type": "subscribe"})
    await subscribed.recv_type("caught_up")
    idle = await h.connect()
    stuck = await h.connect()
    await stuck.send(
        {
            "type": "send",
            "to": [{"phone": "+1555"}],
            "documents": [{"name": "a.txt", "content_type": "text/plain", "data": "aGVsbG8="}],
        }
    )
    await h.backend.send_started.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await h.server.close()
        assert loop.time() - started < 3
        for client in (subscribed, idle, stuck):
            assert await client.recv() == {"type": "bye", "reason": "shutdown"}
            await client.expect_eof()
        assert h.disconnects("shutdown") == 3
        with pytest.raises(FileNotFoundError):  # unlinked
            await asyncio.open_unix_connection(h.path)
    finally:
        await h.close()


# ------------------------------------------------------------------------------------------ fuzzing

_REPLIES = {"error", "fax", "faxes", "history", "accepted", "ok", "pong", "caught_up", "page"}


@pytest.mark.parametrize("settings_overrides", [{"max_clients": 10_000}])
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(request_lines(), min_size=1, max_size=3))
async def test_fuzz_random_request_lines_never_break_the_server(harness: Harness, lines: list[bytes]) -> None:
    """Random lines on one connection: each gets one reply (an error with a known code, never
    ``internal``, or a real reply) and the connection still answers ping after each; the same server
    serves every example, so one that broke it would fail all the later ones."""
    if not harness.backend.journal:
        seed(harness.backend, 3)
    client = await harness.connect()
    try:
        for raw in lines:
            await client.send(raw)
            if raw.strip():
                reply = await client.recv()
                while reply["type"] in ("event", "heartbeat"):  # a fuzzed subscribe may replay
                    reply = await client.recv()
                assert reply["type"] in _REPLIES, reply
                event(f"reply {reply['type']} {reply.get('code', '')}")
                if reply["type"] == "error":
                    assert reply["code"] in ERROR_CODES, reply
                    assert reply["code"] != "internal", reply
            await client.send({"type": "ping", "id": "after"})
            while (message := await client.recv())["type"] != "pong":
                assert message["type"] in ("event", "heartbeat", "caught_up"), message
            assert message == {"type": "pong", "id": "after"}
    finally:
        harness.clients.remove(client)
        await client.close()
