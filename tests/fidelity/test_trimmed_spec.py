"""The trimmed spec in the repository: complete for what the simulator serves, and not hand-edited.

The fidelity tests validate against ``tests/fidelity/data/rc-openapi-trimmed.yml``. An operation
missing from it would make every body of that operation fail validation with "the spec lists no
… response", or worse, fall back to a shared error response. These tests say instead which
operation is missing. They also check that the throttling groups of the simulator and of faxd's
rate budget are the spec's ``x-throttling-group``.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fidelity.spec import TRIMMED_SPEC

from faxd.core.ratebudget import classify
from faxd.sim import Simulator
from faxd.sim.rest import GROUPS

REPO = Path(__file__).resolve().parents[2]
TRIM = REPO / "tools" / "trim_openapi.py"
ORIGIN = TRIMMED_SPEC.parent / "ORIGIN.md"
METHODS = ("get", "put", "post", "delete", "patch")

#: The subscription API, tunnelled as WSG ClientRequests (faxd/sim/wsg.py ``_client_request``):
#: not in the aiohttp route table, so listed here.
WS_OPERATIONS = {
    ("POST", "/restapi/v1.0/subscription"),
    ("GET", "/restapi/v1.0/subscription/{subscriptionId}"),
    ("PUT", "/restapi/v1.0/subscription/{subscriptionId}"),
    ("DELETE", "/restapi/v1.0/subscription/{subscriptionId}"),
}


@pytest.fixture(scope="module")
def trimmed() -> dict[str, Any]:
    with TRIMMED_SPEC.open("rb") as fh:
        spec: dict[str, Any] = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return spec


def served_operations() -> set[tuple[str, str]]:
    """(METHOD, route template) of every RingCentral route of the simulator's aiohttp app."""
    app = Simulator().build_app()
    rest = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"  # aiohttp's automatic twin of each GET
        and route.resource.canonical.startswith("/restapi/")
    }
    return rest | WS_OPERATIONS


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def test_the_route_table_is_what_we_think() -> None:
    # A guard on the guard: if the route table came back empty, the next test would prove nothing.
    served = served_operations()
    assert ("POST", "/restapi/oauth/token") in served
    assert ("GET", "/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-sync") in served
    assert len(served) >= 13


def test_every_operation_the_simulator_serves_is_in_the_trimmed_spec(trimmed: dict[str, Any]) -> None:
    have = operations(trimmed)
    missing = sorted(f"{m} {p}" for m, p in served_operations() if (m, p) not in have)
    assert not missing, (
        f"{TRIMMED_SPEC.name} lacks operations the simulator serves: {missing}; add them to "
        "OPERATIONS in tools/trim_openapi.py and regenerate (tests/fidelity/data/ORIGIN.md)"
    )


def test_throttling_groups_are_the_specs(trimmed: dict[str, Any]) -> None:
    """The simulator's groups and faxd's rate budget classify each operation as the spec does."""
    ops = operations(trimmed)
    for (method, path), group in GROUPS.items():
        assert ops[(method, path)]["x-throttling-group"] == group, (method, path)
    for (method, path), op in ops.items():
        concrete = re.sub(r"\{(accountId|extensionId)\}", "~", path)
        concrete = re.sub(r"\{\w+\}", "123", concrete)
        assert classify(method, concrete) == op["x-throttling-group"], (method, path)


def test_every_ref_resolves_and_the_operation_fields_are_kept(trimmed: dict[str, Any]) -> None:
    text = TRIMMED_SPEC.read_text(encoding="utf-8")
    for section, name in set(re.findall(r"\$ref: '#/components/(\w+)/(\w+)'", text)):
        assert name in trimmed["components"][section], f"{section}/{name}"
    for (method, path), op in operations(trimmed).items():
        assert op.get("x-throttling-group"), (method, path)
        assert op.get("responses"), (method, path)
    sync = trimmed["paths"]["/restapi/v1.0/account/{accountId}/extension/{extensionId}/message-sync"]
    assert sync["get"]["x-app-permission"] == "ReadMessages"
    assert trimmed["info"]["license"]["name"] == "RingCentral API License Agreement"


def test_the_origin_note_names_this_file() -> None:
    """ORIGIN.md's sha256 and size of the trimmed file are the committed file's."""
    note = ORIGIN.read_text(encoding="utf-8")
    section = note.split("## The trimmed file", 1)[1]
    data = TRIMMED_SPEC.read_bytes()
    sha = re.search(r"\| sha256 \| `([0-9a-f]{64})` \|", section)
    size = re.search(r"\| size \| ([0-9,]+) bytes", section)
    assert sha is not None
    assert size is not None
    assert sha.group(1) == hashlib.sha256(data).hexdigest(), "regenerated without updating ORIGIN.md?"
    assert int(size.group(1).replace(",", "")) == len(data)


def test_the_generator_gives_the_committed_file_back() -> None:
    """Run on the trimmed file, tools/trim_openapi.py reproduces it byte for byte.

    That holds only if the file is exactly the generator's output (not hand-edited) and closed under
    ``$ref`` (the generator fails on a dangling one). Reproduction from the full upstream spec is
    the same code path on a bigger input (tests/fidelity/data/ORIGIN.md).
    """
    out = subprocess.run(
        [sys.executable, str(TRIM), str(TRIMMED_SPEC)], capture_output=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == TRIMMED_SPEC.read_bytes()


def test_the_generator_names_what_the_full_spec_lacks(tmp_path: Path) -> None:
    spec = tmp_path / "partial.yml"
    spec.write_text(
        "openapi: 3.0.3\npaths:\n  /restapi/oauth/token:\n    post: {responses: {}}\ncomponents: {}\n"
    )
    out = subprocess.run(
        [sys.executable, str(TRIM), str(spec)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 1
    assert out.stdout == ""
    assert "the spec has no operation" in out.stderr
    assert "POST /restapi/oauth/revoke" in out.stderr
    assert "POST /restapi/oauth/token," not in out.stderr
