"""One device loop for the adapters that own a device in a thread (CAN bus, modem, GNSS).

A template method, in the way of python-can's `BusABC.recv` over `_recv_internal`: this class
owns the thread, the open / back-off / reopen loop, the state, the fault counters and the
log-once; a subclass implements only

  _open()       open the device or raise one of `faults` (or Unresponsive)
  _read_once()  one bounded read (at most a few tenths of a second); True when the device
                proved to work, which restarts the backoff; raise to have it closed and reopened
  _close()      close whatever is open; idempotent, and it must not raise

State: "closed" (not started, or stopped), "open", "down" (an I/O fault; reopening with
backoff), "unresponsive" (there but not answering); a subclass may add its own while open
(GNSS: "silent").
"""

from __future__ import annotations

import logging
import threading
import time


class Unresponsive(Exception):
    """The device is there but does not answer (a mute modem): closed and reopened like any
    fault, with state "unresponsive"; not counted as an I/O error."""


class Stopped(Exception):
    """Raised from a blocking step once stop() was called: the loop ends at once."""


class DeviceThread:
    thread_name = "device"
    ready_states: tuple[str, ...] = ("open",)
    faults: tuple[type[Exception], ...] = (Exception,)  # what _open/_read_once may raise
    log = logging.getLogger("agent.device")

    def __init__(self, label: str, where: str, backoff_s: float = 0.5,
                 backoff_cap_s: float = 30.0):
        self.label = label  # for log lines: "<label>: open failed on <where>: ..."
        self.where = where
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.state = "closed"
        self.errors = 0  # I/O faults on open or read (subclasses may count more)
        self.opens = 0
        self.reopens = 0
        self.last_error = ""
        self._logged = ""  # the fault last logged: each distinct one once, again once it worked
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- for subclasses -------------------------------------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _read_once(self) -> bool:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------

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

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        faults = (Unresponsive, *self.faults)
        delay = self.backoff_s
        opened = failed = False
        while not self._stop.is_set():
            try:
                if not opened:
                    what = "open"
                    self._open()
                    opened = True
                    self.opens += 1
                    if failed:
                        self.reopens += 1
                        self.log.info("%s: reopened %s", self.label, self.where)
                    failed = False
                    self.state = "open"
                what = "read"
                if self._read_once():
                    delay = self.backoff_s  # it works: the next fault starts the backoff afresh
                    self._logged = ""
                continue
            except Stopped:
                return
            except faults as e:
                if self._stop.is_set():
                    return
                self._fault(what, e)
            self._close()  # also after a failed open: it may have got halfway
            opened, failed = False, True
            # Also after a read fault: a device that opens fine and then fails its first read
            # (a down SocketCAN interface, a flapping USB port) would otherwise spin.
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff_cap_s)

    def _fault(self, what: str, e: Exception) -> None:
        if isinstance(e, Unresponsive):
            self.state = "unresponsive"
            text = str(e)
        else:
            self.errors += 1
            self.state = "down"
            text = describe(e)
        self.last_error = text
        if text != self._logged:  # each distinct fault once, not every retry
            self._logged = text
            self.log.warning("%s: %s failed on %s: %s", self.label, what, self.where, text)


def describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
