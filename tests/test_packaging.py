"""The install path of an administrator with no source tree: build the sdist and a wheel from it (as
``make dist`` does), install the wheel into a fresh venv outside the repository, run that venv's
``faxd install-service`` into a temporary root, check the installed units with ``systemd-analyze verify``,
the sysusers file with ``systemd-sysusers`` and the alert rules with ``promtool``, and run ``faxd demo``
from that venv.

Slow (a build and a venv with faxd's dependencies): marked ``slow``; ``make test`` runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from faxd.shipped import SHIPPED
from tools import require_tool

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

# Build products and caches a checkout may hold but a fresh clone does not (.gitignore).
UNTRACKED = (
    ".git",
    ".venv",
    "*.egg-info",
    "build",
    "dist",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "node_modules",
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _env() -> dict[str, str]:
    """The caller's environment without anything that would lead a child back to the repository's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO))
    )
    return env


def run(argv: Sequence[str | Path], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Installed:
    sdist: Path
    wheel: Path
    venv: Path
    work: Path  # a directory outside the repository, the cwd of every command

    @property
    def faxd(self) -> Path:
        return self.venv / "bin" / "faxd"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel-install")
    assert not work.resolve().is_relative_to(REPO)
    # What a fresh clone holds: setuptools would otherwise put whatever a stale faxd.egg-info/SOURCES.txt
    # lists into the sdist, and hide a file missing from MANIFEST.in.
    source = work / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*UNTRACKED))
    dist = work / "dist"
    # `python -m build` builds the sdist, then the wheel from the unpacked sdist: a file missing from
    # MANIFEST.in is missing from the wheel too.
    built = run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=work)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = dist.glob("faxd-*.tar.gz")
    (wheel,) = dist.glob("faxd-*.whl")
    venv = work / "venv"
    made = run([sys.executable, "-m", "venv", venv], cwd=work)
    assert made.returncode == 0, made.stderr
    # Dependencies come from the index; pip's cache is kept so repeated runs do not download them again.
    pip = run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel], cwd=work)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return Installed(sdist, wheel, venv, work)


def test_build_requirements_accept_the_license_metadata() -> None:
    """PEP 639 metadata (license = "MIT" as an SPDX string, license-files) needs setuptools >= 77."""
    project = PYPROJECT["project"]
    assert isinstance(project["license"], str)
    assert project["license-files"] == ["LICENSE"]
    (requirement,) = (r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement)
    assert match, requirement
    assert int(match[1]) >= 77


def test_sdist_and_wheel_carry_the_shipped_files_and_the_licence(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as sdist:
        names = set(sdist.getnames())
    root = f"faxd-{VERSION}"
    for rel in (*SHIPPED, "LICENSE", "setup.py", "MANIFEST.in"):
        assert f"{root}/{rel}" in names, rel
    with zipfile.ZipFile(installed.wheel) as wheel:
        for rel in SHIPPED:
            assert wheel.read(f"faxd/_shipped/{rel}") == (REPO / rel).read_bytes(), rel
        metadata = wheel.read(f"faxd-{VERSION}.dist-info/METADATA").decode()
        assert wheel.read(f"faxd-{VERSION}.dist-info/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert "\nLicense-File: LICENSE\n" in metadata


def test_the_venv_runs_its_own_faxd_not_the_repository(installed: Installed) -> None:
    where = run(
        [installed.venv / "bin" / "python", "-c", "import faxd; print(faxd.__file__)"], cwd=installed.work
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)
    version = run([installed.faxd, "--version"], cwd=installed.work)
    assert (version.returncode, version.stdout) == (0, f"faxd {VERSION}\n")


def test_install_service_from_the_wheel_into_a_root(installed: Installed) -> None:
    root = installed.work / "root"
    root.mkdir()
    first = run([installed.faxd, "install-service", "--root", root], cwd=installed.work)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("  created  ") == 7, first.stdout
    unit_dir = root / "usr/local/lib/systemd/system"
    service = (unit_dir / "faxd.service").read_text()
    assert re.search(rf"^ExecStart={re.escape(str(installed.faxd))} run ", service, re.M)
    assert (root / "etc/faxd/config.yaml").read_bytes() == (REPO / "config.yaml").read_bytes()

    again = run([installed.faxd, "install-service", "--root", root], cwd=installed.work)
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout
    assert again.stdout.count("  unchanged  ") == 6, again.stdout

    verify = run(
        [
            require_tool("systemd-analyze"),
            "verify",
            "--man=no",
            "--recursive-errors=no",
            unit_dir / "faxd.socket",
            unit_dir / "faxd.service",
        ],
        cwd=installed.work,
    )
    # verify checks that ExecStart='s program exists and is executable: the venv's faxd.
    assert verify.returncode == 0, verify.stderr
    ours = [line for line in verify.stderr.splitlines() if str(root) in line]
    assert not ours, f"verify warnings about the installed units: {ours}"

    # The group faxd.socket's SocketGroup= names comes from the installed sysusers file, in a directory
    # systemd-sysusers reads.
    sysusers = run([require_tool("systemd-sysusers"), f"--root={root}"], cwd=installed.work)
    assert sysusers.returncode == 0, sysusers.stderr
    group = re.search(r"^faxd-clients:x:(\d+):", (root / "etc/group").read_text(), re.M)
    assert group

    # Then the directory of the event socket, from the installed tmpfiles file: root:faxd-clients 3770.
    tmpfiles = run([require_tool("systemd-tmpfiles"), f"--root={root}", "--create"], cwd=installed.work)
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    st = (root / "run/faxd").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o3770, 0, int(group[1]))

    rules = root / "usr/local/share/faxd/faxd-rules.yml"
    checked = run([require_tool("promtool"), "check", "rules", rules], cwd=installed.work)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_demo_runs_from_the_installed_wheel(installed: Installed) -> None:
    demo = run([installed.faxd, "demo", "--timeout", "120"], cwd=installed.work, timeout=300)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "SendingFailed" in demo.stdout
