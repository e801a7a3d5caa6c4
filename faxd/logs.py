"""Logging of faxd: structlog set up once, for faxd's own loggers and the stdlib ones alike.

`configure_logging` sends every record (structlog, aiohttp, websockets, asyncio) through one stdlib
handler whose `ProcessorFormatter` adds level and UTC timestamp, renders exceptions without local
variables, redacts, and writes JSON lines (with a `<N>` syslog priority prefix when the stream is
journald's) or readable console lines on a TTY. `redact` is the redaction as a pure function.

This module must not let a credential or, with `redact_phi`, PHI reach the output: redaction is the
last step before rendering, and exceptions never carry locals. It holds no other policy and starts
nothing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["configure_logging", "get_logger", "redact"]

SECRET_KEYS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "ws_access_token",
        "id_token",
        "secret",
        "client_secret",
        "jwt",
        "assertion",
        "wsc",
        "authorization",
        "proxy_authorization",
        "password",
        "cookie",
        "set_cookie",
    }
)
PHI_KEYS = frozenset(
    {
        "phone",
        "phone_number",
        "phone_numbers",
        "fax_number",
        "number",
        "to",
        "from",
        "name",
        "subject",
        "cover_text",
        "cover_page_text",
        "caller",
    }
)
_QUERY_SECRET_RE = re.compile(
    r"(?i)\b(access_token|refresh_token|token|wsc|assertion|client_secret|password|code)=[^&\s\"'#]+"
)
_JSON_SECRET_RE = re.compile(
    r"(?i)(\"(?:access_token|refresh_token|token|wsc|assertion|client_secret|password|jwt)\"\s*:\s*)"
    r"\"[^\"]*\""
)
_AUTH_RE = re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+")
_JWT_RE = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SYSLOG_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}
_MAX_DEPTH = 16


def _normal_key(key: object) -> str:
    """accessToken, Access-Token and access_token all become access_token."""
    return _CAMEL_RE.sub("_", str(key)).replace("-", "_").lower()


def scrub(text: str) -> str:
    """Free text with URL query secrets, JSON token fields, auth header values and JWTs masked."""
    text = _QUERY_SECRET_RE.sub(r"\1=[REDACTED]", text)
    text = _JSON_SECRET_RE.sub(r'\1"[REDACTED]"', text)
    text = _AUTH_RE.sub(r"\1 [REDACTED]", text)
    return _JWT_RE.sub("[REDACTED]", text)


def _redact_value(value: Any, redact_phi: bool, depth: int) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if depth > _MAX_DEPTH or value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return _redact_mapping(value, redact_phi, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, redact_phi, depth + 1) for v in value]
    text = str(value)  # e.g. a yarl.URL carrying ?access_token=
    scrubbed = scrub(text)
    return value if scrubbed == text else scrubbed


def _redact_mapping(mapping: Mapping[Any, Any], redact_phi: bool, depth: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in mapping.items():
        name = _normal_key(key)
        if depth == 0 and key == "exception":  # a structured traceback: frame "name"s are not PHI
            out[key] = _redact_value(value, False, depth)
        elif name in SECRET_KEYS:
            out[key] = "[REDACTED]"
        elif redact_phi and (name in PHI_KEYS or name.startswith("phone")):
            out[key] = "[PHI]"
        else:
            out[key] = _redact_value(value, redact_phi, depth)
    return out


def redact(event_dict: Mapping[str, Any], redact_phi: bool = True) -> dict[str, Any]:
    """A copy of `event_dict` with secrets (and PHI) masked by key, recursively, and free text scrubbed.

    Keys are compared case- and style-insensitively (accessToken == access_token). The event text itself
    is only scrubbed, never replaced.
    """
    return _redact_mapping(event_dict, redact_phi, 0)


class _Redactor:
    """The processor form of `redact`."""

    def __init__(self, redact_phi: bool) -> None:
        self.redact_phi = redact_phi

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        return redact(event_dict, self.redact_phi)


class _JournalPrefix:
    """Wraps a renderer: "<6>{...}" so journald takes the priority from the line (SyslogLevelPrefix=)."""

    def __init__(self, renderer: Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        priority = _SYSLOG_PRIORITY.get(str(event_dict.get("level", method)), 6)
        line = self.renderer(logger, method, event_dict)
        return f"<{priority}>{line.decode() if isinstance(line, bytes) else line}"


def _is_journal(stream: TextIO) -> bool:
    """True if `stream` is the one systemd connected to journald ($JOURNAL_STREAM is its dev:inode)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is an OSError)
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def configure_logging(*, level: str, fmt: str, redact_phi: bool, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (stdout) at `level`, as `fmt` (auto|json|console).

    Safe to call again (e.g. on reload): it replaces the root handler and structlog's configuration.
    """
    out = sys.stdout if stream is None else stream
    as_json = fmt == "json" or (fmt == "auto" and not _is_tty(out))
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        exceptions: Processor = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        renderer = structlog.processors.JSONRenderer()
        if _is_journal(out):
            renderer = _JournalPrefix(renderer)
    else:
        exceptions = structlog.processors.format_exc_info  # plain text traceback, no locals
        renderer = structlog.dev.ConsoleRenderer(
            colors=_is_tty(out), exception_formatter=structlog.dev.plain_traceback
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            _Redactor(redact_phi),
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(numeric)
    # A scrape every few seconds is not news; websockets' debug frames carry message bodies (PHI).
    verbose = numeric <= logging.DEBUG
    logging.getLogger("aiohttp.access").setLevel(logging.NOTSET if verbose else logging.WARNING)
    quiet_frames = verbose and redact_phi
    logging.getLogger("websockets").setLevel(logging.INFO if quiet_frames else logging.NOTSET)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # lets tests and reloads reconfigure live loggers
    )


def get_logger(name: str, **initial_values: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named `name` (use __name__), optionally with bound values."""
    return structlog.stdlib.get_logger(name, **initial_values)
