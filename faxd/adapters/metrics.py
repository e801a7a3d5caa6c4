"""Prometheus metrics of faxd, built against an injected registry, and the HTTP app that serves them.

Every family faxd exports (docs/operations.md §5) lives here so that names, help texts, units and
label sets are decided in one place. Labels are bounded: no fax ids, phone numbers or extension ids,
and label children that are known in advance are created up front so a scrape shows zeros instead of
missing series.
This module must not decide anything about faxes; adapters call its methods when things happen.
"""

from __future__ import annotations

import platform
from collections.abc import Awaitable, Callable, Iterable, Sequence
from itertools import product

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
from faxd.core.wsg import WsState

GROUPS = ("Light", "Medium", "Heavy", "Auth")
WS_STATES = tuple(state.value for state in WsState)
#: The request scheduler's classes (faxd.core.scheduler.Priority, lowercase), highest first.
SCHED_PRIORITIES = ("user", "push", "settle", "resync", "active_poll", "safety_poll")
#: Why a document download failed: a 429 (retried after Retry-After), a 5xx, no answer, the disk
#: (ENOSPC and other write errors), RingCentral refused (4xx: not retried), the message is gone (404).
DOCUMENT_FAILURES = ("rate_limited", "server", "network", "disk", "rejected", "gone")
RECONCILE_TRIGGERS = ("push", "poll", "startup", "resync", "request")
WS_CONNECT_KINDS = ("fresh", "recovery")
#: Why a WebSocket connection ended; ``faxd.adapters.ws_session.classify`` folds every ending into these.
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
#: Error codes of a refused incremental sync, as labels; any other code is counted as "other".
SYNC_RESET_CODES = ("MSG-333", "CMN-101", "other")
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


def add_process_collectors(registry: CollectorRegistry) -> None:
    """``process_*``, ``python_info`` and ``python_gc_*`` in ``registry`` (the default registry has them)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def _counter(
    r: CollectorRegistry,
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    children: Iterable[tuple[str, ...]] = (),
) -> Counter:
    """A counter; ``children`` are the label values known in advance, created so they scrape as 0."""
    counter = Counter(name, doc, list(labels), registry=r)
    for values in children:
        counter.labels(*values)
    return counter


def _gauge(r: CollectorRegistry, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    return Gauge(name, doc, list(labels), registry=r)


def _histogram(
    r: CollectorRegistry, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
) -> Histogram:
    return Histogram(name, doc, list(labels), registry=r, buckets=buckets)


class Metrics:
    """All metric families of faxd, registered in ``registry`` (in this order on a scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Counters and histograms would each get a `_created` series: noise for Prometheus.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self.build_info = Info("faxd_build", "faxd version.", registry=registry)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        self._websocket(registry)
        self._auth_and_rest(registry)
        self._reconcile(registry)
        self._socket_and_process(registry)
        self._resends(registry)
        self._outlets(registry)
        self._documents(registry)

    def _resends(self, r: CollectorRegistry) -> None:
        # The resend policy (send.retry, faxd.adapters.resend).
        self.resends = _counter(
            r,
            "faxd_resends_total",
            "Resend requests (send.retry), by result: sent, or failed (tried again later).",
            ["result"],
            product(("sent", "failed")),
        )
        self.resend_gave_up = _counter(
            r,
            "faxd_resend_gave_up_total",
            "Logical faxes faxd stopped resending, by reason.",
            ["reason"],
            product(("max_attempts", "deadline", "refused", "interrupted")),
        )
        self.resends_planned = _gauge(r, "faxd_resends_planned", "Resends waiting for their time.")

    def _websocket(self, r: CollectorRegistry) -> None:
        self.ws_state = Enum(
            "faxd_ws_state", "State of the WebSocket session.", states=list(WS_STATES), registry=r
        )
        self.ws_connects = _counter(
            r,
            "faxd_ws_connects_total",
            "WebSocket connections opened, fresh or by session recovery.",
            ["kind"],
            product(WS_CONNECT_KINDS),
        )
        self.ws_disconnects = _counter(
            r,
            "faxd_ws_disconnects_total",
            "WebSocket connections lost, by reason.",
            ["reason"],
            product(WS_DISCONNECT_REASONS),
        )
        self.ws_recoveries = _counter(
            r,
            "faxd_ws_recoveries_total",
            "WSG session recoveries attempted, by result.",
            ["result"],
            product(("successful", "failed")),
        )
        self.ws_last_message = _gauge(
            r,
            "faxd_ws_last_message_timestamp_seconds",
            "Unix time of the last frame received from the WebSocket gateway.",
        )
        self.ws_bad_frames = _counter(
            r,
            "faxd_ws_bad_frames_total",
            "WebSocket frames ignored as malformed or foreign, by reason.",
            ["reason"],
            product(WS_BAD_FRAME_REASONS),
        )
        self.ws_hints = _counter(r, "faxd_ws_hints_total", "Fax change notifications received.")
        self.ws_ping_rtt = _histogram(
            r,
            "faxd_ws_ping_rtt_seconds",
            "Round trip of WebSocket pings (what the pong timeout adapts to).",
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.ws_disabled_filters = _gauge(
            r,
            "faxd_ws_disabled_filters",
            "Event filters RingCentral refused to subscribe to (disabledFilters or a 403); "
            "their extensions get no push and are tracked by polling.",
        )
        self.ws_ping_timeout = _gauge(
            r,
            "faxd_ws_ping_timeout_seconds",
            "How long the next pong may take before the connection is called dead.",
        )

    def _auth_and_rest(self, r: CollectorRegistry) -> None:
        self.token_expiry = _gauge(
            r, "faxd_token_expiry_timestamp_seconds", "Unix time when the access token expires."
        )
        self.token_refreshes = _counter(
            r,
            "faxd_token_refreshes_total",
            "OAuth token grants, by grant and result.",
            ["grant", "result"],
            product(TOKEN_GRANTS, TOKEN_RESULTS),
        )
        self.api_requests = _counter(
            r,
            "faxd_api_requests_total",
            "RingCentral REST requests, by endpoint template and code.",
            ["endpoint", "code"],
        )
        self.api_latency = _histogram(
            r,
            "faxd_api_request_duration_seconds",
            "RingCentral REST request latency.",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ["endpoint"],
        )
        self.api_bad_bodies = _counter(
            r, "faxd_api_bad_bodies_total", "REST response bodies that could not be understood.", ["endpoint"]
        )
        self.rate_remaining = _gauge(
            r, "faxd_rate_limit_remaining", "Requests left in the window, per RingCentral group.", ["group"]
        )
        self.rate_limit = _gauge(
            r, "faxd_rate_limit_limit", "Requests allowed in the window, per RingCentral group.", ["group"]
        )
        self.rate_429 = _counter(
            r,
            "faxd_rate_limited_total",
            "429 answers received, per RingCentral group.",
            ["group"],
            product(GROUPS),
        )

    def _reconcile(self, r: CollectorRegistry) -> None:
        self.reconciles = _counter(
            r,
            "faxd_reconciles_total",
            "Reconciles run, by trigger and result.",
            ["trigger", "result"],
            product(RECONCILE_TRIGGERS, ("ok", "error")),
        )
        self.reconcile_duration = _histogram(
            r,
            "faxd_reconcile_duration_seconds",
            "Time one reconcile of one extension took.",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.sync_token_resets = _counter(
            r,
            "faxd_sync_token_resets_total",
            "Incremental syncs refused (400) whose sync token was dropped for a full sync, by error code.",
            ["code"],
            product(SYNC_RESET_CODES),
        )
        self.full_sync_failing = _gauge(
            r,
            "faxd_full_sync_failing",
            "Extensions whose last full sync failed; each is retried with backoff.",
        )
        self.extensions_not_found = _gauge(
            r,
            "faxd_extensions_not_found",
            "Configured extensions RingCentral answers 404 CMN-102 (extensionId) for: deleted or mistyped.",
        )
        self.queue_depth = _gauge(r, "faxd_queue_depth", "Keys waiting for the request scheduler, in all.")
        self._scheduler(r)
        self.last_sync = _gauge(
            r, "faxd_last_sync_timestamp_seconds", "Unix time of the last successful reconcile."
        )
        self.transitions = _counter(
            r,
            "faxd_transitions_total",
            "Status transitions journalled, by direction and to_status.",
            ["direction", "to_status"],
            product(("Outbound", "Inbound"), [status.value for status in FaxStatus]),
        )
        self.failures = _counter(
            r,
            "faxd_fax_failures_total",
            "Recipients that ended in failure, by error category.",
            ["category"],
            product(CATEGORIES),
        )
        self.in_flight = _gauge(r, "faxd_faxes_in_flight", "Faxes whose status can still change.")
        self.oldest_in_flight = _gauge(
            r,
            "faxd_oldest_in_flight_fax_timestamp_seconds",
            "Unix creation time of the oldest fax still in flight; 0 when none is.",
        )
        self.time_to_final = _histogram(
            r,
            "faxd_time_to_final_seconds",
            "From a fax's creation to its final status.",
            (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
        )
        self.missed_by_push = _counter(
            r, "faxd_missed_by_push_total", "Transitions first found by a poll rather than after a push hint."
        )

    def _scheduler(self, r: CollectorRegistry) -> None:
        """The request scheduler (docs/scheduler.md): queues, waits, budget, coalescing."""
        self.sched_depth = _gauge(
            r, "faxd_sched_queue_depth", "Keys waiting for a grant, per request class.", ["priority"]
        )
        for priority in SCHED_PRIORITIES:
            self.sched_depth.labels(priority)
        self.sched_wait = _histogram(
            r,
            "faxd_sched_wait_seconds",
            "From a request's submission to its grant (quiet period, queue and budget), per class.",
            (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            ["priority"],
        )
        for priority in SCHED_PRIORITIES:
            self.sched_wait.labels(priority)
        self.sched_room = _gauge(
            r,
            "faxd_rate_budget_room",
            "Requests faxd may still send in the current window, per group (share less sent and reserved).",
            ["group"],
        )
        self.sched_tokens = _gauge(
            r, "faxd_rate_budget_tokens", "Tokens in the pacing bucket, per paced group.", ["group"]
        )
        for group in GROUPS:
            self.sched_room.labels(group)
        self.effective_debounce = _gauge(
            r,
            "faxd_effective_debounce_seconds",
            "How long a new push hint would wait now (the quiet period, grown while Light budget is scarce).",
        )

    def _socket_and_process(self, r: CollectorRegistry) -> None:
        self.subscribers = _gauge(r, "faxd_socket_subscribers", "Clients subscribed on the event socket.")
        self.socket_disconnects = _counter(
            r,
            "faxd_socket_disconnects_total",
            "Event socket clients disconnected, by reason.",
            ["reason"],
            product(SOCKET_DISCONNECT_REASONS),
        )
        self.journal_head = _gauge(r, "faxd_journal_head_seq", "Newest journal seq.")
        self.journal_oldest = _gauge(r, "faxd_journal_oldest_seq", "Oldest journal seq still kept.")
        self.loop_lag = _gauge(r, "faxd_event_loop_lag_seconds", "How late the last event-loop probe ran.")
        self.reloads = _counter(
            r,
            "faxd_config_reloads_total",
            "Configuration reloads (SIGHUP), by result.",
            ["result"],
            product(("ok", "error")),
        )

    def _outlets(self, r: CollectorRegistry) -> None:
        # Labelled by outlet name: bounded by the config (outlets.NAME), children made as outlets start.
        self.outlet_delivered = _counter(
            r,
            "faxd_outlet_delivered_total",
            "Events an outlet delivered (2xx, or a hook's exit 0).",
            ["outlet"],
        )
        self.outlet_failed = _counter(
            r,
            "faxd_outlet_failed_attempts_total",
            "Delivery attempts that failed (retried or given up).",
            ["outlet"],
        )
        self.outlet_dead_lettered = _counter(
            r,
            "faxd_outlet_dead_lettered_total",
            "Events an outlet gave up on, into the dead-letter table.",
            ["outlet"],
        )
        self.outlet_retrying = _gauge(
            r,
            "faxd_outlet_retrying",
            "Events an outlet is retrying now (waiting for the next attempt).",
            ["outlet"],
        )
        self.outlet_lag_events = _gauge(
            r,
            "faxd_outlet_lag_events",
            "Journal events after the outlet's cursor (its position).",
            ["outlet"],
        )
        self.outlet_lag_seconds = _gauge(
            r,
            "faxd_outlet_lag_seconds",
            "Age of the oldest event the outlet has not delivered yet; 0 when caught up.",
            ["outlet"],
        )
        self.outlet_cursor = _gauge(r, "faxd_outlet_cursor_seq", "The outlet's committed cursor.", ["outlet"])

    def _documents(self, r: CollectorRegistry) -> None:
        """Inbound fax documents (faxd.adapters.documents)."""
        self.documents_downloaded = _counter(
            r, "faxd_documents_downloaded_total", "Received fax documents written to the spool directory."
        )
        self.documents_failed = _counter(
            r,
            "faxd_documents_failed_total",
            "Failed tries to download or write a received fax's document, by reason (most are retried).",
            ["reason"],
            [(reason,) for reason in DOCUMENT_FAILURES],
        )
        self.documents_pending = _gauge(
            r, "faxd_documents_pending", "Received fax documents waiting to be downloaded (or retried)."
        )
        self.documents_bytes = _counter(
            r, "faxd_documents_bytes_total", "Bytes of received fax documents written to the spool."
        )

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
