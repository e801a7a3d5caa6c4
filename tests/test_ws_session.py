"""WebSocket session against the simulator's gateway over real loopback sockets.

Timer-driven behaviour runs under looptime (fake loop time, real sockets); waits are on
conditions (queues, states, the simulator's recorded requests), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import RingCentral
from faxd.adapters.ws_session import WsSession, WsSettings, redact
from faxd.config import WebSocketConfig
from faxd.core.backoff import backoff
from faxd.core.wsg import Hint, event_filters
from faxd.sim import RecipientScript, SimConfig, Simulator

EXT = "200000001"
SUBSCRIBE = "/restapi/v1.0/subscription"

pytestmark = pytest.mark.looptime


#: The timings faxd shipped with before its WAN-safe defaults: a pong timeout that can fall to 0.5 s
#: shows the estimator adapting within a few pings (the defaults' 5 s floor hides it on loopback).
FAST = WsSettings(ping_interval=1, ping_timeout_min=0.5, ping_timeout=10)


def quick_delays() -> Iterator[float]:
    return backoff(1.0, 2.0, 8.0, "none")


@dataclass
class Harness:
    sim: Simulator
    rc: RingCentral
    metrics: Metrics
    session: WsSession
    hints: asyncio.Queue[Hint] = field(default_factory=asyncio.Queue)
    resyncs: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    states: list[str] = field(default_factory=list)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def until(self, condition: Callable[[], bool], within: float = 120) -> None:
        """Wait for a condition nothing announces (the simulator's connection table and request log
        have no callbacks). Under looptime the checks cost no real time; this polls a condition,
        it does not sleep for things to settle."""
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110 - see the docstring
                await asyncio.sleep(0.05)

    async def hint(self, within: float = 60) -> Hint:
        async with asyncio.timeout(within):
            return await self.hints.get()

    async def resync(self, within: float = 60) -> None:
        async with asyncio.timeout(within):
            await self.resyncs.get()

    def slow_pongs(self, above: str = "0.5") -> float:
        """Pongs that took longer than ``above`` seconds (a bucket bound of the RTT histogram)."""
        count = self.sample("faxd_ws_ping_rtt_seconds_count")
        return count - self.sample("faxd_ws_ping_rtt_seconds_bucket", le=above)

    def up(self) -> bool:
        return self.session.state == "up"

    def subscribes(self) -> list[int]:
        return [r.status for r in self.sim.requests_to(SUBSCRIBE, "POST")]

    def connects(self) -> list[str]:
        return [r.raw_path for r in self.sim.requests if r.path == "/ws"]

    def disconnects(self) -> float:
        return sum(
            sample.value
            for family in self.metrics.registry.collect()
            if family.name == "faxd_ws_disconnects"
            for sample in family.samples
            if sample.name == "faxd_ws_disconnects_total"
        )

    async def dropped(self) -> None:
        """Drop every socket and wait until the session has noticed (it may reconnect at once)."""
        before = self.disconnects()
        assert self.sim.drop_ws() == 1
        await self.until(lambda: self.disconnects() > before)


@contextlib.asynccontextmanager
async def harness(
    config: SimConfig | None = None,
    settings: WsSettings | None = None,
    sim: Simulator | None = None,
    extensions: Sequence[str] = (EXT,),
) -> AsyncIterator[Harness]:
    """A WsSession against ``sim`` (one started here from ``config`` when not given)."""
    async with contextlib.AsyncExitStack() as stack:
        if sim is None:
            sim = await stack.enter_async_context(
                Simulator(config or SimConfig(seed=3, default_delay=(1000.0, 1000.0)))
            )
        config = sim.config
        http = await stack.enter_async_context(aiohttp.ClientSession())
        metrics = Metrics(CollectorRegistry())
        rc = RingCentral(
            http,
            server=sim.url,
            client_id=config.client_id,
            client_secret=config.client_secret,
            jwt=config.jwt,
            metrics=metrics,
            rate_share=1.0,
        )
        h: Harness
        states: list[str] = []
        session = WsSession(
            rc,
            filters=event_filters(extensions),
            settings=settings or WsSettings(),
            metrics=metrics,
            on_hint=lambda hint: h.hints.put_nowait(hint),
            on_resync=lambda: h.resyncs.put_nowait(None),
            on_state=states.append,
            delays=quick_delays,
        )
        h = Harness(sim, rc, metrics, session, states=states)
        task = asyncio.create_task(session.run())
        try:
            yield h
            assert not task.done(), "run() must never return"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_session_defaults_are_the_configs() -> None:
    ws = WebSocketConfig()
    assert WsSettings() == WsSettings(
        heartbeat_interval=ws.heartbeat_interval,
        ping_interval=ws.ping_interval,
        ping_timeout_min=ws.ping_timeout_min,
        ping_timeout=ws.ping_timeout,
        max_message_bytes=ws.max_message_bytes,
    )


async def test_subscribe_then_hints_flow() -> None:
    async with harness() as h:
        await h.resync()  # the very first subscribe asks for a full reconcile
        assert h.up()
        assert h.subscribes() == [200]
        fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=5)])
        assert await h.hint() == Hint(EXT, (fax,), 0)
        assert await h.hint() == Hint(EXT, (), 1)  # Queued -> Sent, 5 s later (fake time)
        inbound = h.sim.create_inbound_fax(EXT, "+16505550111")
        got = {await h.hint(), await h.hint()}  # message-store change + the fax?direction=Inbound record
        assert got == {Hint(EXT, (inbound,), 0)}
        assert h.sample("faxd_ws_hints_total") == 4
        assert h.sample("faxd_ws_connects_total", kind="fresh") == 1
        assert h.sample("faxd_ws_state", faxd_ws_state="up") == 1
        assert h.sample("faxd_ws_last_message_timestamp_seconds") > 0
        assert any(s.startswith("WebSocket up") for s in h.states)
        assert h.resyncs.empty()
        # One wstoken per connect, and the token never shows in what we report.
        assert [r.status for r in h.sim.requests_to("/restapi/oauth/wstoken")] == [200]
        assert "access_token=<redacted>" in redact(h.connects()[0])


async def test_drop_recovers_session_and_replays() -> None:
    async with harness() as h:
        await h.resync()
        await h.dropped()
        fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=1000)])  # buffered
        assert await h.hint() == Hint(EXT, (fax,), 0)  # replayed after the recovery
        await h.until(h.up)
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
        assert h.sample("faxd_ws_connects_total", kind="recovery") == 1
        assert h.sample("faxd_ws_disconnects_total", reason="connection_lost") == 1
        assert h.subscribes() == [200]  # the subscription survived: no new POST ...
        assert h.resyncs.empty()  # ... and no resync, nothing was lost
        connects = h.connects()
        assert len(connects) == 2
        assert "wsc=" not in connects[0]
        assert "wsc=" in connects[1]
        assert len(h.sim.requests_to("/restapi/oauth/wstoken")) == 2  # a fresh ws token per connect


async def test_failed_recovery_resubscribes_and_resyncs() -> None:
    async with harness() as h:
        await h.resync()
        h.sim.fail_next_recovery("WSG-1003")
        await h.dropped()
        await h.resync()
        assert h.sample("faxd_ws_recoveries_total", result="failed") == 1
        assert h.subscribes() == [200, 200]  # on the same new connection
        assert len(h.connects()) == 2
        fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=1000)])
        assert await h.hint() == Hint(EXT, (fax,), 0)  # the new subscription id is the one accepted


async def test_recovery_window_passed_means_fresh_connect() -> None:
    config = SimConfig(seed=3, recovery_timeout=5, default_delay=(1000.0, 1000.0))
    async with harness(config) as h:
        await h.resync()
        h.sim.rate_limit_storm("Auth", 20)  # the wstoken waits out the recovery window
        await h.dropped()
        await h.resync()
        assert "wsc=" not in h.connects()[-1]
        assert h.sample("faxd_ws_connects_total", kind="fresh") == 2
        assert h.subscribes() == [200, 200]
        statuses = [r.status for r in h.sim.requests_to("/restapi/oauth/wstoken")]
        assert statuses == [200, 429, 200]  # Retry-After was waited out, not hammered


async def test_after_a_fresh_connect_the_next_recovery_presents_the_new_sessions_wsc() -> None:
    config = SimConfig(seed=3, recovery_timeout=5, default_delay=(1000.0, 1000.0))
    async with harness(config) as h:
        await h.resync()
        h.sim.rate_limit_storm("Auth", 20)  # the window passes: the reconnect is a fresh session
        await h.dropped()
        await h.resync()
        assert "wsc=" not in h.connects()[-1]
        await h.until(h.up)
        await h.dropped()
        await h.until(lambda: len(h.connects()) == 3 and h.up())
        assert "wsc=" in h.connects()[-1]
        # The new session (sequence 1 again) was recovered, not the dead one it replaced.
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
        assert h.sample("faxd_ws_recoveries_total", result="failed") == 0
        assert h.subscribes() == [200, 200]
        assert h.resyncs.empty()


def ws_statuses(h: Harness) -> list[int]:
    return [r.status for r in h.sim.requests if r.path == "/ws"]


def wstokens(h: Harness) -> list[int]:
    return [r.status for r in h.sim.requests_to("/restapi/oauth/wstoken")]


async def test_a_refused_upgrade_leaves_the_ws_token_unused_for_the_next_attempt() -> None:
    async with harness() as h:
        await h.resync()
        h.sim.refuse_ws_upgrades(4)  # the gateway answers upgrades 503 for 4 s
        await h.dropped()
        await h.until(lambda: ws_statuses(h)[-1] == 101 and h.up())
        assert ws_statuses(h) == [101, 503, 503, 503, 101]
        # One new ws token for four attempts: the refused upgrades never spent it.
        assert wstokens(h) == [200, 200]
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1


async def test_an_unused_ws_token_the_gateway_refuses_as_expired_is_replaced() -> None:
    async with harness() as h:
        await h.resync()
        h.sim.refuse_ws_upgrades(4)
        await h.dropped()
        await h.until(lambda: 503 in ws_statuses(h))
        assert h.sim.expire_ws_tokens() == 2  # the one faxd keeps for its next attempt, too
        await h.until(lambda: ws_statuses(h)[-1] == 101 and h.up())
        assert ws_statuses(h) == [101, 503, 503, 503, 4401, 101]  # 4401: Error WSG-401, then closed
        assert wstokens(h) == [200, 200, 200]
        # A refused token says nothing about the session: the wsc was kept and recovered.
        assert "wsc=" in h.connects()[-1]
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
        assert h.subscribes() == [200]


OTHER = "200000002"
TWO = SimConfig(seed=3, extensions=(EXT, OTHER), default_delay=(1000.0, 1000.0))


def subscription_requests(h: Harness) -> list[tuple[str, int]]:
    return [(r.method, r.status) for r in h.sim.requests if "subscription" in r.path]


async def test_disabled_filters_are_surfaced_polled_and_asked_for_again_only_after_long_waits() -> None:
    async with Simulator(TWO) as sim:
        sim.refuse_subscriptions("disabled", [OTHER])
        with capture_logs() as logs:
            async with harness(sim=sim, extensions=(EXT, OTHER)) as h:
                await h.resync()
                assert h.up()
                assert h.session.refused_extensions == {OTHER: "PermissionDenied"}
                assert h.sample("faxd_ws_disabled_filters") == 2  # OTHER's message-store and inbound fax
                assert any("push refused for 1 extension)" in s for s in h.states)
                fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=10**6)])
                assert await h.hint() == Hint(EXT, (fax,), 0)  # the rest of the subscription works

                await asyncio.sleep(3600)  # fake time: an hour of the refusal
                asked = subscription_requests(h)
                assert asked[0] == ("POST", 200)
                assert 2 <= len(asked) <= 4, asked  # retried after 7.5-15, 15-30, 30-60 min: no tight loop
                assert h.session.refused_extensions == {OTHER: "PermissionDenied"}
                assert h.resyncs.empty()

                h.sim.refuse_subscriptions("off")  # an administrator granted the rights
                await asyncio.sleep(3600)
                assert h.session.refused_extensions == {}
                assert h.sample("faxd_ws_disabled_filters") == 0
                await h.resync()  # OTHER's hints were missed meanwhile: reconcile everything once
                other = h.sim.create_outbound_fax(OTHER, [RecipientScript("+16505550100", after=10**6)])
                assert await h.hint() == Hint(OTHER, (other,), 0)
                assert len(h.connects()) == 1
    refused = [e for e in logs if e["event"] == "ws.push_refused"]
    assert [(e["extension"], e["reason"]) for e in refused] == [(OTHER, "PermissionDenied")]  # once
    assert [e["extension"] for e in logs if e["event"] == "ws.push_accepted"] == [OTHER]


async def test_a_refusal_retry_cut_short_by_a_lost_connection_is_scheduled_again() -> None:
    async with Simulator(TWO) as sim:
        sim.refuse_subscriptions("disabled", [OTHER])
        async with harness(sim=sim, extensions=(EXT, OTHER)) as h:
            await h.resync()
            h.sim.rate_limit_storm("Medium", 20 * 60)  # the first retry (7.5-15 min) meets only 429s
            await asyncio.sleep(16 * 60)
            assert ("PUT", 429) in subscription_requests(h)
            await h.dropped()  # ... and its connection is lost while it waits to try again
            await h.until(lambda: len(h.connects()) == 2 and h.up())
            assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
            await asyncio.sleep(60 * 60)
            assert ("PUT", 200) in subscription_requests(h)  # the retry was not forgotten
            assert h.session.refused_extensions == {OTHER: "PermissionDenied"}


async def test_sub_405_keeps_the_users_own_extension_subscribed() -> None:
    async with Simulator(TWO) as sim:
        sim.refuse_subscriptions("forbidden", [OTHER])
        async with harness(sim=sim, extensions=(EXT, OTHER)) as h:
            await h.resync()
            assert subscription_requests(h) == [("POST", 403), ("POST", 200)]  # then only its own
            assert h.session.refused_extensions == {OTHER: "SUB-405"}
            assert h.sample("faxd_ws_disabled_filters") == 2
            fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=10**6)])
            assert await h.hint() == Hint(EXT, (fax,), 0)
            await asyncio.sleep(3600)
            asked = subscription_requests(h)
            assert 3 <= len(asked) <= 5, asked  # a PUT of everything now and then, refused again
            assert {m for m, _ in asked[2:]} == {"PUT"}
            assert h.up()
            assert len(h.connects()) == 1


async def test_a_missing_permission_is_not_asked_again_in_a_tight_loop() -> None:
    async with harness() as h:
        h.sim.refuse_subscriptions("permission")
        await h.until(lambda: subscription_requests(h) == [("POST", 403)])
        await h.until(lambda: "refused (SUB-528)" in h.states[-1])
        assert h.session.refused_extensions == {EXT: "SUB-528"}
        assert h.sample("faxd_ws_disabled_filters") == 2
        await asyncio.sleep(3600)
        posts = subscription_requests(h)
        assert 2 <= len(posts) <= 4, posts  # not every few seconds (a 60 s backoff would be ~60)
        assert not h.up()
        assert len(h.connects()) == 1  # and the connection was not churned for it
        h.sim.refuse_subscriptions("off")
        await h.resync(within=3600)
        assert h.up()
        assert h.session.refused_extensions == {}


async def test_refused_resubscribe_is_retried_not_fatal() -> None:
    async with harness() as h:
        await h.resync()
        h.sim.fail_next_recovery()
        h.sim.rate_limit_storm("Medium", 10)  # the re-subscribe POST gets 429s for 10 s
        await h.dropped()
        await h.resync()
        statuses = h.subscribes()
        assert statuses[0] == 200
        assert statuses[-1] == 200
        assert 429 in statuses
        posts = h.sim.requests_to(SUBSCRIBE, "POST")
        assert posts[-1].time - posts[1].time >= 9  # Retry-After honoured on the socket too
        assert len(h.connects()) == 2  # retried on the same connection


async def test_bad_frames_are_counted_and_ignored() -> None:
    settings = WsSettings(max_message_bytes=64 * 1024)
    async with harness(settings=settings) as h:
        await h.resync()
        h.sim.send_malformed_frame("malformed")
        h.sim.send_malformed_frame("oversize", size=128 * 1024)  # above the soft limit only
        h.sim.send_foreign_notification("SMS")
        fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=1000)])
        assert await h.hint() == Hint(EXT, (fax,), 0)  # frames arrive in order: all were handled
        assert h.sample("faxd_ws_bad_frames_total", reason="not_json") == 1
        assert h.sample("faxd_ws_bad_frames_total", reason="too_large") == 1
        assert h.sample("faxd_ws_bad_frames_total", reason="other_type") == 1
        assert len(h.connects()) == 1  # none of it cost the connection


async def test_huge_frame_reconnects() -> None:
    settings = WsSettings(max_message_bytes=16 * 1024)
    async with harness(settings=settings) as h:
        await h.resync()
        h.sim.send_malformed_frame("oversize", size=1024 * 1024)  # above the library's hard limit
        await h.until(lambda: len(h.connects()) == 2 and h.up())
        assert h.sample("faxd_ws_disconnects_total", reason="too_large") == 1
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1


async def test_heartbeat_keeps_idle_connection_alive() -> None:
    config = SimConfig(seed=3, idle_timeout=100, default_delay=(1000.0, 1000.0))
    async with harness(config, WsSettings(heartbeat_interval=30)) as h:
        await h.resync()
        await h.until(lambda: len(h.sim.requests_to("Heartbeat")) >= 10, within=600)
        assert len(h.connects()) == 1
        assert h.sample("faxd_ws_disconnects_total", reason="wsg_902") == 0


async def test_a_quiet_hour_with_unanswered_heartbeats_costs_no_reconnect() -> None:
    """No official SDK waits for a Heartbeat's reply; liveness is the pings' job."""
    async with harness(settings=WsSettings(heartbeat_interval=60)) as h:
        await h.resync()
        h.sim.ignore_heartbeats()
        await asyncio.sleep(3600)  # fake loop time: the quiet hour itself, nothing to settle
        assert len(h.sim.requests_to("Heartbeat")) >= 55  # one a minute kept the session from idling
        assert h.disconnects() == 0
        assert len(h.connects()) == 1
        fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=1000)])
        assert await h.hint() == Hint(EXT, (fax,), 0)


async def test_idle_timeout_error_frame_reconnects_with_recovery() -> None:
    config = SimConfig(seed=3, idle_timeout=20, default_delay=(1000.0, 1000.0))
    async with harness(config, WsSettings(heartbeat_interval=60)) as h:
        await h.resync()
        await h.until(lambda: h.sample("faxd_ws_disconnects_total", reason="wsg_902") == 1)
        await h.until(lambda: len(h.connects()) == 2 and h.up())
        assert "wsc=" in h.connects()[1]
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
        assert h.subscribes() == [200]


async def test_blackhole_is_noticed_within_interval_plus_floor_and_resynced() -> None:
    async with harness() as h:  # defaults: a ping a second, pong timeout >= 5 s on any path
        await h.resync()
        await h.until(lambda: h.sample("faxd_ws_ping_rtt_seconds_count") >= 3)
        assert h.sample("faxd_ws_ping_timeout_seconds") == 5  # loopback: the floor
        loop = asyncio.get_running_loop()
        assert h.sim.blackhole_ws() == 1
        went_deaf = loop.time()
        lost = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=1000)])
        await h.until(lambda: len(h.connects()) == 2 and h.up(), within=10)
        reconnected = next(r.time for r in h.sim.requests if r.path == "/ws" and "wsc=" in r.raw_path)
        assert reconnected - went_deaf <= 1.0 + 5 + 0.1  # ping_interval + ping_timeout_min + token
        assert h.sample("faxd_ws_disconnects_total", reason="ping_timeout") == 1
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
        # The hint for `lost` went into the dead socket and the recovery cannot replay it: the
        # session asks for a reconcile even though the subscription survived.
        await h.resync()
        assert h.subscribes() == [200]
        assert h.hints.empty(), f"the black-holed hint for {lost} must not come back by itself"
        fax = h.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=1000)])
        assert await h.hint() == Hint(EXT, (fax,), 0)


async def test_an_hour_on_a_wan_path_costs_no_reconnect_and_a_blackhole_is_still_replaced() -> None:
    """The default liveness timings on the simulator's realistic path (seeded): pongs mostly in tens
    of ms, some in hundreds, rare 1-3 s spikes, a few lost. Not one healthy connection is cut."""
    async with harness() as h:
        await h.resync()
        h.sim.wan_path()
        await asyncio.sleep(3600)  # fake loop time: the hour itself
        assert h.sample("faxd_ws_ping_rtt_seconds_count") >= 3300
        assert h.slow_pongs(above="1") >= 5, "the path had its spikes"
        assert h.sim.gateway.pongs_lost >= 2, "and lost some pongs"
        assert h.disconnects() == 0
        assert len(h.connects()) == 1
        loop = asyncio.get_running_loop()
        assert h.sim.blackhole_ws() == 1
        went_deaf = loop.time()
        await h.until(lambda: len(h.connects()) == 2 and h.up(), within=30)
        reconnected = [r.time for r in h.sim.requests if r.path == "/ws"][-1]
        assert reconnected - went_deaf <= 10
        assert h.sample("faxd_ws_disconnects_total", reason="ping_timeout") == 1


async def test_a_path_turning_slow_and_jittery_costs_one_reconnect_at_most() -> None:
    async with harness(settings=FAST) as h:
        await h.resync()
        h.sim.delay_pongs(0.2, 0.9)
        await h.until(lambda: h.sample("faxd_ws_ping_rtt_seconds_count") >= 100, within=300)
        # The estimate had learnt loopback (a 0.5 s timeout); the first slow pongs may cost one
        # reconnect, then the timeout follows the path above its slowest pongs.
        assert h.disconnects() <= 1
        assert h.sample("faxd_ws_ping_timeout_seconds") > 0.9
        before = h.disconnects()
        assert h.sim.blackhole_ws() == 1
        await h.until(lambda: h.disconnects() > before, within=12)
        assert h.sample("faxd_ws_disconnects_total", reason="ping_timeout") == before + 1


async def spend_auth_budget(h: Harness) -> float:
    """Use up the Auth group (5 a minute at rate_share 1.0) with ws tokens; returns when it frees."""
    loop = asyncio.get_running_loop()
    while h.rc.ws_token_wait() == 0:
        await h.rc.ws_token()
    assert [r.status for r in h.sim.requests if r.group == "Auth"] == [200] * 5
    return loop.time() + h.rc.ws_token_wait()


@pytest.mark.parametrize("budget_left", [True, False])
async def test_a_path_turning_slow_is_not_cut_while_no_replacement_is_affordable(budget_left: bool) -> None:
    async with harness(settings=FAST) as h:
        await h.resync()
        await h.until(lambda: h.sample("faxd_ws_ping_timeout_seconds") == 0.5)
        if not budget_left:
            await spend_auth_budget(h)
        h.sim.delay_pongs(0.8, 0.8)
        pings = h.sample("faxd_ws_ping_rtt_seconds_count")
        await h.until(lambda: h.sample("faxd_ws_ping_rtt_seconds_count") >= pings + 10)
        assert h.slow_pongs() >= 9
        # With a ws token at hand the first 0.8 s pong costs one recovered reconnect; without one,
        # cutting the connection would have left faxd deaf until the budget freed (~a minute).
        assert h.disconnects() == (1 if budget_left else 0)


async def test_a_blackhole_is_still_replaced_as_soon_as_the_budget_allows() -> None:
    async with harness(settings=FAST) as h:
        await h.resync()
        await h.until(lambda: h.sample("faxd_ws_ping_timeout_seconds") == 0.5)
        frees_at = await spend_auth_budget(h)
        assert h.sim.blackhole_ws() == 1
        await h.until(lambda: len(h.connects()) == 2 and h.up(), within=120)
        reconnected = h.sim.requests_to("/restapi/oauth/wstoken", "POST")[-1].time
        assert frees_at <= reconnected <= frees_at + 0.5
        assert h.sample("faxd_ws_disconnects_total", reason="ping_timeout") == 1


async def test_a_fixed_short_timeout_makes_the_same_path_flap() -> None:
    """The counterpart of the test above: without adaptation the path is torn down again and again."""
    fixed = WsSettings(ping_timeout_min=0.5, ping_timeout=0.5)
    async with harness(settings=fixed) as h:
        await h.resync()
        h.sim.delay_pongs(0.2, 0.9)
        await h.until(lambda: h.sample("faxd_ws_disconnects_total", reason="ping_timeout") >= 3, within=300)


async def test_update_filters_puts_on_the_live_subscription() -> None:
    async with harness() as h:
        await h.resync()
        await h.session.update_filters(event_filters([EXT])[:1])
        puts = h.sim.requests_to("/restapi/v1.0/subscription/{subscriptionId}", "PUT")
        assert [r.status for r in puts] == [200]
        assert h.subscribes() == [200]
        inbound = h.sim.create_inbound_fax(EXT, "+16505550111")
        assert await h.hint() == Hint(EXT, (inbound,), 0)
        with pytest.raises(TimeoutError):
            await h.hint(within=5)  # the fax?direction=Inbound filter is gone


async def test_absolute_timeout_error_frame_reconnects_with_recovery() -> None:
    config = SimConfig(seed=3, absolute_timeout=50, default_delay=(1000.0, 1000.0))
    async with harness(config) as h:
        await h.resync()
        await h.until(lambda: h.sample("faxd_ws_disconnects_total", reason="wsg_903") == 1)
        await h.until(lambda: len(h.connects()) == 2 and h.up())
        assert "wsc=" in h.connects()[1]
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
        assert h.subscribes() == [200]  # the subscription survived: no second POST


async def test_expired_token_mid_run_refreshes_and_recovery_still_succeeds() -> None:
    async with harness() as h:
        await h.resync()
        assert h.sim.expire_access_tokens() >= 1
        await h.dropped()
        await h.until(lambda: len(h.connects()) == 2 and h.up())
        grants = [r.status for r in h.sim.requests_to("/restapi/oauth/token")]
        wstokens = [r.status for r in h.sim.requests_to("/restapi/oauth/wstoken")]
        assert grants == [200, 200]  # the login, then one refresh: no second login
        assert wstokens == [200, 401, 200]  # the expired token was refused once, then retried
        # Same OAuth session, so the gateway recovered the WS session: no resubscribe, no resync.
        assert h.sample("faxd_ws_recoveries_total", result="successful") == 1
        assert h.subscribes() == [200]
        assert h.resyncs.empty()


async def test_cancelled_mid_subscribe_leaves_no_task_behind() -> None:
    async with harness() as h:
        await h.resync()
        h.sim.fail_next_recovery()  # the reconnect must subscribe again...
        h.sim.rate_limit_storm("Medium", 600)  # ...and its POST keeps getting 429s
        await h.dropped()
        await h.until(lambda: 429 in h.subscribes())
    # The harness cancelled run() while the subscribe was waiting out Retry-After.
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("ws-") and not t.done()]
    assert leftovers == []
