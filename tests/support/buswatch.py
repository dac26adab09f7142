"""Every frame on a python-can virtual bus, recorded: what the agent sends and what the EV sends."""

from __future__ import annotations

import threading
import time

import can

REQUEST_IDS = (0x5A0, 0x5A1)  # the demo EV's TCU_ChargeRequest and TCU_LockRequest

class BusWatch:
    """Records every frame on the virtual bus (what the agent sends, what the EV sends)."""

    def __init__(self, channel: str):
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.frames: list[tuple[float, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self.bus.recv(0.05)
            if msg is not None:
                self.frames.append((time.monotonic(), msg.arbitration_id, bytes(msg.data)))

    def requests_since(self, t: float) -> list:
        return [f for f in self.frames if f[0] >= t and f[1] in REQUEST_IDS]

    def close(self):
        self._stop.set()
        self._thread.join(1)
        self.bus.shutdown()
