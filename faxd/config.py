"""faxd's configuration: the schema of config.yaml, its validation, and where secrets come from.

`load_config` reads one YAML file into frozen dataclasses, one per section, whose field names are the
YAML keys (config.yaml documents each). Every problem is collected before `ConfigError` is raised, so that
`faxd check-config` can name them all at once, each with its dotted key. Relative paths in the file
are relative to the file's own directory. Secrets are read here, once, from a file, from
`$CREDENTIALS_DIRECTORY` or from the environment, and are held in `Secret`.

This module must not log (logging is configured from its result), put a secret's value into any
message, repr or rendering, accept a secret written literally in the YAML, or do any I/O beyond
reading the config file and the secret files and checking that the CA file exists.

A field marked ``reload=True`` can change while the daemon runs (SIGHUP); `merge_reload` keeps the old
value of every other changed key, which needs a restart.

`load_section` reads one section only (the socket clients need `events`, `faxd store` needs `store`):
nothing else in the file is validated and no secret is read. `load_config(..., defer_credentials=True)`
is for `faxd check-config` from a shell, where `$CREDENTIALS_DIRECTORY` is unset: each
`{credential: NAME}` becomes a placeholder instead of a problem (`deferred_credentials` lists them), and
such a config must never run the daemon.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import hmac
import ipaddress
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from faxd.core.outlets import OutletSettings, RetryPolicy, decode_secret
from faxd.core.protocol import Filter
from faxd.core.proxy import Proxy, ProxyError, parse_proxy_url
from faxd.core.resend import CATEGORIES as RETRY_CATEGORIES

EX_CONFIG = 78
"""Exit status for a bad configuration (sysexits.h); the unit sets RestartPreventExitStatus=78."""

DEFAULT_CONFIG_PATH = "/etc/faxd/config.yaml"
DEFAULT_EVENT_SOCKET = "/run/faxd/events.sock"
"""`events.socket`'s default, and faxd.socket's ListenStream= (tests pin that they agree)."""
_MAX_SECRET_BYTES = 1 << 20  # systemd's limit for all credentials of a unit
_SECRET_FORMS = "{credential: NAME}, {file: PATH} or {env: NAME}"


class ConfigError(Exception):
    """The configuration can't be used; `problems` names each problem with its dotted key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret:
    """A credential read from outside the config file. repr() and str() never show it; reveal() does.

    `source` says where it came from, e.g. ``("file", "/etc/faxd/jwt")``, for `render_effective`.
    """

    __slots__ = ("_value", "deferred", "source")

    def __init__(self, value: str, source: tuple[str, str] | None = None, *, deferred: bool = False) -> None:
        self._value = value
        self.source = source
        #: True for a `{credential: NAME}` that `faxd check-config` could not read (no value).
        self.deferred = deferred

    def reveal(self) -> str:
        if self.deferred:
            raise RuntimeError("a credential deferred by check-config has no value")
        return self._value

    def __repr__(self) -> str:
        return "[REDACTED]"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        same = hmac.compare_digest(self._value.encode(), other._value.encode())
        return same and self.source == other.source

    def __hash__(self) -> int:
        return hash(self.source)


class _Invalid(Exception):
    """A value is wrong; the message is the reason, without the key."""


@dataclass(frozen=True)
class _Context:
    environ: Mapping[str, str]
    base_dir: str
    defer_credentials: bool = False


_Parser = Callable[[object, _Context], Any]
_T = TypeVar("_T")


def _opt(default: Any, parse: _Parser, **meta: Any) -> Any:
    """A field with a default; `parse` turns the YAML value into the field's value or raises.

    ``reload=True`` marks a key that a reload (SIGHUP) applies to the running daemon; every other key
    needs a restart (see `merge_reload`). Mark a key only once the daemon part that owns it applies it.
    """
    return dataclasses.field(default=default, metadata={"parse": parse, **meta})


def _req(parse: _Parser, hint: str) -> dict[str, Any]:
    """Metadata of a required field; `hint` tells the admin what to put there."""
    return {"parse": parse, "hint": hint}


# ---------------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw YAML value and raises _Invalid with a reason naming what was got.


def _show(value: object) -> str:
    """The value as the admin wrote it (YAML-ish), short; never call this on a secret."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like "1.5", "90s", "5m", "1h", "250ms".

    Raises ValueError with a reason such as ``expected a duration like 1.5, "90s" or "5m", got "x"``.
    """
    if _is_number(value):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except OverflowError:
            seconds = math.inf
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(m[1]) * _UNIT_SECONDS[m[2]]
    else:
        raise ValueError(f'expected a duration like 1.5, "90s" or "5m", got {_show(value)}')
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration >= 0 seconds, got {_show(value)}")
    return seconds


def _duration(*, positive: bool = False) -> _Parser:
    def parse(value: object, _: _Context) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise _Invalid(str(e)) from None
        if positive and seconds == 0:
            raise _Invalid(f"must be more than 0 seconds, got {_show(value)}")
        return seconds

    return parse


def _integer(minimum: int) -> _Parser:
    def parse(value: object, _: _Context) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"expected an integer, got {_show(value)}")
        if value < minimum:
            raise _Invalid(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _cover_index(value: object, _: _Context) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise _Invalid(
            "expected a cover page index (0 = no cover page, 1-13 = one of the account's cover"
            f" pages) or null (the account's default cover page), got {_show(value)}"
        )
    return value


def _share(value: object, _: _Context) -> float:
    if not _is_number(value):
        raise _Invalid(f"expected a number in (0, 1], got {_show(value)}")
    share = float(value)  # type: ignore[arg-type]
    if not 0 < share <= 1:
        raise _Invalid(f"must be > 0 and <= 1, got {_show(value)}")
    return share


def _boolean(value: object, _: _Context) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _choice(*options: str) -> _Parser:
    def parse(value: object, _: _Context) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {_show(value)}")
        return value.lower()

    return parse


def _text(value: object, _: _Context) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, got {_show(value)}")
    return value.strip()


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_url(value: object, _: _Context) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"expected an http(s) URL like https://platform.ringcentral.com, got {_show(value)}")
    # The client secret and the JWT go to this server: in clear text only if it never leaves the host.
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise _Invalid(
            "plain http:// would send the client secret and the JWT in clear text; use https:// "
            f"(http:// is accepted only for a loopback host: 127.0.0.0/8, ::1, localhost), got {_show(value)}"
        )
    return str(value).rstrip("/")


def _resolve(value: object, ctx: _Context) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(f"expected a file path, got {_show(value)}")
    return os.path.normpath(os.path.join(ctx.base_dir, value))


def _ca_file(value: object, ctx: _Context) -> str | None:
    if value is None:
        return None
    path = _resolve(value, ctx)
    if not os.path.isfile(path):
        raise _Invalid(f"CA file {path} does not exist or is not a regular file")
    return path


_EXTENSION_RE = re.compile(r"~|\d+")


def _extensions(value: object, _: _Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f'expected a non-empty list of extension ids like ["~"], got {_show(value)}')
    ids: list[str] = []
    for i, item in enumerate(value):
        ext = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(ext, str) or not _EXTENSION_RE.fullmatch(ext):
            raise _Invalid(f'item {i}: expected "~" or an extension id (digits), got {_show(item)}')
        if ext in ids:
            raise _Invalid(f"item {i}: extension {_show(ext)} is listed twice")
        ids.append(ext)
    return tuple(ids)


def _id_list(value: object, _: _Context) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of numeric ids, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise _Invalid(f"item {i}: expected a numeric id >= 0, got {_show(item)}")
    return tuple(value)


_MODE_RE = re.compile(r"(?:0o?)?([0-7]{3})")


def _mode(value: object, _: _Context) -> int:
    m = _MODE_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise _Invalid(f'expected an octal mode string like "0660" (quoted), got {_show(value)}')
    return int(m[1], 8)


def _group(value: object, _: _Context) -> str | int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if value.isdigit() else value.strip()
    raise _Invalid(f"expected a group name, a numeric gid or null, got {_show(value)}")


_LISTEN_RE = re.compile(r"\[([0-9A-Fa-f:.%\w-]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})")


def split_host_port(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", ("::1", 9464) from "[::1]:9464"; else ValueError."""
    m = _LISTEN_RE.fullmatch(listen)
    if m is None or int(m[2] or m[4]) > 65535:
        raise ValueError(f'expected HOST:PORT like "127.0.0.1:9464" or "[::1]:9464", got {_show(listen)}')
    return m[1] or m[3], int(m[2] or m[4])


def _listen(value: object, _: _Context) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f'expected HOST:PORT like "127.0.0.1:9464" or null, got {_show(value)}')
    try:
        split_host_port(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return value


def _secret(value: object, ctx: _Context) -> Secret:
    """Read a secret from its source. The value itself never goes into a reason."""
    if isinstance(value, str):
        raise _Invalid(f"secrets don't live in config files; use {_SECRET_FORMS}")
    if not isinstance(value, Mapping) or len(value) != 1:
        got = f"keys {', '.join(map(str, value))}" if isinstance(value, Mapping) else "another type"
        raise _Invalid(f"expected exactly one of {_SECRET_FORMS}, got {got}")
    ((kind, ref),) = value.items()
    if kind not in ("file", "env", "credential"):
        raise _Invalid(f"expected exactly one of {_SECRET_FORMS}, got key {kind}")
    if not isinstance(ref, str) or not ref:
        raise _Invalid(f"{kind}: expected a non-empty string, got {_show(ref)}")
    if kind == "env":
        if ref not in ctx.environ:
            raise _Invalid(f"environment variable {ref} is not set")
        return Secret(_check_secret(ctx.environ[ref], f"environment variable {ref}"), ("env", ref))
    if kind == "credential":
        if "/" in ref or ref in (".", ".."):
            raise _Invalid(f"credential: expected a credential name without '/', got {_show(ref)}")
        directory = ctx.environ.get("CREDENTIALS_DIRECTORY")
        if not directory and ctx.defer_credentials:
            return Secret("", ("credential", ref), deferred=True)
        if not directory:
            raise _Invalid(
                f"{{credential: {ref}}} needs $CREDENTIALS_DIRECTORY (set by systemd's "
                "LoadCredential=), and it is not set; outside systemd use {file: PATH}"
            )
        path = os.path.join(directory, ref)
        return Secret(_read_secret_file(path, check_owner=False), ("credential", ref))
    path = _resolve(ref, ctx)
    return Secret(_read_secret_file(path, check_owner=True), ("file", path))


def _read_secret_file(path: str, *, check_owner: bool) -> str:
    """ssh-StrictModes-style read: no symlink, a regular file, owner-only if `check_owner`."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _Invalid(f"secret file {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Invalid(f"secret file {path} is a symbolic link; name the file itself") from None
        raise _Invalid(f"cannot read secret file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Invalid(f"secret file {path} is not a regular file")
        if check_owner and st.st_mode & 0o077:
            raise _Invalid(
                f"secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
                f"accessible by group or others (chmod 600 {path})"
            )
        if check_owner and st.st_uid not in (0, os.geteuid()):
            raise _Invalid(
                f"secret file {path} is owned by uid {st.st_uid}; it must be owned by "
                f"faxd's user (uid {os.geteuid()}) or root"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(_MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_SECRET_BYTES:
        raise _Invalid(f"secret file {path} is larger than 1 MiB")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise _Invalid(f"secret file {path} is not UTF-8 text") from None
    return _check_secret(text, f"secret file {path}")


def _check_secret(text: str, what: str) -> str:
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise _Invalid(f"{what} is empty")
    return text


def _render_mode(mode: int) -> str:
    return f"{mode:04o}"


@dataclass(frozen=True)
class ProxySetting:
    """A set `ringcentral.proxy`: this proxy, or none at all (not even the environment's)."""

    proxy: Proxy | None
    source: tuple[str, str] | None = None
    """Where a URL with a password came from, e.g. ``("credential", "proxy-url")``."""


_PROXY_FORMS = f'http://HOST:PORT, "none", or a URL with a password as {_SECRET_FORMS}'


def _proxy(value: object, ctx: _Context) -> ProxySetting | None:
    """`ringcentral.proxy`. No reason quotes a URL: one with a password in it would leak it."""
    if value is None:
        return None  # the environment's proxy, as curl finds it
    if value is False or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return ProxySetting(None)  # curl's --proxy "": no proxy, whatever the environment says
    if isinstance(value, Mapping):
        secret = _secret(value, ctx)
        try:
            return ProxySetting(parse_proxy_url(secret.reveal()), secret.source)
        except ProxyError as e:
            kind, ref = secret.source or ("secret", "?")
            raise _Invalid(f"the URL from {{{kind}: {ref}}}: {e}") from None
    if not isinstance(value, str):
        raise _Invalid(f"expected {_PROXY_FORMS}, got {_show(value)}")
    try:
        proxy = parse_proxy_url(value)
    except ProxyError as e:
        raise _Invalid(str(e)) from None
    if proxy.password:
        raise _Invalid(
            "the proxy's password is a secret and secrets don't live in config files; give the "
            f"whole URL as {_SECRET_FORMS}"
        )
    return ProxySetting(proxy)


def _render_proxy(setting: ProxySetting | None) -> object:
    if setting is None:
        return None
    if setting.proxy is None:
        return "none"
    if setting.source is not None:
        return {setting.source[0]: setting.source[1]}
    return setting.proxy.display


# ---------------------------------------------------------------------------------------------------
# The schema. Field names are the YAML keys; keep the order of config.yaml.


@dataclass(frozen=True, kw_only=True)
class RingCentralConfig:
    server: str = _opt("https://platform.ringcentral.com", _server_url)
    """Platform base URL (sandbox: https://platform.devtest.ringcentral.com), no trailing slash."""
    client_id: str = field(metadata=_req(_text, "the app's client ID from the RingCentral developer console"))
    """The RingCentral app's client ID (not secret)."""
    client_secret: Secret = field(metadata=_req(_secret, _SECRET_FORMS))
    """The app's client secret."""
    jwt: Secret = field(metadata=_req(_secret, _SECRET_FORMS))
    """The user's JWT credential, exchanged for access tokens."""
    extensions: tuple[str, ...] = _opt(("~",), _extensions, reload=True)
    """Extension ids whose fax boxes are tracked; "~" is the JWT user's own extension."""
    ca_file: str | None = _opt(None, _ca_file)
    """PEM bundle to trust instead of the system's CAs (for a proxy or the simulator); None: system."""
    proxy: ProxySetting | None = _opt(None, _proxy, render=_render_proxy)  # noqa: RUF009 - a field()
    """HTTP proxy for REST and WebSocket; None: the environment's (HTTPS_PROXY, NO_PROXY, ...)."""


@dataclass(frozen=True, kw_only=True)
class WebSocketConfig:
    heartbeat_interval: float = _opt(60.0, _duration(positive=True), reload=True)
    """Seconds without a frame from the gateway after which a Heartbeat is sent (no reply is awaited)."""
    ping_interval: float = _opt(1.0, _duration(positive=True), reload=True)
    """Seconds between WebSocket pings (a few bytes each way)."""
    ping_timeout_min: float = _opt(5.0, _duration(positive=True), reload=True)
    """Shortest wait for a pong, in seconds: the timeout follows measured round trips, never below this."""
    ping_timeout: float = _opt(8.0, _duration(positive=True), reload=True)
    """Longest wait for a pong, in seconds, and the wait before any round trip is measured."""
    max_message_bytes: int = _opt(1048576, _integer(1), reload=True)
    """Largest WebSocket message accepted, in bytes."""

    def _problems(self) -> list[str]:
        if self.ping_timeout >= self.ping_timeout_min:
            return []
        return [
            f"websocket.ping_timeout: must be >= websocket.ping_timeout_min ({self.ping_timeout_min:g}),"
            f" got {self.ping_timeout:g}"
        ]


@dataclass(frozen=True, kw_only=True)
class ReconcileConfig:
    debounce: float = _opt(1.0, _duration(), reload=True)
    """Quiet period in seconds: hints for one extension within it coalesce into one reconcile."""
    max_delay: float = _opt(5.0, _duration(), reload=True)
    """Longest a busy extension waits for its reconcile, in seconds (>= debounce)."""
    poll_interval: float = _opt(300.0, _duration(positive=True), reload=True)
    """Safety poll of every extension, in seconds, whatever the WebSocket says."""
    active_poll_interval: float = _opt(60.0, _duration(positive=True), reload=True)
    """Poll interval in seconds while faxes are in flight."""
    sent_settle: float = _opt(0.0, _duration(), reload=True)
    """Seconds a `Sent` status must hold before it counts as final; 0 = at once."""
    stall_after: float = _opt(1800.0, _duration(positive=True), reload=True)
    """Seconds in `Queued` after which a fax gets one `stalled` event."""
    rate_share: float = _opt(0.8, _share, reload=True)
    """Share of each RingCentral rate-limit group faxd may spend, in (0, 1]."""

    def _problems(self) -> list[str]:
        if self.max_delay >= self.debounce:
            return []
        return [
            f"reconcile.max_delay: must be >= reconcile.debounce ({self.debounce:g}), got {self.max_delay:g}"
        ]


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    path: str = _opt("/var/lib/faxd/faxd.db", _resolve)
    """SQLite database file (WAL mode; its -wal and -shm files live beside it)."""
    retention_days: int = _opt(30, _integer(1))
    """Days that final faxes and their journal entries are kept."""


@dataclass(frozen=True, kw_only=True)
class EventsConfig:
    socket: str = _opt(DEFAULT_EVENT_SOCKET, _resolve)
    """Path of the Unix socket for clients (unused under socket activation)."""
    mode: int = _opt(0o660, _mode, render=_render_mode)
    """Permission bits of the socket file; written as an octal string like "0660"."""
    group: str | int | None = _opt(None, _group)
    """Group (name or gid) given to the socket file; None leaves faxd's own group."""
    max_clients: int = _opt(64, _integer(1))
    """Most clients connected at once; more are refused with a `busy` error."""
    client_queue: int = _opt(1000, _integer(1))
    """Events queued per client before it is dropped as a slow consumer."""
    allowed_uids: tuple[int, ...] = _opt((), _id_list)
    """If not empty, only peers with these uids (SO_PEERCRED) may connect (or an allowed gid)."""
    allowed_gids: tuple[int, ...] = _opt((), _id_list)
    """If not empty, only peers with these primary gids may connect (or an allowed uid)."""
    heartbeat_interval: float = _opt(15.0, _duration(positive=True))
    """Seconds of idleness after which a `heartbeat` is sent to a client."""
    include_numbers: bool = _opt(True, _boolean)
    """Whether events carry recipients' phone numbers (PHI)."""


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    listen: str | None = _opt("127.0.0.1:9464", _listen)
    """HOST:PORT of the /metrics, /healthz and /readyz endpoints; None disables them."""

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, or None when metrics are disabled."""
        return None if self.listen is None else split_host_port(self.listen)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: str = _opt("info", _choice("debug", "info", "warning", "error"), reload=True)
    """Lowest level logged: debug, info, warning or error."""
    format: str = _opt("auto", _choice("auto", "json", "console"), reload=True)
    """auto = console on a TTY, JSON lines otherwise."""
    redact_phi: bool = _opt(True, _boolean, reload=True)
    """Replace phone numbers, names, subjects and cover texts in logs by "[PHI]"."""


def _categories(value: object, _: _Context) -> frozenset[str]:
    """`send.retry.categories`: error categories of faxd.core.taxonomy."""
    known = ", ".join(sorted(RETRY_CATEGORIES))
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of error categories ({known}), got {_show(value)}")
    for i, item in enumerate(value):
        if item not in RETRY_CATEGORIES:
            raise _Invalid(f"item {i}: expected an error category ({known}), got {_show(item)}")
    return frozenset(value)


def _factor(value: object, _: _Context) -> float:
    if not _is_number(value) or not 1 <= float(value) <= 100:  # type: ignore[arg-type]
        raise _Invalid(f"expected a number from 1 to 100, got {_show(value)}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    """`send.retry`: the resend policy of faxes sent through faxd with a ref (faxd.core.resend)."""

    categories: frozenset[str] = _opt(frozenset({"busy", "no_answer"}), _categories, render=sorted)
    """Error categories whose failed recipients are sent the fax again."""
    max_attempts: int = _opt(1, _integer(1))
    """Tries in all, the first included (HylaFAX maxdials); 1 = never resend."""
    delay: float = _opt(300.0, _duration(positive=True))
    """Seconds from the end of the first try to the second."""
    backoff: float = _opt(2.0, _factor)
    """Each further wait is this many times the previous one."""
    max_delay: float = _opt(3600.0, _duration(positive=True))
    """Longest wait between two tries (>= delay)."""
    deadline: float = _opt(10800.0, _duration(positive=True))
    """No try starts later than this after the first one (HylaFAX killtime)."""

    def _problems(self) -> list[str]:
        if self.max_delay >= self.delay:
            return []
        return [f"send.retry.max_delay: must be >= send.retry.delay ({self.delay:g}), got {self.max_delay:g}"]


# ---------------------------------------------------------------------------------------------------
# outlets: a mapping of outlet name -> OutletConfig (docs/outlets.md).

_OUTLET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _strings(*, fold: bool = False) -> _Parser:
    def parse(value: object, _: _Context) -> frozenset[str]:
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            raise _Invalid(f"expected a list of strings, got {_show(value)}")
        items = (str(v).strip() for v in value)
        return frozenset(v.casefold() if fold else v for v in items if v)

    return parse


def _webhook_url(value: object, _: _Context) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"expected an https:// URL, got {_show(value)}")
    if parts.username or parts.password:
        raise _Invalid("a URL with a user or password would put it in logs; use the signing secret")
    # Events carry fax history: in clear text only if it never leaves the host.
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise _Invalid(
            "plain http:// would send fax events in clear text; use https:// (http:// is accepted"
            f" only for a loopback host), got {_show(value)}"
        )
    return str(value)


def _webhook_secret(value: object, ctx: _Context) -> Secret | None:
    if value is None:
        return None
    secret = _secret(value, ctx)
    if not secret.deferred:
        try:
            decode_secret(secret.reveal())
        except ValueError as e:
            raise _Invalid(str(e)) from None
    return secret


def _command(value: object, _: _Context) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise _Invalid(
            f'expected a list (argv, no shell) like ["/usr/local/bin/fax-hook"], got {_show(value)}'
        )
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"expected a non-empty list of non-empty strings, got {_show(value)}")
    program = value[0]
    if not os.path.isabs(program):
        raise _Invalid(f"the program must be an absolute path (no PATH lookup), got {_show(program)}")
    if not (os.path.isfile(program) and os.access(program, os.X_OK)):
        raise _Invalid(f"{program} does not exist or is not an executable file")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class OutletFilterConfig:
    """Which events an outlet gets; as the socket's subscription filter (docs/socket-protocol.md)."""

    directions: frozenset[str] = _opt(frozenset(), _strings(fold=True), render=sorted)
    """Inbound, Outbound; empty = both."""
    to_status: frozenset[str] = _opt(frozenset(), _strings(fold=True), render=sorted)
    """Statuses an event must move to (e.g. Sent, SendingFailed, Received); empty = any."""
    final_only: bool = _opt(False, _boolean)
    """Only events that end a fax or a recipient (``final: true``)."""
    extensions: frozenset[str] = _opt(frozenset(), _strings(), render=sorted)
    """Extension ids; empty = every tracked extension."""


@dataclass(frozen=True, kw_only=True)
class OutletConfig:
    type: str = field(metadata=_req(_choice("webhook", "exec"), "webhook or exec"))
    """webhook: POST each event to `url`, signed; exec: run `command` per event."""
    url: str | None = _opt(None, _webhook_url)
    """webhook: the receiver's URL (https://; http:// only for loopback)."""
    secret: Secret | None = _opt(None, _webhook_secret)  # noqa: RUF009 - a field()
    """webhook: the Standard Webhooks signing secret (base64, optionally whsec_-prefixed)."""
    ca_file: str | None = _opt(None, _ca_file)
    """webhook: PEM file of the CAs trusted for `url` instead of the system's."""
    command: tuple[str, ...] | None = _opt(None, _command)
    """exec: argv of the hook (absolute program path, no shell); the event is on its stdin."""
    concurrency: int = _opt(1, _integer(1))
    """exec: hook runs at once (1 = strictly in order); webhooks always deliver one at a time."""
    timeout: float = _opt(10.0, _duration(positive=True))
    """Seconds an attempt may take (the HTTP request, or the hook's run) before it counts as failed."""
    retry_initial: float = _opt(1.0, _duration(positive=True))
    """Backoff after the first failed attempt; doubles per failure, with jitter."""
    retry_max: float = _opt(300.0, _duration(positive=True))
    """Longest backoff between two attempts."""
    max_age: float = _opt(86400.0, _duration(positive=True))
    """An event still failing this long after it was journalled goes to the dead-letter table."""
    include_numbers: bool = _opt(False, _boolean)
    """Whether events carry recipients' phone numbers (PHI)."""
    filter: OutletFilterConfig = field(
        default_factory=OutletFilterConfig, metadata={"section": OutletFilterConfig}
    )

    def outlet_problems(self, key: str) -> list[str]:
        """Cross-checks of the keys of one outlet, named under ``key``."""
        wanted = ("url", "secret") if self.type == "webhook" else ("command",)
        other = ("command",) if self.type == "webhook" else ("url", "secret", "ca_file")
        problems = [f"{key}.{k}: required for type {self.type}" for k in wanted if getattr(self, k) is None]
        problems += [
            f"{key}.{k}: not a key of type {self.type}" for k in other if getattr(self, k) is not None
        ]
        if self.type == "webhook" and self.concurrency != 1:
            problems.append(f"{key}.concurrency: webhooks deliver in order, one at a time")
        return problems


def _parse_outlets(raw: object, prefix: str, ctx: _Context, problems: list[str]) -> dict[str, OutletConfig]:
    """`outlets`: each entry parsed like a section, its problems under `outlets.NAME.`."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(
            f"{prefix.rstrip('.')}: expected a mapping of outlet names to outlets, got {_show(raw)}"
        )
        return {}
    outlets: dict[str, OutletConfig] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or not _OUTLET_NAME_RE.fullmatch(name):
            problems.append(f"{key}: an outlet name is 1-63 letters, digits, '_', '.', '-'")
            continue
        before = len(problems)
        outlet = _parse_mapping(OutletConfig, value, key + ".", ctx, problems)
        if outlet is not None and len(problems) == before:
            problems.extend(outlet.outlet_problems(key))
            outlets[name] = outlet
    return outlets


def outlet_settings(outlets: Mapping[str, OutletConfig]) -> list[OutletSettings]:
    """What the outlets run with: each outlet's settings, its webhook secret decoded (never logged)."""
    settings = []
    for name, cfg in outlets.items():
        f = cfg.filter
        settings.append(
            OutletSettings(
                name=name,
                kind="webhook" if cfg.type == "webhook" else "exec",
                retry=RetryPolicy(initial=cfg.retry_initial, cap=cfg.retry_max, max_age=cfg.max_age),
                timeout=cfg.timeout,
                filter=Filter(
                    extensions=f.extensions,
                    directions=f.directions,
                    to_status=f.to_status,
                    final_only=f.final_only,
                ),
                include_numbers=cfg.include_numbers,
                url=cfg.url,
                key=decode_secret(cfg.secret.reveal()) if cfg.secret is not None else b"",
                ca_file=cfg.ca_file,
                command=cfg.command or (),
                concurrency=cfg.concurrency,
            )
        )
    return settings


@dataclass(frozen=True, kw_only=True)
class SendConfig:
    cover_index: int | None = _opt(0, _cover_index)
    """Cover page of faxes sent through faxd when the request names none: 0 = none, 1-13 = one of the
    account's cover pages (GET /restapi/v1.0/dictionary/fax-cover-page), null = the account's
    default cover page (Outbound Fax Settings)."""
    retry: RetryConfig = field(default_factory=RetryConfig, metadata={"section": RetryConfig})
    """The resend policy (send.retry)."""


def _file_mode(value: object, ctx: _Context) -> int:
    mode = _mode(value, ctx)
    if mode & 0o133:
        raise _Invalid(
            f'a document must not be executable or writable by group or others, got "{mode:04o}"'
            ' (e.g. "0640" or "0600")'
        )
    return mode


def _optional_days(value: object, ctx: _Context) -> int | None:
    return None if value is None else _integer(1)(value, ctx)


@dataclass(frozen=True, kw_only=True)
class DocumentsConfig:
    enabled: bool = _opt(False, _boolean)
    """Download every received fax's document into `spool_dir`."""
    spool_dir: str = _opt("/var/lib/faxd/documents", _resolve)
    """Directory of the documents: one subdirectory per extension."""
    retention_days: int | None = _opt(None, _optional_days)
    """Days a downloaded document is kept before faxd deletes the file; None keeps them forever."""
    mode: int = _opt(0o640, _file_mode, render=_render_mode)
    """Permission bits of each document file; written as an octal string like "0640"."""


@dataclass(frozen=True, kw_only=True)
class Config:
    ringcentral: RingCentralConfig = field(metadata={"section": RingCentralConfig})
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig, metadata={"section": WebSocketConfig})
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig, metadata={"section": ReconcileConfig})
    store: StoreConfig = field(default_factory=StoreConfig, metadata={"section": StoreConfig})
    events: EventsConfig = field(default_factory=EventsConfig, metadata={"section": EventsConfig})
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata={"section": MetricsConfig})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"section": LoggingConfig})
    send: SendConfig = field(default_factory=SendConfig, metadata={"section": SendConfig})
    outlets: dict[str, OutletConfig] = field(default_factory=dict, metadata={"outlets": OutletConfig})
    documents: DocumentsConfig = field(default_factory=DocumentsConfig, metadata={"section": DocumentsConfig})


# ---------------------------------------------------------------------------------------------------
# Loading, validating, rendering.


def default_config_path(environ: Mapping[str, str] | None = None) -> str:
    """`$FAXD_CONFIG`, else /etc/faxd/config.yaml."""
    env = os.environ if environ is None else environ
    return env.get("FAXD_CONFIG") or DEFAULT_CONFIG_PATH


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float) or key_node.tag.endswith(":merge"):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_document(name: str) -> object:
    """The YAML document in the file `name`; ConfigError if it cannot be read or parsed."""
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{name}: cannot read the config file: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{name}: the config file is not UTF-8 text"]) from None
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ConfigError([f"{where}: invalid YAML: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{name}: invalid YAML: {e}"]) from None


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    defer_credentials: bool = False,
) -> Config:
    """Read, validate and return the config file at `path`; ConfigError names every problem.

    With `defer_credentials` (only for `faxd check-config`), a `{credential: NAME}` while
    `$CREDENTIALS_DIRECTORY` is unset is not a problem: its Secret is a placeholder (`deferred`), listed
    by `deferred_credentials`. The daemon must never run on such a config (`reveal()` refuses).
    """
    name = os.fspath(path)
    data = _read_document(name)
    return parse_config(
        data,
        environ=environ,
        base_dir=os.path.dirname(os.path.abspath(name)),
        defer_credentials=defer_credentials,
    )


_SECTION_NAMES = {
    f.metadata["section"]: f.name for f in dataclasses.fields(Config) if "section" in f.metadata
}


def load_section(
    path: str | os.PathLike[str], section: type[_T], *, environ: Mapping[str, str] | None = None
) -> _T:
    """One section of the config file at `path` (e.g. EventsConfig, from `events:`), validated alone.

    Other sections are neither validated nor read for secrets, so a socket client works with a config
    whose secrets only the daemon can read. ConfigError if the file cannot be read or the section is bad.
    """
    name = os.fspath(path)
    key = _SECTION_NAMES[section]
    data = _read_document(name)
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError([f"(top level): expected a mapping of keys, got {_show(data)}"])
    raw = (data or {}).get(key)
    ctx = _Context(os.environ if environ is None else environ, os.path.dirname(os.path.abspath(name)))
    problems: list[str] = []
    parsed = _parse_mapping(section, raw, key + ".", ctx, problems)
    if problems or parsed is None:
        raise ConfigError(problems)
    return parsed


def deferred_credentials(config: Config) -> list[tuple[str, str]]:
    """(dotted key, credential name) of every secret `load_config(defer_credentials=True)` could not read."""
    found: list[tuple[str, str]] = []
    sections = [(s.name, getattr(config, s.name)) for s in _sections()]
    sections += [(f"outlets.{name}", outlet) for name, outlet in config.outlets.items()]
    for name, obj in sections:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Secret) and value.deferred and value.source is not None:
                found.append((f"{name}.{f.name}", value.source[1]))
    return found


def _sections() -> list[dataclasses.Field[Any]]:
    """The fields of Config that are sections (every one but `outlets`)."""
    return [f for f in dataclasses.fields(Config) if "section" in f.metadata]


def parse_config(
    data: object,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    defer_credentials: bool = False,
) -> Config:
    """Validate an already-parsed YAML document; relative paths are relative to `base_dir` (cwd)."""
    ctx = _Context(
        os.environ if environ is None else environ, os.fspath(base_dir or os.getcwd()), defer_credentials
    )
    problems: list[str] = []
    config = _parse_mapping(Config, data, "", ctx, problems)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


def _parse_mapping(cls: type[_T], raw: object, prefix: str, ctx: _Context, problems: list[str]) -> _T | None:
    """Build `cls` from `raw`, appending a problem per bad key; None if there was any."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        what = prefix.rstrip(".") or "(top level)"
        problems.append(f"{what}: expected a mapping of keys, got {_show(raw)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    before = len(problems)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key, value = prefix + name, raw.get(name)
        if section := f.metadata.get("section"):
            values[name] = _parse_mapping(section, value, key + ".", ctx, problems)
        elif "outlets" in f.metadata:
            values[name] = _parse_outlets(value, key + ".", ctx, problems)
        elif value is None and f.default is dataclasses.MISSING:
            problems.append(f"{key}: required, not set ({f.metadata['hint']})")
        elif name in raw:
            try:
                values[name] = f.metadata["parse"](value, ctx)
            except _Invalid as e:
                problems.append(f"{key}: {e}")
    if len(problems) > before:
        return None
    obj = cls(**values)
    problems.extend(getattr(obj, "_problems", list)())  # cross-checks between keys of one section
    return obj


def _render(obj: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if "render" in f.metadata:  # before the dataclass case: a field's own renderer hides secrets
            out[f.name] = f.metadata["render"](value)
        elif dataclasses.is_dataclass(value):
            out[f.name] = _render(value)
        elif "outlets" in f.metadata:
            out[f.name] = {name: _render(outlet) for name, outlet in value.items()}
        elif isinstance(value, Secret):
            out[f.name] = {value.source[0]: value.source[1]} if value.source else "[REDACTED]"
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def render_effective(config: Config) -> str:
    """The effective config as YAML, every key included; secrets appear as their source only."""
    return yaml.safe_dump(_render(config), sort_keys=False, default_flow_style=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------
# Reload: which keys a running daemon takes over, from the `reload` mark on each field.


def reloadable_keys() -> frozenset[str]:
    """The dotted keys a reload (SIGHUP) applies; every other key needs a restart."""
    return frozenset(
        f"{section.name}.{f.name}"
        for section in _sections()
        for f in dataclasses.fields(section.metadata["section"])
        if f.metadata.get("reload", False)
    )


def merge_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to run with after a reload, the keys applied, and the changed keys that need a restart.

    Keys that need a restart keep their old value, so a later reload names them again.
    """
    sections: dict[str, Any] = {}
    applied: list[str] = []
    restart: list[str] = []
    if old.outlets != new.outlets:
        restart.append("outlets")
        sections["outlets"] = old.outlets
    for section in _sections():
        old_section, new_section = getattr(old, section.name), getattr(new, section.name)
        kept: dict[str, Any] = {}
        for f in dataclasses.fields(old_section):
            before, after = getattr(old_section, f.name), getattr(new_section, f.name)
            if before == after:
                continue
            if f.metadata.get("reload", False):
                applied.append(f"{section.name}.{f.name}")
            else:
                restart.append(f"{section.name}.{f.name}")
                kept[f.name] = before
        sections[section.name] = dataclasses.replace(new_section, **kept) if kept else new_section
    return dataclasses.replace(new, **sections), applied, restart
