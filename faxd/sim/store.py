"""The message store and the fax lifecycle engine (no aiohttp).

Holds every message of the simulated account, moves outbound fax recipients from ``Queued``
to their scripted outcome on event-loop timers, keeps a global change revision (for
``message-sync``) and reports every new or updated message to a listener (the notification
hub). Records are rendered exactly as the REST API returns them (``GetMessageInfoResponse``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from faxd.sim.common import ApiError, JsonDict, Timers, api_error, iso, new_token
from faxd.sim.config import RecipientScript, SimConfig

ChangeKind = Literal["new", "updated"]

MESSAGE_TYPES = ("Fax", "SMS", "VoiceMail", "Pager", "Text")
DIRECTIONS = ("Inbound", "Outbound")
AVAILABILITIES = ("Alive", "Deleted", "Purged")
READ_STATUSES = ("Read", "Unread")

_MIN_STEP = timedelta(milliseconds=1)

# A one-page PDF, served as the fax content (``RenderedDocument``).
TINY_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


def make_pdf(pages: int, title: str = "Received fax") -> bytes:
    """A small, valid PDF of ``pages`` letter-size pages, each saying ``title`` and its page number:
    a catalog, a page tree whose ``/Count`` is ``pages``, one page object and content stream per page,
    and a cross-reference table with the true byte offsets (what a PDF reader checks)."""
    pages = max(1, pages)
    safe = "".join(c for c in title if c.isalnum() or c in " -_.:")[:60]
    objects: list[bytes] = [
        b"<</Type /Catalog /Pages 2 0 R>>",
        b"",  # the page tree, once the kids' numbers are known
        b"<</Type /Font /Subtype /Type1 /BaseFont /Helvetica>>",
    ]
    kids: list[str] = []
    for n in range(1, pages + 1):
        text = f"BT /F1 18 Tf 72 720 Td ({safe} - page {n} of {pages}) Tj ET".encode()
        objects.append(b"<</Length %d>>\nstream\n%s\nendstream" % (len(text), text))
        content = len(objects)
        objects.append(
            b"<</Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R"
            b" /Resources <</Font <</F1 3 0 R>>>>>>" % content
        )
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<</Type /Pages /Kids [{' '.join(kids)}] /Count {pages}>>".encode()
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: list[int] = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<</Size %d /Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def digits_of(phone: str) -> str:
    return re.sub(r"\D", "", phone)


def extension_phone(index: int) -> str:
    """The fax number of the account's ``index``-th extension."""
    return f"+1650555{9000 + index:04d}"


def count_pdf_pages(data: bytes) -> int:
    """Rough page count of a PDF (``/Type /Page`` objects); 1 for anything else."""
    if not data.startswith(b"%PDF"):
        return 1
    pages = len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))
    return max(1, pages)


@dataclass
class Attachment:
    id: int
    content_type: str
    data: bytes
    file_name: str | None = None
    type: str = "RenderedDocument"


@dataclass
class Recipient:
    recipient_id: str
    phone: str
    name: str | None = None
    status: str = "Queued"
    error_code: str | None = None


@dataclass
class Message:
    id: int
    extension_id: str
    type: str
    direction: str
    creation_time: datetime
    last_modified: datetime
    revision: int
    from_party: JsonDict
    recipients: list[Recipient]
    fixed_status: str | None = None  # inbound messages: "Received"; None = aggregate of to[]
    availability: str = "Alive"
    read_status: str = "Unread"
    priority: str = "Normal"
    page_count: int = 1
    resolution: str = "High"
    cover_index: int | None = None
    cover_text: str | None = None
    subject: str | None = None
    attachments: list[Attachment] = field(default_factory=list)

    @property
    def message_status(self) -> str:
        if self.fixed_status is not None:
            return self.fixed_status
        statuses = [r.status for r in self.recipients]
        if any(s == "Queued" for s in statuses):
            return "Queued"
        if any(s == "SendingFailed" for s in statuses):
            return "SendingFailed"
        if statuses and all(s == "Delivered" for s in statuses):
            return "Delivered"
        return "Sent"


@dataclass
class Change:
    message: Message
    kind: ChangeKind


@dataclass
class SyncFrame:
    extension_id: str
    types: tuple[str, ...]
    directions: tuple[str, ...]
    date_from: datetime
    revision: int


class MessageStore:
    """Ground truth of the simulated message store."""

    def __init__(
        self,
        config: SimConfig,
        timers: Timers,
        wall_clock: Callable[[], datetime],
        listener: Callable[[Change], None],
    ) -> None:
        self.config = config
        self._timers = timers
        self._wall = wall_clock
        self._listener = listener
        self.rng = random.Random(config.seed)
        self.messages: dict[int, Message] = {}
        self.revision = 0
        self._next_id = 3_000_000_004
        self._next_recipient = 1
        self.outcomes: dict[str, RecipientScript] = {}
        self._sync_tokens: dict[str, SyncFrame] = {}
        self._refused_tokens: dict[str, str] = {}  # token -> the error code it is refused with
        self.base_url = ""

    # -- helpers ---------------------------------------------------------------------------
    def resolve_extension(self, extension_id: str | None, owner: str | None = None) -> str:
        if extension_id is None or extension_id == "~":
            return owner or self.config.owner_extension
        if extension_id not in self.config.extensions:
            raise ValueError(f"unknown extension {extension_id!r}")
        return extension_id

    def extension_party(self, extension_id: str) -> JsonDict:
        index = self.config.extensions.index(extension_id)
        return {
            "phoneNumber": extension_phone(index),
            "name": f"Sim User {extension_id}",
            "location": "San Mateo, CA",
            "extensionId": extension_id,
        }

    def _new_id(self) -> int:
        value = self._next_id
        self._next_id += 1000
        return value

    def _bump(self, message: Message) -> None:
        self.revision += 1
        message.revision = self.revision
        now = self._wall()
        message.last_modified = max(now, message.last_modified + _MIN_STEP)

    def _add(self, message: Message) -> Message:
        self.messages[message.id] = message
        self._listener(Change(message, "new"))
        return message

    def _attachment(self, data: bytes, content_type: str, file_name: str | None) -> Attachment:
        return Attachment(self._new_id(), content_type, data, file_name)

    def set_outcome(self, phone: str, script: RecipientScript) -> None:
        self.outcomes[digits_of(phone)] = script

    def script_for(self, phone: str) -> RecipientScript:
        """A scripted outcome for ``phone``, else the documented magic numbers."""
        digits = digits_of(phone)
        scripted = self.outcomes.get(digits)
        if scripted is not None:
            return RecipientScript(
                phone,
                scripted.outcome,
                scripted.error_code,
                scripted.after,
                scripted.delivered_after,
            )
        if digits.endswith("0001"):
            return RecipientScript(phone, "SendingFailed", "LineBusy")
        if digits.endswith("0002"):
            return RecipientScript(phone, "SendingFailed", "NoAnswer")
        if digits.endswith("0003"):
            return RecipientScript(
                phone, "SendingFailed", "InvalidNumber", after=self.config.default_delay[0] / 10
            )
        if digits.endswith("0004"):
            return RecipientScript(phone, "Sent", delivered_after=self._random_delay())
        return RecipientScript(phone, "Sent")

    def _random_delay(self) -> float:
        low, high = self.config.default_delay
        return self.rng.uniform(low, high)

    # -- creating messages -----------------------------------------------------------------
    def create_outbound(
        self,
        extension_id: str,
        scripts: Sequence[RecipientScript],
        *,
        pages: int = 1,
        names: Sequence[str | None] | None = None,
        resolution: str = "High",
        cover_index: int | None = None,
        cover_text: str | None = None,
        attachments: Iterable[tuple[bytes, str, str | None]] = (),
    ) -> Message:
        if not scripts:
            raise ValueError("an outbound fax needs at least one recipient")
        now = self._wall()
        self.revision += 1
        recipients = []
        for i, script in enumerate(scripts):
            name = names[i] if names is not None and i < len(names) else None
            recipients.append(Recipient(str(self._next_recipient), script.phone, name))
            self._next_recipient += 1
        # RingCentral renders every uploaded document into one PDF (``RenderedDocument``).
        uploaded = list(attachments)
        pdfs = [d for d, _, _ in uploaded if d.startswith(b"%PDF")]
        rendered = self._attachment(pdfs[0] if pdfs else TINY_PDF, "application/pdf", None)
        message = Message(
            id=self._new_id(),
            extension_id=extension_id,
            type="Fax",
            direction="Outbound",
            creation_time=now,
            last_modified=now,
            revision=self.revision,
            from_party=self.extension_party(extension_id),
            recipients=recipients,
            read_status="Read",
            page_count=pages,
            resolution=resolution,
            cover_index=cover_index,
            cover_text=cover_text,
            attachments=[rendered],
        )
        self._add(message)
        for recipient, script in zip(recipients, scripts, strict=True):
            after = script.after if script.after is not None else self._random_delay()
            self._timers.call_later(after, self._finisher(message, recipient, script))
        return message

    def create_inbound(self, extension_id: str, from_phone: str, *, pages: int = 1) -> Message:
        """A received fax whose content is a generated PDF of ``pages`` pages (``faxPageCount`` too)."""
        pdf = self._attachment(make_pdf(pages, f"Fax to extension {extension_id}"), "application/pdf", None)
        return self._receive(extension_id, "Fax", from_phone, from_phone, pdf, page_count=pages)

    def create_sms(self, extension_id: str, from_phone: str, text: str) -> Message:
        body = self._attachment(text.encode(), "text/plain", None)
        body.type = "Text"
        return self._receive(extension_id, "SMS", from_phone, text, body)

    def _receive(
        self,
        extension_id: str,
        message_type: str,
        from_phone: str,
        subject: str,
        attachment: Attachment,
        *,
        page_count: int = 1,
    ) -> Message:
        """A message that arrives for ``extension_id`` already in its final status, Received."""
        now = self._wall()
        self.revision += 1
        party = self.extension_party(extension_id)
        message = Message(
            id=self._new_id(),
            extension_id=extension_id,
            type=message_type,
            direction="Inbound",
            creation_time=now,
            last_modified=now,
            revision=self.revision,
            from_party={"phoneNumber": from_phone},
            recipients=[Recipient("", party["phoneNumber"], party["name"], "Received")],
            fixed_status="Received",
            page_count=page_count,
            subject=subject,
            attachments=[attachment],
        )
        return self._add(message)

    # -- lifecycle -------------------------------------------------------------------------
    def _finisher(
        self, message: Message, recipient: Recipient, script: RecipientScript
    ) -> Callable[[], None]:
        def finish() -> None:
            recipient.status = script.outcome
            recipient.error_code = script.error_code if script.outcome == "SendingFailed" else None
            self._updated(message)
            if script.outcome == "Sent" and script.delivered_after is not None:
                self._timers.call_later(script.delivered_after, deliver)

        def deliver() -> None:
            recipient.status = "Delivered"
            self._updated(message)

        return finish

    def _updated(self, message: Message) -> None:
        self._bump(message)
        self._listener(Change(message, "updated"))

    def delete(self, message: Message, *, purge: bool = False) -> None:
        target = "Purged" if purge else "Deleted"
        if message.availability == target or message.availability == "Purged":
            return
        message.availability = target
        if purge:
            message.attachments = []
        self._updated(message)

    # -- rendering -------------------------------------------------------------------------
    def message_uri(self, message: Message) -> str:
        return (
            f"{self.base_url}/restapi/v1.0/account/{self.config.account_id}"
            f"/extension/{message.extension_id}/message-store/{message.id}"
        )

    def record(self, message: Message) -> JsonDict:
        """The message as ``GetMessageInfoResponse``."""
        uri = self.message_uri(message)
        to: list[JsonDict] = []
        for r in message.recipients:
            entry: JsonDict = {"phoneNumber": r.phone}
            if r.name:
                entry["name"] = r.name
            if message.direction == "Outbound":
                entry["recipientId"] = r.recipient_id
                entry["messageStatus"] = r.status
                if r.error_code is not None:
                    entry["faxErrorCode"] = r.error_code
            to.append(entry)
        record: JsonDict = {
            "uri": uri,
            "id": message.id,
            "extensionId": message.extension_id,
            "to": to,
            "from": dict(message.from_party),
            "type": message.type,
            "creationTime": iso(message.creation_time),
            "readStatus": message.read_status,
            "priority": message.priority,
            "attachments": [
                {
                    "id": a.id,
                    "uri": f"{uri}/content/{a.id}",
                    "type": a.type,
                    "contentType": a.content_type,
                    "size": len(a.data),
                    **({"fileName": a.file_name} if a.file_name else {}),
                }
                for a in message.attachments
            ],
            "direction": message.direction,
            "availability": message.availability,
            "messageStatus": message.message_status,
            "lastModifiedTime": iso(message.last_modified),
        }
        if message.subject is not None:
            record["subject"] = message.subject
        if message.type == "Fax":
            record["faxResolution"] = message.resolution
            record["faxPageCount"] = message.page_count
            if message.cover_index is not None:
                record["coverIndex"] = message.cover_index
            if message.cover_text is not None:
                record["coverPageText"] = message.cover_text
        return record

    def fax_response(self, message: Message) -> JsonDict:
        """The message as ``FaxResponse`` (answer to ``POST …/fax``)."""
        record = self.record(message)
        record.pop("extensionId", None)
        record["to"] = [{k: v for k, v in entry.items() if k != "faxErrorCode"} for entry in record["to"]]
        record["attachments"] = [
            {
                "id": a["id"],
                "uri": a["uri"],
                "type": a["type"],
                "contentType": a["contentType"],
                **({"filename": a["fileName"]} if "fileName" in a else {}),
            }
            for a in record["attachments"]
        ]
        return record

    def sync_record(self, message: Message) -> JsonDict:
        if message.availability != "Alive":
            return {"id": message.id, "availability": message.availability}
        return self.record(message)

    # -- queries ---------------------------------------------------------------------------
    def get(self, extension_id: str, message_id: str) -> Message | None:
        try:
            key = int(message_id)
        except ValueError:
            return None
        message = self.messages.get(key)
        if message is None or message.extension_id != extension_id:
            return None
        return message

    def select(
        self,
        extension_id: str,
        *,
        types: Sequence[str] = (),
        directions: Sequence[str] = (),
        availabilities: Sequence[str] = ("Alive",),
        read_statuses: Sequence[str] = (),
        date_from: datetime | None = None,
        date_to: datetime | None = None,
        phone: str | None = None,
    ) -> list[Message]:
        """Messages of one extension matching the filters, newest first."""
        phone_digits = digits_of(phone) if phone else None
        out = []
        for m in self.messages.values():
            if m.extension_id != extension_id:
                continue
            if types and m.type not in types:
                continue
            if directions and m.direction not in directions:
                continue
            if availabilities and m.availability not in availabilities:
                continue
            if read_statuses and m.read_status not in read_statuses:
                continue
            if date_from is not None and m.creation_time < date_from:
                continue
            if date_to is not None and m.creation_time > date_to:
                continue
            if phone_digits is not None:
                numbers = [digits_of(r.phone) for r in m.recipients]
                numbers.append(digits_of(str(m.from_party.get("phoneNumber", ""))))
                if phone_digits not in numbers:
                    continue
            out.append(m)
        out.sort(key=lambda m: (m.creation_time, m.id), reverse=True)
        return out

    # -- message-sync ----------------------------------------------------------------------
    def full_sync(
        self,
        extension_id: str,
        types: tuple[str, ...],
        directions: tuple[str, ...],
        date_from: datetime,
        date_to: datetime,
        record_count: int | None,
    ) -> tuple[list[Message], str, bool]:
        found = self.select(
            extension_id, types=types, directions=directions, date_from=date_from, date_to=date_to
        )
        older = False
        if record_count is not None and len(found) > record_count:
            found = found[:record_count]
            older = True
        token = self._new_sync_token(SyncFrame(extension_id, types, directions, date_from, self.revision))
        return found, token, older

    def incremental_sync(
        self, extension_id: str, token: str, date_from: datetime | None
    ) -> tuple[list[Message], str]:
        frame = self._sync_tokens.get(token)
        if frame is None or frame.extension_id != extension_id:
            raise sync_token_refused(self._refused_tokens.get(token, "MSG-333"))
        # The token carries the frame. A dateFrom on an ISync redefines it (the message-sync guide,
        # "ISync Request": dateFrom/dateTo "modify the time range of SyncFrame"): a later start
        # shrinks it, so changes to older messages are no longer reported; an earlier start widens
        # it, and the messages of the added range come back in full, like an FSync of that range.
        start = date_from if date_from is not None else frame.date_from
        changed = [
            m
            for m in self.select(
                extension_id,
                types=frame.types,
                directions=frame.directions,
                availabilities=(),
                date_from=start,
            )
            if m.revision > frame.revision
            or (m.creation_time < frame.date_from and m.availability == "Alive")
        ]
        new_frame = SyncFrame(extension_id, frame.types, frame.directions, start, self.revision)
        return changed, self._new_sync_token(new_frame)

    def _new_sync_token(self, frame: SyncFrame) -> str:
        token = new_token("")
        self._sync_tokens[token] = frame
        return token

    def stale_sync_tokens(self, code: str = "MSG-333") -> int:
        """Fault: every sync token issued so far is refused from now on with 400 ``code``."""
        if code not in SYNC_TOKEN_ERRORS:
            raise ValueError(f"code must be one of {sorted(SYNC_TOKEN_ERRORS)}")
        count = len(self._sync_tokens)
        self._refused_tokens.update(dict.fromkeys(self._sync_tokens, code))
        self._sync_tokens.clear()
        return count


#: How RingCentral refuses an ISync token: MSG-333 (errors doc: full synchronization is required) and
#: CMN-101 (what ringcentral-js-widgets' MessageStore and its "Check message syncToken invalid" test
#: handle as the same condition).
SYNC_TOKEN_ERRORS = {
    "MSG-333": "Invalid message synchronisation request: full synchronization is required",
    "CMN-101": "Parameter [syncToken] value is invalid",
}


def sync_token_refused(code: str) -> ApiError:
    """The 400 an ISync gets for a token the server no longer accepts."""
    parameter = "syncToken" if code == "CMN-101" else None
    return ApiError(400, api_error(code, SYNC_TOKEN_ERRORS[code], parameter))
