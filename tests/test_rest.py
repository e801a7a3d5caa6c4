"""RingCentral REST client against the simulator over real loopback sockets.

Assertions look at what the simulator recorded (requests, grants) as well as at results.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import (
    MAX_SERVER_RETRY_AFTER,
    ApiError,
    AuthFailed,
    Document,
    ExtensionNotFound,
    RateLimited,
    RingCentral,
    SyncTokenStale,
    _bulk_entries,
    _Response,
    parse_multipart,
)
from faxd.sim import RecipientScript, SimConfig, Simulator

EXT = "200000001"
TOKEN = "/restapi/oauth/token"
PDF = Document("a.pdf", "application/pdf", b"%PDF-1.4 a")


@dataclass
class Clock:
    """Wall clock the client uses for token expiry; tests move it."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    sim: Simulator
    rc: RingCentral
    metrics: Metrics
    clock: Clock = field(default_factory=Clock)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def calls(self, suffix: str, method: str | None = None) -> list[int]:
        return [r.status for r in self.sim.requests_to(suffix, method)]


async def make_env(config: SimConfig, *, share: float = 1.0) -> AsyncIterator[Env]:
    async with Simulator(config) as sim, aiohttp.ClientSession() as http:
        metrics = Metrics(CollectorRegistry())
        clock = Clock()
        rc = RingCentral(
            http,
            server=sim.url,
            client_id=config.client_id,
            client_secret=config.client_secret,
            jwt=config.jwt,
            metrics=metrics,
            rate_share=share,
            wall=clock,
        )
        yield Env(sim, rc, metrics, clock)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env(SimConfig(seed=1)):
        yield e


async def test_login_sets_owner_and_metrics(env: Env) -> None:
    await env.rc.login()
    assert env.rc.owner_id == EXT
    assert env.calls(TOKEN) == [200]
    assert env.sample("faxd_token_refreshes_total", grant="jwt", result="ok") == 1
    assert env.sample("faxd_token_expiry_timestamp_seconds") == env.clock.now + 3600
    assert env.sample("faxd_rate_limit_limit", group="Auth") == 5
    assert env.sample("faxd_rate_limit_remaining", group="Auth") == 4


async def test_first_call_logs_in_by_itself(env: Env) -> None:
    result = await env.rc.message_sync(EXT, None)
    assert result.records == []
    assert env.calls(TOKEN) == [200]


async def test_wrong_jwt_is_auth_failed() -> None:
    async for e in make_env(SimConfig()):
        e.rc._jwt = "not-the-jwt"
        with pytest.raises(AuthFailed) as info:
            await e.rc.login()
        assert info.value.status == 400
        assert info.value.code == "OAU-140"
        assert "not-the-jwt" not in str(info.value)
        assert e.sample("faxd_token_refreshes_total", grant="jwt", result="rejected") == 1


async def test_proactive_refresh_is_single_flight(env: Env) -> None:
    await env.rc.login()
    env.clock.now += 3600 - 30  # inside the 60 s margin before expiry
    results = await asyncio.gather(*(env.rc.message_sync(EXT, None) for _ in range(8)))
    assert len(results) == 8
    assert env.calls(TOKEN) == [200, 200]  # the JWT grant, then exactly one refresh
    assert env.sample("faxd_token_refreshes_total", grant="refresh", result="ok") == 1
    assert env.sample("faxd_token_refreshes_total", grant="jwt", result="ok") == 1
    # Nobody got a 401: the refresh happened before the requests.
    assert env.calls("/message-sync") == [200] * 8


async def test_401_refreshes_once_and_retries(env: Env) -> None:
    await env.rc.message_sync(EXT, None)
    env.sim.expire_access_tokens()
    await asyncio.gather(*(env.rc.message_sync(EXT, None) for _ in range(4)))
    statuses = env.calls("/message-sync")
    assert statuses.count(401) == 4
    assert statuses.count(200) == 5
    assert env.sample("faxd_token_refreshes_total", grant="refresh", result="ok") == 1
    assert env.sample("faxd_token_refreshes_total", grant="jwt", result="ok") == 1
    assert env.calls(TOKEN) == [200, 200]


async def test_rejected_refresh_falls_back_to_jwt_once(env: Env) -> None:
    await env.rc.login()
    tokens = env.rc._tokens
    assert tokens is not None
    assert tokens.refresh is not None
    env.sim.tokens.revoke(None, {"token": tokens.refresh})  # the whole OAuth session dies
    await asyncio.gather(*(env.rc.message_sync(EXT, None) for _ in range(5)))
    # login, one rejected refresh, one new JWT grant: however many callers saw the 401.
    assert env.calls(TOKEN) == [200, 400, 200]
    assert env.sample("faxd_token_refreshes_total", grant="refresh", result="rejected") == 1
    assert env.sample("faxd_token_refreshes_total", grant="jwt", result="ok") == 2


async def test_message_sync_fsync_isync_and_stale(env: Env) -> None:
    first = env.sim.create_outbound_fax(EXT, [RecipientScript("+16505550100", after=1000)])
    full = await env.rc.message_sync(EXT, None)
    assert [str(r["id"]) for r in full.records] == [first]
    assert not full.older_records_exist
    second = env.sim.create_inbound_fax(EXT, "+16505550111")
    inc = await env.rc.message_sync(EXT, full.sync_token)
    assert second in [str(r["id"]) for r in inc.records]
    assert inc.sync_token
    raw = [r.raw_path for r in env.sim.requests_to("/message-sync")]
    assert "syncType=FSync" in raw[0]
    assert "messageType=Fax" in raw[0]
    assert "recordCount=" in raw[0]
    assert "syncType=ISync" in raw[1]
    assert "syncToken=" in raw[1]
    assert "dateFrom" not in raw[1]  # the token carries the frame; dateFrom would redefine it
    with pytest.raises(ValueError, match="full sync only"):
        await env.rc.message_sync(EXT, inc.sync_token, date_from=datetime.now(UTC))
    env.sim.stale_sync_tokens()
    with pytest.raises(SyncTokenStale) as info:
        await env.rc.message_sync(EXT, inc.sync_token)
    assert (info.value.status, info.value.code) == (400, "MSG-333")
    assert env.sample("faxd_api_requests_total", endpoint="message-sync", code="400") == 1
    # CMN-101 "Parameter [syncToken] value is invalid" means the same: the token is no good.
    again = await env.rc.message_sync(EXT, None)
    env.sim.stale_sync_tokens("CMN-101")
    with pytest.raises(SyncTokenStale) as info:
        await env.rc.message_sync(EXT, again.sync_token)
    assert (info.value.status, info.value.code) == (400, "CMN-101")
    # A 400 of a full sync is not about a token: a plain ApiError.
    env.sim.fail_next_requests(1, status=400)
    with pytest.raises(ApiError) as plain:
        await env.rc.message_sync(EXT, None)
    assert type(plain.value) is ApiError


async def test_get_messages_single_bulk_and_missing(env: Env) -> None:
    ids = [
        env.sim.create_outbound_fax(EXT, [RecipientScript(f"+1650555010{i}", after=1000)]) for i in range(3)
    ]
    one = (await env.rc.get_messages(EXT, ids[:1]))[ids[0]]
    assert one is not None
    assert str(one["id"]) == ids[0]
    assert await env.rc.get_messages(EXT, ["999999999"]) == {"999999999": None}
    many = await env.rc.get_messages(EXT, [*ids, "999999999"])
    assert set(many) == {*ids, "999999999"}
    assert many["999999999"] is None
    for i in ids:
        record = many[i]
        assert record is not None
        assert str(record["id"]) == i
        assert record["messageStatus"] == "Queued"
    assert env.calls("/message-store/{messageId}", "GET") == [200, 404, 207]


async def test_get_messages_chunks_of_fifty(env: Env) -> None:
    ids = [str(900000000 + i) for i in range(101)]
    found = await env.rc.get_messages(EXT, ids)
    assert found == dict.fromkeys(ids)
    raw = [r.raw_path for r in env.sim.requests_to("/message-store/{messageId}")]
    assert [p.rsplit("/", 1)[1].count(",") + 1 for p in raw] == [50, 50, 1]


async def test_send_fax_multipart(env: Env) -> None:
    env.sim.set_outcome("+16505550123", RecipientScript("+16505550123", outcome="SendingFailed", after=1000))
    record = await env.rc.send_fax(
        EXT,
        to=["+16505550123", "+16505550124"],
        documents=[
            Document("a.pdf", "application/pdf", b"%PDF-1.4 a"),
            Document("b.txt", "text/plain", b"hello"),
        ],
        cover_text="Hi",
        resolution="High",
    )
    assert record["messageStatus"] == "Queued"
    assert [t["phoneNumber"] for t in record["to"]] == ["+16505550123", "+16505550124"]
    stored = env.sim.message(str(record["id"]))
    assert stored["coverPageText"] == "Hi"
    assert stored["faxResolution"] == "High"
    assert stored["coverIndex"] == 1  # none asked: the account's default cover page
    record = await env.rc.send_fax(EXT, to=["+16505550123"], documents=[PDF], cover_index=0)
    assert env.sim.message(str(record["id"]))["coverIndex"] == 0
    # The spec's fax request requires an attachment: refused here, before any request.
    with pytest.raises(ValueError, match="at least one document"):
        await env.rc.send_fax(EXT, to=["+16505550123"], documents=[], cover_text="a cover page alone")
    assert env.calls("/fax", "POST") == [200, 200]
    assert env.sim.requests_to("/fax", "POST")[0].group == "Heavy"


@pytest.mark.looptime
async def test_429_penalises_the_group(env: Env) -> None:
    await env.rc.login()
    env.sim.rate_limit_storm("Light", 2)
    with pytest.raises(RateLimited) as info:
        await env.rc.message_sync(EXT, None)
    assert info.value.group == "Light"
    assert info.value.status == 429
    assert 1 <= info.value.retry_after <= 2
    assert env.sample("faxd_rate_limited_total", group="Light") == 1
    assert env.rc.budget.penalised("Light", asyncio.get_running_loop().time())
    # Other groups are not held back.
    await env.rc.ws_token()
    # The next Light request waits out the penalty instead of hitting the storm again.
    await env.rc.message_sync(EXT, None)
    assert env.calls("/message-sync") == [429, 200]
    sync = env.sim.requests_to("/message-sync")
    assert sync[1].time - sync[0].time >= info.value.retry_after - 0.05


@pytest.mark.parametrize(("html", "code"), [(False, "http_503"), (True, "http_503")])
async def test_5xx_is_an_api_error(env: Env, html: bool, code: str) -> None:
    await env.rc.login()
    env.sim.fail_next_requests(1, status=503, html=html)
    with pytest.raises(ApiError) as info:
        await env.rc.message_sync(EXT, None)
    assert (info.value.status, info.value.code) == (503, code)
    assert env.sample("faxd_api_requests_total", endpoint="message-sync", code="503") == 1
    await env.rc.message_sync(EXT, None)  # and the client carries on


async def test_non_json_success_is_bad_body(env: Env) -> None:
    await env.rc.login()
    env.sim.fail_next_requests(1, status=200, html=True)
    with pytest.raises(ApiError) as info:
        await env.rc.message_sync(EXT, None)
    assert info.value.code == "bad_body"
    assert env.sample("faxd_api_bad_bodies_total", endpoint="message-sync") == 1


async def test_connection_error() -> None:
    async with aiohttp.ClientSession() as http:
        metrics = Metrics(CollectorRegistry())
        rc = RingCentral(
            http, server="http://127.0.0.1:9", client_id="c", client_secret="s", jwt="j", metrics=metrics
        )
        with pytest.raises(ApiError) as info:
            await rc.login()
        assert (info.value.status, info.value.code) == (0, "connection")
        assert (
            metrics.registry.get_sample_value(
                "faxd_api_requests_total", {"endpoint": "token", "code": "connection"}
            )
            == 1
        )


async def test_ws_token_and_aclose_revokes(env: Env) -> None:
    tok = await env.rc.ws_token()
    assert tok.uri.startswith("ws://127.0.0.1:")
    assert tok.token
    assert tok.token not in repr(tok)
    await env.rc.aclose()
    assert env.calls("/restapi/oauth/revoke") == [200]
    await env.rc.aclose()  # idempotent: nothing left to revoke
    assert env.calls("/restapi/oauth/revoke") == [200]


def test_parse_multipart_tolerates_lf_preamble_and_no_closer() -> None:
    body = b'preamble\n--B\nContent-Type: application/json\n\n{"a": 1}\n--B\r\n\r\n{"b": 2}\r\n--B'
    parts = parse_multipart(body, "B")
    assert [json.loads(p) for _, p in parts] == [{"a": 1}, {"b": 2}]
    assert parts[0][0] == {"content-type": "application/json"}
    with pytest.raises(ValueError, match="delimiter"):
        parse_multipart(b"nothing here", "B")


def test_bulk_json_variant() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    doc = [
        {"resourceId": "1", "status": 200, "body": {"id": 1}},
        {"resourceId": "2", "status": 404, "body": {}},
    ]
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/vnd.ringcentral.multipart+json"}))
    entries = _bulk_entries(_Response(207, headers, json.dumps(doc).encode()))
    assert entries == [(200, "1", {"id": 1}), (404, "2", {})]
    with pytest.raises(ValueError, match="boundary"):
        _bulk_entries(_Response(207, CIMultiDictProxy(CIMultiDict({"Content-Type": "multipart/mixed"})), b""))


@pytest.mark.looptime
@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_of_a_5xx_is_reported_to_the_owner_of_the_work(env: Env, form: str) -> None:
    """RingCentral's errors doc: Retry-After "should always be obeyed if provided". The client reports
    it on the error; the owner of the work obeys it (the scheduler, for that key only), so the group
    is not held: other extensions' requests still go (docs/scheduler.md §5)."""
    await env.rc.login()
    value = "20" if form == "seconds" else formatdate(env.clock.now + 20, usegmt=True)
    env.sim.fail_next_requests(1, status=503, retry_after=value)
    with pytest.raises(ApiError) as info:
        await env.rc.message_sync(EXT, None)
    assert (info.value.status, info.value.retry_after) == (503, 20)
    await env.rc.get_messages(EXT, ["999999999"])  # the same group (Light): not held back
    light = [r for r in env.sim.requests if r.group == "Light"]
    assert [r.status for r in light] == [503, 404]
    assert light[1].time - light[0].time < 1


@pytest.mark.looptime
async def test_retry_after_of_a_5xx_is_bounded_and_absent_without_the_header(env: Env) -> None:
    env.sim.fail_next_requests(1, status=503, retry_after=30)
    with pytest.raises(ApiError) as info:
        await env.rc.login()
    assert info.value.retry_after == 30
    await env.rc.login()
    # A Retry-After of a day is reported as at most MAX_SERVER_RETRY_AFTER, not a day.
    env.sim.fail_next_requests(1, status=503, retry_after=86400)
    with pytest.raises(ApiError) as info:
        await env.rc.message_sync(EXT, None)
    assert info.value.retry_after == MAX_SERVER_RETRY_AFTER
    env.sim.fail_next_requests(1, status=502, retry_after=None)
    with pytest.raises(ApiError) as info:
        await env.rc.message_sync(EXT, None)
    assert info.value.retry_after is None


@pytest.mark.looptime
async def test_the_servers_rate_limit_group_wins_over_the_local_table() -> None:
    """RingCentral's rate-limit doc: the X-Rate-Limit-Group header names the group a request was
    counted in, and groups may change. Here the server counts message-sync in Heavy (our table:
    Light): its 429 must hold back Heavy (the fax send), not Light."""
    async for env in make_env(SimConfig(seed=1)):
        await env.rc.login()
        env.sim.set_rate_limit_group("GET", "/message-sync", "Heavy")
        await env.rc.message_sync(EXT, None)
        assert env.sample("faxd_rate_limit_limit", group="Heavy") == 10
        assert env.rc.budget.limits("Light") == (50, 60.0)  # not taught Heavy's limit
        env.sim.rate_limit_storm("Heavy", 30)
        with pytest.raises(RateLimited) as info:
            await env.rc.message_sync(EXT, None)
        assert info.value.group == "Heavy"
        assert env.sample("faxd_rate_limited_total", group="Heavy") == 1
        assert env.sample("faxd_rate_limited_total", group="Light") == 0
        refused = env.sim.requests[-1]
        await env.rc.get_messages(EXT, ["999999999"])  # Light: not held back
        await env.rc.send_fax(
            EXT, to=["+16505550100"], documents=[Document("a.pdf", "application/pdf", b"%PDF")]
        )
        assert [r.status for r in env.sim.requests if r.status == 429] == [429]  # no second one
        get, send = env.sim.requests_to("/message-store/{messageId}")[0], env.sim.requests_to("/fax")[0]
        assert get.time - refused.time < 1
        assert send.time - refused.time >= 30 - 0.05
        # Later message-syncs are paced in Heavy from the start (learned from the header).
        assert env.rc._group_of("GET", "message-sync", "/message-sync") == "Heavy"


async def test_bulk_parts_are_filed_by_their_own_id_never_by_position(env: Env) -> None:
    """Bulk GET bodies that come in another order than their status entries: nothing is filed
    under the wrong id; the parts that prove no id are a bad body (counted), asked again later."""
    ids = [
        env.sim.create_outbound_fax(EXT, [RecipientScript(f"+1650555010{i}", after=1000)]) for i in range(2)
    ]
    env.sim.bulk_get_fault("shuffle")
    found = await env.rc.get_messages(EXT, ids)
    assert all(record is None or str(record["id"]) == key for key, record in found.items())
    assert found == {}  # both records sat next to the other id's href: neither proves its id
    assert env.sample("faxd_api_bad_bodies_total", endpoint="message-bulk-get") == 1
    found = await env.rc.get_messages(EXT, ids)  # the fault is over: everything reads
    assert {key: str(record["id"]) for key, record in found.items() if record} == {i: i for i in ids}


async def test_a_bulk_part_for_an_id_not_asked_is_a_bad_body(env: Env) -> None:
    ids = [
        env.sim.create_outbound_fax(EXT, [RecipientScript(f"+1650555010{i}", after=1000)]) for i in range(3)
    ]
    env.sim.bulk_get_fault("unasked")
    found = await env.rc.get_messages(EXT, [*ids[:2], "999999999"])
    assert set(found) == set(ids[:2])  # 999999999 was answered with a fax not asked: left out
    assert all(record is not None and str(record["id"]) == key for key, record in found.items())
    assert env.sample("faxd_api_bad_bodies_total", endpoint="message-bulk-get") == 1


async def test_a_404_naming_the_extension_is_not_a_missing_message(env: Env) -> None:
    """404 CMN-102 "Resource for parameter [extensionId] is not found" (deleted or mistyped) raises
    ExtensionNotFound from every read; a 404 naming the message still reads as None (purged)."""
    ids = [
        env.sim.create_outbound_fax(EXT, [RecipientScript(f"+1650555010{i}", after=1000)]) for i in range(2)
    ]
    assert await env.rc.get_messages(EXT, ["999999999"]) == {"999999999": None}
    for extension in ("299999999",):  # never existed (a typo)
        with pytest.raises(ExtensionNotFound):
            await env.rc.message_sync(extension, None)
    env.sim.remove_extension(EXT)  # deleted
    with pytest.raises(ExtensionNotFound) as info:
        await env.rc.get_messages(EXT, ids[:1])
    assert (info.value.status, info.value.code) == (404, "CMN-102")
    with pytest.raises(ExtensionNotFound):
        await env.rc.get_messages(EXT, ids)
    with pytest.raises(ExtensionNotFound):
        await env.rc.message_sync(EXT, None)
    env.sim.remove_extension(EXT, restore=True)
    assert set(await env.rc.get_messages(EXT, ids)) == set(ids)
