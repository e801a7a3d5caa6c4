"""The done-queue's store side (issue 15, part 4): keyset pages of faxes by creation time, the
``query`` request's filters, and its parser. Real SQLite; the commands are in tests/test_audit.py.

Kept apart from the async tests: a module that mixes plain and async tests leaks the event loop of the
plain ones into an async one (tests/conftest.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from faxd.adapters.store import Store
from faxd.core.model import FaxState, RecipientState
from faxd.core.protocol import MAX_PAGE, PageKey, ProtocolError, QueryRequest, parse_request


def fax(n: int, created: str | None, **kw: object) -> FaxState:
    """Fax ``700000 + n`` (unless ``fax_id``), one recipient ``+1650555NNNN``, final ``Sent`` unless
    ``status``; a ``SendingFailed`` recipient failed with ``LineBusy``."""
    status = str(kw.pop("status", "Sent"))
    phone = str(kw.pop("phone", f"+1650555{n:04d}"))
    code = "LineBusy" if status == "SendingFailed" else None
    return FaxState(
        fax_id=str(kw.pop("fax_id", f"{700000 + n}")),
        extension_id=str(kw.pop("extension_id", "200000001")),
        direction=str(kw.pop("direction", "Outbound")),
        status=status,
        recipients=(RecipientState(0, phone, status, code),),
        pages=1,
        created=created,
        rc_modified=created,
    )


def _at(second: int) -> str:
    """2026-11-01T10:00:00.000Z plus ``second`` seconds (under an hour)."""
    return f"2026-11-01T10:{second // 60:02d}:{second % 60:02d}.000Z"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "faxd.db")
    s.open()
    yield s
    s.close()


def _query(**fields: object) -> QueryRequest:
    request = parse_request(json.dumps({"type": "query", **fields}).encode())
    assert isinstance(request, QueryRequest)
    return request


def _all_pages(store: Store, **fields: object) -> list[list[str]]:
    """The fax ids of every page, following ``next`` as a client does (through the wire form)."""
    out: list[list[str]] = []
    after: str | None = None
    while True:
        extra = {} if after is None else {"after": after}
        states, key = store.fax_page(_query(**fields, **extra))
        out.append([s.fax_id for s in states])
        if key is None:
            return out
        after = key.to_wire()
        assert len(out) < 1000, "paging does not end"


def test_pages_cover_every_fax_once_in_creation_order(store: Store) -> None:
    # 10 faxes, three of them created in the same millisecond (ties: by id), one created in another
    # time zone's notation, stored out of order.
    faxes = [fax(n, _at(n)) for n in range(7)]
    faxes += [fax(7, _at(8), fax_id="800000002"), fax(8, _at(8), fax_id="800000001")]
    faxes += [fax(9, "2026-11-01T11:00:07.500+01:00")]  # 10:00:07.5 UTC: between 7 and 8
    store.commit(list(reversed(faxes)), [], observed_at=_at(0))
    expected = [*(f"{700000 + n}" for n in range(7)), "700009", "800000001", "800000002"]
    for limit in (1, 2, 3, 4, 5, 9, 10, 11, MAX_PAGE):
        pages = _all_pages(store, limit=limit)
        assert [fax for page in pages for fax in page] == expected, limit
        # Full pages, then one last page; never an empty page after an exact multiple.
        assert all(len(page) == limit for page in pages[:-1]), (limit, pages)
        assert 1 <= len(pages[-1]) <= limit, (limit, pages)


def test_a_page_boundary_inside_a_tie_loses_and_repeats_nothing(store: Store) -> None:
    same = _at(30)
    store.commit([fax(n, same) for n in range(5)], [], observed_at=same)
    assert _all_pages(store, limit=2) == [["700000", "700001"], ["700002", "700003"], ["700004"]]


def test_since_is_inclusive_and_until_exclusive(store: Store) -> None:
    store.commit([fax(n, _at(n)) for n in range(10)], [], observed_at=_at(0))
    pages = _all_pages(store, since=_at(3), until=_at(6))
    assert pages == [["700003", "700004", "700005"]]
    # The same instant written with another offset selects the same faxes.
    pages = _all_pages(store, since="2026-11-01T05:00:03-05:00", until="2026-11-01T10:00:06Z")
    assert pages == [["700003", "700004", "700005"]]
    assert _all_pages(store, since=_at(11)) == [[]]


def test_filters_by_number_status_direction_and_extension(store: Store) -> None:
    store.commit(
        [
            fax(1, _at(1), phone="+16505550001", status="SendingFailed"),
            fax(2, _at(2), phone="+16505550002"),
            fax(3, _at(3), phone="+16505550001", direction="Inbound", extension_id="200000002"),
            fax(4, None, phone="+16505550001"),  # no creation time: only without a window
        ],
        [],
        observed_at=_at(0),
    )
    flat = lambda **f: [x for page in _all_pages(store, **f) for x in page]  # noqa: E731
    assert flat(to="+16505550001", since=_at(0)) == ["700001", "700003"]
    assert flat(to="1 (650) 555-0001", since=_at(0)) == ["700001", "700003"]
    assert flat(to="+16505550001") == ["700004", "700001", "700003"]
    assert flat(statuses=["sendingfailed"]) == ["700001"]
    assert flat(statuses=["Sent", "SendingFailed"], to="+16505550001", since=_at(0)) == ["700001", "700003"]
    assert flat(directions=["inbound"]) == ["700003"]
    assert flat(extensions=["200000001"], since=_at(2)) == ["700002"]


def test_a_recipient_status_selects_its_fax(store: Store) -> None:
    two = FaxState(
        "900001", "200000001", "Outbound", "SendingFailed",
        recipients=(
            RecipientState(0, "+16505550100", "Sent"),
            RecipientState(1, "+16505550001", "SendingFailed", "LineBusy"),
        ),
        created=_at(1),
    )  # fmt: skip
    store.commit([two, fax(2, _at(2), status="Queued")], [], observed_at=_at(0))
    assert _all_pages(store, statuses=["Sent"]) == [["900001"]]
    assert _all_pages(store, statuses=["Queued"]) == [["700002"]]


def test_pages_read_through_the_index(store: Store) -> None:
    """The migration's index serves the window; a plan that scans the table would read every fax."""
    plan = store.db.execute(
        "EXPLAIN QUERY PLAN SELECT fax_id FROM faxes f WHERE COALESCE(julianday(created), 0) >= julianday(?)"
        " ORDER BY COALESCE(julianday(created), 0), fax_id LIMIT 10",
        (_at(0),),
    ).fetchall()
    assert "USING INDEX faxes_page" in str(plan), plan
    plan = store.db.execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM recipients WHERE phone = ?", ("+16505550001",)
    ).fetchall()
    assert "recipients_phone" in str(plan), plan


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"since": "yesterday"}, "since must be an ISO 8601 time with a zone"),
        ({"since": "2026-11-01T10:00:00"}, "since must be an ISO 8601 time with a zone"),
        ({"since": _at(5), "until": _at(5)}, "since must be before until"),
        ({"after": "not-a-key"}, "after must be the next of an earlier page"),
        ({"after": "nan~1"}, "after must be the next of an earlier page"),
        ({"limit": 0}, "limit must be an integer from 1 to 1000"),
        ({"limit": MAX_PAGE + 1}, "limit must be an integer from 1 to 1000"),
        ({"limit": True}, "limit must be an integer from 1 to 1000"),
        ({"to": "DROP TABLE"}, "to must be a phone number"),
        ({"statuses": "Sent"}, "statuses must be a list"),
        ({"include_numbers": "yes"}, "include_numbers must be true or false"),
    ],
)
def test_bad_queries_are_refused_with_the_reason(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(json.dumps({"type": "query", "id": 9, **fields}).encode())
    assert caught.value.code == "bad_request"
    assert message in caught.value.message
    assert caught.value.request_id == 9


def test_numbers_are_left_out_unless_asked_for() -> None:
    assert _query().include_numbers is False
    assert _query(include_numbers=True).include_numbers is True


def test_page_keys_round_trip_exactly() -> None:
    key = PageKey(2461345.9166782405, "id~with~tildes")
    assert PageKey.from_wire(key.to_wire()) == key


def test_read_page_in_another_thread_sees_only_committed_faxes(store: Store) -> None:
    """The daemon reads pages on a connection of their own in a worker thread: the same answer as the
    store's connection, and never a write transaction in progress."""
    store.commit([fax(n, _at(n)) for n in range(5)], [], observed_at=_at(0))
    query = _query(limit=3)
    assert store.read_page(query) == store.fax_page(query)
    store.db.execute("BEGIN IMMEDIATE")
    try:
        store.db.execute("UPDATE faxes SET status = 'Queued'")
        store.db.execute("DELETE FROM recipients WHERE fax_id = '700000'")
        with ThreadPoolExecutor(1) as pool:
            states, key = pool.submit(store.read_page, query).result(timeout=10)
    finally:
        store.db.execute("ROLLBACK")
    assert [s.status for s in states] == ["Sent"] * 3
    assert states[0].recipients[0].phone == "+16505550000"
    assert key is not None
    assert key.fax_id == "700002"


def test_csv_cells_a_spreadsheet_would_run_get_a_quote_and_numbers_do_not() -> None:
    from faxd.audit import csv_rows

    fax = {
        "fax_id": "1",
        "ref": '=HYPERLINK("http://x","y")',
        "from_phone": "+16505551234",
        "recipients": [
            {"index": 0, "phone": "-2+3+cmd|' /C calc'!A0", "status": "Sent"},
            {"index": 1, "phone": "+1 (650) 555-1234", "status": "Sent", "error_code": "@SUM(1)"},
        ],
    }
    rows = list(csv_rows(fax))
    assert rows[0][1] == '\'=HYPERLINK("http://x","y")'
    assert rows[0][9] == "+16505551234"
    assert rows[0][11] == "'-2+3+cmd|' /C calc'!A0"
    assert rows[1][11] == "+1 (650) 555-1234"
    assert rows[1][13] == "'@SUM(1)"
