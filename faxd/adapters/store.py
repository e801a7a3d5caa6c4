"""Durable state of faxd in SQLite: faxes, recipients, the transition journal and sync tokens.

The journal is the outbox. :meth:`Store.commit` writes new fax and recipient state, the transitions
(numbered by ``seq``) and the new syncToken in ONE transaction; the caller publishes the returned events
only after it returns, i.e. after COMMIT. A (fax, recipient, kind, to_status) is journalled at most
once (a UNIQUE index; duplicates are skipped silently), so re-reading the same record never produces a
second event with a new seq.

WAL mode with ``synchronous=FULL``: a committed transition survives kill -9 and power loss. One writer
(this object, on the event loop thread). The ``epoch`` is a UUID made when the journal is created; a
client's cursor is only meaningful within one epoch. :func:`restore` gives the restored journal a new
epoch: its seqs are handed out again, so a cursor from before the restore must expire, not resume.

The database and its -wal and -shm files hold phone numbers and fax history: they are created 0600
whatever the umask (SQLite gives -wal and -shm the database file's mode), and found wider, tightened.
So are the copies :func:`backup` writes.
This module must not know about RingCentral or sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from faxd.core.model import DocumentRef, Event, EventKind, FaxState, RecipientState, Source, Transition
from faxd.core.protocol import PageKey, QueryRequest, StoredEvent
from faxd.core.status import parse_time


class StoreError(RuntimeError):
    """The database cannot be used (corrupt, newer schema, unwritable)."""


# Each entry migrates from version i to i+1. Never edit a shipped entry; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE faxes (
        fax_id TEXT PRIMARY KEY,
        extension_id TEXT NOT NULL,
        direction TEXT NOT NULL,
        status TEXT NOT NULL,
        availability TEXT NOT NULL,
        pages INTEGER,
        created TEXT,
        rc_modified TEXT,
        ref TEXT UNIQUE,
        from_phone TEXT,
        in_flight INTEGER NOT NULL
    );
    CREATE INDEX faxes_in_flight ON faxes (in_flight) WHERE in_flight = 1;
    CREATE TABLE recipients (
        fax_id TEXT NOT NULL REFERENCES faxes (fax_id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        phone TEXT,
        status TEXT NOT NULL,
        error_code TEXT,
        PRIMARY KEY (fax_id, idx)
    );
    CREATE TABLE journal (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        fax_id TEXT NOT NULL,
        recipient_index INTEGER NOT NULL,
        kind TEXT NOT NULL,
        to_status TEXT NOT NULL,
        observed_at TEXT NOT NULL,
        source TEXT NOT NULL,
        transition TEXT NOT NULL
    );
    CREATE UNIQUE INDEX journal_once ON journal (fax_id, recipient_index, kind, to_status);
    CREATE TABLE sync_tokens (extension_id TEXT PRIMARY KEY, token TEXT NOT NULL);
    """,
    # 2: `list` with active_only=false reads the newest faxes (Store.recent_faxes) without a sort of
    # the whole table.
    """
    CREATE INDEX faxes_created ON faxes (created);
    """,
    # 3 (resend policy, send.retry): the attempts of each logical fax faxd resends and the planned
    # next attempts, so a retry timer survives a restart (faxd.adapters.resend.ResendBook).
    """
    CREATE TABLE resends (
        fax_id TEXT PRIMARY KEY,
        ref TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        first_at REAL NOT NULL,
        extension_id TEXT NOT NULL,
        state TEXT NOT NULL,
        retry_at REAL,
        targets TEXT NOT NULL DEFAULT '[]',
        gave_up TEXT
    );
    CREATE UNIQUE INDEX resends_attempt ON resends (ref, attempt);
    CREATE INDEX resends_open ON resends (state) WHERE state IN ('planned', 'resending');
    """,
    # 4 (outlets, issue 15 part 1): each outlet's durable cursor (every event with seq <= cursor is
    # delivered or dead-lettered), a replay asked for by `faxd outlets replay`, and the events an outlet
    # gave up on, kept with their body because the journal is pruned (faxd.adapters.outlets).
    """
    CREATE TABLE outlet_cursors (
        name TEXT PRIMARY KEY,
        cursor INTEGER NOT NULL,
        replay_from INTEGER,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE outlet_dead_letters (
        outlet TEXT NOT NULL,
        epoch TEXT NOT NULL,
        seq INTEGER NOT NULL,
        fax_id TEXT,
        attempts INTEGER NOT NULL,
        reason TEXT NOT NULL,
        parked_at TEXT NOT NULL,
        event TEXT NOT NULL,
        PRIMARY KEY (outlet, epoch, seq)
    );
    """,
    # 5 (inbound fax documents, issue 15 part 2, faxd.adapters.documents): one row per received fax whose
    # document faxd downloads; the pending ones survive restarts. meta 'documents_after_seq' is the
    # journal cursor up to which Received events have been turned into rows.
    """
    CREATE TABLE documents (
        fax_id TEXT PRIMARY KEY,
        extension_id TEXT NOT NULL,
        created TEXT,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        attachment_id TEXT,
        content_type TEXT,
        page_hint INTEGER,
        path TEXT,
        sha256 TEXT,
        pages INTEGER,
        bytes INTEGER,
        done_at REAL
    );
    CREATE INDEX documents_due ON documents (state, next_try);
    """,
    # 6 (issue 15, done-queue and audit): `query` reads faxes by creation time in keyset pages
    # (Store.fax_page; the first expression is _PAGE_KEY, which must stay the same to use the index) and
    # finds them by a recipient's number. julianday() orders RingCentral's times whatever their form.
    """
    CREATE INDEX faxes_page ON faxes (COALESCE(julianday(created), 0), fax_id);
    CREATE INDEX recipients_phone ON recipients (phone);
    """,
)

#: Ids per ``IN (...)`` list: far below SQLite's limit on host parameters (999 before 3.32).
_CHUNK = 500
_FAX_COLUMNS = (
    "fax_id, extension_id, direction, status, availability, pages, created, rc_modified, ref, from_phone"
)
#: The sort key of ``query`` pages: the expression of the ``faxes_page`` index (migration 6).
_PAGE_KEY = "COALESCE(julianday(created), 0)"


def _page_filter(q: QueryRequest) -> tuple[list[str], list[Any]]:
    """The WHERE conditions of one ``query`` page and their parameters."""
    conditions: list[str] = []
    params: list[Any] = []
    if q.since is not None:
        conditions.append(f"{_PAGE_KEY} >= julianday(?)")
        params.append(q.since)
    if q.until is not None:
        conditions.append(f"{_PAGE_KEY} < julianday(?)")
        params.append(q.until)
    if q.after is not None:
        # The first condition lets the index seek to the cursor; the second is the exact keyset.
        conditions.append(f"{_PAGE_KEY} >= ? AND ({_PAGE_KEY} > ? OR fax_id > ?)")
        params += [q.after.created, q.after.created, q.after.fax_id]
    if q.directions:
        conditions.append(f"lower(direction) IN ({','.join('?' * len(q.directions))})")
        params += sorted(q.directions)
    if q.extensions:
        conditions.append(f"extension_id IN ({','.join('?' * len(q.extensions))})")
        params += sorted(q.extensions)
    if q.to is not None:
        digits = q.to.removeprefix("+")
        conditions.append(
            "EXISTS (SELECT 1 FROM recipients r WHERE r.fax_id = f.fax_id AND r.phone IN (?, ?))"
        )
        params += [digits, f"+{digits}"]
    if q.statuses:
        marks = ",".join("?" * len(q.statuses))
        conditions.append(
            f"(lower(f.status) IN ({marks}) OR EXISTS (SELECT 1 FROM recipients r"
            f" WHERE r.fax_id = f.fax_id AND lower(r.status) IN ({marks})))"
        )
        params += sorted(q.statuses) * 2
    return conditions, params


def _transition_json(t: Transition) -> str:
    # Resend policy fields (send.retry): written only when set, so every other row keeps the layout
    # that faxd.core.protocol pastes onto the wire without decoding it.
    resend = {} if t.attempt is None else {"attempt": t.attempt, "retry_at": t.retry_at, "gave_up": t.gave_up}
    return json.dumps(
        {
            "kind": t.kind.value,
            "fax_id": t.fax_id,
            "extension_id": t.extension_id,
            "direction": t.direction,
            "from_status": t.from_status,
            "to_status": t.to_status,
            "final": t.final,
            "recipient_index": t.recipient_index,
            "recipient_phone": t.recipient_phone,
            "error_code": t.error_code,
            "error_category": t.error_category,
            "retryable": t.retryable,
            "pages": t.pages,
            "rc_modified": t.rc_modified,
            "ref": t.ref,
            **resend,
            # Only on document events: every other row stays as it was before documents existed.
            **({} if t.document is None else {"document": t.document.to_wire()}),
        },
        separators=(",", ":"),
    )


def _transition_from(data: Mapping[str, Any]) -> Transition:
    document = data.get("document")
    return Transition(
        **{
            **data,
            "kind": EventKind(data["kind"]),
            "document": None if document is None else DocumentRef.from_wire(document),
        }
    )


def _read_page(db: sqlite3.Connection, q: QueryRequest) -> tuple[list[FaxState], PageKey | None]:
    """One page of ``q``: at most ``q.limit`` faxes by creation time, oldest first (ties by id), and
    the key to continue after (None on the last page).

    Keyset paging on the ``faxes_page`` index: each page costs the same however deep into the store
    it starts, and holds only ``q.limit`` faxes in memory.
    """
    conditions, params = _page_filter(q)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    # One row more than the page: whether it exists says whether there is a next page.
    rows = db.execute(
        f"SELECT {_FAX_COLUMNS}, {_PAGE_KEY} FROM faxes f{where} ORDER BY {_PAGE_KEY}, fax_id LIMIT ?",
        (*params, q.limit + 1),
    ).fetchall()
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    states = list(_assemble(db, rows).values())
    last = rows[-1] if more else None
    return states, None if last is None else PageKey(float(last[-1]), str(last[0]))


def _assemble(db: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> dict[str, FaxState]:
    """Fax rows (columns :data:`_FAX_COLUMNS` first) with their recipients, in row order.
    Recipients are read only for the faxes selected."""
    recipients: dict[str, list[RecipientState]] = {}
    ids = [row[0] for row in rows]
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for fax_id, idx, phone, status, code in db.execute(
            "SELECT fax_id, idx, phone, status, error_code FROM recipients"
            f" WHERE fax_id IN ({marks}) ORDER BY fax_id, idx",
            chunk,
        ):
            recipients.setdefault(fax_id, []).append(RecipientState(idx, phone, status, code))
    return {
        row[0]: FaxState(
            fax_id=row[0],
            extension_id=row[1],
            direction=row[2],
            status=row[3],
            availability=row[4],
            pages=row[5],
            created=row[6],
            rc_modified=row[7],
            ref=row[8],
            from_phone=row[9],
            recipients=tuple(recipients.get(row[0], ())),
        )
        for row in rows
    }


@dataclass(frozen=True, slots=True)
class Journalled:
    """A transition to journal, with where faxd found it."""

    transition: Transition
    source: Source


class Store:
    """The SQLite store. Open with :meth:`open`; every method runs synchronously on the caller's thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self.epoch = ""
        #: Whether :meth:`open` ran ``PRAGMA quick_check`` (only after an unclean stop).
        self.checked = False

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    def open(self) -> None:
        """Open (creating if needed), check integrity, migrate, and read the epoch.

        The integrity check (``PRAGMA quick_check``, which reads the whole file: seconds for a big
        store that is not in the page cache) runs only when the last stop was not clean. SQLite deletes
        the ``-wal`` file when the last connection closes; a ``-wal`` with content at open means a
        process was killed (or is still running: then the check is merely redundant).
        """
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            unclean = wal.stat().st_size > 0
        except FileNotFoundError:
            unclean = False
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _make_private(self.path)
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._db = db
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            self.checked = unclean
            if unclean:
                (result,) = db.execute("PRAGMA quick_check").fetchone()
                if result != "ok":
                    raise StoreError(f"{self.path} failed its integrity check: {result}")
            self._migrate()
            row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                self.epoch = str(uuid.uuid4())
                db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (self.epoch,))
            else:
                self.epoch = row[0]
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"{self.path}: {exc}") from exc

    def _migrate(self) -> None:
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this faxd ({len(MIGRATIONS)})"
            )
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript() commits first; wrap each step so a crash leaves the old version intact.
            self.db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- reads -------------------------------------------------------------------------------------

    def load_faxes(self, *, in_flight_only: bool = False) -> dict[str, FaxState]:
        """Every fax, or only those in flight (what the reconciler keeps in memory at start-up)."""
        where = " WHERE in_flight = 1" if in_flight_only else ""
        return self._states(f"SELECT {_FAX_COLUMNS} FROM faxes{where}", ())

    def faxes_by_id(self, fax_ids: Iterable[str]) -> dict[str, FaxState]:
        """The stored faxes among ``fax_ids`` (unknown ids are left out), read in batches."""
        ids = list(dict.fromkeys(fax_ids))
        out: dict[str, FaxState] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            out.update(self._states(f"SELECT {_FAX_COLUMNS} FROM faxes WHERE fax_id IN ({marks})", chunk))
        return out

    def fax(self, fax_id: str) -> FaxState | None:
        """One fax by id (primary key), None when unknown."""
        return self._states(f"SELECT {_FAX_COLUMNS} FROM faxes WHERE fax_id = ?", (fax_id,)).get(fax_id)

    def fax_by_ref(self, ref: str) -> FaxState | None:
        """The fax sent with ``ref`` (a UNIQUE index), None when unknown."""
        found = self._states(f"SELECT {_FAX_COLUMNS} FROM faxes WHERE ref = ?", (ref,))
        return next(iter(found.values()), None)

    def recent_faxes(self, limit: int) -> list[FaxState]:
        """The ``limit`` newest faxes by ``created`` (RingCentral's creation time), newest first; faxes
        without a creation time sort last (SQLite's NULLs are the smallest)."""
        found = self._states(
            f"SELECT {_FAX_COLUMNS} FROM faxes ORDER BY created DESC, fax_id DESC LIMIT ?",
            (limit,),
        )
        return list(found.values())

    def fax_page(self, q: QueryRequest) -> tuple[list[FaxState], PageKey | None]:
        """One page of ``q`` on the store's own connection (see :func:`_read_page`)."""
        return _read_page(self.db, q)

    def read_page(self, q: QueryRequest) -> tuple[list[FaxState], PageKey | None]:
        """One page of ``q`` on a read-only connection of its own: for a worker thread, so a page
        whose filter matches few faxes (a scan of the window, 0.2 s for 100,000 faxes) never holds
        the event loop. WAL gives it a snapshot of the last COMMIT, so it neither waits for the
        writer nor sees a transaction in progress."""
        db = sqlite3.connect(_uri(self.path, "ro"), uri=True, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("BEGIN")  # one snapshot for the faxes and their recipients
            return _read_page(db, q)
        finally:
            db.close()

    def _states(self, sql: str, params: Sequence[Any]) -> dict[str, FaxState]:
        """Fax rows selected by ``sql`` (columns :data:`_FAX_COLUMNS`, in that order) with their
        recipients, in the order of the rows. Recipients are read only for the faxes selected."""
        return _assemble(self.db, self.db.execute(sql, tuple(params)).fetchall())

    def sync_token(self, extension_id: str) -> str | None:
        row = self.db.execute(
            "SELECT token FROM sync_tokens WHERE extension_id = ?", (extension_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def head_seq(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'journal'").fetchone()
        return 0 if row is None else int(row[0])

    def oldest_seq(self) -> int:
        """The oldest seq still journalled; ``head_seq() + 1`` when the journal is empty."""
        (oldest,) = self.db.execute("SELECT MIN(seq) FROM journal").fetchone()
        return self.head_seq() + 1 if oldest is None else int(oldest)

    def _events(self, sql: str, params: Iterable[Any]) -> list[Event]:
        return [
            Event(
                seq=seq,
                epoch=self.epoch,
                transition=_transition_from(json.loads(data)),
                observed_at=observed_at,
                source=Source(source),
            )
            for seq, observed_at, source, data in self.db.execute(sql, tuple(params))
        ]

    def events_after(self, after_seq: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events with ``seq > after_seq``, in seq order, as stored: a replay reads the
        whole journal through here, and decoding each row into an :class:`Event` cost more than the rest
        of the replay (the codec writes a stored event as it is)."""
        epoch = self.epoch
        rows = self.db.execute(
            "SELECT seq, observed_at, source, transition FROM journal WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [StoredEvent(seq, epoch, observed_at, source, data) for seq, observed_at, source, data in rows]

    def history(self, fax_id: str) -> list[Event]:
        return self._events(
            "SELECT seq, observed_at, source, transition FROM journal WHERE fax_id = ? ORDER BY seq",
            (fax_id,),
        )

    # -- the one writer --------------------------------------------------------------------------

    def commit(
        self,
        states: Sequence[FaxState],
        transitions: Sequence[Journalled],
        *,
        observed_at: str,
        sync_tokens: Mapping[str, str | None] | None = None,
    ) -> list[Event]:
        """Write states, transitions and sync tokens in one transaction; return the new events.

        Transitions already journalled (same dedup key) are skipped and not returned.
        """
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._write_states(states)
            events = self._journal(transitions, observed_at)
            self._write_sync_tokens(sync_tokens or {})
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return events

    def _write_states(self, states: Sequence[FaxState]) -> None:
        db = self.db
        for s in states:
            db.execute(
                "INSERT INTO faxes (fax_id, extension_id, direction, status, availability, pages,"
                " created, rc_modified, ref, from_phone, in_flight)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (fax_id) DO UPDATE SET extension_id = excluded.extension_id,"
                " direction = excluded.direction, status = excluded.status,"
                " availability = excluded.availability, pages = excluded.pages,"
                " created = excluded.created, rc_modified = excluded.rc_modified,"
                " ref = COALESCE(excluded.ref, faxes.ref), from_phone = excluded.from_phone,"
                " in_flight = excluded.in_flight",
                (
                    s.fax_id,
                    s.extension_id,
                    s.direction,
                    s.status,
                    s.availability,
                    s.pages,
                    s.created,
                    s.rc_modified,
                    s.ref,
                    s.from_phone,
                    int(s.in_flight),
                ),
            )
            db.execute("DELETE FROM recipients WHERE fax_id = ?", (s.fax_id,))
            db.executemany(
                "INSERT INTO recipients (fax_id, idx, phone, status, error_code) VALUES (?, ?, ?, ?, ?)",
                [(s.fax_id, r.index, r.phone, r.status, r.error_code) for r in s.recipients],
            )

    def _journal(self, transitions: Sequence[Journalled], observed_at: str) -> list[Event]:
        """Append the transitions not journalled yet; their events, with the seq each got."""
        db = self.db
        events: list[Event] = []
        for j in transitions:
            t = j.transition
            # Check first rather than lean on the UNIQUE index: a skipped INSERT would still spend
            # an AUTOINCREMENT value, and clients must see seq without gaps.
            if db.execute(
                "SELECT 1 FROM journal WHERE fax_id = ? AND recipient_index = ? AND kind = ?"
                " AND to_status = ?",
                t.dedup_key,
            ).fetchone():
                continue
            cursor = db.execute(
                "INSERT INTO journal (fax_id, recipient_index, kind, to_status, observed_at,"
                " source, transition) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*t.dedup_key, observed_at, j.source.value, _transition_json(t)),
            )
            assert cursor.lastrowid is not None
            events.append(Event(cursor.lastrowid, self.epoch, t, observed_at, j.source))
        return events

    def _write_sync_tokens(self, sync_tokens: Mapping[str, str | None]) -> None:
        for extension_id, token in sync_tokens.items():
            if token is None:
                self.db.execute("DELETE FROM sync_tokens WHERE extension_id = ?", (extension_id,))
            else:
                self.db.execute(
                    "INSERT INTO sync_tokens (extension_id, token) VALUES (?, ?)"
                    " ON CONFLICT (extension_id) DO UPDATE SET token = excluded.token",
                    (extension_id, token),
                )

    def unsettled_sent(self) -> list[tuple[Transition, str]]:
        """``Sent`` transitions journalled with ``final=false`` that have no ``settled`` event yet, with
        their ``observed_at``: the settle timers to re-arm after a restart.

        Filtered in SQL (``final`` read with ``json_extract``), so only the unsettled rows are decoded.
        Only meaningful with ``sent_settle`` > 0: with 0 every ``Sent`` is journalled final.
        """
        rows = self.db.execute(
            "SELECT j.observed_at, j.transition FROM journal j WHERE j.to_status = 'Sent'"
            " AND j.kind IN ('status', 'recipient') AND json_extract(j.transition, '$.final') = 0"
            " AND NOT EXISTS (SELECT 1 FROM journal s WHERE s.fax_id = j.fax_id"
            " AND s.recipient_index = j.recipient_index AND s.kind = 'settled')"
            " ORDER BY j.seq"
        ).fetchall()
        return [(_transition_from(json.loads(data)), observed_at) for observed_at, data in rows]

    def prune(self, *, before: str, faxes_before: float | None = None) -> tuple[int, int]:
        """Retention: delete journal rows observed before ``before`` (ISO time, as ``observed_at`` is
        written; the newest row is kept), and fax rows that are not in flight, have no journal row
        left and were created before ``faxes_before`` (Unix time; None keeps every fax). Returns
        (journal rows, faxes) deleted.

        ``oldest_seq`` stays honest: it is computed from what is left, and ``head_seq`` comes from
        ``sqlite_sequence``, which a DELETE never lowers, so a seq is never handed out twice.
        """
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            # The newest row stays, so a journal that had events never looks empty to a client.
            rows = db.execute(
                "DELETE FROM journal WHERE observed_at < ? AND seq < ?", (before, self.head_seq())
            ).rowcount
            gone = 0
            if faxes_before is not None:
                candidates = db.execute(
                    "SELECT fax_id, created FROM faxes f WHERE in_flight = 0"
                    " AND NOT EXISTS (SELECT 1 FROM journal j WHERE j.fax_id = f.fax_id)"
                ).fetchall()
                doomed = [
                    (fax_id,)
                    for fax_id, created in candidates
                    if (ts := parse_time(created)) is not None and ts < faxes_before
                ]
                db.executemany("DELETE FROM faxes WHERE fax_id = ?", doomed)
                gone = len(doomed)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return rows, gone

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: "ok" or the first problem found (slow on big files)."""
        (result,) = self.db.execute("PRAGMA integrity_check").fetchone()
        return str(result)


# ---------------------------------------------------------------------------------------------------
# Files: private modes, backup and restore.

_SIDE_FILES = ("-wal", "-shm", "-journal")


def _make_private(path: Path) -> None:
    """Create ``path`` 0600 if it does not exist; take group and other bits off it and its side files.

    SQLite creates a new database with 0644 minus the umask, and each -wal/-shm/-journal with the
    database file's mode, so a 0600 database keeps all of them private.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & 0o700)
    finally:
        os.close(fd)  # before SQLite opens it: closing an fd would drop SQLite's POSIX locks
    for suffix in _SIDE_FILES:
        side = Path(f"{path}{suffix}")
        with contextlib.suppress(FileNotFoundError):
            st = side.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                side.chmod(stat.S_IMODE(st.st_mode) & 0o700)


@dataclass(frozen=True)
class Snapshot:
    """What a backup or a restore holds: its journal's epoch and head."""

    epoch: str
    head_seq: int


def _uri(path: Path, mode: str) -> str:
    return f"file:{quote(str(path.absolute()))}?mode={mode}"


def _snapshot(db: sqlite3.Connection, what: Path) -> Snapshot:
    """The epoch and head of an open database, after checking it is a sound faxd store."""
    (result,) = db.execute("PRAGMA integrity_check").fetchone()
    if result != "ok":
        raise StoreError(f"{what} failed its integrity check: {result}")
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StoreError(f"{what} has schema version {version}, newer than this faxd ({len(MIGRATIONS)})")
    row = head = None
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        head = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'journal'").fetchone()
    except sqlite3.Error:
        pass
    if version < 1 or row is None:
        raise StoreError(f"{what} is not a faxd store")
    return Snapshot(str(row[0]), 0 if head is None else int(head[0]))


@contextlib.contextmanager
def _private_temp(beside: Path) -> Iterator[Path]:
    """A new empty 0600 file in ``beside``'s directory, removed (with its side files) unless renamed."""
    temp = beside.with_name(f".{beside.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    try:
        yield temp
    finally:
        for leftover in (temp, *(Path(f"{temp}{suffix}") for suffix in _SIDE_FILES)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(source: sqlite3.Connection, temp: Path) -> sqlite3.Connection:
    """SQLite's online backup of ``source`` into the file ``temp``, left as one self-contained file."""
    target = sqlite3.connect(temp, isolation_level=None)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")
    except BaseException:
        target.close()
        raise
    return target


def _open_source(path: Path, what: str, other: Path) -> sqlite3.Connection:
    """A read-only connection to the file a backup or restore copies from, which must exist and must
    not be the file it copies to."""
    if not path.is_file():
        raise StoreError(f"no {what} at {path}")
    if other.exists() and other.samefile(path):
        raise StoreError(f"{path} is the store itself")
    try:
        return sqlite3.connect(_uri(path, "ro"), uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from exc


def backup(database: str | Path, destination: str | Path) -> Snapshot:
    """Copy the store at ``database`` to ``destination`` (0600), safely while faxd writes to it.

    The copy is one file (no -wal), checked with ``PRAGMA integrity_check``, and replaces
    ``destination`` only once complete. Returns the epoch and head it holds.
    """
    source_path, dest = Path(database), Path(destination)
    source = _open_source(source_path, "store", dest)
    try:
        with _private_temp(dest) as temp:
            target = _copy(source, temp)
            try:
                snapshot = _snapshot(target, source_path)
            finally:
                target.close()
            _fsync(temp)
            os.replace(temp, dest)
            _fsync(dest.parent, directory=True)
    except sqlite3.Error as exc:
        raise StoreError(f"backup of {source_path} failed: {exc}") from exc
    finally:
        source.close()
    return snapshot


def _refuse_if_in_use(database: Path) -> None:
    """StoreError if any process (faxd above all) has ``database`` open.

    Every open connection to a WAL database holds a shared lock on it until it closes, so an
    exclusive lock is only granted when nobody else has it open.
    """
    probe = sqlite3.connect(database, isolation_level=None, timeout=0)
    try:
        probe.execute("PRAGMA locking_mode=EXCLUSIVE")
        probe.execute("BEGIN EXCLUSIVE")
        probe.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise StoreError(f"cannot open {database}: {exc}") from exc
        raise StoreError(
            f"{database} is in use (faxd is running?): stop faxd first (systemctl stop faxd)"
        ) from None
    finally:
        probe.close()  # the last connection: SQLite folds any -wal into the file it replaces


def restore(backup_file: str | Path, database: str | Path) -> tuple[Snapshot, Snapshot]:
    """Replace the store at ``database`` by the backup at ``backup_file``, under a new epoch.

    The restored file keeps the owner of the one it replaces. Refused while faxd (or anything) has
    the store open. The restored journal hands out seqs that
    clients already saw before the restore; the new epoch makes every old cursor ``cursor_expired``.
    Returns (the backup as written, the store as restored).
    """
    source_path, db_path = Path(backup_file), Path(database)
    source = _open_source(source_path, "backup", db_path)
    try:
        written = _snapshot(source, source_path)
        if db_path.exists():
            _refuse_if_in_use(db_path)
        db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Run as root, the copy must still belong to faxd's user (the owner of the file it replaces, or
        # of the state directory): systemd does not chown inside a StateDirectory= it already owns.
        owner = (db_path if db_path.exists() else db_path.parent).stat()
        with _private_temp(db_path) as temp:
            if os.geteuid() == 0:
                os.chown(temp, owner.st_uid, owner.st_gid)
            target = _copy(source, temp)
            try:
                restored = Snapshot(str(uuid.uuid4()), written.head_seq)
                target.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (restored.epoch,))
            finally:
                target.close()
            _fsync(temp)
            # Side files of the replaced database would be applied to the restored one: remove them.
            for suffix in _SIDE_FILES:
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{db_path}{suffix}").unlink()
            os.replace(temp, db_path)
            _fsync(db_path.parent, directory=True)
    except sqlite3.Error as exc:
        raise StoreError(f"restore of {source_path} failed: {exc}") from exc
    finally:
        source.close()
    return written, restored
