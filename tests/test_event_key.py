"""event_key: the dedup key of a socket event is the journal's (Transition.dedup_key), read from the wire."""

from __future__ import annotations

import json

import pytest

from faxd.core.model import FAX_LEVEL, Event, EventKind, Source, Transition, event_key


@pytest.mark.parametrize(
    ("kind", "index"),
    [(EventKind.STATUS, None), (EventKind.RECIPIENT, 0), (EventKind.RECIPIENT, 2), (EventKind.SETTLED, None)],
)
@pytest.mark.parametrize("include_numbers", [True, False])
def test_the_wire_event_has_the_journal_key(
    kind: EventKind, index: int | None, include_numbers: bool
) -> None:
    t = Transition(kind, "4711", "200000001", "Outbound", "Queued", "Sent", True, index, "+16505550100")
    event = Event(7, "epoch", t, "2026-01-01T00:00:00Z", Source.PUSH)
    wire = json.loads(json.dumps(event.to_wire(include_numbers=include_numbers)))
    assert event_key(wire) == t.dedup_key
    assert event_key(wire)[1] == (FAX_LEVEL if index is None else index)


def test_the_fax_level_is_not_recipient_zero() -> None:
    fax = Transition(EventKind.STATUS, "1", "2", "Outbound", None, "Sent", True)
    first = Transition(EventKind.STATUS, "1", "2", "Outbound", None, "Sent", True, 0)
    assert fax.dedup_key != first.dedup_key
    assert FAX_LEVEL == -1, "the journal's UNIQUE index holds -1 for the fax level: changing it breaks stores"
