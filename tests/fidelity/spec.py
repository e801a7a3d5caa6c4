"""RingCentral's official OpenAPI spec as a validator of what the simulator serves.

The spec is ``tests/fidelity/data/rc-openapi-trimmed.yml``: the operations faxd and the simulator
use, cut from RingCentral's full public spec (OpenAPI 3.0.3) by ``tools/trim_openapi.py``; its
origin, licence and hashes are in ``tests/fidelity/data/ORIGIN.md``. ``FAXD_RC_SPEC`` points
the tests at another copy (the full spec, say). It is loaded once per process, its OpenAPI 3.0
dialect turned into JSON Schema Draft 4 (``nullable``), and each body is validated
against the schema of the operation's response for that status, found through the spec itself
(``paths → operation → responses → status → content → schema``, ``$ref`` resolved by
``referencing``). Statuses an operation does not list use the spec's shared
``components/responses`` for that status (what RingCentral answers for any endpoint).

The few places where the spec contradicts RingCentral's own documentation are patched in
:data:`ERRATA` and listed in docs/simulator.md ("Known differences / spec inconsistencies").
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT4

from faxd.sim.observe import ServedJson

#: The trimmed spec, in the repository (tests/fidelity/data/ORIGIN.md).
TRIMMED_SPEC = Path(__file__).resolve().parent / "data" / "rc-openapi-trimmed.yml"
BASE = "urn:rc-public-openapi"

#: Status -> the spec's shared response for endpoints that do not list that status.
SHARED_RESPONSES = {
    400: "InvalidRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceNotAvailable",
}

MESSAGE_STORE_EVENT = re.compile(r"^/restapi/v1\.0/account/[^/]+/extension/[^/]+/message-store(\?.*)?$")
INBOUND_FAX_EVENT = re.compile(r"^/restapi/v1\.0/account/[^/]+/extension/[^/]+/fax\?direction=Inbound$")
SINGLE_MESSAGE = "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-store/{messageId}"


class SpecMissing(Exception):
    pass


def spec_path() -> Path:
    """Where the spec is: ``$FAXD_RC_SPEC`` if set, else the trimmed copy in the repository."""
    override = os.environ.get("FAXD_RC_SPEC")
    path = Path(override) if override else TRIMMED_SPEC
    if not path.is_file():
        where = "FAXD_RC_SPEC names" if override else "the repository should hold"
        raise SpecMissing(
            f"RingCentral's OpenAPI spec is missing: expected {path} ({where} it). The simulator's "
            "fidelity tests cannot run without it."
        )
    return path


def load_spec() -> dict[str, Any]:
    """The spec as parsed YAML, unconverted and unpatched (see :func:`load_validator`)."""
    with spec_path().open("rb") as fh:
        spec: dict[str, Any] = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return spec


# -- OpenAPI 3.0 -> JSON Schema Draft 4 ---------------------------------------------------------
_NOT_SCHEMAS = frozenset({"example", "examples", "enum", "default", "required", "x-examples"})


def _convert(node: Any) -> Any:
    """OpenAPI 3.0 ``nullable: true`` -> Draft 4 ``type: [t, "null"]`` (and ``null`` in ``enum``)."""
    if isinstance(node, list):
        return [_convert(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: (
            {name: _convert(sub) for name, sub in v.items()}
            if k == "properties" and isinstance(v, dict)
            else v
            if k in _NOT_SCHEMAS
            else _convert(v)
        )
        for k, v in node.items()
    }
    if out.pop("nullable", False) is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if isinstance(out.get("enum"), list):
                out["enum"] = [*out["enum"], None]
        elif "$ref" in out or "allOf" in out or "oneOf" in out or "anyOf" in out:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


# -- errata: where the spec contradicts RingCentral's documentation ----------------------------
def _schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = spec["components"]["schemas"][name]
    return schema


def _erratum_vm_side_recipients(spec: dict[str, Any]) -> None:
    # GetSingleMessageInfoResponse requires vmSideRecipients (minItems 1), a voicemail-only field:
    # a fax record cannot have it (docs/ringcentral.md §4 and every documented fax sample lack it).
    for part in _schema(spec, "GetSingleMessageInfoResponse")["allOf"]:
        part.pop("required", None)


def _erratum_event_ids(spec: dict[str, Any]) -> None:
    # MessageEventBody.extensionId is a string in the spec; the documented WebSocket notification
    # (code-samples/websockets/websocket-notification.json) sends accountId/extensionId as numbers.
    props = _schema(spec, "MessageEventBody")["properties"]
    props["extensionId"] = {"type": ["string", "integer"]}


def _erratum_inbound_fax_event(spec: dict[str, Any]) -> None:
    # The fax?direction=Inbound event has no schema; its documented body (code-samples/events/
    # fax-message.json) is a message record whose id is a string: GetMessageInfoResponse with a
    # string id.
    record = _schema(spec, "GetMessageInfoResponse")
    spec["components"]["schemas"]["FaxxdInboundFaxEventBody"] = {
        **record,
        "properties": {**record["properties"], "id": {"type": "string", "pattern": "^[0-9]+$"}},
    }


ERRATA: tuple[Callable[[dict[str, Any]], None], ...] = (
    _erratum_vm_side_recipients,
    _erratum_event_ids,
    _erratum_inbound_fax_event,
)


# -- formats ------------------------------------------------------------------------------------
_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)$", value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


@_FORMATS.checks("uri")
def _uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    parts = urlsplit(value)
    return bool(parts.scheme and parts.netloc)


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# -- the validator ------------------------------------------------------------------------------
def _pointer(*parts: str | int) -> str:
    return "#/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(frozen=True)
class Target:
    """Which schema a body must satisfy: a JSON pointer into the spec, or None (no body)."""

    pointer: str | None
    why: str


class SpecValidator:
    """Validates :class:`ServedJson` bodies against the (converted, patched) spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.registry: Registry[Any] = Registry().with_resource(BASE, DRAFT4.create_resource(spec))
        self._validators: dict[str, jsonschema.Draft4Validator] = {}
        #: (kind, method, path, status) -> how many bodies were validated (for coverage checks)
        self.seen: dict[tuple[str, str, str, int], int] = {}

    def _validator(self, pointer: str) -> jsonschema.Draft4Validator:
        found = self._validators.get(pointer)
        if found is None:
            found = jsonschema.Draft4Validator(
                {"$ref": BASE + pointer}, registry=self.registry, format_checker=_FORMATS
            )
            self._validators[pointer] = found
        return found

    def _operation(self, method: str, path: str) -> dict[str, Any] | None:
        item = self.spec["paths"].get(path)
        if item is None:
            return None
        op: dict[str, Any] | None = item.get(method.lower())
        return op

    def _shared(self, path: str, status: int) -> tuple[tuple[str | int, ...], dict[str, Any], str]:
        name = "OauthInvalidRequest" if path.startswith("/restapi/oauth/") else SHARED_RESPONSES[status]
        return ("components", "responses", name), self.spec["components"]["responses"][name], name

    def response_target(self, method: str, path: str, status: int, content_type: str) -> Target:
        """The schema for an HTTP (or WS ClientRequest) response of ``method path`` with ``status``.

        The operation's own response for ``status`` if it lists one with a body; else, for an
        error status, the spec's shared response for it (unknown routes included: 404 NotFound).
        """
        op = self._operation(method, path)
        responses: dict[str, Any] = op.get("responses", {}) if op is not None else {}
        name_of = op.get("operationId") if op is not None else f"(no operation {method} {path})"
        key = str(status)
        response: dict[str, Any] | None = responses.get(key)
        base: tuple[str | int, ...] = ("paths", path, method.lower(), "responses", key)
        why = f"{name_of} {key}"
        if response is not None and "$ref" in response:
            name = response["$ref"].rsplit("/", 1)[1]
            base = ("components", "responses", name)
            response = self.spec["components"]["responses"][name]
            why += f" -> {name}"
        if (response is None or not response.get("content")) and status in SHARED_RESPONSES:
            # Unlisted error statuses, and error statuses listed without a body (token 415/429):
            # RingCentral's shared error responses apply (see docs/simulator.md).
            base, response, name = self._shared(path, status)
            why += f" (shared response {name})"
        if response is None:
            raise LookupError(f"the spec lists no {status} response for {method} {path}")
        content: dict[str, Any] = response.get("content") or {}
        if not content:
            return Target(None, why + " (no body)")
        if content_type not in content:
            if "application/json" in content and content_type.endswith("json"):
                content_type = "application/json"
            else:
                raise LookupError(f"{why}: the spec has no {content_type} body (only {sorted(content)})")
        return Target(_pointer(*base, "content", content_type, "schema"), why)

    def target(self, served: ServedJson) -> Target:
        if served.kind == "response" or (served.kind == "ClientRequest" and served.method):
            return self.response_target(served.method, served.path, served.status, served.content_type)
        if served.kind == "part":
            # multipart/mixed bulk GET: the spec says only "string". Part 0 is RingCentral's summary
            # ({"response": [{href, status, responseDescription}]}, no schema); part i is what a
            # single GET of the i-th id returns with the status the summary gives it.
            if served.part_index == 0:
                return Target(_pointer("components", "schemas", "FaxxdMultipartSummary"), "summary")
            if served.status == 200:
                return Target(_pointer("components", "schemas", "GetMessageInfoResponse"), "bulk part 200")
            return self.response_target("GET", SINGLE_MESSAGE, served.status, "application/json")
        if served.kind == "ServerNotification":
            if MESSAGE_STORE_EVENT.match(served.path):
                return Target(_pointer("components", "schemas", "MessageEvent"), "message-store event")
            if INBOUND_FAX_EVENT.match(served.path):
                return Target(_pointer("components", "schemas", "FaxxdInboundFaxEvent"), "inbound fax event")
            raise LookupError(f"no schema for the notification of event {served.path!r}")
        if served.kind == "Error":
            return Target(_pointer("components", "schemas", "ApiError"), "WS Error frame body = ApiError")
        return Target(None, f"{served.kind}: not in the spec")

    def check(self, served: ServedJson) -> list[str]:
        """Every way ``served.body`` violates the spec (empty if it is valid)."""
        path = served.raw_path or served.path
        where = f"{served.transport} {served.kind} {served.method} {path} {served.status}"
        try:
            target = self.target(served)
        except LookupError as exc:
            return [f"{where}: {exc}"]
        key = (served.kind, served.method, served.path, served.status)
        self.seen[key] = self.seen.get(key, 0) + 1
        if target.pointer is None:
            if served.body is not None and served.kind in ("response", "part", "ClientRequest"):
                return [f"{where}: a body where the spec ({target.why}) has none"]
            return []
        errors = sorted(self._validator(target.pointer).iter_errors(served.body), key=lambda e: list(e.path))
        return [
            f"{where}: [{target.why}] at /{'/'.join(map(str, e.absolute_path))}: {e.message}"[:600]
            for e in errors
        ]


def _local_schemas(spec: dict[str, Any]) -> None:
    """Schemas for the documented bodies the spec has none for (names start with ``Faxxd``)."""
    schemas = spec["components"]["schemas"]
    schemas["FaxxdMultipartSummary"] = {
        "type": "object",
        "required": ["response"],
        "properties": {
            "response": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["href", "status"],
                    "properties": {
                        "href": {"type": "string", "format": "uri"},
                        "status": {"type": "integer"},
                        "responseDescription": {"type": "string"},
                    },
                },
            }
        },
    }
    # The fax?direction=Inbound envelope: MessageEvent's envelope fields, the record as body.
    schemas["FaxxdInboundFaxEvent"] = {
        "type": "object",
        "required": ["uuid", "event", "timestamp", "subscriptionId", "body"],
        "properties": {
            **{k: v for k, v in schemas["MessageEvent"]["properties"].items() if k != "body"},
            "body": {"$ref": "#/components/schemas/FaxxdInboundFaxEventBody"},
        },
    }


@functools.cache
def load_validator() -> SpecValidator:
    """The validator (the spec is parsed once per process). Raises :class:`SpecMissing`."""
    spec: dict[str, Any] = _convert(load_spec())
    for erratum in ERRATA:
        erratum(spec)
    _local_schemas(spec)
    # refs inside the document are relative ("#/components/…"): anchor them at BASE
    return SpecValidator(spec)
