"""The lifecycle shared by the adapters that own a device in a thread (CAN bus, modem, GNSS):
start a daemon thread running `_run`, stop it and close the device, wait until it is usable."""

from __future__ import annotations

import threading
import time


class DeviceThread:
    thread_name = "device"
    ready_states: tuple[str, ...] = ("open",)

    def _init_thread(self) -> None:
        self.state = "closed"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (returns at once; the device opens in the background)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        self._close()
        self.state = "closed"

    def wait_open(self, timeout: float) -> bool:
        """True once the device is usable (one of `ready_states`) within `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.state not in self.ready_states:
            time.sleep(0.01)
        return self.state in self.ready_states

    def _run(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError
