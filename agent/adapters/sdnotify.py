"""systemd's notify protocol (sd_notify(3)) without a dependency, and a liveness watchdog.

`Notifier` sends datagrams to $NOTIFY_SOCKET (a path, or "@name" for an abstract socket):
READY=1 once the agent works, WATCHDOG=1 while it is healthy, STOPPING=1 on shutdown,
STATUS=... for `systemctl status`. Without NOTIFY_SOCKET (not started by systemd, tests, a
shell) every call is a no-op. Send errors are logged once and never raised: the service
manager going away must not stop the agent.

`Watchdog` ties the pings to the core loop's progress: the core thread calls `kick()` on
every iteration; the main thread calls `ping()` at least every `interval_s` and sends
WATCHDOG=1 only if the core loop kicked since the previous ping (within the interval), so a
stalled core loop stops the pings and systemd restarts the service (WatchdogSec=).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("agent.sdnotify")


def watchdog_interval_s(env: dict | None = None) -> float | None:
    """Half of systemd's watchdog timeout in seconds (how often to ping), or None when the
    watchdog is off, WATCHDOG_USEC is malformed, or WATCHDOG_PID names another process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1e6 / 2  # ping twice per timeout, as sd_watchdog_enabled(3) advises


class Notifier:
    """sd_notify(3) client. Thread-safe; every method is a no-op without NOTIFY_SOCKET."""

    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET") or ""
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()  # abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; ignored", raw)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of KEY=VALUE lines. True if sent (False when disabled/failed)."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self.address)
                self._failed = False
                return True
            except OSError as e:
                if not self._failed:  # once per outage, not every ping
                    log.warning("sd_notify to %r failed: %s", self.address, e)
                self._failed = True
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def power(self, state: str, reason: str) -> bool:
        """STATUS= for `systemctl status`: the vehicle's power state (README "Power")."""
        return self.status(f"power {state}: {reason}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """WATCHDOG=1 pings that stop when the loop being watched stops making progress.

    `kick()` (the watched loop, any thread, cheap) records progress; `ping()` (the main
    thread, at least every `interval_s`) sends WATCHDOG=1 only if a kick happened within the
    last `interval_s`. `interval_s` defaults to watchdog_interval_s(); None disables it.
    """

    def __init__(self, notifier: Notifier, interval_s: float | None = None,
                 clock=time.monotonic):
        self.notifier = notifier
        self.interval_s = interval_s
        self._clock = clock
        self._last_kick = clock()
        self.pings = 0
        self.missed = 0

    @classmethod
    def from_env(cls, notifier: Notifier, env: dict | None = None) -> "Watchdog":
        return cls(notifier, watchdog_interval_s(env))

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None and self.notifier.enabled

    def kick(self) -> None:
        self._last_kick = self._clock()  # one float store: safe without a lock

    def healthy(self) -> bool:
        if self.interval_s is None:
            return True
        return self._clock() - self._last_kick <= self.interval_s

    def ping(self) -> bool:
        """Send WATCHDOG=1 if the watched loop kicked recently. True if a ping was sent."""
        if not self.enabled:
            return False
        if not self.healthy():
            self.missed += 1
            if self.missed == 1:
                log.error("core loop stalled for %.1f s: withholding watchdog pings "
                          "(systemd will restart the agent)", self._clock() - self._last_kick)
            return False
        if self.missed:
            log.warning("core loop resumed after %d missed watchdog ping(s)", self.missed)
            self.missed = 0
        sent = self.notifier.watchdog()
        self.pings += sent
        return sent

    def wait_s(self, default: float = 1.0) -> float:
        """How long the main thread may sleep between ping() calls."""
        return min(default, self.interval_s / 2) if self.enabled else default
