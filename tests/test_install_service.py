"""``faxd install-service``: the pure planning (what goes where, what differs) tested directly, then the
command itself writing into temporary roots: a fresh install, an idempotent second run, an upgrade over
files nobody edited, an edited file refused and replaced with --force, a config that is never
overwritten."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from faxd.cli import main
from faxd.install_service import (
    CONFIG_PATH,
    FileToWrite,
    InstallError,
    Kind,
    Layout,
    Verdict,
    hidden_from_service,
    load_sources,
    plan,
    pristine,
    render,
    set_exec_start,
    systemd_quote,
    sysusers_dir_for,
)
from faxd.shipped import SHIPPED, read_shipped

REPO = Path(__file__).resolve().parent.parent
EXE = "/opt/faxd/venv/bin/faxd"
UNIT = "usr/local/lib/systemd/system/faxd.service"
SOCKET = "usr/local/lib/systemd/system/faxd.socket"
SYSUSERS = "usr/local/lib/sysusers.d/faxd.conf"
TMPFILES = "usr/local/lib/tmpfiles.d/faxd.conf"
CONFIG = "etc/faxd/config.yaml"
RULES = "usr/local/share/faxd/faxd-rules.yml"
GUIDE = "usr/local/share/doc/faxd/operations.md"
ALL = (UNIT, SOCKET, SYSUSERS, TMPFILES, CONFIG, RULES, GUIDE)


def exec_start(unit: str) -> str:
    (line,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    return line


# ---------------------------------------------------------------------------------------- planning


def test_render_points_execstart_at_the_given_faxd_and_keeps_its_arguments() -> None:
    files = {str(f.path): f for f in render(load_sources(), EXE, Layout())}
    packaged = exec_start(read_shipped("systemd/faxd.service"))
    unit = files["/usr/local/lib/systemd/system/faxd.service"].content
    assert exec_start(unit) == EXE + " " + packaged.split(" ", 1)[1]
    assert "Documentation=file:///usr/local/share/doc/faxd/operations.md" in unit
    assert unit.startswith("# Installed by `faxd install-service`")
    socket_unit = files["/usr/local/lib/systemd/system/faxd.socket"].content
    assert "Documentation=file:///usr/local/share/doc/faxd/operations.md" in socket_unit
    assert files[str(CONFIG_PATH)].content == (REPO / "config.yaml").read_text()
    assert files[str(CONFIG_PATH)].kind is Kind.SEED
    assert sorted(files) == sorted(
        [
            "/usr/local/lib/systemd/system/faxd.service",
            "/usr/local/lib/systemd/system/faxd.socket",
            "/usr/local/lib/sysusers.d/faxd.conf",
            "/usr/local/lib/tmpfiles.d/faxd.conf",
            "/etc/faxd/config.yaml",
            "/usr/local/share/faxd/faxd-rules.yml",
            "/usr/local/share/doc/faxd/operations.md",
        ]
    )


def test_the_packaged_unit_reads_the_config_install_service_writes() -> None:
    assert f"--config {CONFIG_PATH}" in exec_start(read_shipped("systemd/faxd.service"))


def test_render_refuses_a_unit_without_exactly_one_execstart() -> None:
    with pytest.raises(InstallError, match="exactly one ExecStart="):
        set_exec_start("[Service]\nType=notify\n", EXE)
    with pytest.raises(InstallError, match="exactly one ExecStart="):
        set_exec_start("ExecStart=/a run\nExecStart=/b run\n", EXE)


def test_execstart_quotes_what_systemd_would_split_or_expand() -> None:
    assert systemd_quote("/opt/faxd/bin/faxd") == "/opt/faxd/bin/faxd"
    assert systemd_quote("/opt/my faxd/bin/faxd") == '"/opt/my faxd/bin/faxd"'
    assert systemd_quote("/opt/100%/bin/faxd") == "/opt/100%%/bin/faxd"
    assert systemd_quote('/opt/a"b\\c/faxd') == '"/opt/a\\"b\\\\c/faxd"'
    assert exec_start(set_exec_start("ExecStart=/x run -c /etc/faxd/config.yaml\n", "/o p/faxd")) == (
        '"/o p/faxd" run -c /etc/faxd/config.yaml'
    )


def test_sysusers_dir_matches_the_unit_dir() -> None:
    assert sysusers_dir_for(PurePosixPath("/etc/systemd/system")) == PurePosixPath("/etc/sysusers.d")
    assert sysusers_dir_for(PurePosixPath("/usr/local/lib/systemd/system")) == PurePosixPath(
        "/usr/local/lib/sysusers.d"
    )
    with pytest.raises(InstallError, match="--sysusers-dir"):
        sysusers_dir_for(PurePosixPath("/srv/units"))


def test_home_and_tmp_are_hidden_from_the_hardened_unit() -> None:
    assert hidden_from_service("/root/.local/bin/faxd") == "/root"
    assert hidden_from_service("/home/ops/.local/share/pipx/venvs/faxd/bin/faxd") == "/home"
    assert hidden_from_service("/tmp/venv/bin/faxd") == "/tmp"
    assert hidden_from_service("/opt/faxd/bin/faxd") is None
    assert hidden_from_service("/homestead/bin/faxd") is None


OWNED = FileToWrite(PurePosixPath("/u/faxd.service"), "packaged\n", Kind.OWNED)
SEED = FileToWrite(PurePosixPath("/etc/faxd/config.yaml"), "example\n", Kind.SEED)


@pytest.mark.parametrize(
    ("existing", "force", "owned", "seed"),
    [
        (None, False, Verdict.CREATE, Verdict.CREATE),
        ("packaged\n", False, Verdict.UNCHANGED, Verdict.KEEP),
        ("edited\n", False, Verdict.CONFLICT, Verdict.KEEP),
        ("edited\n", True, Verdict.OVERWRITE, Verdict.KEEP),
        ("example\n", True, Verdict.OVERWRITE, Verdict.KEEP),
    ],
)
def test_plan_verdicts(existing: str | None, force: bool, owned: Verdict, seed: Verdict) -> None:
    current = {OWNED.path: existing, SEED.path: existing}
    verdicts = [a.verdict for a in plan([OWNED, SEED], current, force=force).actions]
    assert verdicts == [owned, seed]


def stamp(body: str) -> str:
    """A file as an earlier faxd install-service left it: its stamp line, then the body it hashes."""
    return f"# old header\n# faxd-install-service sha256:{hashlib.sha256(body.encode()).hexdigest()}\n{body}"


def test_a_stamped_file_is_pristine_until_someone_edits_it() -> None:
    assert pristine(stamp("[Service]\nRestartSec=30s\n"))
    assert not pristine(stamp("[Service]\nRestartSec=30s\n").replace("30s", "5s"))
    assert not pristine(stamp("[Service]\n").replace("sha256:", "sha256:0"))
    assert not pristine("[Service]\nRestartSec=30s\n")
    body = "# Operating faxd\n"
    assert pristine(
        f"<!-- faxd-install-service sha256:{hashlib.sha256(body.encode()).hexdigest()} -->\n{body}"
    )


def test_plan_updates_what_an_earlier_faxd_wrote_and_nobody_edited() -> None:
    earlier = stamp("written by an older faxd\n")
    assert plan([OWNED], {OWNED.path: earlier}, force=False).actions[0].verdict is Verdict.UPDATE
    edited = earlier.replace("older", "edited")
    assert plan([OWNED], {OWNED.path: edited}, force=False).actions[0].verdict is Verdict.CONFLICT
    assert plan([SEED], {SEED.path: stamp("example\n")}, force=True).actions[0].verdict is Verdict.KEEP


def test_plan_writes_nothing_while_any_file_conflicts() -> None:
    fresh = FileToWrite(PurePosixPath("/u/faxd.socket"), "socket\n", Kind.OWNED)
    conflicted = plan([OWNED, fresh], {OWNED.path: "edited\n", fresh.path: None}, force=False)
    assert [a.verdict for a in conflicted.actions] == [Verdict.CONFLICT, Verdict.CREATE]
    assert conflicted.writes == ()
    forced = plan([OWNED, fresh], {OWNED.path: "edited\n", fresh.path: None}, force=True)
    assert [a.file for a in forced.writes] == [OWNED, fresh]
    assert "-edited\n+packaged\n" in forced.actions[0].diff()


# ---------------------------------------------------------------------------------------- the command


def install(root: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["install-service", "--root", str(root), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def lines_of(out: str) -> dict[str, str]:
    """{path relative to the root: verdict} from the command's report."""
    found = {}
    for m in re.finditer(r"^  (\w+)\s+/\S+?/root/(\S+)", out, re.M):
        found[m[2]] = m[1]
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.mark.usefixtures("strict_umask")
def test_fresh_install_writes_every_file_readable_by_the_service(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = install(root, capsys=capsys)
    assert (code, err) == (0, "")
    assert lines_of(out) == dict.fromkeys(ALL, "created")
    for rel in ALL:
        assert stat.S_IMODE((root / rel).stat().st_mode) == 0o644, rel
    # Under root's umask 077 a new /etc/faxd would be 0700 and the DynamicUser= could not read the config.
    assert stat.S_IMODE((root / "etc/faxd").stat().st_mode) == 0o755
    faxd = Path(sys.executable).parent / "faxd"  # the console script of the installation running the tests
    assert exec_start((root / UNIT).read_text()).split()[0] == str(faxd)
    assert (root / CONFIG).read_text() == (REPO / "config.yaml").read_text()
    assert (root / RULES).read_text().endswith((REPO / "contrib/prometheus/faxd-rules.yml").read_text())
    assert (root / SYSUSERS).read_text().endswith((REPO / "systemd/sysusers.d/faxd.conf").read_text())
    assert (root / TMPFILES).read_text().endswith((REPO / "systemd/tmpfiles.d/faxd.conf").read_text())
    steps = ("systemd-sysusers", "systemd-tmpfiles --create", "systemctl daemon-reload", "check-config")
    for step in (*steps, "systemctl enable --now"):
        assert step in out
    assert "systemd-creds encrypt" in out
    assert not list(root.rglob(".*.*")), "no temporary file may be left behind"


def test_second_run_changes_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(root, capsys=capsys)[0] == 0
    before = {rel: (root / rel).stat().st_mtime_ns for rel in ALL}
    code, out, err = install(root, capsys=capsys)
    assert (code, err) == (0, "")
    assert lines_of(out) == {**dict.fromkeys(ALL, "unchanged"), CONFIG: "kept"}
    assert {rel: (root / rel).stat().st_mtime_ns for rel in ALL} == before


def test_an_edited_file_is_refused_until_force_and_nothing_is_half_installed(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install(root, capsys=capsys)[0] == 0
    packaged_unit = (root / UNIT).read_text()
    edited = packaged_unit.replace("RestartSec=30s", "RestartSec=5s")
    (root / UNIT).write_text(edited)
    (root / RULES).unlink()

    code, out, err = install(root, capsys=capsys)
    assert code == 1
    assert out == ""
    assert f"{root / UNIT} has local changes" in err
    assert "-RestartSec=5s\n+RestartSec=30s" in err
    assert "systemctl edit faxd.service" in err
    assert "--force" in err
    assert "nothing was written" in err
    assert (root / UNIT).read_text() == edited
    assert not (root / RULES).exists(), "a refused run must not install the other files"

    code, out, err = install(root, "--force", capsys=capsys)
    assert (code, err) == (0, "")
    assert lines_of(out)[UNIT] == "replaced"
    assert lines_of(out)[RULES] == "created"
    assert (root / UNIT).read_text() == packaged_unit


def test_an_upgrade_updates_files_nobody_edited(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(root, capsys=capsys)[0] == 0
    packaged_unit = (root / UNIT).read_text()
    packaged_rules = (root / RULES).read_text()
    # As an earlier faxd would have left them: other content, a stamp that matches it.
    (root / UNIT).write_text(stamp("[Unit]\nDescription=faxd 0.0.9\n"))
    (root / RULES).write_text(stamp("groups: []\n"))
    code, out, err = install(root, capsys=capsys)
    assert (code, err) == (0, "")
    assert lines_of(out)[UNIT] == "updated"
    assert lines_of(out)[RULES] == "updated"
    assert (root / UNIT).read_text() == packaged_unit
    assert (root / RULES).read_text() == packaged_rules


def test_a_unit_copied_by_hand_counts_as_local(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The old install steps copied systemd/faxd.service as is: no stamp, so it is not faxd's to replace."""
    (root / UNIT).parent.mkdir(parents=True)
    (root / UNIT).write_text((REPO / "systemd/faxd.service").read_text())
    code, _, err = install(root, capsys=capsys)
    assert code == 1
    assert f"{root / UNIT} has local changes" in err


def test_the_config_is_never_overwritten_not_even_with_force(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / "etc/faxd").mkdir(parents=True)
    (root / CONFIG).write_text("ringcentral: {client_id: mine}\n")
    code, out, _ = install(root, capsys=capsys)
    assert code == 0
    assert lines_of(out)[CONFIG] == "kept"
    code, out, _ = install(root, "--force", capsys=capsys)
    assert code == 0
    assert lines_of(out)[CONFIG] == "kept"
    assert (root / CONFIG).read_text() == "ringcentral: {client_id: mine}\n"


def test_units_in_etc_take_sysusers_to_etc(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = install(root, "--unit-dir", "/etc/systemd/system", capsys=capsys)
    assert (code, err) == (0, "")
    assert (root / "etc/systemd/system/faxd.service").is_file()
    assert (root / "etc/sysusers.d/faxd.conf").is_file()
    assert (root / "etc/tmpfiles.d/faxd.conf").is_file()
    assert not (root / "usr/local/lib/systemd").exists()


def test_a_relative_unit_dir_is_refused(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = install(root, "--unit-dir", "lib/systemd/system", capsys=capsys)
    assert code == 1
    assert "absolute paths" in err
    assert not any(root.iterdir())


def test_a_directory_where_a_file_belongs_is_reported(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / UNIT).mkdir(parents=True)
    code, _, err = install(root, capsys=capsys)
    assert code == 1
    assert f"{root / UNIT} exists and is not a regular file" in err


def test_every_shipped_file_is_found_from_an_editable_install() -> None:
    for rel in SHIPPED:
        assert read_shipped(rel) == (REPO / rel).read_text(), rel
    with pytest.raises(ValueError, match="not one of the files faxd ships"):
        read_shipped("pyproject.toml")
