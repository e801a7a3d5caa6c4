"""faxd behind an HTTP(S) egress proxy: REST and WebSocket through a real CONNECT proxy on loopback
(tests/connect_proxy.py), set by ``ringcentral.proxy`` or by the environment, bypassed by no_proxy, given
credentials, refusing; and bad settings as the administrator meets them (exit 78, nothing secret shown).
tests/test_proxy_policy.py has the pure rules.

The simulator serves TLS for a name only the proxy can resolve (:data:`NAME`): faxd cannot reach it in
any other way, so a daemon that works at all went through the proxy, and the proxy saw each tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import trustme
from connect_proxy import ConnectProxy, basic
from daemon_support import started
from ops_support import NotifySocket, daemon, run_faxd, status_of, write_config, ws_up
from prometheus_client import CollectorRegistry
from socket_client import SocketClient

from faxd import testbed
from faxd.adapters.metrics import Metrics
from faxd.adapters.rest import ApiError, RingCentral
from faxd.adapters.ws_session import WsSession, WsSettings
from faxd.config import Config
from faxd.core import proxy
from faxd.core.backoff import backoff
from faxd.core.proxy import Proxy, parse_proxy_url
from faxd.core.wsg import event_filters
from faxd.daemon import ssl_context
from faxd.sim import RecipientScript, SimConfig, Simulator

NAME = "rc.faxd.invalid"  # RFC 6761: never resolves; the test proxy sends it to 127.0.0.1
SECRET = "pr0xy-s3cret"
EXT = "200000001"

# ---------------------------------------------------------------------------------------------------
# Bad settings, as the administrator meets them.


async def faxd_output(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit code, stdout and stderr together) of ``python -m faxd ARGS``."""
    code, out, _ = await run_faxd(*args, env={**os.environ, **(env or {})}, merge_stderr=True, within=45)
    return code, out


def config_file(workdir: Path, **ringcentral: object) -> Path:
    """A config for RingCentral itself (nobody connects to it here), secrets in 0600 files."""
    return testbed.write_config(None, workdir, ringcentral=ringcentral, logging={"format": "json"})


async def test_a_password_in_the_config_file_exits_78_without_showing_it(short_dir: Path) -> None:
    config = config_file(short_dir, proxy=f"http://faxd:{SECRET}@proxy.example:3128")
    code, out = await faxd_output("check-config", "-c", str(config))
    assert code == 78
    assert "ringcentral.proxy: the proxy's password is a secret" in out
    assert SECRET not in out


async def test_an_unusable_proxy_variable_exits_78_naming_it_without_its_value(short_dir: Path) -> None:
    config = config_file(short_dir)
    code, out = await faxd_output("run", "-c", str(config), env={"HTTPS_PROXY": f"socks5://u:{SECRET}@h:1"})
    assert code == 78
    assert "environment variable HTTPS_PROXY: SOCKS proxies are not supported" in out
    assert SECRET not in out


# ---------------------------------------------------------------------------------------------------
# Through a real CONNECT proxy.


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def tls_sim(ca: trustme.CA, cert_for: str = NAME) -> AsyncIterator[Simulator]:
    """The simulator over TLS, announced as https://NAME:port (wss://NAME:port/ws for the WebSocket)."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(cert_for).configure_cert(server)
    async with Simulator(SimConfig(seed=7), ssl_context=server) as sim:
        sim.url = f"https://{NAME}:{sim.port}"  # what faxd is told; only the proxy knows where that is
        sim.store.base_url = sim.gateway.base_url = sim.url
        yield sim


@pytest.fixture
async def named_sim(ca: trustme.CA) -> AsyncIterator[Simulator]:
    async with tls_sim(ca) as sim:
        yield sim


@pytest.fixture
async def clinic_proxy() -> AsyncIterator[ConnectProxy]:
    async with ConnectProxy(hosts={NAME: "127.0.0.1"}) as p:
        yield p


@pytest.fixture
def ca_file(ca: trustme.CA, short_dir: Path) -> Path:
    path = short_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def fax_through(sim: Simulator, client: SocketClient, phone: str) -> None:
    fax_id = sim.create_outbound_fax(None, [RecipientScript(phone, "Sent", after=0.5)])
    event = await client.final(fax_id)
    assert event["to_status"] == "Sent"


def subscribed(sim: Simulator) -> int:
    return len([r for r in sim.requests_to("/restapi/v1.0/subscription", "POST") if r.status == 200])


def ws_connects(sim: Simulator) -> int:
    return len([r for r in sim.requests if r.path == "/ws"])


async def test_rest_and_websocket_go_through_the_configured_proxy(
    named_sim: Simulator, clinic_proxy: ConnectProxy, ca_file: Path, make_config: Callable[..., Config]
) -> None:
    sim, target = named_sim, f"{NAME}:{named_sim.port}"
    config = make_config(sim, ringcentral={"ca_file": str(ca_file), "proxy": clinic_proxy.url})
    async with asyncio.timeout(30), started(config) as faxd:
        client = await SocketClient.subscribed(faxd.socket)
        await sim.wait_for(lambda: subscribed(sim) >= 1)  # REST login and ws token, then the WSS subscribe
        await fax_through(sim, client, "+16505550100")
        tunnels = clinic_proxy.tunnels()
        assert len(tunnels) >= 2  # REST's connection and the WebSocket's
        assert {t.target for t in clinic_proxy.seen} == {target}
        assert all(t.authorization is None for t in tunnels)

        # The WebSocket rides a tunnel: cutting them drops it, and it comes back through a new one.
        before, connects = len(tunnels), ws_connects(sim)
        assert clinic_proxy.cut() >= 2
        await sim.wait_for(lambda: ws_connects(sim) > connects)
        assert len(clinic_proxy.tunnels()) > before
        await fax_through(sim, client, "+16505550101")
        await client.close()


async def test_the_environment_variables_alone_send_both_through_the_proxy(
    named_sim: Simulator,
    clinic_proxy: ConnectProxy,
    ca_file: Path,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", clinic_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,.example.org")  # nothing that matches NAME
    config = make_config(named_sim, ringcentral={"ca_file": str(ca_file)})
    assert config.ringcentral.proxy is None
    async with asyncio.timeout(30), started(config) as faxd:
        client = await SocketClient.subscribed(faxd.socket)
        await named_sim.wait_for(lambda: subscribed(named_sim) >= 1)
        await fax_through(named_sim, client, "+16505550100")
        await client.close()
    assert len(clinic_proxy.tunnels()) >= 2
    assert {t.target for t in clinic_proxy.seen} == {f"{NAME}:{named_sim.port}"}


async def test_no_proxy_goes_around_the_proxy(
    ca: trustme.CA, ca_file: Path, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    async with (
        Simulator(SimConfig(seed=7), ssl_context=server) as sim,
        ConnectProxy(refuse=403) as refusing,
    ):
        monkeypatch.setenv("https_proxy", refusing.url)
        monkeypatch.setenv("no_proxy", "platform.ringcentral.com, 127.0.0.0/8")
        config = make_config(sim, ringcentral={"ca_file": str(ca_file)})
        async with asyncio.timeout(30), started(config) as faxd:
            client = await SocketClient.subscribed(faxd.socket)
            await sim.wait_for(lambda: subscribed(sim) >= 1)
            await fax_through(sim, client, "+16505550100")
            await client.close()
        assert refusing.seen == []


def unreachable(message: str) -> bool:
    """A STATUS= saying that login failed (and why), or that faxd gave up."""
    status = status_of(message) or ""
    return "cannot reach RingCentral" in status or status.startswith("failed")


async def test_a_proxy_that_wants_credentials_gets_them_and_no_log_shows_them(
    named_sim: Simulator, ca_file: Path, short_dir: Path
) -> None:
    async with ConnectProxy(credentials=("faxd", SECRET), hosts={NAME: "127.0.0.1"}) as guarded:
        (short_dir / "proxy-url").write_text(guarded.url_with("faxd", SECRET))
        (short_dir / "proxy-url").chmod(0o600)
        config = write_config(
            short_dir,
            named_sim,
            ringcentral={"ca_file": ca_file.name, "proxy": {"file": "proxy-url"}},
            logging={"format": "json", "level": "debug"},
        )
        notify = NotifySocket(short_dir / "notify")
        try:
            async with asyncio.timeout(45), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
                message = await notify.wait_for(lambda m: ws_up(m) or unreachable(m))
                assert ws_up(message), status_of(message)
                assert await faxd.stop() == 0
        finally:
            notify.close()
        assert len(guarded.tunnels()) >= 2
        assert {t.authorization for t in guarded.seen} == {basic("faxd", SECRET)}
        code, shown = await faxd_output("check-config", "-c", str(config))
    assert code == 0
    assert "proxy:\n    file: " in shown
    encoded = basic("faxd", SECRET).removeprefix("Basic ")
    for text in ("\n".join(faxd.raw), shown):
        assert SECRET not in text
        assert encoded not in text


async def test_a_refusing_proxy_gives_a_clear_error_and_login_backs_off(
    named_sim: Simulator, ca_file: Path, short_dir: Path
) -> None:
    async with ConnectProxy(credentials=("faxd", "the-right-one"), hosts={NAME: "127.0.0.1"}) as guarded:
        (short_dir / "proxy-url").write_text(guarded.url_with("faxd", SECRET))
        (short_dir / "proxy-url").chmod(0o600)
        config = write_config(
            short_dir,
            named_sim,
            ringcentral={"ca_file": ca_file.name, "proxy": {"file": "proxy-url"}},
            logging={"format": "json", "level": "debug"},
        )
        notify = NotifySocket(short_dir / "notify")
        try:
            async with asyncio.timeout(45), daemon(config, env={"NOTIFY_SOCKET": str(notify.path)}) as faxd:
                status = status_of(await notify.wait_for(unreachable))
                assert str(status).endswith("; cannot reach RingCentral (proxy_407), retrying"), status
                await guarded.wait_for(lambda: len(guarded.seen) >= 3)
                assert await faxd.stop() == 0
        finally:
            notify.close()
    failures = [line for line in faxd.lines if line.get("event") == "auth.login_failed"]
    refusals = guarded.seen
    assert all(r.status == 407 and r.authorization == basic("faxd", SECRET) for r in refusals)
    assert {f["code"] for f in failures} == {"proxy_407"}
    # One CONNECT per login attempt, each after the delay the previous failure announced.
    assert len(failures) <= len(refusals) <= len(failures) + 1
    for refused, failure, following in zip(refusals, failures, refusals[1:], strict=False):
        assert following.at - refused.at >= failure["retry_in"] - 0.1
    refused_lines = [line for line in faxd.lines if line.get("event") == "api.proxy_refused"]
    assert refused_lines
    assert {line["proxy"] for line in refused_lines} == {guarded.url}
    assert not named_sim.requests, "nothing reached RingCentral"
    assert SECRET not in "\n".join(faxd.raw)


async def test_tls_to_ringcentral_is_still_verified_inside_the_tunnel(ca: trustme.CA) -> None:
    """A proxy that hands the tunnel to a server with another name's certificate gets nowhere."""
    async with (
        tls_sim(ca, cert_for="someone-else.example") as impostor,
        ConnectProxy(hosts={NAME: "127.0.0.1"}) as p,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_trusting(ca))) as http,
    ):
        rc = RingCentral(
            http,
            server=impostor.url,
            client_id=impostor.config.client_id,
            client_secret=impostor.config.client_secret,
            jwt=impostor.config.jwt,
            metrics=Metrics(CollectorRegistry()),
            proxy=Proxy("127.0.0.1", p.port),
        )
        with pytest.raises(ApiError) as info:
            await rc.login()
        assert info.value.code == "connection"
        assert [t.target for t in p.tunnels()] == [f"{NAME}:{impostor.port}"]
        assert not impostor.requests


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl_context(None)
    ca.configure_trust(ctx)
    return ctx


# ---------------------------------------------------------------------------------------------------
# The adapters on their own: plain http (forwarded by the proxy) and a WebSocket the proxy refuses.


@dataclass
class Adapters:
    rc: RingCentral
    states: list[str] = field(default_factory=list)
    up: asyncio.Event = field(default_factory=asyncio.Event)

    def on_state(self, text: str) -> None:
        self.states.append(text)
        if text.startswith("WebSocket up"):
            self.up.set()


@contextlib.asynccontextmanager
async def adapters(
    sim: Simulator,
    *,
    rest_proxy: Proxy | None,
    ws_policy: proxy.ProxyPolicy,
    delays: Callable[[], Iterator[float]] = lambda: backoff(1.0, 2.0, 8.0, "none"),
) -> AsyncIterator[Adapters]:
    """RingCentral (logged in) and a running WsSession against ``sim``, each with its own proxy."""
    metrics = Metrics(CollectorRegistry())
    async with aiohttp.ClientSession() as http:
        rc = RingCentral(
            http,
            server=sim.url,
            client_id=sim.config.client_id,
            client_secret=sim.config.client_secret,
            jwt=sim.config.jwt,
            metrics=metrics,
            rate_share=1.0,
            proxy=rest_proxy,
        )
        await rc.login()
        out = Adapters(rc)
        ws = WsSession(
            rc,
            filters=event_filters([EXT]),
            settings=WsSettings(),
            metrics=metrics,
            on_hint=lambda _: None,
            on_resync=lambda: None,
            on_state=out.on_state,
            delays=delays,
            proxies=ws_policy,
        )
        task = asyncio.create_task(ws.run())
        try:
            yield out
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await rc.aclose()


async def test_plain_http_is_forwarded_with_credentials_and_the_websocket_tunnelled(sim: Simulator) -> None:
    """Plain http:// (the simulator on loopback): the proxy forwards REST requests itself, so the
    credentials go on each request; ws:// still goes through a CONNECT tunnel."""
    async with ConnectProxy(credentials=("faxd", SECRET)) as guarded:
        p = parse_proxy_url(guarded.url_with("faxd", SECRET))
        policy = proxy.policy(p, {}, use_environment=False)
        async with asyncio.timeout(30), adapters(sim, rest_proxy=p, ws_policy=policy) as both:
            await both.rc.message_sync(EXT, None)
            await both.up.wait()
        target = f"127.0.0.1:{sim.port}"
        forwarded = [s for s in guarded.seen if s.method != "CONNECT"]
        assert forwarded
        assert forwarded[0].path == "/restapi/oauth/token"
        assert {(s.target, s.status) for s in forwarded} == {(target, 200)}
        (tunnel,) = [s for s in guarded.seen if s.method == "CONNECT"]
        assert (tunnel.target, tunnel.path, tunnel.status) == (target, "/ws", 200)
        assert {s.authorization for s in guarded.seen} == {basic("faxd", SECRET)}


async def test_a_refused_websocket_tunnel_is_retried_with_backoff_not_at_once(sim: Simulator) -> None:
    drawn: list[float] = []

    def delays() -> Iterator[float]:
        for delay in backoff(0.2, 2.0, 1.0, "none"):
            drawn.append(delay)
            yield delay

    async with ConnectProxy(refuse=403) as refusing:
        policy = proxy.policy(Proxy("127.0.0.1", refusing.port), {}, use_environment=False)
        direct_rest = adapters(sim, rest_proxy=None, ws_policy=policy, delays=delays)
        async with asyncio.timeout(30), direct_rest as both:
            await refusing.wait_for(lambda: len(refusing.seen) >= 3)
        seen = refusing.seen
    assert all(s.status == 403 and s.method == "CONNECT" for s in seen)
    assert any(s.startswith("WebSocket disconnected: proxy 403; reconnecting in") for s in both.states)
    # Every refusal drew the next delay, and the next CONNECT waited for it.
    assert len(drawn) >= len(seen) - 1
    for before, after, delay in zip(seen, seen[1:], drawn, strict=False):
        assert after.at - before.at >= delay - 0.05


async def test_a_407_from_a_forwarding_proxy_is_the_proxys_refusal_not_ringcentrals(sim: Simulator) -> None:
    """Over plain http the proxy's 407 comes back as an ordinary response: it must not read as RingCentral
    rejecting the app's credentials (which would stop faxd for good)."""
    async with (
        ConnectProxy(credentials=("faxd", SECRET)) as guarded,
        aiohttp.ClientSession() as http,
    ):
        rc = RingCentral(
            http,
            server=sim.url,
            client_id=sim.config.client_id,
            client_secret=sim.config.client_secret,
            jwt=sim.config.jwt,
            metrics=Metrics(CollectorRegistry()),
            proxy=Proxy("127.0.0.1", guarded.port),
        )
        with pytest.raises(ApiError) as info:
            await rc.login()
    assert type(info.value) is ApiError
    assert (info.value.status, info.value.code) == (0, "proxy_407")
    assert [s.status for s in guarded.seen] == [407]
    assert not sim.requests
