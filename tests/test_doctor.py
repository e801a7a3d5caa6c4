"""``faxd doctor`` against the simulator: every check in its passing and its failing mode, what it spends,
and what it must never do (send a fax, write the store, keep its token). The simulator's faults stand in
for the field: a wrong JWT, a token without a permission, a skewed ``Date``, an unknown extension, a
message store answering 403, a subscription refused or with ``disabledFilters``, an untrusted
certificate, a server that does not answer. The last tests run ``python -m faxd doctor`` as a user
would and read its exit status and JSON.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from connect_proxy import ConnectProxy
from ops_support import run_faxd

from faxd import testbed
from faxd.doctor import EX_CONFIG, EX_FAILED, EX_OK, Report, check_names, clock_skew, run_checks
from faxd.sim import SimConfig, Simulator

REPO = Path(__file__).resolve().parent.parent
OWNER, OTHER = "200000001", "200000002"
TIMEOUT = 60


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=11, extensions=(OWNER, OTHER))


def write_config(workdir: Path, sim: Simulator | None, **ringcentral: Any) -> str:
    """A config file for ``sim`` (None: a server nobody answers on) with these ``ringcentral`` keys;
    returns its path."""
    nobody = {"server": "http://127.0.0.1:9"} if sim is None else {}
    return str(testbed.write_config(sim, workdir, ringcentral={**nobody, **ringcentral}, metrics=None))


async def doctor(config: str) -> Report:
    async with asyncio.timeout(TIMEOUT):
        return await run_checks(config, environ={})


def statuses(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def check(report: Report, name: str) -> Any:
    [found] = [c for c in report.checks if c.name == name]
    return found


def skipped_after(report: Report, name: str) -> list[str]:
    names = [c.name for c in report.checks]
    return [c.name for c in report.checks[names.index(name) + 1 :] if c.status != "skip"]


def sim_groups(sim: Simulator) -> Counter[str]:
    """What the simulator saw, by throttling group (GET /restapi: none, the spec's NoThrottling)."""
    return Counter(r.group or "NoThrottling" for r in sim.requests if r.path != "/ws")


# ------------------------------------------------------------------------------------------ all well


async def test_all_checks_pass_and_nothing_is_written(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim, extensions=["~", OTHER])
    report = await doctor(config)

    expected = check_names(None)
    assert [c.name for c in report.checks] == [
        *expected[: expected.index("extension:*")],
        "extension:~", "message-store:~", f"extension:{OTHER}", f"message-store:{OTHER}",
        "subscription", "rate-limits",
    ]  # fmt: skip
    # Plain HTTP is the simulator's: a warning, not a failure.
    assert statuses(report) == {c.name: "pass" for c in report.checks} | {"connection": "warn"}
    assert report.exit_code == EX_OK
    assert all(c.fix is None for c in report.checks if c.status == "pass")
    assert f"extension ~ ({OWNER})" in check(report, "extension:~").detail
    assert "4 event filters (2 extensions)" in check(report, "subscription").detail
    assert "Auth 3 of 5" in check(report, "rate-limits").detail  # after the token and the ws token

    # Few requests, counted as the server saw them: Auth = token + ws token + revoke, Light = two per
    # extension, Medium = the subscription's create and delete (over the WebSocket), and the probe.
    assert dict(report.requests) == {"Auth": 3, "Light": 4, "Medium": 2, "NoThrottling": 1}
    assert sim_groups(sim) == report.requests
    # Read-only: no fax sent, nothing in the store changed, the subscription is gone again.
    writes = [
        (r.method, r.path)
        for r in sim.requests
        if r.method not in ("GET", "Heartbeat") and "/oauth/" not in r.path and "/subscription" not in r.path
    ]
    assert writes == []
    assert sim.messages() == []
    assert sim.gateway.subscribed_sessions() == []
    # The token is revoked at the end.
    assert sim.requests[-1].path == "/restapi/oauth/revoke"
    assert sim.tokens.sessions
    assert all(s.revoked for s in sim.tokens.sessions.values())


async def test_the_report_names_no_secret(sim: Simulator, short_dir: Path) -> None:
    report = await doctor(write_config(short_dir, sim))
    text = report.render() + json.dumps(report.as_json())
    for secret in (sim.config.jwt, sim.config.client_secret):
        assert secret not in text


async def test_the_newest_fax_is_shown_without_phone_numbers(sim: Simulator, short_dir: Path) -> None:
    fax_id = sim.create_inbound_fax(None, "+14155550123")
    report = await doctor(write_config(short_dir, sim))
    detail = check(report, "message-store:~").detail
    assert f"newest fax {fax_id}: Inbound Received" in detail
    assert "4155550123" not in report.render()


# ------------------------------------------------------------------------------------ config, secrets


async def test_an_invalid_config_exits_78_and_contacts_nobody(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim, extensions=["101x"], colour="blue")
    report = await doctor(config)
    assert check(report, "config").status == "fail"
    assert "ringcentral.extensions" in check(report, "config").detail
    assert "ringcentral.colour: unknown key" in check(report, "config").detail
    assert "faxd check-config" in check(report, "config").fix
    assert all(c.status == "skip" for c in report.checks[1:])
    assert report.exit_code == EX_CONFIG == 78
    assert sim.requests == []


async def test_a_missing_config_file_says_where_doctor_looked(short_dir: Path) -> None:
    report = await doctor(str(short_dir / "nope.yaml"))
    config = check(report, "config")
    assert config.status == "fail"
    assert "nope.yaml: cannot read the config file" in config.detail
    assert "$FAXD_CONFIG" in config.fix
    assert report.exit_code == EX_CONFIG


async def test_a_secret_readable_by_others_fails_the_secrets_check(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim)
    (short_dir / "jwt").chmod(0o644)
    report = await doctor(config)
    assert statuses(report)["config"] == "pass"
    secrets = check(report, "secrets")
    assert secrets.status == "fail"
    assert "ringcentral.jwt" in secrets.detail
    assert "mode 0644" in secrets.detail
    assert "chmod 600" in secrets.fix
    assert skipped_after(report, "secrets") == []
    assert report.exit_code == EX_CONFIG
    assert sim.requests == []


async def test_a_secret_from_the_environment_is_a_warning(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim, jwt={"env": "FAXD_TEST_JWT"})
    async with asyncio.timeout(TIMEOUT):
        report = await run_checks(config, environ={"FAXD_TEST_JWT": sim.config.jwt})
    secrets = check(report, "secrets")
    assert (secrets.status, report.exit_code) == ("warn", EX_OK)
    assert "environment variable FAXD_TEST_JWT" in secrets.detail
    assert "client_secret: file" in secrets.detail
    assert "mode 0600" in secrets.detail


# ----------------------------------------------------------------------------------------- connection


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_server_fails_the_connection(short_dir: Path) -> None:
    server = f"http://127.0.0.1:{closed_port()}"
    report = await doctor(write_config(short_dir, None, server=server))
    connection = check(report, "connection")
    assert connection.status == "fail"
    assert "cannot connect to 127.0.0.1" in connection.detail
    assert "ringcentral.server" in connection.fix
    assert "firewall" in connection.fix
    assert skipped_after(report, "connection") == []
    assert report.exit_code == EX_FAILED
    assert report.requests == {}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https_sim(ca: trustme.CA, sim_config: SimConfig) -> AsyncIterator[Simulator]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    async with Simulator(sim_config, ssl_context=server) as simulator:
        yield simulator


async def test_tls_with_the_right_ca_passes_everything(
    https_sim: Simulator, ca: trustme.CA, short_dir: Path
) -> None:
    ca.cert_pem.write_to_path(str(short_dir / "ca.pem"))
    report = await doctor(write_config(short_dir, https_sim, ca_file="ca.pem"))
    assert set(statuses(report).values()) == {"pass"}, report.render()
    assert "certificate verified" in check(report, "connection").detail
    assert https_sim.requests_to("/ws"), "the test subscription went over WSS"


async def test_an_untrusted_certificate_fails_the_connection(https_sim: Simulator, short_dir: Path) -> None:
    trustme.CA().cert_pem.write_to_path(str(short_dir / "other-ca.pem"))
    report = await doctor(write_config(short_dir, https_sim, ca_file="other-ca.pem"))
    connection = check(report, "connection")
    assert connection.status == "fail"
    assert "not trusted" in connection.detail
    assert "ringcentral.ca_file" in connection.fix
    assert skipped_after(report, "connection") == []
    assert https_sim.requests == [], "nothing reaches a server that failed verification"


async def test_a_ca_file_that_is_no_pem_bundle_fails_the_connection(sim: Simulator, short_dir: Path) -> None:
    (short_dir / "ca.pem").write_text("not a certificate\n")
    report = await doctor(write_config(short_dir, sim, ca_file="ca.pem"))
    connection = check(report, "connection")
    assert connection.status == "fail"
    assert "cannot be used" in connection.detail
    assert "PEM bundle" in connection.fix
    assert skipped_after(report, "connection") == []
    assert sim.requests == []


# ---------------------------------------------------------------------------------------------- clock


def test_clock_skew_reports_only_what_the_measurement_proves() -> None:
    # Date has whole seconds and the answer took 0.2 s: within that, no skew is claimed.
    assert clock_skew(1000.0, 1000.3, 1000.5) == 0.0
    assert clock_skew(1000.0, 999.0, 999.4) == pytest.approx(0.6)  # server ahead: local clock behind
    assert clock_skew(1000.0, 1010.0, 1010.2) == pytest.approx(-9.0)  # local clock ahead


@pytest.mark.parametrize(
    ("skew", "status", "words"), [(600, "fail", "s behind"), (-20, "warn", "s ahead of")]
)
async def test_a_skewed_date_header(
    sim: Simulator, short_dir: Path, skew: float, status: str, words: str
) -> None:
    sim.skew_date(skew)
    report = await doctor(write_config(short_dir, sim))
    clock = check(report, "clock")
    assert clock.status == status, clock
    assert words in clock.detail
    assert "NTP" in clock.fix
    assert report.exit_code == (EX_FAILED if status == "fail" else EX_OK)


# -------------------------------------------------------------------------------- credentials, scope


async def test_a_wrong_jwt_fails_the_credentials(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim)
    (short_dir / "jwt").write_text("not-the-jwt")
    report = await doctor(config)
    credentials = check(report, "credentials")
    assert credentials.status == "fail"
    assert "OAU-140" in credentials.detail
    assert "{file: " in credentials.fix
    assert "JWT" in credentials.fix
    assert "not-the-jwt" not in report.render()
    names = [c.name for c in report.checks]
    after = names[names.index("scope") : names.index("rate-limits")]
    assert {statuses(report)[n] for n in after} == {"skip"}
    assert report.exit_code == EX_FAILED
    assert dict(report.requests) == {"Auth": 1, "NoThrottling": 1}, "no revoke without a token"


async def test_a_wrong_client_secret_names_the_client_credentials(sim: Simulator, short_dir: Path) -> None:
    config = write_config(short_dir, sim)
    (short_dir / "client_secret").write_text("wrong")
    report = await doctor(config)
    credentials = check(report, "credentials")
    assert credentials.status == "fail"
    assert "client secret is wrong" in credentials.fix


async def test_a_token_without_a_needed_permission_fails_the_scope(sim: Simulator, short_dir: Path) -> None:
    sim.set_token_scope("ReadMessages Faxes SubscriptionWebSocket ReadAccounts")
    report = await doctor(write_config(short_dir, sim))
    scope = check(report, "scope")
    assert scope.status == "fail"
    assert "WebSocket (POST /restapi/oauth/wstoken" in scope.detail
    assert "ReadMessages" not in scope.detail
    assert "Faxes" not in scope.detail
    assert "developer console" in scope.fix
    assert report.exit_code == EX_FAILED


async def test_included_permissions_count_and_a_missing_subscription_permission_warns(
    sim: Simulator, short_dir: Path
) -> None:
    sim.set_token_scope("Faxes WebSocket")  # Faxes includes ReadMessages
    report = await doctor(write_config(short_dir, sim))
    scope = check(report, "scope")
    assert scope.status == "warn", scope
    assert "SubscriptionWebSocket is not listed" in scope.detail
    assert "SUB-528" in scope.fix
    assert report.exit_code == EX_OK


# ----------------------------------------------------------------------------- extensions, the store


async def test_an_unknown_extension_fails_and_its_store_is_skipped(sim: Simulator, short_dir: Path) -> None:
    report = await doctor(write_config(short_dir, sim, extensions=["~", "101"]))
    unknown = check(report, "extension:101")
    assert unknown.status == "fail"
    assert "does not exist" in unknown.detail
    assert "CMN-102" in unknown.detail
    assert "not short extension numbers" in unknown.fix
    assert check(report, "message-store:101").status == "skip"
    # The subscription is tried for the extensions that are there.
    assert check(report, "subscription").status == "pass"
    assert "2 event filters (1 extension)" in check(report, "subscription").detail
    assert report.exit_code == EX_FAILED


async def test_a_message_store_that_answers_403(sim: Simulator, short_dir: Path) -> None:
    sim.deny_message_reads([OTHER])
    report = await doctor(write_config(short_dir, sim, extensions=["~", OTHER]))
    assert check(report, "message-store:~").status == "pass"
    denied = check(report, f"message-store:{OTHER}")
    assert denied.status == "fail"
    assert "CMN-408" in denied.detail
    assert "administrator" in denied.fix
    assert check(report, f"extension:{OTHER}").status == "pass"
    assert "1 extension" in check(report, "subscription").detail
    assert report.exit_code == EX_FAILED


async def test_no_readable_store_skips_the_subscription(sim: Simulator, short_dir: Path) -> None:
    sim.deny_message_reads(["~"])
    report = await doctor(write_config(short_dir, sim))
    assert check(report, "message-store:~").status == "fail"
    assert check(report, "subscription").status == "skip"
    assert not sim.requests_to("/ws")
    assert report.requests["Auth"] == 2, "token and revoke, no ws token"


# ------------------------------------------------------------------------------------- subscription


@pytest.mark.parametrize(("code", "fix"), [("SUB-405", "admin rights"), ("SUB-528", "SubscriptionWebSocket")])
async def test_a_refused_subscription(sim: Simulator, short_dir: Path, code: str, fix: str) -> None:
    if code == "SUB-405":
        sim.refuse_subscriptions("forbidden", [sim.config.extensions[0]])
    else:
        sim.refuse_subscriptions("permission")
    report = await doctor(write_config(short_dir, sim))
    subscription = check(report, "subscription")
    assert subscription.status == "fail"
    assert f"403 {code}" in subscription.detail
    assert fix in subscription.fix
    assert report.exit_code == EX_FAILED
    assert report.requests["Medium"] == 1, "nothing to delete"


async def test_disabled_filters_fail_the_subscription_which_is_deleted(
    sim: Simulator, short_dir: Path
) -> None:
    sim.refuse_subscriptions("disabled", [OTHER])
    report = await doctor(write_config(short_dir, sim, extensions=["~", OTHER]))
    subscription = check(report, "subscription")
    assert subscription.status == "fail"
    assert "2 of 4 filters are disabled" in subscription.detail
    assert f"/extension/{OTHER}/message-store?type=Fax" in subscription.detail
    assert f"/extension/{OWNER}/" not in subscription.detail
    assert "admin rights" in subscription.fix
    assert [r.method for r in sim.requests if "/subscription" in r.path] == ["POST", "DELETE"]
    assert sim.gateway.subscribed_sessions() == []


# ------------------------------------------------------------------------------------- rate limits


async def spend_light(sim: Simulator, count: int) -> None:
    """Another client of the same app and user spends ``count`` Light requests."""
    async with aiohttp.ClientSession() as http:
        basic = base64.b64encode(f"{sim.config.client_id}:{sim.config.client_secret}".encode()).decode()
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": sim.config.jwt}
        url = f"{sim.url}/restapi/oauth/token"
        async with http.post(url, data=form, headers={"Authorization": f"Basic {basic}"}) as r:
            token = (await r.json())["access_token"]
        for _ in range(count):
            url = f"{sim.url}/restapi/v1.0/account/~/extension/~/message-store"
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
    sim.requests.clear()


def light_limited(limit: int) -> SimConfig:
    limits = SimConfig().rate_limits | {"Light": (limit, 60, 60)}
    return SimConfig(seed=11, extensions=(OWNER, OTHER), rate_limits=limits)


@pytest.mark.parametrize("sim_config", [light_limited(10)])
async def test_little_headroom_warns(sim: Simulator, short_dir: Path) -> None:
    await spend_light(sim, 7)
    report = await doctor(write_config(short_dir, sim))
    limits = check(report, "rate-limits")
    assert limits.status == "warn", limits
    assert "Light 1 of 10 per 60 s left" in limits.detail
    assert "Light" in limits.fix
    assert report.exit_code == EX_OK


@pytest.mark.parametrize("sim_config", [light_limited(10)])
async def test_no_headroom_fails(sim: Simulator, short_dir: Path) -> None:
    await spend_light(sim, 8)
    report = await doctor(write_config(short_dir, sim))
    limits = check(report, "rate-limits")
    assert limits.status == "fail", limits
    assert "Light 0 of 10" in limits.detail
    assert "no room left" in limits.fix
    assert report.exit_code == EX_FAILED


async def test_a_429_fails_the_rate_limits(sim: Simulator, short_dir: Path) -> None:
    sim.rate_limit_storm("Light", 120)
    report = await doctor(write_config(short_dir, sim))
    assert check(report, "extension:~").status == "fail"
    limits = check(report, "rate-limits")
    assert limits.status == "fail"
    assert "Light over its limit (429)" in limits.detail
    assert report.requests["Light"] == 1, "doctor does not retry"


# ------------------------------------------------------------------------------ the command itself


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXD_", "PYTHON"))}
    env["PYTHONPATH"] = str(REPO)
    return env


async def faxd(*args: str) -> tuple[int, str, str]:
    return await run_faxd(*args, env=_env(), within=TIMEOUT)


async def test_the_command_prints_json_and_exits_0(sim: Simulator, short_dir: Path) -> None:
    code, out, err = await faxd("doctor", "-c", write_config(short_dir, sim), "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert set(report) >= {"checks", "requests", "exit_code", "ok"}
    assert report["ok"] is True
    assert report["exit_code"] == 0
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in report["checks"])
    assert {c["name"]: c["status"] for c in report["checks"]}["subscription"] == "pass"
    assert report["requests"] == {"Auth": 3, "Light": 2, "Medium": 2, "NoThrottling": 1}
    assert sim_groups(sim) == report["requests"]


async def test_the_command_exits_1_on_a_failed_check_and_says_how_to_fix_it(
    sim: Simulator, short_dir: Path
) -> None:
    config = write_config(short_dir, sim)
    (short_dir / "jwt").write_text("wrong")
    code, out, err = await faxd("doctor", "-c", config)
    assert (code, err) == (1, "")
    lines = out.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith("FAIL  credentials")]
    assert failed, out
    assert lines[failed[0] + 1].lstrip().startswith("fix: ")
    assert lines[-1] == "1 failed, 1 with a warning; exit status 1"
    code, out, _ = await faxd("doctor", "-c", config, "--json")
    assert code == 1
    assert json.loads(out)["exit_code"] == 1


async def test_the_command_exits_78_on_an_invalid_config(short_dir: Path) -> None:
    config = write_config(short_dir, None, extensions="all")
    code, out, err = await faxd("doctor", "-c", config, "--json")
    assert (code, err) == (78, "")
    report = json.loads(out)
    assert report["checks"][0]["name"] == "config"
    assert report["checks"][0]["status"] == "fail"
    assert report["requests"] == {}


# ------------------------------------------------------------------------------------------ proxy


async def test_every_check_goes_through_the_configured_proxy(sim: Simulator, short_dir: Path) -> None:
    """REST and the test subscription's WebSocket both ride the proxy the daemon would use."""
    async with ConnectProxy() as proxy:
        report = await doctor(write_config(short_dir, sim, proxy=proxy.url))
        # Plain HTTP is a warning of its own (only the simulator speaks it); all else passes.
        assert {s for n, s in statuses(report).items() if n != "connection"} == {"pass"}, report.render()
        assert check(report, "connection").status == "warn"
        # A plain-http loopback server: REST requests are forwarded, the WebSocket is tunnelled.
        assert proxy.seen, "doctor bypassed the proxy"
        assert any(t.method == "CONNECT" for t in proxy.seen), "the WebSocket bypassed the proxy"


async def test_an_unusable_proxy_variable_fails_the_connection(sim: Simulator, short_dir: Path) -> None:
    path = write_config(short_dir, sim)
    async with asyncio.timeout(TIMEOUT):
        report = await run_checks(path, environ={"HTTP_PROXY": "socks5://h:1"})
    assert check(report, "connection").status == "fail"
    assert "HTTP_PROXY" in check(report, "connection").detail
    assert not sim.requests, "doctor contacted the server despite the unusable proxy"
