"""The control API under ``/_sim/`` (JSON): scripting, ground truth and fault injection.

Not part of RingCentral's protocol. Control requests are neither recorded nor rate limited.
Every endpoint mirrors a :class:`~faxd.sim.server.Simulator` method (see docs/simulator.md).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from faxd.sim.common import JsonDict
from faxd.sim.config import RecipientScript

if TYPE_CHECKING:
    from faxd.sim.server import Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlError(Exception):
    pass


def _ok(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


async def _body(request: web.Request) -> JsonDict:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise ControlError("body must be JSON") from None
    if not isinstance(data, dict):
        raise ControlError("body must be a JSON object")
    return data


def _script(item: Any) -> RecipientScript:
    if isinstance(item, str):
        return RecipientScript(item)
    if not isinstance(item, dict) or not isinstance(item.get("phone"), str):
        raise ControlError("a recipient needs a 'phone'")
    return RecipientScript(
        phone=item["phone"],
        outcome=item.get("outcome", "Sent"),
        error_code=item.get("errorCode"),
        after=item.get("after"),
        delivered_after=item.get("deliveredAfter"),
    )


def _wrap(handler: Callable[[web.Request], Awaitable[Any]]) -> Handler:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            result = await handler(request)
        except (ControlError, ValueError, TypeError) as exc:
            return _ok({"error": str(exc)}, 400)
        except KeyError as exc:
            return _ok({"error": f"not found: {exc}"}, 404)
        if isinstance(result, web.StreamResponse):
            return result
        return _ok(result if result is not None else {"ok": True})

    return run


def add_control_routes(app: web.Application, sim: Simulator) -> None:
    """Register the ``/_sim/`` routes for ``sim``."""

    async def info(_: web.Request) -> JsonDict:
        c = sim.config
        return {
            "url": sim.url,
            "clientId": c.client_id,
            "clientSecret": c.client_secret,
            "jwt": c.jwt,
            "accountId": c.account_id,
            "extensions": list(c.extensions),
        }

    async def outbound(request: web.Request) -> JsonDict:
        body = await _body(request)
        recipients = body.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise ControlError("'recipients' must be a non-empty list")
        mid = sim.create_outbound_fax(
            body.get("extensionId"),
            [_script(r) for r in recipients],
            pages=int(body.get("pages", 1)),
        )
        return {"id": mid, "message": sim.message(mid)}

    async def inbound(request: web.Request) -> JsonDict:
        body = await _body(request)
        sender = body.get("from")
        if not isinstance(sender, str):
            raise ControlError("'from' (the sender's number) is required")
        mid = sim.create_inbound_fax(body.get("extensionId"), sender, pages=int(body.get("pages", 1)))
        return {"id": mid, "message": sim.message(mid)}

    async def outcome(request: web.Request) -> JsonDict:
        body = await _body(request)
        script = _script(body)
        sim.set_outcome(script.phone, script)
        return {"ok": True}

    async def requests(request: web.Request) -> JsonDict:
        since = int(request.query.get("since", "0"))
        return {
            "count": len(sim.requests),
            "requests": [r.as_dict() for r in sim.requests[since:]],
        }

    async def clear_requests(_: web.Request) -> None:
        sim.requests.clear()

    async def messages(_: web.Request) -> JsonDict:
        return {"records": sim.messages()}

    async def message(request: web.Request) -> JsonDict:
        return sim.message(request.match_info["id"])

    async def drop_ws(_: web.Request) -> JsonDict:
        return {"dropped": sim.drop_ws()}

    async def pause(_: web.Request) -> None:
        sim.pause_notifications()

    async def resume(_: web.Request) -> None:
        sim.resume_notifications()

    async def expire_tokens(_: web.Request) -> JsonDict:
        return {"expired": sim.expire_access_tokens()}

    async def stale_sync(request: web.Request) -> JsonDict:
        body = await _body(request)
        return {"staled": sim.stale_sync_tokens(str(body.get("code", "MSG-333")))}

    async def fail_recovery(request: web.Request) -> None:
        body = await _body(request)
        if "code" in body:
            sim.fail_next_recovery(str(body["code"]))
        else:
            sim.fail_next_recovery()

    async def fail_requests(request: web.Request) -> None:
        body = await _body(request)
        match = body.get("match")
        retry_after = body.get("retryAfter", "1")
        if retry_after is not None and not isinstance(retry_after, str | int | float):
            raise ControlError("'retryAfter' must be seconds, a string or null")
        sim.fail_next_requests(
            int(body.get("count", 1)),
            status=int(body.get("status", 503)),
            html=bool(body.get("html", False)),
            match=None if match is None else str(match),
            retry_after=retry_after,
        )

    async def delay_requests(request: web.Request) -> None:
        body = await _body(request)
        sim.delay_next_requests(int(body.get("count", 1)), float(body.get("seconds", 5)))

    async def delay_notifications(request: web.Request) -> None:
        body = await _body(request)
        sim.delay_notifications(float(body.get("seconds", 5)))

    async def duplicate_notifications(request: web.Request) -> None:
        body = await _body(request)
        sim.duplicate_notifications(int(body.get("copies", 2)))

    async def storm(request: web.Request) -> None:
        body = await _body(request)
        group = body.get("group")
        if group not in sim.config.rate_limits:
            raise ControlError(f"'group' must be one of {sorted(sim.config.rate_limits)}")
        sim.rate_limit_storm(group, float(body.get("seconds", 60)))

    async def remove_extension(request: web.Request) -> None:
        body = await _body(request)
        extension = body.get("extensionId")
        if not isinstance(extension, str):
            raise ControlError("'extensionId' is required")
        sim.remove_extension(extension, restore=bool(body.get("restore", False)))

    async def bulk_get(request: web.Request) -> None:
        body = await _body(request)
        sim.bulk_get_fault(str(body.get("mode", "shuffle")), int(body.get("count", 1)))

    async def rate_limit_group(request: web.Request) -> None:
        body = await _body(request)
        method, path, group = body.get("method"), body.get("path"), body.get("group")
        if not isinstance(method, str) or not isinstance(path, str) or not isinstance(group, str):
            raise ControlError("'method', 'path' (a route suffix) and 'group' are required")
        sim.set_rate_limit_group(method, path, group)

    async def blackhole(_: web.Request) -> JsonDict:
        return {"blackholed": sim.blackhole_ws()}

    async def delay_pongs(request: web.Request) -> None:
        body = await _body(request)
        sim.delay_pongs(float(body.get("min", 0)), float(body.get("max", 0)))

    async def refuse_subscriptions(request: web.Request) -> None:
        body = await _body(request)
        extensions = body.get("extensions", [])
        if not isinstance(extensions, list):
            raise ControlError("'extensions' must be a list of extension ids")
        sim.refuse_subscriptions(str(body.get("how", "disabled")), [str(e) for e in extensions])

    async def refuse_ws_upgrades(request: web.Request) -> None:
        body = await _body(request)
        sim.refuse_ws_upgrades(float(body.get("seconds", 5)), int(body.get("status", 503)))

    async def expire_ws_tokens(_: web.Request) -> JsonDict:
        return {"expired": sim.expire_ws_tokens()}

    async def wan_path(request: web.Request) -> None:
        body = await _body(request)
        sim.wan_path(bool(body.get("on", True)))

    async def ignore_heartbeats(request: web.Request) -> None:
        body = await _body(request)
        sim.ignore_heartbeats(bool(body.get("on", True)))

    async def malformed(request: web.Request) -> JsonDict:
        body = await _body(request)
        kind = str(body.get("kind", "malformed"))
        size = int(body.get("size", 5 * 1024 * 1024))
        return {"sent": sim.send_malformed_frame(kind, size=size)}

    async def foreign(request: web.Request) -> JsonDict:
        body = await _body(request)
        mid = sim.send_foreign_notification(str(body.get("type", "SMS")), body.get("extensionId"))
        return {"id": mid}

    def _ids(body: JsonDict) -> list[str]:
        ids = body.get("extensionIds", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ControlError("'extensionIds' must be a list of extension ids")
        return ids

    async def skew_date(request: web.Request) -> None:
        body = await _body(request)
        sim.skew_date(float(body.get("seconds", 0)))

    async def token_scope(request: web.Request) -> None:
        body = await _body(request)
        scope = body.get("scope")
        if not isinstance(scope, str):
            raise ControlError("'scope' (space-separated permissions) is required")
        sim.set_token_scope(scope)

    async def deny_reads(request: web.Request) -> None:
        sim.deny_message_reads(_ids(await _body(request)))

    r = app.router
    r.add_get("/_sim/info", _wrap(info))
    r.add_post("/_sim/faxes/outbound", _wrap(outbound))
    r.add_post("/_sim/faxes/inbound", _wrap(inbound))
    r.add_post("/_sim/outcomes", _wrap(outcome))
    r.add_get("/_sim/requests", _wrap(requests))
    r.add_delete("/_sim/requests", _wrap(clear_requests))
    r.add_get("/_sim/messages", _wrap(messages))
    r.add_get("/_sim/messages/{id}", _wrap(message))
    r.add_post("/_sim/faults/drop-ws", _wrap(drop_ws))
    r.add_post("/_sim/faults/pause-notifications", _wrap(pause))
    r.add_post("/_sim/faults/resume-notifications", _wrap(resume))
    r.add_post("/_sim/faults/expire-tokens", _wrap(expire_tokens))
    r.add_post("/_sim/faults/stale-sync-tokens", _wrap(stale_sync))
    r.add_post("/_sim/faults/fail-next-recovery", _wrap(fail_recovery))
    r.add_post("/_sim/faults/fail-requests", _wrap(fail_requests))
    r.add_post("/_sim/faults/delay-requests", _wrap(delay_requests))
    r.add_post("/_sim/faults/delay-notifications", _wrap(delay_notifications))
    r.add_post("/_sim/faults/duplicate-notifications", _wrap(duplicate_notifications))
    r.add_post("/_sim/faults/rate-limit-storm", _wrap(storm))
    r.add_post("/_sim/faults/rate-limit-group", _wrap(rate_limit_group))
    r.add_post("/_sim/faults/bulk-get", _wrap(bulk_get))
    r.add_post("/_sim/faults/remove-extension", _wrap(remove_extension))
    r.add_post("/_sim/faults/blackhole-ws", _wrap(blackhole))
    r.add_post("/_sim/faults/delay-pongs", _wrap(delay_pongs))
    r.add_post("/_sim/faults/refuse-subscriptions", _wrap(refuse_subscriptions))
    r.add_post("/_sim/faults/refuse-ws-upgrades", _wrap(refuse_ws_upgrades))
    r.add_post("/_sim/faults/expire-ws-tokens", _wrap(expire_ws_tokens))
    r.add_post("/_sim/faults/wan-path", _wrap(wan_path))
    r.add_post("/_sim/faults/ignore-heartbeats", _wrap(ignore_heartbeats))
    r.add_post("/_sim/faults/malformed-frame", _wrap(malformed))
    r.add_post("/_sim/faults/foreign-notification", _wrap(foreign))
    r.add_post("/_sim/faults/skew-date", _wrap(skew_date))
    r.add_post("/_sim/faults/token-scope", _wrap(token_scope))
    r.add_post("/_sim/faults/deny-message-reads", _wrap(deny_reads))
