"""tests/tools.py: a missing tool skips naming it, or fails under FAXD_REQUIRE_TOOLS=1."""

from __future__ import annotations

import shutil

import pytest

from tools import REQUIRE_TOOLS, require_tool

ABSENT = "faxd-no-such-tool"


def test_a_missing_tool_skips_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_TOOLS, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"^needs {ABSENT} \\(not found on PATH\\)$"):
        require_tool("sh", ABSENT)


@pytest.mark.parametrize("value", ["1", "yes"])
def test_a_missing_tool_fails_when_tools_are_required(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(REQUIRE_TOOLS, value)
    with pytest.raises(pytest.fail.Exception, match=f"needs {ABSENT} .*{REQUIRE_TOOLS}=1"):
        require_tool(ABSENT)


@pytest.mark.parametrize("value", ["1", "", "0"])
def test_present_tools_pass(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(REQUIRE_TOOLS, value)
    require_tool("sh")
    monkeypatch.setenv("PATH", "")
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception), match="needs sh"):
        require_tool("sh")


def test_a_present_tool_is_returned() -> None:
    assert require_tool("sh") == shutil.which("sh")
    assert require_tool("sh", "true") == shutil.which("sh")
