"""Which HTTP proxy, if any, a connection to a given URL goes through (REST and WebSocket alike).

faxd reaches RingCentral either directly or through an HTTP proxy that opens a CONNECT tunnel
(plain http:// targets, only ever on loopback, are forwarded instead). The proxy comes from
``ringcentral.proxy`` or, when that key is not set, from the environment as curl reads it:
``https_proxy``/``HTTPS_PROXY`` for https:// and wss:// URLs, ``http_proxy``/``HTTP_PROXY`` for
http:// and ws:// ones, ``all_proxy``/``ALL_PROXY`` for both when the specific one is unset
(lower case first, an empty value counts as unset). ``no_proxy``/``NO_PROXY`` names hosts that are
reached directly, whichever way the proxy was given.

A proxy URL may carry ``user:password``: the password is a secret. Nothing here puts it (or the
URL text it came in, which may hold it) into a reason, a repr or :attr:`Proxy.url`.

This module must not read the environment itself (the caller passes it in), resolve names or do
any other I/O.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote, urlsplit

HTTPS_VARIABLES: Final = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
HTTP_VARIABLES: Final = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
NO_PROXY_VARIABLES: Final = ("no_proxy", "NO_PROXY")
_SECURE_SCHEMES: Final = frozenset({"https", "wss"})
_DEFAULT_PORTS: Final = {"https": 443, "wss": 443, "http": 80, "ws": 80}


class ProxyError(ValueError):
    """A proxy setting can't be used. The message never contains the URL or its credentials."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy. ``repr`` and :attr:`url` leave the credentials out."""

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``http://host:port``: safe to log and to hand to a library along with :meth:`authorization`."""
        return f"http://{_bracket(self.host)}:{self.port}"

    @property
    def display(self) -> str:
        """The URL with the user name but never the password (for `check-config`)."""
        user = f"{quote(self.username, safe='')}@" if self.username is not None else ""
        return f"http://{user}{_bracket(self.host)}:{self.port}"

    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` header value (Basic), or None without credentials."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def url_with_credentials(self) -> str:
        """The URL with ``user:password@``, for a library that only takes credentials that way.

        Secret as soon as there is a password: never log it or put it into an exception.
        """
        if self.username is None:
            return self.url
        userinfo = f"{quote(self.username, safe='')}:{quote(self.password or '', safe='')}"
        return f"http://{userinfo}@{_bracket(self.host)}:{self.port}"

    def __str__(self) -> str:
        return self.url


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_proxy_url(text: str) -> Proxy:
    """A :class:`Proxy` from ``http://[user:password@]host[:port]``; ``host:port`` means http://.

    The port defaults to 80, as in any http:// URL. Raises :class:`ProxyError` with a reason that
    quotes nothing of ``text``.
    """
    text = text.strip()
    if not text:
        raise ProxyError("expected a proxy URL like http://proxy.example:3128, got an empty string")
    if "://" not in text:
        text = "http://" + text  # curl's reading of a bare host:port
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ProxyError("the proxy URL is malformed (unbalanced brackets around an IPv6 address?)") from None
    try:
        port = parts.port
    except ValueError:
        raise ProxyError("the proxy's port must be a number from 1 to 65535") from None
    scheme = parts.scheme.lower()
    if scheme.startswith("socks"):
        raise ProxyError("SOCKS proxies are not supported; faxd needs an HTTP proxy (http://HOST:PORT)")
    if scheme == "https":
        raise ProxyError(
            "https:// proxies (TLS to the proxy itself) are not supported; use http://HOST:PORT "
            "(the connection to RingCentral is TLS end to end through the proxy's tunnel)"
        )
    if scheme != "http":
        raise ProxyError("a proxy URL must start with http://")
    if not parts.hostname:
        raise ProxyError("the proxy URL has no host name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyError("a proxy URL has no path, query or fragment: http://HOST:PORT")
    if port == 0:
        raise ProxyError("the proxy's port must be a number from 1 to 65535")
    username = password = None
    if parts.username is not None:
        username = unquote(parts.username)
        password = unquote(parts.password) if parts.password is not None else ""
    return Proxy(parts.hostname, port or 80, username, password)


@dataclass(frozen=True)
class _Bypass:
    """One ``no_proxy`` entry."""

    host: str  # lower case, no brackets, no leading or trailing dot; "" for an address range
    port: int | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False  # a name never matches an address: faxd resolves no names for this
        return host == self.host or host.endswith("." + self.host)


def parse_no_proxy(text: str) -> tuple[tuple[_Bypass, ...], bool]:
    """The entries of a ``no_proxy`` value and whether it is ``*`` (every host goes direct).

    Entries are separated by commas or spaces: a host name (also matching its subdomains; a
    leading ``.`` or ``*.`` changes nothing), an IP address or a CIDR range, each optionally with
    ``:port``. Anything else is ignored, as curl does.
    """
    entries: list[_Bypass] = []
    for raw in text.replace(",", " ").split():
        entry = raw.strip().lower()
        if entry == "*":
            return (), True
        port: int | None = None
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
            entry = host
        elif entry.count(":") == 1:
            host, _, digits = entry.partition(":")
            if digits.isdigit():
                entry, port = host, int(digits)
        entry = entry.removeprefix("*").strip(".")
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            entries.append(_Bypass(entry, port, None))
        else:
            entries.append(_Bypass("", port, network))
    return tuple(entries), False


@dataclass(frozen=True)
class ProxyPolicy:
    """The proxy per URL scheme and the hosts that bypass it; :data:`DIRECT` uses none.

    A proxy taken from the environment may be unusable (``ProxyError``); it is kept as the error
    and raised only by :meth:`proxy_for` a URL that would use it, so that a broken ``http_proxy``
    does not stop a faxd that only talks https.
    """

    https: Proxy | ProxyError | None = None
    http: Proxy | ProxyError | None = None
    no_proxy: tuple[_Bypass, ...] = ()
    bypass_all: bool = False
    origin: str = "none"
    """Where the proxy came from, for logs: "ringcentral.proxy", a variable name or "none"."""

    def proxy_for(self, url: str) -> Proxy | None:
        """The proxy for a connection to ``url``, or None to connect directly.

        Raises :class:`ProxyError` when the environment's proxy for this URL's scheme is unusable.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        chosen = self.https if scheme in _SECURE_SCHEMES else self.http
        if chosen is None:
            return None
        host = (parts.hostname or "").rstrip(".")
        try:
            port = parts.port or _DEFAULT_PORTS.get(scheme, 80)
        except ValueError:
            port = _DEFAULT_PORTS.get(scheme, 80)
        if self.bypass_all or any(entry.matches(host, port) for entry in self.no_proxy):
            return None
        if isinstance(chosen, ProxyError):
            raise chosen
        return chosen


DIRECT: Final = ProxyPolicy()


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _from_variable(found: tuple[str, str] | None) -> Proxy | ProxyError | None:
    if found is None:
        return None
    name, value = found
    try:
        return parse_proxy_url(value)
    except ProxyError as exc:
        return ProxyError(f"environment variable {name}: {exc}")


def policy(configured: Proxy | None, environ: Mapping[str, str], *, use_environment: bool) -> ProxyPolicy:
    """The policy for faxd's connections to RingCentral.

    ``configured``: the proxy of ``ringcentral.proxy`` (for every scheme; ``no_proxy`` still
    applies, as with curl's ``--proxy``). Without one, the environment's when ``use_environment``,
    else :data:`DIRECT` (``proxy: none``).
    """
    bypass = _first_set(environ, NO_PROXY_VARIABLES)
    no_proxy, bypass_all = parse_no_proxy(bypass[1]) if bypass else ((), False)
    if configured is not None:
        return ProxyPolicy(configured, configured, no_proxy, bypass_all, "ringcentral.proxy")
    if not use_environment:
        return DIRECT
    https = _first_set(environ, HTTPS_VARIABLES)
    http = _first_set(environ, HTTP_VARIABLES)
    if https is None and http is None:
        return DIRECT
    origin = (https or http or ("", ""))[0]
    return ProxyPolicy(_from_variable(https), _from_variable(http), no_proxy, bypass_all, origin)
