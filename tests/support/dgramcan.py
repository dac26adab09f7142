"""A SocketCAN stand-in for kernels without CAN (this machine, most CI): python-can's own
SocketcanBus on a datagram socket (UDP on 127.0.0.1) instead of an AF_CAN one.

The feeder writes one `struct can_frame` (16 bytes, exactly what the kernel hands a CAN_RAW
socket) per datagram; the bus reads from a socket it gets as a file descriptor (channel
"fd:N", inherited by an agent process or from the same process). Everything above the
socket is python-can's socketcan code (`_recv_internal`: select, then `capture_message`:
recvmsg, `dissect_can_frame`, the SO_TIMESTAMPNS timestamp) or the agent's own raw reader,
and the kernel behaves as it does for CAN_RAW where it matters here: a full receive buffer
drops datagrams silently, counted in the socket's drop counter that SO_RXQ_OVFL reports.
What differs from real SocketCAN: no kernel receive filters (python-can filters in
software), and the timestamp is taken when the datagram is queued, not by the CAN driver.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import can
from can import CanProtocol
from can.interfaces.socketcan import constants
from can.interfaces.socketcan.socketcan import SocketcanBus

FRAME = struct.Struct("=IB3x8s")  # struct can_frame: can_id, len, pad, data[8]


def can_frame(can_id: int, data: bytes) -> bytes:
    """The 16 bytes of a classic CAN frame; can_id carries the EFF/RTR/ERR flags."""
    return FRAME.pack(can_id, len(data), bytes(data))


class DgramCanBus(SocketcanBus):
    def __init__(self, channel: str = "", can_filters=None, **kwargs):
        if not channel.startswith("fd:"):
            raise can.CanInitializationError(f"dgramcan channel must be fd:N, not {channel!r}")
        # A dup: closing this bus (a reopen) leaves the original descriptor usable.
        self.socket = socket.socket(fileno=os.dup(int(channel[3:])))
        self.channel = channel
        self.channel_info = f"dgramcan {channel}"
        self._bcm_sockets = {}
        self._is_filtered = False
        self._task_id = 0
        self._task_id_guard = threading.Lock()
        self._can_protocol = CanProtocol.CAN_20
        self.socket.setsockopt(socket.SOL_SOCKET, constants.SO_TIMESTAMPNS, 1)
        can.BusABC.__init__(self, channel=channel, can_filters=can_filters, **kwargs)

    def _apply_filters(self, filters) -> None:
        self._is_filtered = False  # no CAN_RAW_FILTER on this socket: python-can filters instead


def register() -> None:
    """Make interface "dgramcan" known to python-can in this process."""
    can.interfaces.BACKENDS["dgramcan"] = (__name__, "DgramCanBus")
    can.interfaces.VALID_INTERFACES = frozenset(can.interfaces.BACKENDS)
    can.util.VALID_INTERFACES = can.interfaces.VALID_INTERFACES  # can.Bus checks this copy


def udp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(receiver, sender) UDP sockets on 127.0.0.1, the sender connected to the receiver."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf is not None:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return rx, tx


def udp_drops(port: int) -> int | None:
    """The kernel's drop count of the UDP socket bound to 127.0.0.1:port (/proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == want:
                return int(parts[-1])
    return None
