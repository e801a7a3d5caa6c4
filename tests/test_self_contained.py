"""The repository is self-contained: no tracked file reads, links or names a path outside it.

A checkout must pass its tests and make sense to its readers with nothing beside it (issue 14).
This scans every text file git tracks (plus untracked files that are not ignored, so a new file is
checked before it is added) for:

- relative paths that climb out of the repository (``../`` too many times);
- absolute paths into the machine the repository was developed on (the ``/work`` tree), or into
  the directory that holds this checkout;
- code that walks up from ``__file__`` past the repository's root;
- the names of the reference folders and notes that lived beside the repository, any other
  ``*.md`` file that the repository does not have, and numbered sections (``<NAME> §2``) of documents it does
  not have.

Absolute paths of an installed system (``/etc/faxd``, ``/opt/faxd``, ``/run``) and URLs are fine.
Each finding names the file, the line and the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Upstream text we do not write (RingCentral's spec): not scanned.
THIRD_PARTY = frozenset({"tests/fidelity/data/rc-openapi-trimmed.yml"})
#: Directories that are never part of the repository, for the walk when git is not available.
NOT_SOURCE = frozenset(
    {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
    | {".import_linter_cache", "node_modules", "build", "dist"}
)

# The patterns are assembled from pieces so that this file does not match them itself.
_WORK = "/" + "work" + "/"
_CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+)([\w.-]*)(/?)")
_SIBLING_NOTES = re.compile(r"\bshared" + r"/(ringcentral|reference|hooks|DESIGN\.md)\b")
_WALK_UP = re.compile(r"__file__\)(?:\.resolve\(\))?((?:\.parent\b|\.parents\[\d+\])+)")
_REPO_PARENT = re.compile(r"\b(?:REPO|ROOT|REPO_ROOT)\.parent\b")
_SECTION_OF = re.compile(r"\b([A-Z][A-Z_-]{2,})(?:\.md)? §")
_MD = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w-]+\.md)\b")
#: Where faxd installs its guide on a server (faxd install-service), written with or without the leading
#: slash (a path under --root): a place on the target system, not a document of this repository.
_TARGET_SYSTEM = re.compile(r"^/?(usr|etc|opt|var|srv)/")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.text.strip()[:160]}"


def repo_files(root: Path) -> list[str]:
    """Tracked files and untracked, not ignored ones (repo-relative, POSIX); a walk without git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError):
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in NOT_SOURCE and not d.endswith(".egg-info")]
            found += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames]
        return sorted(found)
    names = {n for n in out.stdout.decode().split("\0") if n}
    return sorted(n for n in names if (root / n).is_file())


def _steps_up(chain: str) -> int:
    """How many directories ``.parent`` / ``.parents[i]`` climb from the file itself."""
    steps = 0
    for part in re.findall(r"\.parents\[(\d+)\]|\.parent\b", chain):
        steps += int(part) + 1 if part else 1
    return steps


def _escapes(base: PurePosixPath, relative: str) -> bool:
    """Whether ``base/relative`` (base repo-relative, '.' = root) leaves the repository."""
    depth = len(base.parts) if str(base) != "." else 0
    for part in relative.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def scan_text(
    rel: str, text: str, known: frozenset[str], outside: tuple[str, ...] = (), root: Path = REPO
) -> list[Finding]:
    """Every reference to a path outside the repository in ``text`` (the content of file ``rel``).

    ``known`` is the set of repository files (for the ``*.md`` check); ``outside`` extra absolute
    prefixes that lie outside the checkout (its parent directory).
    """
    here = PurePosixPath(rel).parent
    basenames = {PurePosixPath(k).name for k in known}
    findings: list[Finding] = []
    for number, line in enumerate(text.splitlines(), 1):

        def flag(reason: str, line: str = line, number: int = number) -> None:
            findings.append(Finding(rel, number, reason, line))

        if _WORK in line:
            flag("absolute path into the development machine's tree")
        for prefix in outside:
            if prefix in line:
                flag(f"absolute path into {prefix}, the directory that holds this checkout")
        for climb, name, slash in _CLIMB.findall(line):
            target = climb + name
            # Markdown links are relative to their file; prose and code often mean the root
            # ("<up>/notes/x beside the repository"): a climb into a sibling directory that does
            # not exist from the file is read from the root too. "../name" alone that stays inside
            # from the file is test data (a credential name with a traversal), not a path.
            into_sibling = bool(name and slash)
            from_here = (root / here / target).resolve()
            if _escapes(here, target) or (
                into_sibling and not from_here.exists() and _escapes(PurePosixPath("."), target)
            ):
                flag(f"relative path {target!r} leaves the repository")
        if _SIBLING_NOTES.search(line):
            flag("names the notes folder that lived beside the repository")
        for chain in _WALK_UP.findall(line):
            if _steps_up(chain) > len(PurePosixPath(rel).parts):
                flag("walks up from __file__ past the repository's root")
        if _REPO_PARENT.search(line):
            flag("the directory above the repository")
        for doc in _SECTION_OF.findall(line):
            if f"{doc}.md" not in basenames:
                flag(f"{doc} § names a document that is not in this repository")
        for token in re.findall(r"\S+", line):
            if "://" in token:
                continue  # a URL: the page is public, not a path of ours
            for md in _MD.findall(token):
                exists = (
                    md in known
                    or (here / md).as_posix() in known
                    or md.startswith("../")
                    or bool(_TARGET_SYSTEM.match(md))
                )
                if "/" not in md:
                    exists = md in basenames
                if not exists:
                    flag(f"{md} is not a file of this repository")
    return findings


def scan_repository(root: Path) -> list[Finding]:
    files = repo_files(root)
    known = frozenset(files)
    parent = root.parent.as_posix().rstrip("/") + "/"
    outside = (parent,) if parent.count("/") > 2 else ()  # a top-level directory is too broad
    findings: list[Finding] = []
    for rel in files:
        if rel in THIRD_PARTY:
            continue
        data = (root / rel).read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (the benchmark plot)
        findings += scan_text(rel, data.decode("utf-8", errors="replace"), known, outside, root)
    return findings


def test_no_file_of_the_repository_points_outside_it() -> None:
    findings = scan_repository(REPO)
    assert not findings, "references to paths outside the repository:\n" + "\n".join(map(str, findings))


def test_the_scan_sees_the_repository() -> None:
    # Without this, a scan that listed no files would pass the test above.
    files = repo_files(REPO)
    assert "README.md" in files
    assert "faxd/sim/__init__.py" in files
    assert "tests/test_self_contained.py" in files
    assert not any(f.startswith((".venv/", ".git/")) for f in files)


#: The test inputs are assembled so that this file's own lines do not match what they test.
WALK = "Path(__" + "file__).resolve()"
KNOWN = frozenset({"README.md", "docs/ringcentral.md", "docs/architecture.md", "faxd/x.py", "tests/a/b.py"})


@pytest.mark.parametrize(
    ("rel", "line", "reason"),
    [
        ("README.md", "- `" + ".." + "/shared/notes.md`: the contracts", "leaves the repository"),
        ("tests/a/b.py", 'SPEC = Path("' + _WORK + 'notes/x.yml")', "development machine"),
        ("tests/a/b.py", "``" + "shared" + "/ringcentral/`` beside the repository", "notes folder"),
        ("tests/a/b.py", "X = " + WALK + ".parents[2].parent", "past the repository's root"),
        ("tests/a/b.py", "X = " + WALK + ".parent.parent.parent.parent", "past the repository"),
        ("tests/a/b.py", "p = REPO" + ".parent / 'notes'", "the directory above"),
        ("docs/ringcentral.md", "(`" + ".." + "/notes/x.txt` beside the checkout)", "leaves the repository"),
        ("faxd/x.py", "errors are ignored (NOTES" + " §1.4)", "names a document that is not in"),
        ("faxd/x.py", '"""Codec of the protocol (DESIGN' + '.md, part 6)."""', "is not a file of"),
        ("faxd/x.py", "(see ``docs/basics/rate-limits" + ".md``)", "is not a file of this repository"),
        ("faxd/x.py", "/srv/ci/tmpabc/notes.txt", "the directory that holds this checkout"),
    ],
)
def test_each_kind_of_outside_reference_is_found(rel: str, line: str, reason: str) -> None:
    found = scan_text(rel, "first line\n" + line + "\n", KNOWN, ("/srv/ci/tmpabc/",))
    assert [f.line for f in found] == [2], found
    assert reason in found[0].reason
    assert str(found[0]).startswith(f"{rel}:2: ")


@pytest.mark.parametrize(
    ("rel", "line"),
    [
        ("docs/ringcentral.md", "see [the architecture](architecture.md) and [home](../README.md)"),
        ("faxd/x.py", "REPO = " + WALK + ".parents[1]"),
        ("tests/a/b.py", "REPO = " + WALK + ".parents[2]"),
        ("faxd/x.py", "Documentation=file:///opt/faxd/share/doc/faxd/operations.md"),
        ("tests/a/b.py", 'GUIDE = "usr/local/share/doc/faxd/operations.md"  # under --root'),
        (
            "faxd/x.py",
            "https://developers.ringcentral.com/guide/basics/rate-limits.md and /etc/faxd/config.yaml",
        ),
        ("faxd/x.py", "the socket at /run/faxd.sock, see docs/architecture.md §3 and README.md"),
        ("faxd/x.py", "shared memory, a shared encoder, helpers shared by the tests"),
        ("tests/a/b.py", '{"credential": "../jwt"}  # a traversal the config must refuse'),
    ],
)
def test_paths_inside_the_repository_or_the_system_are_fine(rel: str, line: str) -> None:
    assert scan_text(rel, line, KNOWN, ("/srv/ci/tmpabc/",)) == []
