"""Configuration knobs of the simulator and per-recipient outcome scripts.

Pure data: nothing here touches the event loop or the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Outcomes a recipient of an outbound fax can reach from ``Queued``.
RECIPIENT_OUTCOMES = ("Sent", "SendingFailed")


def _default_rate_limits() -> dict[str, tuple[int, int, int]]:
    return {
        "Light": (50, 60, 60),
        "Medium": (40, 60, 60),
        "Heavy": (10, 60, 60),
        "Auth": (5, 60, 60),
    }


@dataclass
class SimConfig:
    """Every knob of the simulator; the defaults mirror RingCentral's documented defaults."""

    client_id: str = "faxd-sim-client"
    client_secret: str = "faxd-sim-secret"
    jwt: str = "faxd-sim-jwt"
    account_id: str = "100000001"
    #: Extensions of the account; the first one is the JWT user's own extension (``~``).
    extensions: tuple[str, ...] = ("200000001",)
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 604800
    ws_token_ttl: int = 600
    recovery_timeout: int = 180
    recovery_buffer_size: int = 100
    idle_timeout: int = 1800
    absolute_timeout: int = 86400
    #: group -> (limit, window seconds, penalty seconds)
    rate_limits: dict[str, tuple[int, int, int]] = field(default_factory=_default_rate_limits)
    rate_limits_enabled: bool = True
    #: The account's default cover page (Outbound Fax Settings): what a fax sent without
    #: ``coverIndex`` gets, as the spec's createFaxMessage describes; 0 = none.
    default_cover_index: int = 1
    #: Random per-recipient time from ``Queued`` to the final status, seconds.
    default_delay: tuple[float, float] = (1.0, 3.0)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.extensions:
            raise ValueError("SimConfig.extensions must name at least one extension")
        low, high = self.default_delay
        if low < 0 or high < low:
            raise ValueError("SimConfig.default_delay must be (low, high) with 0 <= low <= high")

    @property
    def owner_extension(self) -> str:
        """The extension of the JWT user (what ``~`` means in paths and filters)."""
        return self.extensions[0]


@dataclass
class RecipientScript:
    """What happens to one recipient of an outbound fax.

    ``after`` is the number of seconds from creation to the final status (``None``: random
    within ``SimConfig.default_delay``); ``delivered_after`` optionally moves a ``Sent``
    recipient on to ``Delivered`` that many seconds after it became ``Sent``.
    """

    phone: str
    outcome: str = "Sent"
    error_code: str | None = None
    after: float | None = None
    delivered_after: float | None = None

    def __post_init__(self) -> None:
        if self.outcome not in RECIPIENT_OUTCOMES:
            raise ValueError(f"outcome must be one of {RECIPIENT_OUTCOMES}, not {self.outcome!r}")
        if self.outcome == "SendingFailed":
            if self.error_code is None:
                self.error_code = "LineBusy"
            if self.delivered_after is not None:
                raise ValueError("delivered_after only applies to outcome 'Sent'")
        elif self.error_code is not None:
            raise ValueError("error_code only applies to outcome 'SendingFailed'")
        if self.after is not None and self.after < 0:
            raise ValueError("after must be >= 0")
        if self.delivered_after is not None and self.delivered_after < 0:
            raise ValueError("delivered_after must be >= 0")
