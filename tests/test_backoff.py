"""Backoff delays: growth, cap, each jitter policy, per-key series (seeded rng, no event loop)."""

from __future__ import annotations

import itertools
import random

import pytest

from faxd.core.backoff import JITTERS, KeyedBackoff, backoff


def take(it: object, n: int) -> list[float]:
    assert hasattr(it, "__next__")
    return list(itertools.islice(it, n))  # type: ignore[call-overload]


def test_no_jitter_doubles_up_to_cap() -> None:
    assert take(backoff(2, 2, 60, "none"), 8) == [2, 4, 8, 16, 32, 60, 60, 60]


@pytest.mark.parametrize(
    ("jitter", "low", "high"),
    [
        ("full", lambda c: 0.0, lambda c: c),
        ("equal", lambda c: c / 2, lambda c: c),
    ],
)
def test_jitter_within_the_ceiling(jitter: str, low: object, high: object) -> None:
    ceilings = take(backoff(2, 2, 60, "none"), 50)
    delays = take(backoff(2, 2, 60, jitter, rng=random.Random(7)), 50)  # type: ignore[arg-type]
    for c, d in zip(ceilings, delays, strict=True):
        assert low(c) <= d <= high(c)  # type: ignore[operator]


def test_decorrelated_stays_between_initial_and_cap() -> None:
    delays = take(backoff(2, 2, 30, "decorrelated", rng=random.Random(1)), 200)
    assert all(2 <= d <= 30 for d in delays)
    assert max(delays) > 15  # it does grow


@pytest.mark.parametrize("jitter", JITTERS)
def test_seeded_series_replays(jitter: str) -> None:
    a = take(backoff(jitter=jitter, rng=random.Random(42)), 20)  # type: ignore[arg-type]
    b = take(backoff(jitter=jitter, rng=random.Random(42)), 20)  # type: ignore[arg-type]
    assert a == b


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": 0}, "initial"),
        ({"factor": 0.5}, "factor"),
        ({"initial": 10, "cap": 5}, "cap"),
        ({"jitter": "bogus"}, "jitter"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next(backoff(**kwargs))  # type: ignore[arg-type]


def test_keyed_backoff_grows_per_key_and_resets() -> None:
    kb = KeyedBackoff(policy=lambda: backoff(1, 2, 8, "none"))
    assert kb.wait("a", 0) == 0
    assert kb.failed("a", 100) == 1
    assert kb.failed("a", 101) == 2
    assert kb.failed("b", 101) == 1  # independent series
    assert kb.wait("a", 102) == 1
    assert kb.wait("a", 104) == 0
    assert kb.failing("a")
    kb.succeeded("a")
    assert not kb.failing("a")
    assert kb.failed("a", 200) == 1  # reset


def test_keyed_backoff_retry_after_wins() -> None:
    kb = KeyedBackoff(policy=lambda: backoff(1, 2, 8, "none"))
    assert kb.failed("k", 0, at_least=30) == 30
    assert kb.wait("k", 10) == 20
