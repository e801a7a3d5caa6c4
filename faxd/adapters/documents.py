"""Received fax documents: downloads each one into the spool directory and journals a ``document`` event.

Driven by the journal, so it inherits its guarantees. Every inbound ``Received`` status event becomes a
row of the store's ``documents`` table in the same transaction that moves the cursor
``documents_after_seq`` past it: live through the daemon's fan-out (:meth:`Documents.published`), and at
start-up from the journal after the cursor, so a crash between the two loses nothing. On first use the
cursor starts at the journal's head: faxes received before documents were enabled are fetched only
on request (``faxd fetch ID``).

The worker (:meth:`Documents.run`) takes the due rows one at a time:

1. the attachment to download, from the message record (``GET …/message-store/{id}``, Light);
2. its content (``GET …/content/{attachmentId}``, Medium);
   each is work of the request scheduler (:meth:`RequestDriver.execute`, key ``("doc", fax_id)``, one
   request, class :data:`PRIORITY`), so the scheduler alone decides when it goes: only from the
   headroom, never the push reserve (status tracking and the WebSocket subscription come first) and
   nothing during a 429 penalty of its group. Without a driver (a worker tested alone) ``rest.py``
   budgets each request itself;
3. written atomically (a temp file in the same directory, fsync, rename, fsync of the directory), with
   the configured mode, in a thread: a reader never sees a partial file under the final name;
4. a ``document`` event journalled (deduplicated: a second download of the same fax journals none),
   published, then the row marked done.

A 404 for the message ends its row (``gone``). Everything else (429, 5xx, no answer, 4xx, a full
disk) is counted, logged and retried with backoff (:func:`faxd.core.documents.retry_delay`), forever:
nothing is dropped. Retention deletes files older than ``retention_days``.

This module must not decide names, page counts or retry delays (:mod:`faxd.core.documents`), must not
block the event loop with file writes, and must never log a phone number or a document's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import structlog

from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import ApiError, ExtensionNotFound, RateLimited, RingCentral, Stopping
from faxd.adapters.scheduling import RequestDriver
from faxd.adapters.store import Journalled, Store
from faxd.core import ratebudget
from faxd.core.documents import Attachment, expired, page_count, pick_attachment, relative_path, retry_delay
from faxd.core.model import DocumentRef, Event, EventKind, FaxStatus, Source, Transition
from faxd.core.protocol import FetchError
from faxd.core.scheduler import Priority, Work

log = structlog.get_logger(__name__)

#: The documents' class in the request scheduler: the lowest that never spends the push reserve.
#: Not SAFETY_POLL: one that waited a whole poll interval is raised to ACTIVE_POLL, which spends the
#: reserve while push is down, just when the subscription (Medium) and the outage polls (Light) need it.
PRIORITY: Final = Priority.RESYNC
T = TypeVar("T")
CURSOR_KEY = "documents_after_seq"
PARTIAL_SUFFIX = ".part"


@dataclass(frozen=True)
class DocumentSettings:
    spool_dir: Path
    mode: int = 0o640
    retention_days: int | None = None
    prune_interval: float = 3600.0


class _Gone(Exception):
    """RingCentral no longer has the message, or it has no attachment: nothing to download."""


@dataclass(frozen=True)
class _Row:
    fax_id: str
    extension_id: str
    created: str | None
    attempts: int
    next_try: float
    attachment_id: str | None
    content_type: str | None
    page_hint: int | None


_ROW_COLUMNS = "fax_id, extension_id, created, attempts, next_try, attachment_id, content_type, page_hint"


def _wanted(fields: dict[str, Any]) -> bool:
    """A fax's own Received event: its document is to be downloaded."""
    return (
        fields.get("kind") == EventKind.STATUS.value
        and fields.get("direction") == "Inbound"
        and fields.get("to_status") == FaxStatus.RECEIVED.value
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """``data`` as the file ``path`` with ``mode``, all or nothing: written to a temp file in the same
    directory (0600 until complete), fsynced, renamed over ``path``, and the directory fsynced.

    Raises OSError (ENOSPC, EDQUOT, EFBIG, EACCES, ...) with the temp file removed."""
    directory = path.parent
    if not directory.is_dir():
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        _fsync_dir(directory.parent)  # the new directory's own entry
    temp = directory / f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # exactly the configured mode, whatever the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partials(spool: Path) -> int:
    """Delete temp files a killed faxd left behind (``.NAME.XXXX.part``); how many."""
    removed = 0
    for partial in spool.glob(f"*/.*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
            removed += 1
    return removed


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name}: {exc.strerror or exc}"


# ---------------------------------------------------------------------------------------------- worker


class Documents:
    """Downloads received faxes' documents (see the module docstring). One instance per daemon."""

    def __init__(
        self,
        settings: DocumentSettings,
        rc: RingCentral,
        store: Store,
        metrics: Metrics,
        publish: Callable[[Sequence[Event]], None],
        *,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        driver: RequestDriver | None = None,
    ) -> None:
        self.settings = settings
        self._rc = rc
        self._driver = driver
        self._store = store
        self._metrics = metrics
        self._publish = publish
        self._wall = wall
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._waiters: dict[str, list[asyncio.Future[DocumentRef]]] = {}
        self._seen_seq = 0  # the newest journal seq looked at
        self._catch_up()

    # -- the journal side ---------------------------------------------------------------------------

    def _cursor(self) -> int | None:
        row = self._store.db.execute("SELECT value FROM meta WHERE key = ?", (CURSOR_KEY,)).fetchone()
        return None if row is None else int(row[0])

    def _catch_up(self) -> None:
        """Rows for the Received events journalled after the cursor (what a crash left undone),
        found by the journal's own columns: a start-up must not decode the whole journal."""
        cursor = self._cursor()
        head = self._store.head_seq()
        if cursor is not None:
            found = self._store.db.execute(
                "SELECT fax_id, json_extract(transition, '$.extension_id'),"
                " json_extract(transition, '$.pages') FROM journal"
                " WHERE seq > ? AND kind = ? AND to_status = ?"
                " AND json_extract(transition, '$.direction') = 'Inbound' ORDER BY seq",
                (cursor, EventKind.STATUS.value, FaxStatus.RECEIVED.value),
            ).fetchall()
            self._enqueue([(str(f), str(e), p if isinstance(p, int) else None) for f, e, p in found], head)
        else:
            self._enqueue([], head)  # first use: from now on
        self._seen_seq = head
        self._refresh_pending()

    def published(self, events: Sequence[Event]) -> None:
        """The daemon's fan-out: committed events, in seq order. Received faxes get a row, with the
        cursor, in one transaction; other events only move the cursor in memory (saved with the next
        row, or by :meth:`save_cursor`), so the journal's hot path pays no extra write for them."""
        if not events:
            return
        self._seen_seq = max(self._seen_seq, events[-1].seq)
        found = [
            (t.fax_id, t.extension_id, t.pages)
            for e in events
            if _wanted(
                {"kind": (t := e.transition).kind.value, "direction": t.direction, "to_status": t.to_status}
            )
        ]
        if found:
            self._enqueue(found, self._seen_seq)
            self._refresh_pending()
            self._wake.set()

    def save_cursor(self) -> None:
        """Store how far the journal has been read (a restart then reads less of it again)."""
        if self._seen_seq > (self._cursor() or 0):
            self._enqueue([], self._seen_seq)

    def _enqueue(self, found: Sequence[tuple[str, str, int | None]], seq: int) -> None:
        """Rows for ``found`` (fax id, extension, pages) and the cursor at ``seq``, in one transaction."""
        created = {
            f.fax_id: f.created for f in self._store.faxes_by_id(fax_id for fax_id, _, _ in found).values()
        }
        db = self._store.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO documents (fax_id, extension_id, created, state, page_hint)"
                " VALUES (?, ?, ?, 'pending', ?) ON CONFLICT (fax_id) DO NOTHING",
                [(fax_id, ext, created.get(fax_id), pages) for fax_id, ext, pages in found],
            )
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                " WHERE CAST(excluded.value AS INTEGER) > CAST(meta.value AS INTEGER)",
                (CURSOR_KEY, str(seq)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _refresh_pending(self) -> None:
        (count,) = self._store.db.execute("SELECT COUNT(*) FROM documents WHERE state = 'pending'").fetchone()
        self._metrics.documents_pending.set(count)

    # -- faxd fetch ID -------------------------------------------------------------------------------

    async def fetch(self, fax_id: str) -> DocumentRef:
        """Download the document of received fax ``fax_id`` (again) now; returns it once written.

        FetchError ``not_found`` for a fax faxd does not know or did not receive, ``upstream`` when
        RingCentral no longer has it. Cancelling the wait leaves the download queued."""
        fax = self._store.fax(fax_id)
        if fax is None or fax.direction != "Inbound":
            raise FetchError("not_found", f"no received fax {fax_id}")
        self._store.db.execute(
            "INSERT INTO documents (fax_id, extension_id, created, state, page_hint)"
            " VALUES (?, ?, ?, 'pending', ?) ON CONFLICT (fax_id) DO UPDATE SET state = 'pending',"
            " attempts = 0, next_try = 0, last_error = NULL",
            (fax.fax_id, fax.extension_id, fax.created, fax.pages),
        )
        log.info("documents.fetch_requested", fax_id=fax_id)
        future: asyncio.Future[DocumentRef] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(fax_id, []).append(future)
        self._refresh_pending()
        self._wake.set()
        try:
            return await asyncio.shield(future)
        finally:
            waiting = self._waiters.get(fax_id, [])
            if future in waiting:
                waiting.remove(future)

    def last_error(self, fax_id: str) -> str | None:
        row = self._store.db.execute(
            "SELECT last_error FROM documents WHERE fax_id = ?", (fax_id,)
        ).fetchone()
        return None if row is None else row[0]

    def _settle_waiters(self, fax_id: str, result: DocumentRef | FetchError) -> None:
        for future in self._waiters.pop(fax_id, []):
            if future.done():
                continue
            if isinstance(result, FetchError):
                future.set_exception(result)
            else:
                future.set_result(result)

    # -- the worker ---------------------------------------------------------------------------------

    async def run(self, connected: asyncio.Event | None = None) -> NoReturn:
        """Forever: download due documents within the budget, apply retention. With ``connected``, no
        request before it is set: the daemon's own login comes first (a second JWT grant would start a
        second OAuth session)."""
        loop = asyncio.get_running_loop()
        partials = await asyncio.to_thread(remove_partials, self.settings.spool_dir)
        if partials:
            log.info(
                "documents.partials_removed", count=partials, detail="temp files of an interrupted write"
            )
        if connected is not None:
            await connected.wait()
        next_prune = loop.time()
        while True:
            self._wake.clear()
            now = loop.time()
            if now >= next_prune:
                self.prune()
                self.save_cursor()
                next_prune = now + self.settings.prune_interval
            wait = next_prune - now
            row = self._next_row()
            if row is not None:
                due_in = row.next_try - self._wall()
                if due_in <= 0:
                    await self._attempt(row)
                    continue
                wait = min(wait, due_in)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def _next_row(self) -> _Row | None:
        row = self._store.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM documents WHERE state = 'pending' ORDER BY next_try, fax_id LIMIT 1"
        ).fetchone()
        return None if row is None else _Row(*row)

    async def _scheduled(self, row: _Row, group: str, call: Callable[[], Awaitable[T]]) -> T:
        """One request of ``group`` for ``row``, when the request scheduler grants it."""
        if self._driver is None:
            return await call()  # rest.py admits it (its gate, or the wait for the budget)
        work = Work(("doc", row.fax_id), PRIORITY, frozenset({"document"}), {group: 1})
        return await self._driver.execute(work, call)

    async def _attempt(self, row: _Row) -> None:
        try:
            attachment = await self._attachment(row)
            content_type, body = await self._scheduled(
                row,
                ratebudget.MEDIUM,
                lambda: self._rc.get_content(row.extension_id, row.fax_id, attachment.id),
            )
            ref = await asyncio.to_thread(self._write, row, content_type or attachment.content_type, body)
        except Stopping:
            return  # faxd is stopping: nothing was sent, the row stays due
        except _Gone as exc:
            self._give_up(row, str(exc))
        except RateLimited as exc:
            self._failed(row, "rate_limited", f"429 {exc.code}", retry_after=exc.retry_after)
        except ExtensionNotFound as exc:
            self._failed(row, "rejected", f"{exc.status} {exc.code}")
        except ApiError as exc:
            if exc.status == 404:
                self._give_up(row, f"404 {exc.code}")
            else:
                reason = "network" if exc.status == 0 else "server" if exc.status >= 500 else "rejected"
                self._failed(row, reason, f"{exc.status} {exc.code}", retry_after=exc.retry_after)
        except OSError as exc:
            self._failed(row, "disk", _describe(exc))
        else:
            self._done(row, ref)

    async def _attachment(self, row: _Row) -> Attachment:
        """The attachment to download: remembered from an earlier try, else read from the record."""
        if row.attachment_id is not None:
            return Attachment(row.attachment_id, row.content_type or "")
        found = await self._scheduled(
            row, ratebudget.LIGHT, lambda: self._rc.get_messages(row.extension_id, [row.fax_id])
        )
        if row.fax_id not in found:
            raise ApiError(503, "bulk_item_failed", "the message could not be read")
        record = found[row.fax_id]
        if record is None:
            raise _Gone("404: RingCentral no longer has the message")
        attachment = pick_attachment(record)
        if attachment is None:
            raise _Gone("the message has no attachment")
        hint = record.get("faxPageCount")
        pages = hint if isinstance(hint, int) and not isinstance(hint, bool) and hint > 0 else row.page_hint
        self._store.db.execute(
            "UPDATE documents SET attachment_id = ?, content_type = ?, page_hint = ? WHERE fax_id = ?",
            (attachment.id, attachment.content_type, pages, row.fax_id),
        )
        return attachment

    def _write(self, row: _Row, content_type: str, body: bytes) -> DocumentRef:
        """In a thread: the file, atomically; its reference."""
        path = self.settings.spool_dir / relative_path(
            row.extension_id, row.fax_id, row.created, content_type
        )
        write_atomic(path, body, self.settings.mode)
        return DocumentRef(
            path=str(path),
            sha256=hashlib.sha256(body).hexdigest(),
            pages=page_count(body, content_type, row.page_hint),
            size=len(body),
            content_type=content_type,
        )

    def _done(self, row: _Row, ref: DocumentRef) -> None:
        now = self._wall()
        before = self._store.db.execute(
            "SELECT sha256 FROM documents WHERE fax_id = ?", (row.fax_id,)
        ).fetchone()
        transition = Transition(
            kind=EventKind.DOCUMENT,
            fax_id=row.fax_id,
            extension_id=row.extension_id,
            direction="Inbound",
            from_status=FaxStatus.RECEIVED.value,
            to_status=FaxStatus.RECEIVED.value,
            final=True,
            pages=ref.pages,
            document=ref,
        )
        # The event first: were faxd killed before the row says done, the download is redone and
        # the journal skips the duplicate event.
        events = self._store.commit([], [Journalled(transition, Source.FETCH)], observed_at=_iso(now))
        self._store.db.execute(
            "UPDATE documents SET state = 'done', attempts = 0, last_error = NULL, path = ?, sha256 = ?,"
            " pages = ?, bytes = ?, content_type = ?, done_at = ? WHERE fax_id = ?",
            (ref.path, ref.sha256, ref.pages, ref.size, ref.content_type, now, row.fax_id),
        )
        self._metrics.documents_downloaded.inc()
        self._metrics.documents_bytes.inc(ref.size)
        log.info("documents.downloaded", fax_id=row.fax_id, path=ref.path, bytes=ref.size, pages=ref.pages)
        if before is not None and before[0] is not None and before[0] != ref.sha256:
            log.warning(
                "documents.changed", fax_id=row.fax_id, detail="a new download differs from the last one"
            )
        self._refresh_pending()
        if events:
            self._publish(events)
        self._settle_waiters(row.fax_id, ref)

    def _failed(self, row: _Row, reason: str, error: str, *, retry_after: float | None = None) -> None:
        attempts = row.attempts + 1
        delay = retry_delay(attempts, self._rng.uniform(0.5, 1.0), retry_after=retry_after)
        self._store.db.execute(
            "UPDATE documents SET attempts = ?, next_try = ?, last_error = ? WHERE fax_id = ?",
            (attempts, self._wall() + delay, f"{reason}: {error}", row.fax_id),
        )
        self._metrics.documents_failed.labels(reason).inc()
        if reason == "disk":
            log.error(
                "documents.write_failed",
                fax_id=row.fax_id,
                error=error,
                spool_dir=str(self.settings.spool_dir),
                attempt=attempts,
                retry_in=round(delay, 1),
                detail="the document stays queued and is downloaded again",
            )
        else:
            log.warning(
                "documents.download_failed",
                fax_id=row.fax_id,
                reason=reason,
                error=error,
                attempt=attempts,
                retry_in=round(delay, 1),
            )

    def _give_up(self, row: _Row, error: str) -> None:
        self._store.db.execute(
            "UPDATE documents SET state = 'gone', last_error = ? WHERE fax_id = ?", (error, row.fax_id)
        )
        self._metrics.documents_failed.labels("gone").inc()
        log.warning("documents.gone", fax_id=row.fax_id, error=error, detail="nothing to download")
        self._refresh_pending()
        self._settle_waiters(row.fax_id, FetchError("upstream", f"fax {row.fax_id}: {error}"))

    # -- retention ----------------------------------------------------------------------------------

    def prune(self) -> int:
        """Delete the files past ``retention_days``; their rows stay (``removed``). How many."""
        days = self.settings.retention_days
        if days is None:
            return 0
        now = self._wall()
        rows = self._store.db.execute(
            "SELECT fax_id, path, done_at FROM documents WHERE state = 'done'"
        ).fetchall()
        doomed = [(fax_id, path) for fax_id, path, done_at in rows if expired(done_at or now, now, days)]
        for fax_id, path in doomed:
            with contextlib.suppress(FileNotFoundError):
                Path(path).unlink()
            self._store.db.execute("UPDATE documents SET state = 'removed' WHERE fax_id = ?", (fax_id,))
        if doomed:
            log.info("documents.removed", count=len(doomed), retention_days=days)
        return len(doomed)
