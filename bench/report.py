"""A bench script's verdict: its targets checked against what it measured, printed and saved as JSON.

Each script in bench/ makes a :class:`Report`, adds one :meth:`Report.target` per stated goal (the targets
of docs/benchmarks.md and bench/README.md) with the value it measured, keeps the figures worth keeping
with :meth:`Report.figure`, and ends with :meth:`Report.finish`, which prints a PASS/MISS line per target,
writes ``bench/results/<script>.json`` (``<script>.<profile>.json`` for a quick or custom run) for
bench/summary.py, and returns the exit code: 0 when every target holds, 1 on any miss (a target that was
not measured at all is a miss).

This module must not measure anything, and never decides a verdict on anything but the numbers given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
_OPS = {
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
}


def machine() -> dict[str, str]:
    """What the figures were measured on: nproc, CPU, RAM, Python, faxd commit, date."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        ram = f"{kb / 1024 / 1024:.1f} GiB"
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "faxd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if dirty:
            commit += " (+ uncommitted changes to faxd/)"
    load = "unknown"
    with contextlib.suppress(OSError):
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "python": platform.python_version(),
        "faxd commit": commit,
        "load average": load,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def profile_of(parser: argparse.ArgumentParser, args: argparse.Namespace, ignore: Iterable[str] = ()) -> str:
    """``quick`` (``--quick``), ``default`` (every measuring option at its default) or ``custom``."""
    if getattr(args, "quick", False):
        return "quick"
    skip = {"quick", "results", *ignore}
    for action in parser._actions:
        if action.dest in skip or action.dest == "help":
            continue
        if getattr(args, action.dest, action.default) != action.default:
            return "custom"
    return "default"


def add_options(parser: argparse.ArgumentParser, quick: str) -> None:
    """``--quick`` (a reduced profile, described by ``quick``) and ``--results PATH``."""
    parser.add_argument(
        "--quick", action="store_true", help=f"a reduced profile to check the script: {quick}"
    )
    parser.add_argument(
        "--results",
        metavar="PATH",
        help="where to write the JSON results (default: bench/results/SCRIPT[.PROFILE].json; '-': nowhere)",
    )


def apply_quick(args: argparse.Namespace, **reduced: Any) -> None:
    """Under ``--quick``, set each option of ``reduced`` that was left at its default."""
    if getattr(args, "quick", False):
        for name, value in reduced.items():
            setattr(args, name, value)


@dataclass
class Target:
    """One stated goal and what was measured for it."""

    key: str  # stable id across runs, e.g. "fanout.throughput"
    issue: int  # the issue that states the target
    goal: str  # the target in words, e.g. "fan-out >= 50,000 deliveries/s"
    op: str  # how measured compares with bound: "<=", "<", ">=", "=="
    bound: float
    measured: float | None  # None: not measured, which is a miss
    shown: str  # the measured value as a reader should see it, with its unit
    passed: bool = False

    def __post_init__(self) -> None:
        value = self.measured
        self.passed = value is not None and not math.isnan(value) and _OPS[self.op](value, self.bound)


@dataclass
class Report:
    script: str
    profile: str
    args: dict[str, Any]
    targets: list[Target] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(
        cls,
        script: str,
        parser: argparse.ArgumentParser,
        args: argparse.Namespace,
        ignore: Iterable[str] = (),
    ) -> Report:
        kept = {k: v for k, v in vars(args).items() if k not in ("results",)}
        return cls(script, profile_of(parser, args, ignore), kept)

    def target(
        self,
        key: str,
        issue: int,
        goal: str,
        measured: float | None,
        op: str,
        bound: float,
        shown: str | None = None,
    ) -> bool:
        """Check ``measured op bound``; ``shown`` is how the measured value reads (default: the number)."""
        text = shown if shown is not None else ("not measured" if measured is None else f"{measured:g}")
        t = Target(f"{self.script}.{key}", issue, goal, op, bound, measured, text)
        self.targets.append(t)
        return t.passed

    def figure(self, name: str, value: Any) -> None:
        self.figures[name] = value

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def passed(self) -> bool:
        return bool(self.targets) and all(t.passed for t in self.targets)

    def path(self, given: str | None) -> Path | None:
        if given == "-":
            return None
        if given:
            return Path(given)
        suffix = "" if self.profile == "default" else f".{self.profile}"
        return RESULTS / f"{self.script}{suffix}.json"

    def finish(self, results: str | None = None) -> int:
        """Print the verdict, write the JSON results, return the exit code (0 pass, 1 miss)."""
        print()
        print(f"targets ({self.profile} profile):")
        for t in self.targets:
            print(f"  {'PASS' if t.passed else 'MISS'}  {t.goal}: {t.shown}")
        if not self.targets:
            print("  MISS  nothing was measured")
        for n in self.notes:
            print(f"  note: {n}")
        verdict = "pass" if self.passed else "miss"
        print(f"RESULT {verdict.upper()}")
        path = self.path(results)
        if path is not None:
            data = {
                "script": self.script,
                "command": " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
                "profile": self.profile,
                "args": self.args,
                "machine": machine(),
                "took_s": round(time.monotonic() - self.started, 1),
                "verdict": verdict,
                "targets": [asdict(t) for t in self.targets],
                "figures": self.figures,
                "notes": self.notes,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
            print(f"results written to {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        return 0 if self.passed else 1


def _clean(value: Any) -> Any:
    """JSON without NaN or infinities (null instead), paths as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
