"""The fax status model: records in, transitions out (pure, table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from faxd.core.model import EventKind, FaxState, RecipientState
from faxd.core.status import (
    EXPECTED,
    RecordError,
    apply_record,
    diff,
    is_expected,
    is_final,
    settled,
    stalled,
    unsettled,
)


def record(status: str = "Queued", *to: tuple[str, str | None], **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": 111,
        "type": "Fax",
        "direction": "Outbound",
        "messageStatus": status,
        "availability": "Alive",
        "faxPageCount": 2,
        "creationTime": "2026-11-24T10:00:00.000Z",
        "lastModifiedTime": "2026-11-24T10:00:05.000Z",
        "to": [
            {"phoneNumber": f"+1650555000{i}", "messageStatus": s, **({"faxErrorCode": c} if c else {})}
            for i, (s, c) in enumerate(to or (("Queued", None),))
        ],
    }
    rec.update(extra)
    return rec


def moves(old: FaxState | None, new: FaxState) -> list[tuple[str, int | None, str | None, str]]:
    return [(t.kind.value, t.recipient_index, t.from_status, t.to_status) for t in diff(old, new)]


def state(rec: dict[str, Any], old: FaxState | None = None) -> FaxState:
    s = apply_record(old, rec, extension_id="200")
    assert s is not None
    return s


def test_first_sight_of_a_queued_fax_reports_only_the_fax_status() -> None:
    assert moves(None, state(record())) == [("status", None, None, "Queued")]


def test_first_sight_of_a_finished_fax_reports_every_outcome() -> None:
    new = state(record("SendingFailed", ("Sent", None), ("SendingFailed", "LineBusy")))
    assert moves(None, new) == [
        ("status", None, None, "SendingFailed"),
        ("recipient", 0, None, "Sent"),
        ("recipient", 1, None, "SendingFailed"),
    ]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        # one recipient goes Sent: fax and recipient move together
        (
            (("Queued", None),),
            (("Sent", None),),
            [("status", None, "Queued", "Sent"), ("recipient", 0, "Queued", "Sent")],
        ),
        # mixed: the fax stays Queued while one of two recipients fails
        (
            (("Queued", None), ("Queued", None)),
            (("SendingFailed", "NoAnswer"), ("Queued", None)),
            [("recipient", 0, "Queued", "SendingFailed")],
        ),
        # nothing changed: nothing to report
        ((("Sent", None),), (("Sent", None),), []),
        # Sent -> Delivered later
        (
            (("Sent", None),),
            (("Delivered", None),),
            [("status", None, "Sent", "Delivered"), ("recipient", 0, "Sent", "Delivered")],
        ),
    ],
)
def test_recipient_moves(
    before: tuple[tuple[str, str | None], ...],
    after: tuple[tuple[str, str | None], ...],
    expected: list[tuple[str, int | None, str | None, str]],
) -> None:
    def aggregate(to: tuple[tuple[str, str | None], ...]) -> str:
        statuses = [s for s, _ in to]
        if "Queued" in statuses:
            return "Queued"
        if "SendingFailed" in statuses:
            return "SendingFailed"
        return "Delivered" if all(s == "Delivered" for s in statuses) else "Sent"

    old = state(record(aggregate(before), *before))
    new = state(record(aggregate(after), *after), old)
    got = [(k, i if k == "recipient" else None, f, t) for k, i, f, t in moves(old, new)]
    assert got == expected


def test_failure_carries_raw_code_category_and_retryable() -> None:
    old = state(record("Queued", ("Queued", None)))
    new = state(record("SendingFailed", ("SendingFailed", "LineBusy")), old)
    fax, recipient = diff(old, new)
    assert (fax.error_code, fax.error_category, fax.retryable, fax.final) == ("LineBusy", "busy", True, True)
    assert (recipient.error_code, recipient.recipient_phone) == ("LineBusy", "+16505550000")


def test_unknown_error_code_is_kept_and_classed_other() -> None:
    new = state(record("SendingFailed", ("SendingFailed", "BrandNewCode")))
    recipient = diff(None, new)[1]
    assert (recipient.error_code, recipient.error_category) == ("BrandNewCode", "other")


def test_availability_only_record_updates_a_known_fax() -> None:
    old = state(record("Sent", ("Sent", None)))
    new = apply_record(old, {"id": "111", "availability": "Deleted"}, extension_id="200")
    assert new is not None
    assert new.status == "Sent"
    assert moves(old, new) == [("availability", None, "Alive", "Deleted")]


def test_availability_only_record_for_an_unknown_fax_is_ignored() -> None:
    assert apply_record(None, {"id": "9", "availability": "Purged"}, extension_id="200") is None


def test_other_message_types_are_ignored() -> None:
    assert apply_record(None, record(type="SMS"), extension_id="200") is None


def test_inbound_received() -> None:
    rec = {
        "id": "5",
        "type": "Fax",
        "direction": "Inbound",
        "messageStatus": "Received",
        "from": {"phoneNumber": "+1415"},
    }
    new = state(rec)
    assert new.from_phone == "+1415"
    assert not new.in_flight
    (t,) = diff(None, new)
    assert (t.kind, t.to_status, t.final, t.direction) == (EventKind.STATUS, "Received", True, "Inbound")


def test_backwards_move_is_reported_not_hidden() -> None:
    old = state(record("Sent", ("Sent", None)))
    new = state(record("Queued", ("Queued", None)), old)
    assert ("status", None, "Sent", "Queued") in moves(old, new)
    assert not is_expected("Sent", "Queued")


def test_ref_survives_new_records() -> None:
    old = FaxState(
        "111", "200", "Outbound", "Queued", ref="mine", recipients=(RecipientState(0, "+1", "Queued"),)
    )
    assert state(record("Sent", ("Sent", None)), old).ref == "mine"


@pytest.mark.parametrize(
    "bad",
    [
        "not a dict",
        {"type": "Fax"},
        {"id": 1, "type": "Fax", "direction": "Outbound"},
        {"id": 1, "type": "Fax", "direction": "Sideways", "messageStatus": "Sent"},
        {"id": 1, "type": "Fax", "direction": "Outbound", "messageStatus": "Sent", "to": "x"},
        {"id": 1, "type": "Fax", "direction": "Outbound", "messageStatus": "Sent", "to": [3]},
        {"id": {"x": 1}, "type": "Fax"},
    ],
)
def test_malformed_records_raise_record_error(bad: Any) -> None:
    with pytest.raises(RecordError):
        apply_record(None, bad, extension_id="200")


def test_stalled_fires_after_stall_after_for_queued_outbound_only() -> None:
    queued = state(record())
    created = 1795514400.0  # 2026-11-24T10:00:00Z
    assert stalled(queued, now=created + 10, stall_after=1800) is None
    t = stalled(queued, now=created + 1800, stall_after=1800)
    assert t is not None
    assert t.kind is EventKind.STALLED
    assert not t.final
    assert stalled(state(record("Sent", ("Sent", None))), now=created + 9999, stall_after=1800) is None


def test_every_status_has_a_row_in_the_table() -> None:
    from faxd.core.model import FaxStatus

    assert set(EXPECTED) == {None, *(s.value for s in FaxStatus)}


# -- duplicates, stale records, the settle rule ----------------------------------------------------


def test_a_duplicate_record_yields_the_same_state_and_no_transition() -> None:
    first = state(record("Queued", ("Queued", None)))
    again = state(record("Queued", ("Queued", None)), first)
    assert again == first
    assert diff(first, again) == []


def test_an_older_record_does_not_move_the_state_backwards() -> None:
    sent = state(record("Sent", ("Sent", None), lastModifiedTime="2026-11-24T10:00:09.000Z"))
    late = record("Queued", ("Queued", None), lastModifiedTime="2026-11-24T10:00:05.000Z")
    assert state(late, sent) is sent
    # RingCentral saying so with a newer time is reported (rule 4), however odd.
    newer = record("Queued", ("Queued", None), lastModifiedTime="2026-11-24T10:00:10.000Z")
    assert moves(sent, state(newer, sent)) == [
        ("status", None, "Sent", "Queued"),
        ("recipient", 0, "Sent", "Queued"),
    ]


@pytest.mark.parametrize(
    ("status", "settle", "final"),
    [
        ("Sent", False, True),
        ("Sent", True, False),
        ("Delivered", True, True),
        ("SendingFailed", True, True),
        ("Queued", False, False),
        ("Received", True, True),
    ],
)
def test_is_final_with_and_without_a_settle_period(status: str, settle: bool, final: bool) -> None:
    assert is_final(status, settle=settle) is final


def test_with_a_settle_period_sent_is_journalled_not_final_and_keyed_for_settling() -> None:
    queued = state(record("Queued", ("Queued", None), ("Queued", None)))
    new = state(record("SendingFailed", ("Sent", None), ("SendingFailed", "NoAnswer")), queued)
    ts = diff(queued, new, settle=True)
    assert [(t.kind.value, t.recipient_index, t.to_status, t.final) for t in ts] == [
        ("status", None, "SendingFailed", True),
        ("recipient", 0, "Sent", False),
        ("recipient", 1, "SendingFailed", True),
    ]
    assert [unsettled(t) for t in ts] == [None, ("111", 0), None]


def test_settled_waits_then_fires_once_the_sent_held() -> None:
    sent = state(record("Sent", ("Sent", None)))
    assert settled(sent, ("111", None), since=100.0, now=104.0, settle_after=5.0) == "wait"
    t = settled(sent, ("111", None), since=100.0, now=105.0, settle_after=5.0)
    assert not isinstance(t, str)
    assert (t.kind, t.from_status, t.to_status, t.final, t.recipient_index) == (
        EventKind.SETTLED,
        "Sent",
        "Sent",
        True,
        None,
    )
    r = settled(sent, ("111", 0), since=100.0, now=105.0, settle_after=5.0)
    assert not isinstance(r, str)
    assert (r.kind, r.recipient_index, r.recipient_phone) == (EventKind.SETTLED, 0, "+16505550000")
    assert r.dedup_key == ("111", 0, "settled", "Sent")


@pytest.mark.parametrize(
    "rec",
    [
        record("Delivered", ("Delivered", None)),  # moved on: Delivered is the final event
        record("Sent", ("Sent", None), availability="Deleted"),
    ],
)
def test_settled_is_moot_once_the_fax_moved_on(rec: dict[str, Any]) -> None:
    assert settled(state(rec), ("111", None), since=0.0, now=100.0, settle_after=5.0) == "moot"
    assert settled(state(rec), ("111", 0), since=0.0, now=100.0, settle_after=5.0) == "moot"


def test_a_vanished_message_becomes_purged_with_one_final_availability_event() -> None:
    queued = state(record())
    gone = state({"id": 111, "availability": "Purged"}, queued)
    assert [(t.kind.value, t.from_status, t.to_status, t.final) for t in diff(queued, gone)] == [
        ("availability", "Alive", "Purged", True)
    ]
    assert not gone.in_flight
