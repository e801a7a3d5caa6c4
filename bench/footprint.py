"""Footprint: RSS idle, RSS with a big store, and the time from process start to READY=1, warm and cold.

    .venv/bin/python bench/footprint.py                          # 100,000 faxes, 300,000 journal rows
    .venv/bin/python bench/footprint.py --quick                  # 20,000 faxes, 60,000 rows, 1 run each

faxd runs as a real subprocess (``python -m faxd run``) against the simulator (in this process), with
``$NOTIFY_SOCKET`` pointing at a datagram socket bound here: start-up time is spawn → the ``READY=1``
datagram; "socket accepting" is spawn -> the event socket's first ``hello`` (it is bound just before READY).
RSS is read from ``/proc/PID/status`` (VmRSS; VmHWM is the peak) once the WebSocket is up and start-up
work has settled (a few seconds), as the median of several samples.

Rows, each the median of RUNS starts:
* baseline: ``python -c "import faxd.daemon"`` — the interpreter and faxd's imports, nothing running;
* idle: faxd with an empty store;
* loaded: faxd with a store of FAXES final faxes and JOURNAL journal rows, written with the real
  ``Store.commit`` in batches (bench/common.py ``build_store``); the copy it starts on was just written,
  so it is in the page cache (a service restart);
* loaded, cold: the same, with the store's file dropped from the page cache first (written back, then
  ``posix_fadvise(DONTNEED)``), as after a reboot. Python and faxd's own files stay cached.
Then where the loaded start-up goes, timed in this process on the same file: ``Store.open`` (which runs
``PRAGMA quick_check``), ``load_faxes()`` (every fax, what ``Reconciler.__init__`` does),
``load_faxes(in_flight_only=True)`` and ``unsettled_sent()``, with the Python heap they allocate.
Targets (issue 8): RSS idle <= 60 MB, loaded <= 120 MB (10^6 bytes); start -> READY=1 <= 1 s idle,
loaded and loaded cold. Exit 0 when all hold, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    Daemon,
    build_store,
    cleanup,
    print_machine,
    sim_config,
    table,
    workdir,
    write_config,
)
from report import Report, add_options, apply_quick

from faxd.adapters.store import Store
from faxd.sim import Simulator

MB = 1_000_000 / 1024 / 1024  # the targets are in MB; /proc reports KiB: 1 MB = 0.954 MiB


def baseline(runs: int) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of ``python -c "import faxd.daemon"``: medians of ``runs``."""
    times, peaks = [], []
    for _ in range(runs):
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", "import faxd.daemon"])
        _, _, usage = os.wait4(proc.pid, 0)
        times.append(time.monotonic() - started)
        peaks.append(usage.ru_maxrss / 1024)
    return statistics.median(times), statistics.median(peaks)


def drop_from_page_cache(path: Path) -> None:
    """Write ``path`` back to disk, then ask the kernel to forget its cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


Start = tuple[float, float, float, float]  # READY s, settled RSS MiB, peak RSS MiB, socket accepting s


async def one_start(sim: Simulator, db: Path | None, settle: float, cold: bool = False) -> Start:
    """One daemon start on a copy of ``db`` (None: an empty store)."""
    work = workdir("footprint")
    try:
        if db is not None:
            shutil.copy(db, work / "faxd.db")
            if cold:
                drop_from_page_cache(work / "faxd.db")
        daemon = Daemon(write_config(work, sim, ["~"]))
        ready = await daemon.start()
        accepting = daemon.accepting if daemon.accepting is not None else float("nan")
        await daemon.wait_ws_up()
        await asyncio.sleep(settle)
        samples = []
        for _ in range(5):
            samples.append(daemon.rss_mb()[0])
            await asyncio.sleep(0.3)
        peak = daemon.rss_mb()[1]
        await daemon.stop()
        return ready, statistics.median(samples), peak, accepting
    finally:
        cleanup(work, keep=False)


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, MiB of Python heap the result holds, result): timed without tracing, then run again
    under tracemalloc to weigh what it returns."""
    started = time.perf_counter()
    result = fn()
    took = time.perf_counter() - started
    del result
    tracemalloc.start()
    result = fn()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return took, held / 1024 / 1024, result


def breakdown(db: Path) -> list[tuple[str, float, float, str]]:
    store = Store(db)
    rows: list[tuple[str, float, float, str]] = []
    started = time.perf_counter()
    store.open()
    took = time.perf_counter() - started
    rows.append(("Store.open (with PRAGMA quick_check)", took, float("nan"), ""))
    took, _, result = timed(lambda: store.db.execute("PRAGMA quick_check").fetchone())
    rows.append(("  of which PRAGMA quick_check", took, float("nan"), str(result[0])))
    drop_from_page_cache(db)
    started = time.perf_counter()
    result = store.db.execute("PRAGMA quick_check").fetchone()
    took = time.perf_counter() - started
    rows.append(("  PRAGMA quick_check, file not in the page cache", took, float("nan"), str(result[0])))
    took, heap, faxes = timed(store.load_faxes)
    rows.append(("load_faxes() (all; Reconciler.__init__)", took, heap, f"{len(faxes)} faxes"))
    del faxes
    took, heap, faxes = timed(lambda: store.load_faxes(in_flight_only=True))
    rows.append(("load_faxes(in_flight_only=True)", took, heap, f"{len(faxes)} faxes"))
    took, heap, unsettled = timed(store.unsettled_sent)
    rows.append(("unsettled_sent()", took, heap, f"{len(unsettled)} rows"))
    took, _, _ = timed(lambda: (store.head_seq(), store.oldest_seq()))
    rows.append(("head_seq() + oldest_seq()", took, float("nan"), ""))
    store.close()
    return rows


async def bench(args: argparse.Namespace, report: Report) -> int:
    work = workdir("footprint-store")
    db = work / "big.db"
    print(f"building a store of {args.faxes} faxes and {args.journal} journal rows ...", flush=True)
    built = build_store(db, args.faxes, args.journal)
    size = db.stat().st_size / 1024 / 1024
    base_time, base_rss = baseline(args.runs)
    idle: list[Start] = []
    loaded: list[Start] = []
    cold: list[Start] = []
    async with Simulator(sim_config(seed=args.seed)) as sim:
        for _ in range(args.runs):
            idle.append(await one_start(sim, None, args.settle))
            loaded.append(await one_start(sim, db, args.settle))
            cold.append(await one_start(sim, db, args.settle, cold=True))
    parts = breakdown(db)
    cleanup(work, args.keep)

    def med(runs: list[Start], i: int) -> float:
        return statistics.median(r[i] for r in runs)

    print_machine()
    print(
        f"store: {args.faxes} final faxes, {args.journal} journal rows, {size:.0f} MiB on disk, built in"
        f" {built:.0f} s; medians of {args.runs} starts; RSS settled {args.settle:.0f} s after the WebSocket"
        " came up; faxd defaults (logging info/json)"
    )
    print()
    loaded_name = f"loaded ({args.faxes} faxes, {args.journal} rows)"
    rows = [
        ("baseline: python -c 'import faxd.daemon'", base_time, "n/a", "n/a", base_rss, 1.0, 1.0),
        ("idle (empty store)", med(idle, 0), med(idle, 3), med(idle, 1), med(idle, 2),
         med(idle, 0) / base_time, med(idle, 1) / base_rss),
        (loaded_name, med(loaded, 0), med(loaded, 3), med(loaded, 1), med(loaded, 2),
         med(loaded, 0) / base_time, med(loaded, 1) / base_rss),
        (loaded_name + ", cold", med(cold, 0), med(cold, 3), med(cold, 1), med(cold, 2),
         med(cold, 0) / base_time, med(cold, 1) / base_rss),
    ]  # fmt: skip
    headers = [
        "",
        "start->READY=1 (s)",
        "start->socket accepting (s)",
        "RSS (MiB)",
        "peak RSS (MiB)",
        "time / baseline",
        "RSS / baseline",
    ]
    print(table(headers, rows))
    print()
    print("where the loaded start-up goes (in this process, same file):")
    print(table(["step", "seconds", "Python heap held (MiB)", ""], parts))
    store_size = f"{args.faxes:,} faxes, {args.journal:,} rows"
    rss_idle, rss_loaded = med(idle, 1), med(loaded, 1)
    report.target("rss_idle", 8, "RSS idle <= 60 MB", rss_idle, "<=", 60 * MB, f"{rss_idle:.1f} MiB")
    report.target(
        "rss_loaded",
        8,
        "RSS loaded <= 120 MB",
        rss_loaded,
        "<=",
        120 * MB,
        f"{rss_loaded:.1f} MiB ({store_size})",
    )
    for key, name, runs in (
        ("ready_idle", "start -> READY=1 <= 1 s, empty store", idle),
        ("ready_loaded", "start -> READY=1 <= 1 s, loaded store in the page cache", loaded),
        ("ready_cold", "start -> READY=1 <= 1 s, loaded store not in the page cache (cold)", cold),
    ):
        extra = "" if runs is idle else f", {store_size}"
        shown = f"{med(runs, 0):.2f} s (socket accepting {med(runs, 3):.2f} s{extra})"
        report.target(key, 8, name, med(runs, 0), "<=", 1.0, shown)
    for name, runs in (("idle", idle), ("loaded", loaded), ("cold", cold)):
        report.figure(f"{name}_ready_s", med(runs, 0))
        report.figure(f"{name}_accepting_s", med(runs, 3))
        report.figure(f"{name}_rss_mib", med(runs, 1))
        report.figure(f"{name}_peak_rss_mib", med(runs, 2))
    report.figure("baseline_import_s", base_time)
    report.figure("baseline_rss_mib", base_rss)
    report.figure("store_mib", size)
    report.figure("startup_steps_s", {name: took for name, took, _, _ in parts})
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faxes", type=int, default=100_000)
    parser.add_argument("--journal", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3, help="daemon starts per row (medians)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after WS up before sampling RSS")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the built store")
    add_options(parser, "--faxes 20000 --journal 60000 --runs 1 --settle 1")
    args = parser.parse_args()
    apply_quick(args, faxes=20_000, journal=60_000, runs=1, settle=1.0)
    report = Report.start("footprint", parser, args, ignore=("keep",))
    started = time.monotonic()
    code = asyncio.run(bench(args, report))
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
