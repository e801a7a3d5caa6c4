"""The pure codec of the socket protocol: request parsing, filters, encoders (no sockets, no loop)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from faxd.core.model import Event, EventKind, FaxState, RecipientState, Source, Transition
from faxd.core.protocol import (
    MAX_DEPTH,
    PHASE_MOVES,
    REQUEST_TYPES,
    ClientPhase,
    Document,
    ErrorCode,
    Filter,
    HistoryRequest,
    ListRequest,
    PhaseError,
    PingRequest,
    ProtocolError,
    QueryRequest,
    Recipient,
    Request,
    SendRequest,
    StatusRequest,
    StoredEvent,
    SubscribeRequest,
    SyncRequest,
    decode_object,
    encode_accepted,
    encode_bye,
    encode_caught_up,
    encode_error,
    encode_event,
    encode_fax,
    encode_faxes,
    encode_heartbeat,
    encode_hello,
    encode_history,
    encode_line,
    encode_ok,
    encode_pong,
    fax_to_wire,
    parse_request,
)


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


DOC = {"name": "a.pdf", "content_type": "application/pdf", "data": "JVBERi0="}
DOC_PARSED = Document("a.pdf", "application/pdf", b"%PDF-")


@pytest.mark.parametrize(
    ("request_obj", "expected"),
    [
        ({"type": "subscribe"}, SubscribeRequest()),
        (
            {"type": "subscribe", "after_seq": 0, "epoch": "e", "id": 4},
            SubscribeRequest(after_seq=0, epoch="e", id=4),
        ),
        (
            {
                "type": "subscribe",
                "after_seq": 12,
                "filter": {
                    "fax_ids": ["1", "2"],
                    "refs": ["r"],
                    "extensions": ["111"],
                    "directions": ["Outbound"],
                    "to_status": ["SendingFailed"],
                    "final_only": True,
                },
            },
            SubscribeRequest(
                after_seq=12,
                filter=Filter(
                    fax_ids=frozenset({"1", "2"}),
                    refs=frozenset({"r"}),
                    extensions=frozenset({"111"}),
                    directions=frozenset({"outbound"}),
                    to_status=frozenset({"sendingfailed"}),
                    final_only=True,
                ),
            ),
        ),
        ({"type": "subscribe", "filter": {}, "future_field": 1}, SubscribeRequest()),
        ({"type": "status", "fax_id": "123", "id": "q"}, StatusRequest(fax_id="123", id="q")),
        ({"type": "status", "ref": "order-1"}, StatusRequest(ref="order-1")),
        ({"type": "list"}, ListRequest(active_only=True)),
        ({"type": "list", "active_only": False}, ListRequest(active_only=False)),
        ({"type": "history", "fax_id": "9"}, HistoryRequest(fax_id="9")),
        ({"type": "sync"}, SyncRequest()),
        ({"type": "query"}, QueryRequest()),
        (
            {
                "type": "query",
                "since": "2026-11-01T01:00:00+01:00",
                "to": "+1 (650) 555-0001",
                "statuses": ["Sent"],
                "directions": ["Outbound"],
                "limit": 10,
                "include_numbers": True,
            },
            QueryRequest(
                since="2026-11-01T00:00:00.000Z",
                to="+16505550001",
                statuses=frozenset({"sent"}),
                directions=frozenset({"outbound"}),
                limit=10,
                include_numbers=True,
            ),
        ),
        ({"type": "ping", "id": 0}, PingRequest(id=0)),
        (
            {
                "type": "send",
                "to": [{"phone": "+15551230000"}, {"phone": "+15551230001"}],
                "documents": [DOC],
                "ref": "order-1",
                "cover_text": "Hello",
                "resolution": "High",
            },
            SendRequest(
                to=(Recipient("+15551230000"), Recipient("+15551230001")),
                documents=(Document("a.pdf", "application/pdf", b"%PDF-"),),
                ref="order-1",
                cover_text="Hello",
                resolution="High",
            ),
        ),
        (
            {"type": "send", "to": [{"phone": "+1555"}], "documents": [DOC], "cover_index": 0},
            SendRequest(to=(Recipient("+1555"),), documents=(DOC_PARSED,), cover_index=0),
        ),
        (
            {"type": "send", "to": [{"phone": "+1555"}], "documents": [DOC], "cover_index": 13},
            SendRequest(to=(Recipient("+1555"),), documents=(DOC_PARSED,), cover_index=13),
        ),
    ],
)
def test_parse_valid_requests(request_obj: dict[str, Any], expected: object) -> None:
    assert parse_request(line(request_obj)) == expected


def test_line_without_newline_and_with_crlf() -> None:
    assert parse_request(b'{"type":"ping"}') == PingRequest()
    assert parse_request(b'{"type":"ping"}\r\n') == PingRequest()


@pytest.mark.parametrize(
    ("raw", "fragment", "request_id"),
    [
        (b"", "empty", None),
        (b"   \n", "empty", None),
        (b"{nope\n", "invalid JSON", None),
        (b"\xc3\x28\n", "UTF-8", None),
        (b"[1]\n", "object", None),
        (b'"ping"\n', "object", None),
        (b'{"type":"ping","n":NaN}\n', "invalid JSON", None),
        (b'{"type":"ping","n":-Infinity}\n', "invalid JSON", None),
        (b'{"type":"ping","n":' + b"9" * 5000 + b"}\n", "invalid JSON", None),
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested", None),
        (line({"type": "ping", "x": [[[[[[1]]]]]]}), "nested", None),
        (b'{"id":1}\n', "type must be a string", 1),
        (line({"type": 5}), "type must be a string", None),
        (line({"type": "launch", "id": "a"}), "unknown request type", "a"),
        (line({"type": "ping", "id": True}), "id must be", None),
        (line({"type": "ping", "id": 1.5}), "id must be", None),
        (line({"type": "ping", "id": [1]}), "id must be", None),
        (line({"type": "subscribe", "after_seq": "5", "id": 2}), "after_seq must be an integer", 2),
        (line({"type": "subscribe", "after_seq": True}), "after_seq must be an integer", None),
        (line({"type": "subscribe", "after_seq": -1}), "negative", None),
        (line({"type": "subscribe", "epoch": 3}), "epoch must be a string", None),
        (line({"type": "subscribe", "filter": []}), "filter must be an object", None),
        (line({"type": "subscribe", "filter": {"fax_ids": "1"}}), "fax_ids must be a list", None),
        (line({"type": "subscribe", "filter": {"fax_ids": [1]}}), "fax_ids[] must be a string", None),
        (line({"type": "subscribe", "filter": {"final_only": "yes"}}), "final_only", None),
        (line({"type": "subscribe", "filter": {"refs": ["x"] * 1001}}), "more than", None),
        (line({"type": "status"}), "exactly one", None),
        (line({"type": "status", "fax_id": "1", "ref": "r"}), "exactly one", None),
        (line({"type": "status", "fax_id": ""}), "empty", None),
        (line({"type": "status", "fax_id": "x" * 300}), "longer than", None),
        (b'{"type":"status","ref":"\\ud800"}\n', "Unicode", None),
        (line({"type": "list", "active_only": 1}), "active_only", None),
        (line({"type": "history"}), "fax_id is required", None),
        (line({"type": "send", "documents": [DOC]}), "to must be a list", None),
        (line({"type": "send", "to": [], "documents": [DOC]}), "to must not be empty", None),
        (line({"type": "send", "to": ["+1555"], "documents": [DOC]}), "to[0] must be an object", None),
        (line({"type": "send", "to": [{"phone": 15551230000}], "documents": [DOC]}), "phone", None),
        (line({"type": "send", "to": [{"phone": "+1"}]}), "at least one document", None),
        (line({"type": "send", "to": [{"phone": "+1"}], "documents": {}}), "documents must be a list", None),
        (
            line({"type": "send", "to": [{"phone": "+1"}], "documents": [{**DOC, "data": "not base64!"}]}),
            "base64",
            None,
        ),
        (line({"type": "send", "to": [{"phone": "+1"}], "documents": [{**DOC, "data": ""}]}), "empty", None),
        (line({"type": "send", "to": [{"phone": "+1"}], "documents": [{**DOC, "data": 5}]}), "base64", None),
        (line({"type": "send", "to": [{"phone": "+1"}], "documents": [{**DOC, "name": None}]}), "name", None),
        (
            line({"type": "send", "to": [{"phone": "+1"}], "documents": [DOC], "resolution": "Ultra"}),
            "resolution",
            None,
        ),
        (
            line({"type": "send", "to": [{"phone": "+1"}], "documents": [DOC], "cover_text": 7}),
            "cover_text",
            None,
        ),
        # The spec's fax request requires an attachment: a cover page alone is no fax.
        (
            line({"type": "send", "to": [{"phone": "+1"}], "cover_text": "only"}),
            "documents is required",
            None,
        ),
        (
            line({"type": "send", "to": [{"phone": "+1"}], "documents": []}),
            "documents must not be empty",
            None,
        ),
        (
            line({"type": "send", "to": [{"phone": "+1"}], "documents": [DOC], "cover_index": -1}),
            "cover_index",
            None,
        ),
        (
            line({"type": "send", "to": [{"phone": "+1"}], "documents": [DOC], "cover_index": "1"}),
            "cover_index",
            None,
        ),
        (
            line({"type": "send", "to": [{"phone": "+1"}], "documents": [DOC], "cover_index": True}),
            "cover_index",
            None,
        ),
    ],
)
def test_parse_errors(raw: bytes, fragment: str, request_id: object) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(raw)
    assert info.value.code == "bad_request"
    assert fragment in info.value.message
    assert info.value.request_id == request_id


def test_depth_limit_allows_every_real_request() -> None:
    nested: Any = 1
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    assert decode_object(line({"x": nested}))["x"] == nested


def _event(**overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "kind": EventKind.RECIPIENT,
        "fax_id": "100",
        "extension_id": "111",
        "direction": "Outbound",
        "from_status": "Queued",
        "to_status": "SendingFailed",
        "final": True,
        "recipient_index": 1,
        "recipient_phone": "+15550001111",
        "error_code": "LineBusy",
        "error_category": "busy",
        "retryable": True,
        "ref": "order-1",
    }
    fields.update(overrides)
    return Event(17, "ep", Transition(**fields), "2026-01-02T03:04:05Z", Source.PUSH)


@pytest.mark.parametrize(
    ("flt", "matches"),
    [
        (Filter(), True),
        (Filter(fax_ids=frozenset({"100", "200"})), True),
        (Filter(fax_ids=frozenset({"200"})), False),
        (Filter(refs=frozenset({"order-1"})), True),
        (Filter(refs=frozenset({"order-2"})), False),
        (Filter(extensions=frozenset({"111"})), True),
        (Filter(extensions=frozenset({"222"})), False),
        (Filter(directions=frozenset({"outbound"})), True),
        (Filter(directions=frozenset({"inbound"})), False),
        (Filter(to_status=frozenset({"sendingfailed"})), True),
        (Filter(to_status=frozenset({"delivered"})), False),
        (Filter(final_only=True), True),
        (Filter(fax_ids=frozenset({"100"}), to_status=frozenset({"delivered"})), False),
    ],
)
def test_filter_matches_events_and_their_wire_form(flt: Filter, matches: bool) -> None:
    event = _event()
    assert flt.matches(event) is matches
    assert flt.matches(event.to_wire()) is matches


def test_filter_final_only_and_missing_fields() -> None:
    assert not Filter(final_only=True).matches(_event(final=False, to_status="Queued"))
    assert not Filter(refs=frozenset({"x"})).matches(_event(ref=None))
    assert not Filter(directions=frozenset({"outbound"})).matches({"type": "event"})
    assert Filter().matches({"type": "event"})


def test_parsed_filter_matches_case_insensitively() -> None:
    request = parse_request(
        line({"type": "subscribe", "filter": {"directions": ["OUTBOUND"], "to_status": ["sendingFAILED"]}})
    )
    assert isinstance(request, SubscribeRequest)
    assert request.filter.matches(_event())


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (encode_caught_up(5, "s"), {"type": "caught_up", "seq": 5, "id": "s"}),
        (encode_caught_up(5), {"type": "caught_up", "seq": 5}),
        (encode_heartbeat(9), {"type": "heartbeat", "head_seq": 9}),
        (encode_bye("shutdown"), {"type": "bye", "reason": "shutdown"}),
        (encode_pong(3), {"type": "pong", "id": 3}),
        (encode_ok(), {"type": "ok"}),
        (
            encode_error("slow_consumer", "too slow", resume_after_seq=12),
            {"type": "error", "code": "slow_consumer", "message": "too slow", "resume_after_seq": 12},
        ),
        (
            encode_error("upstream", "no", 7, rc_code=None),
            {"type": "error", "code": "upstream", "message": "no", "id": 7},
        ),
        (
            encode_accepted("55", None, "Queued", "x"),
            {"type": "accepted", "fax_id": "55", "ref": None, "status": "Queued", "id": "x"},
        ),
        (
            encode_hello(server="faxd/1", epoch="e", head_seq=4, oldest_seq=1, heartbeat_s=15, max_line=10),
            {
                "type": "hello",
                "proto": 1,
                "server": "faxd/1",
                "epoch": "e",
                "head_seq": 4,
                "oldest_seq": 1,
                "heartbeat_s": 15,
                "max_line": 10,
            },
        ),
    ],
)
def test_encoders_write_one_compact_line(encoded: bytes, expected: dict[str, Any]) -> None:
    assert encoded.endswith(b"\n")
    assert encoded.count(b"\n") == 1
    assert b", " not in encoded
    assert b": " not in encoded
    assert json.loads(encoded) == expected


def test_encoded_strings_stay_on_one_ascii_line() -> None:
    """Newlines and non-ASCII inside values are escaped: a frame can never be split."""
    encoded = encode_error("bad_request", "line\nbreak \u2028 é \ud800")
    assert encoded.count(b"\n") == 1
    assert encoded.isascii()
    assert json.loads(encoded)["message"] == "line\nbreak \u2028 é \ud800"


_texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "+15550001111", 'é\u2028\ud800\x00\n"\\/', "Queued", "order-1"]),
)
_opt_texts = st.none() | _texts


@st.composite
def _events(draw: st.DrawFn) -> Event:
    index = draw(st.none() | st.integers(0, 2**63))
    transition = Transition(
        kind=draw(st.sampled_from(EventKind)),
        fax_id=draw(_texts),
        extension_id=draw(_texts),
        direction=draw(_texts),
        from_status=draw(_opt_texts),
        to_status=draw(_texts),
        final=draw(st.booleans()),
        recipient_index=index,
        recipient_phone=draw(_opt_texts),
        error_code=draw(_opt_texts),
        error_category=draw(_opt_texts),
        retryable=draw(st.none() | st.booleans()),
        pages=draw(st.none() | st.integers(-(2**70), 2**70)),
        rc_modified=draw(_opt_texts),
        ref=draw(_opt_texts),
        attempt=draw(st.none() | st.integers(1, 2**31)),  # the resend policy's fields (send.retry)
        retry_at=draw(_opt_texts),
        gave_up=draw(_opt_texts),
    )
    seq = draw(st.integers(0, 2**63))
    return Event(seq, draw(_texts), transition, draw(_texts), draw(st.sampled_from(Source)))


@given(event=_events(), include_numbers=st.booleans())
def test_encode_event_writes_what_the_generic_encoder_writes(event: Event, include_numbers: bool) -> None:
    """encode_event formats the line itself (for speed); it must be the wire form, byte for byte."""
    encoded = encode_event(event, include_numbers=include_numbers)
    assert encoded == encode_line(event.to_wire(include_numbers=include_numbers))
    assert encoded.isascii()
    assert encoded.count(b"\n") == 1


def _stored(event: Event, order: list[str] | None = None) -> StoredEvent:
    """``event`` as the store reads it back: its transition as the journal's JSON text (Transition's
    fields in their order, compact), or with the keys in ``order``."""
    names = order or [f.name for f in dataclasses.fields(Transition)]
    fields = {name: getattr(event.transition, name) for name in names}
    fields["kind"] = event.transition.kind.value
    text = json.dumps(fields, separators=(",", ":"))
    return StoredEvent(event.seq, event.epoch, event.observed_at, event.source.value, text)


@given(event=_events(), include_numbers=st.booleans(), shuffle=st.randoms(use_true_random=False))
def test_a_stored_event_is_written_and_filtered_like_its_event(
    event: Event, include_numbers: bool, shuffle: random.Random
) -> None:
    """Spliced from the journal's JSON (or, in any other key order, decoded first): the same bytes,
    and the same filter verdicts, as the event it stands for."""
    names = [f.name for f in dataclasses.fields(Transition)]
    shuffle.shuffle(names)
    expected = encode_event(event, include_numbers=include_numbers)
    for stored in (_stored(event), _stored(event, names)):
        assert encode_event(stored, include_numbers=include_numbers) == expected
        t = event.transition
        for flt in (
            Filter(),
            Filter(fax_ids=frozenset({t.fax_id})),
            Filter(refs=frozenset({"order-1"})),
            Filter(extensions=frozenset({t.extension_id, "x"})),
            Filter(directions=frozenset({t.direction.casefold()})),
            Filter(to_status=frozenset({"queued"})),
            Filter(final_only=True),
        ):
            assert flt.matches(stored) is flt.matches(event), flt


def test_client_phases_move_only_forward() -> None:
    """One subscription per connection, replay before live, nothing after closed."""
    h, r, lv, c = ClientPhase.HANDSHAKE, ClientPhase.REPLAYING, ClientPhase.LIVE, ClientPhase.CLOSED
    allowed = {(h, r), (h, c), (r, lv), (r, c), (lv, c)}
    for start in ClientPhase:
        for to in ClientPhase:
            if (start, to) in allowed:
                assert start.move(to) is to
            else:
                with pytest.raises(PhaseError, match=f"from {start.value} to {to.value}"):
                    start.move(to)
    assert set(PHASE_MOVES) == set(ClientPhase)
    assert [p for p in ClientPhase if p.subscribed] == [r, lv]


STATE = FaxState(
    fax_id="100",
    extension_id="111",
    direction="Outbound",
    status="Queued",
    recipients=(
        RecipientState(0, "+15550001111", "Delivered"),
        RecipientState(1, "+15550002222", "Queued", None),
    ),
    pages=2,
    created="2026-01-02T03:04:05.000Z",
    rc_modified="2026-01-02T03:05:05.000Z",
    ref="order-1",
    from_phone="+15559990000",
)


def test_fax_to_wire() -> None:
    assert fax_to_wire(STATE, include_numbers=True) == {
        "fax_id": "100",
        "extension_id": "111",
        "direction": "Outbound",
        "status": "Queued",
        "availability": "Alive",
        "ref": "order-1",
        "pages": 2,
        "created": "2026-01-02T03:04:05.000Z",
        "rc_modified": "2026-01-02T03:05:05.000Z",
        "from_phone": "+15559990000",
        "in_flight": True,
        "final": False,
        "recipients": [
            {"index": 0, "phone": "+15550001111", "status": "Delivered", "error_code": None},
            {"index": 1, "phone": "+15550002222", "status": "Queued", "error_code": None},
        ],
    }


def test_fax_to_wire_without_numbers() -> None:
    wire = fax_to_wire(STATE, include_numbers=False)
    assert wire["from_phone"] is None
    assert [r["phone"] for r in wire["recipients"]] == [None, None]
    assert "+1555" not in json.dumps(wire)


def test_reply_encoders() -> None:
    assert json.loads(encode_fax(STATE, include_numbers=True, request_id=1)) == {
        "type": "fax",
        "fax": fax_to_wire(STATE, True),
        "id": 1,
    }
    assert json.loads(encode_faxes([STATE], 42, include_numbers=False)) == {
        "type": "faxes",
        "faxes": [fax_to_wire(STATE, False)],
        "head_seq": 42,
    }
    event = _event()
    assert json.loads(encode_history([event], include_numbers=False)) == {
        "type": "history",
        "events": [event.to_wire(include_numbers=False)],
    }
    assert json.loads(encode_event(event, include_numbers=True)) == event.to_wire()


# ------------------------------------------------------------------------------------------ fuzzing
#
# Bounded so that CI stays fast; ``HYPOTHESIS_PROFILE=long pytest tests/test_protocol.py
# tests/test_event_server.py -k fuzz`` runs many more examples by hand.

FUZZ_EXAMPLES = 20_000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 300
ERROR_CODES = frozenset(code.value for code in ErrorCode)
REQUEST_CLASSES = (
    SubscribeRequest, StatusRequest, ListRequest, QueryRequest, HistoryRequest, SendRequest, SyncRequest,
    PingRequest,
)  # fmt: skip

_FIELDS = (
    "type", "id", "after_seq", "epoch", "filter", "fax_id", "ref", "active_only", "to", "documents",
    "cover_text", "resolution", "cover_index", "fax_ids", "refs", "extensions", "directions", "to_status",
    "final_only", "phone", "name", "content_type", "data",
)  # fmt: skip
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from([*REQUEST_TYPES, "High", "Low", "", "+15551230000", "QUJD", "@@", "\ud800"]),
)
_keys = st.one_of(st.sampled_from(_FIELDS), st.text(max_size=8))
_json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=20,
)


@st.composite
def _request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Objects shaped like requests: a (usually) known type and known field names with any values."""
    obj = draw(st.dictionaries(_keys, _json_values, max_size=6))
    if draw(st.booleans()):
        obj["type"] = draw(st.one_of(st.sampled_from(REQUEST_TYPES), _scalars))
    return obj


@st.composite
def _json_lines(draw: st.DrawFn) -> bytes:
    value = draw(st.one_of(_request_objects(), _json_values))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    mutation = draw(st.sampled_from(["none", "none", "truncate", "splice", "nest"]))
    if mutation == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif mutation == "splice" and text:
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from(['"', "{", "]", ",", ":", "\\", "\x00", "NaN", "1e999"]))
            + text[at:]
        )
    elif mutation == "nest":
        depth = draw(st.integers(1, 3000))
        text = "[" * depth + text + "]" * draw(st.integers(0, depth))
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate with ensure_ascii=False
        data = text.encode("utf-8", "surrogatepass")
    return data


def request_lines() -> st.SearchStrategy[bytes]:
    """One request line (no inner newline, ending in ``\\n``): JSON-ish, or arbitrary bytes."""
    return st.one_of(_json_lines(), _json_lines(), st.binary(max_size=200)).map(
        lambda data: data.replace(b"\n", b" ") + b"\n"
    )


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=request_lines())
def test_fuzz_parse_request_returns_a_request_or_a_protocol_error(raw: bytes) -> None:
    """Whatever the line, parse_request gives a typed request or a ProtocolError with a known code."""
    outcome: Request | ProtocolError
    try:
        outcome = parse_request(raw)
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert outcome.code in ERROR_CODES
        assert outcome.message
        assert outcome.request_id is None or isinstance(outcome.request_id, str | int)
        # The reply must be encodable whatever the line contained.
        error = json.loads(encode_error(outcome.code, outcome.message, outcome.request_id))
        assert error["type"] == "error"
    else:
        assert isinstance(outcome, REQUEST_CLASSES)
        assert outcome.id is None or isinstance(outcome.id, str | int)
        assert json.loads(encode_pong(outcome.id))["type"] == "pong"
