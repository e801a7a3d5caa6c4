"""faxErrorCode → category + retryable: every code of the official spec is covered."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from faxd.core.taxonomy import FAX_ERROR_CODES, classify

SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "ringcentral" / "rc-public-openapi.yml"
CATEGORIES = {
    "busy",
    "no_answer",
    "not_a_fax",
    "invalid_number",
    "rejected",
    "permission",
    "billing",
    "document",
    "internal",
    "other",
}


def spec_codes() -> list[str]:
    """The enum values of FaxErrorCodeEnum, read from the schema's block of the spec."""
    text = SPEC.read_text()
    start = text.index("\n    FaxErrorCodeEnum:") + 1
    end = re.compile(r"^    \S", re.M).search(text, start + 10)
    assert end is not None
    return re.findall(r"^\s+- (\w+)$", text[start : end.start()], flags=re.M)


@pytest.mark.skipif(not SPEC.exists(), reason="shared/ringcentral is beside the checkout in CI")
def test_every_spec_code_is_classified() -> None:
    codes = spec_codes()
    assert len(codes) == 34
    assert sorted(c for c in codes if c not in FAX_ERROR_CODES) == []


@pytest.mark.parametrize(
    ("code", "category", "retryable"),
    [
        ("LineBusy", "busy", True),
        ("NoAnswer", "no_answer", True),
        ("InvalidNumber", "invalid_number", False),
        ("NotEnoughCredits", "billing", False),
        ("RenderingFailed", "document", False),
        ("InternalError", "internal", True),
        ("SomethingNew", "other", True),
    ],
)
def test_classify(code: str, category: str, retryable: bool) -> None:
    assert classify(code) == (category, retryable)


def test_no_code_no_class() -> None:
    assert classify(None) is None
    assert classify("") is None


def test_categories_are_the_documented_set() -> None:
    assert {c.category for c in FAX_ERROR_CODES.values()} == CATEGORIES
