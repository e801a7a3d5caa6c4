"""Fixtures of the fidelity tests: spec validation of every served body (autouse)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fidelity import installs
from fidelity.plugin import rc_spec_validation  # noqa: F401  (autouse: bodies vs the spec)


@pytest.fixture(scope="session")
def py_sdk_python() -> Path:
    """The python of the cached venv holding ringcentral==0.9.2 (installed on first use)."""
    return installs.python_sdk()


@pytest.fixture(scope="session")
def npm_dir() -> Path:
    """The cached npm folder holding the official JS clients (installed on first use)."""
    return installs.npm_packages()
