"""Runs a SimulatedVehicle on a python-can bus in a thread (in the agent or standalone)."""

from __future__ import annotations

import logging
import threading
import time

import can

from .vehicle import SimulatedVehicle

log = logging.getLogger("agent.sim")
STEP_S = 0.005


class SimulatorThread:
    def __init__(self, vehicle: SimulatedVehicle, interface: str, channel: str, **kwargs):
        self.vehicle = vehicle
        self.bus = can.Bus(interface=interface, channel=channel, **kwargs)
        self.frames_sent = 0
        self.send_errors = 0
        self.error: Exception | None = None  # what stopped the thread, if it crashed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def start(self) -> "SimulatorThread":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.bus.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.bus.recv(timeout=STEP_S)
                while msg is not None:  # react to every request before the next step
                    if not msg.is_error_frame:
                        self.vehicle.receive(msg.arbitration_id, bytes(msg.data))
                    msg = self.bus.recv(timeout=0)
                for can_id, data in self.vehicle.step(time.time()):
                    self.bus.send(can.Message(arbitration_id=can_id, data=data,
                                              is_extended_id=False))
                    self.frames_sent += 1
            except can.CanError as e:  # a bus that went down: keep the model running
                self.send_errors += 1
                if self.send_errors in (1, 10, 100) or self.send_errors % 1000 == 0:
                    log.warning("simulator: bus error (%d so far): %s", self.send_errors, e)
                self._stop.wait(0.1)
            except Exception as e:  # a bug in the model: say so once, loudly, and stop
                self.error = e
                log.error("simulator stopped: %s: %s", type(e).__name__, e,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                return
