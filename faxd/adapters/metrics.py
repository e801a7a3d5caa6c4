"""Prometheus metrics of faxd, built against an injected registry, and the HTTP app that serves them.

Every family of DESIGN.md §7 lives here so that names, help texts, units and label sets are decided in
one place. Labels are bounded: no fax ids, phone numbers or extension ids, and label children that are
known in advance are created up front so a scrape shows zeros instead of missing series.
This module must not decide anything about faxes; adapters call its methods when things happen.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Awaitable, Callable

import prometheus_client
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from faxd import __version__
from faxd.core.model import FaxStatus

GROUPS = ("Light", "Medium", "Heavy", "Auth")
WS_STATES = ("disconnected", "connecting", "subscribing", "up")
RECONCILE_TRIGGERS = ("push", "poll", "startup", "resync", "request")
WS_CONNECT_KINDS = ("fresh", "recovery")
#: Why a WebSocket connection ended; anything else is folded into these by `ws_disconnect_reason`.
WS_DISCONNECT_REASONS = (
    "closed",
    "closed_abnormal",
    "connection_lost",
    "ping_timeout",
    "too_large",
    "wsg_902",
    "wsg_903",
    "error_frame",
    "reply_timeout",
    "rate_limited",
    "api_error",
    "handshake",
    "network",
    "internal",
    "other",
)
WS_BAD_FRAME_REASONS = (
    "not_json",
    "not_array",
    "bad_meta",
    "bad_body",
    "other_type",
    "unknown_type",
    "too_large",
    "foreign_subscription",
    "foreign_extension",
)
TOKEN_GRANTS = ("jwt", "refresh")
TOKEN_RESULTS = ("ok", "error", "rejected", "rate_limited")
SOCKET_DISCONNECT_REASONS = (
    "eof",
    "reset",
    "error",
    "shutdown",
    "idle_timeout",
    "line_too_long",
    "slow_consumer",
    "cursor_expired",
    "busy",
    "unauthorized",
)
CATEGORIES = (
    "busy",
    "no_answer",
    "not_a_fax",
    "invalid_number",
    "rejected",
    "permission",
    "billing",
    "document",
    "internal",
    "other",
)


_NETWORK_ERROR = re.compile(r"^[A-Za-z]*(Error|Exception|Timeout)$")


def ws_disconnect_reason(reason: str) -> str:
    """A bounded label value for a WebSocket disconnect reason."""
    if reason in WS_DISCONNECT_REASONS:
        return reason
    if reason.startswith("api "):
        return "api_error"
    if reason.startswith("handshake"):
        return "handshake"
    if _NETWORK_ERROR.match(reason):  # an exception class name: OSError, TimeoutError, ...
        return "network"
    return "other"


def add_process_collectors(registry: CollectorRegistry) -> None:
    """``process_*``, ``python_info`` and ``python_gc_*`` in ``registry`` (the default registry has them)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class Metrics:
    """All metric families of faxd, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Counters and histograms would each get a `_created` series: noise for Prometheus.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        r = registry
        self.build_info = Info("faxd_build", "faxd version.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})

        # WebSocket session
        self.ws_state = Enum(
            "faxd_ws_state", "State of the WebSocket session.", states=list(WS_STATES), registry=r
        )
        self.ws_connects = Counter(
            "faxd_ws_connects_total",
            "WebSocket connections opened, fresh or by session recovery.",
            ["kind"],
            registry=r,
        )
        for kind in WS_CONNECT_KINDS:
            self.ws_connects.labels(kind)
        self.ws_disconnects = Counter(
            "faxd_ws_disconnects_total",
            "WebSocket connections lost, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in WS_DISCONNECT_REASONS:
            self.ws_disconnects.labels(reason)
        self.ws_recoveries = Counter(
            "faxd_ws_recoveries_total",
            "WSG session recoveries attempted, by result.",
            ["result"],
            registry=r,
        )
        for result in ("successful", "failed"):
            self.ws_recoveries.labels(result)
        self.ws_last_message = Gauge(
            "faxd_ws_last_message_timestamp_seconds",
            "Unix time of the last frame received from the WebSocket gateway.",
            registry=r,
        )
        self.ws_bad_frames = Counter(
            "faxd_ws_bad_frames_total",
            "WebSocket frames ignored as malformed or foreign, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in WS_BAD_FRAME_REASONS:
            self.ws_bad_frames.labels(reason)
        self.ws_hints = Counter("faxd_ws_hints_total", "Fax change notifications received.", registry=r)
        self.ws_ping_rtt = Histogram(
            "faxd_ws_ping_rtt_seconds",
            "Round trip of WebSocket pings (what the pong timeout adapts to).",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.ws_disabled_filters = Gauge(
            "faxd_ws_disabled_filters",
            "Event filters RingCentral refused to subscribe to (disabledFilters or a 403); "
            "their extensions get no push and are tracked by polling.",
            registry=r,
        )
        self.ws_ping_timeout = Gauge(
            "faxd_ws_ping_timeout_seconds",
            "How long the next pong may take before the connection is called dead.",
            registry=r,
        )

        # Auth
        self.token_expiry = Gauge(
            "faxd_token_expiry_timestamp_seconds",
            "Unix time when the access token expires.",
            registry=r,
        )
        self.token_refreshes = Counter(
            "faxd_token_refreshes_total",
            "OAuth token grants, by grant and result.",
            ["grant", "result"],
            registry=r,
        )
        for grant in TOKEN_GRANTS:
            for result in TOKEN_RESULTS:
                self.token_refreshes.labels(grant, result)

        # REST
        self.api_requests = Counter(
            "faxd_api_requests_total",
            "RingCentral REST requests, by endpoint template and code.",
            ["endpoint", "code"],
            registry=r,
        )
        self.api_latency = Histogram(
            "faxd_api_request_duration_seconds",
            "RingCentral REST request latency.",
            ["endpoint"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.api_bad_bodies = Counter(
            "faxd_api_bad_bodies_total",
            "REST response bodies that could not be understood.",
            ["endpoint"],
            registry=r,
        )
        self.rate_remaining = Gauge(
            "faxd_rate_limit_remaining",
            "Requests left in the window, per RingCentral group.",
            ["group"],
            registry=r,
        )
        self.rate_limit = Gauge(
            "faxd_rate_limit_limit",
            "Requests allowed in the window, per RingCentral group.",
            ["group"],
            registry=r,
        )
        self.rate_429 = Counter(
            "faxd_rate_limited_total",
            "429 answers received, per RingCentral group.",
            ["group"],
            registry=r,
        )
        for group in GROUPS:
            self.rate_429.labels(group)

        # Reconcile
        self.reconciles = Counter(
            "faxd_reconciles_total",
            "Reconciles run, by trigger and result.",
            ["trigger", "result"],
            registry=r,
        )
        for trigger in RECONCILE_TRIGGERS:
            for result in ("ok", "error"):
                self.reconciles.labels(trigger, result)
        self.reconcile_duration = Histogram(
            "faxd_reconcile_duration_seconds",
            "Time one reconcile of one extension took.",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.queue_depth = Gauge("faxd_queue_depth", "Extensions waiting to be reconciled.", registry=r)
        self.last_sync = Gauge(
            "faxd_last_sync_timestamp_seconds",
            "Unix time of the last successful reconcile.",
            registry=r,
        )
        self.transitions = Counter(
            "faxd_transitions_total",
            "Status transitions journalled, by direction and to_status.",
            ["direction", "to_status"],
            registry=r,
        )
        for direction in ("Outbound", "Inbound"):
            for status in FaxStatus:
                self.transitions.labels(direction, status.value)
        self.failures = Counter(
            "faxd_fax_failures_total",
            "Recipients that ended in failure, by error category.",
            ["category"],
            registry=r,
        )
        for category in CATEGORIES:
            self.failures.labels(category)
        self.in_flight = Gauge("faxd_faxes_in_flight", "Faxes whose status can still change.", registry=r)
        self.oldest_in_flight = Gauge(
            "faxd_oldest_in_flight_fax_timestamp_seconds",
            "Unix creation time of the oldest fax still in flight; 0 when none is.",
            registry=r,
        )
        self.time_to_final = Histogram(
            "faxd_time_to_final_seconds",
            "From a fax's creation to its final status.",
            registry=r,
            buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
        )
        self.missed_by_push = Counter(
            "faxd_missed_by_push_total",
            "Transitions first found by a poll rather than after a push hint.",
            registry=r,
        )

        # Event socket and journal
        self.subscribers = Gauge(
            "faxd_socket_subscribers", "Clients subscribed on the event socket.", registry=r
        )
        self.socket_disconnects = Counter(
            "faxd_socket_disconnects_total",
            "Event socket clients disconnected, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in SOCKET_DISCONNECT_REASONS:
            self.socket_disconnects.labels(reason)
        self.journal_head = Gauge("faxd_journal_head_seq", "Newest journal seq.", registry=r)
        self.journal_oldest = Gauge("faxd_journal_oldest_seq", "Oldest journal seq still kept.", registry=r)
        self.loop_lag = Gauge(
            "faxd_event_loop_lag_seconds", "How late the last event-loop probe ran.", registry=r
        )

        # Process
        self.reloads = Counter(
            "faxd_config_reloads_total", "Configuration reloads (SIGHUP), by result.", ["result"], registry=r
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)

    def last_sync_time(self) -> float:
        """Unix time of the last successful reconcile, 0 if none (for STATUS= and /readyz)."""
        return float(self.last_sync._value.get())


Check = Callable[[], Awaitable[tuple[bool, str]]]


def metrics_app(registry: CollectorRegistry, ready: Check | None = None) -> web.Application:
    """``/metrics``, ``/healthz`` and ``/readyz``, served on the daemon's own event loop.

    Serving from the loop is deliberate: a wedged loop shows as a failed scrape.
    """

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready is None:
            return web.Response(text="ok\n")
        ok, why = await ready()
        return web.Response(text=f"{why}\n", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
