"""WSG codec: frame parsing (good and malformed), encoders, fax hints, wsc rule, recovery window."""

from __future__ import annotations

import json
from typing import Any

import pytest

from faxd.core.wsg import (
    ClientResponse,
    ConnectionDetails,
    DisabledFilter,
    ErrorFrame,
    FrameError,
    Heartbeat,
    Hint,
    Notification,
    Wsc,
    WsgSession,
    disabled_filters_of,
    encode_client_request,
    encode_heartbeat,
    encode_subscribe,
    encode_unsubscribe,
    encode_update,
    error_code_of,
    event_filters,
    extract_hint,
    filter_key,
    newer_wsc,
    parse_frame,
    subscription_id_of,
)

CD = [
    {"type": "ConnectionDetails", "messageId": "m1", "status": 200, "wsc": {"token": "TOK", "sequence": 1}},
    {
        "creationTime": "2020-09-07T21:50:02.737+0000",
        "maxConnectionsPerSession": 50,
        "recoveryBufferSize": 100,
        "recoveryTimeout": 180,
        "idleTimeout": 1800,
        "absoluteTimeout": 86400,
        "maxActiveRequests": 10,
    },
]


def frame(*parts: Any) -> str:
    return json.dumps(list(parts))


def notification(
    body: Any, sub: str = "sub-1", event: str = "/restapi/v1.0/account/1/extension/2/message-store"
) -> str:
    return frame(
        {"type": "ServerNotification", "messageId": "n1", "status": 200, "headers": {}},
        {"uuid": "u1", "event": event, "subscriptionId": sub, "ownerId": "2", "body": body},
    )


def test_connection_details() -> None:
    f = parse_frame(json.dumps(CD))
    assert f == ConnectionDetails(
        message_id="m1",
        wsc=Wsc("TOK", 1),
        recovery_timeout=180.0,
        idle_timeout=1800.0,
        absolute_timeout=86400.0,
        recovery_buffer_size=100,
        max_active_requests=10,
    )
    assert "TOK" not in repr(f)


def test_connection_details_recovery_failed() -> None:
    f = parse_frame(frame(CD[0], {**CD[1], "recoveryState": "Failed", "recoveryErrorCode": "WSG-1003"}))
    assert isinstance(f, ConnectionDetails)
    assert (f.recovery_state, f.recovery_error_code) == ("Failed", "WSG-1003")


def test_client_response() -> None:
    f = parse_frame(
        frame(
            {"type": "ClientRequest", "messageId": "r1", "status": 403, "headers": {"RCRequestId": "x"}},
            {"errors": [{"errorCode": "SUB-505", "message": "limit"}]},
        )
    )
    assert isinstance(f, ClientResponse)
    assert (f.message_id, f.status, f.ok, f.error_code) == ("r1", 403, False, "SUB-505")
    assert f.headers == {"RCRequestId": "x"}


def test_client_response_without_headers_or_body() -> None:
    f = parse_frame(frame({"type": "ClientRequest", "messageId": "r2", "status": 204}))
    assert f == ClientResponse("r2", 204, {}, None)


def test_notification_envelope() -> None:
    f = parse_frame(notification({"changes": []}))
    assert isinstance(f, Notification)
    assert (f.subscription_id, f.owner_id, f.uuid) == ("sub-1", "2", "u1")


def test_heartbeat_and_error() -> None:
    assert parse_frame(frame({"type": "Heartbeat", "messageId": "h"})) == Heartbeat("h")
    f = parse_frame(frame({"type": "Error"}, {"errorCode": "WSG-902", "message": "Idle timeout expired"}))
    assert f == ErrorFrame("WSG-902", "Idle timeout expired")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("{not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        ('{"type": "Heartbeat"}', "not_array"),
        ("[]", "not_array"),
        ('[{"type":"Heartbeat"},{},{}]', "not_array"),
        ('["Heartbeat"]', "bad_meta"),
        ("[{}]", "bad_meta"),
        ('[{"type": 5}]', "bad_meta"),
        ('[{"type":"Surprise"}]', "unknown_type"),
        ('[{"type":"ClientRequest","status":200}]', "bad_meta"),
        ('[{"type":"ClientRequest","messageId":"x"}]', "bad_meta"),
        ('[{"type":"ClientRequest","messageId":"x","status":200,"headers":[]}]', "bad_meta"),
        ('[{"type":"Heartbeat","wsc":{"token":"","sequence":1}}]', "bad_meta"),
        ('[{"type":"Heartbeat","wsc":{"token":"t","sequence":true}}]', "bad_meta"),
        ('[{"type":"Heartbeat","wsc":"t"}]', "bad_meta"),
        ('[{"type":"ServerNotification"}]', "bad_body"),
        ('[{"type":"ServerNotification"},{"body":{}}]', "bad_body"),
        ('[{"type":"ConnectionDetails"},[]]', "bad_body"),
        ('[{"type":"ConnectionDetails"},{"recoveryTimeout":"soon"}]', "bad_body"),
        ('[{"type":"Error"},"boom"]', "bad_body"),
    ],
)
def test_malformed_frames(data: str | bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(data)
    assert info.value.reason == reason


def test_too_large() -> None:
    text = frame({"type": "Heartbeat", "messageId": "x" * 100})
    with pytest.raises(FrameError) as info:
        parse_frame(text, max_bytes=50)
    assert info.value.reason == "too_large"
    assert parse_frame(text, max_bytes=len(text)) == Heartbeat("x" * 100)


@pytest.mark.parametrize(
    ("body", "event", "hint"),
    [
        (
            {"extensionId": 2, "changes": [{"type": "Fax", "newCount": 1, "newMessageIds": [5209304004]}]},
            "/restapi/v1.0/account/1/extension/2/message-store",
            Hint("2", ("5209304004",), 0),
        ),
        (
            {"extensionId": "2", "changes": [{"type": "Fax", "updatedCount": 1, "newCount": 0}]},
            "/restapi/v1.0/account/1/extension/2/message-store",
            Hint("2", (), 1),
        ),
        (  # mixed types: only the Fax entry counts; ids deduplicated
            {
                "changes": [
                    {"type": "SMS", "newCount": 1, "newMessageIds": [9]},
                    {"type": "Fax", "updatedCount": 2, "newMessageIds": ["7", 7]},
                ]
            },
            "/restapi/v1.0/account/~/extension/406149828004/message-store",
            Hint("406149828004", ("7",), 2),
        ),
        (  # neither extensionId nor an id in the event: the envelope's ownerId
            {"changes": [{"type": "Fax"}]},
            "/restapi/v1.0/account/~/extension/~/message-store",
            Hint("2", (), 0),
        ),
        (  # fax?direction=Inbound: a full message record
            {
                "id": "1234",
                "type": "Fax",
                "direction": "Inbound",
                "messageStatus": "Received",
                "from": {"phoneNumber": "+15550001111"},
            },
            "/restapi/v1.0/account/~/extension/300/fax?direction=Inbound",
            Hint("300", ("1234",), 0),
        ),
        (
            {"id": 99, "type": "Fax", "extensionId": 301, "messageStatus": "Received"},
            "/restapi/v1.0/account/~/extension/~/fax?direction=Inbound",
            Hint("301", ("99",), 0),
        ),
    ],
)
def test_hints(body: dict[str, Any], event: str, hint: Hint) -> None:
    n = parse_frame(notification(body, event=event))
    assert isinstance(n, Notification)
    assert extract_hint(n) == hint


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"changes": [{"type": "SMS", "newCount": 1}]}, "other_type"),
        ({"changes": []}, "other_type"),
        ({"id": 5, "type": "SMS", "messageStatus": "Received"}, "other_type"),
        ({"changes": "Fax"}, "bad_body"),
        ({"changes": ["Fax"]}, "bad_body"),
        ({"changes": [{"type": "Fax", "newMessageIds": 5}]}, "bad_body"),
        ({"changes": [{"type": "Fax", "updatedCount": -1}]}, "bad_body"),
        ({"changes": [{"type": "Fax", "newMessageIds": [True]}]}, "bad_body"),
        ({"something": "else"}, "bad_body"),
        ("text", "bad_body"),
    ],
)
def test_hint_rejections(body: Any, reason: str) -> None:
    n = parse_frame(notification(body))
    assert isinstance(n, Notification)
    with pytest.raises(FrameError) as info:
        extract_hint(n)
    assert info.value.reason == reason


def test_no_extension_anywhere() -> None:
    n = Notification(
        "m",
        "s",
        "/restapi/v1.0/account/~/extension/~/message-store",
        None,
        None,
        {"changes": [{"type": "Fax"}]},
    )
    with pytest.raises(FrameError, match="extension"):
        extract_hint(n)


def test_encoders_round_trip() -> None:
    filters = event_filters(["200000001"])
    assert filters == [
        "/restapi/v1.0/account/~/extension/200000001/message-store?type=Fax",
        "/restapi/v1.0/account/~/extension/200000001/fax?direction=Inbound",
    ]
    assert json.loads(encode_subscribe("a", filters)) == [
        {"type": "ClientRequest", "messageId": "a", "method": "POST", "path": "/restapi/v1.0/subscription"},
        {"eventFilters": filters, "deliveryMode": {"transportType": "WebSocket"}},
    ]
    assert json.loads(encode_update("b", "S1", filters[:1]))[0]["path"] == "/restapi/v1.0/subscription/S1"
    assert json.loads(encode_unsubscribe("c", "S1")) == [
        {
            "type": "ClientRequest",
            "messageId": "c",
            "method": "DELETE",
            "path": "/restapi/v1.0/subscription/S1",
        }
    ]
    assert json.loads(encode_heartbeat("d")) == [{"type": "Heartbeat", "messageId": "d"}]
    assert parse_frame(encode_heartbeat("d")) == Heartbeat("d")
    with_headers = json.loads(encode_client_request("e", "GET", "/x", headers={"X": "1"}))
    assert with_headers == [
        {"type": "ClientRequest", "messageId": "e", "method": "GET", "path": "/x", "headers": {"X": "1"}}
    ]


def test_event_filters_dedup_and_order() -> None:
    assert len(event_filters(["1", "2", "1"])) == 4


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        ({"id": "S1"}, {}, "S1"),
        ({"id": 12}, {}, "12"),
        ({}, {"WSG-SubscriptionId": "S2"}, "S2"),
        (None, {}, None),
    ],
)
def test_subscription_id_of(body: Any, headers: dict[str, str], expected: str | None) -> None:
    r = ClientResponse("m", 200, headers, body)
    if expected is None:
        with pytest.raises(FrameError):
            subscription_id_of(r)
    else:
        assert subscription_id_of(r) == expected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"errors": [{"errorCode": "MSG-333"}], "errorCode": "X"}, "MSG-333"),
        ({"errorCode": "CMN-301"}, "CMN-301"),
        ({"error": "invalid_grant"}, "invalid_grant"),
        ({"errors": []}, None),
        ("nope", None),
    ],
)
def test_error_code_of(body: Any, code: str | None) -> None:
    assert error_code_of(body) == code


A1, A2, B5 = Wsc("a", 1), Wsc("a", 2), Wsc("b", 5)


@pytest.mark.parametrize(
    ("stored", "incoming", "from_details", "kept"),
    [
        (None, A1, False, A1),  # nothing stored
        (A1, None, False, A1),  # frame without wsc
        (A1, A2, False, A2),  # higher sequence
        (A2, A1, False, A2),  # older sequence ignored
        (B5, A1, True, A1),  # ConnectionDetails (fresh or recovered): the new context wins
        (B5, A1, False, B5),  # any other frame with a lower sequence
    ],
)
def test_newer_wsc(stored: Wsc | None, incoming: Wsc | None, from_details: bool, kept: Wsc | None) -> None:
    assert newer_wsc(stored, incoming, connection_details=from_details) == kept


def details(state: str | None = None, wsc: Wsc | None = A1, timeout: float = 180) -> ConnectionDetails:
    return ConnectionDetails("m", wsc, recovery_state=state, recovery_timeout=timeout)


def test_session_fresh_then_recovered() -> None:
    s = WsgSession()
    assert s.recovery_token(0) is None
    assert s.connected(details(), presented_wsc=False) is False  # fresh: subscribe
    s.subscription_id = "S1"
    s.frame(Heartbeat("h", A2))
    assert s.wsc == A2
    s.lost(100)
    s.lost(150)  # the window starts at the first loss
    assert s.recovery_token(279) == "a"
    assert s.connected(details("Successful", Wsc("a", 3)), presented_wsc=True) is True
    assert s.subscription_id == "S1"


def test_session_recovery_failed_or_window_passed() -> None:
    s = WsgSession(wsc=A1, recovery_timeout=30, subscription_id="S1")
    s.lost(0)
    assert s.recovery_token(29.9) == "a"
    assert s.recovery_token(30) is None  # too late: fresh session
    assert s.connected(details("Failed", B5), presented_wsc=True) is False
    assert s.subscription_id is None
    assert s.wsc == B5


def test_session_successful_without_subscription_resubscribes() -> None:
    s = WsgSession()
    s.connected(details(), presented_wsc=False)
    s.lost(1)
    assert s.connected(details("Successful"), presented_wsc=True) is False


def test_a_fresh_connect_takes_the_new_sessions_wsc_even_at_a_lower_sequence() -> None:
    s = WsgSession(wsc=B5, recovery_timeout=30, subscription_id="S1")
    s.lost(0)
    # The window passed: a fresh connect starts session "a" at sequence 1.
    assert s.recovery_token(31) is None
    assert s.connected(details(wsc=A1), presented_wsc=False) is False
    assert s.wsc == A1
    s.lost(40)
    assert s.recovery_token(41) == "a"  # not the dead session's "b"


def test_a_new_session_without_a_wsc_forgets_the_old_one() -> None:
    s = WsgSession(wsc=B5)
    s.connected(details(wsc=None), presented_wsc=False)
    assert s.wsc is None
    s.lost(0)
    assert s.recovery_token(1) is None


def test_session_forget() -> None:
    s = WsgSession(wsc=A1, subscription_id="S")
    s.forget()
    assert s.recovery_token(0) is None
    assert s.subscription_id is None


def test_disabled_filters_of_a_reply() -> None:
    body = {
        "id": "S",
        "disabledFilters": [
            {"filter": "/restapi/v1.0/account/1/extension/2/message-store", "reason": "R", "message": "M"},
            {"filter": "/restapi/v1.0/account/1/extension/3/fax?direction=Inbound"},  # reason missing
            {"reason": "no filter"},  # skipped
            "junk",
        ],
    }
    reply = ClientResponse("m", 200, {}, body)
    assert disabled_filters_of(reply) == [
        DisabledFilter("/restapi/v1.0/account/1/extension/2/message-store", "R", "M"),
        DisabledFilter("/restapi/v1.0/account/1/extension/3/fax?direction=Inbound", ""),
    ]
    assert disabled_filters_of(ClientResponse("m", 200, {}, {"id": "S"})) == []
    assert disabled_filters_of(ClientResponse("m", 200, {}, {"disabledFilters": {}})) == []


@pytest.mark.parametrize(
    ("event_filter", "key"),
    [
        ("/restapi/v1.0/account/~/extension/200/message-store?type=Fax", ("200", "message-store")),
        ("/restapi/v1.0/account/100/extension/200/fax?direction=Inbound", ("200", "fax")),
        ("/account/~/extension/~/message-store", ("9", "message-store")),  # ~ is the owner
        ("/restapi/v1.0/account/~/presence", None),
    ],
)
def test_filter_key(event_filter: str, key: tuple[str, str] | None) -> None:
    assert filter_key(event_filter, "9") == key
