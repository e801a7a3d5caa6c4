"""Why a WebSocket connection ended: ``classify`` maps what ended it to the reason the log and STATUS=
show and to its bounded ``faxd_ws_disconnects_total`` label. A table, no sockets."""

from __future__ import annotations

import socket

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import (
    ConnectionClosedError,
    InvalidProxyStatus,
    InvalidStatus,
    InvalidURI,
    ProxyError as WsProxyError,
)
from websockets.http11 import Response

from faxd.adapters.metrics import WS_DISCONNECT_REASONS, WS_STATES
from faxd.adapters.rest import ApiError, AuthFailed, RateLimited
from faxd.adapters.ws_session import Disconnect, _Closed, classify
from faxd.core.proxy import ProxyError
from faxd.core.wsg import WsState


def _response(status: int) -> Response:
    return Response(status, "", Headers())


CASES: list[tuple[Exception, str, str]] = [
    # what the connection said when it ended (the reader's reasons, gateway error codes)
    (_Closed("ping_timeout"), "ping_timeout", "ping_timeout"),
    (_Closed("closed"), "closed", "closed"),
    (_Closed("closed_abnormal"), "closed_abnormal", "closed_abnormal"),
    (_Closed("connection_lost"), "connection_lost", "connection_lost"),
    (_Closed("too_large"), "too_large", "too_large"),
    (_Closed("wsg_902"), "wsg_902", "wsg_902"),
    (_Closed("wsg_903"), "wsg_903", "wsg_903"),
    (_Closed("error_frame"), "error_frame", "error_frame"),
    (_Closed("reply_timeout"), "reply_timeout", "reply_timeout"),
    (_Closed("something new"), "something new", "other"),
    # RingCentral's REST answers on the way (the ws token)
    (RateLimited(429, "CMN-301", "", group="Auth", retry_after=30), "rate_limited", "rate_limited"),
    (ApiError(400, "OAU-213"), "api OAU-213", "api_error"),
    (ApiError(503, None), "api 503", "api_error"),
    (AuthFailed(401, "OAU-140"), "api OAU-140", "api_error"),
    # the upgrade and the proxy
    (InvalidStatus(_response(503)), "handshake 503", "handshake"),
    (InvalidStatus(_response(401)), "handshake 401", "handshake"),
    (InvalidProxyStatus(_response(407)), "proxy 407", "other"),
    (WsProxyError("bad reply"), "proxy_bad_reply", "other"),
    (ProxyError("no such proxy"), "proxy_unusable", "other"),
    # the network, by the exception's class
    (ConnectionRefusedError(), "ConnectionRefusedError", "network"),
    (TimeoutError(), "TimeoutError", "network"),
    (ConnectionClosedError(None, None), "ConnectionClosedError", "network"),
    (socket.gaierror(), "gaierror", "other"),
    (InvalidURI("ws://x", "bad"), "InvalidURI", "other"),
    # a bug of ours
    (RuntimeError("bug"), "internal", "internal"),
    (KeyError("bug"), "internal", "internal"),
]


@pytest.mark.parametrize(("ended", "reason", "label"), CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_classify(ended: Exception, reason: str, label: str) -> None:
    assert classify(ended) == Disconnect(reason, label)


def test_every_label_is_a_pre_created_series() -> None:
    """The label set is bounded: whatever ends a connection counts in one of the series scraped as 0
    from the start."""
    assert {label for _, _, label in CASES} <= set(WS_DISCONNECT_REASONS)
    assert {classify(_Closed(reason)).label for reason in WS_DISCONNECT_REASONS} <= set(WS_DISCONNECT_REASONS)


def test_the_state_metric_has_every_session_state() -> None:
    assert list(WS_STATES) == [state.value for state in WsState]
    assert WsState.UP == "up"
