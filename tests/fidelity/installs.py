"""Installs the official RingCentral clients for the fidelity tests, once, into a cache dir.

``$FAXD_FIDELITY_CACHE`` (default ``$XDG_CACHE_HOME/faxd-fidelity`` or ``~/.cache/faxd-fidelity``):

- ``py-ringcentral-0.9.2/``: a venv with ``ringcentral==0.9.2`` (it pins websockets 15, so it
  cannot share faxd's environment);
- ``npm/``: ``@ringcentral/sdk``/``@ringcentral/subscriptions`` 5.0.11, ``@rc-ex/core`` 1.8.6,
  ``@rc-ex/ws`` 1.4.2, exact versions.

Each is built in a temporary directory and renamed into place when complete, under a file
lock, so a broken or concurrent install never leaves a half-filled cache. A failed install
(registry unreachable, timeout) FAILS the test with the installer's output: never a skip. Only node
or npm missing from PATH skips the JS clients' tests (tests/tools.py: a failure under
``FAXD_REQUIRE_TOOLS=1``, as in CI).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools import require_tool

PY_SDK = "ringcentral==0.9.2"
NPM_PACKAGES = {
    "@ringcentral/sdk": "5.0.11",
    "@ringcentral/subscriptions": "5.0.11",
    "@rc-ex/core": "1.8.6",
    "@rc-ex/ws": "1.4.2",
}
INSTALL_TIMEOUT = 240.0
_DONE = ".faxd-installed"


def cache_dir() -> Path:
    override = os.environ.get("FAXD_FIDELITY_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "faxd-fidelity"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: list[str], *, cwd: Path | None = None, what: str) -> None:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"installing {what} timed out after {INSTALL_TIMEOUT:.0f} s: {argv}\n{exc.stderr}")
    except FileNotFoundError as exc:
        pytest.fail(f"installing {what}: {exc} (is it installed? .ci/run installs node and npm)")
    if done.returncode != 0:
        pytest.fail(
            f"installing {what} failed (exit {done.returncode}; is the registry reachable?): "
            f"{' '.join(argv)}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )


def _install(
    final: Path,
    build: Path,
    what: str,
    prepare: Callable[[Path], None],
    steps: list[tuple[list[str], Path | None]],
) -> Path:
    if (final / _DONE).exists():
        return final
    with _locked(final.parent):
        if (final / _DONE).exists():
            return final
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        build.mkdir(parents=True)
        prepare(build)
        for argv, cwd in steps:
            _run(argv, cwd=cwd, what=what)
        (build / _DONE).write_text(what + "\n")
        build.rename(final)
    return final


def python_sdk() -> Path:
    """The python of a venv with ``ringcentral==0.9.2`` (installed on first use)."""
    root = cache_dir()
    final = root / "py-ringcentral-0.9.2"
    # venvs are not relocatable: build it at its final path, behind the lock and the marker
    if not (final / _DONE).exists():
        with _locked(root):
            if not (final / _DONE).exists():
                shutil.rmtree(final, ignore_errors=True)
                _run([sys.executable, "-m", "venv", str(final)], what=PY_SDK)
                _run(
                    [
                        str(final / "bin" / "python"),
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        "--no-input",
                        PY_SDK,
                    ],
                    what=PY_SDK,
                )
                (final / _DONE).write_text(PY_SDK + "\n")
    return final / "bin" / "python"


def npm_packages() -> Path:
    """A directory whose ``node_modules`` holds the official JS clients (installed on first use)."""
    require_tool("node")  # every JS client test runs its client with it
    root = cache_dir()
    final = root / "npm"
    if not (final / _DONE).exists():
        require_tool("npm")
    build = root / f"npm.build-{os.getpid()}"
    specs = [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
    package = {"name": "faxd-fidelity-clients", "private": True, "type": "module"}

    def prepare(where: Path) -> None:
        (where / "package.json").write_text(json.dumps(package))

    return _install(
        final,
        build,
        " ".join(specs),
        prepare,
        [(["npm", "install", "--no-audit", "--no-fund", "--save-exact", "--no-progress", *specs], build)],
    )
