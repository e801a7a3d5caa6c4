"""The files faxd ships beside its code: the systemd units, the sysusers and tmpfiles files, the example
config, the Prometheus alert rules and the operations guide.

Their single source is the repository's top level (``systemd/``, ``config.yaml``, ...). setup.py copies
them into the package (``faxd/_shipped/``, same relative paths) when it builds a wheel, so an installed
faxd can read them without a source tree; an editable install or a checkout on ``sys.path`` reads them
from the repository itself.

This module must stay standard-library only and import nothing from faxd: setup.py reads
:data:`SHIPPED` from it at build time, before faxd or its dependencies are installed.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# Paths relative to the repository root, and to faxd/_shipped/ in a built package.
SHIPPED: tuple[str, ...] = (
    "systemd/faxd.service",
    "systemd/faxd.socket",
    "systemd/sysusers.d/faxd.conf",
    "systemd/tmpfiles.d/faxd.conf",
    "config.yaml",
    "contrib/prometheus/faxd-rules.yml",
    "docs/operations.md",
)

PACKAGE_DIR = "_shipped"


class ShippedFileMissing(Exception):
    """A file faxd ships is in neither the installed package nor a source checkout."""


def _checkout_root() -> Path | None:
    """The repository root when faxd runs from a checkout (editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    # pyproject.toml names this project: a site-packages directory never has one beside faxd/.
    return root if (root / "pyproject.toml").is_file() and (root / "systemd").is_dir() else None


def read_shipped(relpath: str) -> str:
    """The text of one shipped file, from the installed package or else the source checkout."""
    if relpath not in SHIPPED:
        raise ValueError(f"{relpath!r} is not one of the files faxd ships")
    packaged = files("faxd").joinpath(PACKAGE_DIR, *relpath.split("/"))
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    root = _checkout_root()
    if root is not None and (root / relpath).is_file():
        return (root / relpath).read_text(encoding="utf-8")
    raise ShippedFileMissing(
        f"{relpath} is missing from this faxd installation ({Path(__file__).parent}): "
        "reinstall faxd from a wheel built by `make dist` or `pip wheel`"
    )
