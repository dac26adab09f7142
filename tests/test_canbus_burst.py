"""The bus reader hands the core lists of frames, at most one per BURST_S; on SocketCAN it reads
the socket itself and counts the kernel's drops (SO_RXQ_OVFL). The SocketCAN path runs on the
dgramcan stand-in: python-can's SocketcanBus over a UDP socket on 127.0.0.1, whose kernel
drops and counts datagrams that do not fit the receive buffer as it does for CAN_RAW."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import can
import pytest

from agent.adapters.canbus import BURST_S, BusReader
from agent.config import BusConfig
from agent.core.selection import EFF_FLAG
from support import dgramcan
from support.dgramcan import can_frame, udp_drops, udp_pair

dgramcan.register()


class Sink:
    def __init__(self):
        self.calls: list[tuple[float, list]] = []
        self.cond = threading.Condition()

    def __call__(self, frames):
        with self.cond:
            self.calls.append((time.monotonic(), frames))
            self.cond.notify_all()

    @property
    def frames(self):
        return [f for _, fs in self.calls for f in fs]

    def wait(self, n: int, timeout: float = 10.0) -> list:
        with self.cond:
            self.cond.wait_for(lambda: len(self.frames) >= n, timeout)
        return self.frames


def reader(interface: str, channel: str, sink) -> BusReader:
    cfg = BusConfig("b", interface, channel, (Path("unused.dbc"),), filters=False)
    return BusReader(2, cfg, sink)


def test_virtual_bus_frames_come_in_lists_at_most_one_per_burst_interval():
    channel = f"burst-{time.monotonic_ns()}"
    sink = Sink()
    r = reader("virtual", channel, sink)
    r.start()
    try:
        assert r.wait_open(5)
        with can.Bus(interface="virtual", channel=channel) as tx:
            for i in range(600):
                tx.send(can.Message(arbitration_id=0x100 + i % 50, data=bytes([i % 256]) * 8,
                                    is_extended_id=False))
                if i % 100 == 99:
                    time.sleep(0.002)
            tx.send(can.Message(arbitration_id=0x1ABCDE, data=b"\x01", is_extended_id=True))
        frames = sink.wait(601)
    finally:
        r.stop()
    assert len(frames) == 601
    assert [f[2] for f in frames[:600]] == [0x100 + i % 50 for i in range(600)]  # in order
    assert frames[-1][2] == 0x1ABCDE | EFF_FLAG and frames[-1][3] == b"\x01"
    assert all(f[0] == 2 and type(f[3]) is bytes for f in frames)
    assert len(sink.calls) < 601 / 4  # bursts, not one hand-off per frame
    gaps = [b[0] - a[0] for a, b in zip(sink.calls, sink.calls[1:])]
    assert min(gaps) >= BURST_S * 0.9


def test_socketcan_raw_path_reads_frames_flags_and_timestamps():
    rx, tx = udp_pair()
    sink = Sink()
    r = reader("dgramcan", f"fd:{rx.fileno()}", sink)
    r.start()
    try:
        assert r.wait_open(5)
        assert r._raw is not None  # the SocketCAN path, not python-can's recv()
        before = time.time()
        tx.send(can_frame(0x123, b"\x01\x02\x03"))
        tx.send(can_frame(0x20000004, b"\0" * 8))  # an error frame: counted, not handed on
        tx.send(can_frame(0x40000123, b""))  # a remote frame: skipped
        tx.send(can_frame(0x18DAF110 | 0x80000000, b"\xAA" * 8))
        frames = sink.wait(2)
        after = time.time()
        status = r.status()
    finally:
        r.stop()
        rx.close()
        tx.close()
    assert [(f[0], f[2], f[3]) for f in frames] == [(2, 0x123, b"\x01\x02\x03"),
                                                    (2, 0x18DAF110 | EFF_FLAG, b"\xAA" * 8)]
    assert all(before - 0.01 <= f[1] <= after for f in frames)  # the kernel's receive time
    assert status["error_frames"] == 1
    assert status["kernel_drops"] == 0


def test_frames_the_kernel_dropped_are_counted():
    rx, tx = udp_pair(rcvbuf=4096)  # a small buffer: most of a burst cannot wait in it
    port = rx.getsockname()[1]
    sink = Sink()
    r = reader("dgramcan", f"fd:{rx.fileno()}", sink)
    try:
        for i in range(500):  # the reader is not running yet: the kernel drops the excess
            tx.send(can_frame(0x100, i.to_bytes(2, "little")))
        dropped = udp_drops(port)
        assert dropped and dropped > 100
        r.start()
        assert r.wait_open(5)
        sink.wait(500 - dropped, timeout=5)
        time.sleep(0.05)
        tx.send(can_frame(0x101, b"\x01"))  # carries the running count after the drops
        sink.wait(500 - dropped + 1, timeout=5)
        time.sleep(0.05)
        assert len(sink.frames) == 500 - dropped + 1
        assert r.status()["kernel_drops"] == dropped
    finally:
        r.stop()
        rx.close()
        tx.close()


def test_the_drop_count_survives_a_reopen():
    rx, tx = udp_pair(rcvbuf=4096)
    sink = Sink()
    r = reader("dgramcan", f"fd:{rx.fileno()}", sink)
    try:
        for i in range(300):
            tx.send(can_frame(0x100, i.to_bytes(2, "little")))
        dropped = udp_drops(rx.getsockname()[1])
        r._open()
        got: list = []
        while len(got) < 300 - dropped:
            r._read_raw(got)
        tx.send(can_frame(0x101, b"\x01"))  # queued after SO_RXQ_OVFL: carries the count
        while len(got) < 300 - dropped + 1:
            r._read_raw(got)
        assert r.kernel_drops == dropped
        r._close()
        assert r.kernel_drops == dropped  # kept across the close
    finally:
        r._close()
        rx.close()
        tx.close()


@pytest.mark.parametrize("frames_per_read", [1, 4096])
def test_runtime_takes_list_items(frames_per_read, tmp_path):
    """The core thread feeds a list item as a burst of frames, in order, with tuples and
    other items around it (what _drain and _take get from the queue)."""
    from agent.app.runtime import Agent
    from agent.config import load_config

    dbc = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kona_ev.dbc"
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(f"""
[vehicle]
vin = "V1"
[[bus]]
name = "b"
interface = "virtual"
channel = "list-{time.monotonic_ns()}"
dbc = ["{dbc}"]
[telemetry]
messages = ["*"]
[storage]
dir = "{tmp_path / 'state'}"
""")
    agent = Agent(load_config(str(cfg_path)), publish=False)
    key = next(iter(agent.plans[0].selected))
    length = agent.plans[0].selected[key].message.length
    t = time.time()
    burst = [(0, t, key, bytes([i]) * length) for i in range(min(frames_per_read, 200))]
    agent._frames.put(burst)
    agent._frames.put((0, t, key, b"\xff" * length))
    agent._frames.put([(0, t, 0x7FE, b"")])
    agent._take(agent._frames.get())
    agent._drain()
    c = agent.core.counters[0]
    assert c.frames == len(burst) + 2
    assert c.unknown_ids == 1
    assert agent.core.last_frame(0, key) == b"\xff" * length


def test_status_shows_kernel_drops_only_where_the_interface_counts_them():
    from agent.cli.status import render

    bus = {"name": "b", "state": "open", "interface": "socketcan", "channel": "can0",
           "frames": 10, "fps": 1.0, "unknown_ids": 0, "decode_errors": 0, "bad_length": 0,
           "bus_errors": 0, "reopens": 0}
    assert "kernel drops 7" in render({"buses": [{**bus, "kernel_drops": 7}]})
    assert "kernel drops" not in render({"buses": [{**bus, "kernel_drops": None}]})


def test_read_pace_keeps_the_socket_at_most_half_full():
    from agent.adapters.canbus import read_pace

    assert read_pace(0, 4000.0, 0.1) == 0.1  # capacity unknown: the hand-off interval
    assert read_pace(1000, 0.0, 0.1) == 0.1  # nothing arriving yet
    assert read_pace(1000, 4000.0, 0.1) == 0.1  # 400 frames wait, the socket holds 1000
    assert read_pace(200, 4000.0, 0.1) == pytest.approx(0.025)  # 100 of 200 then
    assert read_pace(10, 1e6, 0.1) == 0.001  # never a busy loop


def slow_reader(rx, sink, idle_s: float) -> BusReader:
    cfg = BusConfig("b", "dgramcan", f"fd:{rx.fileno()}", (Path("unused.dbc"),), filters=False)
    return BusReader(2, cfg, sink, burst_s=idle_s, busy_burst_s=0.01)


def test_frames_wait_for_the_hand_off_interval_unless_a_command_is_busy():
    rx, tx = udp_pair()
    sink = Sink()
    r = slow_reader(rx, sink, idle_s=1.5)
    r.start()
    try:
        assert r.wait_open(5)
        tx.send(can_frame(0x100, b"\x01"))  # the first frame after a quiet spell: at once
        sink.wait(1)
        sent = time.monotonic()
        tx.send(can_frame(0x100, b"\x02"))  # within the idle interval: it waits for it
        time.sleep(0.3)
        assert len(sink.frames) == 1
        r.set_busy(True)  # a command waits for the bus: what is read is handed over now
        frames = sink.wait(2, timeout=2)
        assert len(frames) == 2 and time.monotonic() - sent < 2.0
        handed = time.monotonic()
        tx.send(can_frame(0x100, b"\x03"))  # while busy: within the busy interval
        frames = sink.wait(3, timeout=2)
        assert len(frames) == 3 and time.monotonic() - handed < 1.0
        r.set_busy(False)
        time.sleep(0.05)
        tx.send(can_frame(0x100, b"\x04"))  # the busy interval is over: handed over at once
        sink.wait(4, timeout=2)
        sent = time.monotonic()
        tx.send(can_frame(0x100, b"\x05"))
        time.sleep(0.3)
        assert len(sink.frames) == 4  # idle again: waits for the long interval
        sink.wait(5, timeout=10)
        assert time.monotonic() - sent >= 1.0
    finally:
        r.stop()
        rx.close()
        tx.close()
    assert [f[3] for f in sink.frames] == [b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"]


def test_frames_read_but_not_handed_over_are_not_lost_when_the_bus_closes():
    rx, tx = udp_pair(rcvbuf=8192)  # a small socket: read often, hand over once a second
    sink = Sink()
    r = slow_reader(rx, sink, idle_s=30.0)
    try:
        r._open()
        assert r._capacity >= 1
        tx.send(can_frame(0x100, b"\x01"))
        tx.send(can_frame(0x100, b"\x02"))
        r._handoff_at = time.monotonic() + 30  # as after a hand-off
        while len(r._pending) < 2:
            r._read_once()
        assert sink.frames == []
        r._close()  # a fault or a stop: what was read goes on
    finally:
        r._close()
        rx.close()
        tx.close()
    assert [f[3] for f in sink.frames] == [b"\x01", b"\x02"]
