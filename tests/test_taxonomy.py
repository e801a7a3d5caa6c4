"""faxErrorCode → category + retryable: every code of the official spec is covered."""

from __future__ import annotations

import pytest
from fidelity.spec import load_spec

from faxd.core.taxonomy import FAX_ERROR_CODES, classify

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
    """The enum values of FaxErrorCodeEnum in RingCentral's spec (the repository's trimmed copy)."""
    codes: list[str] = load_spec()["components"]["schemas"]["FaxErrorCodeEnum"]["enum"]
    return codes


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
