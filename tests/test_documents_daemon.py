"""Inbound fax documents, the daemon in this process against the simulator on loopback: the download
and its event, 5xx and Medium-group 429s retried as the server asks, a full disk reported and retried,
retention. (Pure rules and the spool write: tests/test_documents.py; crash and ``faxd fetch``:
tests/test_documents_crash.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_support import RunningDaemon, started
from documents_support import fill, small_tmpfs
from ops_support import until
from prometheus_client import CollectorRegistry
from socket_client import SocketClient
from structlog.testing import capture_logs

from faxd.adapters.documents import Documents, DocumentSettings
from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import RingCentral
from faxd.adapters.scheduling import RequestDriver
from faxd.adapters.store import Journalled, Store
from faxd.config import Config
from faxd.core import documents as core, ratebudget
from faxd.core.model import Event, Source
from faxd.core.scheduler import Scheduler, SchedulerSettings
from faxd.core.status import apply_record, diff
from faxd.sim import Simulator

Message = dict[str, Any]
CONTENT = "/content/{attachmentId}"


# ------------------------------------------------------------------------------- the daemon, on loopback


def documents_config(make_config: Callable[..., Config], sim: Simulator, **extra: Any) -> Config:
    return make_config(sim, documents={"enabled": True, "spool_dir": "spool", **extra})


@pytest.fixture
async def faxd(sim: Simulator, make_config: Callable[..., Config]) -> AsyncIterator[RunningDaemon]:
    async with started(documents_config(make_config, sim)) as running:
        yield running


def sample(faxd: RunningDaemon, name: str, **labels: str) -> float:
    value = faxd.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def event_of(client: SocketClient, fax_id: str, kind: str) -> Message:
    return await client.until(
        lambda m: m.get("type") == "event" and m["fax_id"] == fax_id and m["kind"] == kind, within=60
    )


async def documents_of(client: SocketClient, fax_ids: list[str]) -> list[Message]:
    """The document events of ``fax_ids`` (in that order), whichever comes first."""
    found: dict[str, Message] = {}
    while len(found) < len(fax_ids):
        message = await client.until(
            lambda m: m.get("type") == "event" and m["kind"] == "document", within=60
        )
        found[message["fax_id"]] = message
    return [found[fax_id] for fax_id in fax_ids]


def attachment_of(sim: Simulator, fax_id: str) -> bytes:
    return sim.store.messages[int(fax_id)].attachments[0].data


def content_requests(sim: Simulator, fax_id: str) -> list[tuple[float, int, str | None]]:
    return [
        (r.time, r.status, r.group)
        for r in sim.requests_to(CONTENT)
        if f"/message-store/{fax_id}/" in (r.raw_path or "")
    ]


def read(event: Message) -> bytes:
    """The bytes of the file a document event names."""
    return Path(event["document"]["path"]).read_bytes()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def partials(spool: Path) -> list[Path]:
    return list(spool.glob("*/.*.part"))


async def test_a_received_fax_document_is_downloaded_and_announced(
    faxd: RunningDaemon, sim: Simulator, short_dir: Path
) -> None:
    client = await SocketClient.subscribed(faxd.socket)
    try:
        fax_id = sim.create_inbound_fax(None, "+15551230000", pages=3)
        received = await event_of(client, fax_id, "status")
        document = await event_of(client, fax_id, "document")
    finally:
        await client.close()
    data = attachment_of(sim, fax_id)
    assert received["to_status"] == "Received"
    assert "document" not in received  # the download comes after the status: a document event follows
    assert document["seq"] > received["seq"]
    assert (document["from_status"], document["to_status"], document["final"]) == (
        "Received",
        "Received",
        True,
    )
    assert document["source"] == "fetch"
    assert document["pages"] == 3
    ref = document["document"]
    path = Path(ref["path"])
    assert read(document) == data
    assert ref == {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "pages": 3,
        "bytes": len(data),
        "content_type": "application/pdf",
    }
    assert mode_of(path) == 0o640
    extension = sim.message(fax_id)["extensionId"]
    assert path.parent == short_dir / "spool" / extension
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-{fax_id}\.pdf", path.name)
    # One download, counted in the Medium group, and in the metrics.
    assert [(status, group) for _, status, group in content_requests(sim, fax_id)] == [(200, "Medium")]
    assert sample(faxd, "faxd_documents_downloaded_total") == 1
    assert sample(faxd, "faxd_documents_bytes_total") == len(data)
    assert sample(faxd, "faxd_documents_pending") == 0
    # A replay from the journal gives the same event, byte for byte as a client parses it.
    replay = await SocketClient.subscribed(faxd.socket, received["seq"])
    try:
        assert await event_of(replay, fax_id, "document") == document
    finally:
        await replay.close()


async def test_server_errors_are_retried_with_backoff(faxd: RunningDaemon, sim: Simulator) -> None:
    sim.fail_next_requests(2, status=503, match="/content/", retry_after=None)
    client = await SocketClient.subscribed(faxd.socket)
    try:
        with capture_logs() as logs:
            fax_id = sim.create_inbound_fax(None, "+15551230001", pages=2)
            document = await event_of(client, fax_id, "document")
    finally:
        await client.close()
    assert read(document) == attachment_of(sim, fax_id)
    tries = content_requests(sim, fax_id)
    assert [status for _, status, _ in tries] == [503, 503, 200]
    # Backoff: at least RETRY_BASE/2, then twice that, between the tries.
    assert tries[1][0] - tries[0][0] >= core.RETRY_BASE * 0.5 - 0.05
    assert tries[2][0] - tries[1][0] >= core.RETRY_BASE - 0.05
    assert sample(faxd, "faxd_documents_failed_total", reason="server") == 2
    failures = [e for e in logs if e["event"] == "documents.download_failed"]
    assert [(e["reason"], e["attempt"]) for e in failures] == [("server", 1), ("server", 2)]


async def test_a_medium_group_429_holds_every_download_back_for_its_retry_after(
    faxd: RunningDaemon, sim: Simulator
) -> None:
    client = await SocketClient.subscribed(faxd.socket)
    try:
        # The WebSocket subscription (Medium too) is made before the storm.
        await until(lambda: sample(faxd, "faxd_ws_state", faxd_ws_state="up") == 1)
        sim.rate_limit_storm("Medium", 6)
        faxes = [sim.create_inbound_fax(None, "+15551230003"), sim.create_inbound_fax(None, "+15551230006")]
        documents = await documents_of(client, faxes)
    finally:
        await client.close()
    for fax_id, document in zip(faxes, documents, strict=True):
        assert read(document) == attachment_of(sim, fax_id)
    tries = sorted(t for fax_id in faxes for t in content_requests(sim, fax_id))
    # One 429, then nothing of the Medium group until its Retry-After (the rest of the storm) had
    # passed: neither the fax that got it (its own 1-2 s backoff would fall into the storm) nor the
    # other one, which waits for the group's budget.
    assert [status for _, status, _ in tries] == [429, 200, 200], tries
    assert sample(faxd, "faxd_documents_failed_total", reason="rate_limited") == 1
    assert sample(faxd, "faxd_rate_limited_total", group="Medium") == 1


async def test_a_full_disk_is_reported_and_the_document_is_written_once_there_is_room(
    sim: Simulator, make_config: Callable[..., Config], short_dir: Path
) -> None:
    with small_tmpfs(short_dir / "spool") as spool:
        filler = fill(spool)
        async with started(documents_config(make_config, sim)) as faxd:
            client = await SocketClient.subscribed(faxd.socket)
            try:
                with capture_logs() as logs:
                    fax_id = sim.create_inbound_fax(None, "+15551230004", pages=30)
                    await event_of(client, fax_id, "status")
                    await until(lambda: sample(faxd, "faxd_documents_failed_total", reason="disk") >= 1)
                    assert sample(faxd, "faxd_documents_pending") == 1
                    filler.unlink()
                    document = await event_of(client, fax_id, "document")
            finally:
                await client.close()
            (failed, *_) = [e for e in logs if e["event"] == "documents.write_failed"]
            assert failed["log_level"] == "error"
            assert failed["error"].startswith("ENOSPC")
            assert failed["fax_id"] == fax_id
            assert read(document) == attachment_of(sim, fax_id)
            assert document["document"]["pages"] == 30
            assert not partials(spool)
            assert sample(faxd, "faxd_documents_pending") == 0
            assert sample(faxd, "faxd_documents_downloaded_total") == 1


async def test_retention_deletes_old_files(sim: Simulator, make_config: Callable[..., Config]) -> None:
    async with started(documents_config(make_config, sim)) as faxd:
        client = await SocketClient.subscribed(faxd.socket)
        try:
            fax_id = sim.create_inbound_fax(None, "+15551230005")
            document = await event_of(client, fax_id, "document")
        finally:
            await client.close()
    path = Path(document["document"]["path"])
    assert read(document)
    store = Store(faxd.config.store.path)
    store.open()
    try:
        # Downloaded 31 days ago, as far as the store knows.
        store.db.execute("UPDATE documents SET done_at = done_at - 31 * 86400 WHERE fax_id = ?", (fax_id,))
    finally:
        store.close()
    async with started(documents_config(make_config, sim, retention_days=30)):
        await until(lambda: not os.path.exists(path))
    store.open()
    try:
        assert store.db.execute("SELECT state FROM documents WHERE fax_id = ?", (fax_id,)).fetchone() == (
            "removed",
        )
    finally:
        store.close()


def journal_received(store: Store, sim: Simulator, fax_id: str) -> list[Event]:
    """Journal ``fax_id``'s Received status as the reconciler does (state and transition in one commit)."""
    record = sim.message(fax_id)
    state = apply_record(None, record, extension_id=str(record["extensionId"]))
    assert state is not None
    journalled = [Journalled(t, Source.POLL) for t in diff(None, state, settle=False)]
    return store.commit([state], journalled, observed_at="t")


@contextlib.asynccontextmanager
async def ringcentral(sim: Simulator, metrics: Metrics) -> AsyncIterator[RingCentral]:
    async with aiohttp.ClientSession() as session:
        rc = RingCentral(
            session,
            server=sim.url,
            client_id=sim.config.client_id,
            client_secret=sim.config.client_secret,
            jwt=sim.config.jwt,
            metrics=metrics,
        )
        try:
            yield rc
        finally:
            await rc.aclose()


async def run_until_published(documents: Documents, published: list[Event]) -> None:
    worker = asyncio.create_task(documents.run())
    try:
        await until(lambda: bool(published))
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def test_a_received_fax_journalled_just_before_a_crash_is_downloaded_after_the_restart(
    sim: Simulator, short_dir: Path
) -> None:
    """Killed between the journal's commit and the hand-over to the downloader: the start-up reads the
    journal after the downloader's cursor and queues the fax."""
    metrics = Metrics(CollectorRegistry())
    store = Store(short_dir / "faxd.db")
    store.open()
    published: list[Event] = []
    settings = DocumentSettings(short_dir / "spool")
    try:
        async with ringcentral(sim, metrics) as rc:
            Documents(settings, rc, store, metrics, published.extend)  # the daemon before the crash
            fax_id = sim.create_inbound_fax(None, "+15551230008", pages=4)
            journal_received(store, sim, fax_id)  # ... committed, never handed over
            documents = Documents(settings, rc, store, metrics, published.extend)  # the restart
            assert metrics.registry.get_sample_value("faxd_documents_pending") == 1
            await run_until_published(documents, published)
    finally:
        store.close()
    (event,) = published
    assert event.transition.fax_id == fax_id
    assert event.transition.document is not None
    assert event.transition.document.pages == 4


@contextlib.asynccontextmanager
async def scheduled(rc: RingCentral, metrics: Metrics) -> AsyncIterator[RequestDriver]:
    """``rc`` behind a running request scheduler, wired as the daemon's engine does, push down: the
    state in which the push reserve is free to status tracking (outage polls, settle checks) and the
    subscription is being made again, so a document must leave it the most."""
    driver = RequestDriver(Scheduler(rc.budget, SchedulerSettings()), metrics)
    rc.use_gate(driver)
    driver.set_push(False)
    task = asyncio.create_task(driver.run())
    try:
        yield driver
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def spend(driver: RequestDriver, group: str, n: int) -> None:
    """Spend ``n`` of ``group``'s tokens as requests made outside any work would (one grant each)."""
    for _ in range(n):
        async with driver.single(group) as permit:
            assert permit.take(group, driver.now())


@pytest.mark.parametrize("group", [ratebudget.LIGHT, ratebudget.MEDIUM])
async def test_documents_wait_for_the_budget_and_leave_the_push_reserve_to_status_tracking(
    sim: Simulator, short_dir: Path, group: str
) -> None:
    """The lookup (Light) and the download (Medium) are the scheduler's work below the push reserve:
    with the bucket down to that reserve the document's request waits for the refill, while status
    tracking's own request (a settle check's Light, the subscription's Medium) still goes at once."""
    metrics = Metrics(CollectorRegistry())
    store = Store(short_dir / "faxd.db")
    store.open()
    published: list[Event] = []
    path = "/message-store/{messageId}" if group == ratebudget.LIGHT else CONTENT
    try:
        async with ringcentral(sim, metrics) as rc, scheduled(rc, metrics) as driver:
            await rc.login()
            documents = Documents(
                DocumentSettings(short_dir / "spool"), rc, store, metrics, published.extend, driver=driver
            )
            fax_id = sim.create_inbound_fax(None, "+15551230007", pages=2)
            documents.published(journal_received(store, sim, fax_id))
            if group == ratebudget.MEDIUM:  # the lookup first, so that the download is what waits
                found = await rc.get_messages(str(sim.message(fax_id)["extensionId"]), [fax_id])
                attachment = core.pick_attachment(found[fax_id] or {})
                assert attachment is not None
                store.db.execute(
                    "UPDATE documents SET attachment_id = ?, content_type = ? WHERE fax_id = ?",
                    (attachment.id, attachment.content_type, fax_id),
                )
            await spend(driver, group, 3)  # a bucket of 4: one token left, the push reserve
            drained = asyncio.get_running_loop().time()
            worker = asyncio.create_task(run_until_published(documents, published))
            await spend(driver, group, 1)  # status tracking's request meanwhile: at once
            tracked = asyncio.get_running_loop().time()
            await worker
    finally:
        store.close()
    (request,) = [
        r for r in sim.requests_to(path, "GET") if fax_id in (r.raw_path or "") and r.time > drained
    ]
    assert tracked - drained < 1.0
    # Two tokens (its own and the reserve) at 0.6 (Light) or 0.47 (Medium) a second from empty.
    assert request.time - tracked >= 2.5
    assert published[0].transition.document is not None
