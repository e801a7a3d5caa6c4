"""Audit export of a big store: ``faxd export`` of every fax, with the daemon's and the client's memory.

    .venv/bin/python bench/export.py              # 100,000 faxes
    .venv/bin/python bench/export.py --quick      # 20,000 faxes

The store is built directly (bench/common.py ``build_store``: final outbound faxes, one recipient
each, created one second apart going back from now), faxd runs as a real subprocess on a copy of it
against the simulator (in this process), and ``faxd export`` runs as another subprocess, twice: CSV
with numbers redacted (the default) and NDJSON with ``--numbers``, each into a file. The export pages
through the socket's ``query`` request (500 faxes a page), so neither process should hold more than a
page of faxes at a time.

Measured: the export's wall time and faxes/s; the client's peak RSS (``ru_maxrss`` of the process);
the daemon's RSS before the exports and its peak (``VmHWM``) after them, which covers its start-up
as well. Every fax must be in each file, once, in creation order.
Targets (issue 15): every fax exported; daemon peak RSS and client peak RSS within the daemon's own
loaded target, 120 MB (issue 8, bench/footprint.py). Exit 0 when all hold, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import Daemon, build_store, cleanup, print_machine, sim_config, table, workdir, write_config
from report import Report, add_options, apply_quick

from faxd.sim import Simulator

MB = 1_000_000 / 1024 / 1024  # the targets are in MB; /proc and rusage report KiB: 1 MB = 0.954 MiB
TARGET_MB = 120  # the daemon's own loaded target (issue 8)


def run_export(socket_path: str, output: Path, *options: str) -> tuple[float, float, str]:
    """``faxd export --since 3d ... -o output``: (seconds, peak RSS MiB, stderr); raises on failure."""
    argv = [sys.executable, "-m", "faxd", "export", "--socket", socket_path, "--since", "3d"]
    started = time.monotonic()
    proc = subprocess.Popen([*argv, *options, "-o", str(output)], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"faxd export exited {proc.returncode}: {err}")
    return took, usage.ru_maxrss / 1024, err.strip()


def check_csv(path: Path) -> tuple[int, bool, bool]:
    """(rows, fax ids in creation order and unique, every number redacted)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r["fax_id"] for r in rows]
    # build_store: fax 900000000000 + n was created n seconds before the build, so newest = smallest n.
    ordered = ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    return len(rows), ordered, all(r["recipient_phone"] == "" for r in rows)


def check_ndjson(path: Path) -> tuple[int, bool, bool]:
    """(faxes, fax ids in creation order and unique, every number present)."""
    ids: list[str] = []
    numbers = True
    with path.open() as f:
        for line in f:
            fax: dict[str, Any] = json.loads(line)
            ids.append(fax["fax_id"])
            numbers = numbers and all(r["phone"] for r in fax["recipients"])
    ordered = ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    return len(ids), ordered, numbers


async def bench(args: argparse.Namespace, report: Report) -> int:
    work = workdir("export")
    try:
        db = work / "faxd.db"
        print(f"building a store of {args.faxes} faxes ...", flush=True)
        built = build_store(db, args.faxes, args.faxes)
        size = db.stat().st_size / 1024 / 1024
        async with Simulator(sim_config(seed=args.seed)) as sim:
            daemon = Daemon(write_config(work, sim, ["~"]))
            await daemon.start()
            try:
                await daemon.wait_ws_up()
                rss_before, _ = daemon.rss_mb()
                exports = []
                for fmt, options in (("csv", ()), ("ndjson", ("--numbers",))):
                    out = work / f"audit.{fmt}"
                    took, client_peak, summary = await asyncio.to_thread(
                        run_export, daemon.socket_path, out, "--format", fmt, *options
                    )
                    exports.append((fmt, took, client_peak, summary, out))
                rss_after, daemon_peak = daemon.rss_mb()
            finally:
                await daemon.stop()
        # Checked only now: a child's ru_maxrss counts what it shared with this process before its
        # exec, so a big parsed file in this process would be charged to the next export.
        runs = [
            (
                fmt,
                took,
                peak,
                summary,
                (check_csv if fmt == "csv" else check_ndjson)(out),
                out.stat().st_size / 2**20,
            )
            for fmt, took, peak, summary, out in exports
        ]
    finally:
        cleanup(work, args.keep)

    print_machine()
    print(f"store: {args.faxes:,} faxes, {size:.0f} MiB on disk, built in {built:.0f} s")
    print(f"daemon RSS: {rss_before:.1f} MiB before the exports, {rss_after:.1f} MiB after", end="")
    print(f", peak {daemon_peak:.1f}")
    print()
    rows = [
        (fmt, f"{took:.1f}", f"{args.faxes / took:,.0f}", f"{peak:.1f}", f"{mib:.1f}", n, ordered, redaction)
        for fmt, took, peak, _, (n, ordered, redaction), mib in runs
    ]
    headers = [
        "format",
        "seconds",
        "faxes/s",
        "client peak RSS (MiB)",
        "file (MiB)",
        "records",
        "in order",
        "numbers as asked",
    ]
    print(table(headers, rows))
    for fmt, *_, summary, _, _ in runs:
        print(f"  {fmt}: {summary}")

    complete = all(
        n == args.faxes and ordered and redaction for _, _, _, _, (n, ordered, redaction), _ in runs
    )
    exported = min(n for *_, (n, _, _), _ in runs)
    shown = f"{exported:,} of {args.faxes:,} faxes"
    if not complete:
        shown += " (incomplete, out of order or numbers wrong)"
    report.target(
        "complete",
        15,
        "export: every fax, once, in order, numbers as asked",
        float(complete),
        "==",
        1.0,
        shown,
    )
    report.target(
        "daemon_rss", 15, f"export: daemon peak RSS <= {TARGET_MB} MB", daemon_peak, "<=", TARGET_MB * MB,
        f"{daemon_peak:.1f} MiB ({args.faxes:,} faxes exported twice)",
    )  # fmt: skip
    client_peak = max(peak for _, _, peak, *_ in runs)
    report.target(
        "client_rss", 15, f"export: client peak RSS <= {TARGET_MB} MB", client_peak, "<=", TARGET_MB * MB,
        f"{client_peak:.1f} MiB",
    )  # fmt: skip
    for fmt, took, peak, _, _, mib in runs:
        report.figure(f"{fmt}_s", took)
        report.figure(f"{fmt}_faxes_per_s", args.faxes / took)
        report.figure(f"{fmt}_client_peak_rss_mib", peak)
        report.figure(f"{fmt}_file_mib", mib)
    report.figure("daemon_rss_before_mib", rss_before)
    report.figure("daemon_rss_after_mib", rss_after)
    report.figure("daemon_peak_rss_mib", daemon_peak)
    report.figure("store_mib", size)
    return report.finish(args.results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faxes", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (store and exports)")
    add_options(parser, "--faxes 20000")
    args = parser.parse_args()
    apply_quick(args, faxes=20_000)
    report = Report.start("export", parser, args, ignore=("keep",))
    started = time.monotonic()
    code = asyncio.run(bench(args, report))
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
