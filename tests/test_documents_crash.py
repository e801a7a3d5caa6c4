"""Inbound fax documents across a SIGKILL of a real ``faxd run``, and ``faxd fetch ID`` as a user runs it.

The simulator holds the document download (``delay-requests`` matching ``/content/``) so that faxd is
killed while it waits for the bytes: nothing may then be visible under the final name (nor a temp
file), and the restarted faxd must finish the download from its durable queue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from daemon_support import started
from ops_support import daemon, run_faxd, shell_env, until, write_config
from socket_client import SocketClient

from faxd.adapters.store import Store
from faxd.config import Config
from faxd.sim import Simulator

DOCUMENTS = {"enabled": True, "spool_dir": "spool"}


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def remove(path: str | Path) -> None:
    Path(path).unlink()


def files_in(spool: Path) -> list[str]:
    return sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file())


def document_events(store_path: Path, fax_id: str) -> list[dict[str, object]]:
    store = Store(store_path)
    store.open()
    try:
        return [e.to_wire() for e in store.history(fax_id) if e.transition.kind.value == "document"]
    finally:
        store.close()


async def test_sigkill_mid_download_shows_no_partial_file_and_the_restart_finishes_it(
    sim: Simulator, short_dir: Path
) -> None:
    config = write_config(short_dir, sim, documents=DOCUMENTS)
    spool = short_dir / "spool"
    sim.delay_next_requests(1, 30, match="/content/")
    async with daemon(config) as faxd:
        await faxd.wait_event("daemon.started")
        fax_id = sim.create_inbound_fax(None, "+15551239000", pages=5)
        # The download has reached the simulator, which holds it: kill faxd mid-download.
        await until(lambda: sim.rest.faults.delay_next == 0)
        faxd.proc.kill()
        await faxd.wait()
    assert files_in(spool) == []  # neither the document nor a temp file
    assert document_events(short_dir / "faxd.db", fax_id) == []

    async with daemon(config) as faxd:
        downloaded = await faxd.wait_line(
            lambda line: line.get("event") == "documents.downloaded" and line.get("fax_id") == fax_id
        )
        assert await faxd.stop() == 0
    data = sim.store.messages[int(fax_id)].attachments[0].data
    path = Path(str(downloaded["path"]))
    assert read(path) == data
    assert files_in(spool) == [str(path.relative_to(spool))]
    (event,) = document_events(short_dir / "faxd.db", fax_id)
    assert event["document"] == {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "pages": 5,
        "bytes": len(data),
        "content_type": "application/pdf",
    }


async def fetch(socket: str, *args: str) -> tuple[int, str, str]:
    return await run_faxd("fetch", *args, "--socket", socket, env=shell_env())


async def test_faxd_fetch_downloads_again_and_fetches_faxes_from_before_documents_were_enabled(
    sim: Simulator, make_config: Callable[..., Config], short_dir: Path
) -> None:
    # Received while documents were off: not downloaded when they are turned on (the cursor starts
    # at the journal's head), but `faxd fetch` gets it.
    async with started(make_config(sim)) as faxd:
        client = await SocketClient.subscribed(faxd.socket)
        try:
            old = sim.create_inbound_fax(None, "+15551239001", pages=2)
            await client.until(lambda m: m.get("type") == "event" and m["fax_id"] == old)
            code, _, err = await fetch(faxd.socket, old)
            assert code == 1
            assert "documents.enabled is false" in err
        finally:
            await client.close()

    async with started(make_config(sim, documents=DOCUMENTS)) as faxd:
        code, out, err = await fetch(faxd.socket, old, "--json")
        assert code == 0, err
        document = json.loads(out)
        data = sim.store.messages[int(old)].attachments[0].data
        assert read(document["path"]) == data
        assert document["sha256"] == hashlib.sha256(data).hexdigest()
        assert document["pages"] == 2

        # Again, after the file was lost: the same name, the same bytes; no second document event.
        remove(document["path"])
        code, out, err = await fetch(faxd.socket, old)
        assert code == 0, err
        assert out.split()[0] == document["path"]
        assert f"sha256 {document['sha256']}" in out
        assert read(document["path"]) == data
        assert faxd.registry.get_sample_value("faxd_documents_downloaded_total") == 2

        code, _, err = await fetch(faxd.socket, "999999")
        assert code == 1
        assert "no received fax 999999" in err
    assert len(document_events(short_dir / "faxd.db", old)) == 1


async def test_a_malformed_documents_section_stops_faxd_with_78_naming_the_key(
    sim: Simulator, short_dir: Path
) -> None:
    config = write_config(short_dir, sim, documents={"enabled": True, "mode": "0666", "retention_days": -1})
    code, out, _ = await run_faxd("run", "-c", str(config), merge_stderr=True, env=shell_env())
    assert code == 78
    assert (
        'documents.mode: a document must not be executable or writable by group or others, got "0666"' in out
    )
    assert "documents.retention_days: must be >= 1, got -1" in out


async def test_a_spool_dir_faxd_cannot_create_stops_it_with_78(sim: Simulator, short_dir: Path) -> None:
    (short_dir / "a-file").write_text("not a directory\n")
    config = write_config(short_dir, sim, documents={"enabled": True, "spool_dir": "a-file/spool"})
    code, out, _ = await run_faxd("run", "-c", str(config), merge_stderr=True, env=shell_env())
    assert code == 78
    assert f"documents.spool_dir: {short_dir}/a-file/spool: Not a directory" in out
