"""``faxd install-service``: install the systemd units, the sysusers file, the example config, the alert
rules and the operations guide from the installed faxd package, with no source tree.

Two halves. The planning half is pure (no file system, no environment): :func:`render` turns the shipped
texts into the files to write, with ``ExecStart=`` naming the ``faxd`` executable of the running
installation, and :func:`plan` decides, from what is already on disk, what to do with each file. The I/O
half (:func:`find_faxd_executable`, :func:`survey`, :func:`apply`) reads and writes files and nothing
else; :func:`install` wires the two and reports to the administrator.

Each file faxd owns (units, sysusers, rules, guide) is written with a stamp: the sha256 of the rest of
the file. On a later run a file holding exactly what would be written is "unchanged"; a file whose stamp
still matches its content was written by some faxd and left alone since, so an upgrade "updates" it; any
other content is an administrator's edit, which only ``--force`` overwrites. The config is the
administrator's: written only where none exists, never overwritten, not even with ``--force``.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO
from urllib.parse import quote

from faxd.shipped import SHIPPED, ShippedFileMissing, read_shipped

UNIT_DIR = PurePosixPath("/usr/local/lib/systemd/system")
SYSUSERS_DIR = PurePosixPath("/usr/local/lib/sysusers.d")
TMPFILES_DIR = PurePosixPath("/usr/local/lib/tmpfiles.d")
CONFIG_PATH = PurePosixPath("/etc/faxd/config.yaml")
SHARE_DIR = PurePosixPath("/usr/local/share/faxd")
DOC_DIR = PurePosixPath("/usr/local/share/doc/faxd")

# Under the unit's ProtectHome=yes and PrivateTmp=yes the service cannot see these: a faxd installed
# there (pipx as root puts it under /root/.local) would fail to start with status 203/EXEC.
HIDDEN_FROM_SERVICE = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")

UNIT_HEADER = (
    "# Installed by `faxd install-service` from the faxd package. Running it again after an upgrade\n"
    "# updates this file unless it was edited: keep local changes in a drop-in (systemctl edit {name}).\n"
)
FILE_HEADER = (
    "# Installed by `faxd install-service` from the faxd package. Running it again after an upgrade\n"
    "# updates this file unless it was edited.\n"
)
STAMP = "faxd-install-service sha256:"
_STAMP_LINE = re.compile(r"^(?:# |<!-- )faxd-install-service sha256:([0-9a-f]{64})(?: -->)?\n", re.M)


class InstallError(Exception):
    """The installation cannot go ahead; the message says why and what to do."""


class Kind(enum.Enum):
    OWNED = "owned"  # faxd's file: updated while nobody edits it; an edited one only with --force
    SEED = "seed"  # the administrator's file once written: written only where none exists


class Verdict(enum.Enum):
    CREATE = "created"
    UNCHANGED = "unchanged"
    UPDATE = "updated"  # written by an earlier faxd and not edited since
    OVERWRITE = "replaced"  # --force over a file that differed
    CONFLICT = "differs"
    KEEP = "kept"  # the config exists: it is never overwritten


@dataclass(frozen=True)
class Layout:
    """Where the files go on the target system (absolute paths, before any ``--root``)."""

    unit_dir: PurePosixPath = UNIT_DIR
    sysusers_dir: PurePosixPath = SYSUSERS_DIR
    tmpfiles_dir: PurePosixPath = TMPFILES_DIR
    config_path: PurePosixPath = CONFIG_PATH
    share_dir: PurePosixPath = SHARE_DIR
    doc_dir: PurePosixPath = DOC_DIR


@dataclass(frozen=True)
class FileToWrite:
    path: PurePosixPath  # on the target system
    content: str
    kind: Kind


@dataclass(frozen=True)
class Action:
    file: FileToWrite
    verdict: Verdict
    existing: str | None

    @property
    def writes(self) -> bool:
        return self.verdict in (Verdict.CREATE, Verdict.UPDATE, Verdict.OVERWRITE)

    def diff(self) -> str:
        """The change this action's file would undergo, as a unified diff (installed -> packaged)."""
        return "".join(
            difflib.unified_diff(
                (self.existing or "").splitlines(keepends=True),
                self.file.content.splitlines(keepends=True),
                fromfile=f"{self.file.path} (installed)",
                tofile=f"{self.file.path} (from faxd)",
            )
        )


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]

    @property
    def conflicts(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.verdict is Verdict.CONFLICT)

    @property
    def writes(self) -> tuple[Action, ...]:
        # Nothing is written while any file conflicts: an upgrade half done is worse than none.
        return () if self.conflicts else tuple(a for a in self.actions if a.writes)


# ---------------------------------------------------------------------------------------- planning (pure)


def sysusers_dir_for(unit_dir: PurePosixPath) -> PurePosixPath:
    """The sysusers.d of the same tree: /etc/systemd/system -> /etc/sysusers.d,
    /usr/local/lib/systemd/system -> /usr/local/lib/sysusers.d."""
    if unit_dir.parts[-2:] != ("systemd", "system"):
        raise InstallError(
            f"cannot tell which sysusers.d goes with the unit directory {unit_dir}: pass --sysusers-dir"
        )
    return unit_dir.parent.parent / "sysusers.d"


def tmpfiles_dir_for(unit_dir: PurePosixPath) -> PurePosixPath:
    """The tmpfiles.d of the same tree as the units (/etc/tmpfiles.d, /usr/local/lib/tmpfiles.d)."""
    if unit_dir.parts[-2:] != ("systemd", "system"):
        return TMPFILES_DIR
    return unit_dir.parent.parent / "tmpfiles.d"


def systemd_quote(word: str) -> str:
    """One word of an ExecStart= command line, quoted for systemd (specifiers and variables escaped)."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_exec_start(unit: str, executable: str) -> str:
    """The unit with ``ExecStart=``'s program replaced by ``executable`` (its arguments kept)."""
    pattern = re.compile(r"^(ExecStart=[-@:+!]*)(\S+)", re.M)
    if len(pattern.findall(unit)) != 1:
        raise InstallError("the packaged faxd.service must have exactly one ExecStart= line")
    return pattern.sub(lambda m: m[1] + systemd_quote(executable), unit)


def set_documentation(unit: str, guide: PurePosixPath) -> str:
    """Point ``Documentation=file://.../operations.md`` at the installed copy of the guide."""
    return re.sub(
        r"^(Documentation=.*?)file://\S*/operations\.md",
        lambda m: m[1] + "file://" + quote(str(guide)),
        unit,
        flags=re.M,
    )


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def stamped(header: str, body: str) -> str:
    """``header``, the stamp line (the sha256 of ``body``), then ``body``."""
    return f"{header}# {STAMP}{_digest(body)}\n{body}"


def stamped_markdown(body: str) -> str:
    return f"<!-- {STAMP}{_digest(body)} -->\n{body}"


def pristine(text: str) -> bool:
    """True if ``text`` carries a stamp that matches what follows it: nobody edited it since faxd wrote it."""
    match = _STAMP_LINE.search(text)
    return match is not None and _digest(text[match.end() :]) == match[1]


def render(sources: Mapping[str, str], executable: str, layout: Layout) -> list[FileToWrite]:
    """The files to install, from the shipped texts (keyed by their path in faxd/shipped.py)."""
    guide = layout.doc_dir / "operations.md"

    def unit(name: str) -> str:
        text = set_documentation(sources[f"systemd/{name}"], guide)
        if name == "faxd.service":
            text = set_exec_start(text, executable)
        return stamped(UNIT_HEADER.format(name=name), text)

    def owned(path: PurePosixPath, content: str) -> FileToWrite:
        return FileToWrite(path, content, Kind.OWNED)

    return [
        owned(layout.unit_dir / "faxd.service", unit("faxd.service")),
        owned(layout.unit_dir / "faxd.socket", unit("faxd.socket")),
        owned(
            layout.sysusers_dir / "faxd.conf",
            stamped(FILE_HEADER, sources["systemd/sysusers.d/faxd.conf"]),
        ),
        owned(
            layout.tmpfiles_dir / "faxd.conf",
            stamped(FILE_HEADER, sources["systemd/tmpfiles.d/faxd.conf"]),
        ),
        FileToWrite(layout.config_path, sources["config.yaml"], Kind.SEED),
        owned(
            layout.share_dir / "faxd-rules.yml",
            stamped(FILE_HEADER, sources["contrib/prometheus/faxd-rules.yml"]),
        ),
        # Markdown: the stamp is an HTML comment, invisible on the rendered page.
        owned(guide, stamped_markdown(sources["docs/operations.md"])),
    ]


def plan(files: Iterable[FileToWrite], existing: Mapping[PurePosixPath, str | None], *, force: bool) -> Plan:
    """What to do with each file, given the current content of each target (None: absent)."""
    actions = []
    for f in files:
        current = existing.get(f.path)
        if current is None:
            verdict = Verdict.CREATE
        elif f.kind is Kind.SEED:
            verdict = Verdict.KEEP
        elif current == f.content:
            verdict = Verdict.UNCHANGED
        elif pristine(current):
            verdict = Verdict.UPDATE
        else:
            verdict = Verdict.OVERWRITE if force else Verdict.CONFLICT
        actions.append(Action(f, verdict, current))
    return Plan(tuple(actions))


def hidden_from_service(executable: str) -> str | None:
    """The directory that hides ``executable`` from the hardened unit, if any."""
    for top in HIDDEN_FROM_SERVICE:
        if executable == top or executable.startswith(top + "/"):
            return top
    return None


def next_steps(layout: Layout, executable: str) -> str:
    """What the administrator does once the files are in place."""
    config = layout.config_path
    store = "/etc/credstore.encrypted"
    return f"""\
Next steps (the guide: {layout.doc_dir / "operations.md"}):
  1. systemd-sysusers        # creates the group faxd-clients, whose members may use the event socket
     systemd-tmpfiles --create faxd.conf   # creates /run/faxd for the socket (at boot systemd does it)
  2. $EDITOR {config}  # at least ringcentral.client_id
  3. the app's two secrets, encrypted for the unit (guide, section 2):
       install -d -m 0700 {store}
       read -rs JWT && printf %s "$JWT" | systemd-creds encrypt --name=ringcentral-jwt - \\
           {store}/faxd.ringcentral-jwt
       read -rs SECRET && printf %s "$SECRET" | systemd-creds encrypt --name=ringcentral-client-secret - \\
           {store}/faxd.ringcentral-client-secret
  4. {executable} check-config -c {config}
  5. systemctl daemon-reload
  6. systemctl enable --now faxd.socket faxd.service
  7. systemctl status faxd   # the STATUS line says whether the WebSocket is up
Prometheus: add {layout.share_dir / "faxd-rules.yml"} to rule_files (guide, section 5).
"""


# ---------------------------------------------------------------------------------------- I/O


def find_faxd_executable() -> str:
    """The ``faxd`` command of the installation running this code (its venv's, pipx's, ...)."""
    seen = []
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        candidate = Path(sysconfig.get_path("scripts", scheme)) / "faxd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        seen.append(str(candidate))
    raise InstallError(
        f"cannot find the faxd command of this installation ({sys.prefix}); looked for "
        + " and ".join(seen)
        + ": install faxd with pip or pipx so that it has one"
    )


def load_sources() -> dict[str, str]:
    """Every shipped file's text, from the installed package (or the checkout of an editable install)."""
    return {name: read_shipped(name) for name in SHIPPED}


def under_root(root: Path, path: PurePosixPath) -> Path:
    return root / path.relative_to("/")


def survey(root: Path, files: Iterable[FileToWrite]) -> dict[PurePosixPath, str | None]:
    """The current content of each target under ``root`` (None where there is no file)."""
    found: dict[PurePosixPath, str | None] = {}
    for f in files:
        path = under_root(root, f.path)
        if not path.exists():
            found[f.path] = None
        elif not path.is_file():
            raise InstallError(f"{path} exists and is not a regular file: move it away and run again")
        else:
            try:
                found[f.path] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                found[f.path] = "\ufffd"  # not ours, whatever it is: compares as edited
    return found


def _makedirs(path: Path) -> None:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        # Readable by the service's dynamic user whatever root's umask is (/etc/faxd must be).
        directory.chmod(0o755)


def apply(root: Path, the_plan: Plan) -> None:
    """Write the plan's files under ``root``, each atomically (a reader sees the old or the new)."""
    for action in the_plan.writes:
        target = under_root(root, action.file.path)
        _makedirs(target.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(action.file.content)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------------- the command


def _advice(action: Action) -> str:
    if action.file.path.suffix in (".service", ".socket"):
        return (
            f"move your changes into a drop-in (systemctl edit {action.file.path.name}), then run "
            "`faxd install-service --force` to replace the file with faxd's"
        )
    return (
        "save your changes elsewhere, then run `faxd install-service --force` to replace the file with faxd's"
    )


def install(
    *,
    root: Path | None,
    unit_dir: str,
    sysusers_dir: str | None,
    force: bool,
    version: str,
    out: TextIO,
    err: TextIO,
) -> int:
    """``faxd install-service``: 0 when every file is in place, 1 with the reason on stderr otherwise."""
    target_root = root or Path("/")
    try:
        units = PurePosixPath(unit_dir)
        if not units.is_absolute() or (sysusers_dir and not PurePosixPath(sysusers_dir).is_absolute()):
            raise InstallError("--unit-dir and --sysusers-dir take absolute paths (use --root to stage)")
        layout = Layout(
            unit_dir=units,
            sysusers_dir=PurePosixPath(sysusers_dir) if sysusers_dir else sysusers_dir_for(units),
            tmpfiles_dir=tmpfiles_dir_for(units),
        )
        executable = find_faxd_executable()
        hidden = hidden_from_service(executable)
        if hidden and root is None:
            raise InstallError(
                f"{executable} is under {hidden}, which faxd.service hides from the daemon (ProtectHome=, "
                "PrivateTmp=): install faxd outside it, e.g. `python3 -m venv /opt/faxd` or "
                "`pipx install --global faxd`, and run that installation's `faxd install-service`"
            )
        files = render(load_sources(), executable, layout)
        the_plan = plan(files, survey(target_root, files), force=force)
        if the_plan.conflicts:
            for action in the_plan.conflicts:
                err.write(
                    f"faxd install-service: {under_root(target_root, action.file.path)} has local changes "
                    f"(it is not as faxd install-service left it); faxd {version} would change it so:\n"
                    f"{action.diff()}  -> {_advice(action)}\n"
                )
            err.write("faxd install-service: nothing was written.\n")
            return 1
        apply(target_root, the_plan)
    except (InstallError, ShippedFileMissing) as exc:
        err.write(f"faxd install-service: {exc}\n")
        return 1
    except OSError as exc:
        err.write(
            f"faxd install-service: {exc.filename}: {exc.strerror} (run as root, or stage with --root DIR)\n"
        )
        return 1
    out.write(f"faxd {version}: service files for ExecStart={executable}\n")
    width = max(len(v.value) for v in Verdict)
    for action in the_plan.actions:
        note = "  (exists: faxd never overwrites a config)" if action.verdict is Verdict.KEEP else ""
        out.write(f"  {action.verdict.value:<{width}}  {under_root(target_root, action.file.path)}{note}\n")
    if hidden:
        out.write(f"warning: {executable} is under {hidden}, which faxd.service hides from the daemon\n")
    if root is not None:
        out.write(f"Staged under {root}; on the target system:\n")
    out.write(next_steps(layout, executable))
    return 0
