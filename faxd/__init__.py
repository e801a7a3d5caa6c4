"""faxd: a fax-status daemon for RingCentral.

Importing the package has no side effects; the entry point is :func:`faxd.cli.main`.
"""

__version__ = "0.1.0"
