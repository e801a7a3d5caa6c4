"""faxd.logs: one format for every logger, and no secret or PHI in the output."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from faxd.config import Secret
from faxd.logs import configure_logging, get_logger, redact

_TOUCHED_LOGGERS = ("aiohttp.access", "websockets")


@pytest.fixture(autouse=True)
def _reset_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in _TOUCHED_LOGGERS}
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def json_lines(
    stream: io.StringIO, *, level: str = "debug", redact_phi: bool = True
) -> tuple[structlog.stdlib.BoundLogger, Any]:
    configure_logging(level=level, fmt="json", redact_phi=redact_phi, stream=stream)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    return get_logger("faxd.test"), lines


def test_json_lines_carry_level_timestamp_event_and_logger() -> None:
    stream = io.StringIO()
    log, lines = json_lines(stream)
    log.info("started", extensions=2)
    log.warning("slow", seconds=1.5)
    first, second = lines()
    assert {k: first[k] for k in ("event", "level", "logger", "extensions")} == {
        "event": "started",
        "level": "info",
        "logger": "faxd.test",
        "extensions": 2,
    }
    assert second["level"] == "warning"
    stamp = datetime.fromisoformat(first["timestamp"])
    assert first["timestamp"].endswith("Z")
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_auto_format_is_json_when_not_a_tty() -> None:
    stream = io.StringIO()
    configure_logging(level="info", fmt="auto", redact_phi=True, stream=stream)
    get_logger("faxd.test").info("hello")
    assert json.loads(stream.getvalue())["event"] == "hello"


def test_level_filters_structlog_and_stdlib() -> None:
    stream = io.StringIO()
    configure_logging(level="warning", fmt="json", redact_phi=True, stream=stream)
    get_logger("faxd.test").info("dropped")
    logging.getLogger("aiohttp.client").info("dropped too")
    get_logger("faxd.test").error("kept")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["kept"]


def test_contextvars_are_merged() -> None:
    stream = io.StringIO()
    log, lines = json_lines(stream)
    structlog.contextvars.bind_contextvars(extension_id="12345")
    log.info("reconciling")
    assert lines()[0]["extension_id"] == "12345"


def test_stdlib_loggers_come_out_the_same_way_and_redacted() -> None:
    stream = io.StringIO()
    _, lines = json_lines(stream)
    logging.getLogger("websockets.client").warning(
        "connecting to %s", "wss://ws.example/ws?access_token=U0VDUkVU&wsc=abc123"
    )
    (line,) = lines()
    assert line["logger"] == "websockets.client"
    assert line["level"] == "warning"
    assert line["event"] == "connecting to wss://ws.example/ws?access_token=[REDACTED]&wsc=[REDACTED]"
    assert "timestamp" in line


def test_reconfiguring_does_not_duplicate_output() -> None:
    stream = io.StringIO()
    configure_logging(level="info", fmt="json", redact_phi=True, stream=stream)
    configure_logging(level="info", fmt="json", redact_phi=True, stream=stream)
    get_logger("faxd.test").info("once")
    assert len(stream.getvalue().splitlines()) == 1


def test_secrets_and_phi_are_redacted_in_output() -> None:
    stream = io.StringIO()
    log, lines = json_lines(stream)
    log.info(
        "token refreshed",
        access_token="at-123",
        refreshToken="rt-456",
        client_secret=Secret("cs-789"),
        headers={"Authorization": "Bearer at-123"},
        to=["+15551234567"],
        fax_id="3377552004",
    )
    text = stream.getvalue()
    for leaked in ("at-123", "rt-456", "cs-789", "+15551234567"):
        assert leaked not in text
    (line,) = lines()
    assert line["fax_id"] == "3377552004"  # ids are not phone numbers
    assert line["to"] == "[PHI]"


def test_phi_kept_when_redaction_is_off() -> None:
    stream = io.StringIO()
    log, lines = json_lines(stream, redact_phi=False)
    log.info("sent", to="+15551234567", jwt="eyJ.x.y")
    (line,) = lines()
    assert line["to"] == "+15551234567"
    assert line["jwt"] == "[REDACTED]"


def fail_with_secret_local() -> None:
    access_token = "local-token-value"  # noqa: F841 - a local that must not reach the logs
    raise RuntimeError("refresh failed for https://h/x?access_token=in-message")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exceptions_are_rendered_without_locals(fmt: str) -> None:
    stream = io.StringIO()
    configure_logging(level="info", fmt=fmt, redact_phi=True, stream=stream)
    try:
        fail_with_secret_local()
    except RuntimeError:
        get_logger("faxd.test").exception("auth failed")
    text = stream.getvalue()
    assert "RuntimeError" in text
    assert "fail_with_secret_local" in text  # frame names are not PHI
    assert "local-token-value" not in text
    assert "in-message" not in text
    if fmt == "json":
        (exception,) = json.loads(text)["exception"]
        assert all(frame.get("locals") is None for frame in exception["frames"])


def test_stdlib_exceptions_are_routed_too() -> None:
    stream = io.StringIO()
    configure_logging(level="info", fmt="json", redact_phi=True, stream=stream)
    try:
        fail_with_secret_local()
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    line = json.loads(stream.getvalue())
    assert line["logger"] == "asyncio"
    assert line["exception"][0]["exc_type"] == "RuntimeError"
    assert "local-token-value" not in stream.getvalue()


def test_console_format_is_readable_and_redacted() -> None:
    stream = io.StringIO()
    configure_logging(level="info", fmt="console", redact_phi=True, stream=stream)
    get_logger("faxd.test").info("fax sent", to="+15551234567", authorization="Basic dXNlcjpwYXNz")
    text = stream.getvalue()
    assert "fax sent" in text
    assert "\x1b[" not in text  # no colours when the stream is not a terminal
    assert "+15551234567" not in text
    assert "dXNlcjpwYXNz" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_access_log_quiet_unless_debug() -> None:
    stream = io.StringIO()
    configure_logging(level="info", fmt="json", redact_phi=True, stream=stream)
    logging.getLogger("aiohttp.access").info("GET /metrics 200")
    assert stream.getvalue() == ""
    configure_logging(level="debug", fmt="json", redact_phi=True, stream=stream)
    logging.getLogger("aiohttp.access").info("GET /metrics 200")
    assert json.loads(stream.getvalue())["event"] == "GET /metrics 200"


def test_websocket_frame_dumps_stay_out_of_debug_logs_with_phi_redaction() -> None:
    stream = io.StringIO()
    configure_logging(level="debug", fmt="json", redact_phi=True, stream=stream)
    logging.getLogger("websockets.client").debug('< TEXT \'{"to": "+1555"}\'')
    assert stream.getvalue() == ""
    configure_logging(level="debug", fmt="json", redact_phi=False, stream=stream)
    logging.getLogger("websockets.client").debug("< TEXT")
    assert json.loads(stream.getvalue())["event"] == "< TEXT"


# --- journald --------------------------------------------------------------------------------------


def journal_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, matching: bool = True) -> io.TextIOWrapper:
    stream = open(tmp_path / "journal", "w+", encoding="utf-8")  # noqa: SIM115 - closed by the test
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if matching else "1:1")
    return stream


def test_journald_gets_a_priority_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with journal_file(tmp_path, monkeypatch) as stream:
        configure_logging(level="debug", fmt="auto", redact_phi=True, stream=stream)
        log = get_logger("faxd.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        logging.getLogger("aiohttp.server").critical("c")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e", "c"]


def test_no_prefix_when_the_stream_is_not_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with journal_file(tmp_path, monkeypatch, matching=False) as stream:
        configure_logging(level="info", fmt="json", redact_phi=True, stream=stream)
        get_logger("faxd.test").info("plain")
        stream.seek(0)
        assert json.loads(stream.read())["event"] == "plain"


def test_no_prefix_on_console_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with journal_file(tmp_path, monkeypatch) as stream:
        configure_logging(level="info", fmt="console", redact_phi=True, stream=stream)
        get_logger("faxd.test").info("plain")
        stream.seek(0)
        assert not stream.read().startswith("<")


# --- the pure redaction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("token", "t", "[REDACTED]"),
        ("access_token", "t", "[REDACTED]"),
        ("accessToken", "t", "[REDACTED]"),
        ("refresh_token", "t", "[REDACTED]"),
        ("ws_access_token", "t", "[REDACTED]"),
        ("secret", "s", "[REDACTED]"),
        ("client_secret", "s", "[REDACTED]"),
        ("jwt", "j", "[REDACTED]"),
        ("assertion", "a", "[REDACTED]"),
        ("wsc", {"token": "w", "sequence": 1}, "[REDACTED]"),
        ("Authorization", "Bearer x", "[REDACTED]"),
        ("password", "p", "[REDACTED]"),
        ("phone", "+1555", "[PHI]"),
        ("phone_number", "+1555", "[PHI]"),
        ("phoneNumber", "+1555", "[PHI]"),
        ("number", "+1555", "[PHI]"),
        ("to", [{"phoneNumber": "+1555"}], "[PHI]"),
        ("from", {"phoneNumber": "+1555"}, "[PHI]"),
        ("name", "Jane Doe", "[PHI]"),
        ("subject", "lab results", "[PHI]"),
        ("cover_text", "hi", "[PHI]"),
        ("cover_page_text", "hi", "[PHI]"),
        ("coverPageText", "hi", "[PHI]"),
        ("caller", "+1555", "[PHI]"),
        ("fax_id", "3377552004", "3377552004"),
        ("seq", 124, 124),
        ("to_status", "Delivered", "Delivered"),
        ("sync_token", "st", "st"),
    ],
)
def test_redact_by_key(key: str, value: object, expected: object) -> None:
    assert {"event": "e", key: expected} == redact({"event": "e", key: value})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("wss://h/ws?access_token=abc.def&wsc=xyz", "wss://h/ws?access_token=[REDACTED]&wsc=[REDACTED]"),
        ("GET /x?token=abc#frag", "GET /x?token=[REDACTED]#frag"),
        ("refresh_token=r1 then", "refresh_token=[REDACTED] then"),
        ("grant_type=jwt&assertion=eyJa.b.c", "grant_type=jwt&assertion=[REDACTED]"),
        ("Authorization: Bearer U0VDUkVU", "Authorization: Bearer [REDACTED]"),
        ("authorization: basic dXNlcjpwYXNz", "authorization: basic [REDACTED]"),
        ('{"access_token": "abc", "expires_in": 3600}', '{"access_token": "[REDACTED]", "expires_in": 3600}'),
        ("jwt is eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOjF9.sig", "jwt is [REDACTED]"),
        ("message 3377552004 is Delivered", "message 3377552004 is Delivered"),
    ],
)
def test_redact_scrubs_free_text_everywhere(text: str, expected: str) -> None:
    out = redact({"event": text, "nested": {"items": [text, (text,)]}})
    assert expected == out["event"]
    assert {"items": [expected, [expected]]} == out["nested"]


def test_redact_is_recursive_and_pure() -> None:
    event = {"event": "x", "response": {"body": {"access_token": "a", "owner": {"phone": "+1"}}}}
    out = redact(event)
    assert out["response"] == {"body": {"access_token": "[REDACTED]", "owner": {"phone": "[PHI]"}}}
    assert event["response"]["body"]["access_token"] == "a"  # type: ignore[index]


def test_redact_without_phi_keeps_phi_but_not_secrets() -> None:
    out = redact({"event": "x", "to": "+1555", "jwt": "j", "url": "h?wsc=1"}, redact_phi=False)
    assert out == {"event": "x", "to": "+1555", "jwt": "[REDACTED]", "url": "h?wsc=[REDACTED]"}


def test_redact_scrubs_objects_whose_text_carries_a_token() -> None:
    class Url:
        def __str__(self) -> str:
            return "wss://h/?access_token=abc"

    plain = object()
    out = redact({"event": "x", "url": Url(), "other": plain})
    assert out["url"] == "wss://h/?access_token=[REDACTED]"
    assert out["other"] is plain
