"""The fax status model: from RingCentral message records to faxd transitions.

Rules (the whole model; the code below is the table and a few lines applying it):

1. RingCentral is the only source of truth. faxd reports what the message store says and never invents a
   status, not even an "obvious" intermediate one.
2. A fax's aggregate ``messageStatus`` and each outbound recipient's ``messageStatus`` are tracked apart.
   A change of either is one transition; a change of ``availability`` (Alive → Deleted → Purged) is one
   transition of kind ``availability``.
3. The first time faxd sees a fax it reports the fax's status (from ``None``) and every recipient whose
   status is not the starting ``Queued`` (a fax first seen after it finished still yields its outcomes).
4. :data:`EXPECTED` lists the moves RingCentral normally makes. Anything else (``Sent → Queued`` after a
   resend, say) is still reported, because RingCentral said so, and is marked unexpected so the adapter
   can log it. The journal keeps each (fax, recipient, kind, to_status) once.
5. A transition is ``final`` when its target status is final (:data:`FINAL_STATUSES`); a failed one
   carries the raw ``faxErrorCode`` plus its category and retryable flag (:mod:`faxd.core.taxonomy`).
6. Records that come back from message-sync as ``id`` + ``availability`` only (deleted or purged) update
   a fax faxd already knows and are ignored otherwise.
7. A record older than what faxd already holds (its ``lastModifiedTime`` is earlier than the known one,
   e.g. a late bulk GET answer or an overlap duplicate) changes nothing: :func:`apply_record` returns
   the old state. An equal record yields an equal state, hence no transition: duplicates are harmless.
8. Settle rule for ``Sent`` (``reconcile.sent_settle`` seconds, default 0). With 0, ``Sent`` is final at
   once. With a positive value, a ``Sent`` transition (fax or recipient) is journalled with
   ``final=false``; once faxd has re-read the fax and it is still ``Sent`` at least ``sent_settle``
   seconds after faxd first saw it ``Sent``, one more event of kind ``settled`` (from ``Sent`` to
   ``Sent``, ``final=true``) says the outcome is final (:func:`settled`). If the fax moves on first
   (``Delivered``, ``DeliveryFailed``), that transition is the final one and no ``settled`` follows.
   A later ``Sent → Delivered`` is still reported after a ``settled``.

Pure: no I/O, no clock reads; ``now`` is an argument where time matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Literal

from faxd.core.model import (
    FINAL_STATUSES,
    EventKind,
    FaxState,
    FaxStatus,
    RecipientState,
    Transition,
)
from faxd.core.taxonomy import classify

_Q, _S, _D = FaxStatus.QUEUED.value, FaxStatus.SENT.value, FaxStatus.DELIVERED.value
_DF, _SF, _R = (
    FaxStatus.DELIVERY_FAILED.value,
    FaxStatus.SENDING_FAILED.value,
    FaxStatus.RECEIVED.value,
)

#: Moves RingCentral normally makes, per status (fax level and recipient level alike).
EXPECTED: Mapping[str | None, frozenset[str]] = {
    None: frozenset({_Q, _S, _D, _DF, _SF, _R}),
    _Q: frozenset({_S, _D, _DF, _SF}),
    _S: frozenset({_D, _DF}),
    _D: frozenset(),
    _DF: frozenset(),
    _SF: frozenset(),
    _R: frozenset(),
}
AVAILABILITY_EXPECTED: Mapping[str, frozenset[str]] = {
    "Alive": frozenset({"Deleted", "Purged"}),
    "Deleted": frozenset({"Alive", "Purged"}),  # a deleted message can be restored
    "Purged": frozenset(),
}


class RecordError(ValueError):
    """A message record faxd cannot use (wrong shape); the reason is safe to log and count."""


def is_expected(from_status: str | None, to_status: str) -> bool:
    return to_status in EXPECTED.get(from_status, frozenset())


def _text(record: Mapping[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise RecordError(f"field {key} is not a string")


def apply_record(old: FaxState | None, record: Mapping[str, Any], *, extension_id: str) -> FaxState | None:
    """The new state of a fax after reading ``record``; None when the record is not about a fax we track.

    Raises :class:`RecordError` when the record is malformed.
    """
    if not isinstance(record, Mapping):
        raise RecordError("record is not an object")
    fax_id = _text(record, "id")
    if not fax_id:
        raise RecordError("record has no id")
    availability = _text(record, "availability") or "Alive"
    if "messageStatus" not in record and "type" not in record:
        # message-sync reports deleted and purged records as id + availability only.
        return None if old is None else replace(old, availability=availability)
    if old is not None and _older(_text(record, "lastModifiedTime"), old.rc_modified):
        return old
    if record.get("type") not in (None, "Fax"):
        return None
    status = _text(record, "messageStatus")
    if status is None:
        raise RecordError("record has no messageStatus")
    direction = _text(record, "direction")
    if direction not in ("Inbound", "Outbound"):
        raise RecordError("record has no valid direction")
    recipients: list[RecipientState] = []
    to = record.get("to") if direction == "Outbound" else None
    if to is not None:
        if not isinstance(to, list):
            raise RecordError("field to is not a list")
        for index, entry in enumerate(to):
            if not isinstance(entry, Mapping):
                raise RecordError("an entry of to is not an object")
            r_status = _text(entry, "messageStatus") or status
            code = _text(entry, "faxErrorCode")
            recipients.append(RecipientState(index, _text(entry, "phoneNumber"), r_status, code))
    sender = record.get("from")
    from_phone = _text(sender, "phoneNumber") if isinstance(sender, Mapping) else None
    pages = record.get("faxPageCount")
    return FaxState(
        fax_id=fax_id,
        extension_id=_text(record, "extensionId") or extension_id,
        direction=direction,
        status=status,
        availability=availability,
        recipients=tuple(recipients),
        pages=pages if isinstance(pages, int) and not isinstance(pages, bool) else None,
        created=_text(record, "creationTime"),
        rc_modified=_text(record, "lastModifiedTime"),
        ref=old.ref if old is not None else None,
        from_phone=from_phone,
    )


def _older(candidate: str | None, known: str | None) -> bool:
    """True when ``candidate`` is a readable time strictly before the readable ``known`` time."""
    a, b = parse_time(candidate), parse_time(known)
    return a is not None and b is not None and a < b


def _transition(
    new: FaxState,
    kind: EventKind,
    from_status: str | None,
    to_status: str,
    *,
    final: bool,
    recipient: RecipientState | None = None,
    error_code: str | None = None,
) -> Transition:
    klass = classify(error_code)
    return Transition(
        kind=kind,
        fax_id=new.fax_id,
        extension_id=new.extension_id,
        direction=new.direction,
        from_status=from_status,
        to_status=to_status,
        final=final,
        recipient_index=None if recipient is None else recipient.index,
        recipient_phone=None if recipient is None else recipient.phone,
        error_code=error_code if klass is not None else None,
        error_category=None if klass is None else klass.category,
        retryable=None if klass is None else klass.retryable,
        pages=new.pages,
        rc_modified=new.rc_modified,
        ref=new.ref,
    )


_FAILED = frozenset({_SF, _DF})


def is_final(status: str, *, settle: bool = False) -> bool:
    """Whether a transition to ``status`` is final; with ``settle``, ``Sent`` waits to be settled."""
    if settle and status == _S:
        return False
    return status in FINAL_STATUSES


def diff(old: FaxState | None, new: FaxState, *, settle: bool = False) -> list[Transition]:
    """The transitions that lead from ``old`` (None: never seen) to ``new``, fax level first.

    ``settle``: a settle period is configured, so ``Sent`` is journalled with ``final=false`` (rule 8).
    """
    out: list[Transition] = []
    old_status = None if old is None else old.status
    if old_status != new.status:
        # A failed single-recipient fax is the common case: put the reason on the fax event too.
        code = next((r.error_code for r in new.recipients if r.error_code), None)
        out.append(
            _transition(
                new,
                EventKind.STATUS,
                old_status,
                new.status,
                final=is_final(new.status, settle=settle),
                error_code=code if new.status in _FAILED else None,
            )
        )
    old_recipients = {} if old is None else {r.index: r for r in old.recipients}
    for recipient in new.recipients:
        before = old_recipients.get(recipient.index)
        before_status = None if before is None else before.status
        if before_status == recipient.status or (before is None and recipient.status == _Q):
            continue
        out.append(
            _transition(
                new,
                EventKind.RECIPIENT,
                before_status,
                recipient.status,
                final=is_final(recipient.status, settle=settle),
                recipient=recipient,
                error_code=recipient.error_code if recipient.status in _FAILED else None,
            )
        )
    old_availability = "Alive" if old is None else old.availability
    if old_availability != new.availability:
        out.append(
            _transition(
                new,
                EventKind.AVAILABILITY,
                old_availability,
                new.availability,
                final=new.availability == "Purged",
            )
        )
    return out


def parse_time(value: str | None) -> float | None:
    """Unix time of a RingCentral ISO 8601 timestamp, or None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


def stalled(state: FaxState, *, now: float, stall_after: float) -> Transition | None:
    """A ``stalled`` transition when an outbound fax has sat in ``Queued`` longer than ``stall_after``.

    ``now`` is Unix time. The journal's dedup key makes it fire once per fax.
    """
    if state.direction != "Outbound" or state.status != _Q or state.availability != "Alive":
        return None
    created = parse_time(state.created)
    if created is None or now - created < stall_after:
        return None
    return _transition(state, EventKind.STALLED, _Q, _Q, final=False)


SettleKey = tuple[str, int | None]  # (fax id, recipient index or None for the fax-level status)


def unsettled(transition: Transition) -> SettleKey | None:
    """The settle key of a ``Sent`` transition journalled with ``final=false``; None for any other."""
    if (
        transition.kind in (EventKind.STATUS, EventKind.RECIPIENT)
        and transition.to_status == _S
        and not transition.final
    ):
        return (transition.fax_id, transition.recipient_index)
    return None


def settled(
    state: FaxState, key: SettleKey, *, since: float, now: float, settle_after: float
) -> Transition | Literal["wait", "moot"]:
    """Rule 8 for one unsettled ``Sent`` (fax level when ``key[1]`` is None), seen ``Sent`` at ``since``.

    Returns a ``settled`` transition when it held ``settle_after`` seconds; ``"moot"`` when there is
    nothing to settle any more (the status moved on, or the fax was deleted); ``"wait"`` otherwise.
    """
    _, index = key
    if index is None:
        status: str | None = state.status
        recipient = None
    else:
        recipient = next((r for r in state.recipients if r.index == index), None)
        status = None if recipient is None else recipient.status
    if status != _S or state.availability != "Alive":
        return "moot"
    if now - since < settle_after:
        return "wait"
    kind = EventKind.STATUS if index is None else EventKind.RECIPIENT
    t = _transition(state, kind, _S, _S, final=True, recipient=recipient)
    return replace(t, kind=EventKind.SETTLED)
