"""The SQLite store on real files: one transaction per reconcile, exactly-once journal, durable epoch."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from faxd.adapters.store import MIGRATIONS, Journalled, Store, StoreError, backup, restore
from faxd.core.model import EventKind, FaxState, RecipientState, Source, Transition
from faxd.core.protocol import Filter, encode_event


def fax(status: str = "Queued", ref: str | None = None) -> FaxState:
    return FaxState("1", "200", "Outbound", status, ref=ref, recipients=(RecipientState(0, "+1650", status),))


def move(to: str, frm: str | None = "Queued", index: int | None = None) -> Journalled:
    t = Transition(
        EventKind.STATUS if index is None else EventKind.RECIPIENT,
        "1",
        "200",
        "Outbound",
        frm,
        to,
        final=to != "Queued",
        recipient_index=index,
    )
    return Journalled(t, Source.PUSH)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "faxd.db")
    s.open()
    yield s  # type: ignore[misc]
    s.close()


def test_commit_numbers_events_and_stores_state_and_token_together(store: Store) -> None:
    events = store.commit(
        [fax("Sent")], [move("Sent"), move("Sent", index=0)], observed_at="T1", sync_tokens={"200": "tok-1"}
    )
    assert [e.seq for e in events] == [1, 2]
    assert store.head_seq() == 2
    assert store.oldest_seq() == 1
    assert store.sync_token("200") == "tok-1"
    assert store.load_faxes()["1"].status == "Sent"
    assert [e.fields()["to_status"] for e in store.events_after(0, 10)] == ["Sent", "Sent"]


def test_the_replay_read_writes_each_event_as_committed(store: Store) -> None:
    """events_after hands the replay the stored JSON, not Events: on the wire and to a filter it must
    be the very event that commit returned (all fields, numbers included or not, odd characters)."""
    odd = Transition(
        EventKind.RECIPIENT, "1", "200", "Outbound", "Queued", "SendingFailed", final=True,
        recipient_index=2, recipient_phone="+1650 \u00e9\n\ud800", error_code="LineBusy",
        error_category="busy", retryable=True, pages=3, rc_modified="2026-01-02T03:04:05Z", ref='r"\\',
    )  # fmt: skip
    committed = store.commit([fax("Sent")], [move("Sent"), Journalled(odd, Source.POLL)], observed_at="T1")
    stored = store.events_after(0, 10)
    assert [e.seq for e in stored] == [e.seq for e in committed] == [1, 2]
    for numbers in (True, False):
        assert [encode_event(e, include_numbers=numbers) for e in stored] == [
            encode_event(e, include_numbers=numbers) for e in committed
        ]
    busy = Filter(to_status=frozenset({"sendingfailed"}), final_only=True)
    assert [busy.matches(e) for e in stored] == [busy.matches(e) for e in committed] == [False, True]
    assert store.events_after(1, 10) == stored[1:]
    assert store.events_after(0, 1) == stored[:1]


def test_same_transition_is_journalled_once_and_spends_no_seq(store: Store) -> None:
    store.commit([fax("Sent")], [move("Sent")], observed_at="T1")
    again = store.commit([fax("Sent")], [move("Sent"), move("Delivered", "Sent")], observed_at="T2")
    assert [(e.seq, e.transition.to_status) for e in again] == [(2, "Delivered")]
    assert store.head_seq() == 2


def test_failed_transaction_leaves_nothing_behind(store: Store) -> None:
    bad = FaxState(
        "1",
        "200",
        "Outbound",
        "Sent",
        recipients=(RecipientState(0, "a", "Sent"), RecipientState(0, "b", "Sent")),
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.commit([bad], [move("Sent")], observed_at="T1", sync_tokens={"200": "tok"})
    assert store.head_seq() == 0
    assert store.sync_token("200") is None
    assert store.load_faxes() == {}


def test_reopen_keeps_epoch_seq_and_state(tmp_path: Path) -> None:
    first = Store(tmp_path / "db")
    first.open()
    first.commit([fax("Queued", ref="r1")], [move("Queued", None)], observed_at="T1")
    epoch = first.epoch
    first.close()
    second = Store(tmp_path / "db")
    second.open()
    assert second.epoch == epoch
    assert second.head_seq() == 1
    assert second.load_faxes(in_flight_only=True)["1"].ref == "r1"
    second.close()


def test_prune_keeps_the_newest_row_and_oldest_seq_honest(store: Store) -> None:
    store.commit([fax("Sent")], [move("Sent")], observed_at="2026-01-01T00:00:00Z")
    store.commit([fax("Delivered")], [move("Delivered", "Sent")], observed_at="2026-01-02T00:00:00Z")
    assert store.prune(before="2030-01-01") == (1, 0)
    assert (store.oldest_seq(), store.head_seq()) == (2, 2)
    events = store.commit([fax("Delivered")], [move("Delivered", index=0)], observed_at="2026-01-03")
    assert events[0].seq == 3


def test_empty_journal_reports_oldest_after_head(store: Store) -> None:
    assert (store.head_seq(), store.oldest_seq()) == (0, 1)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path).open()


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    with pytest.raises(StoreError):
        Store(path).open()


def test_wal_and_full_sync(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_prune_drops_old_final_faxes_without_journal_rows_and_keeps_in_flight_ones(store: Store) -> None:
    old_final = FaxState("9", "200", "Outbound", "Sent", created="2026-01-01T00:00:00.000Z")
    old_queued = FaxState("8", "200", "Outbound", "Queued", created="2026-01-01T00:00:00.000Z")
    store.commit([old_final, old_queued], [], observed_at="2026-01-01T00:00:00Z")
    store.commit([fax("Sent")], [move("Sent")], observed_at="2026-01-02T00:00:00Z")
    store.commit([fax("Sent")], [move("Sent", index=0)], observed_at="2026-01-03T00:00:00Z")
    cutoff = 1767312000.0  # 2026-01-02T00:00:00Z
    assert store.prune(before="2026-01-02T12:00:00Z", faxes_before=cutoff) == (1, 1)
    assert set(store.load_faxes()) == {"1", "8"}  # "1" still has a journal row; "8" is in flight
    assert (store.oldest_seq(), store.head_seq()) == (2, 2)
    assert store.integrity_check() == "ok"


def test_unsettled_sent_lists_sent_not_final_without_a_settled_event(store: Store) -> None:
    sent = Transition(EventKind.RECIPIENT, "1", "200", "Outbound", "Queued", "Sent", False, 0)
    fax_sent = Transition(EventKind.STATUS, "1", "200", "Outbound", "Queued", "Sent", False)
    final_sent = Transition(EventKind.STATUS, "2", "200", "Outbound", "Queued", "Sent", True)
    store.commit(
        [fax("Sent")],
        [Journalled(t, Source.POLL) for t in (sent, fax_sent, final_sent)],
        observed_at="2026-01-01T00:00:00.000Z",
    )
    assert [(t.fax_id, t.recipient_index) for t, _ in store.unsettled_sent()] == [("1", 0), ("1", None)]
    settled = Transition(EventKind.SETTLED, "1", "200", "Outbound", "Sent", "Sent", True, 0)
    store.commit([], [Journalled(settled, Source.POLL)], observed_at="2026-01-01T00:00:10.000Z")
    assert [(t.fax_id, t.recipient_index, at) for t, at in store.unsettled_sent()] == [
        ("1", None, "2026-01-01T00:00:00.000Z")
    ]


def state(fax_id: str, status: str, created: str | None, ref: str | None = None) -> FaxState:
    recipients = (RecipientState(0, "+1650", status), RecipientState(1, "+1651", status))
    return FaxState(fax_id, "200", "Outbound", status, ref=ref, recipients=recipients, created=created)


def test_faxes_are_read_by_id_ref_and_batch_with_their_recipients(store: Store) -> None:
    states = [state(str(n), "Sent", f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}.000Z") for n in range(1200)]
    store.commit([*states, state("r", "Queued", None, ref="order-1")], [], observed_at="T1")
    assert store.fax("7") == states[7]
    assert store.fax("nope") is None
    assert store.fax_by_ref("order-1") == state("r", "Queued", None, ref="order-1")
    assert store.fax_by_ref("order-2") is None
    wanted = [str(n) for n in range(0, 1200, 2)] + ["nope", "7", "7"]  # more than one IN (...) chunk
    found = store.faxes_by_id(wanted)
    assert set(found) == {str(n) for n in range(0, 1200, 2)} | {"7"}
    assert all(found[k] == states[int(k)] for k in found)
    assert store.faxes_by_id([]) == {}
    assert store.load_faxes(in_flight_only=True) == {"r": state("r", "Queued", None, ref="order-1")}


def test_recent_faxes_are_the_newest_first_and_bounded(store: Store) -> None:
    store.commit(
        [
            state("a", "Sent", "2026-01-02T00:00:00.000Z"),
            state("b", "Sent", None),
            state("c", "Sent", "2026-01-03T00:00:00.000Z"),
            state("d", "Queued", "2026-01-01T00:00:00.000Z"),
        ],
        [],
        observed_at="T1",
    )
    assert [f.fax_id for f in store.recent_faxes(10)] == ["c", "a", "d", "b"]
    assert [f.fax_id for f in store.recent_faxes(2)] == ["c", "a"]
    assert store.recent_faxes(2)[0].recipients == state("c", "Sent", None).recipients
    plan = store.db.execute(
        "EXPLAIN QUERY PLAN SELECT fax_id FROM faxes ORDER BY created DESC, fax_id DESC LIMIT 5"
    ).fetchall()
    assert any("faxes_created" in row[-1] for row in plan), plan  # no sort of the whole table


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    db.execute(
        "INSERT INTO faxes (fax_id, extension_id, direction, status, availability, in_flight)"
        " VALUES ('1', '200', 'Outbound', 'Sent', 'Alive', 0)"
    )
    db.close()
    s = Store(path)
    s.open()
    try:
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert s.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'faxes_created'").fetchone()
        fax_1 = s.fax("1")
        assert fax_1 is not None
        assert fax_1.status == "Sent"
    finally:
        s.close()


# ------------------------------------------------------------------------ private files whatever the umask


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The umask of a shell or of a service without UMask=: new files would be world-readable."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_store_files_are_0600_under_umask_022(tmp_path: Path) -> None:
    path = tmp_path / "state" / "faxd.db"
    store = Store(path)
    store.open()
    try:
        store.commit([fax()], [move("Queued", None)], observed_at="T1")
        files = {p.name: mode(p) for p in path.parent.iterdir()}
        assert files == {"faxd.db": 0o600, "faxd.db-wal": 0o600, "faxd.db-shm": 0o600}
        assert mode(path.parent) == 0o700
    finally:
        store.close()


@pytest.mark.usefixtures("umask_022")
def test_store_files_left_readable_by_an_older_faxd_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "faxd.db"
    db = sqlite3.connect(path)  # as SQLite creates them: 0644 minus the umask, the side files alike
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    (tmp_path / "faxd.db-wal").chmod(0o664)
    assert mode(path) == 0o644
    store = Store(path)
    store.open()
    try:
        assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
            "faxd.db": 0o600,
            "faxd.db-wal": 0o600,
            "faxd.db-shm": 0o600,
        }
    finally:
        store.close()
        db.close()


# ------------------------------------------------------------------------------- backup and restore


def journal_of(path: Path) -> list[tuple[int, str]]:
    store = Store(path)
    store.open()
    try:
        return [(e.seq, e.fields()["to_status"]) for e in store.events_after(0, 100)]
    finally:
        store.close()


@pytest.mark.usefixtures("umask_022")
def test_backup_while_the_store_is_open_is_complete_and_private(store: Store, tmp_path: Path) -> None:
    store.commit([fax()], [move("Queued", None)], observed_at="T1")
    store.commit([fax("Sent")], [move("Sent")], observed_at="T2")  # still in the -wal
    (tmp_path / "old.db").write_text("yesterday's")
    (tmp_path / "old.db").chmod(0o644)
    snapshot = backup(store.path, tmp_path / "old.db")
    assert (snapshot.epoch, snapshot.head_seq) == (store.epoch, 2)
    assert mode(tmp_path / "old.db") == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"
    assert not (tmp_path / "old.db-wal").exists(), "a backup is one file"
    assert journal_of(tmp_path / "old.db") == [(1, "Queued"), (2, "Sent")]


def test_backup_refuses_to_overwrite_the_store_or_read_nothing(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is the store itself"):
        backup(store.path, store.path)
    with pytest.raises(StoreError, match="no store at"):
        backup(tmp_path / "nope.db", tmp_path / "b.db")


@pytest.mark.usefixtures("umask_022")
def test_restore_gives_the_journal_a_new_epoch_and_drops_the_stale_wal(tmp_path: Path) -> None:
    path = tmp_path / "faxd.db"
    store = Store(path)
    store.open()
    store.commit([fax()], [move("Queued", None)], observed_at="T1")
    before = store.epoch
    backup(path, tmp_path / "b.db")
    store.commit([fax("Sent")], [move("Sent")], observed_at="T2")
    with pytest.raises(StoreError, match=r"is in use \(faxd is running\?\): stop faxd first"):
        restore(tmp_path / "b.db", path)
    assert journal_of(path) == [(1, "Queued"), (2, "Sent")], "a refused restore changes nothing"
    store.close()

    written, restored = restore(tmp_path / "b.db", path)
    assert (written.epoch, written.head_seq) == (before, 1)
    assert restored.epoch != before
    assert restored.head_seq == 1
    assert mode(path) == 0o600
    reopened = Store(path)
    reopened.open()
    try:
        assert reopened.epoch == restored.epoch
        assert reopened.head_seq() == 1
        # The seq of the lost "Sent" is handed out again: only the epoch tells the two apart.
        (again,) = reopened.commit([fax("Sent")], [move("Sent")], observed_at="T3")
        assert (again.seq, again.epoch) == (2, restored.epoch)
    finally:
        reopened.close()
    assert journal_of(tmp_path / "b.db") == [(1, "Queued")], "the backup itself is left as it was"


def test_restore_refuses_what_is_not_a_faxd_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a database")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.close()
    for bad, reason in (("notes.txt", "file is not a database"), ("other.db", "is not a faxd store")):
        with pytest.raises(StoreError, match=reason):
            restore(tmp_path / bad, tmp_path / "faxd.db")
    assert not (tmp_path / "faxd.db").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_restore_as_root_keeps_the_stores_owner(tmp_path: Path) -> None:
    """The admin restores as root; faxd (its own user) must still be able to open the store."""
    path = tmp_path / "faxd.db"
    store = Store(path)
    store.open()
    store.close()
    backup(path, tmp_path / "b.db")
    os.chown(path, 4242, 4343)
    restore(tmp_path / "b.db", path)
    st = path.stat()
    assert (st.st_uid, st.st_gid, mode(path)) == (4242, 4343, 0o600)
    (tmp_path / "new").mkdir()
    os.chown(tmp_path / "new", 4244, 4345)  # no store yet: the state directory's owner
    restore(tmp_path / "b.db", tmp_path / "new" / "faxd.db")
    st = (tmp_path / "new" / "faxd.db").stat()
    assert (st.st_uid, st.st_gid) == (4244, 4345)


def test_integrity_is_checked_after_an_unclean_stop_only(tmp_path: Path) -> None:
    """A clean close removes the -wal file, so the next open skips the (slow) quick_check; a process
    killed with the store open leaves its -wal behind, and the next open checks."""
    path = tmp_path / "db"
    first = Store(path)
    first.open()
    first.commit([fax("Queued")], [], observed_at="2026-01-01T00:00:00Z")
    first.close()
    again = Store(path)
    again.open()
    assert not again.checked
    again.close()

    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from faxd.adapters.store import Store\n"
            "from faxd.core.model import FaxState\n"
            "s = Store(sys.argv[1]); s.open()\n"
            "s.commit([FaxState('2', '200', 'Outbound', 'Queued')], [], observed_at='2026-01-01T00:00:00Z')\n"
            "os._exit(0)  # no close: as kill -9 would leave it\n",
            str(path),
        ],
        check=False,
    )
    assert killed.returncode == 0
    assert (tmp_path / "db-wal").stat().st_size > 0
    after = Store(path)
    after.open()
    assert after.checked
    assert set(after.load_faxes()) == {"1", "2"}
    after.close()
