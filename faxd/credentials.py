"""What `faxd check-config` can say about `{credential: NAME}` secrets from a shell.

Under the unit, systemd decrypts each credential into `$CREDENTIALS_DIRECTORY` and faxd reads it there.
From a shell that directory does not exist, so the value cannot be checked; what can be checked is the
file faxd.service loads it from (`/etc/credstore.encrypted/faxd.NAME` for LoadCredentialEncrypted=,
`/etc/credstore/faxd.NAME` for LoadCredential=): whether it is there and who may read it. This module
also writes the `systemd-run` command that checks the config with the unit's credentials.

This module must not read a credential's content, decrypt anything, or call systemd: it only stats.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass

#: Where faxd.service loads credentials from (its LoadCredentialEncrypted= lines; a test pins them).
ENCRYPTED_STORE = "/etc/credstore.encrypted"
PLAIN_STORE = "/etc/credstore"
MIN_SYSTEMD_ENCRYPTED = 250
"""LoadCredentialEncrypted= and systemd-creds exist since systemd 250."""


@dataclass(frozen=True)
class CredentialFile:
    """Where the unit would load one credential from, and how `LoadCredential*=` names it."""

    setting: str  # "LoadCredentialEncrypted" or "LoadCredential"
    path: str


def unit_files(name: str, stores: tuple[str, str] = (ENCRYPTED_STORE, PLAIN_STORE)) -> list[CredentialFile]:
    encrypted, plain = stores
    return [
        CredentialFile("LoadCredentialEncrypted", os.path.join(encrypted, f"faxd.{name}")),
        CredentialFile("LoadCredential", os.path.join(plain, f"faxd.{name}")),
    ]


def inspect(
    name: str, stores: tuple[str, str] = (ENCRYPTED_STORE, PLAIN_STORE)
) -> tuple[CredentialFile | None, str]:
    """The file the unit would load credential `name` from (None if none was found) and one line
    about it: found with its mode and owner, too open, missing, or not inspectable without root."""
    denied: list[str] = []
    for candidate in unit_files(name, stores):
        try:
            st = os.stat(candidate.path)
        except FileNotFoundError:
            continue
        except PermissionError:
            denied.append(os.path.dirname(candidate.path))
            continue
        except OSError as e:
            return candidate, f"cannot inspect {candidate.path}: {e.strerror}"
        if not stat.S_ISREG(st.st_mode):
            return candidate, f"{candidate.path} is not a regular file"
        mode = stat.S_IMODE(st.st_mode)
        where = f"{candidate.path} (mode {mode:04o}, uid {st.st_uid})"
        if mode & 0o077:
            plain = candidate.setting == "LoadCredential"
            risk = "anyone in its group or others can read the secret" if plain else "keep it root-only"
            return candidate, f"{where} is accessible by group or others ({risk}): chmod 600 {candidate.path}"
        if st.st_uid != 0:
            return candidate, f"{where} is not owned by root: chown root: {candidate.path}"
        return candidate, f"{where} is there; its content is checked only under the unit"
    paths = " nor ".join(c.path for c in unit_files(name, stores))
    if denied:
        return None, f"cannot look into {', '.join(dict.fromkeys(denied))} (permission denied): run as root"
    return None, f"neither {paths} exists (the unit loads it from there)"


def systemd_run_command(
    found: Sequence[tuple[str, CredentialFile | None]], config_path: str, faxd: Sequence[str]
) -> str:
    """`systemd-run` running `faxd check-config` with the credentials loaded as faxd.service does."""
    argv = ["systemd-run", "--quiet", "--pipe", "--wait", "--collect", "-p", "DynamicUser=yes"]
    for name, file in found:
        file = file or unit_files(name)[0]
        argv += ["-p", f"{file.setting}={name}:{file.path}"]
    argv += [*faxd, "check-config", "-c", config_path]
    return shlex.join(argv)
