"""Observers of what the simulator serves: every JSON body, over HTTP and over the WebSocket.

Opt-in and side-effect free: the simulator calls each observer once per JSON body it served
(after it went out), so a test can check the bodies, e.g. against RingCentral's OpenAPI spec.
Observers are either given to one :class:`~faxd.sim.server.Simulator`
(``Simulator(response_observer=…)``) or registered process-wide with
:func:`add_global_observer` (what the test suite's autouse fixture does, so every simulator
any test starts is covered). An observer must not raise; if it does, the error is logged and
the simulator carries on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from faxd.logs import get_logger

log = get_logger(__name__)

#: ``response``: an HTTP response body; ``part``: one JSON part of a multipart/mixed response;
#: ``ClientRequest``/``ServerNotification``/``Error``/``ConnectionDetails``/``Heartbeat``:
#: element 2 of a WS frame of that type (``Heartbeat`` frames have no body: ``None``).
ServedKind = Literal[
    "response", "part", "ClientRequest", "ServerNotification", "Error", "ConnectionDetails", "Heartbeat"
]


@dataclass(frozen=True, slots=True)
class ServedJson:
    """One JSON body the simulator served.

    ``method``/``path`` identify the endpoint: the HTTP method and route template (as in
    :class:`~faxd.sim.common.RecordedRequest`) for ``response``, ``part`` and
    ``ClientRequest`` replies; for ``ServerNotification`` ``path`` is the notification's
    ``event`` (``method`` is empty); empty for the other frame types. ``status`` is the
    HTTP status (or the frame meta's ``status``); ``part_index`` counts multipart parts
    (0 = the summary part).
    """

    transport: Literal["http", "ws"]
    kind: ServedKind
    method: str
    path: str
    status: int
    content_type: str
    body: Any
    raw_path: str = ""
    part_index: int = -1


Observer = Callable[[ServedJson], None]

_global_observers: list[Observer] = []


def add_global_observer(observer: Observer) -> Callable[[], None]:
    """Have ``observer`` see what every simulator of this process serves; returns the remover."""
    _global_observers.append(observer)

    def remove() -> None:
        if observer in _global_observers:
            _global_observers.remove(observer)

    return remove


def global_observers() -> tuple[Observer, ...]:
    return tuple(_global_observers)


def notify(observers: Iterable[Observer], served: ServedJson) -> None:
    """Hand ``served`` to each observer; an observer's exception is logged, never raised."""
    for observer in observers:
        try:
            observer(served)
        except Exception:
            log.exception(
                "sim.observer_failed", detail="a response observer raised; the body was served anyway"
            )


class ObserverSet:
    """A simulator's own observers plus the process-wide ones."""

    def __init__(self, own: Observer | None = None) -> None:
        self.own: list[Observer] = [own] if own is not None else []

    @property
    def active(self) -> bool:
        """Whether anyone is listening (bodies are only re-parsed then)."""
        return bool(self.own or _global_observers)

    def __call__(self, served: ServedJson) -> None:
        notify([*self.own, *_global_observers], served)
