"""One python-can bus per thread: open, read, reopen with backoff, count.

A bus that errors or disappears (a USB adapter unplugged, `ip link set can0 down`) is
closed, counted and reopened with exponential backoff; it never takes the agent down.
Frames go to `sink(bus_index, t_seconds, can_id, data)` from the reader thread.

Listen-only: a bus that no command action (or diagnostics) writes to never carries a frame
from the agent: send() refuses, with a clear error, counted. python-can's socketcan has no
listen-only switch of its own; the kernel's is a link setting (README "Deploying":
`ip link set can0 type can bitrate 500000 listen-only on`), which then also keeps the
controller from acknowledging frames.
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

    log = log

    def __init__(self, index: int, cfg: BusConfig, sink: Sink, filters: list[dict] | None = None,
                 backoff_s: float = 0.5, backoff_cap_s: float = 30.0,
                 listen_only: bool = False):
        super().__init__(f"bus {cfg.name}", f"{cfg.interface} {cfg.channel}", backoff_s,
                         backoff_cap_s)
        self.index = index
        self.cfg = cfg
        self.sink = sink
        self.filters = filters
        self.error_frames = 0
        self._bus: can.BusABC | None = None
        self.thread_name = f"can-{cfg.name}"
        self._send_lock = threading.Lock()
        self.listen_only = listen_only
        self.refused_sends = 0  # send() calls refused because the bus is listen-only

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
        if self.listen_only:
            self.refused_sends += 1
            raise BusError(f"bus {self.cfg.name}: listen-only, refusing to send (no command "
                           "action or diagnostics is configured for it; set listen_only = "
                           "false on the bus to allow writing)")
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
            self.errors += 1
            raise BusError(f"bus {self.cfg.name}: write failed: {e}") from e

    # Drivers raise CanError, OSError, ValueError, ImportError...: every fault is retried.
    def _open(self) -> None:
        self._bus = self.open()

    def _read_once(self) -> bool:
        msg = self._bus.recv(timeout=0.2)
        if msg is None:
            return True  # a quiet timeout is a working read too
        if msg.is_error_frame:
            self.error_frames += 1
            return True
        if msg.is_remote_frame:
            return True
        now = time.time()
        t = msg.timestamp
        if not (now - CLOCK_SKEW_S < t < now + CLOCK_SKEW_S):
            t = now
        can_id = msg.arbitration_id | EFF_FLAG if msg.is_extended_id else msg.arbitration_id
        self.sink(self.index, t, can_id, bytes(msg.data))
        return True

    def _close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as e:  # shutting down a vanished device may fail too
                log.debug("bus %s: shutdown: %s", self.cfg.name, e)

    def status(self) -> dict:
        return {"state": self.state, "bus_errors": self.errors, "reopens": self.reopens,
                "error_frames": self.error_frames, "last_error": self.last_error,
                "interface": self.cfg.interface, "channel": self.cfg.channel,
                "listen_only": self.listen_only, "refused_sends": self.refused_sends}
