"""faxd pointed at the simulator: the one place that writes "the daemon's config for this simulator".

The tests, the benches and ``faxd demo`` all need a daemon talking to a :class:`~faxd.sim.Simulator`:
a ``ringcentral`` section with the simulator's URL and client id, the client secret and the JWT in
owner-only (0600) files, the store and the event socket in a work directory, no metrics listener.
:func:`config_data` builds that (as a YAML-ready dict), :func:`write_config` writes it as a file for
a daemon in a subprocess, :func:`load` parses it for one in this process. Paths in it are relative to
the work directory, where the file goes and against which it is parsed.

This module must not be imported by the daemon, its adapters or its clients (an import-linter
contract): the simulator is for trying faxd out, never part of running it. It must not start
anything either; callers own the simulator and the daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from faxd.config import Config, parse_config
from faxd.sim import SimConfig, Simulator

#: The secrets, each in a file of that name in the work directory.
SECRET_FILES = ("client_secret", "jwt")


def write_secrets(workdir: Path, credentials: SimConfig) -> None:
    """The client secret and the JWT of ``credentials`` in 0600 files in ``workdir``."""
    for name in SECRET_FILES:
        path = workdir / name
        # Created private, not chmod-ed afterwards: no moment in which others may read it.
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(getattr(credentials, name))


Sections = Mapping[str, Mapping[str, Any] | None]


def config_data(
    sim: Simulator | str | None,
    workdir: Path,
    *,
    defaults: Sections | None = None,
    **sections: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The config of a daemon for ``sim``, its secrets written into ``workdir``.

    ``sim``: a running simulator; a URL (a simulator with :class:`SimConfig`'s default credentials, such
    as ``faxd simulate``); None: those credentials and no ``server`` (RingCentral itself). ``defaults``
    (a caller's house settings), then each keyword, update a section key by key
    (``reconcile={"debounce": 0.05}``); None drops the section.
    """
    credentials = sim.config if isinstance(sim, Simulator) else SimConfig()
    write_secrets(workdir, credentials)
    ringcentral: dict[str, Any] = {
        "client_id": credentials.client_id,
        "client_secret": {"file": "client_secret"},
        "jwt": {"file": "jwt"},
    }
    if sim is not None:
        ringcentral = {"server": sim.url if isinstance(sim, Simulator) else sim, **ringcentral}
    data: dict[str, Any] = {
        "ringcentral": ringcentral,
        "store": {"path": "faxd.db"},
        "events": {"socket": "events.sock"},
        "metrics": {"listen": None},
    }
    for layer in (defaults or {}, sections):
        for key, value in layer.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = {**data.get(key, {}), **value}
    return data


def write_config(
    sim: Simulator | str | None,
    workdir: Path,
    *,
    name: str = "config.yaml",
    defaults: Sections | None = None,
    **sections: Mapping[str, Any] | None,
) -> Path:
    """:func:`config_data` as the YAML file ``workdir/name``; returns its path."""
    path = workdir / name
    data = config_data(sim, workdir, defaults=defaults, **sections)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(
    sim: Simulator,
    workdir: Path,
    *,
    defaults: Sections | None = None,
    **sections: Mapping[str, Any] | None,
) -> Config:
    """:func:`config_data` parsed, as a daemon in this process runs it."""
    data = config_data(sim, workdir, defaults=defaults, **sections)
    return parse_config(data, environ={}, base_dir=workdir)
