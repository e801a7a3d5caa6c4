"""Fuzz (hypothesis) of every parser that reads bytes other programs wrote.

* the WSG frame codec: :func:`parse_frame` then :func:`extract_hint` — every input is a frame (a hint) or a
  :class:`FrameError` whose ``reason`` is in :data:`FRAME_ERROR_REASONS`;
* the REST body parsers: :func:`parse_multipart` on any bytes and boundary (parts or ``ValueError``), the
  bulk GET body reader (every well-formed body, built with the entries it holds, is read back exactly;
  garbled bodies and any bytes give entries or ``ValueError``), the JSON helpers (never raise), and
  message records through :func:`apply_record` (a ``FaxState``, None, or :class:`RecordError`; a state
  then diffs cleanly);
* the socket request parser: :func:`parse_request` — a request or :class:`ProtocolError` ``bad_request``.

No other exception may escape. Example counts are bounded for CI (profile ``ci``, the default);
``HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/test_fuzz.py`` runs many more by hand.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
from typing import Any

from hypothesis import HealthCheck, assume, given, settings, strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from faxd.adapters.rest import (
    _bulk_entries,
    _maybe_json,
    _message_of,
    _number,
    _part_json,
    _Response,
    parse_multipart,
)
from faxd.core.model import FaxState, RecipientState
from faxd.core.protocol import (
    ErrorCode,
    HistoryRequest,
    ListRequest,
    PingRequest,
    ProtocolError,
    QueryRequest,
    Request,
    SendRequest,
    StatusRequest,
    SubscribeRequest,
    SyncRequest,
    parse_request,
)
from faxd.core.status import RecordError, apply_record, diff
from faxd.core.wsg import (
    FRAME_ERROR_REASONS,
    ClientResponse,
    ConnectionDetails,
    ErrorFrame,
    Frame,
    FrameError,
    Heartbeat,
    Hint,
    Notification,
    error_code_of,
    extract_hint,
    parse_frame,
)

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ----------------------------------------------------------------------------------------- strategies

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the plausible value, sometimes any JSON value."""
    return st.one_of(strategy, strategy, strategy, json_values)


ids = _or_junk(
    st.integers(min_value=0, max_value=10**15) | st.from_regex(r"\A ?[0-9]{1,12} ?\Z") | st.just("")
)
statuses = _or_junk(
    st.sampled_from(["Queued", "Sent", "Delivered", "DeliveryFailed", "SendingFailed", "Received"])
)
msg_types = _or_junk(st.sampled_from(["Fax", "SMS", "VoiceMail", "Pager"]))
timestamps = _or_junk(
    st.tuples(st.datetimes(), st.sampled_from(["Z", "+00:00", "-07:30", "+14:00", ""])).map(
        lambda d: d[0].isoformat() + d[1]
    )
    | st.sampled_from(
        ["2024-05-01T10:00:00.000Z", "2024-05-01T10:00:01Z", "0001-01-01T00:00:00+14:00", "bad"]
    )
)


def _fixed(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(required, optional=optional)


wsc = _or_junk(_fixed({"token": st.text(max_size=10), "sequence": st.integers() | st.text(max_size=6)}, {}))
meta = _fixed(
    {
        "type": _or_junk(
            st.sampled_from(
                ["ConnectionDetails", "ClientRequest", "ServerNotification", "Heartbeat", "Error", "Other"]
            )
        )
    },
    {
        "messageId": _or_junk(st.text(max_size=10)),
        "status": _or_junk(st.integers(100, 599)),
        "headers": _or_junk(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        "wsc": wsc,
        "errorCode": _or_junk(st.text(max_size=8)),
    },
)
change = _or_junk(
    _fixed(
        {"type": msg_types},
        {
            "newCount": _or_junk(st.integers(0, 5)),
            "updatedCount": _or_junk(st.integers(-2, 5)),
            "newMessageIds": _or_junk(st.lists(ids, max_size=4)),
        },
    )
)
event_paths = _or_junk(
    st.sampled_from(
        [
            "/restapi/v1.0/account/100000001/extension/200000001/message-store?type=Fax",
            "/restapi/v1.0/account/~/extension/~/message-store",
            "/restapi/v1.0/account/1/extension/2/fax?direction=Inbound",
            "/restapi/v1.0/account/1/extension//x",
        ]
    )
)
inner_body = _or_junk(
    _fixed({"changes": _or_junk(st.lists(change, max_size=3))}, {"extensionId": ids, "ownerId": ids})
    | _fixed({"id": ids}, {"type": msg_types, "messageStatus": statuses, "extensionId": ids})
)
envelope = _or_junk(
    _fixed(
        {"event": event_paths},
        {"uuid": _or_junk(st.text(max_size=8)), "subscriptionId": ids, "ownerId": ids, "body": inner_body},
    )
)
details = _or_junk(
    st.fixed_dictionaries(
        {},
        optional={
            k: _or_junk(st.integers(0, 10**6) | st.floats())
            for k in (
                "recoveryTimeout",
                "idleTimeout",
                "absoluteTimeout",
                "recoveryBufferSize",
                "maxActiveRequests",
            )
        }
        | {"recoveryState": _or_junk(st.sampled_from(["Successful", "Failed"])), "recoveryErrorCode": ids},
    )
)
frames = st.one_of(
    st.tuples(meta).map(list),
    st.tuples(meta, st.one_of(envelope, details, json_values)).map(list),
    json_values,
)


@st.composite
def mutated_json(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> str:
    """JSON text of a drawn value, sometimes cut short or with a few characters spliced in."""
    text = json.dumps(draw(values))
    action = draw(st.sampled_from(["keep", "keep", "cut", "splice"]))
    if action == "cut" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif action == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet='[]{}",:0123456789e-tfnu \\\ud800', max_size=4)) + text[at:]
    return text


# ----------------------------------------------------------------------------------------- WSG codec


def _is_str(value: object) -> bool:
    """A runtime type check the type checker cannot call redundant."""
    return isinstance(value, str)


def _frame(data: str | bytes, max_bytes: int | None) -> Frame | str:
    """The frame, or the reason of the FrameError; any other exception escapes (and fails the test)."""
    try:
        return parse_frame(data, max_bytes=max_bytes)
    except FrameError as exc:
        return exc.reason


def _hint(frame: Notification) -> Hint | str:
    try:
        return extract_hint(frame)
    except FrameError as exc:
        return exc.reason


def _check_frame(data: str | bytes, max_bytes: int | None = None) -> None:
    frame = _frame(data, max_bytes)
    if isinstance(frame, str):
        assert frame in FRAME_ERROR_REASONS
        return
    assert isinstance(frame, ConnectionDetails | ClientResponse | Notification | Heartbeat | ErrorFrame)
    if not isinstance(frame, Notification):
        return
    hint = _hint(frame)
    if isinstance(hint, str):
        assert hint in FRAME_ERROR_REASONS
        return
    assert isinstance(hint.extension_id, str)
    assert hint.extension_id
    assert all(_is_str(i) and i for i in hint.new_ids)
    assert isinstance(hint.updated, int)
    assert hint.updated >= 0


@FUZZ
@given(st.text() | st.binary())
def test_frame_codec_any_input(data: str | bytes) -> None:
    _check_frame(data)


@FUZZ
@given(mutated_json(frames), st.one_of(st.none(), st.integers(0, 400)))
def test_frame_codec_frame_shaped(text: str, max_bytes: int | None) -> None:
    _check_frame(text, max_bytes)
    _check_frame(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.integers(1, 200_000), st.sampled_from(["[", '{"a":', '[{"type":"Error"},']))
def test_frame_codec_deep_nesting(depth: int, opener: str) -> None:
    _check_frame(opener * depth)


def test_frame_codec_known_crashes() -> None:
    """Inputs that once escaped as other exceptions (found by this fuzz)."""
    for data in (
        "\ud800",  # a lone surrogate: could not be measured
        "[" * 100_000,  # RecursionError in the JSON scanner
        '[{"type":"ConnectionDetails"},{"recoveryBufferSize":1e999}]',  # int(inf)
        '[{"type":"ConnectionDetails"},{"maxActiveRequests":NaN}]',  # int(nan)
        '[{"type":"ConnectionDetails"},{"idleTimeout":1' + "0" * 400 + "}]",  # float() overflow
        '[{"type":"ServerNotification"},{"event":"/x","body":{"id":null,"type":"Fax"}}]',  # assert
    ):
        _check_frame(data)


# ----------------------------------------------------------------------------------------- REST bodies

boundaries = st.text(min_size=0, max_size=12) | st.from_regex(r"\A[A-Za-z0-9'()+_,./:=?-]{1,20}\Z")


@FUZZ
@given(st.binary(max_size=400), boundaries)
def test_parse_multipart_any_bytes(body: bytes, boundary: str) -> None:
    try:
        parts = parse_multipart(body, boundary)
    except ValueError:
        return
    for headers, payload in parts:
        assert isinstance(payload, bytes)
        assert all(_is_str(k) and _is_str(v) for k, v in headers.items())


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str, list[bytes]]:
    boundary = draw(st.from_regex(r"\A[A-Za-z0-9_-]{1,30}\Z"))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    payloads = [json.dumps(v).encode() for v in draw(st.lists(json_values, max_size=4))]
    delim = b"--" + boundary.encode()
    assume(all(delim not in p for p in payloads))
    out = draw(st.sampled_from([b"", b"preamble" + eol]))
    for p in payloads:
        out += delim + eol + b"Content-Type: application/json" + eol + eol + p + eol
    if draw(st.booleans()):
        out += delim + b"--" + eol
    return out, boundary, payloads


@FUZZ
@given(multipart_bodies())
def test_parse_multipart_round_trip(case: tuple[bytes, str, list[bytes]]) -> None:
    body, boundary, payloads = case
    if not payloads:
        with contextlib.suppress(ValueError):
            assert parse_multipart(body, boundary) == []
        return
    parts = parse_multipart(body, boundary)
    assert [p for _, p in parts] == payloads
    assert all(h == {"content-type": "application/json"} for h, _ in parts)


def _response(content_type: str, body: bytes, status: int = 207) -> _Response:
    return _Response(status, CIMultiDictProxy(CIMultiDict({"Content-Type": content_type})), body)


bulk_status = _or_junk(
    _fixed(
        {"status": _or_junk(st.sampled_from([200, 404, 503]))},
        {
            "href": _or_junk(
                st.text("0123456789", max_size=4).map(
                    lambda n: "https://x/restapi/v1.0/account/1/extension/2/message-store/" + n
                )
            )
        },
    )
)


@st.composite
def garbled_bulk_bodies(draw: st.DrawFn) -> _Response:
    """Bulk bodies of either form with junk in them: any field may be any JSON value, any part cut short."""
    if draw(st.booleans()):  # multipart/mixed
        boundary = draw(st.from_regex(r"\A[A-Za-z0-9]{1,16}\Z"))
        head = json.dumps({"response": draw(_or_junk(st.lists(bulk_status, max_size=4)))})
        parts = [head] + [draw(mutated_json(json_values)) for _ in range(draw(st.integers(0, 4)))]
        body = "".join(f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{p}\r\n" for p in parts)
        body += draw(st.sampled_from([f"--{boundary}--\r\n", ""]))
        ctype = draw(
            st.sampled_from(
                [
                    f"multipart/mixed; boundary={boundary}",
                    f'multipart/mixed; boundary="{boundary}"',
                    "multipart/mixed",
                ]
            )
        )
        return _response(ctype, body.encode("utf-8", "surrogatepass"))
    entry = _or_junk(
        _fixed({"status": _or_junk(st.sampled_from([200, 404]))}, {"resourceId": ids, "body": json_values})
    )
    doc = draw(_or_junk(st.lists(entry, max_size=4) | _fixed({"response": st.lists(entry, max_size=4)}, {})))
    text = draw(mutated_json(st.just(doc)))
    return _response("application/vnd.ringcentral.multipart+json", text.encode("utf-8", "surrogatepass"))


#: JSON values that survive a round trip through text unchanged (NaN is not equal to itself).
finite_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
Entry = tuple[int, str | None, Any]


@st.composite
def well_formed_bulk_bodies(draw: st.DrawFn) -> tuple[_Response, list[Entry]]:
    """A 207 body in either form RingCentral writes, and the (status, id, body) entries it holds."""
    n = draw(st.integers(1, 5))
    statuses = draw(
        st.lists(st.sampled_from([200, 404, 503]) | st.integers(100, 599), min_size=n, max_size=n)
    )
    rids = draw(st.lists(st.none() | st.from_regex(r"\A[0-9]{1,15}\Z"), min_size=n, max_size=n))
    bodies = draw(st.lists(finite_json_values, min_size=n, max_size=n))
    expected = list(zip(statuses, rids, bodies, strict=True))
    if draw(st.booleans()):  # multipart/mixed: a status part, then one part per id
        quoted = draw(st.booleans())
        boundary = draw(
            st.from_regex(r"\A[A-Za-z0-9'()+_,./:=?-]{1,40}\Z" if quoted else r"\A[A-Za-z0-9_.-]{1,40}\Z")
        )
        eol = draw(st.sampled_from(["\r\n", "\n"]))
        head = {
            "response": [
                {"status": status}
                | (
                    {}
                    if rid is None
                    else {"href": f"https://x/restapi/v1.0/account/1/extension/2/message-store/{rid}"}
                )
                for status, rid in zip(statuses, rids, strict=True)
            ]
        }
        parts = [json.dumps(head)] + [json.dumps(b) for b in bodies]
        delimiter = f"--{boundary}"
        assume(all(delimiter not in p for p in parts))
        body = draw(st.sampled_from(["", f"preamble{eol}"]))
        body += "".join(f"{delimiter}{eol}Content-Type: application/json{eol}{eol}{p}{eol}" for p in parts)
        body += draw(st.sampled_from([f"{delimiter}--{eol}", ""]))
        value = f'"{boundary}"' if quoted else boundary
        ctype = draw(
            st.sampled_from([f"multipart/mixed; boundary={value}", f"Multipart/Mixed;boundary={value}; x=y"])
        )
        return _response(ctype, body.encode()), expected
    # The JSON form (Accept: application/vnd.ringcentral.multipart+json), or a plain array.
    entries: list[dict[str, Any]] = []
    read: list[Entry] = []
    for status, rid, b in expected:
        entry: dict[str, Any] = {"status": status, "body": b}
        if rid is not None and draw(st.booleans()):
            rid = str(int(rid))  # a number in the JSON: read as its decimal text
            entry["resourceId"] = int(rid)
        elif rid is not None:
            entry["resourceId"] = rid
        entries.append(entry)
        read.append((status, rid, b))
    doc: Any = {"response": entries} if draw(st.booleans()) else entries
    ctype = draw(st.sampled_from(["application/vnd.ringcentral.multipart+json", "application/json"]))
    return _response(ctype, json.dumps(doc).encode()), read


def _check_bulk(resp: _Response) -> None:
    """Garbage may be refused with ValueError and nothing else; what is read is well typed."""
    try:
        entries = _bulk_entries(resp)
    except ValueError:
        return
    for status, rid, _body in entries:
        assert type(status) is int
        assert rid is None or isinstance(rid, str)


@FUZZ
@given(well_formed_bulk_bodies())
def test_bulk_body_reader_reads_every_well_formed_body(case: tuple[_Response, list[Entry]]) -> None:
    """No ValueError here: a reader that refused good bodies would pass the garbage properties."""
    resp, expected = case
    assert _bulk_entries(resp) == expected


@FUZZ
@given(garbled_bulk_bodies())
def test_bulk_body_reader_garbled(resp: _Response) -> None:
    _check_bulk(resp)


@FUZZ
@given(
    st.binary(max_size=300),
    st.sampled_from(["multipart/mixed; boundary=b", "application/json", "text/html", ""]),
)
def test_bulk_body_reader_any_bytes(body: bytes, ctype: str) -> None:
    _check_bulk(_response(ctype, body))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated_json(json_values).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.integers(1, 100_000).map(lambda n: b"[" * n),
    )
)
def test_json_body_helpers(body: bytes) -> None:
    """What the REST client does with any response body: parse or give None, and read error fields."""
    value = _maybe_json(_response("application/json", body, 400))
    assert value == _part_json(body) or value != value  # NaN is not equal to itself
    assert isinstance(_message_of(value), str)
    code = error_code_of(value)
    assert code is None or isinstance(code, str)
    assert isinstance(_number(value, 1.0), float)


@FUZZ
@given(json_values | st.integers() | st.integers(10**300, 10**1000) | st.text(max_size=12))
def test_number_helper(value: Any) -> None:
    """``expires_in``, ``Retry-After``: a finite float or the default, whatever RingCentral sent."""
    number = _number(value, 7.0)
    assert isinstance(number, float)
    assert math.isfinite(number)


# ----------------------------------------------------------------------------------------- records


recipients_entry = _or_junk(
    st.fixed_dictionaries(
        {},
        optional={
            "phoneNumber": _or_junk(st.text(max_size=12)),
            "messageStatus": statuses,
            "faxErrorCode": _or_junk(st.sampled_from(["LineBusy", "NoAnswer", "Weird"])),
        },
    )
)
records = _or_junk(
    st.fixed_dictionaries(
        {"id": ids},
        optional={
            "type": msg_types,
            "messageStatus": statuses,
            "direction": _or_junk(st.sampled_from(["Outbound", "Inbound"])),
            "availability": _or_junk(st.sampled_from(["Alive", "Deleted", "Purged"])),
            "to": _or_junk(st.lists(recipients_entry, max_size=3)),
            "from": _or_junk(
                st.fixed_dictionaries({}, optional={"phoneNumber": _or_junk(st.text(max_size=12))})
            ),
            "faxPageCount": _or_junk(st.integers(0, 50)),
            "lastModifiedTime": timestamps,
            "creationTime": timestamps,
            "extensionId": ids,
        },
    )
)
old_states = st.none() | st.builds(
    FaxState,
    fax_id=st.just("1"),
    extension_id=st.just("200000001"),
    direction=st.sampled_from(["Outbound", "Inbound"]),
    status=st.sampled_from(["Queued", "Sent", "SendingFailed"]),
    availability=st.sampled_from(["Alive", "Deleted"]),
    recipients=st.lists(
        st.builds(
            RecipientState,
            index=st.integers(0, 3),
            phone=st.none() | st.text(max_size=5),
            status=st.sampled_from(["Queued", "Sent"]),
        ),
        max_size=3,
    ).map(tuple),
    rc_modified=st.none() | st.sampled_from(["2024-05-01T10:00:00.000Z", "garbage"]),
)


@FUZZ
@given(old_states, records)
def test_records_into_apply_record(old: FaxState | None, record: Any) -> None:
    try:
        new = apply_record(old, record, extension_id="200000001")
    except RecordError as exc:
        reason = str(exc)
        assert reason, "a RecordError must say why"
        return
    if new is None:
        return
    assert isinstance(new, FaxState)
    for name in ("fax_id", "extension_id", "direction", "status", "availability"):
        assert isinstance(getattr(new, name), str)
    assert all(isinstance(r.status, str) for r in new.recipients)
    diff(old, new)
    diff(old, new, settle=True)


# ----------------------------------------------------------------------------------------- socket requests

_REQUEST_TYPES = (
    SubscribeRequest,
    StatusRequest,
    ListRequest,
    QueryRequest,
    HistoryRequest,
    SendRequest,
    SyncRequest,
    PingRequest,
)
string_lists = _or_junk(st.lists(_or_junk(st.text(max_size=8)), max_size=3))
requests = _or_junk(
    st.fixed_dictionaries(
        {
            "type": _or_junk(
                st.sampled_from(
                    ["subscribe", "status", "list", "query", "history", "send", "sync", "ping", "nope"]
                )
            )
        },
        optional={
            "id": _or_junk(st.integers() | st.text(max_size=8)),
            "after_seq": _or_junk(st.integers(-3, 10**20)),
            "epoch": _or_junk(st.text(max_size=8)),
            "filter": _or_junk(
                st.fixed_dictionaries(
                    {},
                    optional=dict.fromkeys(
                        ("fax_ids", "refs", "extensions", "directions", "to_status"), string_lists
                    )
                    | {"final_only": _or_junk(st.booleans())},
                )
            ),
            "fax_id": _or_junk(st.text(max_size=8)),
            "ref": _or_junk(st.text(max_size=8)),
            "active_only": _or_junk(st.booleans()),
            "to": _or_junk(
                st.lists(
                    _or_junk(st.fixed_dictionaries({"phone": _or_junk(st.text(max_size=12))})), max_size=3
                )
            ),
            "documents": _or_junk(
                st.lists(
                    _or_junk(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "name": _or_junk(st.text(max_size=8)),
                                "content_type": _or_junk(st.just("application/pdf")),
                                "data": _or_junk(
                                    st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode())
                                    | st.text(max_size=8)
                                ),
                            },
                        )
                    ),
                    max_size=2,
                )
            ),
            "cover_text": _or_junk(st.text(max_size=20)),
            "resolution": _or_junk(st.sampled_from(["High", "Low"])),
            "cover_index": _or_junk(st.integers(min_value=0, max_value=13)),
            # query
            "since": _or_junk(st.sampled_from(["2026-11-01T00:00:00Z", "0001-01-01T00:00:00+05:00", "24h"])),
            "until": _or_junk(st.sampled_from(["2026-11-02T00:00:00.5+01:00", "9999-12-31T23:59:59-05:00"])),
            "after": _or_junk(st.sampled_from(["2461345.5~7001", "~", "inf~1", "1e400~x"])),
            "limit": _or_junk(st.integers(-1, 1001)),
            "statuses": string_lists,
            "include_numbers": _or_junk(st.booleans()),
        },
    )
)


def _check_request(line: bytes) -> None:
    try:
        request: Request | ProtocolError = parse_request(line)
    except ProtocolError as exc:
        request = exc
    if isinstance(request, ProtocolError):
        assert request.code == ErrorCode.BAD_REQUEST
        assert request.message
    else:
        assert isinstance(request, _REQUEST_TYPES)


@FUZZ
@given(st.binary(max_size=300))
def test_request_parser_any_bytes(line: bytes) -> None:
    _check_request(line)


@FUZZ
@given(mutated_json(requests), st.sampled_from([b"", b"\n", b"\r\n"]))
def test_request_parser_request_shaped(text: str, end: bytes) -> None:
    _check_request(text.encode("utf-8", "surrogatepass") + end)


@FUZZ
@given(st.integers(1, 200_000), st.sampled_from([b"[", b'{"a":', b'{"type":"ping","x":[']))
def test_request_parser_deep_nesting(depth: int, opener: bytes) -> None:
    _check_request(opener * depth)
