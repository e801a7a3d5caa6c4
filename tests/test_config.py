"""faxd.config: every kind of bad input names its key and reason; secrets never leak."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from faxd import credentials
from faxd.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_EVENT_SOCKET,
    Config,
    ConfigError,
    EventsConfig,
    RingCentralConfig,
    Secret,
    StoreConfig,
    default_config_path,
    deferred_credentials,
    load_config,
    load_section,
    parse_config,
    parse_duration,
    render_effective,
)

REPO = Path(__file__).resolve().parent.parent
ENV = {"RC_SECRET": "client-secret-value", "RC_JWT": "eyJhbGciOi.jwt-value.sig"}
MINIMAL: dict[str, Any] = {
    "ringcentral": {
        "client_id": "app-id",
        "client_secret": {"env": "RC_SECRET"},
        "jwt": {"env": "RC_JWT"},
    }
}
_DELETE = object()


def with_values(**dotted: Any) -> dict[str, Any]:
    """MINIMAL with `section__key=value` set (value _DELETE deletes the key)."""
    data = copy.deepcopy(MINIMAL)
    for name, value in dotted.items():
        section, key = name.split("__")
        entries = data.setdefault(section, {})
        if value is _DELETE:
            entries.pop(key, None)
        else:
            entries[key] = value
    return data


def problems_of(data: object, environ: dict[str, str] | None = None, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ=ENV if environ is None else environ, **kw)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_minimal_config_gives_defaults() -> None:
    config = parse_config(MINIMAL, environ=ENV)
    expected = Config(
        ringcentral=RingCentralConfig(
            client_id="app-id",
            client_secret=Secret(ENV["RC_SECRET"], ("env", "RC_SECRET")),
            jwt=Secret(ENV["RC_JWT"], ("env", "RC_JWT")),
        )
    )
    assert expected == config
    assert config.websocket.heartbeat_interval == 60
    assert config.events.mode == 0o660
    assert config.ringcentral.extensions == ("~",)
    assert config.metrics.address == ("127.0.0.1", 9464)
    assert config.ringcentral.jwt.reveal() == ENV["RC_JWT"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (1, 1.0),
        (1.5, 1.5),
        ("1.5", 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        (" 2 m ", 120.0),
        (".5s", 0.5),
    ],
)
def test_duration_forms(value: object, seconds: float) -> None:
    assert seconds == pytest.approx(parse_duration(value))


@pytest.mark.parametrize("value", ["fast", "", "5 minutes", "1d", "-1s", "1e3", True, None, [1], {"s": 1}])
def test_duration_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r'expected a duration like 1\.5, "90s" or "5m", got'):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5, float("inf"), float("nan")])
def test_duration_out_of_range(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration >= 0 seconds"):
        parse_duration(value)


def test_durations_in_the_file() -> None:
    config = parse_config(
        with_values(reconcile__debounce="250ms", reconcile__poll_interval="5m"), environ=ENV
    )
    assert config.reconcile.debounce == 0.25
    assert config.reconcile.poll_interval == 300


BAD_VALUES = [
    # (dotted key, value, the reason expected after "key: ")
    ("reconcile.debounce", "fast", 'expected a duration like 1.5, "90s" or "5m", got "fast"'),
    ("reconcile.sent_settle", -1, "expected a duration >= 0 seconds, got -1"),
    ("reconcile.poll_interval", 0, "must be more than 0 seconds, got 0"),
    ("reconcile.rate_share", 0, "must be > 0 and <= 1, got 0"),
    ("reconcile.rate_share", 1.5, "must be > 0 and <= 1, got 1.5"),
    ("reconcile.rate_share", "most", 'expected a number in (0, 1], got "most"'),
    ("reconcile.max_delay", 0.5, "must be >= reconcile.debounce (1), got 0.5"),
    ("websocket.ping_timeout", "10 s", None),  # valid: spaces before the unit are fine
    ("websocket.ping_interval", None, 'expected a duration like 1.5, "90s" or "5m", got null'),
    ("websocket.ping_timeout", "250ms", "must be >= websocket.ping_timeout_min (5), got 0.25"),
    ("websocket.ping_timeout_min", 0, "must be more than 0 seconds, got 0"),
    ("websocket.max_message_bytes", 0, "must be >= 1, got 0"),
    ("websocket.max_message_bytes", "1MB", 'expected an integer, got "1MB"'),
    ("websocket.max_message_bytes", 1.5, "expected an integer, got 1.5"),
    ("websocket.max_message_bytes", True, "expected an integer, got true"),
    ("store.retention_days", 0, "must be >= 1, got 0"),
    ("store.path", "", 'expected a file path, got ""'),
    ("store.path", 5, "expected a file path, got 5"),
    ("events.mode", 432, 'expected an octal mode string like "0660" (quoted), got 432'),
    ("events.mode", "0999", 'expected an octal mode string like "0660" (quoted), got "0999"'),
    ("events.group", -1, "expected a group name, a numeric gid or null, got -1"),
    ("events.max_clients", 0, "must be >= 1, got 0"),
    ("events.client_queue", "many", 'expected an integer, got "many"'),
    ("events.allowed_uids", 1000, "expected a list of numeric ids, got 1000"),
    ("events.allowed_gids", [1, "wheel"], 'item 1: expected a numeric id >= 0, got "wheel"'),
    ("events.heartbeat_interval", "soon", 'expected a duration like 1.5, "90s" or "5m", got "soon"'),
    ("events.include_numbers", "yes", 'expected true or false, got "yes"'),
    ("metrics.listen", "9464", 'expected HOST:PORT like "127.0.0.1:9464" or "[::1]:9464", got "9464"'),
    (
        "metrics.listen",
        "::1:9464",
        'expected HOST:PORT like "127.0.0.1:9464" or "[::1]:9464", got "::1:9464"',
    ),
    ("metrics.listen", "h:70000", 'expected HOST:PORT like "127.0.0.1:9464" or "[::1]:9464", got "h:70000"'),
    ("metrics.listen", 9464, 'expected HOST:PORT like "127.0.0.1:9464" or null, got 9464'),
    ("logging.level", "verbose", 'expected one of debug, info, warning, error, got "verbose"'),
    ("logging.format", "xml", 'expected one of auto, json, console, got "xml"'),
    ("logging.redact_phi", "no", 'expected true or false, got "no"'),
    (
        "ringcentral.server",
        "ftp://x",
        'expected an http(s) URL like https://platform.ringcentral.com, got "ftp://x"',
    ),
    (
        "ringcentral.server",
        "rc.example",
        'expected an http(s) URL like https://platform.ringcentral.com, got "rc.example"',
    ),
    ("ringcentral.client_id", "  ", 'expected a non-empty string, got "  "'),
    ("ringcentral.client_id", _DELETE, "required, not set (the app's client ID"),
    ("ringcentral.jwt", _DELETE, "required, not set ({credential: NAME}, {file: PATH} or {env: NAME})"),
    ("ringcentral.extensions", [], 'expected a non-empty list of extension ids like ["~"], got a list'),
    ("ringcentral.extensions", "~", 'expected a non-empty list of extension ids like ["~"], got "~"'),
    ("ringcentral.extensions", ["~", "12a"], 'item 1: expected "~" or an extension id (digits), got "12a"'),
    ("ringcentral.extensions", ["1", 1], 'item 1: extension "1" is listed twice'),
    (
        "ringcentral.ca_file",
        "/nonexistent/ca.pem",
        "CA file /nonexistent/ca.pem does not exist or is not a regular file",
    ),
    ("send.cover_index", -1, "expected a cover page index (0 = no cover page, 1-13"),
    ("send.cover_index", "none", "expected a cover page index (0 = no cover page, 1-13"),
    ("send.cover_index", True, "expected a cover page index (0 = no cover page, 1-13"),
    ("documents.enabled", "yes", 'expected true or false, got "yes"'),
    ("documents.spool_dir", "", 'expected a file path, got ""'),
    ("documents.retention_days", 0, "must be >= 1, got 0"),
    ("documents.retention_days", "30d", 'expected an integer, got "30d"'),
    ("documents.mode", 640, 'expected an octal mode string like "0660" (quoted), got 640'),
    ("documents.mode", "0660", "a document must not be executable or writable by group or others"),
    ("documents.mode", "0750", "a document must not be executable or writable by group or others"),
    ("documents.mode", "0600", None),
    ("documents.retention_days", None, None),
]


@pytest.mark.parametrize(("key", "value", "reason"), BAD_VALUES)
def test_bad_value_names_key_and_reason(key: str, value: object, reason: str | None) -> None:
    data = with_values(**{key.replace(".", "__"): value})
    if reason is None:
        parse_config(data, environ=ENV)
        return
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: {reason}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0600", 0o600),
        ("660", 0o660),
        ("0o640", 0o640),
    ],
)
def test_mode_forms(value: str, expected: int) -> None:
    assert expected == parse_config(with_values(events__mode=value), environ=ENV).events.mode


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("faxd-clients", "faxd-clients"), (990, 990), ("990", 990)]
)
def test_group_forms(value: object, expected: object) -> None:
    assert expected == parse_config(with_values(events__group=value), environ=ENV).events.group


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (3, 3), (None, None)])
def test_cover_index_forms(value: object, expected: object) -> None:
    assert parse_config(with_values(send__cover_index=value), environ=ENV).send.cover_index == expected
    assert parse_config(MINIMAL, environ=ENV).send.cover_index == 0  # by default: no cover page


def test_extension_ids_may_be_numbers_in_yaml() -> None:
    config = parse_config(with_values(ringcentral__extensions=[123, "~", "456"]), environ=ENV)
    assert config.ringcentral.extensions == ("123", "~", "456")


def test_listen_forms() -> None:
    assert parse_config(with_values(metrics__listen="[::1]:9464"), environ=ENV).metrics.address == (
        "::1",
        9464,
    )
    assert parse_config(with_values(metrics__listen=None), environ=ENV).metrics.address is None


CLEAR_TEXT = (
    "plain http:// would send the client secret and the JWT in clear text; use https:// (http:// is "
    "accepted only for a loopback host: 127.0.0.0/8, ::1, localhost)"
)


@pytest.mark.parametrize(
    "url",
    [
        "http://platform.ringcentral.com",
        "http://10.0.0.7:8080",
        "http://[2001:db8::1]:8080",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
        "HTTP://platform.devtest.ringcentral.com",
    ],
)
def test_plain_http_server_off_the_host_is_refused(url: str) -> None:
    (problem,) = problems_of(with_values(ringcentral__server=url))
    assert problem.startswith(f"ringcentral.server: {CLEAR_TEXT}, got ")
    assert url in problem


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.3.4.5",
        "http://[::1]:9000",
        "http://localhost:9000",
        "http://LocalHost",
        "https://platform.devtest.ringcentral.com",
        "https://10.0.0.7",
    ],
)
def test_https_anywhere_and_http_on_loopback_are_accepted(url: str) -> None:
    assert parse_config(with_values(ringcentral__server=url), environ=ENV).ringcentral.server == url


def test_server_trailing_slash_is_dropped() -> None:
    config = parse_config(with_values(ringcentral__server="http://127.0.0.1:8080/"), environ=ENV)
    assert config.ringcentral.server == "http://127.0.0.1:8080"


def test_all_problems_are_collected() -> None:
    data = with_values(
        websocket__ping_interval="x",
        reconcile__rate_share=3,
        logging__level="loud",
        ringcentral__client_id=_DELETE,
    )
    data["extra"] = {}
    problems = problems_of(data)
    keys = [p.split(":", 1)[0] for p in problems]
    assert sorted(keys) == sorted(
        ["extra", "ringcentral.client_id", "websocket.ping_interval", "reconcile.rate_share", "logging.level"]
    )


def test_cross_check_is_reported_with_other_problems() -> None:
    problems = problems_of(with_values(reconcile__max_delay="100ms", logging__level="loud"))
    assert any(p.startswith("reconcile.max_delay: must be >= reconcile.debounce") for p in problems)
    assert any(p.startswith("logging.level:") for p in problems)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {**MINIMAL, "websocket": {"ping_intervall": 5}},
            "websocket.ping_intervall: unknown key; did you mean",
        ),
        ({**MINIMAL, "sotre": {}}, "sotre: unknown key; did you mean store?"),
        ({**MINIMAL, "zzz": 1}, "zzz: unknown key; known keys: ringcentral, websocket, reconcile, store"),
        ({**MINIMAL, "events": []}, "events: expected a mapping of keys, got a list"),
        ({**MINIMAL, "logging": "debug"}, 'logging: expected a mapping of keys, got "debug"'),
        (["ringcentral"], "(top level): expected a mapping of keys, got a list"),
    ],
)
def test_structure_problems(data: object, problem: str) -> None:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem)


def test_empty_document_needs_only_the_required_keys() -> None:
    problems = problems_of(None, environ={})
    assert [p.split(":", 1)[0] for p in problems] == [
        "ringcentral.client_id",
        "ringcentral.client_secret",
        "ringcentral.jwt",
    ]


def test_null_section_means_defaults() -> None:
    assert parse_config({**MINIMAL, "metrics": None}, environ=ENV).metrics.listen == "127.0.0.1:9464"


# --- secrets --------------------------------------------------------------------------------------


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def secret_config(source: object) -> dict[str, Any]:
    return with_values(ringcentral__jwt=source)


def test_secret_from_file_relative_to_base_dir(tmp_path: Path) -> None:
    write_secret(tmp_path / "jwt", "the-jwt\n")
    config = parse_config(secret_config({"file": "jwt"}), environ=ENV, base_dir=tmp_path)
    assert config.ringcentral.jwt.reveal() == "the-jwt"
    assert config.ringcentral.jwt.source == ("file", str(tmp_path / "jwt"))


def test_secret_from_credentials_directory(tmp_path: Path) -> None:
    write_secret(tmp_path / "ringcentral-jwt", "cred-jwt", 0o400)
    env = {**ENV, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    config = parse_config(secret_config({"credential": "ringcentral-jwt"}), environ=env)
    assert config.ringcentral.jwt.reveal() == "cred-jwt"
    assert config.ringcentral.jwt.source == ("credential", "ringcentral-jwt")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_secret_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_secret(tmp_path / "jwt", "top-secret-jwt", mode)
    (problem,) = problems_of(secret_config({"file": str(path)}))
    assert problem == (
        f"ringcentral.jwt: secret file {path} has mode {mode:04o}; it must not be accessible by group "
        f"or others (chmod 600 {path})"
    )


def secret_problem_cases(tmp: Path) -> list[tuple[object, dict[str, str], str]]:
    write_secret(tmp / "empty", "\n")
    write_secret(tmp / "blank", "  \n")
    (tmp / "dir").mkdir(mode=0o700)
    os.symlink(tmp / "empty", tmp / "link")
    (tmp / "binary").write_bytes(b"\xff\xfe")
    (tmp / "binary").chmod(0o600)
    forms = "{credential: NAME}, {file: PATH} or {env: NAME}"
    return [
        ("eyJliteral.secret.value", {}, f"secrets don't live in config files; use {forms}"),
        (123456, {}, f"expected exactly one of {forms}, got another type"),
        ({"file": "a", "env": "B"}, {}, f"expected exactly one of {forms}, got keys file, env"),
        ({"path": "a"}, {}, f"expected exactly one of {forms}, got key path"),
        ({"file": ""}, {}, 'file: expected a non-empty string, got ""'),
        ({"env": None}, {}, "env: expected a non-empty string, got null"),
        ({"env": "NOPE"}, {}, "environment variable NOPE is not set"),
        ({"env": "EMPTY"}, {"EMPTY": ""}, "environment variable EMPTY is empty"),
        ({"file": str(tmp / "missing")}, {}, f"secret file {tmp / 'missing'} does not exist"),
        ({"file": str(tmp / "empty")}, {}, f"secret file {tmp / 'empty'} is empty"),
        ({"file": str(tmp / "blank")}, {}, f"secret file {tmp / 'blank'} is empty"),
        ({"file": str(tmp / "dir")}, {}, f"secret file {tmp / 'dir'} is not a regular file"),
        (
            {"file": str(tmp / "link")},
            {},
            f"secret file {tmp / 'link'} is a symbolic link; name the file itself",
        ),
        ({"file": str(tmp / "binary")}, {}, f"secret file {tmp / 'binary'} is not UTF-8 text"),
        ({"credential": "ringcentral-jwt"}, {}, "{credential: ringcentral-jwt} needs $CREDENTIALS_DIRECTORY"),
        (
            {"credential": "absent"},
            {"CREDENTIALS_DIRECTORY": str(tmp)},
            f"secret file {tmp / 'absent'} does not exist",
        ),
        (
            {"credential": "../jwt"},
            {"CREDENTIALS_DIRECTORY": str(tmp)},
            "credential: expected a credential name without '/'",
        ),
    ]


def test_secret_problems(tmp_path: Path) -> None:
    for source, extra_env, reason in secret_problem_cases(tmp_path):
        problems = problems_of(secret_config(source), environ={**ENV, **extra_env})
        assert len(problems) == 1, (source, problems)
        assert problems[0].startswith(f"ringcentral.jwt: {reason}"), (source, problems)
        assert "eyJliteral" not in problems[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_secret_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "jwt", "x")
    os.chown(path, 4242, -1)
    (problem,) = problems_of(secret_config({"file": str(path)}))
    assert problem.startswith(f"ringcentral.jwt: secret file {path} is owned by uid 4242; it must be owned")


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2", ("env", "X"))
    assert repr(secret) == str(secret) == f"{secret}" == "[REDACTED]"
    assert "hunter2" not in repr(parse_config(MINIMAL, environ={"RC_SECRET": "hunter2", "RC_JWT": "j"}))
    assert secret == Secret("hunter2", ("env", "X"))
    assert secret != Secret("hunter3", ("env", "X"))


# --- files, rendering, the shipped config ---------------------------------------------------------


def test_load_config_reads_a_file_and_resolves_paths_next_to_it(tmp_path: Path) -> None:
    write_secret(tmp_path / "secret", "s")
    write_secret(tmp_path / "jwt", "j")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "faxd.yaml").write_text(
        "ringcentral:\n  client_id: abc\n  client_secret: {file: secret}\n  jwt: {file: jwt}\n"
        "  ca_file: ca.pem\nstore: {path: state/faxd.db}\nevents: {socket: faxd.sock}\n"
    )
    config = load_config(tmp_path / "faxd.yaml", environ={})
    assert config.ringcentral.client_secret.reveal() == "s"
    assert config.ringcentral.ca_file == str(tmp_path / "ca.pem")
    assert config.store.path == str(tmp_path / "state" / "faxd.db")
    assert config.events.socket == str(tmp_path / "faxd.sock")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ringcentral: [\n", ":2:1: invalid YAML: expected the node content, but found '<stream end>'"),
        ("a: 1\n b: 2\n", ":2:3: invalid YAML: mapping values are not allowed here"),
        ("store:\n  path: /a\n  path: /b\n", ":3:3: invalid YAML: duplicate key 'path'"),
        ("\tx: 1\n", ":1:1: invalid YAML: found character '\\t' that cannot start any token"),
    ],
)
def test_yaml_syntax_errors_name_file_and_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert [f"{path}{problem}"] == info.value.problems


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the config file: No such file"):
        load_config(tmp_path / "missing.yaml")


def test_empty_file_is_defaults_but_required_keys(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "empty.yaml", environ={})
    assert len(info.value.problems) == 3


def test_default_config_path() -> None:
    assert default_config_path({}) == DEFAULT_CONFIG_PATH == "/etc/faxd/config.yaml"
    assert default_config_path({"FAXD_CONFIG": "/x.yaml"}) == "/x.yaml"


def test_render_effective_shows_sources_never_values(tmp_path: Path) -> None:
    write_secret(tmp_path / "jwt", "jwt-value-123")
    data = with_values(ringcentral__jwt={"file": str(tmp_path / "jwt")}, events__mode="0640")
    config = parse_config(data, environ=ENV)
    text = render_effective(config)
    for value in (*ENV.values(), "jwt-value-123"):
        assert value not in text
    rendered = yaml.safe_load(text)
    assert rendered["ringcentral"]["jwt"] == {"file": str(tmp_path / "jwt")}
    assert rendered["ringcentral"]["client_secret"] == {"env": "RC_SECRET"}
    assert rendered["events"]["mode"] == "0640"
    assert config == parse_config(rendered, environ=ENV)  # the rendering is a valid config of its own


def test_shipped_config_documents_the_defaults(tmp_path: Path) -> None:
    shipped = (REPO / "config.yaml").read_text()
    assert "client_id: null" in shipped
    (tmp_path / "config.yaml").write_text(shipped.replace("client_id: null", "client_id: my-app"))
    write_secret(tmp_path / "ringcentral-client-secret", "cs", 0o400)
    write_secret(tmp_path / "ringcentral-jwt", "jwt", 0o400)
    config = load_config(tmp_path / "config.yaml", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    expected = Config(
        ringcentral=RingCentralConfig(
            client_id="my-app",
            client_secret=Secret("cs", ("credential", "ringcentral-client-secret")),
            jwt=Secret("jwt", ("credential", "ringcentral-jwt")),
        )
    )
    assert expected == config
    # every key the dataclasses know is spelled out in the shipped file
    documented = yaml.safe_load(shipped)
    assert yaml.safe_load(render_effective(config)).keys() == documented.keys()
    for section, keys in yaml.safe_load(render_effective(config)).items():
        assert list(keys) == list(documented[section]), section


def test_shipped_config_fails_clearly_until_filled_in() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "config.yaml", environ={})
    assert [p.split(":", 1)[0] for p in info.value.problems] == [
        "ringcentral.client_id",
        "ringcentral.client_secret",
        "ringcentral.jwt",
    ]


# --- one section alone (the socket clients, faxd store) and check-config's deferred credentials ----


CREDENTIAL_CONFIG = """\
ringcentral:
  client_id: app
  client_secret: {credential: ringcentral-client-secret}
  jwt: {credential: ringcentral-jwt}
events: {socket: sockets/events.sock, mode: "0600"}
"""


def test_load_section_reads_one_section_without_secrets(tmp_path: Path) -> None:
    """A client's view: the events section only, with no $CREDENTIALS_DIRECTORY and other sections
    that would not even validate."""
    (tmp_path / "c.yaml").write_text(CREDENTIAL_CONFIG + "websocket: {ping_interval: never}\nbogus: 1\n")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "c.yaml", environ={})
    events = load_section(tmp_path / "c.yaml", EventsConfig, environ={})
    assert events == EventsConfig(socket=str(tmp_path / "sockets" / "events.sock"), mode=0o600)
    assert load_section(tmp_path / "c.yaml", StoreConfig, environ={}) == StoreConfig()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("events: {socket: 5}\n", "events.socket: expected a file path, got 5"),
        ("events: {sokcet: /x}\n", "events.sokcet: unknown key; did you mean socket?"),
        ("events: [1]\n", "events: expected a mapping of keys, got a list"),
        ("- 1\n", "(top level): expected a mapping of keys, got a list"),
        ("events: {\n", "invalid YAML"),
    ],
)
def test_load_section_names_the_problems_of_its_section(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_section(tmp_path / "c.yaml", EventsConfig, environ={})
    assert problem in str(info.value)


def test_load_section_of_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the config file: No such file"):
        load_section(tmp_path / "nope.yaml", EventsConfig)


def test_default_event_socket() -> None:
    assert EventsConfig().socket == DEFAULT_EVENT_SOCKET == "/run/faxd/events.sock"


def test_deferred_credentials_are_listed_and_have_no_value(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CREDENTIAL_CONFIG)
    config = load_config(tmp_path / "c.yaml", environ={}, defer_credentials=True)
    assert deferred_credentials(config) == [
        ("ringcentral.client_secret", "ringcentral-client-secret"),
        ("ringcentral.jwt", "ringcentral-jwt"),
    ]
    with pytest.raises(RuntimeError, match="no value"):
        config.ringcentral.jwt.reveal()
    assert yaml.safe_load(render_effective(config))["ringcentral"]["jwt"] == {"credential": "ringcentral-jwt"}
    # What `faxd run` does: no deferral, every unreadable credential is a problem.
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", environ={})
    assert [p.split(":", 1)[0] for p in info.value.problems] == [
        "ringcentral.client_secret",
        "ringcentral.jwt",
    ]


def test_deferral_covers_only_a_missing_credentials_directory(tmp_path: Path) -> None:
    """Under systemd-run (the directory is set) a missing credential is a problem, deferral or not;
    and the other secret forms are always read."""
    (tmp_path / "creds").mkdir()
    write_secret(tmp_path / "creds" / "ringcentral-jwt", "j", 0o400)
    (tmp_path / "c.yaml").write_text(CREDENTIAL_CONFIG)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", environ=env, defer_credentials=True)
    missing = tmp_path / "creds" / "ringcentral-client-secret"
    assert info.value.problems == [f"ringcentral.client_secret: secret file {missing} does not exist"]
    data = with_values(ringcentral__jwt={"env": "UNSET"})
    with pytest.raises(ConfigError, match="environment variable UNSET is not set"):
        parse_config(data, environ={}, defer_credentials=True)


def stores(tmp_path: Path) -> tuple[str, str]:
    encrypted, plain = tmp_path / "credstore.encrypted", tmp_path / "credstore"
    encrypted.mkdir(mode=0o700)
    plain.mkdir(mode=0o700)
    return str(encrypted), str(plain)


def test_inspect_finds_the_file_the_unit_loads(tmp_path: Path) -> None:
    encrypted, plain = stores(tmp_path)
    found, note = credentials.inspect("ringcentral-jwt", (encrypted, plain))
    assert found is None
    assert note == (
        f"neither {encrypted}/faxd.ringcentral-jwt nor {plain}/faxd.ringcentral-jwt exists"
        " (the unit loads it from there)"
    )
    write_secret(Path(plain) / "faxd.ringcentral-jwt", "j", 0o600)
    found, note = credentials.inspect("ringcentral-jwt", (encrypted, plain))
    assert found == credentials.CredentialFile("LoadCredential", f"{plain}/faxd.ringcentral-jwt")
    write_secret(Path(encrypted) / "faxd.ringcentral-jwt", "sealed", 0o600)
    found, note = credentials.inspect("ringcentral-jwt", (encrypted, plain))
    assert found == credentials.CredentialFile("LoadCredentialEncrypted", f"{encrypted}/faxd.ringcentral-jwt")
    if os.geteuid() == 0:
        assert note == f"{found.path} (mode 0600, uid 0) is there; its content is checked only under the unit"


def test_inspect_warns_about_a_credential_file_others_can_read(tmp_path: Path) -> None:
    encrypted, plain = stores(tmp_path)
    path = write_secret(Path(plain) / "faxd.ringcentral-jwt", "j", 0o644)
    _, note = credentials.inspect("ringcentral-jwt", (encrypted, plain))
    assert "(mode 0644, " in note
    risk = "anyone in its group or others can read the secret"
    assert note.endswith(f"is accessible by group or others ({risk}): chmod 600 {path}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_inspect_wants_root_to_own_the_credential_file(tmp_path: Path) -> None:
    encrypted, plain = stores(tmp_path)
    path = write_secret(Path(encrypted) / "faxd.ringcentral-jwt", "sealed", 0o600)
    os.chown(path, 4242, -1)
    _, note = credentials.inspect("ringcentral-jwt", (encrypted, plain))
    assert note == f"{path} (mode 0600, uid 4242) is not owned by root: chown root: {path}"


def test_systemd_run_command_loads_what_was_found() -> None:
    found = [
        (
            "ringcentral-jwt",
            credentials.CredentialFile("LoadCredential", "/etc/credstore/faxd.ringcentral-jwt"),
        ),
        ("ringcentral-client-secret", None),
    ]
    command = credentials.systemd_run_command(found, "/etc/faxd/my config.yaml", ["/opt/faxd/bin/faxd"])
    assert command == (
        "systemd-run --quiet --pipe --wait --collect -p DynamicUser=yes"
        " -p LoadCredential=ringcentral-jwt:/etc/credstore/faxd.ringcentral-jwt"
        " -p LoadCredentialEncrypted=ringcentral-client-secret:"
        "/etc/credstore.encrypted/faxd.ringcentral-client-secret"
        " /opt/faxd/bin/faxd check-config -c '/etc/faxd/my config.yaml'"
    )


# --- outlets (docs/outlets.md) -----------------------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + "A" * 43 + "="  # 32 bytes of base64


def with_outlets(outlets: object) -> dict[str, Any]:
    return {**copy.deepcopy(MINIMAL), "outlets": outlets}


def test_outlets_parse_with_their_defaults_and_secret_source() -> None:
    env = {**ENV, "HOOK_SECRET": WEBHOOK_SECRET}
    config = parse_config(
        with_outlets(
            {
                "ehr": {
                    "type": "webhook",
                    "url": "https://ehr.example.org/fax",
                    "secret": {"env": "HOOK_SECRET"},
                    "filter": {"directions": ["Outbound"], "final_only": True},
                },
                "notify": {"type": "exec", "command": ["/bin/true", "x"], "concurrency": 4, "timeout": "2m"},
            }
        ),
        environ=env,
    )
    ehr, notify = config.outlets["ehr"], config.outlets["notify"]
    assert ehr.secret is not None
    assert ehr.secret.reveal() == WEBHOOK_SECRET
    assert ehr.filter.directions == frozenset({"outbound"})
    assert ehr.max_age == 86400.0
    assert notify.command == ("/bin/true", "x")
    assert notify.timeout == 120.0
    text = render_effective(config)
    assert WEBHOOK_SECRET not in text
    assert yaml.safe_load(text)["outlets"]["ehr"]["secret"] == {"env": "HOOK_SECRET"}
    assert parse_config(yaml.safe_load(text), environ=env) == config


@pytest.mark.parametrize(
    ("outlets", "problem"),
    [
        ([{"type": "webhook"}], "outlets: expected a mapping of outlet names to outlets"),
        ({"bad name": {"type": "exec"}}, "outlets.bad name: an outlet name is"),
        ({"o": {}}, "outlets.o.type: required, not set (webhook or exec)"),
        ({"o": {"type": "fax"}}, "outlets.o.type: expected one of webhook, exec"),
        ({"o": {"type": "webhook", "secret": {"env": "S"}}}, "outlets.o.url: required for type webhook"),
        ({"o": {"type": "webhook", "url": "https://a/"}}, "outlets.o.secret: required for type webhook"),
        (
            {"o": {"type": "webhook", "url": "http://10.1.2.3/", "secret": {"env": "S"}}},
            "outlets.o.url: plain http://",
        ),
        (
            {"o": {"type": "webhook", "url": "https://u:p@a/", "secret": {"env": "S"}}},
            "outlets.o.url: a URL with a user",
        ),
        (
            {"o": {"type": "webhook", "url": "https://a/", "secret": "inline"}},
            "outlets.o.secret: secrets don't live",
        ),
        (
            {"o": {"type": "webhook", "url": "https://a/", "secret": {"env": "SHORT"}}},
            "outlets.o.secret: a webhook secret must decode to 24",
        ),
        (
            {"o": {"type": "webhook", "url": "https://a/", "secret": {"env": "S"}, "concurrency": 2}},
            "outlets.o.concurrency: webhooks deliver in order",
        ),
        (
            {"o": {"type": "exec", "command": "/bin/true"}},
            "outlets.o.command: expected a list (argv, no shell)",
        ),
        (
            {"o": {"type": "exec", "command": ["true"]}},
            "outlets.o.command: the program must be an absolute path",
        ),
        (
            {"o": {"type": "exec", "command": ["/nonexistent/hook"]}},
            "outlets.o.command: /nonexistent/hook does not exist",
        ),
        ({"o": {"type": "exec"}}, "outlets.o.command: required for type exec"),
        (
            {"o": {"type": "exec", "command": ["/bin/true"], "url": "https://a/"}},
            "outlets.o.url: not a key of type exec",
        ),
        (
            {"o": {"type": "exec", "command": ["/bin/true"], "timeout": 0}},
            "outlets.o.timeout: must be more than 0",
        ),
        (
            {"o": {"type": "exec", "command": ["/bin/true"], "filter": {"final_only": 1}}},
            "outlets.o.filter.final_only: expected true or false",
        ),
        (
            {"o": {"type": "exec", "command": ["/bin/true"], "filtre": {}}},
            "outlets.o.filtre: unknown key; did you mean filter?",
        ),
    ],
)
def test_bad_outlets_name_the_key(outlets: object, problem: str) -> None:
    env = {**ENV, "S": WEBHOOK_SECRET, "SHORT": "c2hvcnQ="}
    found = problems_of(with_outlets(outlets), environ=env)
    assert any(p.startswith(problem) for p in found), found
    assert all(WEBHOOK_SECRET not in p for p in found)


def test_changed_outlets_need_a_restart() -> None:
    from faxd.config import merge_reload

    old = parse_config(with_outlets({"o": {"type": "exec", "command": ["/bin/true"]}}), environ=ENV)
    new = parse_config(with_outlets({"o": {"type": "exec", "command": ["/bin/false"]}}), environ=ENV)
    effective, applied, restart = merge_reload(old, new)
    assert restart == ["outlets"]
    assert applied == []
    assert effective.outlets == old.outlets


def test_a_deferred_outlet_credential_is_listed(tmp_path: Path) -> None:
    data = with_outlets(
        {"ehr": {"type": "webhook", "url": "https://a/", "secret": {"credential": "webhook-ehr"}}}
    )
    config = parse_config(data, environ=ENV, defer_credentials=True)
    assert deferred_credentials(config) == [("outlets.ehr.secret", "webhook-ehr")]


def test_check_config_exits_78_naming_the_outlet_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            with_outlets({"ehr": {"type": "webhook", "url": "ftp://x/", "secret": {"env": "RC_SECRET"}}})
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "faxd", "check-config", "-c", str(tmp_path / "config.yaml")],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    assert "outlets.ehr.url: expected an https:// URL" in result.stderr
