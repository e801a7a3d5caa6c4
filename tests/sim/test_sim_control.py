"""The control API's own machinery: one route table, faults declared by their mark, docs that match."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing

from faxd.sim import Simulator
from faxd.sim.control import PREFIX, Arg, ControlError, arg, fault, marked_faults, route_table
from faxd.sim.observe import ServedJson

DOC = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"


def documented() -> dict[tuple[str, str], str]:
    """(METHOD, path) -> the body column, for each row of simulator.md's control API table."""
    text = DOC.read_text()
    table = text.split("## Control API", 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, str], str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("| `"):
            continue
        method, base = "", ""
        for code in re.findall(r"`([^`]+)`", cells[0]):
            if code.startswith("…/"):
                path = base.rsplit("/", 1)[0] + code[1:]
            else:
                method, path = code.split(" ", 1)
            path = path.split("[", 1)[0]
            base = path
            rows[(method, path)] = cells[1] if len(cells) > 1 else ""
    return rows


def body_keys(column: str) -> set[str]:
    """The JSON keys a body column names (``{"count"?, "status"?}``), not the values it shows."""
    return set(re.findall(r'(?:\{|, )"(\w+)"', column))


def served(sim: Simulator) -> set[tuple[str, str]]:
    return {(route.method, PREFIX + route.path) for route in route_table(sim)}


async def test_the_docs_list_every_control_route_and_no_other() -> None:
    sim = Simulator()
    docs = documented()
    assert len(docs) >= 30, "the parser found the table"
    assert set(docs) == served(sim)


async def test_the_docs_name_the_json_keys_of_every_fault() -> None:
    docs = documented()
    faults = list(marked_faults(Simulator()))
    assert len(faults) >= 20
    for spec, _ in faults:
        keys = {a.key or re.sub(r"_(\w)", lambda m: m[1].upper(), name) for name, a in spec.args.items()}
        assert body_keys(docs[("POST", f"{PREFIX}/faults/{spec.name}")]) == keys, spec.name


async def test_a_fault_mark_must_fit_its_method() -> None:
    with pytest.raises(TypeError, match="no argument secs"):

        class Unknown:
            @fault("x", secs=arg(float))
            def x(self, seconds: float) -> None: ...

    with pytest.raises(TypeError, match="no JSON key for seconds"):

        class Missing:
            @fault("y")
            def y(self, seconds: float) -> None: ...


async def test_the_json_keys_of_a_mark() -> None:
    class Sim:
        @fault("z", result="n", retry_after=arg(int), count=arg(int, 3), low=Arg(float, key="min"))
        def z(self, retry_after: int, count: int, low: float = 0.5) -> int:
            return retry_after + count

    [(spec, method)] = list(marked_faults(Sim()))
    assert spec.keyword_args({"retryAfter": "2"}) == {"retry_after": 2, "count": 3}
    assert spec.keyword_args({"retryAfter": 1, "min": 2}) == {"retry_after": 1, "count": 3, "low": 2.0}
    assert spec.reply(method(**spec.keyword_args({"retryAfter": 1}))) == {"n": 4}
    with pytest.raises(ControlError, match="'retryAfter' is required"):
        spec.keyword_args({})
    with pytest.raises(ControlError, match="'count': invalid literal"):
        spec.keyword_args({"retryAfter": 1, "count": "many"})


async def post(http: aiohttp.ClientSession, sim: Simulator, fault: str, body: Any) -> tuple[int, Any]:
    async with http.post(f"{sim.url}/_sim/faults/{fault}", json=body) as resp:
        return resp.status, await resp.json()


async def test_a_bad_body_is_a_400_naming_the_key(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, sim, "remove-extension", {})
    assert (status, body) == (400, {"error": "'extensionId' is required"})
    status, body = await post(http, sim, "deny-message-reads", {"extensionIds": "200000001"})
    assert (status, body) == (400, {"error": "'extensionIds': must be a list of strings"})
    status, body = await post(http, sim, "fail-requests", {"retryAfter": [1]})
    assert (status, body) == (400, {"error": "'retryAfter': must be seconds, a string or null"})
    status, body = await post(http, sim, "token-scope", {"scope": 7})
    assert (status, body) == (400, {"error": "'scope': must be a string"})
    assert sim.rest.faults.fail_next == 0, "a refused request changes nothing"


async def test_defaults_of_the_http_side(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert await post(http, sim, "delay-requests", None) == (200, {"ok": True})
    assert (sim.rest.faults.delay_next, sim.rest.faults.delay_seconds) == (1, 5.0)
    assert await post(http, sim, "fail-requests", {"match": 7, "retryAfter": None}) == (200, {"ok": True})
    faults = sim.rest.faults
    assert (faults.fail_next, faults.fail_status, faults.fail_match, faults.fail_retry_after) == (
        1,
        503,
        "7",
        None,
    )


async def test_unknown_control_paths_are_404(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sim.url}/_sim/faults/no-such-fault", json={}) as resp:
        assert resp.status == 404
    async with http.get(f"{sim.url}/_sim/faults/drop-ws") as resp:
        assert resp.status == 405
    assert sim.requests == [], "control requests are not recorded"


async def test_log_events_are_named_area_what(sim: Simulator, http: aiohttp.ClientSession) -> None:
    with structlog.testing.capture_logs() as logs:
        assert await post(http, sim, "skew-date", {"seconds": 5}) == (200, {"ok": True})
        assert (await post(http, sim, "skew-date", {"seconds": "soon"}))[0] == 400
    injected = {"event": "sim.fault_injected", "fault": "skew-date", "seconds": 5.0, "log_level": "info"}
    assert logs == [injected], "one event, and none for the refused request"


async def test_a_raising_observer_is_logged_and_the_body_still_served(http: aiohttp.ClientSession) -> None:
    def boom(served: ServedJson) -> None:
        raise RuntimeError("observer bug")

    with structlog.testing.capture_logs() as logs:
        async with Simulator(response_observer=boom) as sim, http.get(sim.url + "/restapi") as resp:
            assert resp.status == 401
            assert (await resp.json())["errorCode"] == "OAU-123"
    assert [(e["event"], e["log_level"], e["exc_info"]) for e in logs] == [
        ("sim.observer_failed", "error", True)
    ]
