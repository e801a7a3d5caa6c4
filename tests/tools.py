"""Optional system tools for the tests: a test that needs one skips, naming it, when it is absent, and
fails instead when FAXD_REQUIRE_TOOLS=1 (CI sets it, so CI runs every such test)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The path of ``name`` on PATH; skips the calling test without it (fails under FAXD_REQUIRE_TOOLS=1)."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"needs {name} (not on PATH)"
    if os.environ.get("FAXD_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason}; FAXD_REQUIRE_TOOLS=1 makes a missing tool an error", pytrace=False)
    pytest.skip(reason)
