"""Cut RingCentral's public OpenAPI spec down to the part faxd's tests validate against.

Usage::

    python tools/trim_openapi.py rc-public-openapi.yml > tests/fidelity/data/rc-openapi-trimmed.yml

The full spec (1.7 MB, tests/fidelity/data/ORIGIN.md says where it comes from) is too big to keep
in the repository for the handful of operations faxd and its simulator use. This script keeps:

- the operations in :data:`OPERATIONS` (method and path exactly as the spec spells them), each
  whole: ``x-throttling-group``, ``x-app-permission``, parameters, responses, descriptions;
  their path items' shared keys (``parameters``);
- the schemas in :data:`EXTRA_SCHEMAS` that no operation references but the tests validate
  against (WebSocket notification bodies, the WSG ``Error`` body, the fax error code enum);
- the shared ``components/responses`` in :data:`SHARED_RESPONSES`, which RingCentral answers for
  statuses an operation does not list;
- every component these reference, transitively (the ``$ref`` closure);
- ``openapi``, ``info`` (licence included), ``servers``, ``security``, ``securitySchemes`` and the
  ``tags`` the kept operations use. ``x-tagGroups`` (navigation of the docs site) is dropped.

It selects and never rewrites: every kept node is the upstream node, in upstream order. The output
is a function of the input alone (no dates, no paths), so running it again on the same full spec
gives the same bytes, and running it on its own output gives its output back.

It must not fetch anything, and must not patch the spec: where the spec is wrong, the tests'
errata (tests/fidelity/spec.py) say so.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import yaml

#: (method, path): what the simulator serves (REST, and the subscription API tunnelled as WSG
#: ClientRequests), which covers what faxd calls, plus subscription renewal, which faxd's rate
#: budget knows. tests/fidelity/test_trimmed_spec.py checks the simulator's route table against
#: this script's output.
OPERATIONS: Final[tuple[tuple[str, str], ...]] = (
    ("post", "/restapi/oauth/token"),
    ("post", "/restapi/oauth/revoke"),
    ("post", "/restapi/oauth/wstoken"),
    ("get", "/restapi"),
    ("get", "/restapi/v1.0/account/{accountId}/extension/{extensionId}"),
    ("post", "/restapi/v1.0/account/{accountId}/extension/{extensionId}/fax"),
    ("get", "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-store"),
    ("get", "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-store/{messageId}"),
    ("delete", "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-store/{messageId}"),
    (
        "get",
        "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-store/{messageId}"
        "/content/{attachmentId}",
    ),
    ("get", "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-sync"),
    ("post", "/restapi/v1.0/subscription"),
    ("get", "/restapi/v1.0/subscription/{subscriptionId}"),
    ("put", "/restapi/v1.0/subscription/{subscriptionId}"),
    ("delete", "/restapi/v1.0/subscription/{subscriptionId}"),
    ("post", "/restapi/v1.0/subscription/{subscriptionId}/renew"),
)

#: Schemas the tests name directly that no kept operation references.
EXTRA_SCHEMAS: Final[tuple[str, ...]] = (
    "MessageEvent",  # the message-store notification
    "ApiError",  # the body of a WSG Error frame
    "FaxErrorCodeEnum",  # every faxErrorCode (tests/test_taxonomy.py)
    "GetMessageMultiResponse",  # the multipart+json bulk GET body
)

#: RingCentral's responses for statuses an operation does not list (tests/fidelity/spec.py).
SHARED_RESPONSES: Final[tuple[str, ...]] = (
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "UnsupportedMediaType",
    "TooManyRequests",
    "InternalError",
    "BadGateway",
    "ServiceNotAvailable",
    "OauthInvalidRequest",
)

HEADER: Final = """\
# RingCentral Platform API, OpenAPI 3.0.3: the part faxd's tests use, cut from the full public spec
# by tools/trim_openapi.py. Do not edit by hand: regenerate it (see ORIGIN.md beside this file).
# The spec's licence is its info.license below.
"""

_METHODS: Final = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


class TrimError(Exception):
    """The full spec lacks something this script was told to keep."""


def _refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` string under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _component(ref: str) -> tuple[str, str]:
    """``#/components/<section>/<name>[/...]`` -> (section, name)."""
    parts = ref.split("/")
    if len(parts) < 4 or parts[:2] != ["#", "components"]:
        raise TrimError(f"unsupported $ref {ref!r} (only #/components/... refs are followed)")
    name = parts[3].replace("~1", "/").replace("~0", "~")
    return parts[2], name


def trim(full: dict[str, Any]) -> dict[str, Any]:
    """The trimmed document (see the module docstring for what is kept)."""
    paths: dict[str, Any] = {}
    wanted = {(m, p) for m, p in OPERATIONS}
    for path, item in full["paths"].items():
        methods = [m for m in item if m in _METHODS and (m, path) in wanted]
        if methods:
            paths[path] = {k: v for k, v in item.items() if k not in _METHODS or k in methods}
    missing = sorted(f"{m.upper()} {p}" for m, p in wanted if m not in paths.get(p, {}))
    if missing:
        raise TrimError(f"the spec has no operation {', '.join(missing)}")

    components: dict[str, Any] = full["components"]
    keep: dict[str, set[str]] = {}
    todo: list[tuple[str, str]] = [("schemas", n) for n in EXTRA_SCHEMAS]
    todo += [("responses", n) for n in SHARED_RESPONSES]
    todo += [_component(r) for r in _refs(paths)]
    while todo:
        section, name = todo.pop()
        if name in keep.setdefault(section, set()):
            continue
        try:
            node = components[section][name]
        except KeyError:
            raise TrimError(f"the spec has no component {section}/{name}") from None
        keep[section].add(name)
        todo += [_component(r) for r in _refs(node)]

    kept_components: dict[str, Any] = {}
    for section, entries in components.items():
        if section == "securitySchemes":
            kept_components[section] = entries
        elif section in keep:
            kept_components[section] = {k: v for k, v in entries.items() if k in keep[section]}

    ops = [op for item in paths.values() for m, op in item.items() if m in _METHODS]
    tags_used = {t for op in ops for t in op.get("tags", ())}
    out: dict[str, Any] = {}
    for key, value in full.items():
        if key == "paths":
            out[key] = paths
        elif key == "components":
            out[key] = kept_components
        elif key == "tags":
            out[key] = [t for t in value if t.get("name") in tags_used]
        elif key in ("openapi", "info", "servers", "security"):
            out[key] = value
    return out


class _Dumper(yaml.SafeDumper):
    """The pure-Python safe dumper (same bytes with or without libyaml); no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Markdown descriptions stay readable as block scalars (the emitter falls back to quoting
    # when a string cannot be one, e.g. trailing spaces on a line).
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _str)


def render(doc: dict[str, Any]) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100, indent=2)
    return HEADER + body


def load(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as fh:
        doc = yaml.load(fh, Loader=loader)
    if not isinstance(doc, dict) or "paths" not in doc or "components" not in doc:
        raise TrimError(f"{path} is not an OpenAPI document (no paths/components)")
    return doc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.stderr.write(f"usage: {argv[0]} FULL_SPEC.yml > TRIMMED.yml\n")
        return 2
    try:
        text = render(trim(load(Path(argv[1]))))
    except (OSError, yaml.YAMLError, TrimError) as exc:
        sys.stderr.write(f"trim_openapi: {exc}\n")
        return 1
    sys.stdout.buffer.write(text.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
