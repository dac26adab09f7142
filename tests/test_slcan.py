"""slcan read in chunks (adapters/slcan.py) on a pseudo-terminal: every frame, in order,
across writes that split a message, with error replies and remote frames among them; and
receive filters applied by id in the reader (python-can's own are a scan per frame)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from agent.adapters.canbus import BusReader, receive_filters
from agent.adapters.slcan import BufferedSlcanBus
from agent.config import BusConfig
from agent.core.selection import EFF_FLAG


def slcan_line(can_id: int, data: bytes, extended: bool = False) -> bytes:
    head = f"T{can_id:08X}" if extended else f"t{can_id:03X}"
    return f"{head}{len(data)}{data.hex().upper()}\r".encode()


class Sink:
    def __init__(self):
        self.frames: list = []
        self.lock = threading.Lock()

    def __call__(self, frames):
        with self.lock:
            self.frames.extend(frames)

    def wait(self, n: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.frames) < n:
            time.sleep(0.01)
        return list(self.frames)


def open_reader(tmp_path: Path, sink, filters=None):
    master, slave = os.openpty()
    cfg = BusConfig("s", "slcan", os.ttyname(slave), (tmp_path / "unused.dbc",),
                    options=(("sleep_after_open", 0),))
    r = BusReader(0, cfg, sink, filters)
    r.start()
    assert r.wait_open(5)
    return r, master, slave


def drain(master: int) -> None:
    """Read what the bus wrote to the adapter (its open commands), so the tty never fills."""
    os.set_blocking(master, False)
    try:
        while os.read(master, 4096):
            pass
    except BlockingIOError:
        pass
    os.set_blocking(master, True)


def test_the_buffered_bus_is_what_the_reader_opens(tmp_path):
    r, master, slave = open_reader(tmp_path, Sink())
    try:
        assert type(r._bus) is BufferedSlcanBus
    finally:
        r.stop()
        os.close(master)
        os.close(slave)


def test_every_frame_in_order_across_split_writes(tmp_path):
    sink = Sink()
    r, master, slave = open_reader(tmp_path, sink)
    try:
        drain(master)
        want = []
        stream = b""
        for i in range(3000):
            data = bytes([i % 256, i // 256]) * (1 + i % 4)
            stream += slcan_line(0x100 + i % 64, data)
            want.append((0x100 + i % 64, data))
            if i % 500 == 0:
                stream += b"\a"  # an error reply among the frames
                stream += b"r1230\r"  # a remote frame: not telemetry
        stream += slcan_line(0x18DAF110, b"\xAA" * 8, extended=True)
        want.append((0x18DAF110 | EFF_FLAG, b"\xAA" * 8))
        for start in range(0, len(stream), 997):  # chunks that cut messages in two
            os.write(master, stream[start:start + 997])
        got = sink.wait(len(want))
    finally:
        r.stop()
        os.close(master)
        os.close(slave)
    assert [(c, d) for _b, _t, c, d in got] == want


def test_receive_filters_are_a_lookup_by_id_in_the_reader(tmp_path):
    sink = Sink()
    r, master, slave = open_reader(tmp_path, sink, receive_filters([0x100, 0x18DAF110 | EFF_FLAG]))
    try:
        assert r._soft and r._bus.filters is None  # python-can's software scan is off
        drain(master)
        os.write(master, slcan_line(0x100, b"\x01") + slcan_line(0x200, b"\x02")
                 + slcan_line(0x18DAF110, b"\x03", extended=True) + slcan_line(0x100, b"\x04"))
        got = sink.wait(3)
        time.sleep(0.1)
        r.set_filters(receive_filters([0x200]))  # at run time (campaigns)
        os.write(master, slcan_line(0x100, b"\x05") + slcan_line(0x200, b"\x06"))
        got = sink.wait(4)
        time.sleep(0.1)
    finally:
        r.stop()
        os.close(master)
        os.close(slave)
    assert [(c, d) for _b, _t, c, d in sink.frames] == [
        (0x100, b"\x01"), (0x18DAF110 | EFF_FLAG, b"\x03"), (0x100, b"\x04"), (0x200, b"\x06")]
