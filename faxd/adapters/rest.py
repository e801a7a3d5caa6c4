r"""RingCentral auth and REST client over one injected :class:`aiohttp.ClientSession`.

Owns the OAuth tokens (JWT grant once, then refresh grants ahead of expiry, single-flight; the
JWT grant again only when a refresh is rejected, because a new OAuth session breaks WSG
recovery and spends the 5/min Auth budget), admits every request through the rate budget, and
turns RingCentral's answers into records or typed :class:`ApiError` exceptions.

How a request is admitted (:meth:`RingCentral._admit`), in the daemon all through the request
scheduler (:mod:`faxd.core.scheduler`, driven by :mod:`faxd.adapters.scheduling`):

* inside a grant (the driver runs the grant's work under :func:`permitted`): the grant's permit
  ``take``\ s the request, which never waits; a request that does not fit raises
  :class:`BudgetDeferred` and nothing is sent;
* outside any grant, with a :class:`Gate` attached (:meth:`RingCentral.use_gate`): a grant of one
  request is asked for and awaited (bounded; :class:`Stopping` once faxd stops), so a method called
  by any adapter (``send_fax``, ``get_content``, ...) is budgeted like the rest;
* without a gate (``faxd doctor``, tests of this module alone): the request waits for the budget itself.

The server's ``X-Rate-Limit-*`` headers and 429 penalties go into the one :class:`RateBudget`, which
the scheduler is built on. A 5xx's ``Retry-After`` is reported on the :class:`ApiError` and honoured
by the owner of the work (the scheduler per key, docs/scheduler.md §5), not as a hold of the group.

Requests go through the HTTP proxy it is given (CONNECT for https://; a plain http:// URL, only
ever on loopback, is forwarded by the proxy), with the proxy's credentials on the CONNECT only, never
inside the tunnel to RingCentral. A proxy's refusal is an ``ApiError`` with code ``proxy_<status>``.

It must not retry on its own beyond the one retry after a 401 (callers own retry policy), must
not create its own HTTP session, must not read proxy settings from the environment (the caller
decides), and must never log or raise with a token, secret, JWT, proxy password or ws URL query in it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import aiohttp
import structlog
from multidict import CIMultiDictProxy

from faxd.adapters.metrics import Metrics
from faxd.core import ratebudget
from faxd.core.proxy import Proxy
from faxd.core.ratebudget import RateBudget
from faxd.core.wsg import error_code_of

log = structlog.get_logger(__name__)

JWT_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Refresh when less than this is left of the access token (the JS SDK uses 60 s).
REFRESH_MARGIN: Final = 60.0
BULK_MAX: Final = 50
DEFAULT_TIMEOUT: Final = aiohttp.ClientTimeout(total=30, connect=10, sock_read=30)
SEND_TIMEOUT: Final = aiohttp.ClientTimeout(total=300, connect=10, sock_read=120)
CONTENT_TIMEOUT: Final = aiohttp.ClientTimeout(total=300, connect=10, sock_read=60)
#: How long a request outside any grant may wait for its grant once faxd stops: long enough for the
#: scheduler to hand out a grant the budget allows now, never a wait for budget.
STOP_PATIENCE: Final = 0.1
#: The revoke runs while faxd stops, which must take at most 5 s in all (docs/operations.md §3.4).
REVOKE_TIMEOUT: Final = aiohttp.ClientTimeout(total=1, connect=1)
#: Longest a 5xx's Retry-After is reported as (the scheduler's own cap): a broken or hostile value
#: must not silence faxd for hours.
MAX_SERVER_RETRY_AFTER: Final = 300.0


class ApiError(Exception):
    """A RingCentral request failed. ``code`` is RingCentral's errorCode or a short local code
    (``http_503``, ``bad_body``, ``connection``, ``timeout``). ``retry_after``: seconds the server
    asked for (a 5xx's ``Retry-After``, at most ``MAX_SERVER_RETRY_AFTER``): the owner of the work
    honours it (the scheduler for that key; it holds back no group)."""

    def __init__(
        self, status: int, code: str | None, message: str = "", *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code or '-'}: {message}" if message else f"{status} {code or '-'}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class RateLimited(ApiError):
    """HTTP 429: nothing more goes to ``group`` for ``retry_after`` seconds."""

    retry_after: float

    def __init__(
        self, status: int, code: str | None, message: str, *, group: str, retry_after: float
    ) -> None:
        super().__init__(status, code, message, retry_after=retry_after)
        self.group = group


class NotSent(ApiError):
    """The request was not sent, for want of budget: nothing happened at RingCentral."""

    def __init__(self, code: str, message: str, group: str) -> None:
        super().__init__(0, code, message)
        self.group = group


class Stopping(NotSent):
    """faxd is stopping and the request would have had to wait for the rate budget (or a penalty):
    it was not sent. The caller's pending work is redone at start-up."""

    def __init__(self, group: str) -> None:
        super().__init__("stopping", f"not sent: faxd is stopping and the {group} budget is spent", group)


class BudgetDeferred(NotSent):
    """Inside a grant, a request beyond what the grant reserved did not fit the budget now: not sent.
    The work ends as deferred and goes again when the scheduler grants it (never retried here)."""

    def __init__(self, group: str) -> None:
        super().__init__("deferred", f"not sent: no {group} budget left for this work now", group)


class Permit(Protocol):
    """The running grant's say on each of its requests (set by the driver with :func:`permitted`)."""

    def take(self, group: str, now: float) -> bool:
        """Whether one request of ``group`` may be sent at ``now`` (True: it is counted, send it)."""
        ...


class Gate(Protocol):
    """Admits a request made outside any grant: a grant of one request of ``group``, awaited."""

    def single(self, group: str, *, wait: float = ...) -> AbstractAsyncContextManager[Permit]:
        """Until the request may go, at most ``wait`` seconds (then ``ApiError`` ``budget_timeout``;
        :class:`Stopping` once faxd stops); the request is sent inside, and the grant ends when the
        block does."""
        ...


_permit: contextvars.ContextVar[Permit | None] = contextvars.ContextVar("faxd_rest_permit", default=None)


@contextlib.contextmanager
def permitted(permit: Permit) -> Iterator[None]:
    """Requests made inside the block (in this task) belong to ``permit``'s grant."""
    token = _permit.set(permit)
    try:
        yield
    finally:
        _permit.reset(token)


class SyncTokenStale(ApiError):
    """An incremental sync was refused with 400: the syncToken is no longer usable, a full sync is due.

    RingCentral says so with ``MSG-333`` (full synchronization is required) or ``CMN-101``
    ("Parameter [syncToken] value is invalid"); its own web client treats both alike. Any other 400
    on an ISync means the same to faxd: the ISync carries nothing but the token.
    """


class ExtensionNotFound(ApiError):
    """404 ``CMN-102`` naming ``extensionId``: RingCentral does not know a configured extension
    (deleted, or mistyped in the config). A configuration problem, not a missing message: the
    extension's faxes are not purged."""


class AuthFailed(ApiError):
    """The app's credentials (client id/secret or JWT) were rejected: fatal for the daemon."""


@dataclass(frozen=True)
class WsToken:
    uri: str
    token: str = field(repr=False)
    expires_in: float


@dataclass(frozen=True)
class SyncResult:
    records: list[dict[str, Any]]
    sync_token: str = field(repr=False)
    older_records_exist: bool


@dataclass(frozen=True)
class Document:
    name: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class _Response:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class _Request:
    """One HTTP request as :meth:`RingCentral._send` makes it; repr never shows headers or body."""

    method: str
    path: str
    endpoint: str  # the path's template, for metrics and logs
    headers: Mapping[str, str] = field(repr=False)  # the Authorization header holds a token
    params: Sequence[tuple[str, str]] | None = field(repr=False)
    data: Any = field(repr=False)
    timeout: aiohttp.ClientTimeout = field(repr=False)


@dataclass(frozen=True)
class _Tokens:
    access: str = field(repr=False)
    refresh: str | None = field(repr=False)
    expires_at: float  # wall clock
    ttl: float
    refresh_expires_at: float | None
    generation: int


class RingCentral:
    """Auth + REST for one RingCentral app/user. All methods are safe to call concurrently."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        server: str,
        client_id: str,
        client_secret: str,
        jwt: str,
        metrics: Metrics,
        rate_share: float = 0.8,
        wall: Callable[[], float] = time.time,
        proxy: Proxy | None = None,
    ) -> None:
        self._http = session
        self._server = server.rstrip("/")
        self._proxy = proxy
        self._proxy_headers: dict[str, str] = {}  # on the CONNECT to the proxy
        self._forward_headers: dict[str, str] = {}  # on each request a proxy forwards (plain http)
        if proxy is not None and (auth := proxy.authorization()) is not None:
            tunnelled = self._server.lower().startswith("https:")
            (self._proxy_headers if tunnelled else self._forward_headers)["Proxy-Authorization"] = auth
        self._basic = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self._jwt = jwt
        self._metrics = metrics
        self._wall = wall
        self.budget = RateBudget(rate_share)
        self._tokens: _Tokens | None = None
        self._generation = 0
        # Single flight: whoever holds the lock grants; the others wait and reuse its result.
        self._auth_lock = asyncio.Lock()
        self.owner_id: str | None = None
        #: The app permissions of the current token (its ``scope``, space-separated); None: not told.
        self.scope: str | None = None
        #: Called with (method, path, status, headers) of every HTTP response (``faxd doctor``
        #: counts requests and reads Date and X-Rate-Limit-* from them); must not raise.
        self.on_response: Callable[[str, str, int, Mapping[str, str]], None] | None = None
        #: (method, endpoint) -> the group RingCentral's X-Rate-Limit-Group last named for it.
        self._server_groups: dict[tuple[str, str], str] = {}
        # Set when faxd stops: a request that would have to wait for budget raises Stopping instead.
        self._stopping = asyncio.Event()
        self._gate: Gate | None = None

    def use_gate(self, gate: Gate | None) -> None:
        """Admit requests made outside any grant through ``gate`` (the daemon's request driver)."""
        self._gate = gate

    def set_rate_share(self, share: float) -> None:
        """Spend at most ``share`` of each rate-limit group's window from now on (a reload)."""
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.budget.share = share

    def stop_waiting(self) -> None:
        """faxd is stopping: from now on (and for any request waiting now) a request that would have to
        wait for the rate budget raises :class:`Stopping` instead of waiting."""
        self._stopping.set()

    # ------------------------------------------------------------------ auth

    async def login(self) -> None:
        """JWT grant: a new OAuth session. Prefer :meth:`_ensure_token`, which refreshes."""
        async with self._auth_lock:
            await self._grant_jwt()

    async def _grant_jwt(self) -> None:
        form = {"grant_type": JWT_GRANT, "assertion": self._jwt}
        try:
            body = await self._token_request(form, grant="jwt")
        except RateLimited:
            raise
        except ApiError as exc:
            if 400 <= exc.status < 500:
                raise AuthFailed(exc.status, exc.code, exc.message) from None
            raise
        self._store_tokens(body)
        log.info("auth.login", owner_id=self.owner_id, expires_in=body.get("expires_in"))

    async def _refresh(self) -> None:
        """Refresh grant; falls back to the JWT grant only when the refresh token is rejected."""
        tokens = self._tokens
        refresh_ok = (
            tokens is not None
            and tokens.refresh is not None
            and (tokens.refresh_expires_at is None or tokens.refresh_expires_at > self._wall())
        )
        if tokens is not None and tokens.refresh is not None and refresh_ok:
            form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh}
            try:
                body = await self._token_request(form, grant="refresh")
            except RateLimited:
                raise
            except ApiError as exc:
                if not 400 <= exc.status < 500:
                    raise  # transient: keep the refresh token, the caller retries later
                log.warning("auth.refresh_rejected", status=exc.status, code=exc.code)
            else:
                self._store_tokens(body)
                log.info("auth.refreshed", expires_in=body.get("expires_in"))
                return
        await self._grant_jwt()

    async def _token_request(self, form: dict[str, str], *, grant: str) -> dict[str, Any]:
        try:
            resp = await self._send(
                "POST",
                "/restapi/oauth/token",
                endpoint="token",
                headers={"Authorization": self._basic, "Accept": "application/json"},
                data=form,
            )
            body = self._json(resp, "token")
            self._raise_for(resp, body, "token")
            if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
                raise self._bad_body("token", resp.status)
        except ApiError as exc:
            result = "rate_limited" if isinstance(exc, RateLimited) else "error"
            if 400 <= exc.status < 500 and not isinstance(exc, RateLimited):
                result = "rejected"
            self._metrics.token_refreshes.labels(grant, result).inc()
            raise
        self._metrics.token_refreshes.labels(grant, "ok").inc()
        return body

    def _store_tokens(self, body: Mapping[str, Any]) -> None:
        now = self._wall()
        expires_in = _number(body.get("expires_in"), 3600.0)
        refresh = body.get("refresh_token")
        refresh_in = body.get("refresh_token_expires_in")
        self._generation += 1
        self._tokens = _Tokens(
            access=str(body["access_token"]),
            refresh=refresh if isinstance(refresh, str) else None,
            expires_at=now + expires_in,
            ttl=expires_in,
            refresh_expires_at=now + _number(refresh_in, 0.0) if refresh_in is not None else None,
            generation=self._generation,
        )
        owner = body.get("owner_id")
        if owner is not None:
            self.owner_id = str(owner)
        scope = body.get("scope")
        self.scope = scope if isinstance(scope, str) else None
        self._metrics.token_expiry.set(now + expires_in)

    def _needs_refresh(self, tokens: _Tokens | None) -> bool:
        if tokens is None:
            return True
        # Short-lived tokens (tests, clamped TTLs) refresh when a tenth of their life is left.
        margin = min(REFRESH_MARGIN, tokens.ttl * 0.1)
        return tokens.expires_at - self._wall() <= margin

    async def _ensure_token(self, stale_generation: int | None = None) -> _Tokens:
        """A usable access token. ``stale_generation``: the token that just got a 401."""
        tokens = self._tokens
        if tokens is not None and not self._needs_refresh(tokens) and tokens.generation != stale_generation:
            return tokens
        async with self._auth_lock:
            tokens = self._tokens
            # Someone else may have refreshed while we waited for the lock.
            if (
                tokens is not None
                and not self._needs_refresh(tokens)
                and tokens.generation != stale_generation
            ):
                return tokens
            if tokens is None:
                await self._grant_jwt()
            else:
                await self._refresh()
            assert self._tokens is not None
            return self._tokens

    async def ws_token(self) -> WsToken:
        """``POST /restapi/oauth/wstoken``: the WS URL and a fresh single-use ws access token."""
        resp, body = await self._call("POST", "/restapi/oauth/wstoken", endpoint="wstoken")
        if not isinstance(body, dict):
            raise self._bad_body("wstoken", resp.status)
        uri, token = body.get("uri"), body.get("ws_access_token")
        if not isinstance(uri, str) or not isinstance(token, str) or not uri or not token:
            raise self._bad_body("wstoken", resp.status)
        return WsToken(uri=uri, token=token, expires_in=_number(body.get("expires_in"), 30.0))

    def ws_token_wait(self) -> float:
        """Seconds before :meth:`ws_token` could be sent (the Auth group's budget); 0: now."""
        group = self._group_of("POST", "wstoken", "/restapi/oauth/wstoken")
        return self.budget.delay(group, asyncio.get_running_loop().time())

    async def aclose(self) -> None:
        """Revoke the session's token, best effort: errors are logged and ignored (docs/ringcentral.md §1)."""
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            return
        try:
            async with asyncio.timeout(REVOKE_TIMEOUT.total):
                await self._send(
                    "POST",
                    "/restapi/oauth/revoke",
                    endpoint="revoke",
                    headers={"Authorization": self._basic},
                    data={"token": tokens.access},
                    client_timeout=REVOKE_TIMEOUT,
                    wait_budget=False,
                )
        except (ApiError, TimeoutError) as exc:
            log.info("auth.revoke_failed", error=type(exc).__name__)

    # ------------------------------------------------------------------ message store

    def _ext(self, extension_id: str) -> str:
        return f"/restapi/v1.0/account/~/extension/{extension_id}"

    async def message_sync(
        self,
        extension_id: str,
        sync_token: str | None,
        *,
        date_from: datetime | None = None,
        record_count: int = 250,
    ) -> SyncResult:
        """ISync with ``sync_token``; FSync of the Fax box from ``date_from`` when there is none.

        An ISync sends only ``syncType`` and ``syncToken``: the token carries the sync frame, and a
        ``dateFrom`` (or ``recordCount``) on an ISync would redefine that frame (RingCentral's
        message-sync guide, "ISync Request"), so ``date_from`` with a token is refused.

        Raises :class:`SyncTokenStale` when an ISync is refused with 400, whatever the code
        (MSG-333, CMN-101, ...): the caller then drops the token and runs FSync.
        """
        params: list[tuple[str, str]]
        if sync_token is None:
            params = [("syncType", "FSync"), ("messageType", "Fax"), ("recordCount", str(record_count))]
            if date_from is not None:
                params.append(("dateFrom", _iso(date_from)))
        elif date_from is not None:
            raise ValueError("date_from applies to a full sync only; an ISync keeps the token's frame")
        else:
            params = [("syncType", "ISync"), ("syncToken", sync_token)]
        try:
            resp, body = await self._call(
                "GET", f"{self._ext(extension_id)}/message-sync", endpoint="message-sync", params=params
            )
        except ApiError as exc:
            if sync_token is not None and exc.status == 400:
                raise SyncTokenStale(exc.status, exc.code, exc.message) from None
            raise
        if not isinstance(body, dict):
            raise self._bad_body("message-sync", resp.status)
        records, info = body.get("records"), body.get("syncInfo")
        if not isinstance(records, list) or not isinstance(info, dict):
            raise self._bad_body("message-sync", resp.status)
        token = info.get("syncToken")
        if not isinstance(token, str) or not token:
            raise self._bad_body("message-sync", resp.status)
        return SyncResult(
            records=[r for r in records if isinstance(r, dict)],
            sync_token=token,
            older_records_exist=bool(info.get("olderRecordsExist", False)),
        )

    async def get_messages(self, extension_id: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Records by id: ``None`` for ids RingCentral does not know (404).

        Ids whose bulk entry failed otherwise (5xx per item) are left out of the result, so the
        caller asks again later; so are ids whose part cannot be proven theirs (a record whose ``id``
        differs from its status entry's href, or that was not asked: a bad body, counted). Every
        record returned is filed under its own ``id``. One id is a plain GET; more are bulk GETs of
        at most 50 ids.
        """
        unique = list(dict.fromkeys(str(i) for i in ids))
        result: dict[str, dict[str, Any] | None] = {}
        for start in range(0, len(unique), BULK_MAX):
            chunk = unique[start : start + BULK_MAX]
            if len(chunk) == 1:
                result.update(await self._get_one(extension_id, chunk[0]))
            else:
                result.update(await self._get_bulk(extension_id, chunk))
        return result

    async def _get_one(self, extension_id: str, message_id: str) -> dict[str, dict[str, Any] | None]:
        try:
            resp, body = await self._call(
                "GET", f"{self._ext(extension_id)}/message-store/{message_id}", endpoint="message-get"
            )
        except ApiError as exc:
            # A 404 naming the message: RingCentral dropped it. One naming the extension is raised.
            if exc.status == 404 and not isinstance(exc, ExtensionNotFound):
                return {message_id: None}
            raise
        if not isinstance(body, dict) or str(body.get("id")) != message_id:
            raise self._bad_body("message-get", resp.status)
        return {message_id: body}

    async def _get_bulk(self, extension_id: str, chunk: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        path = f"{self._ext(extension_id)}/message-store/{','.join(chunk)}"
        resp, _ = await self._call("GET", path, endpoint="message-bulk-get", parse=False)
        try:
            entries = _bulk_entries(resp)
        except ValueError as exc:
            log.warning("api.bad_bulk_body", reason=str(exc), status=resp.status)
            raise self._bad_body("message-bulk-get", resp.status) from None
        result: dict[str, dict[str, Any] | None] = {}
        asked = set(chunk)
        mismatched = 0
        for status, named, body in entries:
            # A part is filed by the id it proves: a record by its own "id" (which the status entry's
            # href, when there is one, must name too); an error part, which carries no id, by the
            # href of its status entry (RingCentral documents the entries and the parts in the same
            # order). Anything else is a bad body: never filed, so the id is asked again later.
            body_id = str(body["id"]) if isinstance(body, dict) and body.get("id") is not None else None
            ident = body_id if 200 <= status < 300 else named
            if (
                ident is None
                or ident not in asked
                or ident in result
                or (body_id is not None and named is not None and body_id != named)
                or (200 <= status < 300 and not isinstance(body, dict))
            ):
                mismatched += 1
                log.warning("api.bulk_part_mismatch", status=status, named=named, body_id=body_id)
                continue
            if 200 <= status < 300:
                assert isinstance(body, dict)
                result[ident] = body
            elif status == 404 and _parameter_of(body) == "extensionId":
                raise ExtensionNotFound(status, error_code_of(body), _message_of(body))
            elif status == 404:
                result[ident] = None
            else:
                log.warning("api.bulk_item_failed", status=status, code=error_code_of(body))
        if mismatched:
            self._metrics.api_bad_bodies.labels("message-bulk-get").inc()
        return result

    async def extension_info(self, extension_id: str) -> dict[str, Any]:
        """``GET …/extension/{id}`` (Light): the extension's id, number, name, type and status."""
        resp, body = await self._call("GET", self._ext(extension_id), endpoint="extension-get")
        if not isinstance(body, dict):
            raise self._bad_body("extension-get", resp.status)
        return body

    async def latest_messages(
        self, extension_id: str, *, message_type: str = "Fax", per_page: int = 1
    ) -> list[dict[str, Any]]:
        """``GET …/message-store`` (Light): the newest records of one type (of the last 24 h)."""
        params = [("messageType", message_type), ("perPage", str(per_page))]
        resp, body = await self._call(
            "GET", f"{self._ext(extension_id)}/message-store", endpoint="message-list", params=params
        )
        records = body.get("records") if isinstance(body, dict) else None
        if not isinstance(records, list):
            raise self._bad_body("message-list", resp.status)
        return [r for r in records if isinstance(r, dict)]

    async def get_content(self, extension_id: str, message_id: str, attachment_id: str) -> tuple[str, bytes]:
        """``GET …/message-store/{id}/content/{attachmentId}`` (Medium): (content type, bytes) of one
        attachment, e.g. a received fax's PDF."""
        path = f"{self._ext(extension_id)}/message-store/{message_id}/content/{attachment_id}"
        resp, _ = await self._call(
            "GET", path, endpoint="message-content", parse=False, client_timeout=CONTENT_TIMEOUT, accept="*/*"
        )
        return resp.content_type or "application/octet-stream", resp.body

    # ------------------------------------------------------------------ fax

    async def send_fax(
        self,
        extension_id: str,
        *,
        to: Sequence[str],
        documents: Sequence[Document],
        cover_text: str | None = None,
        resolution: str | None = None,
        cover_index: int | None = None,
    ) -> dict[str, Any]:
        """``POST …/fax`` (Heavy): the new fax record, normally ``Queued``.

        ``cover_index``: 0 = no cover page, 1-13 = one of the account's; None leaves the choice to
        the account's default cover page. Raises ValueError, before any request, without documents:
        the spec's fax request requires an ``attachment``.
        """
        if not documents:
            raise ValueError("a fax needs at least one document (RingCentral requires an attachment)")
        envelope: dict[str, Any] = {"to": [{"phoneNumber": p} for p in to]}
        if resolution is not None:
            envelope["faxResolution"] = resolution
        if cover_index is not None:
            envelope["coverIndex"] = cover_index
        if cover_text is not None:
            envelope["coverPageText"] = cover_text

        def form() -> aiohttp.FormData:
            data = aiohttp.FormData(quote_fields=False)
            data.add_field(
                "json", json.dumps(envelope), content_type="application/json", filename="request.json"
            )
            for doc in documents:
                data.add_field("attachment", doc.data, content_type=doc.content_type, filename=doc.name)
            return data

        return await self._post_fax(extension_id, "fax-send", form)

    async def resend_fax(
        self, extension_id: str, original_id: str, *, to: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """``POST …/fax`` (Heavy) with a JSON body ``{"originalMessageId": …}``: RingCentral sends the
        fax ``original_id`` again as a new message (the same document, cover page and resolution) and
        returns its record. ``to``: only these numbers; None: the original's recipients."""
        payload: dict[str, Any] = {"originalMessageId": original_id}
        if to is not None:
            payload["to"] = [{"phoneNumber": p} for p in to]
        body_text = json.dumps(payload)

        def body() -> aiohttp.BytesPayload:
            return aiohttp.BytesPayload(body_text.encode(), content_type="application/json")

        return await self._post_fax(extension_id, "fax-resend", body)

    async def _post_fax(
        self, extension_id: str, endpoint: str, data: Callable[[], aiohttp.FormData | aiohttp.BytesPayload]
    ) -> dict[str, Any]:
        """``POST …/fax`` (a send or a resend): the new message's record."""
        resp, body = await self._call(
            "POST",
            f"{self._ext(extension_id)}/fax",
            endpoint=endpoint,
            data=data,
            client_timeout=SEND_TIMEOUT,
        )
        if not isinstance(body, dict):
            raise self._bad_body(endpoint, resp.status)
        return body

    # ------------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        params: Sequence[tuple[str, str]] | None = None,
        data: Callable[[], Any] | None = None,
        client_timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        parse: bool = True,
        accept: str = "application/json",
    ) -> tuple[_Response, Any]:
        """A Bearer request: proactive refresh, one refresh + retry after a 401, errors raised."""
        stale: int | None = None
        for attempt in (1, 2):
            tokens = await self._ensure_token(stale)
            resp = await self._send(
                method,
                path,
                endpoint=endpoint,
                headers={"Authorization": f"Bearer {tokens.access}", "Accept": accept},
                params=params,
                data=data() if data is not None else None,
                client_timeout=client_timeout,
            )
            if resp.status == 401 and attempt == 1:
                log.info("auth.unauthorized_retry", endpoint=endpoint)
                stale = tokens.generation
                continue
            if not parse:
                self._raise_for(resp, _maybe_json(resp), endpoint)
                return resp, None
            body = self._json(resp, endpoint) if resp.body or resp.status < 300 else None
            self._raise_for(resp, body, endpoint)
            return resp, body
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        headers: Mapping[str, str],
        params: Sequence[tuple[str, str]] | None = None,
        data: Any = None,
        client_timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        wait_budget: bool = True,
    ) -> _Response:
        """One HTTP exchange, admitted by the rate budget; 429 and 5xx raised, rest returned."""
        group = self._group_of(method, endpoint, path)
        loop = asyncio.get_running_loop()
        request = _Request(method, path, endpoint, headers, params, data, client_timeout)
        async with self._admit(group, wait=wait_budget) as started:
            try:
                resp = await self._exchange(request, started)
            finally:
                answered = loop.time()
                self.budget.answered(group, started, answered)
            group = self._account(request, resp, group, answered)
            self._raise_if_throttled(resp, endpoint, group)
        return resp

    @contextlib.asynccontextmanager
    async def _admit(self, group: str, *, wait: bool) -> AsyncIterator[float]:
        """Until one request of ``group`` may go: yields the loop time it is counted at (send it then).

        The running grant's permit when there is one (never waits: :class:`BudgetDeferred`), else a
        one-request grant of the gate, else (no gate) a wait for the budget here. ``wait=False``
        (the revoke while stopping, best effort) counts the request and sends it at once.
        """
        loop = asyncio.get_running_loop()
        permit = _permit.get()
        if not wait:
            now = loop.time()
            self.budget.spent(group, now)
            yield now
        elif permit is not None:
            now = loop.time()
            if not permit.take(group, now):
                log.debug("api.deferred", group=group)
                raise BudgetDeferred(group)
            yield now
        elif self._gate is not None:
            async with self._single(group) as single:
                now = loop.time()
                if not single.take(group, now):  # pragma: no cover - a one-request grant reserved it
                    raise BudgetDeferred(group)
                yield now
        else:
            await self._wait_for_budget(group)
            now = loop.time()
            self.budget.spent(group, now)
            yield now

    @contextlib.asynccontextmanager
    async def _single(self, group: str) -> AsyncIterator[Permit]:
        """The gate's one-request grant; once :meth:`stop_waiting` was called, only if it comes at
        once (``STOP_PATIENCE``), else :class:`Stopping`: a stopping faxd starts no request that would
        have to wait for budget."""
        assert self._gate is not None
        if not self._stopping.is_set():
            async with self._gate.single(group) as permit:
                yield permit
            return
        try:
            async with self._gate.single(group, wait=STOP_PATIENCE) as permit:
                yield permit
        except ApiError as exc:
            if exc.code == "budget_timeout":
                raise Stopping(group) from None
            raise

    async def _wait_for_budget(self, group: str) -> None:
        """Without a gate only (``faxd doctor``, this module's tests): wait until the budget allows."""
        loop = asyncio.get_running_loop()
        while (delay := self.budget.delay(group, loop.time())) > 0:
            if self._stopping.is_set():
                raise Stopping(group)
            log.debug("api.rate_wait", group=group, seconds=round(delay, 3))
            # Woken early by stop_waiting(): a stop must not spend its deadline waiting for budget.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    async def _exchange(self, request: _Request, started: float) -> _Response:
        """The HTTP request itself, counted; a failure to get any answer is an ApiError with status 0."""
        endpoint = request.endpoint
        try:
            async with self._http.request(
                request.method,
                self._server + request.path,
                headers={**request.headers, **self._forward_headers},
                params=list(request.params) if request.params is not None else None,
                data=request.data,
                timeout=request.timeout,
                allow_redirects=False,
                proxy=self._proxy.url if self._proxy is not None else None,
                proxy_headers=self._proxy_headers or None,
            ) as r:
                body = await r.read()
                resp = _Response(r.status, r.headers, body)
        except TimeoutError:
            self._count(endpoint, "timeout", started)
            raise ApiError(0, "timeout", f"{endpoint} timed out") from None
        except aiohttp.ClientHttpProxyError as exc:
            raise self._proxy_refused(endpoint, exc.status, exc.message, started) from None
        except aiohttp.ClientProxyConnectionError:
            self._count(endpoint, "connection", started)
            raise ApiError(0, "connection", f"{endpoint}: cannot connect to the proxy") from None
        except aiohttp.ClientError as exc:
            self._count(endpoint, "connection", started)
            raise ApiError(0, "connection", f"{endpoint}: {type(exc).__name__}") from None
        if resp.status == 407:  # only a proxy says this: one that forwards plain http
            raise self._proxy_refused(endpoint, 407, "", started)
        self._count(endpoint, str(resp.status), started)
        return resp

    def _account(self, request: _Request, resp: _Response, group: str, counted_at: float) -> str:
        """Feed the response's rate-limit headers to the budget and the metrics; returns the group the
        request counted in (in the budget from ``counted_at``, when it was answered)."""
        # The server says which group it counted the request in (header names are case-insensitive
        # here, values are matched case-insensitively): that wins over the local table, for this
        # response's accounting and for the next request of this endpoint.
        server_group = ratebudget.group_name(resp.headers.get("X-Rate-Limit-Group"))
        if server_group is not None:
            if server_group != group:
                log.info("api.rate_group", endpoint=request.endpoint, ours=group, server=server_group)
                self.budget.moved(group, server_group, counted_at)
                group = server_group
            self._server_groups[(request.method, request.endpoint)] = server_group
        if self.on_response is not None:
            self.on_response(request.method, request.path, resp.status, resp.headers)
        limit, remaining, window = ratebudget.parse_headers(resp.headers)
        # On a 429 the server's Retry-After governs; its "Remaining: 0" would add a whole window.
        observed_remaining = None if resp.status == 429 else remaining
        now = asyncio.get_running_loop().time()
        self.budget.observed(group, now, limit=limit, remaining=observed_remaining, window=window)
        if remaining is not None:
            self._metrics.rate_remaining.labels(group).set(remaining)
        if limit is not None:
            self._metrics.rate_limit.labels(group).set(limit)
        return group

    def _raise_if_throttled(self, resp: _Response, endpoint: str, group: str) -> None:
        """A 429 (RateLimited) or a 5xx (ApiError), after holding ``group`` back as the server asks."""
        loop = asyncio.get_running_loop()
        if resp.status == 429:
            retry_after = ratebudget.parse_retry_after(resp.headers.get("Retry-After"), self._wall())
            self.budget.penalty(group, loop.time(), retry_after)
            self._metrics.rate_429.labels(group).inc()
            seconds = ratebudget.DEFAULT_RETRY_AFTER if retry_after is None else retry_after
            body_json = _maybe_json(resp)
            log.warning("api.rate_limited", endpoint=endpoint, group=group, retry_after=seconds)
            raise RateLimited(
                429,
                error_code_of(body_json) or "http_429",
                _message_of(body_json),
                group=group,
                retry_after=seconds,
            )
        if resp.status >= 500:
            # RingCentral's errors doc: Retry-After "should always be obeyed if provided" (its
            # /oauth/token 503s carry it). The owner of the work obeys it (the scheduler, for that key
            # only: docs/scheduler.md §5); holding the whole group would stop push for every extension.
            after = ratebudget.parse_retry_after(resp.headers.get("Retry-After"), self._wall())
            if after is not None:
                after = min(after, MAX_SERVER_RETRY_AFTER)
            log.warning("api.server_error", endpoint=endpoint, status=resp.status, retry_after=after)
            raise ApiError(
                resp.status, f"http_{resp.status}", _message_of(_maybe_json(resp)), retry_after=after
            )

    def _proxy_refused(self, endpoint: str, status: int, reason: str, started: float) -> ApiError:
        """The proxy would not connect us; status 0, as a 4xx would read as RingCentral's verdict."""
        code = f"proxy_{status}"
        self._count(endpoint, code, started)
        detail = (reason or "").strip()[:80] or {407: "Proxy Authentication Required"}.get(status, "")
        log.warning("api.proxy_refused", endpoint=endpoint, status=status, proxy=self._proxy_url())
        message = f"{endpoint}: the proxy refused the connection: HTTP {status} {detail}"
        return ApiError(0, code, message.rstrip())

    def _proxy_url(self) -> str | None:
        return self._proxy.url if self._proxy is not None else None

    def _group_of(self, method: str, endpoint: str, path: str) -> str:
        """The group a request is paced in: the one the server last named for it, else the table's."""
        return self._server_groups.get((method, endpoint)) or ratebudget.classify(method, path)

    def _count(self, endpoint: str, code: str, started: float) -> None:
        self._metrics.api_requests.labels(endpoint, code).inc()
        self._metrics.api_latency.labels(endpoint).observe(asyncio.get_running_loop().time() - started)

    def _json(self, resp: _Response, endpoint: str) -> Any:
        try:
            return _loads(resp.body)
        except ValueError:
            if resp.status < 300:
                raise self._bad_body(endpoint, resp.status) from None
            return None

    def _bad_body(self, endpoint: str, status: int) -> ApiError:
        self._metrics.api_bad_bodies.labels(endpoint).inc()
        log.warning("api.bad_body", endpoint=endpoint, status=status)
        return ApiError(status, "bad_body", f"{endpoint}: unexpected response body")

    def _raise_for(self, resp: _Response, body: Any, endpoint: str) -> None:
        if resp.status < 400:
            return
        code = error_code_of(body) or f"http_{resp.status}"
        message = _message_of(body)
        log.info("api.error", endpoint=endpoint, status=resp.status, code=code)
        if resp.status == 404 and _parameter_of(body) == "extensionId":
            raise ExtensionNotFound(resp.status, code, message)
        raise ApiError(resp.status, code, message)


# ---------------------------------------------------------------------- helpers


def _loads(data: bytes) -> Any:
    """``json.loads``, with JSON nested too deeply for the parser reported as the ValueError it is."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond float range
        return default
    return number if math.isfinite(number) else default  # "nan"/"inf" are no number of seconds


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _maybe_json(resp: _Response) -> Any:
    try:
        return _loads(resp.body)
    except ValueError:
        return None


def _message_of(body: Any) -> str:
    """The human message of an error body, cut short; RingCentral messages hold no secrets."""
    if not isinstance(body, dict):
        return ""
    errors = body.get("errors")
    candidates: list[Any] = []
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        candidates.append(errors[0].get("message"))
    candidates += [body.get("message"), body.get("error_description"), body.get("description")]
    for c in candidates:
        if isinstance(c, str) and c:
            return c[:200]
    return ""


def _parameter_of(body: Any) -> str | None:
    """The parameter an error body names (``parameterName``, or ``[name]`` in its message)."""
    if not isinstance(body, dict):
        return None
    errors = body.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    for named in (first.get("parameterName"), body.get("parameterName")):
        if isinstance(named, str) and named:
            return named
    for text in (first.get("message"), body.get("message")):
        if isinstance(text, str) and (found := _BRACKETED.search(text)):
            return found.group(1)
    return None


_BRACKETED = re.compile(r"\[([A-Za-z]+)\]")
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


_BulkEntry = tuple[int, str | None, Any]


def _bulk_entries(resp: _Response) -> list[_BulkEntry]:
    """(status, resource id or None, body) per id of a 207 bulk GET; ValueError if unreadable."""
    if resp.content_type.startswith("multipart/"):
        return _multipart_bulk_entries(resp)
    # The JSON variant (Accept: application/vnd.ringcentral.multipart+json), or a plain array.
    try:
        doc = _loads(resp.body)
    except ValueError:
        raise ValueError("neither multipart nor JSON") from None
    if isinstance(doc, dict) and isinstance(doc.get("response"), list):
        doc = doc["response"]
    if not isinstance(doc, list):
        raise ValueError("JSON bulk body not an array")
    out: list[_BulkEntry] = []
    for item in doc:
        if not isinstance(item, dict) or isinstance(item.get("status"), bool):
            raise ValueError("bad JSON bulk entry")
        status = item.get("status")
        if not isinstance(status, int):
            raise ValueError("JSON bulk entry without status")
        rid = item.get("resourceId")
        out.append((status, None if rid is None else str(rid), item.get("body")))
    return out


def _multipart_bulk_entries(resp: _Response) -> list[_BulkEntry]:
    """The multipart/mixed variant: a first part with ``response[]`` statuses, then one part per id."""
    match = _BOUNDARY.search(resp.headers.get("Content-Type", ""))
    if not match:
        raise ValueError("multipart without boundary")
    parts = parse_multipart(resp.body, match.group(1))
    if not parts:
        raise ValueError("empty multipart")
    head = _part_json(parts[0][1])
    statuses = head.get("response") if isinstance(head, dict) else None
    if not isinstance(statuses, list):
        raise ValueError("first part without response[]")
    entries: list[_BulkEntry] = []
    for i, item in enumerate(statuses):
        if not isinstance(item, dict):
            raise ValueError("bad status entry")
        status = item.get("status")
        if isinstance(status, bool) or not isinstance(status, int):
            raise ValueError("status entry without status")
        href = item.get("href")
        rid = href.rstrip("/").rsplit("/", 1)[-1] if isinstance(href, str) and href else None
        body = _part_json(parts[i + 1][1]) if i + 1 < len(parts) else None
        entries.append((status, rid, body))
    return entries


def _part_json(data: bytes) -> Any:
    try:
        return _loads(data)
    except ValueError:
        return None


def parse_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a MIME multipart body into (headers, payload) parts.

    Tolerates CRLF or bare LF line ends, a preamble and epilogue, and a missing closing
    delimiter; raises ValueError when no delimiter is found at all.
    """
    delimiter = b"--" + boundary.encode()
    chunks = body.split(delimiter)
    if len(chunks) < 2:
        raise ValueError("no multipart delimiter")
    parts: list[tuple[dict[str, str], bytes]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter; the rest is epilogue
        # The delimiter line ends with CRLF/LF; the part ends with the CRLF/LF before the next one.
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:] if chunk.startswith(b"\n") else chunk
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]
        elif chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        if not chunk.strip():
            continue  # what follows a last delimiter that lacks its closing "--"
        if chunk.startswith((b"\r\n", b"\n")):
            head, payload = b"", chunk.lstrip(b"\r").removeprefix(b"\n")  # a part without headers
        else:
            head, sep, payload = chunk.partition(b"\r\n\r\n")
            if not sep:
                head, sep, payload = chunk.partition(b"\n\n")
            if not sep:
                head, payload = b"", chunk
        headers: dict[str, str] = {}
        for line in head.replace(b"\r\n", b"\n").split(b"\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
    return parts
