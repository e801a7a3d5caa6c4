"""faxd: a fax-status daemon for RingCentral.

Importing the package has no side effects; the entry point is :func:`faxd.cli.main`. The version has one
source, pyproject.toml, read here from the installed package's metadata.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("faxd")
except PackageNotFoundError:
    # A checkout put on sys.path by hand, never installed: say so rather than guess a number.
    __version__ = "0+unknown"

del PackageNotFoundError, version
