"""``faxd doctor``: the preflight an administrator runs before the first start and whenever something
looks wrong.

It runs a checklist against the configured RingCentral account (or the simulator) and reports each
check as pass, warn, fail or skip, with a concrete fix for every warning and failure: the config, the
secrets, the connection (TLS, through the same HTTP session the daemon uses), the clock (from the
server's ``Date``), the credentials (a JWT grant through faxd's own REST client) and the token's
scope, each extension and its Fax message store, a test WebSocket subscription (faxd's own WSG
connect and codec; deleted again) and the rate-limit headroom per group. It counts every request it
sends per throttling group and prints the count.

It must not send a fax, write to the message store, retry a failed request, or print a secret (nor a
phone number or a person's name); it revokes its token before it exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
import stat
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus, WebSocketException

from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import ApiError, AuthFailed, RateLimited, RingCentral
from faxd.adapters.ws_session import gateway_connect
from faxd.config import EX_CONFIG, Config, ConfigError, Secret, load_config
from faxd.core import ratebudget, wsg
from faxd.core.proxy import Proxy, ProxyError
from faxd.daemon import http_session, proxy_policy, ssl_context, ws_settings

PASS: Final = "pass"
WARN: Final = "warn"
FAIL: Final = "fail"
SKIP: Final = "skip"

EX_OK: Final = 0
EX_FAILED: Final = 1  # at least one check failed; EX_CONFIG (78) when the config or a secret is unusable

#: Clock skew (seconds, after the Date header's 1 s resolution and the round trip are allowed for) above
#: which the clock check warns, and fails.
CLOCK_WARN: Final = 5.0
CLOCK_FAIL: Final = 60.0
#: A group with less than this share of its limit left warns (faxd would soon wait for a window).
HEADROOM_WARN: Final = 0.2
PROBE_TIMEOUT: Final = aiohttp.ClientTimeout(total=15, connect=10)
WS_TIMEOUT: Final = 15.0

#: The app permissions faxd needs: the spec's ``x-app-permission`` of every operation it calls.
REQUIRED_PERMISSIONS: Final[Mapping[str, str]] = {
    "ReadMessages": "message-sync and message-store reads, i.e. tracking faxes",
    "Faxes": "POST …/fax, i.e. faxd send",
    "WebSocket": "POST /restapi/oauth/wstoken, i.e. push notifications",
}
#: Needed for WebSocket subscriptions (RingCentral's SUB-528 names it); the subscription check decides.
SUBSCRIPTION_PERMISSION: Final = "SubscriptionWebSocket"
#: Permissions that include others (RingCentral's permissions guide, "Included Permissions").
INCLUDED: Final[Mapping[str, frozenset[str]]] = {
    "Faxes": frozenset({"ReadMessages"}),
    "EditMessages": frozenset({"ReadMessages"}),
    "EditAccounts": frozenset({"ReadAccounts", "EditExtensions"}),
}
_CLIENT_AUTH_CODES: Final = frozenset({"OAU-120", "OAU-123", "OAU-134", "OAU-146", "invalid_client"})
_GROUP_NAMES: Final = {g.lower(): g for g in ratebudget.GROUPS}
_RATE_HEADERS: Final = ("X-Rate-Limit-Limit", "X-Rate-Limit-Remaining", "X-Rate-Limit-Window")
NO_THROTTLING: Final = ratebudget.NO_THROTTLING


@dataclass(frozen=True)
class Check:
    """One line of the checklist; ``fix`` says what to do about a warning or a failure."""

    name: str
    status: str
    detail: str
    fix: str | None = None


@dataclass
class Report:
    config_path: str
    server: str | None = None
    checks: list[Check] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)

    @property
    def exit_code(self) -> int:
        failed = {c.name for c in self.checks if c.status == FAIL}
        if failed & {"config", "secrets"}:
            return EX_CONFIG
        return EX_FAILED if failed else EX_OK

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == EX_OK,
            "exit_code": self.exit_code,
            "config": self.config_path,
            "server": self.server,
            "checks": [asdict(c) for c in self.checks],
            "requests": dict(sorted(self.requests.items())),
        }

    def render(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"faxd doctor: {self.config_path}" + (f" → {self.server}" if self.server else ""), ""]
        for c in self.checks:
            lines.append(f"{c.status.upper():4}  {c.name:{width}}  {c.detail}")
            if c.fix:
                lines.append(f"{'':4}  {'':{width}}  fix: {c.fix}")
        sent = ", ".join(f"{group} {n}" for group, n in sorted(self.requests.items())) or "none"
        lines += ["", f"requests sent, by rate-limit group: {sent}"]
        failed = sum(c.status == FAIL for c in self.checks)
        warned = sum(c.status == WARN for c in self.checks)
        verdict = f"{failed} failed" if failed else "all checks passed"
        if warned:
            verdict += f", {warned} with a warning"
        lines.append(f"{verdict}; exit status {self.exit_code}")
        return "\n".join(lines) + "\n"


async def main(config_path: str, *, json_out: bool, out: TextIO) -> int:
    """``faxd doctor``: run the checks, print the report (text or JSON), return the exit status."""
    report = await run_checks(config_path)
    if json_out:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        out.write(report.render())
    return report.exit_code


async def run_checks(config_path: str, *, environ: Mapping[str, str] | None = None) -> Report:
    """Every check, in order; a check whose prerequisite failed is reported as skipped."""
    report = Report(config_path)
    config = _check_config(report, config_path, environ)
    if config is None:
        _skip_rest(report, "needs a valid configuration")
        return report
    report.server = config.ringcentral.server
    try:
        tls = ssl_context(config.ringcentral.ca_file)
    except (ssl.SSLError, OSError) as exc:
        report.checks.append(
            Check(
                "connection",
                FAIL,
                f"ringcentral.ca_file {config.ringcentral.ca_file} cannot be used: {exc}",
                "point ringcentral.ca_file at a PEM bundle of CA certificates (or remove it to trust the "
                "system's CAs)",
            )
        )
        _skip_rest(report, "needs a connection to the server", config)
        return report
    async with http_session(config.ringcentral, tls) as session:
        await _Doctor(report, config, session, tls, os.environ if environ is None else environ).run()
    return report


def check_names(config: Config | None) -> list[str]:
    """The names of every check, in order (``*`` for the extensions when the config is unknown)."""
    extensions = config.ringcentral.extensions if config is not None else ("*",)
    per_extension = [f"{kind}:{ext}" for ext in extensions for kind in ("extension", "message-store")]
    return ["config", "secrets", "connection", "clock", "credentials", "scope", *per_extension,
            "subscription", "rate-limits"]  # fmt: skip


def _skip_rest(report: Report, why: str, config: Config | None = None) -> None:
    done = {c.name for c in report.checks}
    report.checks.extend(Check(name, SKIP, why) for name in check_names(config) if name not in done)


# ---------------------------------------------------------------------------------------------------
# Local checks: the config and its secrets.

_SECRET_KEYS: Final = ("ringcentral.client_secret:", "ringcentral.jwt:")


def _check_config(report: Report, path: str, environ: Mapping[str, str] | None) -> Config | None:
    try:
        config = load_config(path, environ=environ)
    except ConfigError as exc:
        secret = [p for p in exc.problems if p.startswith(_SECRET_KEYS)]
        other = [p for p in exc.problems if not p.startswith(_SECRET_KEYS)]
        if other:
            fix = (
                "write the config there, or name the right file with -c or $FAXD_CONFIG"
                if any("cannot read the config file" in p for p in other)
                else f"edit {path} (config.yaml in faxd's repository documents every key); "
                f"faxd check-config -c {path} checks it again"
            )
            report.checks.append(Check("config", FAIL, "; ".join(other), fix))
        else:
            report.checks.append(Check("config", PASS, f"{path} is valid apart from its secrets"))
        if secret:
            report.checks.append(Check("secrets", FAIL, "; ".join(secret), _secret_fix(secret)))
        return None
    extensions = len(config.ringcentral.extensions)
    report.checks.append(
        Check("config", PASS, f"{path} is valid ({extensions} extension{'s' * (extensions != 1)})")
    )
    report.checks.append(_check_secrets(config))
    return config


def _secret_fix(problems: Sequence[str]) -> str:
    text = " ".join(problems)
    if "CREDENTIALS_DIRECTORY" in text:
        return (
            "{credential: NAME} secrets exist only inside the unit: run doctor with the unit's credentials, "
            "systemd-run --pipe --wait -p DynamicUser=yes -p LoadCredentialEncrypted=NAME:/etc/credstore."
            "encrypted/faxd.NAME … /opt/faxd/bin/faxd doctor (docs/operations.md §2.1)"
        )
    return (
        "each secret file must be a regular file (not a symlink) owned by faxd's user or root with mode "
        "0600 (chown faxd FILE; chmod 600 FILE), holding only the secret; under systemd prefer "
        "{credential: NAME} (docs/operations.md §2)"
    )


def _describe_secret(key: str, secret: Secret) -> tuple[str, bool]:
    """How ``secret`` is kept, and whether that deserves a warning."""
    kind, ref = secret.source or ("?", "?")
    if kind == "file":
        try:
            st = os.stat(ref, follow_symlinks=False)
        except OSError:  # read a moment ago, gone now: the next start will say so
            return f"{key}: file {ref}", False
        return f"{key}: file {ref} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})", False
    if kind == "env":
        return f"{key}: environment variable {ref}", True
    return f"{key}: {kind} {ref}", False


def _check_secrets(config: Config) -> Check:
    rc = config.ringcentral
    described = [_describe_secret("client_secret", rc.client_secret), _describe_secret("jwt", rc.jwt)]
    detail = "; ".join(text for text, _ in described)
    if any(warn for _, warn in described):
        return Check(
            "secrets",
            WARN,
            detail,
            "a secret in the environment is visible to every process of that user and to child "
            "processes: keep it in a {credential: NAME} (systemd) or a mode-0600 {file: PATH}",
        )
    return Check("secrets", PASS, f"readable, owner-only: {detail}")


# ---------------------------------------------------------------------------------------------------
# Network checks.


@dataclass
class _Headroom:
    limit: int | None = None
    remaining: int | None = None
    window: float | None = None
    limited: bool = False  # a 429 was seen


class _Doctor:
    def __init__(
        self,
        report: Report,
        config: Config,
        session: aiohttp.ClientSession,
        tls: ssl.SSLContext,
        environ: Mapping[str, str],
    ) -> None:
        self.report = report
        self.config = config
        self.session = session
        self.tls = tls
        self.headroom: dict[str, _Headroom] = {}
        rc_cfg = config.ringcentral
        self.server = urlsplit(rc_cfg.server)
        # The daemon's proxy decision; an unusable proxy variable fails the connection check.
        self.proxies = proxy_policy(rc_cfg.proxy, environ)
        try:
            self.proxy: Proxy | None = self.proxies.proxy_for(rc_cfg.server)
            self.proxy_error: str | None = None
        except ProxyError as exc:
            self.proxy, self.proxy_error = None, str(exc)
        self.rc = RingCentral(
            session,
            server=rc_cfg.server,
            client_id=rc_cfg.client_id,
            client_secret=rc_cfg.client_secret.reveal(),
            jwt=rc_cfg.jwt.reveal(),
            metrics=Metrics(CollectorRegistry()),
            # Doctor sends a handful of requests once; holding back a share for others (as the daemon
            # does) would only make it wait while the server still has room.
            rate_share=1.0,
            proxy=self.proxy,
        )
        self.rc.on_response = self._response

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> None:
        self.report.checks.append(Check(name, status, detail, fix))

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _response(self, method: str, path: str, status: int, headers: Mapping[str, str]) -> None:
        group = self._observe(headers, status, fallback=ratebudget.classify(method, path))
        self.report.requests[group] += 1

    def _observe(self, headers: Mapping[str, str], status: int, *, fallback: str) -> str:
        """Note a response's X-Rate-Limit-* headers; returns its group (the server's name first)."""
        ci = {k.lower(): v for k, v in headers.items()}  # WS reply headers are a plain dict
        named = ci.get("x-rate-limit-group", "").strip()
        group = _GROUP_NAMES.get(named.lower(), named) if named else fallback
        limit, remaining, window = ratebudget.parse_headers(
            {name: ci[name.lower()] for name in _RATE_HEADERS if name.lower() in ci}
        )
        seen = self.headroom.setdefault(group, _Headroom())
        if status == 429:
            seen.limited = True
        elif remaining is not None:
            seen.limit, seen.remaining, seen.window = limit, remaining, window
        return group

    # -- the checklist -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            probe = await self._connection()
            if probe is None:
                _skip_rest(self.report, "needs a connection to the server", self.config)
                return
            self._clock(*probe)
            if not await self._credentials():
                names = check_names(self.config)
                for name in names[names.index("scope") : names.index("rate-limits")]:
                    self.add(name, SKIP, "needs accepted credentials")
            else:
                self._scope()
                readable = await self._extensions()
                await self._subscription(readable)
            self._rate_limits()
        finally:
            await self.rc.aclose()  # revokes the token: nothing of doctor's session outlives it

    async def _connection(self) -> tuple[str | None, float, float] | None:
        """GET /restapi (not throttled): any HTTP answer proves DNS, TCP, TLS and the proxy path.

        Returns the ``Date`` header with the local times the request was sent and answered.
        """
        if self.proxy_error is not None:
            self.add(
                "connection",
                FAIL,
                f"the proxy setting is unusable: {self.proxy_error}",
                "fix or unset the proxy environment variable named above, or set ringcentral.proxy",
            )
            return None
        url = self.config.ringcentral.server + "/restapi"
        headers, proxy_headers = self._probe_headers()
        sent = time.time()
        try:
            async with self.session.get(
                url,
                timeout=PROBE_TIMEOUT,
                allow_redirects=False,
                headers=headers,
                proxy=self.proxy.url if self.proxy is not None else None,
                proxy_headers=proxy_headers,
            ) as resp:
                await resp.read()
                received = time.time()
                date = resp.headers.get("Date")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.add("connection", FAIL, *self._unreachable(exc, url))
            return None
        self.report.requests[NO_THROTTLING] += 1
        answered = f"{self._host()} answered GET /restapi (HTTP {status})"
        if self.server.scheme != "https":
            self.add(
                "connection",
                WARN,
                f"{answered} over plain HTTP, without TLS",
                "only the simulator speaks plain HTTP: RingCentral is https://platform.ringcentral.com "
                "(sandbox: https://platform.devtest.ringcentral.com)",
            )
        else:
            self.add("connection", PASS, f"{answered} over TLS (1.2 or later), certificate verified")
        return date, sent, received

    def _host(self) -> str:
        """host:port of the server, the port spelled out."""
        return f"{self.server.hostname}:{self.server.port or (443 if self.server.scheme == 'https' else 80)}"

    def _probe_headers(self) -> tuple[dict[str, str], dict[str, str] | None]:
        """The probe's headers, and the proxy's (with the daemon's proxy credentials)."""
        headers = {"Accept": "application/json"}
        proxy_headers: dict[str, str] | None = None
        if self.proxy is not None and (auth := self.proxy.authorization()) is not None:
            if self.server.scheme == "https":
                proxy_headers = {"Proxy-Authorization": auth}  # on the CONNECT only
            else:
                headers["Proxy-Authorization"] = auth  # a forwarded plain-http request
        return headers, proxy_headers

    def _unreachable(self, exc: aiohttp.ClientError | TimeoutError, url: str) -> tuple[str, str]:
        """What went wrong on the way to the server, and the fix (most specific failure first)."""
        host = self._host()
        server = self.config.ringcentral.server
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            reason = getattr(exc.certificate_error, "verify_message", None) or str(exc.certificate_error)
            return (
                f"the TLS certificate of {host} is not trusted: {reason}",
                "if a TLS-inspecting proxy or a private CA sits between this host and RingCentral, set "
                "ringcentral.ca_file to its CA bundle (PEM); if the name does not match, ringcentral.server "
                "must use the name the certificate is for; else update the system's CA certificates",
            )
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return (
                f"cannot reach the HTTP proxy: {exc.os_error.strerror or exc.os_error}",
                "check the proxy's address and that it is up; without a proxy, remove its setting",
            )
        if isinstance(exc, aiohttp.ClientSSLError):
            return (
                f"the TLS handshake with {host} failed: {exc}",
                "faxd needs TLS 1.2 or later; a proxy that intercepts TLS needs its CA in "
                "ringcentral.ca_file",
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            return (
                f"cannot connect to {host}: {exc.os_error.strerror or exc.os_error}",
                f"check ringcentral.server ({server}), DNS, and that this host may "
                f"open TCP connections to port {host.rsplit(':', 1)[1]} (firewall); if it reaches the "
                "internet only through an HTTP proxy, configure that proxy",
            )
        if isinstance(exc, TimeoutError):
            return (
                f"{host} did not answer within {PROBE_TIMEOUT.total:g} s",
                "a firewall that drops packets, or a proxy that does not forward: check the path to "
                f"{host} (curl -v {url})",
            )
        return (
            f"GET {url} failed: {type(exc).__name__}: {exc}",
            f"check ringcentral.server ({server}) and the network path",
        )

    def _clock(self, date: str | None, sent: float, received: float) -> None:
        if date is None:
            self.add("clock", WARN, "the server sent no Date header: the clock was not checked", _CLOCK_FIX)
            return
        try:
            server = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            self.add("clock", WARN, f"unreadable Date header {date!r}: the clock was not checked", _CLOCK_FIX)
            return
        skew = clock_skew(server, sent, received)
        if abs(skew) < 0.5:
            self.add("clock", PASS, "the local clock agrees with the server's (within the 1 s of Date)")
            return
        way = "behind" if skew > 0 else "ahead of"
        detail = f"the local clock is {abs(skew):.0f} s {way} the server's"
        if abs(skew) >= CLOCK_FAIL:
            self.add("clock", FAIL, f"{detail} (limit {CLOCK_FAIL:g} s)", _CLOCK_FIX)
        elif abs(skew) >= CLOCK_WARN:
            self.add("clock", WARN, f"{detail} (warning from {CLOCK_WARN:g} s)", _CLOCK_FIX)
        else:
            self.add("clock", PASS, detail)

    async def _credentials(self) -> bool:
        jwt_source = _source(self.config.ringcentral.jwt)
        try:
            await self.rc.login()
        except AuthFailed as exc:
            if exc.code in _CLIENT_AUTH_CODES or exc.status == 401:
                fix = (
                    "the client id or client secret is wrong: copy both from the app's Credentials in the "
                    "RingCentral developer console (ringcentral.client_id, and the client secret in "
                    f"{_source(self.config.ringcentral.client_secret)})"
                )
            else:
                fix = (
                    "RingCentral refused the JWT: it is wrong, expired or revoked, belongs to another "
                    "environment (a sandbox JWT works only with https://platform.devtest.ringcentral.com), "
                    "or the app does not allow the JWT auth flow; create a JWT for the user in the developer "
                    f"console and put it in {jwt_source}"
                )
            self.add(
                "credentials", FAIL, f"JWT grant refused: HTTP {exc.status} {exc.code}: {exc.message}", fix
            )
            return False
        except RateLimited as exc:
            self.add(
                "credentials",
                FAIL,
                f"the Auth group is over its limit (HTTP 429); retry in {exc.retry_after:g} s",
                "another process uses the same app and user (a running faxd, another doctor): run doctor "
                "again after that wait",
            )
            return False
        except ApiError as exc:
            self.add(
                "credentials",
                FAIL,
                f"the token request failed: {exc}",
                "a RingCentral outage or a network problem: run faxd doctor again in a minute",
            )
            return False
        self.add(
            "credentials", PASS, f"JWT grant accepted; the JWT user's extension id is {self.rc.owner_id}"
        )
        return True

    def _scope(self) -> None:
        scope = self.rc.scope
        if scope is None:
            self.add(
                "scope",
                WARN,
                "the token reply lists no scope: the permissions were not checked",
                "the extension and subscription checks below show what works",
            )
            return
        granted = set(scope.replace(",", " ").split())
        for name in list(granted):
            granted |= INCLUDED.get(name, frozenset())
        missing = [p for p in REQUIRED_PERMISSIONS if p not in granted]
        if missing:
            needed = "; ".join(f"{p} ({REQUIRED_PERMISSIONS[p]})" for p in missing)
            self.add(
                "scope",
                FAIL,
                f"the app lacks {needed}",
                "add the missing permissions to the app in the RingCentral developer console (app settings, "
                "App Permissions); they apply to tokens issued after the change",
            )
        elif SUBSCRIPTION_PERMISSION not in granted:
            self.add(
                "scope",
                WARN,
                f"{', '.join(REQUIRED_PERMISSIONS)} granted; {SUBSCRIPTION_PERMISSION} is not listed",
                "RingCentral refuses WebSocket subscriptions without the 'WebSocket Subscriptions' "
                f"permission (SUB-528): add {SUBSCRIPTION_PERMISSION} to the app if the subscription "
                "check fails",
            )
        else:
            self.add("scope", PASS, f"{', '.join([*REQUIRED_PERMISSIONS, SUBSCRIPTION_PERMISSION])} granted")

    async def _extensions(self) -> list[str]:
        """One extension and one message-store check per configured extension; returns the ids whose
        Fax box is readable (what the test subscription is for)."""
        readable: list[str] = []
        for configured in self.config.ringcentral.extensions:
            ext = self.rc.owner_id if configured == "~" and self.rc.owner_id else configured
            label = configured if configured == ext else f"{configured} ({ext})"
            if not await self._extension(f"extension:{configured}", ext, label):
                self.add(f"message-store:{configured}", SKIP, "needs an extension that exists")
            elif await self._store(f"message-store:{configured}", ext, label):
                readable.append(ext)
        return readable

    async def _extension(self, name: str, ext: str, label: str) -> bool:
        """Whether the extension exists (as far as can be told); a 404 ends its checks."""
        try:
            info = await self.rc.extension_info(ext)
        except ApiError as exc:
            if exc.status == 404:
                self.add(
                    name,
                    FAIL,
                    f"extension {label} does not exist in this account ({exc.code}: {exc.message})",
                    "ringcentral.extensions lists extension ids (long digits, not short extension numbers "
                    'such as 101) or "~" for the JWT user: GET /restapi/v1.0/account/~/extension lists them',
                )
                return False
            if exc.status == 403:
                self.add(
                    name,
                    WARN,
                    f"cannot read extension {label}'s info ({exc.code}: {exc.message})",
                    "faxd itself does not read it (ReadAccounts); the message-store check decides",
                )
                return True
            self.add(name, FAIL, f"GET extension {label} failed: {exc}", _retry_fix(exc))
            return False
        status, kind = info.get("status"), info.get("type")
        number = info.get("extensionNumber")
        detail = f"extension {label}: number {number}, {kind}, {status}"
        if status not in (None, "Enabled"):
            self.add(
                name,
                WARN,
                detail,
                f"an extension that is {status} cannot send or receive faxes: enable it in the admin portal",
            )
        else:
            self.add(name, PASS, detail)
        return True

    async def _store(self, name: str, ext: str, label: str) -> bool:
        try:
            records = await self.rc.latest_messages(ext, message_type="Fax", per_page=1)
        except ApiError as exc:
            if exc.code == "CMN-401" or (exc.status == 403 and "application needs" in exc.message):
                fix = "add the ReadMessages permission to the app in the RingCentral developer console"
            elif exc.status == 403:
                fix = (
                    f"the JWT user may not read extension {label}'s messages: use the JWT of a user whose "
                    'role may read them (an administrator), or track only the user\'s own extension ("~")'
                )
            elif exc.status == 404:
                fix = "ringcentral.extensions lists an extension this account does not have"
            else:
                fix = _retry_fix(exc)
            self.add(name, FAIL, f"the Fax message store of extension {label} is not readable: {exc}", fix)
            return False
        if records:
            newest = records[0]
            seen = (
                f"newest fax {newest.get('id')}: {newest.get('direction')} {newest.get('messageStatus')}, "
                f"{newest.get('creationTime')}"
            )
        else:
            seen = "no fax in the last 24 hours"
        self.add(name, PASS, f"Fax message store of extension {label} readable ({seen})")
        return True

    async def _subscription(self, extensions: list[str]) -> None:
        if not extensions:
            self.add("subscription", SKIP, "no extension with a readable Fax message store to subscribe to")
            return
        wait = self.rc.ws_token_wait()
        if wait > 0:
            self.add(
                "subscription",
                FAIL,
                f"the Auth group has no room for a ws token for another {wait:.0f} s",
                "another process uses the same app and user: run doctor again later",
            )
            return
        try:
            token = await self.rc.ws_token()
        except ApiError as exc:
            fix = (
                "add the WebSocket permission to the app in the RingCentral developer console"
                if exc.status == 403
                else _retry_fix(exc)
            )
            self.add("subscription", FAIL, f"POST /restapi/oauth/wstoken failed: {exc}", fix)
            return
        filters = wsg.event_filters(extensions)
        settings = dataclasses.replace(ws_settings(self.config), connect_timeout=WS_TIMEOUT)
        try:
            async with asyncio.timeout(WS_TIMEOUT * 3):
                proxy = self.proxies.proxy_for(token.uri)
                async with gateway_connect(
                    token, wsc=None, settings=settings, ssl_context=self.tls, proxy=proxy
                ) as ws:
                    await self._subscribe(ws, filters, len(extensions))
        except InvalidStatus as exc:
            self.add(
                "subscription",
                FAIL,
                f"the WebSocket gateway refused the connection (HTTP {exc.response.status_code})",
                "a proxy or firewall that does not pass WebSocket upgrades, or a missing WebSocket "
                "permission: check both",
            )
        except _GatewayError as exc:
            self.add("subscription", FAIL, str(exc), exc.fix)
        except TimeoutError:
            self.add(
                "subscription",
                FAIL,
                f"no answer from the WebSocket gateway within {WS_TIMEOUT:g} s",
                "a proxy or firewall that does not pass WebSocket traffic to the gateway",
            )
        except (OSError, WebSocketException) as exc:
            self.add(
                "subscription",
                FAIL,
                f"the WebSocket connection failed: {type(exc).__name__}: {exc}",
                "a proxy or firewall that does not pass WebSocket traffic, or an untrusted certificate",
            )

    async def _subscribe(self, ws: ClientConnection, filters: list[str], extensions: int) -> None:
        await _recv_until(ws, None)  # ConnectionDetails first; nothing may be sent before it
        mid = str(uuid.uuid4())
        self._ws_request("POST", wsg.SUBSCRIPTION_PATH)
        reply = await _send_and_wait(ws, mid, wsg.encode_subscribe(mid, filters))
        self._observe(reply.headers, reply.status, fallback=ratebudget.MEDIUM)
        if not reply.ok:
            code = reply.error_code or f"HTTP {reply.status}"
            raise _GatewayError(
                f"RingCentral refused the subscription: {reply.status} {code}: {_message(reply.body)}",
                _SUBSCRIPTION_FIXES.get(code, "see the error code in RingCentral's API reference"),
            )
        disabled = wsg.disabled_filters_of(reply)
        try:
            subscription_id = wsg.subscription_id_of(reply)
        except wsg.FrameError:
            raise _GatewayError(
                "the subscription reply carries no id", "report this (with the reply) as a faxd bug"
            ) from None
        mid = str(uuid.uuid4())
        self._ws_request("DELETE", f"{wsg.SUBSCRIPTION_PATH}/{subscription_id}")
        deleted = await _send_and_wait(ws, mid, wsg.encode_unsubscribe(mid, subscription_id))
        self._observe(deleted.headers, deleted.status, fallback=ratebudget.MEDIUM)
        what = f"{len(filters)} event filters ({extensions} extension{'s' * (extensions != 1)})"
        if disabled:
            listed = "; ".join(f"{d.filter} ({d.reason})" for d in disabled)
            self.add(
                "subscription",
                FAIL,
                f"the subscription was created, but {len(disabled)} of {len(filters)} filters are disabled: "
                f"{listed}",
                _SUBSCRIPTION_FIXES["SUB-405"],
            )
        elif not deleted.ok:
            self.add(
                "subscription",
                WARN,
                f"a subscription to {what} was accepted, but deleting it answered {deleted.status} "
                f"{deleted.error_code}",
                "nothing to do: a WebSocket subscription ends with its WebSocket session",
            )
        else:
            self.add("subscription", PASS, f"a subscription to {what} was accepted, then deleted")

    def _ws_request(self, method: str, path: str) -> None:
        # Tunnelled over the WebSocket; whether RingCentral counts these against a group is not
        # documented: they are counted in the spec's group of the same REST request.
        self.report.requests[ratebudget.classify(method, path)] += 1

    def _rate_limits(self) -> None:
        seen = {g: h for g, h in self.headroom.items() if h.limited or h.remaining is not None}
        if not seen:
            self.add(
                "rate-limits",
                WARN,
                "no response carried X-Rate-Limit-* headers: the headroom is unknown",
                "nothing to do unless 429s appear; faxd then learns the limits from Retry-After",
            )
            return
        parts, low, empty = [], [], []
        for group in sorted(seen):
            h = seen[group]
            if h.limited:
                parts.append(f"{group} over its limit (429)")
                empty.append(group)
                continue
            window = f" per {h.window:g} s" if h.window else ""
            parts.append(f"{group} {h.remaining} of {h.limit}{window} left")
            if h.remaining == 0:
                empty.append(group)
            elif h.limit and h.remaining is not None and h.remaining < h.limit * HEADROOM_WARN:
                low.append(group)
        detail = "; ".join(parts) + " (after doctor's own requests)"
        if empty:
            self.add(
                "rate-limits",
                FAIL,
                detail,
                f"{', '.join(empty)} has no room left: another process (a running faxd?) uses the same app "
                "and user; faxd would have to wait for the window; lower reconcile.rate_share where "
                "several processes share one app",
            )
        elif low:
            self.add(
                "rate-limits",
                WARN,
                detail,
                f"little room left in {', '.join(low)}: something else spends the same app and user's limits",
            )
        else:
            self.add("rate-limits", PASS, detail)


_CLOCK_FIX: Final = (
    "synchronise the clock with NTP (timedatectl set-ntp true, or chrony): TLS certificates and token "
    "lifetimes are judged by time"
)

_SUBSCRIPTION_FIXES: Final[Mapping[str, str]] = {
    "SUB-405": (
        "the JWT user may not receive other extensions' events: use the JWT of a user with admin rights "
        'over them, or list only "~"; until then faxd can follow those extensions by polling only'
    ),
    "SUB-406": "ringcentral.extensions may only list extensions of the JWT user's own account",
    "SUB-528": (
        "add the 'WebSocket Subscriptions' permission (SubscriptionWebSocket) to the app in the "
        "RingCentral developer console"
    ),
    "SUB-505": "30 subscriptions per user and app exist already: stop the other clients of this app",
    "SUB-508": "RingCentral did not accept faxd's event filters: report this as a faxd bug",
}


class _GatewayError(Exception):
    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.fix = fix


async def _recv_until(ws: ClientConnection, message_id: str | None) -> wsg.Frame:
    """Read frames until the ConnectionDetails (``message_id`` None) or the reply to ``message_id``."""
    while True:
        try:
            frame = wsg.parse_frame(await ws.recv())
        except wsg.FrameError as exc:
            raise _GatewayError(
                f"the gateway sent a frame faxd cannot read ({exc})", "report this as a faxd bug"
            ) from None
        if isinstance(frame, wsg.ErrorFrame):
            raise _GatewayError(
                f"the gateway sent an error: {frame.error_code}: {frame.message}",
                "WSG-401: the ws token was refused (clock, or a proxy that rewrites the URL); others: "
                "run doctor again",
            )
        if message_id is None and isinstance(frame, wsg.ConnectionDetails):
            return frame
        if isinstance(frame, wsg.ClientResponse) and frame.message_id == message_id:
            return frame


async def _send_and_wait(ws: ClientConnection, message_id: str, text: str) -> wsg.ClientResponse:
    await ws.send(text)
    async with asyncio.timeout(WS_TIMEOUT):
        frame = await _recv_until(ws, message_id)
    assert isinstance(frame, wsg.ClientResponse)
    return frame


def clock_skew(server: float, sent: float, received: float) -> float:
    """Server minus local time, in seconds, as small as the measurement allows.

    The server stamped its whole-second ``Date`` (``server``, so its clock read between ``server`` and
    ``server + 1``) at a local time between ``sent`` and ``received``: the offset lies in
    ``[server - received, server + 1 - sent]``. The value of that interval nearest to 0 is returned,
    so only a skew the measurement proves is reported.
    """
    low, high = server - received, server + 1 - sent
    if low > 0:
        return low
    if high < 0:
        return high
    return 0.0


def _source(secret: Secret) -> str:
    kind, ref = secret.source or ("?", "?")
    return f"{{{kind}: {ref}}}"


def _retry_fix(exc: ApiError) -> str:
    if isinstance(exc, RateLimited):
        return f"over the rate limit: run doctor again after {exc.retry_after:g} s"
    return "a RingCentral outage or a network problem: run faxd doctor again in a minute"


def _message(body: Any) -> str:
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message", ""))[:200]
        return str(body.get("message", ""))[:200]
    return ""
