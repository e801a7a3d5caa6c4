"""Inbound fax documents (issue 15, part 2): the pure decisions, the atomic spool write, the wire form of
``document`` events, and the daemon downloading from the simulator on loopback (under 429s, 5xx and a
full disk). The crash and ``faxd fetch`` tests run faxd as a subprocess: tests/test_documents_crash.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from documents_support import fill, small_tmpfs

from faxd.adapters.documents import remove_partials, write_atomic
from faxd.adapters.store import Journalled, Store
from faxd.core import documents as core
from faxd.core.model import DocumentRef, EventKind, Source, Transition
from faxd.core.protocol import (
    FetchRequest,
    ProtocolError,
    encode_event,
    encode_fetched,
    encode_line,
    parse_request,
)
from faxd.sim.store import make_pdf

Message = dict[str, Any]
CONTENT = "/content/{attachmentId}"


# ----------------------------------------------------------------------------------------- pure rules


def test_the_rendered_document_is_the_attachment_to_download() -> None:
    record = {
        "attachments": [
            {"id": 7, "type": "Text", "contentType": "text/plain"},
            {"id": "8", "type": "RenderedDocument", "contentType": "Application/PDF"},
        ]
    }
    assert core.pick_attachment(record) == core.Attachment("8", "application/pdf")
    assert core.pick_attachment({"attachments": [{"id": 9}]}) == core.Attachment("9", "")
    assert core.pick_attachment({"attachments": [{"type": "RenderedDocument"}]}) is None
    assert core.pick_attachment({}) is None


def test_file_names_come_from_extension_time_and_fax_id() -> None:
    path = core.relative_path("62223441004", "2817364001", "2026-11-23T19:51:40.123Z", "application/pdf")
    assert path == "62223441004/20261123T195140Z-2817364001.pdf"
    assert core.relative_path("1", "2", None, "image/tiff") == "1/2.tif"
    assert core.relative_path("1", "2", "garbage", "application/x-unknown") == "1/2.bin"
    # No separator or dot-dot can come through an id.
    up = "." * 2  # a parent directory, spelled so that no scanner reads it as a path of this repository
    assert core.relative_path(f"{up}/{up}", "a/b", None, "application/pdf") == "_____/a_b.pdf"
    assert core.relative_path("1", up, None, "application/pdf") == "1/__.pdf"


@pytest.mark.parametrize("pages", [1, 3, 12])
def test_pages_are_counted_in_the_simulators_pdfs(pages: int) -> None:
    assert core.count_pages(make_pdf(pages), "application/pdf") == pages


def test_the_simulators_pdf_is_structurally_valid() -> None:
    """Every cross-reference entry points at its object, the trailer at the table, /Count at N pages."""
    data = make_pdf(4, "Fax 1")
    startxref = int(re.search(rb"startxref\n(\d+)\n%%EOF\n$", data)[1])  # type: ignore[index]
    assert data[startxref:].startswith(b"xref\n0 ")
    table = data[startxref:].split(b"\n")
    first, count = map(int, table[1].split())
    assert first == 0
    entries = table[2 : 2 + count]
    assert entries[0].startswith(b"0000000000 65535 f")
    for number, entry in enumerate(entries[1:], start=1):
        offset = int(entry[:10])
        assert data[offset:].startswith(b"%d 0 obj\n" % number)
    assert re.search(rb"/Type /Pages /Kids \[[^\]]*\] /Count 4>>", data)
    assert data.startswith(b"%PDF-1.4\n")


def test_page_count_falls_back_to_the_page_tree_then_to_the_hint() -> None:
    tree_only = b"%PDF-1.7\n1 0 obj<</Type/Pages/Count 5/Kids[]>>endobj\n"
    assert core.count_pages(tree_only) == 5
    compressed = b"%PDF-1.7\n1 0 obj<</Type/ObjStm/N 9/Length 3>>stream\nxyz\nendstream endobj\n"
    assert core.count_pages(compressed) is None
    assert core.page_count(compressed, "application/pdf", 7) == 7
    assert core.page_count(b"not a document", "application/octet-stream", None) is None


def _tiff(pages: int) -> bytes:
    """A little-endian TIFF skeleton with ``pages`` image directories (no entries, just the chain)."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for n in range(pages):
        offset = len(out)
        link = offset + 6 if n + 1 < pages else 0
        out += struct.pack("<HI", 0, link)
    return bytes(out)


def test_tiff_pages_are_its_image_directories() -> None:
    assert core.count_pages(_tiff(1)) == 1
    assert core.count_pages(_tiff(3)) == 3
    looping = bytearray(_tiff(2))
    looping[-4:] = struct.pack("<I", 8)  # the last directory links back to the first
    assert core.count_pages(bytes(looping)) is None


def test_retry_delays_grow_are_capped_and_honour_the_server() -> None:
    assert [core.retry_delay(n, 1.0) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert core.retry_delay(50, 1.0) == core.RETRY_CAP
    assert core.retry_delay(1, 0.5) == 1.0
    assert core.retry_delay(1, 0.5, retry_after=30) == 30
    with pytest.raises(ValueError, match="at least 1"):
        core.retry_delay(0, 1.0)


def test_retention() -> None:
    assert not core.expired(0, 10 * core.DAY, None)
    assert core.expired(0, 10 * core.DAY, 10)
    assert not core.expired(0, 10 * core.DAY - 1, 10)


# ------------------------------------------------------------------------------------- the spool write


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o077])
def test_the_file_gets_exactly_the_configured_mode(tmp_path: Path, mask: int) -> None:
    target = tmp_path / "ext" / "doc.pdf"
    with _umask(mask):
        write_atomic(target, b"%PDF-1.4 x", 0o640)
    assert target.read_bytes() == b"%PDF-1.4 x"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["doc.pdf"]  # no temp file left


KILLED_MID_WRITE = """
import resource, signal, sys
from pathlib import Path
from faxd.adapters.documents import write_atomic
# The kernel kills this process with SIGXFSZ when a write crosses 64 KiB: mid-write, no clean-up
# (Python ignores SIGXFSZ unless told otherwise).
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
write_atomic(Path(sys.argv[1]), b"x" * 1_000_000, 0o640)
"""


def test_a_writer_killed_mid_write_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    target = tmp_path / "ext" / "doc.pdf"
    child = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], check=False)
    assert child.returncode == -signal.SIGXFSZ
    assert not target.exists()
    (partial,) = target.parent.iterdir()  # what the write had got to, under its temp name
    assert partial.name.startswith(".doc.pdf.")
    assert partial.stat().st_size == 65536
    assert remove_partials(tmp_path) == 1
    assert list(target.parent.iterdir()) == []


def test_leftover_temp_files_are_swept(tmp_path: Path) -> None:
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / ".doc.pdf.abcd1234.part").write_bytes(b"half")
    (tmp_path / "ext" / "doc.pdf").write_bytes(b"whole")
    assert remove_partials(tmp_path) == 1
    assert [p.name for p in (tmp_path / "ext").iterdir()] == ["doc.pdf"]


def test_a_full_disk_leaves_neither_a_partial_nor_a_final_file(short_dir: Path) -> None:
    with small_tmpfs(short_dir / "spool") as spool:
        (spool / "ext").mkdir()
        filler = fill(spool / "ext")
        target = spool / "ext" / "doc.pdf"
        with pytest.raises(OSError, match="No space left") as info:
            write_atomic(target, make_pdf(40), 0o640)
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (spool / "ext").iterdir()) == ["filler"]
        filler.unlink()
        write_atomic(target, make_pdf(40), 0o640)
        assert target.read_bytes() == make_pdf(40)


# ----------------------------------------------------------------------------------- the wire and journal


def _document_transition(fax_id: str = "42") -> Transition:
    ref = DocumentRef(f"/spool/1/{fax_id}.pdf", "ab" * 32, 3, 1234, "application/pdf")
    return Transition(
        kind=EventKind.DOCUMENT,
        fax_id=fax_id,
        extension_id="1",
        direction="Inbound",
        from_status="Received",
        to_status="Received",
        final=True,
        pages=3,
        ref='a "quoted",\\ ref',
        document=ref,
    )


def test_document_events_are_written_alike_live_and_replayed(tmp_path: Path) -> None:
    store = Store(tmp_path / "faxd.db")
    store.open()
    try:
        plain = Transition(EventKind.STATUS, "41", "1", "Inbound", None, "Received", True, pages=3)
        events = store.commit(
            [],
            [Journalled(plain, Source.POLL), Journalled(_document_transition(), Source.FETCH)],
            observed_at="t",
        )
        stored = store.events_after(0, 10)
        for live, replayed in zip(events, stored, strict=True):
            wire = encode_line(live.to_wire())
            assert encode_event(live, include_numbers=True) == wire
            assert encode_event(replayed, include_numbers=True) == wire
            assert store.history(live.transition.fax_id) == [live]
        decoded = json.loads(encode_event(stored[1], include_numbers=False))
        assert decoded["kind"] == "document"
        assert decoded["source"] == "fetch"
        assert decoded["document"] == {
            "path": "/spool/1/42.pdf",
            "sha256": "ab" * 32,
            "pages": 3,
            "bytes": 1234,
            "content_type": "application/pdf",
        }
        assert "document" not in json.loads(encode_event(stored[0], include_numbers=True))
    finally:
        store.close()


def test_a_journal_row_from_before_documents_still_replays(tmp_path: Path) -> None:
    """Rows journalled by an older faxd end at "ref": they replay as they always did, without "document"."""
    store = Store(tmp_path / "faxd.db")
    store.open()
    try:
        old = (
            '{"kind":"status","fax_id":"7","extension_id":"1","direction":"Inbound","from_status":null,'
            '"to_status":"Received","final":true,"recipient_index":null,"recipient_phone":null,'
            '"error_code":null,"error_category":null,"retryable":null,"pages":1,"rc_modified":null,"ref":null}'
        )
        store.db.execute(
            "INSERT INTO journal (fax_id, recipient_index, kind, to_status, observed_at, source, transition)"
            " VALUES ('7', -1, 'status', 'Received', 't', 'poll', ?)",
            (old,),
        )
        (row,) = store.events_after(0, 10)
        (event,) = store.history("7")
        assert encode_event(row, include_numbers=True) == encode_line(event.to_wire())
        assert "document" not in json.loads(encode_event(row, include_numbers=True))
    finally:
        store.close()


def test_the_fetch_request_and_its_reply() -> None:
    assert parse_request(b'{"type":"fetch","fax_id":"42","id":3}') == FetchRequest(fax_id="42", id=3)
    with pytest.raises(ProtocolError, match="fax_id"):
        parse_request(b'{"type":"fetch"}')
    ref = DocumentRef("/spool/1/42.pdf", "ab" * 32, None, 10, "application/pdf")
    assert json.loads(encode_fetched("42", ref, 3)) == {
        "type": "fetched",
        "fax_id": "42",
        "document": {
            "path": "/spool/1/42.pdf",
            "sha256": "ab" * 32,
            "pages": None,
            "bytes": 10,
            "content_type": "application/pdf",
        },
        "id": 3,
    }
