"""The REST half of the simulator: OAuth endpoints and the message store API (aiohttp).

Routes (docs/ringcentral.md §1, §4): ``/restapi/oauth/{token,revoke,wstoken}``; under
``/restapi/v1.0/account/{accountId}/extension/{extensionId}``: ``message-store`` list,
``message-store/{id}`` single and bulk (207) GET and DELETE, attachment content,
``message-sync`` FSync/ISync and ``fax`` send. A middleware records every request, applies
injected 5xx faults and the per-group rate limits, and adds the ``X-Rate-Limit-*`` headers.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import BodyPartReader, hdrs, web
from multidict import MultiMapping

from faxd.sim.auth import AccessToken, TokenStore
from faxd.sim.common import (
    ApiError,
    JsonDict,
    RecordedRequest,
    Timers,
    api_error,
    invalid_parameter,
    iso,
    not_found,
    parse_iso,
)
from faxd.sim.config import SimConfig
from faxd.sim.observe import ObserverSet, ServedJson
from faxd.sim.ratelimit import RateLimiter, Verdict, rate_exceeded_body
from faxd.sim.store import (
    AVAILABILITIES,
    DIRECTIONS,
    MESSAGE_TYPES,
    READ_STATUSES,
    Message,
    MessageStore,
    count_pdf_pages,
    digits_of,
)

EXT = "/restapi/v1.0/account/{accountId}/extension/{extensionId}"
MULTIPART_JSON = "application/vnd.ringcentral.multipart+json"
BULK_LIMIT = 50

#: (method, route template) -> throttling group, from the spec's ``x-throttling-group``.
GROUPS: dict[tuple[str, str], str] = {
    ("POST", "/restapi/oauth/token"): "Auth",
    ("POST", "/restapi/oauth/revoke"): "Auth",
    ("POST", "/restapi/oauth/wstoken"): "Auth",
    ("GET", EXT): "Light",
    ("GET", EXT + "/message-store"): "Light",
    ("GET", EXT + "/message-store/{messageId}"): "Light",
    ("DELETE", EXT + "/message-store/{messageId}"): "Medium",
    ("GET", EXT + "/message-store/{messageId}/content/{attachmentId}"): "Medium",
    ("GET", EXT + "/message-sync"): "Light",
    ("POST", EXT + "/fax"): "Heavy",
}

_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        headers={**_JSON_HEADERS, **(headers or {})},
    )


@dataclass
class Faults:
    """REST-level faults armed through the control API."""

    fail_next: int = 0
    fail_status: int = 503
    fail_html: bool = False
    fail_match: str | None = None  # only requests whose path_qs contains this
    fail_retry_after: str | None = "1"  # the Retry-After header of the failures; None: none
    bulk_next: int = 0  # bulk GETs still to get bulk_mode
    bulk_mode: str = "shuffle"
    delay_next: int = 0
    delay_seconds: float = 0.0
    delay_match: str | None = None  # only requests whose path_qs contains this
    #: the ``Date`` header of every REST response is off by this many seconds
    date_skew: float = 0.0
    #: extensions whose message store and message-sync GETs answer 403 CMN-408 (no ReadMessages)
    unreadable: frozenset[str] = frozenset()


class RestApi:
    """Handlers for the RingCentral REST endpoints."""

    def __init__(
        self,
        config: SimConfig,
        tokens: TokenStore,
        store: MessageStore,
        limiter: RateLimiter,
        timers: Timers,
        wall_clock: Callable[[], datetime],
        requests: list[RecordedRequest],
        ws_url: Callable[[], str],
        ws_handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        observers: ObserverSet | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.store = store
        self.limiter = limiter
        self.timers = timers
        self.wall = wall_clock
        self.requests = requests
        self.ws_url = ws_url
        self.ws_handler = ws_handler
        self.faults = Faults()
        self.observers = observers or ObserverSet()
        #: (method, route-template suffix, group): the server counts those requests in that group,
        #: whatever GROUPS (the spec's x-throttling-group) says.
        self.group_overrides: list[tuple[str, str, str]] = []
        #: Extensions deleted from the account (the remove-extension fault): 404 CMN-102 extensionId.
        self.removed_extensions: set[str] = set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/restapi/oauth/token", self.token)
        app.router.add_post("/restapi/oauth/revoke", self.revoke)
        app.router.add_post("/restapi/oauth/wstoken", self.wstoken)
        app.router.add_get("/restapi", self.api_versions)
        app.router.add_get(EXT, self.extension_info)
        app.router.add_get(EXT + "/message-store", self.list_messages)
        app.router.add_get(EXT + "/message-store/{messageId}", self.get_messages)
        app.router.add_delete(EXT + "/message-store/{messageId}", self.delete_message)
        app.router.add_get(EXT + "/message-store/{messageId}/content/{attachmentId}", self.get_content)
        app.router.add_get(EXT + "/message-sync", self.message_sync)
        app.router.add_post(EXT + "/fax", self.send_fax)
        app.router.add_get("/ws", self.ws_handler)
        app.on_response_prepare.append(self._date_header)

    async def _date_header(self, request: web.Request, response: web.StreamResponse) -> None:
        """The skew_date fault: a server clock that is off (aiohttp keeps a Date already set)."""
        skew = self.faults.date_skew
        if skew and not request.path.startswith("/_sim/"):
            moment = self.wall() + timedelta(seconds=skew)
            response.headers[hdrs.DATE] = format_datetime(moment.astimezone(UTC), usegmt=True)

    # -- middleware ------------------------------------------------------------------------
    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_sim/") or path == "/ws":
            return await handler(request)
        resource = request.match_info.route.resource
        template = resource.canonical if resource is not None else path
        group = self.group_of(request.method, template)
        now = self.timers.now()

        def record(status: int) -> None:
            self.requests.append(
                RecordedRequest(request.method, template, group, status, now, "http", request.path_qs)
            )

        faults = self.faults
        if faults.delay_next > 0 and (faults.delay_match is None or faults.delay_match in request.path_qs):
            faults.delay_next -= 1
            await asyncio.sleep(faults.delay_seconds)
        if faults.fail_next > 0 and (faults.fail_match is None or faults.fail_match in request.path_qs):
            faults.fail_next -= 1
            record(faults.fail_status)
            failure = self._failure(faults.fail_status, faults.fail_html, faults.fail_retry_after)
            self._observe(request, template, failure)
            return failure
        verdict: Verdict | None = self.limiter.check(group) if group is not None else None
        if verdict is not None and not verdict.allowed:
            record(429)
            refused = json_response(rate_exceeded_body(), 429, verdict.headers())
            self._observe(request, template, refused)
            return refused
        try:
            response = await handler(request)
        except ApiError as err:
            response = json_response(err.body, err.status, err.headers)
        except web.HTTPNotFound:
            response = json_response(api_error("CMN-120", "Invalid URI"), 404)
        except web.HTTPMethodNotAllowed:
            response = json_response(api_error("CMN-405", f"Method [{request.method}] is not allowed"), 405)
        if verdict is not None:
            response.headers.update(verdict.headers())
        record(response.status)
        self._observe(request, template, response)
        return response

    def group_of(self, method: str, template: str) -> str | None:
        """The throttling group the server counts a request in: an override, else the spec's."""
        for override_method, suffix, group in reversed(self.group_overrides):
            if override_method == method and template.endswith(suffix):
                return group
        return GROUPS.get((method, template))

    def _observe(self, request: web.Request, template: str, response: web.StreamResponse) -> None:
        """Show every JSON body of ``response`` (and of its multipart parts) to the observers."""
        if not self.observers.active or not isinstance(response, web.Response) or response.body is None:
            return
        ctype = response.content_type
        raw = response.body
        if not isinstance(raw, bytes | bytearray):
            return
        if ctype == "application/json" or ctype.endswith("+json"):
            self.observers(
                ServedJson(
                    "http",
                    "response",
                    request.method,
                    template,
                    response.status,
                    ctype,
                    json.loads(raw),
                    request.path_qs,
                )
            )
        elif ctype == "multipart/mixed":
            boundary = response.headers[hdrs.CONTENT_TYPE].partition("boundary=")[2]
            parts = [(t, json.loads(d)) for t, d in _split_multipart(bytes(raw), boundary)]
            # part 0 is the summary; part i has the status of the summary's entry i-1
            statuses = (
                [response.status] + [int(entry.get("status", 0)) for entry in parts[0][1].get("response", [])]
                if parts and isinstance(parts[0][1], dict)
                else []
            )
            for index, (part_type, body) in enumerate(parts):
                status = statuses[index] if index < len(statuses) else response.status
                self.observers(
                    ServedJson(
                        "http",
                        "part",
                        request.method,
                        template,
                        status,
                        part_type,
                        body,
                        request.path_qs,
                        index,
                    )
                )

    @staticmethod
    def _failure(status: int, html: bool, retry_after: str | None) -> web.Response:
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        if html:
            return web.Response(
                status=status,
                text="<html><head><title>503 Service Temporarily Unavailable</title></head>"
                "<body><h1>Service Temporarily Unavailable</h1></body></html>",
                content_type="text/html",
                headers=headers,
            )
        return json_response(api_error("CMN-201", "Service Temporary Unavailable"), status, headers)

    # -- helpers ---------------------------------------------------------------------------
    def _auth(self, request: web.Request) -> AccessToken:
        return self.tokens.authenticate(request.headers.get(hdrs.AUTHORIZATION))

    def _extension(self, request: web.Request, at: AccessToken) -> str:
        account = request.match_info["accountId"]
        if account not in ("~", self.config.account_id):
            raise not_found("accountId")
        ext = request.match_info["extensionId"]
        if ext == "~":
            ext = self.tokens.owner_of(at)
        elif ext not in self.config.extensions:
            raise not_found("extensionId")
        if ext in self.removed_extensions:
            raise not_found("extensionId")
        return ext

    def _readable(self, request: web.Request, at: AccessToken) -> str:
        """``_extension``, for reading its messages: the deny_message_reads fault answers 403."""
        ext = self._extension(request, at)
        if ext in self.faults.unreadable:
            message = (
                "In order to call this API endpoint, user needs to have [ReadMessages] permission"
                " for requested resource."
            )
            body = api_error("CMN-408", message)
            body["permissionName"] = body["errors"][0]["permissionName"] = "ReadMessages"
            raise ApiError(403, body)
        return ext

    @staticmethod
    async def _form(request: web.Request) -> dict[str, str]:
        data: dict[str, str] = {}
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            post = await request.post()
            for key, value in post.items():
                if isinstance(value, str):
                    data.setdefault(key, value)
        return data

    @staticmethod
    def _enum_list(query: MultiMapping[str], name: str, allowed: tuple[str, ...]) -> list[str]:
        values = [v.strip() for raw in query.getall(name, []) for v in raw.split(",") if v.strip()]
        for v in values:
            if v not in allowed:
                raise invalid_parameter(name)
        return values

    @staticmethod
    def _date(query: MultiMapping[str], name: str) -> datetime | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return None
        try:
            return parse_iso(raw)
        except ValueError:
            raise invalid_parameter(name) from None

    @staticmethod
    def _int(query: MultiMapping[str], name: str, default: int | None, minimum: int = 1) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise invalid_parameter(name) from None
        if value < minimum:
            raise invalid_parameter(name)
        return value

    def _absolute(self, request: web.Request) -> str:
        return f"{self.store.base_url}{request.path}"

    # -- OAuth -----------------------------------------------------------------------------
    async def token(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        body = self.tokens.token(request.headers.get(hdrs.AUTHORIZATION), form)
        return json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def revoke(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        if "token" not in form and "token" in request.query:
            form["token"] = request.query["token"]
        self.tokens.revoke(request.headers.get(hdrs.AUTHORIZATION), form)
        return web.Response(status=200)

    async def wstoken(self, request: web.Request) -> web.Response:
        at = self._auth(request)
        await request.read()  # any (or no) body and content type is fine
        return json_response(self.tokens.issue_ws_token(at, self.ws_url()))

    # -- API info and extensions -----------------------------------------------------------
    async def api_versions(self, request: web.Request) -> web.Response:
        """``GET /restapi`` (readAPIVersions, not throttled; the spec's OAuth security applies)."""
        self._auth(request)
        base = self.store.base_url
        return json_response(
            {
                "uri": f"{base}/restapi",
                "apiVersions": [
                    {
                        "uri": f"{base}/restapi/v1.0",
                        "versionString": "1.0.56",
                        "releaseDate": "2023-09-01T00:00:00.000Z",
                        "uriString": "v1.0",
                    }
                ],
                "serverVersion": "faxd-sim",
                "serverRevision": "0",
            }
        )

    async def extension_info(self, request: web.Request) -> web.Response:
        """``GET …/extension/{extensionId}`` (readExtension): the few fields a client looks at."""
        at = self._auth(request)
        ext = self._extension(request, at)
        account = self.config.account_id
        base = f"{self.store.base_url}/restapi/v1.0/account/{account}"
        index = self.config.extensions.index(ext)
        return json_response(
            {
                "uri": f"{base}/extension/{ext}",
                "id": int(ext) if ext.isdigit() else ext,
                "extensionNumber": str(101 + index),
                "name": self.store.extension_party(ext)["name"],
                "type": "User",
                "status": "Enabled",
                "account": {"uri": base, "id": account},
            }
        )

    # -- message store ---------------------------------------------------------------------
    async def list_messages(self, request: web.Request) -> web.Response:
        at = self._auth(request)
        ext = self._readable(request, at)
        q = request.query
        types = self._enum_list(q, "messageType", MESSAGE_TYPES)
        directions = self._enum_list(q, "direction", DIRECTIONS)
        availability = self._enum_list(q, "availability", AVAILABILITIES) or ["Alive"]
        read_statuses = self._enum_list(q, "readStatus", READ_STATUSES)
        date_to = self._date(q, "dateTo") or self.wall()
        date_from = self._date(q, "dateFrom") or date_to - timedelta(hours=24)
        page = self._int(q, "page", 1) or 1
        per_page = min(self._int(q, "perPage", 100) or 100, 1000)
        found = self.store.select(
            ext,
            types=types,
            directions=directions,
            availabilities=availability,
            read_statuses=read_statuses,
            date_from=date_from,
            date_to=date_to,
            phone=q.get("phoneNumber") or None,
        )
        total = len(found)
        total_pages = (total + per_page - 1) // per_page
        start = (page - 1) * per_page
        records = [self.store.record(m) for m in found[start : start + per_page]]
        base = self._absolute(request)

        def page_uri(n: int) -> str:
            items = [(k, v) for k, v in q.items() if k not in ("page", "perPage")]
            items += [("page", str(n)), ("perPage", str(per_page))]
            return f"{base}?{urlencode(items)}"

        paging: JsonDict = {"page": page, "perPage": per_page}
        if records:
            paging["pageStart"] = start
            paging["pageEnd"] = start + len(records) - 1
        paging["totalPages"] = total_pages
        paging["totalElements"] = total
        navigation: JsonDict = {}
        if total_pages:
            navigation["firstPage"] = {"uri": page_uri(1)}
            if page < total_pages:
                navigation["nextPage"] = {"uri": page_uri(page + 1)}
            if 1 < page <= total_pages + 1:
                navigation["previousPage"] = {"uri": page_uri(page - 1)}
            navigation["lastPage"] = {"uri": page_uri(total_pages)}
        return json_response(
            {"uri": page_uri(page), "records": records, "paging": paging, "navigation": navigation}
        )

    async def get_messages(self, request: web.Request) -> web.StreamResponse:
        at = self._auth(request)
        ext = self._readable(request, at)
        ids = [i.strip() for i in request.match_info["messageId"].split(",")]
        if any(not i for i in ids):
            raise invalid_parameter("messageId")
        if len(ids) == 1:
            message = self.store.get(ext, ids[0])
            if message is None:
                raise not_found("messageId")
            return json_response(self.store.record(message))
        if len(ids) > BULK_LIMIT:
            raise ApiError(400, api_error("CMN-106", f"Batch request is limited to {BULK_LIMIT} entries"))
        parts: list[tuple[str, int, JsonDict]] = []
        for mid in ids:
            message = self.store.get(ext, mid)
            if message is None:
                parts.append((mid, 404, not_found("messageId").body))
            else:
                parts.append((mid, 200, self.store.record(message)))
        if self.faults.bulk_next > 0:
            self.faults.bulk_next -= 1
            parts = self._bulk_fault(ext, ids, parts, self.faults.bulk_mode)
        if MULTIPART_JSON in request.headers.get(hdrs.ACCEPT, ""):
            body = [{"resourceId": mid, "status": st, "body": b} for mid, st, b in parts]
            return web.Response(
                status=207,
                text=json.dumps(body),
                headers={"Content-Type": MULTIPART_JSON},
            )
        return self._multipart_mixed(ext, parts)

    def _bulk_fault(
        self, ext: str, ids: list[str], parts: list[tuple[str, int, JsonDict]], mode: str
    ) -> list[tuple[str, int, JsonDict]]:
        """The bulk-get fault: ``shuffle`` keeps the ids and statuses in request order but hands the
        bodies out in reverse order (among parts of one status, so each still fits its status);
        ``unasked`` answers the last id with a message of the extension that was not asked."""
        if mode == "unasked":
            extra = next((m for m in self.store.select(ext, availabilities=()) if str(m.id) not in ids), None)
            if extra is None:
                return parts
            return [*parts[:-1], (str(extra.id), 200, self.store.record(extra))]
        out = list(parts)
        for status in {st for _, st, _ in parts}:
            where = [i for i, (_, st, _) in enumerate(parts) if st == status]
            for i, j in zip(where, reversed(where), strict=True):
                out[i] = (parts[i][0], status, parts[j][2])
        return out

    def _multipart_mixed(self, ext: str, parts: list[tuple[str, int, JsonDict]]) -> web.Response:
        boundary = f"Boundary_{secrets.randbelow(10**6)}_{secrets.randbelow(10**9)}"
        base = f"{self.store.base_url}/restapi/v1.0/account/{self.config.account_id}/extension/{ext}"
        summary = {
            "response": [
                {
                    "href": f"{base}/message-store/{mid}",
                    "status": st,
                    "responseDescription": "OK" if st == 200 else "Not Found",
                }
                for mid, st, _ in parts
            ]
        }
        chunks = [summary, *(b for _, _, b in parts)]
        out = []
        for chunk in chunks:
            out.append(f"--{boundary}\r\nContent-Type: application/json\r\n\r\n")
            out.append(json.dumps(chunk, indent=2))
            out.append("\r\n")
        out.append(f"--{boundary}--\r\n")
        return web.Response(
            status=207,
            body="".join(out).encode(),
            headers={"Content-Type": f"multipart/mixed; boundary={boundary}"},
        )

    async def delete_message(self, request: web.Request) -> web.Response:
        at = self._auth(request)
        ext = self._extension(request, at)
        ids = request.match_info["messageId"].split(",")
        messages = []
        for mid in ids:
            message = self.store.get(ext, mid.strip())
            if message is None:
                raise not_found("messageId")
            messages.append(message)
        purge = request.query.get("purge", "false").lower() == "true"
        for message in messages:
            self.store.delete(message, purge=purge)
        return web.Response(status=204)

    async def get_content(self, request: web.Request) -> web.Response:
        at = self._auth(request)
        ext = self._extension(request, at)
        message = self.store.get(ext, request.match_info["messageId"])
        if message is None:
            raise not_found("messageId")
        for att in message.attachments:
            if str(att.id) == request.match_info["attachmentId"]:
                return web.Response(body=att.data, headers={"Content-Type": att.content_type})
        raise not_found("attachmentId")

    # -- message-sync ----------------------------------------------------------------------
    async def message_sync(self, request: web.Request) -> web.Response:
        at = self._auth(request)
        ext = self._readable(request, at)
        q = request.query
        token = q.get("syncToken")
        sync_type = q.get("syncType") or ("ISync" if token else "FSync")
        if sync_type not in ("FSync", "ISync"):
            raise invalid_parameter("syncType")
        if sync_type == "ISync":
            if not token:
                raise invalid_parameter("syncToken")
            changed, new_token = self.store.incremental_sync(ext, token, self._date(q, "dateFrom"))
            records = [self.store.sync_record(m) for m in changed]
            older = False
        else:
            types = tuple(self._enum_list(q, "messageType", MESSAGE_TYPES))
            directions = tuple(self._enum_list(q, "direction", DIRECTIONS))
            date_to = self._date(q, "dateTo") or self.wall()
            date_from = self._date(q, "dateFrom") or date_to - timedelta(hours=24)
            count = self._int(q, "recordCount", None)
            found, new_token, older = self.store.full_sync(ext, types, directions, date_from, date_to, count)
            records = [self.store.record(m) for m in found]
        return json_response(
            {
                "uri": f"{self._absolute(request)}?{request.query_string}",
                "records": records,
                "syncInfo": {
                    "syncType": sync_type,
                    "syncToken": new_token,
                    "syncTime": iso(self.wall()),
                    "olderRecordsExist": older,
                },
            }
        )

    # -- fax send --------------------------------------------------------------------------
    async def send_fax(self, request: web.Request) -> web.Response:
        at = self._auth(request)
        ext = self._extension(request, at)
        ctype = request.content_type
        if ctype == "application/json":
            message = await self._resend(request, ext)
            return json_response(self.store.fax_response(message))
        if not ctype.startswith("multipart/"):
            raise ApiError(415, api_error("MSG-348", f"Unsupported media type [{ctype}]"))
        envelope, fields, attachments = await _read_fax_multipart(request)
        to_raw, options = _fax_request(envelope, fields)
        recipients = _parse_recipients(to_raw)
        resolution, cover_index, cover_text = self._fax_options(options)
        if not attachments or not any(data for data, _, _ in attachments):
            raise ApiError(400, api_error("MSG-347", "Empty attachment"))
        pages = sum(count_pdf_pages(data) for data, _, _ in attachments if data)
        message = self.store.create_outbound(
            ext,
            [self.store.script_for(phone) for phone, _ in recipients],
            pages=pages,
            names=[name for _, name in recipients],
            resolution=resolution,
            cover_index=cover_index,
            cover_text=cover_text,
            attachments=attachments,
        )
        return json_response(self.store.fax_response(message))

    def _fax_options(self, options: dict[str, Any]) -> tuple[str, int | None, str | None]:
        """The resolution, cover page index and cover text of a send, checked (400 ``CMN-101``)."""
        resolution = options.get("faxResolution", "Low")
        if resolution not in ("High", "Low"):
            raise invalid_parameter("faxResolution")
        # Without coverIndex the account's default cover page is attached (the spec: "If not
        # specified, the default cover page is attached (which is configured in 'Outbound Fax
        # Settings')").
        cover_index: int | None = self.config.default_cover_index
        if options.get("coverIndex") is not None:
            try:
                cover_index = int(options["coverIndex"])
            except (TypeError, ValueError):
                raise invalid_parameter("coverIndex") from None
            if not 0 <= cover_index <= 13:
                raise invalid_parameter("coverIndex")
        cover_text = options.get("coverPageText")
        if cover_text is not None and (not isinstance(cover_text, str) or len(cover_text) > 1024):
            raise invalid_parameter("coverPageText")
        if options.get("sendTime"):
            try:
                parse_iso(str(options["sendTime"]))
            except ValueError:
                raise invalid_parameter("sendTime") from None
        return resolution, cover_index, cover_text

    async def _resend(self, request: web.Request, ext: str) -> Message:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, api_error("CMN-103", "JSON can't be parsed.")) from None
        if not isinstance(body, dict) or not body.get("originalMessageId"):
            raise invalid_parameter("originalMessageId")
        original = self.store.get(ext, str(body["originalMessageId"]))
        if original is None or original.type != "Fax" or original.direction != "Outbound":
            raise not_found("originalMessageId")
        if body.get("to"):
            recipients = _parse_recipients(list(body["to"]))
        else:
            recipients = [(r.phone, r.name) for r in original.recipients]
        return self.store.create_outbound(
            ext,
            [self.store.script_for(phone) for phone, _ in recipients],
            pages=original.page_count,
            names=[name for _, name in recipients],
            resolution=original.resolution,
            cover_index=original.cover_index,
            cover_text=original.cover_text,
            attachments=[(a.data, a.content_type, a.file_name) for a in original.attachments],
        )


def _fax_request(
    envelope: dict[str, Any] | None, fields: dict[str, list[str]]
) -> tuple[list[Any], dict[str, Any]]:
    """The raw ``to`` entries and the options of a multipart send: the JSON envelope's, then the
    plain form fields' (an envelope's value wins)."""
    to_raw: list[Any] = []
    if envelope is not None:
        value = envelope.get("to")
        if isinstance(value, list):
            to_raw.extend(value)
        elif value is not None:
            to_raw.append(value)
    for text in fields.get("to", []):
        to_raw.append(_maybe_json(text))
    options: dict[str, Any] = dict(envelope or {})
    for key in ("faxResolution", "coverIndex", "coverPageText", "sendTime", "isoCode"):
        if key in fields and key not in options:
            options[key] = fields[key][0]
    return to_raw, options


def _split_multipart(raw: bytes, boundary: str) -> list[tuple[str, bytes]]:
    """``(content type, body)`` of each part of a multipart body the simulator built."""
    out: list[tuple[str, bytes]] = []
    for chunk in raw.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.partition(b"\r\n\r\n")
        ctype = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                ctype = value.split(";")[0].strip().lower()
        out.append((ctype, data.removesuffix(b"\r\n")))
    return out


_FORM_FIELDS = ("to", "faxResolution", "coverIndex", "coverPageText", "sendTime", "isoCode")
_PHONE_RE = re.compile(r"^\+?[0-9 ().\-]+$")


def _maybe_json(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(stripped)
        except ValueError:
            return stripped
    return stripped


def normalize_phone(raw: str) -> str | None:
    """E.164 form of a fax number, or None if it is not a plausible number."""
    text = raw.strip()
    if not text or not _PHONE_RE.match(text):
        return None
    digits = digits_of(text)
    if not 7 <= len(digits) <= 15:
        return None
    if not text.startswith("+") and len(digits) == 10:
        digits = "1" + digits
    return "+" + digits


def _parse_recipients(items: list[Any]) -> list[tuple[str, str | None]]:
    flat: list[Any] = []
    for item in items:
        if isinstance(item, list):
            flat.extend(item)
        else:
            flat.append(item)
    if not flat:
        raise invalid_parameter("to")
    out: list[tuple[str, str | None]] = []
    for item in flat:
        name: str | None = None
        if isinstance(item, dict):
            raw = item.get("phoneNumber")
            name = item.get("name") if isinstance(item.get("name"), str) else None
        else:
            raw = item
        phone = normalize_phone(raw) if isinstance(raw, str) else None
        if phone is None:
            raise invalid_parameter("to.phoneNumber")
        out.append((phone, name))
    return out


async def _read_fax_multipart(
    request: web.Request,
) -> tuple[JsonDict | None, dict[str, list[str]], list[tuple[bytes, str, str | None]]]:
    """Split a fax request into the JSON envelope, plain form fields and attachments.

    Accepts ``multipart/form-data`` (JSON part named ``json`` or ``request.json``, files named
    ``attachment``/``attachments``, or plain ``to``/``faxResolution``/… fields) and
    ``multipart/mixed`` (first JSON part is the envelope, the rest are attachments).
    """
    envelope: JsonDict | None = None
    fields: dict[str, list[str]] = {}
    attachments: list[tuple[bytes, str, str | None]] = []
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                continue  # nested multipart is not used by any client
            name = part.name
            filename = part.filename
            pctype = part.headers.get(hdrs.CONTENT_TYPE, "")
            data = await part.read(decode=True)
            is_json = pctype.split(";")[0].strip().lower() == "application/json"
            if (
                envelope is None
                and is_json
                and name not in ("attachment", "attachments")
                and (name in (None, "json", "request.json") or filename == "request.json")
            ):
                try:
                    loaded = json.loads(bytes(data))
                except ValueError:
                    raise ApiError(400, api_error("MSG-349", "Unable to parse fax envelope")) from None
                if not isinstance(loaded, dict):
                    raise ApiError(400, api_error("MSG-349", "Unable to parse fax envelope"))
                envelope = loaded
            elif name in _FORM_FIELDS and filename is None:
                fields.setdefault(name, []).append(bytes(data).decode("utf-8", "replace"))
            elif name is None or name in ("attachment", "attachments") or filename is not None:
                attachments.append((bytes(data), pctype or "application/octet-stream", filename))
            # any other plain form field is ignored
    except (ValueError, AssertionError) as exc:
        raise ApiError(400, api_error("CMN-104", f"Cannot parse request: {exc}")) from None
    return envelope, fields, attachments
