"""Which proxy faxd uses for a URL (faxd.core.proxy: config key, environment, no_proxy, as curl reads them)
and how ``ringcentral.proxy`` is validated and shown: pure, no sockets (tests/test_proxy.py has those)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from connect_proxy import basic

from faxd.config import ConfigError, ProxySetting, parse_config, render_effective
from faxd.core import proxy
from faxd.core.proxy import Proxy, ProxyError, parse_proxy_url
from faxd.daemon import proxy_policy

SECRET = "pr0xy-s3cret"

# ---------------------------------------------------------------------------------------------------
# Which proxy for which URL.


def test_a_proxy_url_is_read_like_curl_reads_it() -> None:
    assert parse_proxy_url("http://proxy.example:3128") == Proxy("proxy.example", 3128)
    assert parse_proxy_url("  proxy.example:3128 ") == Proxy("proxy.example", 3128)  # no scheme: http
    assert parse_proxy_url("http://PROXY.example/") == Proxy("proxy.example", 80)
    assert parse_proxy_url("http://[::1]:3128").url == "http://[::1]:3128"
    p = parse_proxy_url("http://clinic%5Cfaxd:p%40ss:word@proxy.example:3128")
    assert (p.username, p.password) == ("clinic\\faxd", "p@ss:word")
    assert p.authorization() == basic("clinic\\faxd", "p@ss:word")
    assert parse_proxy_url("http://faxd@proxy:1").password == ""  # a user without a password


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("socks5://u:topsecret@proxy:1080", "SOCKS proxies are not supported"),
        ("https://u:topsecret@proxy:3128", "https:// proxies (TLS to the proxy itself) are not supported"),
        ("ftp://u:topsecret@proxy:21", "must start with http://"),
        ("http://u:topsecret@proxy:99999", "port must be a number from 1 to 65535"),
        ("http://u:topsecret@proxy:0", "port must be a number from 1 to 65535"),
        ("http://u:topsecret@proxy:3128/path", "no path, query or fragment"),
        ("http://u:topsecret@:3128", "no host name"),
        ("http://u:topsecret@[::1:3128", "malformed"),
        ("", "empty"),
    ],
)
def test_an_unusable_proxy_url_gets_a_reason_that_quotes_nothing_of_it(text: str, reason: str) -> None:
    with pytest.raises(ProxyError) as info:
        parse_proxy_url(text)
    assert reason in str(info.value)
    assert "topsecret" not in str(info.value)


def test_credentials_stay_out_of_repr_url_and_str() -> None:
    p = parse_proxy_url(f"http://faxd:{SECRET}@proxy.example:3128")
    for text in (repr(p), str(p), p.url, p.display, repr(ProxySetting(p))):
        assert SECRET not in text
    assert p.display == "http://faxd@proxy.example:3128"
    assert SECRET in p.url_with_credentials()  # only what websockets needs, never logged


def test_the_environment_is_read_as_curl_reads_it() -> None:
    env = {
        "https_proxy": "http://lower:1",
        "HTTPS_PROXY": "http://upper:2",
        "HTTP_PROXY": "http://plain:3",
        "ALL_PROXY": "http://all:4",
    }
    p = proxy.policy(None, env, use_environment=True)
    assert p.proxy_for("https://platform.ringcentral.com") == Proxy("lower", 1)  # lower case first
    assert p.proxy_for("wss://ws-api.ringcentral.com/ws") == Proxy("lower", 1)
    assert p.proxy_for("http://127.0.0.1:8080") == Proxy("plain", 3)
    assert p.proxy_for("ws://127.0.0.1:8080/ws") == Proxy("plain", 3)
    assert p.origin == "https_proxy"
    # HTTP_PROXY is for http:// only; ALL_PROXY fills in; an empty value counts as unset.
    only_http = proxy.policy(None, {"HTTP_PROXY": "http://plain:3", "https_proxy": " "}, use_environment=True)
    assert only_http.proxy_for("https://platform.ringcentral.com") is None
    fallback = proxy.policy(None, {"ALL_PROXY": "http://all:4"}, use_environment=True)
    assert fallback.proxy_for("https://platform.ringcentral.com") == Proxy("all", 4)
    assert proxy.policy(None, {}, use_environment=True) == proxy.DIRECT
    # proxy: none ignores the environment; a configured proxy wins over it.
    assert proxy.policy(None, env, use_environment=False).proxy_for("https://x.example") is None
    configured = proxy.policy(Proxy("cfg", 5), env, use_environment=False)
    assert configured.proxy_for("https://x.example") == Proxy("cfg", 5)
    assert configured.proxy_for("http://x.example") == Proxy("cfg", 5)


@pytest.mark.parametrize(
    ("no_proxy", "url", "bypassed"),
    [
        ("*", "https://platform.ringcentral.com", True),
        ("ringcentral.com", "https://platform.ringcentral.com", True),
        ("ringcentral.com", "https://ringcentral.com", True),
        (".ringcentral.com", "https://platform.ringcentral.com", True),
        ("*.ringcentral.com", "wss://ws-api.ringcentral.com/ws", True),
        ("RingCentral.COM.", "https://platform.ringcentral.com", True),
        ("central.com", "https://platform.ringcentral.com", False),
        ("ringcentral.com.org", "https://ringcentral.com", False),
        ("localhost, 10.0.0.0/8 ,example.org", "https://10.1.2.3:8443", True),
        ("10.0.0.0/8", "https://11.1.2.3", False),
        ("10.0.0.0/8", "https://ten.example", False),  # names are not resolved to match addresses
        ("::1", "https://[::1]:8443", True),
        ("[::1]:8443", "https://[::1]:8443", True),
        ("[::1]:8443", "https://[::1]:9443", False),
        ("platform.ringcentral.com:443", "https://platform.ringcentral.com", True),
        ("platform.ringcentral.com:8443", "https://platform.ringcentral.com", False),
        ("", "https://platform.ringcentral.com", False),
        ("127.0.0.1", "https://platform.ringcentral.com", False),
    ],
)
def test_no_proxy_entries(no_proxy: str, url: str, bypassed: bool) -> None:
    for variable in ("no_proxy", "NO_PROXY"):
        env = {"HTTPS_PROXY": "http://proxy:3128", variable: no_proxy}
        from_env = proxy.policy(None, env, use_environment=True)
        assert (from_env.proxy_for(url) is None) == bypassed, variable
        configured = proxy.policy(Proxy("cfg", 1), env, use_environment=False)  # as curl's --proxy
        assert (configured.proxy_for(url) is None) == bypassed, variable


def test_an_unusable_environment_proxy_fails_only_the_urls_that_would_use_it() -> None:
    env = {"HTTPS_PROXY": "http://proxy:3128", "http_proxy": "socks5://u:topsecret@h:1"}
    p = proxy.policy(None, env, use_environment=True)
    assert p.proxy_for("https://platform.ringcentral.com") == Proxy("proxy", 3128)
    with pytest.raises(ProxyError) as info:
        p.proxy_for("http://127.0.0.1:1")
    assert str(info.value).startswith("environment variable http_proxy: SOCKS")
    assert "topsecret" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# ringcentral.proxy in the config file.

ENV = {
    "RC_SECRET": "client-secret-value",
    "RC_JWT": "jwt-value",
    "FAXD_PROXY": f"http://faxd:{SECRET}@p:3128",
}


def config_with(value: object, base_dir: Path | None = None) -> dict[str, Any]:
    rc: dict[str, Any] = {"client_id": "app", "client_secret": {"env": "RC_SECRET"}, "jwt": {"env": "RC_JWT"}}
    if value is not _UNSET:
        rc["proxy"] = value
    return {"ringcentral": rc}


_UNSET = object()


def proxy_of(value: object, tmp_path: Path) -> ProxySetting | None:
    setting = parse_config(config_with(value), environ=ENV, base_dir=tmp_path).ringcentral.proxy
    assert setting is None or isinstance(setting, ProxySetting)
    return setting


def test_proxy_setting_forms(tmp_path: Path) -> None:
    assert proxy_of(_UNSET, tmp_path) is None  # the environment's
    assert proxy_of(None, tmp_path) is None
    for off in ("none", "NONE", "", False):
        assert proxy_of(off, tmp_path) == ProxySetting(None), off
    assert proxy_of("proxy.example:3128", tmp_path) == ProxySetting(Proxy("proxy.example", 3128))
    assert proxy_of("http://faxd@proxy:3128", tmp_path) == ProxySetting(Proxy("proxy", 3128, "faxd", ""))
    from_env = proxy_of({"env": "FAXD_PROXY"}, tmp_path)
    assert from_env == ProxySetting(Proxy("p", 3128, "faxd", SECRET), ("env", "FAXD_PROXY"))
    url_file = tmp_path / "proxy-url"
    url_file.write_text(f"http://faxd:{SECRET}@p:3128\n")
    url_file.chmod(0o600)
    from_file = proxy_of({"file": "proxy-url"}, tmp_path)
    assert from_file == ProxySetting(Proxy("p", 3128, "faxd", SECRET), ("file", str(url_file)))


@pytest.mark.parametrize(
    ("value", "environ", "reason"),
    [
        (f"http://faxd:{SECRET}@proxy:3128", ENV, "the proxy's password is a secret"),
        ("socks5://proxy:1080", ENV, "SOCKS proxies are not supported"),
        (True, ENV, 'expected http://HOST:PORT, "none", or a URL with a password as'),
        (3128, ENV, "got 3128"),
        (
            {"env": "BAD_PROXY"},
            {**ENV, "BAD_PROXY": f"socks5://u:{SECRET}@h:1"},
            "the URL from {env: BAD_PROXY}: SOCKS proxies are not supported",
        ),
        ({"env": "UNSET"}, ENV, "environment variable UNSET is not set"),
        ({"url": "http://p:1"}, ENV, "expected exactly one of"),
    ],
)
def test_a_bad_proxy_setting_names_key_and_reason_never_the_password(
    value: object, environ: dict[str, str], reason: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config_with(value), environ=environ, base_dir=tmp_path)
    (problem,) = info.value.problems
    assert problem.startswith("ringcentral.proxy: "), problem
    assert reason in problem
    assert SECRET not in problem


def test_check_config_shows_where_the_proxy_comes_from_never_its_password(tmp_path: Path) -> None:
    for value, shown in (
        ({"env": "FAXD_PROXY"}, {"env": "FAXD_PROXY"}),
        ("http://faxd@proxy:3128", "http://faxd@proxy:3128"),
        ("none", "none"),
        (None, None),
    ):
        config = parse_config(config_with(value), environ=ENV, base_dir=tmp_path)
        text = render_effective(config)
        assert SECRET not in text
        rendered = yaml.safe_load(text)
        assert rendered["ringcentral"]["proxy"] == shown
        assert parse_config(rendered, environ=ENV, base_dir=tmp_path) == config  # it reads back


def test_the_daemon_reads_the_setting_then_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://env:1"}
    assert proxy_policy(None, env).proxy_for("https://x.example") == Proxy("env", 1)
    assert proxy_policy(ProxySetting(None), env).proxy_for("https://x.example") is None
    assert proxy_policy(ProxySetting(Proxy("cfg", 2)), env).proxy_for("https://x.example") == Proxy("cfg", 2)
