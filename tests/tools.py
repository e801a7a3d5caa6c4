"""External programs some tests need (node, npm, promtool, systemd-analyze, socat, jq...).

:func:`require_tool` skips the calling test with a reason naming each missing tool, so ``make test``
passes on a machine with only Python and make. With ``FAXD_REQUIRE_TOOLS=1`` in the environment (CI
sets it, after installing the tools) a missing tool fails the test instead: CI never passes by
skipping what it was meant to run.

This module only looks tools up on ``PATH``; it must not install anything.
"""

from __future__ import annotations

import os
import shutil

import pytest

#: Set to 1 to make a missing tool a test failure instead of a skip.
REQUIRE_TOOLS = "FAXD_REQUIRE_TOOLS"


def tools_required() -> bool:
    return os.environ.get(REQUIRE_TOOLS, "").strip() not in ("", "0")


def require_tool(*names: str) -> str:
    """The path of the first tool named; skips (or, under ``FAXD_REQUIRE_TOOLS=1``, fails) the running
    test unless every tool is on PATH."""
    paths = [shutil.which(name) for name in names]
    missing = [name for name, path in zip(names, paths, strict=True) if path is None]
    if not missing:
        assert paths[0] is not None
        return paths[0]
    reason = f"needs {' and '.join(missing)} (not found on PATH)"
    if tools_required():
        pytest.fail(f"{reason}; {REQUIRE_TOOLS}=1 makes a missing tool a failure", pytrace=False)
    pytest.skip(reason)
