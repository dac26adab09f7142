"""The bulk SocketCAN reader (recvmmsg) against the one-recvmsg-per-frame reader: the same
frames, timestamps, error frames and kernel drop counts, on the dgramcan stand-in (UDP on
127.0.0.1: the same ancillary data, SO_TIMESTAMPNS and SO_RXQ_OVFL, as CAN_RAW)."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from agent.adapters import rawcan
from agent.adapters.rawcan import RawReader
from support.dgramcan import can_frame, udp_drops, udp_pair

ERR, RTR, EFF = 0x20000000, 0x40000000, 0x80000000


def receiver(rcvbuf: int | None = None):
    rx, tx = udp_pair(rcvbuf=rcvbuf)
    rx.setsockopt(socket.SOL_SOCKET, rawcan.SO_TIMESTAMPNS, 1)
    rx.setsockopt(socket.SOL_SOCKET, rawcan.SO_RXQ_OVFL, 1)
    # The kernel turns receive timestamps on asynchronously: a datagram queued just after the
    # setsockopt may carry none (then it is stamped when read). One sent and read first.
    tx.send(can_frame(0x7FF, b""))
    time.sleep(0.05)
    rx.recv(64)
    return rx, tx


def read_all(reader: RawReader, limit: int = 100_000, now: float | None = None):
    out: list = []
    now = time.time() if now is None else now
    errors, drops = reader.read(7, out, limit, now - 3600, now + 3600, now)
    return out, errors, drops


def traffic() -> list[bytes]:
    frames = []
    for i in range(300):  # more than one recvmmsg call's worth (VLEN)
        frames.append(can_frame(0x100 + i % 40, bytes([i % 256]) * (i % 9)))
    frames.append(can_frame(ERR | 0x4, b"\0" * 8))
    frames.append(can_frame(RTR | 0x123, b""))
    frames.append(can_frame(EFF | 0x18DAF110, b"\xAA" * 8))
    return frames


def test_recvmmsg_is_available_here():
    assert rawcan._recvmmsg is not None  # else the bulk path below would not be exercised
    assert RawReader(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)).bulk


@pytest.mark.parametrize("bulk", [True, False])
def test_frames_flags_lengths_and_kernel_timestamps(bulk):
    rx, tx = receiver(rcvbuf=1 << 20)  # room for all of them
    try:
        before = time.time()
        sent = traffic()
        for f in sent:
            tx.send(f)
        time.sleep(0.05)
        reader = RawReader(rx, bulk=bulk)
        assert reader.bulk is bulk
        out, errors, drops = read_all(reader)
    finally:
        rx.close()
        tx.close()
    want = []
    for f in sent:
        can_id, size = struct.unpack_from("=IB", f)
        if not can_id & (ERR | RTR):
            want.append((7, can_id, f[8:8 + size]))
    assert [(i, c, d) for i, _t, c, d in out] == want
    assert errors == 1
    assert drops is None  # nothing dropped: the kernel sends no drop count
    stamps = [t for _i, t, _c, _d in out]
    assert all(before - 0.01 <= t <= before + 1 for t in stamps)
    assert stamps == sorted(stamps)


def test_bulk_and_per_frame_readers_agree_on_drops_and_limits():
    results = []
    for bulk in (True, False):
        rx, tx = receiver(rcvbuf=4096)
        port = rx.getsockname()[1]
        try:
            for i in range(400):  # the excess is dropped by the kernel, and counted
                tx.send(can_frame(0x200, i.to_bytes(2, "little")))
            dropped = udp_drops(port)
            reader = RawReader(rx, bulk=bulk)
            first, _, drops_first = read_all(reader, limit=3)  # the limit holds
            rest, _, drops = read_all(reader)
            tx.send(can_frame(0x201, b"\x01"))  # queued after the drops: carries the count
            time.sleep(0.05)
            last, _, drops_last = read_all(reader)
        finally:
            rx.close()
            tx.close()
        assert dropped and dropped > 100
        assert len(first) == 3
        assert len(first) + len(rest) == 400 - dropped
        assert drops_last == dropped
        results.append(([d for *_x, d in first + rest + last], drops_last))
    assert results[0] == results[1]


def test_a_timestamp_outside_the_window_takes_receive_time():
    rx, tx = receiver()
    try:
        tx.send(can_frame(0x300, b"\x01"))
        time.sleep(0.05)
        out: list = []
        far = time.time() + 10 * 3600  # the window (lo, hi) does not contain the kernel's stamp
        RawReader(rx).read(0, out, 10, far - 1, far + 1, far)
    finally:
        rx.close()
        tx.close()
    assert out == [(0, far, 0x300, b"\x01")]


def test_without_timestamps_frames_take_receive_time_not_stale_slots():
    rx, tx = receiver()
    try:
        reader = RawReader(rx)
        tx.send(can_frame(0x300, b"\x01"))
        time.sleep(0.05)
        read_all(reader)  # slots now hold a kernel timestamp
        rx.setsockopt(socket.SOL_SOCKET, rawcan.SO_TIMESTAMPNS, 0)
        tx.send(can_frame(0x301, b"\x02"))
        time.sleep(0.05)
        now = time.time() + 5
        out, _, _ = read_all(reader, now=now)
    finally:
        rx.close()
        tx.close()
    assert out == [(7, now, 0x301, b"\x02")]


def test_fd_slots_carry_64_byte_frames():
    rx, tx = receiver()
    try:
        payload = bytes(range(64))
        tx.send(struct.pack("=IB3x64s", 0x400, 64, payload))
        tx.send(struct.pack("=IB3x64s", 0x401, 12, payload[:12]))
        time.sleep(0.05)
        out, _, _ = read_all(RawReader(rx, fd=True))
    finally:
        rx.close()
        tx.close()
    assert [(c, d) for _i, _t, c, d in out] == [(0x400, payload), (0x401, payload[:12])]
