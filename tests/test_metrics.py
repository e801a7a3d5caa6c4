"""Metrics: every family with help and bounded, pre-created labels; a real scrape that promtool accepts;
/healthz and /readyz; the alert rules checked and unit-tested by promtool."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest
from aiohttp import web
from ops_support import NotifySocket, daemon, free_port, scrape, write_config, ws_up
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from faxd.adapters.metrics import (
    CATEGORIES,
    SCHED_PRIORITIES,
    SOCKET_DISCONNECT_REASONS,
    WS_DISCONNECT_REASONS,
    Metrics,
    metrics_app,
)
from faxd.adapters.rest import ApiError
from faxd.adapters.ws_session import _Closed, classify
from faxd.core.scheduler import Priority
from faxd.sim import Simulator
from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus"

# Every family faxd exports (docs/operations.md §5).
FAMILIES = {
    "faxd_build": "info",
    "faxd_ws_state": "stateset",
    "faxd_ws_connects": "counter",
    "faxd_ws_disconnects": "counter",
    "faxd_ws_recoveries": "counter",
    "faxd_ws_last_message_timestamp_seconds": "gauge",
    "faxd_reconciles": "counter",
    "faxd_reconcile_duration_seconds": "histogram",
    "faxd_queue_depth": "gauge",
    "faxd_api_requests": "counter",
    "faxd_api_request_duration_seconds": "histogram",
    "faxd_rate_limit_remaining": "gauge",
    "faxd_rate_limit_limit": "gauge",
    "faxd_rate_limited": "counter",
    "faxd_token_expiry_timestamp_seconds": "gauge",
    "faxd_transitions": "counter",
    "faxd_fax_failures": "counter",
    "faxd_faxes_in_flight": "gauge",
    "faxd_oldest_in_flight_fax_timestamp_seconds": "gauge",
    "faxd_time_to_final_seconds": "histogram",
    "faxd_last_sync_timestamp_seconds": "gauge",
    "faxd_sync_token_resets": "counter",
    "faxd_full_sync_failing": "gauge",
    "faxd_extensions_not_found": "gauge",
    "faxd_missed_by_push": "counter",
    "faxd_socket_subscribers": "gauge",
    "faxd_socket_disconnects": "counter",
    "faxd_journal_head_seq": "gauge",
    "faxd_journal_oldest_seq": "gauge",
    "faxd_event_loop_lag_seconds": "gauge",
    "faxd_config_reloads": "counter",
    "faxd_sched_queue_depth": "gauge",
    "faxd_sched_wait_seconds": "histogram",
    "faxd_rate_budget_room": "gauge",
    "faxd_rate_budget_tokens": "gauge",
    "faxd_effective_debounce_seconds": "gauge",
}


async def test_every_family_has_help_and_known_labels_start_at_zero() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    families = {f.name: f for f in registry.collect()}
    for name, kind in FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].documentation.strip(), f"{name} has no help text"
    get = registry.get_sample_value
    for category in CATEGORIES:
        assert get("faxd_fax_failures_total", {"category": category}) == 0
    for reason in WS_DISCONNECT_REASONS:
        assert get("faxd_ws_disconnects_total", {"reason": reason}) == 0
    for reason in SOCKET_DISCONNECT_REASONS:
        assert get("faxd_socket_disconnects_total", {"reason": reason}) == 0
    for group in ("Light", "Medium", "Heavy", "Auth"):
        assert get("faxd_rate_limited_total", {"group": group}) == 0
    assert get("faxd_transitions_total", {"direction": "Outbound", "to_status": "Queued"}) == 0
    assert get("faxd_reconciles_total", {"trigger": "push", "result": "error"}) == 0
    assert get("faxd_config_reloads_total", {"result": "ok"}) == 0
    for priority in SCHED_PRIORITIES:
        assert get("faxd_sched_queue_depth", {"priority": priority}) == 0
        assert get("faxd_sched_wait_seconds_count", {"priority": priority}) == 0
    assert b"_created" not in generate_latest(registry)


async def test_ws_disconnect_reasons_are_bounded() -> None:
    """The WebSocket session's classify gives these labels (its full table: tests/test_ws_classify.py)."""
    assert classify(_Closed("ping_timeout")).label == "ping_timeout"
    assert classify(ApiError(400, "OAU-213")).label == "api_error"
    assert classify(InvalidStatus(Response(503, "", Headers()))).label == "handshake"
    assert classify(ConnectionRefusedError()).label == "network"
    assert classify(TimeoutError()).label == "network"
    assert classify(_Closed("something new")).label == "other"


async def test_readyz_says_why_it_is_not_ready(aiohttp_free_port: int) -> None:
    state = {"ok": False}

    async def check() -> tuple[bool, str]:
        return (True, "ok") if state["ok"] else (False, "websocket not subscribed")

    runner = web.AppRunner(metrics_app(CollectorRegistry(), check))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", aiohttp_free_port).start()
        assert await scrape(aiohttp_free_port, "/healthz") == (200, "ok\n")
        assert await scrape(aiohttp_free_port, "/readyz") == (503, "websocket not subscribed\n")
        state["ok"] = True
        assert await scrape(aiohttp_free_port, "/readyz") == (200, "ok\n")
    finally:
        await runner.cleanup()


@pytest.fixture
def aiohttp_free_port() -> int:
    return free_port()


async def test_a_real_scrape_passes_promtool(sim: Simulator, short_dir: Path) -> None:
    require_tool("promtool")
    port = free_port()
    config = write_config(short_dir, sim, metrics={"listen": f"127.0.0.1:{port}"})
    notify = NotifySocket(short_dir / "notify")
    try:
        async with asyncio.timeout(30), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
            await notify.wait_for(ws_up)
            status, body = await scrape(port)
            assert status == 200
            assert await scrape(port, "/healthz") == (200, "ok\n")
            assert await scrape(port, "/readyz") == (200, "ok\n")
            faxd.signal(signal.SIGTERM)
            assert await faxd.wait() == 0
    finally:
        notify.close()
    lint = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await lint.communicate(body.encode())
    assert lint.returncode == 0, out.decode()
    names = {f.name for f in text_string_to_metric_families(body)}
    assert set(FAMILIES) - {"faxd_build", "faxd_ws_state"} <= names
    assert "process_start_time_seconds" in {
        s.name for f in text_string_to_metric_families(body) for s in f.samples
    }
    assert "_created" not in body
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
    }
    assert samples[("process_start_time_seconds", ())] > 0
    assert samples[("faxd_ws_state", (("faxd_ws_state", "up"),))] == 1
    assert samples[("faxd_last_sync_timestamp_seconds", ())] > 0


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    require_tool("promtool")
    check = subprocess.run(
        ["promtool", "check", "rules", "faxd-rules.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        ["promtool", "test", "rules", "faxd-rules.test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_the_scheduler_metric_labels_are_its_classes() -> None:
    """One child per request class is created up front; the driver labels with these names."""
    assert tuple(p.name.lower() for p in Priority) == SCHED_PRIORITIES
