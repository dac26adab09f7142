"""Listen-only on real SocketCAN: a bus that no action or diagnostics writes to never carries
a frame from the agent, watched by a raw CAN socket on the same interface (the VM tier)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from agent.app.runtime import Agent
from agent.config import config_from_dict
from agent.errors import BusError
from test_vcan import vcan  # noqa: F401  (autouse: vcan0/vcan1 up, or skip outside the VM)

pytestmark = pytest.mark.vcan

FRAME = struct.Struct("=IB3x8s")


class RawWatch:
    """Every frame on the interface, from any sender, via a raw AF_CAN socket."""

    def __init__(self, channel: str):
        self.sock = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
        self.sock.bind((channel,))
        self.sock.settimeout(0.05)
        self.ids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                can_id, _, _ = FRAME.unpack(self.sock.recv(16))
            except (socket.timeout, OSError):
                continue
            self.ids.append(can_id & 0x1FFFFFFF)

    def send(self, can_id: int, data: bytes) -> None:
        self.sock.send(FRAME.pack(can_id, len(data), data.ljust(8, b"\0")))

    def close(self):
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def test_listen_only_bus_never_carries_a_frame_from_the_agent(tmp_path, test_dbc):
    raw = {"vehicle": {"vin": "VIN0001"}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "pt", "interface": "socketcan", "channel": "vcan0",
                    "dbc": [str(test_dbc)]}],
           "telemetry": {"messages": ["*"], "max_batch_age_ms": 100}}
    batches = []
    agent = Agent(config_from_dict(raw, base=tmp_path), publish=False, on_batch=batches.append)
    watch = RawWatch("vcan0")
    feeder = RawWatch("vcan0")
    agent.start()
    try:
        assert agent.readers[0].wait_open(5) and agent.readers[0].listen_only
        for i in range(20):
            feeder.send(0x100, bytes([i, 0, 0, 0, 0, 0, 0, 0]))
            time.sleep(0.005)
        for _ in range(5):
            with pytest.raises(BusError, match="listen-only"):
                agent.readers[0].send(0x7E0, b"\x02\x01\x00")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and agent.bus_status()[0]["frames"] < 20:
            time.sleep(0.02)
        time.sleep(0.3)
        assert agent.bus_status()[0]["frames"] == 20  # it hears the bus ...
        assert set(watch.ids) == {0x100}  # ... and never speaks on it
        assert agent.bus_status()[0]["refused_sends"] == 5
    finally:
        agent.stop()
        watch.close()
        feeder.close()


def test_a_bus_set_writable_does_carry_frames(tmp_path, test_dbc):
    raw = {"vehicle": {"vin": "VIN0001"}, "storage": {"dir": str(tmp_path / "state")},
           "bus": [{"name": "pt", "interface": "socketcan", "channel": "vcan1",
                    "dbc": [str(test_dbc)], "listen_only": False}],
           "telemetry": {"messages": ["*"]}}
    agent = Agent(config_from_dict(raw, base=tmp_path), publish=False)
    watch = RawWatch("vcan1")
    agent.start()
    try:
        assert agent.readers[0].wait_open(5) and not agent.readers[0].listen_only
        agent.readers[0].send(0x7E0, b"\x02\x01\x00")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and 0x7E0 not in watch.ids:
            time.sleep(0.02)
        assert watch.ids == [0x7E0]  # the watch proves it would have seen ours
    finally:
        agent.stop()
        watch.close()
