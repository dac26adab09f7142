"""A serial device on a pseudo-terminal that can be unplugged and plugged back in.

The emulators write to the master side; the agent opens the slave side (`.path`) with
pyserial, exactly as it would /dev/ttyUSB2. With `link` set, `.path` is that symlink and
replug() points it at a brand-new pty, as udev does for a re-enumerated USB modem. Called
without unplug() first, replug() moves the link at once and then closes the old pty, so the
path always opens while a reader of the old one gets EOF (a device that keeps dropping off).
"""

from __future__ import annotations

import os
import select
import threading
import tty
from pathlib import Path


class PtyDevice:
    """Base for the emulators: owns the pty and a thread calling `_step()` until stop()."""

    def __init__(self, link: str | Path | None = None, name: str = "pty-device"):
        self.link = Path(link) if link else None
        self.name = name
        self._master = self._slave = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plug()

    @property
    def path(self) -> str:
        """The device path to configure: the symlink if given, else the slave tty name."""
        return str(self.link) if self.link else self._tty

    def start(self) -> PtyDevice:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        self._unplug()
        if self.link and self.link.is_symlink():
            self.link.unlink()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def unplug(self) -> None:
        """The device vanishes: both pty ends close (the reader gets EIO) and the link goes."""
        self._unplug()
        if self.link and self.link.is_symlink():
            self.link.unlink()

    def replug(self) -> None:
        """A new pty appears (a different /dev/pts/N), the link points at it, the old one goes."""
        self._plug()

    def write(self, data: bytes) -> None:
        """Write raw bytes to the agent's side (ignored while unplugged)."""
        with self._lock:
            fd = self._master
            if fd < 0:
                return
            try:
                os.write(fd, data)
            except OSError:
                pass  # the agent's side is not open; a real UART drops bytes the same way

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation until pyserial configures it anyway
        with self._lock:
            old = (self._master, self._slave)
            self._master, self._slave = master, slave
            self._tty = os.ttyname(slave)
        if self.link:
            new = self.link.with_name(self.link.name + ".new")
            new.unlink(missing_ok=True)
            new.symlink_to(self._tty)
            os.replace(new, self.link)  # atomic: an open finds the old pty or the new one
        _close(old)

    def _unplug(self) -> None:
        with self._lock:
            fds = (self._master, self._slave)
            self._master = self._slave = -1
        _close(fds)

    def _read(self, timeout: float) -> bytes:
        """Bytes the agent wrote, waiting up to `timeout`; b"" when none or unplugged."""
        fd = self._master
        if fd < 0:
            self._stop.wait(timeout)
            return b""
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
            return os.read(fd, 4096) if ready else b""
        except (OSError, ValueError):  # closed under us by unplug()
            return b""

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._step()

    def _step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _close(fds) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
