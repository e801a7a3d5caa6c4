"""The systemd side of the process: sd_notify(3) over ``$NOTIFY_SOCKET`` and sd_listen_fds(3).

`Notifier` sends READY, STATUS, WATCHDOG, STOPPING and RELOADING datagrams in a few lines instead of a
dependency, as systemd's own example does. Without ``$NOTIFY_SOCKET`` (not under systemd, or tests that
don't ask for it) every call is a no-op. `listen_fds` adopts sockets passed by socket activation
(``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``) and unsets those variables.

This module must not put secrets or phone numbers into a message: callers pass short status phrases,
and a STATUS value is cut to one line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import MutableMapping

SD_LISTEN_FDS_START = 3
_MAX_STATUS = 200


class Notifier:
    """One datagram per call to ``$NOTIFY_SOCKET``; see the module docstring."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            self._address = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            self._address = address
        self._watchdog: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the timeout, as sd_watchdog_enabled(3) advises.
            self._watchdog = int(usec) / 2e6
        self._sock: socket.socket | None = None
        self.last_status = ""

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings, or None when systemd's watchdog is off."""
        return self._watchdog if self.enabled else None

    def send(self, *lines: str) -> None:
        if self._address is None:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # systemd gone or its socket full: nothing a daemon can do about it, so don't die of it.
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(lines).encode(), self._address)

    def _status(self, status: str) -> str:
        text = " ".join(status.split())[:_MAX_STATUS]  # one line: a newline would start a new field
        self.last_status = text
        return f"STATUS={text}"

    def ready(self, status: str) -> None:
        self.send("READY=1", self._status(status))

    def status(self, status: str) -> None:
        """STATUS= only when it differs from the last one sent."""
        if " ".join(status.split())[:_MAX_STATUS] != self.last_status:
            self.send(self._status(status))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self, status: str = "reloading configuration") -> None:
        # MONOTONIC_USEC is required by Type=notify-reload (systemd >= 253); older versions ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", self._status(status))

    def stopping(self) -> None:
        self.send("STOPPING=1", self._status("stopping: draining the reconcile queue"))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by ``FileDescriptorName=`` (unnamed: "unknown").

    Empty unless ``$LISTEN_PID`` is this process. The three variables are removed either way, so a
    child process cannot mistake the sockets for its own.
    """
    env = os.environ if environ is None else environ
    pid, count, names = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", ""), env.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count.isdigit():
        return {}
    labels = names.split(":") if names else []
    found: dict[str, socket.socket] = {}
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
        found[labels[i] if i < len(labels) and labels[i] else "unknown"] = sock
    return found
