"""Shared vocabulary of faxd: fax and recipient states, transitions and journalled events.

Frozen values only. This module must not do I/O, read clocks or import anything outside the standard
library's typing helpers; every other layer builds on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FaxStatus(StrEnum):
    """RingCentral's ``messageStatus`` (fax level and per recipient)."""

    QUEUED = "Queued"
    SENT = "Sent"
    DELIVERED = "Delivered"
    DELIVERY_FAILED = "DeliveryFailed"
    SENDING_FAILED = "SendingFailed"
    RECEIVED = "Received"


class EventKind(StrEnum):
    """What a journalled event is about."""

    STATUS = "status"  # the fax's aggregate messageStatus changed
    RECIPIENT = "recipient"  # one outbound recipient's status changed
    AVAILABILITY = "availability"  # Alive -> Deleted -> Purged
    STALLED = "stalled"  # Queued for longer than reconcile.stall_after
    SETTLED = "settled"  # a Sent (reported final=false) held for reconcile.sent_settle: now final
    RESEND = "resend"  # send.retry gave up on a logical fax after its last attempt ended (faxd.core.resend)
    DOCUMENT = "document"  # a received fax's document was downloaded to the spool (DocumentRef)


class Source(StrEnum):
    """What made faxd look at the fax when it found the transition."""

    PUSH = "push"  # a WebSocket hint led to the reconcile
    POLL = "poll"  # a safety or active poll, no hint
    STARTUP = "startup"  # the reconcile at start-up or after a lost WS session
    SEND = "send"  # faxd sent the fax itself and journalled the API's answer
    FETCH = "fetch"  # faxd downloaded a received fax's document (a ``document`` event)


#: Statuses after which nothing more is expected (``Sent`` may still become ``Delivered``).
FINAL_STATUSES = frozenset(
    {
        FaxStatus.SENT,
        FaxStatus.DELIVERED,
        FaxStatus.DELIVERY_FAILED,
        FaxStatus.SENDING_FAILED,
        FaxStatus.RECEIVED,
    }
)
#: Statuses that count as a successful delivery for ``faxd send --wait``.
SUCCESS_STATUSES = frozenset({FaxStatus.SENT, FaxStatus.DELIVERED, FaxStatus.RECEIVED})

#: The recipient index of a fax-level transition in a dedup key (:attr:`Transition.dedup_key`).
FAX_LEVEL = -1


@dataclass(frozen=True, slots=True)
class RecipientState:
    """One entry of an outbound fax's ``to[]``, identified by its position."""

    index: int
    phone: str | None
    status: str
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class FaxState:
    """What faxd knows about one fax, as last read from the message store."""

    fax_id: str
    extension_id: str
    direction: str  # "Outbound" | "Inbound"
    status: str
    availability: str = "Alive"
    recipients: tuple[RecipientState, ...] = ()
    pages: int | None = None
    created: str | None = None  # creationTime, as RingCentral wrote it
    rc_modified: str | None = None  # lastModifiedTime, as RingCentral wrote it
    ref: str | None = None  # the local caller's reference, for faxes sent through faxd
    from_phone: str | None = None

    @property
    def in_flight(self) -> bool:
        """True while the fax or any recipient can still change status on its own."""
        if self.availability != "Alive":
            return False
        if self.status not in FINAL_STATUSES:
            return True
        return any(r.status not in FINAL_STATUSES for r in self.recipients)


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """A received fax's document as faxd stored it in its spool directory."""

    path: str  # absolute path of the file
    sha256: str  # hex digest of the file's bytes
    pages: int | None  # counted in the file, else RingCentral's faxPageCount; None: unknown
    size: int  # bytes
    content_type: str

    def to_wire(self) -> dict[str, Any]:
        """The ``document`` object of the socket protocol; the journal stores the same object."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "pages": self.pages,
            "bytes": self.size,
            "content_type": self.content_type,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> DocumentRef:
        return cls(
            path=str(data["path"]),
            sha256=str(data["sha256"]),
            pages=data.get("pages"),
            size=int(data["bytes"]),
            content_type=str(data["content_type"]),
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """A change faxd observed; becomes an :class:`Event` once the journal gives it a ``seq``."""

    kind: EventKind
    fax_id: str
    extension_id: str
    direction: str
    from_status: str | None
    to_status: str
    final: bool
    recipient_index: int | None = None
    recipient_phone: str | None = None
    error_code: str | None = None
    error_category: str | None = None
    retryable: bool | None = None
    pages: int | None = None
    rc_modified: str | None = None
    ref: str | None = None
    #: Resend policy (send.retry, :mod:`faxd.core.resend`): which try of its logical fax this message is
    #: (None: not a fax faxd sent with a ref under the policy), when the next try is planned (ISO time),
    #: and why faxd gave up (a :class:`faxd.core.resend.GiveUp` value).
    attempt: int | None = None
    retry_at: str | None = None
    gave_up: str | None = None
    #: A received fax's downloaded document: only on its ``document`` event (the key is absent from
    #: every other event on the wire and in the journal).
    document: DocumentRef | None = None

    @property
    def dedup_key(self) -> tuple[str, int, str, str]:
        """(fax, recipient, kind, to_status): journalled at most once."""
        index = FAX_LEVEL if self.recipient_index is None else self.recipient_index
        return (self.fax_id, index, self.kind.value, self.to_status)


@dataclass(frozen=True, slots=True)
class Event:
    """A journalled transition: what socket clients receive."""

    seq: int
    epoch: str
    transition: Transition
    observed_at: str  # ISO 8601 UTC
    source: Source

    def to_wire(self, *, include_numbers: bool = True) -> dict[str, Any]:
        """The ``event`` object of the socket protocol (docs/socket-protocol.md).

        ``attempt``, ``retry_at`` and ``gave_up`` are there only on events of a fax under the resend
        policy (``attempt`` set), so every other event's line stays as it was.
        """
        t = self.transition
        recipient: dict[str, Any] | None = None
        if t.recipient_index is not None:
            recipient = {
                "index": t.recipient_index,
                "phone": t.recipient_phone if include_numbers else None,
            }
        wire: dict[str, Any] = {
            "type": "event",
            "seq": self.seq,
            "epoch": self.epoch,
            "kind": t.kind.value,
            "fax_id": t.fax_id,
            "extension_id": t.extension_id,
            "direction": t.direction,
            "ref": t.ref,
            "recipient": recipient,
            "from_status": t.from_status,
            "to_status": t.to_status,
            "final": t.final,
            "error_code": t.error_code,
            "error_category": t.error_category,
            "retryable": t.retryable,
            "pages": t.pages,
            "rc_modified": t.rc_modified,
            "observed_at": self.observed_at,
            "source": self.source.value,
        }
        if t.attempt is not None:
            wire.update(attempt=t.attempt, retry_at=t.retry_at, gave_up=t.gave_up)
        if t.document is not None:
            wire["document"] = t.document.to_wire()
        return wire


def event_key(event: Mapping[str, Any]) -> tuple[str, int, str, str]:
    """The :attr:`Transition.dedup_key` of an event as a socket client receives it
    (:meth:`Event.to_wire`): (fax, recipient index or :data:`FAX_LEVEL`, kind, to_status)."""
    recipient = event["recipient"]
    index = FAX_LEVEL if recipient is None else int(recipient["index"])
    return (str(event["fax_id"]), index, str(event["kind"]), str(event["to_status"]))
