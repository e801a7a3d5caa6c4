"""Decisions about received fax documents, as pure values (issue 15, part 2).

Which attachment of a message record is the fax's document, the file name it gets in the spool
(``<extension>/<UTC creation time>-<fax id>.<suffix>``), how many pages it has (counted in the PDF
or TIFF itself, else RingCentral's ``faxPageCount``), how long to wait before the next try of a
failed download, and when a file is past its retention.

This module must not do I/O, read clocks or draw from global randomness: times and random numbers
come in as arguments. The adapter (:mod:`faxd.adapters.documents`) does the downloading and writing.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from faxd.core.status import parse_time

#: File name suffix per content type; anything else is kept as ``.bin``.
SUFFIXES: Final[Mapping[str, str]] = {
    "application/pdf": "pdf",
    "image/tiff": "tif",
    "image/tif": "tif",
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "text/plain": "txt",
}
#: Seconds of the first retry after a failure, doubled per attempt up to :data:`RETRY_CAP`.
RETRY_BASE: Final = 2.0
RETRY_CAP: Final = 600.0
DAY: Final = 86400.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class Attachment:
    """The attachment of a message record that holds the fax's document."""

    id: str
    content_type: str


def pick_attachment(record: Mapping[str, Any]) -> Attachment | None:
    """The fax's document among ``record["attachments"]``: the first ``RenderedDocument`` (what
    RingCentral calls a fax's rendered pages), else the first attachment with an id; None without one."""
    attachments = record.get("attachments")
    if not isinstance(attachments, list):
        return None
    usable = [a for a in attachments if isinstance(a, dict) and a.get("id") not in (None, "")]
    rendered = [a for a in usable if str(a.get("type", "")).lower() == "rendereddocument"]
    candidates = rendered or usable
    if not candidates:
        return None
    chosen = candidates[0]
    content_type = chosen.get("contentType")
    return Attachment(
        str(chosen["id"]),
        content_type.strip().lower() if isinstance(content_type, str) and content_type.strip() else "",
    )


def safe_part(value: str) -> str:
    """``value`` usable as one path component: characters other than letters, digits, ``_`` and ``-``
    become ``_`` (RingCentral's ids are digits; a path separator must never get through)."""
    cleaned = _UNSAFE.sub("_", value)[:64]
    return cleaned or "_"


def suffix_for(content_type: str) -> str:
    return SUFFIXES.get(content_type.split(";", 1)[0].strip().lower(), "bin")


def relative_path(extension_id: str, fax_id: str, created: str | None, content_type: str) -> str:
    """Where a fax's document goes under the spool directory: one subdirectory per extension, the
    name from the fax's creation time (UTC, sortable) and its id, as in
    ``62223441004/20261123T195140Z-2817364001.pdf``. Without a readable creation time: the id alone."""
    moment = parse_time(created)
    stamp = datetime.fromtimestamp(moment, UTC).strftime("%Y%m%dT%H%M%SZ-") if moment is not None else ""
    return f"{safe_part(extension_id)}/{stamp}{safe_part(fax_id)}.{suffix_for(content_type)}"


# ------------------------------------------------------------------------------------------ page counts

_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z0-9#])")
_PDF_PAGES_COUNT = re.compile(
    rb"/Type\s*/Pages(?![A-Za-z0-9#])[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages"
)
_TIFF_MAX_PAGES: Final = 10000


def count_pages(data: bytes, content_type: str = "") -> int | None:
    """Pages in a PDF (its ``/Type /Page`` objects; failing that, the page tree's largest ``/Count``)
    or a TIFF (its image directories); None when the file does not tell (a PDF whose page objects are
    compressed in object streams, another format)."""
    if data.startswith(b"%PDF"):
        pages = len(_PDF_PAGE.findall(data))
        if pages:
            return pages
        counts = [int(a or b) for a, b in _PDF_PAGES_COUNT.findall(data)]
        return max(counts) if counts and max(counts) > 0 else None
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_pages(data)
    return None


def _tiff_pages(data: bytes) -> int | None:
    """The number of image file directories in a TIFF; None if the chain is broken or loops."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack_from(order + "I", data, 4)
    seen: set[int] = set()
    while offset:
        if offset in seen or offset + 2 > len(data) or len(seen) >= _TIFF_MAX_PAGES:
            return None
        seen.add(offset)
        (entries,) = struct.unpack_from(order + "H", data, offset)
        link = offset + 2 + 12 * entries
        if link + 4 > len(data):
            return None
        (offset,) = struct.unpack_from(order + "I", data, link)
    return len(seen) or None


def page_count(data: bytes, content_type: str, hint: int | None) -> int | None:
    """The pages of a downloaded document: counted in the file, else RingCentral's ``faxPageCount``."""
    return count_pages(data, content_type) or hint


# --------------------------------------------------------------------------------- retries, retention


def retry_delay(attempts: int, unit: float, *, retry_after: float | None = None) -> float:
    """Seconds before the next try after the ``attempts``-th failure in a row: ``RETRY_BASE`` doubled
    per attempt up to ``RETRY_CAP``, scaled by ``unit`` in [0.5, 1] (equal jitter: never almost at
    once, and a herd spreads), and never less than the server's ``retry_after``."""
    if attempts < 1:
        raise ValueError("attempts counts failures: at least 1")
    if not 0.5 <= unit <= 1.0:
        raise ValueError("unit must be in [0.5, 1]")
    ceiling = min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempts - 1, 30))
    return max(ceiling * unit, retry_after or 0.0)


def expired(done_at: float, now: float, retention_days: float | None) -> bool:
    """Whether a document downloaded at ``done_at`` (Unix time) is past ``retention_days`` at ``now``;
    None keeps documents forever."""
    return retention_days is not None and now - done_at >= retention_days * DAY
