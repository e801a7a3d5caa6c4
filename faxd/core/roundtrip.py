"""How long to wait for a WebSocket pong before calling the connection dead.

A black-holed connection (a NAT that forgot us, a gateway node gone silent) says nothing: no
close, no error, just no answers. The only way to notice is to ask and time the answer. A fixed
timeout has to be as long as the worst path it will ever meet, which makes it slow on every good
path; so the timeout follows the measured round trips instead, by the rules TCP uses for its
retransmission timer (RFC 6298, section 2):

- first round trip R:      srtt = R, rttvar = R / 2
- every later R:           rttvar = 3/4 rttvar + 1/4 |srtt - R|, then srtt = 7/8 srtt + 1/8 R
- timeout:                 srtt + 4 rttvar, clamped to [floor, ceiling]
- before any round trip:   ceiling (nothing is known about the path yet)
- after a timeout:         twice the last timeout (up to the ceiling) until a round trip is
                           measured again (RFC 6298, 5.5 and 5.7)

A ping that timed out gives no sample (Karn's rule): its round trip is unknown. The estimate is
kept across connections, since the next connection travels the same path; the doubling keeps a
path that suddenly got slower from timing out the first ping of every new connection, forever.
A jittery or slow path raises ``rttvar`` and with it the timeout, so it is not torn down for
being slow. The floor is what protects a path that is fast almost always: the smoothed estimate
learns the common case and forgets a rare stall within a few samples, so only a floor above the
longest stall a healthy path has (a spike of a few seconds; a lost pong, answered by the next
ping's pong one ping interval later) keeps such a path from being cut on its bad second.

This module must not read a clock or do I/O: the caller measures round trips and passes them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

ALPHA: Final = 1 / 8
BETA: Final = 1 / 4
K: Final = 4


@dataclass
class RoundTrip:
    """Smoothed round trip and its variation, in seconds."""

    srtt: float | None = None
    rttvar: float = 0.0
    backoffs: int = 0

    def timed_out(self) -> None:
        """A pong did not come back in time: wait twice as long until one does."""
        self.backoffs += 1

    def observe(self, rtt: float) -> None:
        """Fold in one measured round trip."""
        if rtt < 0:
            raise ValueError(f"a round trip cannot be negative, got {rtt}")
        self.backoffs = 0
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
            return
        self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
        self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt

    def timeout(self, floor: float, ceiling: float) -> float:
        """How long to wait for the next pong."""
        if floor > ceiling:
            raise ValueError(f"floor {floor} is above ceiling {ceiling}")
        if self.srtt is None:
            return ceiling
        base = max(floor, self.srtt + K * self.rttvar)
        return min(ceiling, base * 2.0 ** min(self.backoffs, 32))
