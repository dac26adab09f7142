"""One python-can bus per thread: open, read, reopen with backoff, count.

A bus that errors or disappears (a USB adapter unplugged, `ip link set can0 down`) is
closed, counted and reopened with exponential backoff; it never takes the agent down.
Frames go to `sink(frames)` from the reader thread, a list of (bus_index, t_seconds, can_id,
data) per hand-off. The reader lets frames gather in the socket or driver buffer and hands
them over at most every `burst_s`: BURST_S (100 ms) normally, BUSY_BURST_S (2 ms) while a
command waits for the bus's answer (`set_busy`). Waking a thread costs more than decoding a
frame, and a thread woken every 10 ms finds its caches cold: per frame, the core cost 5.8 µs
fed 40 frames every 10 ms against 2.1 µs fed 400 every 100 ms (same frames, same code).

On SocketCAN the reader reads the socket itself (`rawcan.py`: recvmmsg, struct can_frame)
instead of python-can's recv(): no Message object per frame, up to 64 frames per system call,
and SO_RXQ_OVFL on, so the frames the kernel dropped because the socket was full are counted
(`kernel_drops`); python-can's own capture_message accepts only the timestamp as ancillary
data. How long frames may wait in the socket is bounded by its receive buffer: the reader
reads at least as often as half the buffer fills at the rate it measured (`read_pace`).
Other interfaces are read every READ_S (their driver buffers are unknown; a tty holds 4 KB).

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
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

import can

from ..config import BusConfig
from ..core.selection import EFF_FLAG
from ..errors import BusError, ConfigError
from .devicethread import DeviceThread

if TYPE_CHECKING:
    from .rawcan import RawReader

log = logging.getLogger("agent.canbus")

Frame = tuple[int, float, int, bytes]
Sink = Callable[[list[Frame]], None]
MAX_KERNEL_FILTERS = 512  # SocketCAN's CAN_RAW_FILTER_MAX
CLOCK_SKEW_S = 3600.0  # interfaces whose timestamps are not UTC (device uptime) get receive time
BURST_S = 0.1  # at most one hand-off to the core per this interval (the rest waits buffered)
BUSY_BURST_S = 0.002  # the same while a command waits for the bus (set_busy)
READ_S = 0.01  # interfaces other than SocketCAN: read this often, hand off by burst_s
BURST_MAX = 4096  # frames per hand-off
RCVBUF = 1 << 20  # bytes of socket receive buffer asked for (SocketCAN)
# python-can interfaces that filter in software, testing each filter against each frame: the
# reader filters them by id instead (kernel and hardware filters stay with the driver).
SOFTWARE_FILTERS = frozenset({"slcan", "virtual", "serial", "udp_multicast"})
FRAME_TRUESIZE = 2048  # kernel bytes a queued frame may take of the receive buffer (at most)

CAN_EFF_FLAG = 0x80000000
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
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


def accepted(filters: list[dict] | None) -> set[int] | None:
    """The can keys receive_filters() lets through, as a set (None: all)."""
    if not filters:
        return None
    return {f["can_id"] | EFF_FLAG if f.get("extended") else f["can_id"] for f in filters}


def check_interface(cfg: BusConfig, where: str) -> None:
    """Raise ConfigError now for an interface python-can does not know (not a retryable fault)."""
    known = sorted(can.interfaces.VALID_INTERFACES)
    if cfg.interface not in known:
        close = difflib.get_close_matches(cfg.interface, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}.interface: unknown python-can interface {cfg.interface!r} "
                          f"(known: {', '.join(known)}){hint}")


def read_pace(capacity: int, rate: float, burst_s: float) -> float:
    """Seconds the reader may leave frames in a socket that holds `capacity` frames (0:
    unknown) arriving at `rate` frames/s: at most half full, at most burst_s, at least 1 ms."""
    if capacity <= 0 or rate <= 0:
        return burst_s
    return max(0.001, min(burst_s, 0.5 * capacity / rate))


class BusReader(DeviceThread):
    """Reads one bus in a daemon thread. Thread-safe counters for status displays."""

    log = log

    def __init__(self, index: int, cfg: BusConfig, sink: Sink, filters: list[dict] | None = None,
                 backoff_s: float = 0.5, backoff_cap_s: float = 30.0,
                 listen_only: bool = False, burst_s: float = BURST_S,
                 busy_burst_s: float = BUSY_BURST_S):
        super().__init__(f"bus {cfg.name}", f"{cfg.interface} {cfg.channel}", backoff_s,
                         backoff_cap_s)
        self.index = index
        self.cfg = cfg
        self.sink = sink
        self.filters = filters
        self.error_frames = 0
        self.kernel_drops: int | None = None  # SocketCAN only: frames dropped in the kernel
        self._drops_before = 0  # of the sockets closed since start (the count is per socket)
        self._raw: RawReader | None = None
        self._accept: set[int] | None = None  # can keys let through when filtered here
        self._soft = False  # the interface filters in software: we filter (by id) instead
        self._capacity = 0  # frames the socket's receive buffer holds (0: unknown)
        self.idle_burst_s, self.busy_burst_s = burst_s, busy_burst_s
        self.burst_s = burst_s
        self._pending: list[Frame] = []  # read, not handed over yet
        self._handoff_at = 0.0  # monotonic time the pending frames are due
        self._last_read = time.monotonic()
        self._wake = threading.Event()  # set_busy() and stop() cut a wait short
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
        if self.cfg.interface == "slcan":  # python-can's, read in chunks (adapters/slcan.py)
            from .slcan import BufferedSlcanBus
            return BufferedSlcanBus(channel=self.cfg.channel, **kwargs)
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
        if bus is not None and self._soft:  # filtered here, not by python-can
            self._accept = accepted(filters)
        elif bus is not None:
            try:
                bus.set_filters(filters)
            except (can.CanError, OSError, ValueError) as e:  # next reopen applies them
                log.warning("bus %s: cannot set receive filters: %s", self.cfg.name, e)

    def set_busy(self, busy: bool) -> None:
        """A command waits for the bus's answer (busy): hand frames over every BUSY_BURST_S
        rather than every BURST_S, starting now. Any thread."""
        self.burst_s = self.busy_burst_s if busy else self.idle_burst_s
        if busy:
            self._handoff_at = min(self._handoff_at, time.monotonic() + self.burst_s)
            self._wake.set()  # a reader waiting out a long pace reads and hands over now

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        super().stop(timeout)

    # Drivers raise CanError, OSError, ValueError, ImportError...: every fault is retried.
    def _open(self) -> None:
        self._bus = self.open()
        self._soft = self.cfg.interface in SOFTWARE_FILTERS
        self._accept = accepted(self.filters) if self._soft else None
        if self._soft and self.filters:
            self._bus.set_filters(None)
        sock = raw_socket(self._bus)
        self._raw = None
        if sock is not None:  # ctypes and libc's recvmmsg only where they are used
            from .rawcan import RawReader
            self._raw = RawReader(sock, fd=self.cfg.fd)
        if sock is not None:
            if self.kernel_drops is None:
                self.kernel_drops = 0
            try:  # what the kernel granted (it caps the request at net.core.rmem_max)
                rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            except OSError:
                rcvbuf = 0
            self._capacity = max(1, rcvbuf // FRAME_TRUESIZE) if rcvbuf else 0

    def _read_once(self) -> bool:
        frames = self._pending
        got = len(frames)
        try:
            if self._raw is not None:
                self._read_raw(frames)
            else:
                self._read_bus(frames)
        except BaseException:  # a read that failed halfway still hands over what it got
            self._handoff(frames)
            raise
        got = len(frames) - got
        now = time.monotonic()
        if frames and (now >= self._handoff_at or len(frames) >= BURST_MAX):
            self._handoff(frames)
        if got:  # what arrives meanwhile waits in the socket or driver buffer
            since, self._last_read = now - self._last_read, now
            pace = read_pace(self._capacity, got / since if since > 0 else 0.0, self.burst_s)
            if self._raw is None:
                pace = min(pace, READ_S)
            if self._pending:
                pace = min(pace, max(0.0, self._handoff_at - now))
            if pace > 0 and self._wake.wait(pace):
                self._wake.clear()
        return True  # a quiet timeout is a working read too

    def _handoff(self, frames: list[Frame]) -> None:
        self._pending = []
        self._handoff_at = time.monotonic() + self.burst_s
        if frames:
            self.sink(frames)

    def _wait_s(self) -> float:
        """How long a read may block for the first frame: until pending frames are due."""
        if self._pending:
            return max(0.0, min(0.2, self._handoff_at - time.monotonic()))
        return 0.2

    def _read_bus(self, out: list[Frame]) -> None:
        """Any python-can interface: block for one message, then take what is waiting."""
        recv = self._bus.recv
        msg = recv(timeout=self._wait_s())
        index, now, accept = self.index, time.time(), self._accept
        lo, hi = now - CLOCK_SKEW_S, now + CLOCK_SKEW_S
        while msg is not None:
            if msg.is_error_frame:
                self.error_frames += 1
            elif not msg.is_remote_frame:
                t = msg.timestamp
                if not lo < t < hi:
                    t = now
                can_id = msg.arbitration_id | EFF_FLAG if msg.is_extended_id else msg.arbitration_id
                if accept is not None and can_id not in accept:
                    msg = recv(timeout=0.0)
                    continue
                out.append((index, t, can_id, bytes(msg.data)))
                if len(out) >= BURST_MAX:
                    return
            msg = recv(timeout=0.0)

    def _read_raw(self, out: list[Frame]) -> None:
        """SocketCAN: wait for the socket, then read until it is empty."""
        sock = self._raw.sock
        try:
            if not select.select((sock,), (), (), self._wait_s())[0]:
                return
        except (OSError, ValueError) as e:  # the interface went away
            raise can.CanOperationError(f"select failed: {e}") from e
        now = time.time()
        errors, drops = self._raw.read(self.index, out, BURST_MAX, now - CLOCK_SKEW_S,
                                       now + CLOCK_SKEW_S, now)
        self.error_frames += errors
        if drops is not None:  # the socket's running count, in the last frame's ancillary data
            self.kernel_drops = self._drops_before + drops

    def _close(self) -> None:
        if self._pending:  # frames read before a fault or a stop are handed over, not lost
            self._handoff(self._pending)
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
