"""Pong timeout from measured round trips (RFC 6298 rules), on numbers passed in."""

from __future__ import annotations

import math
import random

import pytest

from faxd.config import WebSocketConfig
from faxd.core.roundtrip import RoundTrip
from faxd.sim.wsg import wan_pong_delay


def test_nothing_known_waits_the_ceiling() -> None:
    assert RoundTrip().timeout(0.5, 10) == 10


def test_first_sample_sets_srtt_and_half_of_it_as_variation() -> None:
    rt = RoundTrip()
    rt.observe(0.2)
    assert (rt.srtt, rt.rttvar) == (0.2, 0.1)
    assert rt.timeout(0.5, 10) == pytest.approx(0.6)  # 0.2 + 4 * 0.1


def test_later_samples_update_variation_with_the_old_srtt() -> None:
    rt = RoundTrip()
    rt.observe(0.2)
    rt.observe(0.6)
    assert rt.rttvar == pytest.approx(0.75 * 0.1 + 0.25 * 0.4)  # |0.2 - 0.6|, not |0.25 - 0.6|
    assert rt.srtt == pytest.approx(0.875 * 0.2 + 0.125 * 0.6)


@pytest.mark.parametrize(
    ("samples", "floor", "ceiling", "expected"),
    [
        ([0.001] * 20, 0.5, 10, 0.5),  # loopback: the floor
        ([0.05] * 50, 0.5, 10, 0.5),  # a steady internet path: still the floor
        ([3.0] * 50, 0.5, 10, 3.0),  # a slow but steady path: its round trip
        ([9.0, 1.0] * 10, 0.5, 10, 10),  # wild jitter: capped by the ceiling
    ],
)
def test_timeout_is_clamped(samples: list[float], floor: float, ceiling: float, expected: float) -> None:
    rt = RoundTrip()
    for s in samples:
        rt.observe(s)
    assert rt.timeout(floor, ceiling) == pytest.approx(expected, rel=0.01)


def test_a_jittery_path_gets_more_than_its_slowest_recent_pong() -> None:
    rng = random.Random(7)
    rt = RoundTrip()
    samples = [rng.uniform(0.1, 0.9) for _ in range(200)]
    for s in samples:
        rt.observe(s)
    assert rt.timeout(0.5, 10) > max(samples[-20:])


def test_the_estimate_forgets_an_old_slow_path() -> None:
    rt = RoundTrip()
    for _ in range(20):
        rt.observe(2.0)
    assert rt.timeout(0.5, 10) > 2
    for _ in range(60):
        rt.observe(0.01)
    assert rt.timeout(0.5, 10) == 0.5


def test_a_timeout_doubles_the_wait_until_a_pong_is_measured() -> None:
    rt = RoundTrip()
    for _ in range(10):
        rt.observe(0.01)
    assert rt.timeout(0.5, 10) == 0.5
    rt.timed_out()
    assert rt.timeout(0.5, 10) == 1.0
    rt.timed_out()
    assert rt.timeout(0.5, 10) == 2.0
    for _ in range(10):
        rt.timed_out()
    assert rt.timeout(0.5, 10) == 10
    rt.observe(0.8)  # the path is slower now: the estimate moves, the doubling ends
    assert rt.backoffs == 0
    assert 0.5 < rt.timeout(0.5, 10) < 2.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        RoundTrip().observe(-1)
    with pytest.raises(ValueError, match="above ceiling"):
        RoundTrip().timeout(5, 1)
    assert math.isfinite(RoundTrip(srtt=0.1).timeout(0.5, 0.5))


def wan_hour(seed: int, interval: float) -> list[tuple[float, float]]:
    """One hour of pings every ``interval`` on the simulator's WAN path: (acknowledged at, sent at).

    Pongs come back in order (a TCP path never reorders them) and a pong acknowledges every earlier
    ping still waiting, so a lost pong's ping is answered by the next pong that comes.
    """
    rng = random.Random(seed)
    arrived: list[float | None] = []
    last = 0.0
    for n in range(int(3600 / interval)):
        delay = wan_pong_delay(rng)
        if delay is not None:
            last = max(n * interval + delay, last)
        arrived.append(None if delay is None else last)
    acked: list[tuple[float, float]] = []
    answer: float | None = None
    for n in reversed(range(len(arrived))):
        answer = arrived[n] if arrived[n] is not None else answer
        if answer is not None:
            acked.append((answer, n * interval))
    return sorted(acked)


@pytest.mark.parametrize("seed", range(20))
def test_the_default_timings_cut_no_healthy_connection_on_a_wan_path(seed: int) -> None:
    """Twenty seeded hours of the WAN path faxd's defaults are chosen for: every ping is answered
    before the timeout in force, and that timeout stays short enough to replace a dead connection
    within 10 s (a ping interval + the timeout + about a second to reconnect)."""
    defaults = WebSocketConfig()
    rt = RoundTrip()
    longest_wait = longest_timeout = 0.0
    for answered, sent in wan_hour(seed, defaults.ping_interval):
        timeout = rt.timeout(defaults.ping_timeout_min, defaults.ping_timeout)
        wait = answered - sent
        assert wait < timeout, f"ping sent at {sent:.0f} s waited {wait:.2f} s, timeout {timeout:.2f} s"
        rt.observe(wait)
        longest_wait = max(longest_wait, wait)
        longest_timeout = max(longest_timeout, timeout)
    assert longest_wait > 1, "the hour had its spikes"
    assert defaults.ping_interval + longest_timeout + 1 <= 10
