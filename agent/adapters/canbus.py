"""One python-can bus per thread: open, read, reopen with backoff, count.

A bus that errors or disappears (a USB adapter unplugged, `ip link set can0 down`) is
closed, counted and reopened with exponential backoff; it never takes the agent down.
Frames go to `sink(frames)` from the reader thread, a list of (bus_index, t_seconds, can_id,
data) per burst: the reader drains what is waiting and hands it over at most every BURST_S,
so the core thread is woken some 100 times a second rather than once per frame (at 4,000
frames/s one wake-up per frame cost more CPU than decoding).

On SocketCAN the reader reads the socket itself (recvmsg, struct can_frame) instead of
python-can's recv(): no Message object per frame, and SO_RXQ_OVFL on, so the frames the
kernel dropped because the socket was full are counted (`kernel_drops`); python-can's own
capture_message accepts only the timestamp as ancillary data.

Listen-only: a bus that no command action (or diagnostics) writes to never carries a frame
from the agent: send() refuses, with a clear error, counted. python-can's socketcan has no
listen-only switch of its own; the kernel's is a link setting (README "Deploying":
`ip link set can0 type can bitrate 500000 listen-only on`), which then also keeps the
controller from acknowledging frames.
"""

from __future__ import annotations

import difflib
import logging
import select
import socket
import struct
import threading
import time
from typing import Callable, Iterable

import can

from ..config import BusConfig
from ..core.selection import EFF_FLAG
from ..errors import BusError, ConfigError
from .devicethread import DeviceThread

log = logging.getLogger("agent.canbus")

Frame = tuple[int, float, int, bytes]
Sink = Callable[[list[Frame]], None]
MAX_KERNEL_FILTERS = 512  # SocketCAN's CAN_RAW_FILTER_MAX
CLOCK_SKEW_S = 3600.0  # interfaces whose timestamps are not UTC (device uptime) get receive time
BURST_S = 0.01  # at most one hand-off to the core per this interval (the rest waits buffered)
BURST_MAX = 4096  # frames per hand-off
RCVBUF = 1 << 20  # bytes of socket receive buffer asked for (SocketCAN)

# SocketCAN, read directly (linux/can.h, socket(7)).
CAN_EFF_FLAG, CAN_RTR_FLAG, CAN_ERR_FLAG = 0x80000000, 0x40000000, 0x20000000
CANFD_MTU = 72
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
_HEAD = struct.Struct("=IB")  # can_id, len (DLC) of struct can_frame / canfd_frame
_TIMESPEC = struct.Struct("@ll")
_U32 = struct.Struct("=I")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_U32.size)
assert CAN_EFF_FLAG == EFF_FLAG  # a raw can_id is then already the core's can key


def raw_socket(bus) -> socket.socket | None:
    """The CAN_RAW socket of a python-can SocketCAN bus (None for any other interface), with
    SO_RXQ_OVFL turned on so the kernel reports the frames it dropped."""
    try:
        from can.interfaces.socketcan.socketcan import SocketcanBus
    except ImportError:  # not Linux
        return None
    if not isinstance(bus, SocketcanBus):
        return None
    sock = bus.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    except OSError as e:  # an old kernel: frames are still read, drops just not counted
        log.debug("SO_RXQ_OVFL not available: %s", e)
    # Room for the bursts between reads (and a GC or scheduling stall) rather than the
    # default ~200 KB, some 40 ms of a full bus; the kernel caps it at net.core.rmem_max.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    except OSError as e:
        log.debug("SO_RCVBUF: %s", e)
    return sock


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
        self.kernel_drops: int | None = None  # SocketCAN only: frames dropped in the kernel
        self._drops_before = 0  # of the sockets closed since start (the count is per socket)
        self._raw: socket.socket | None = None
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

    def set_filters(self, filters: list[dict] | None) -> None:
        """Replace the receive filters at run time (None: receive all); kept for reopens.
        On SocketCAN this sets the kernel filters of the open socket."""
        self.filters = filters
        bus = self._bus
        if bus is not None:
            try:
                bus.set_filters(filters)
            except (can.CanError, OSError, ValueError) as e:  # next reopen applies them
                log.warning("bus %s: cannot set receive filters: %s", self.cfg.name, e)

    # Drivers raise CanError, OSError, ValueError, ImportError...: every fault is retried.
    def _open(self) -> None:
        self._bus = self.open()
        self._raw = raw_socket(self._bus)
        if self._raw is not None and self.kernel_drops is None:
            self.kernel_drops = 0

    def _read_once(self) -> bool:
        frames: list[Frame] = []
        try:
            if self._raw is not None:
                self._read_raw(frames)
            else:
                self._read_bus(frames)
        finally:  # a read that failed halfway still hands over what it got
            if frames:
                self.sink(frames)
        if frames:  # what arrives meanwhile waits in the socket or driver buffer
            self._stop.wait(BURST_S)
        return True  # a quiet timeout is a working read too

    def _read_bus(self, out: list[Frame]) -> None:
        """Any python-can interface: block for one message, then take what is waiting."""
        recv = self._bus.recv
        msg = recv(timeout=0.2)
        index, now = self.index, time.time()
        lo, hi = now - CLOCK_SKEW_S, now + CLOCK_SKEW_S
        while msg is not None:
            if msg.is_error_frame:
                self.error_frames += 1
            elif not msg.is_remote_frame:
                t = msg.timestamp
                if not lo < t < hi:
                    t = now
                can_id = msg.arbitration_id | EFF_FLAG if msg.is_extended_id else msg.arbitration_id
                out.append((index, t, can_id, bytes(msg.data)))
                if len(out) >= BURST_MAX:
                    return
            msg = recv(timeout=0.0)

    def _read_raw(self, out: list[Frame]) -> None:
        """SocketCAN: wait for the socket, then recvmsg until it is empty."""
        sock = self._raw
        try:
            if not select.select((sock,), (), (), 0.2)[0]:
                return
        except (OSError, ValueError) as e:  # the interface went away
            raise can.CanOperationError(f"select failed: {e}") from e
        recv, head, timespec = sock.recvmsg, _HEAD.unpack_from, _TIMESPEC.unpack_from
        index, now = self.index, time.time()
        lo, hi = now - CLOCK_SKEW_S, now + CLOCK_SKEW_S
        drops = None
        while len(out) < BURST_MAX:
            try:
                cf, ancillary, _flags, _addr = recv(CANFD_MTU, _ANCILLARY, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            t = now
            for _level, kind, value in ancillary:
                if kind == SO_TIMESTAMPNS:
                    sec, ns = timespec(value)
                    t = sec + ns * 1e-9
                elif kind == SO_RXQ_OVFL:
                    drops = value
            can_id, size = head(cf)
            if can_id & (CAN_ERR_FLAG | CAN_RTR_FLAG):
                if can_id & CAN_ERR_FLAG:
                    self.error_frames += 1
                continue
            if not lo < t < hi:
                t = now
            out.append((index, t, can_id, cf[8:8 + size]))
        if drops is not None:  # the socket's running count, in the last frame's ancillary data
            self.kernel_drops = self._drops_before + _U32.unpack_from(drops)[0]

    def _close(self) -> None:
        if self._raw is not None:
            self._drops_before = self.kernel_drops or 0
            self._raw = None
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                bus.shutdown()
            except Exception as e:  # shutting down a vanished device may fail too
                log.debug("bus %s: shutdown: %s", self.cfg.name, e)

    def status(self) -> dict:
        return {"state": self.state, "bus_errors": self.errors, "reopens": self.reopens,
                "error_frames": self.error_frames, "kernel_drops": self.kernel_drops,
                "last_error": self.last_error,
                "interface": self.cfg.interface, "channel": self.cfg.channel,
                "listen_only": self.listen_only, "refused_sends": self.refused_sends}
