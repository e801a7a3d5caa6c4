"""tests/tools.py: a missing tool skips a test, naming the tool, except under FAXD_REQUIRE_TOOLS=1."""

from __future__ import annotations

import shutil

import pytest

from tools import require_tool

ABSENT = "faxd-no-such-tool"


def test_a_present_tool_is_returned() -> None:
    assert require_tool("sh") == shutil.which("sh")


def test_a_missing_tool_skips_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAXD_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"needs {ABSENT}"):
        require_tool(ABSENT)


def test_a_missing_tool_fails_when_tools_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAXD_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match=f"needs {ABSENT}.*FAXD_REQUIRE_TOOLS=1"):
        require_tool(ABSENT)
