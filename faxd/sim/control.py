"""The control API under ``/_sim/`` (JSON): scripting, ground truth and fault injection.

An aiohttp sub-application built from one route table (:func:`route_table`): the scripting and
ground-truth routes of :data:`ROUTES`, then one ``POST /_sim/faults/NAME`` for each simulator method
marked with :func:`fault`. The mark is the whole HTTP side of a fault (its name, which JSON keys
become which arguments, what the reply calls the result), so a new fault is one decorated method.

This module knows the simulator only as :class:`Controlled`, what the routes call, and must not
import :mod:`faxd.sim.server` (the import-linter contract "Simulator layers" keeps it so). Not part
of RingCentral's protocol: control requests are neither recorded nor rate limited (see
docs/simulator.md).
"""

from __future__ import annotations

import enum
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web

from faxd.logs import get_logger
from faxd.sim.common import JsonDict, RecordedRequest
from faxd.sim.config import RecipientScript, SimConfig

log = get_logger(__name__)

#: Where :func:`control_app` is mounted.
PREFIX = "/_sim"


class ControlError(Exception):
    """A control request the simulator cannot act on: answered 400 with the reason."""


class Controlled(Protocol):
    """What the control routes need of a simulator (faults are found by their :func:`fault` mark)."""

    config: SimConfig
    url: str
    requests: list[RecordedRequest]

    def create_outbound_fax(
        self, extension_id: str | None, recipients: Sequence[RecipientScript], *, pages: int = 1
    ) -> str: ...

    def create_inbound_fax(self, extension_id: str | None, from_phone: str, *, pages: int = 1) -> str: ...

    def set_outcome(self, phone: str, script: RecipientScript) -> None: ...

    def message(self, message_id: str) -> dict[str, Any]: ...

    def messages(self) -> list[dict[str, Any]]: ...


# -- fault marks ------------------------------------------------------------------------------


class _Default(enum.Enum):
    OMIT = "omit"  # the key is optional; when absent the method's own default applies


OMIT = _Default.OMIT


@dataclass(frozen=True)
class Arg:
    """One JSON key of a fault's body and how it becomes a keyword argument of the fault's method."""

    convert: Callable[[Any], Any]
    #: The value when the key is absent; OMIT: the method's default (the key is required if it has none).
    default: Any = OMIT
    #: The JSON key; None: the argument's name in camelCase (``retry_after`` -> ``retryAfter``).
    key: str | None = None


def arg(convert: Callable[[Any], Any], default: Any = OMIT, *, key: str | None = None) -> Arg:
    return Arg(convert, default, key)


@dataclass(frozen=True)
class Fault:
    """The HTTP side of one fault: ``POST /_sim/faults/{name}`` calls the marked method."""

    name: str
    args: Mapping[str, Arg]
    #: The reply's key for the method's return value (``{"dropped": 2}``); None: ``{"ok": true}``.
    result: str | None = None
    required: frozenset[str] = field(default=frozenset())

    def keyword_args(self, body: JsonDict) -> dict[str, Any]:
        """The method's keyword arguments from a request body; ControlError names a bad key."""
        kwargs: dict[str, Any] = {}
        for name, spec in self.args.items():
            key = spec.key or _camel(name)
            if key in body:
                try:
                    kwargs[name] = spec.convert(body[key])
                except (TypeError, ValueError) as exc:
                    raise ControlError(f"'{key}': {exc}") from None
            elif name in self.required:
                raise ControlError(f"'{key}' is required")
            elif spec.default is not OMIT:
                kwargs[name] = spec.default
        return kwargs

    def reply(self, value: Any) -> Any:
        return None if self.result is None else {self.result: value}


_F = TypeVar("_F", bound=Callable[..., Any])
_MARK = "__sim_fault__"


def fault(name: str, *, result: str | None = None, **args: Arg) -> Callable[[_F], _F]:
    """Mark a simulator method as the fault ``POST /_sim/faults/{name}``.

    ``args`` maps each keyword argument of the method to its JSON key (:func:`arg`); an argument
    without a default, here or in the method, is a required key. A mark that does not fit the
    method's signature is a TypeError when the class is defined, not when a test first calls it.
    """

    def mark(method: _F) -> _F:
        params = dict(inspect.signature(method).parameters)
        params.pop("self", None)
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise TypeError(f"fault {name!r}: {method.__name__} has no argument {', '.join(unknown)}")
        required = {p.name for p in params.values() if p.default is inspect.Parameter.empty}
        missing = sorted(required - set(args))
        if missing:
            raise TypeError(f"fault {name!r}: no JSON key for {', '.join(missing)}")
        needed = frozenset(n for n in required if args[n].default is OMIT)
        setattr(method, _MARK, Fault(name, dict(args), result, needed))
        return method

    return mark


def marked_faults(sim: object) -> Iterator[tuple[Fault, Callable[..., Any]]]:
    """Each fault of ``sim`` (a method marked with :func:`fault`) with its bound method, in the order
    the class defines them."""
    seen: set[str] = set()
    for klass in type(sim).__mro__:
        for attr, member in vars(klass).items():
            spec = getattr(member, _MARK, None)
            if isinstance(spec, Fault) and attr not in seen:
                seen.add(attr)
                yield spec, getattr(sim, attr)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


# -- converters for Arg: each raises ValueError or TypeError with the reason ------------------------


def text(value: Any) -> str:
    """A JSON string (not any value turned into one)."""
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert``, with JSON null passed on as None."""
    return lambda value: None if value is None else convert(value)


def string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("must be a list of strings")
    return value


def seconds_or_text(value: Any) -> Any:
    """Seconds (a number), a string sent as it is, or null."""
    if value is not None and not isinstance(value, str | int | float):
        raise TypeError("must be seconds, a string or null")
    return value


# -- scripting and ground truth ---------------------------------------------------------------------

Handler = Callable[["Controlled", web.Request], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # under PREFIX
    handler: Handler


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


async def _info(sim: Controlled, _: web.Request) -> JsonDict:
    c = sim.config
    return {
        "url": sim.url,
        "clientId": c.client_id,
        "clientSecret": c.client_secret,
        "jwt": c.jwt,
        "accountId": c.account_id,
        "extensions": list(c.extensions),
    }


async def _outbound(sim: Controlled, request: web.Request) -> JsonDict:
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


async def _inbound(sim: Controlled, request: web.Request) -> JsonDict:
    body = await _body(request)
    sender = body.get("from")
    if not isinstance(sender, str):
        raise ControlError("'from' (the sender's number) is required")
    mid = sim.create_inbound_fax(body.get("extensionId"), sender, pages=int(body.get("pages", 1)))
    return {"id": mid, "message": sim.message(mid)}


async def _outcome(sim: Controlled, request: web.Request) -> None:
    script = _script(await _body(request))
    sim.set_outcome(script.phone, script)


async def _requests(sim: Controlled, request: web.Request) -> JsonDict:
    since = int(request.query.get("since", "0"))
    return {"count": len(sim.requests), "requests": [r.as_dict() for r in sim.requests[since:]]}


async def _clear_requests(sim: Controlled, _: web.Request) -> None:
    sim.requests.clear()


async def _messages(sim: Controlled, _: web.Request) -> JsonDict:
    return {"records": sim.messages()}


async def _message(sim: Controlled, request: web.Request) -> JsonDict:
    return sim.message(request.match_info["id"])


#: Scripting and ground truth; the faults follow from the simulator's marks (:func:`route_table`).
ROUTES: tuple[Route, ...] = (
    Route("GET", "/info", _info),
    Route("POST", "/faxes/outbound", _outbound),
    Route("POST", "/faxes/inbound", _inbound),
    Route("POST", "/outcomes", _outcome),
    Route("GET", "/requests", _requests),
    Route("DELETE", "/requests", _clear_requests),
    Route("GET", "/messages", _messages),
    Route("GET", "/messages/{id}", _message),
)


def _fault_route(spec: Fault, method: Callable[..., Any]) -> Route:
    async def inject(_: Controlled, request: web.Request) -> Any:
        kwargs = spec.keyword_args(await _body(request))
        value = method(**kwargs)
        log.info("sim.fault_injected", fault=spec.name, **kwargs)
        return spec.reply(value)

    return Route("POST", f"/faults/{spec.name}", inject)


def route_table(sim: Controlled) -> list[Route]:
    """Every control route of ``sim``: :data:`ROUTES`, then one per fault it marks."""
    return [*ROUTES, *(_fault_route(spec, method) for spec, method in marked_faults(sim))]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _serve(sim: Controlled, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            result = await handler(sim, request)
        except (ControlError, ValueError, TypeError) as exc:
            return _json({"error": str(exc)}, 400)
        except KeyError as exc:
            return _json({"error": f"not found: {exc}"}, 404)
        return _json(result if result is not None else {"ok": True})

    return run


def control_app(sim: Controlled) -> web.Application:
    """The ``/_sim/`` sub-application of ``sim`` (mount it at :data:`PREFIX`)."""
    app = web.Application()
    for route in route_table(sim):
        if route.method == "GET":
            app.router.add_get(route.path, _serve(sim, route.handler))
        else:
            app.router.add_route(route.method, route.path, _serve(sim, route.handler))
    return app
