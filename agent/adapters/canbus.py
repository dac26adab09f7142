"""One python-can bus per thread: open, read, reopen with backoff, count.

A bus that errors or disappears (a USB adapter unplugged, `ip link set can0 down`) is
closed, counted and reopened with exponential backoff; it never takes the agent down.
Frames go to `sink(bus_index, t_seconds, can_id, data)` from the reader thread.
"""

from __future__ import annotations

import difflib
import logging
import threading
import time
from typing import Callable, Iterable

import can

from ..config import BusConfig
from ..core.selection import EFF_FLAG
from ..errors import BusError, ConfigError
from .devicethread import DeviceThread

log = logging.getLogger("agent.canbus")

Sink = Callable[[int, float, int, bytes], None]
MAX_KERNEL_FILTERS = 512  # SocketCAN's CAN_RAW_FILTER_MAX
CLOCK_SKEW_S = 3600.0  # interfaces whose timestamps are not UTC (device uptime) get receive time


def receive_filters(keys: Iterable[int]) -> list[dict] | None:
    """python-can filters for exactly these can keys, or None (receive all) if too many."""
    keys = sorted(set(keys))
    if not keys or len(keys) > MAX_KERNEL_FILTERS:
        return None
    return [{"can_id": k & 0x1FFFFFFF, "can_mask": 0x1FFFFFFF if k & EFF_FLAG else 0x7FF,
             "extended": bool(k & EFF_FLAG)} for k in keys]


def check_interface(cfg: BusConfig, where: str) -> None:
    """Raise ConfigError now for an interface python-can does not know (not a retryable fault)."""
    known = sorted(can.interfaces.VALID_INTERFACES)
    if cfg.interface not in known:
        close = difflib.get_close_matches(cfg.interface, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}.interface: unknown python-can interface {cfg.interface!r} "
                          f"(known: {', '.join(known)}){hint}")


class BusReader(DeviceThread):
    """Reads one bus in a daemon thread. Thread-safe counters for status displays."""

    def __init__(self, index: int, cfg: BusConfig, sink: Sink, filters: list[dict] | None = None,
                 backoff_s: float = 0.5, backoff_cap_s: float = 30.0):
        self.index = index
        self.cfg = cfg
        self.sink = sink
        self.filters = filters
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.bus_errors = 0
        self.error_frames = 0
        self.reopens = 0
        self.opens = 0
        self.last_error = ""
        self._bus: can.BusABC | None = None
        self.thread_name = f"can-{cfg.name}"
        self._init_thread()
        self._send_lock = threading.Lock()

    # -- I/O ------------------------------------------------------------------------------

    def open(self) -> can.BusABC:
        kwargs = dict(self.cfg.options)
        if self.cfg.bitrate:
            kwargs["bitrate"] = self.cfg.bitrate
        if self.cfg.fd:
            kwargs["fd"] = True
        if self.filters:
            kwargs["can_filters"] = self.filters
        return can.Bus(interface=self.cfg.interface, channel=self.cfg.channel, **kwargs)

    def send(self, can_id: int, data: bytes, timeout: float = 0.2) -> None:
        """Write one frame. Raises BusError when the bus is down or the write fails."""
        bus = self._bus
        if bus is None:
            raise BusError(f"bus {self.cfg.name}: not open ({self.last_error or self.state})")
        msg = can.Message(arbitration_id=can_id & 0x1FFFFFFF, data=data,
                          is_extended_id=bool(can_id & EFF_FLAG),
                          is_fd=self.cfg.fd and len(data) > 8)
        try:
            with self._send_lock:
                bus.send(msg, timeout=timeout)
        except (can.CanError, OSError, ValueError) as e:
            self.bus_errors += 1
            raise BusError(f"bus {self.cfg.name}: write failed: {e}") from e

    def _run(self) -> None:
        delay = self.backoff_s
        failed = False
        while not self._stop.is_set():
            if self._bus is None:
                try:
                    self._bus = self.open()
                except Exception as e:  # drivers raise CanError, OSError, ValueError, ImportError...
                    self._fault("open", e)
                    failed = True
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff_cap_s)
                    continue
                self.opens += 1
                if failed:
                    self.reopens += 1
                    log.info("bus %s: reopened on %s", self.cfg.name, self.cfg.channel)
                failed = False
                self.state = "open"
            try:
                msg = self._bus.recv(timeout=0.2)
            except Exception as e:
                self._fault("read", e)
                self._close()
                failed = True
                # A down SocketCAN interface opens fine and then fails the first read: back
                # off here too, or the loop spins at hundreds of errors a second.
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_cap_s)
                continue
            delay = self.backoff_s  # a read worked (a frame or a quiet timeout): healthy
            if msg is None:
                continue
            if msg.is_error_frame:
                self.error_frames += 1
                continue
            if msg.is_remote_frame:
                continue
            now = time.time()
            t = msg.timestamp
            if not (now - CLOCK_SKEW_S < t < now + CLOCK_SKEW_S):
                t = now
            can_id = msg.arbitration_id | EFF_FLAG if msg.is_extended_id else msg.arbitration_id
            self.sink(self.index, t, can_id, bytes(msg.data))

    def _fault(self, what: str, e: Exception) -> None:
        self.bus_errors += 1
        self.state = "down"
        text = f"{type(e).__name__}: {e}"
        if text != self.last_error:  # log each distinct fault once, not every retry
            log.warning("bus %s: %s failed on %s %s: %s", self.cfg.name, what,
                        self.cfg.interface, self.cfg.channel, text)
        self.last_error = text

    def _close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as e:  # shutting down a vanished device may fail too
                log.debug("bus %s: shutdown: %s", self.cfg.name, e)
        if self.state == "open":
            self.state = "down"

    def status(self) -> dict:
        return {"state": self.state, "bus_errors": self.bus_errors, "reopens": self.reopens,
                "error_frames": self.error_frames, "last_error": self.last_error,
                "interface": self.cfg.interface, "channel": self.cfg.channel}
