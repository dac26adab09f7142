"""A simulated electric vehicle on dbc/demo_ev.dbc. Sans-I/O: time and frames are passed in.

ECUs (VCU, BMS, OBC, BCM) send their status messages at the DBC cycle times; the charger and
the body controller react to the telematics unit's requests after realistic delays, and refuse
what a real car refuses: no charging without a cable, out of P or with a charger fault, no
unlocking while moving. While `drive` is on the speed follows a repeating urban drive cycle.
Request frames with a wrong checksum are ignored (counted), as a real ECU would.
Asleep (`asleep = true` in a timeline) every ECU stops sending; a network-management frame
(NM_TCU) wakes them, as does `asleep = false`. `battery_v` is the 12 V battery the body
controller reports (BCM_Status.BatteryVoltage); a timeline may let it sag.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cantools

from ..resources import demo_dbc


CAPACITY_KWH = 64.0
REACTION_S = 0.3  # ECU reaction to a request
LOCK_REACTION_S = 0.2
MAX_ACCEL_MS2 = 3.0  # how fast the speed may follow the cycle (above all of its slopes)
BRAKE_MS2 = 2.5  # stopping when the drive ends

# The urban drive cycle, from a standstill: (target km/h, m/s2 to get there, then hold s).
DRIVE_CYCLE = ((0, 0.0, 4), (50, 1.5, 12), (0, 2.0, 5), (40, 1.5, 8), (30, 1.0, 6),
               (60, 1.2, 10), (0, 2.0, 0))

# What a timeline entry may change (the keys SimulatorConfig accepts).
TIMELINE_KEYS = ("soc", "speed_kph", "charge_limit", "plugged", "locked", "drive", "fault",
                 "driver_door_open", "gear", "asleep", "battery_v")


def _cycle_points(cycle) -> list[tuple[float, float]]:
    """(t, km/h) corners of the cycle's piecewise-linear speed trace."""
    t, v, points = 0.0, 0.0, [(0.0, 0.0)]
    for target, accel, hold in cycle:
        if target != v:
            t += abs(target - v) / 3.6 / accel
            v = target
            points.append((t, v))
        if hold:
            t += hold
            points.append((t, v))
    return points


_POINTS = _cycle_points(DRIVE_CYCLE)
_TIMES = [t for t, _ in _POINTS]
CYCLE_S = _TIMES[-1]


def cycle_speed(t: float) -> float:
    """Speed (km/h) of the drive cycle `t` seconds after it started; it repeats."""
    t %= CYCLE_S
    i = bisect.bisect_right(_TIMES, t)
    (t0, v0), (t1, v1) = _POINTS[i - 1], _POINTS[min(i, len(_POINTS) - 1)]
    return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)


@dataclass
class VehicleState:
    soc: float = 50.0  # %
    plugged: bool = True
    charging: bool = False
    complete: bool = False
    fault: bool = False
    charge_limit: int = 80  # %
    charge_current_a: float = 32.0  # when charging
    ac_voltage: int = 230
    speed_kph: float = 0.0
    gear: str = "P"
    ready: bool = False  # follows the gear: on out of P
    drive: bool = False  # follow DRIVE_CYCLE in D; off: brake to a stop, then P
    locked: bool = True
    driver_door_open: bool = False
    last_lock_result: str = "NONE"
    odometer_km: float = 12345.6
    asleep: bool = False  # every ECU silent until a wake frame (NM_TCU) or asleep = false
    battery_v: float = 12.6  # the 12 V battery


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    action: Any = field(compare=False)


class SimulatedVehicle:
    """Feed it time (`step`) and received frames (`receive`); take the frames it sends."""

    def __init__(self, state: VehicleState | None = None, timeline=(), charge_rate_pct_per_s:
                 float | None = None, dbc: Path | None = None):
        self.db = cantools.database.load_file(str(dbc or demo_dbc()))
        self.state = state or VehicleState()
        # Default: a 7.4 kW charger (32 A at 230 V) on a 64 kWh pack; the demo speeds it up.
        self.charge_rate = charge_rate_pct_per_s
        self.now = None
        self.ignored_requests = 0
        self.handled_requests = 0
        self.wakes = 0  # woken by a wake frame
        self._events: list[_Event] = []
        self._seq = 0
        self._counters: dict[str, int] = {}
        self._drive_start: float | None = None  # when the current drive began
        self._parking = False  # braking to a stop, then P
        self.braking = False  # slowing down: the brake pedal is pressed
        for at, changes in timeline:
            unknown = set(changes) - set(TIMELINE_KEYS)
            if unknown:  # fail at start, not later in the simulator thread
                raise ValueError(f"simulator timeline: unknown state {sorted(unknown)[0]!r}")
            self._at(float(at), lambda c=dict(changes): self._apply(c))
        self._periodic = [(m, m.cycle_time / 1000.0) for m in self.db.messages if m.cycle_time]
        self._next_send = {m.name: 0.0 for m, _ in self._periodic}
        self._requests = {m.frame_id: m for m in self.db.messages if m.senders == ["TCU"]}
        self.ecus: list = []  # diagnosable ECUs (sim/ecus.py), answering ISO-TP requests

    # -- time -----------------------------------------------------------------------------

    def step(self, now: float) -> list[tuple[int, bytes]]:
        """Advance to `now` (seconds); returns the frames due, as (can_id, data)."""
        if self.now is None:
            self.now = now
            self._timeline_base = now
            self._events = [_Event(e.at + now, e.seq, e.action) for e in self._events]
            heapq.heapify(self._events)
        dt = max(0.0, now - self.now)
        self.now = now
        while self._events and self._events[0].at <= now:
            heapq.heappop(self._events).action()
        self._drive(now, dt)
        self._physics(dt)
        frames: list[tuple[int, bytes]] = []
        if self.state.asleep:  # every ECU is quiet, diagnostics included
            return frames
        for ecu in self.ecus:
            frames += ecu.step(now)
        for msg, period in self._periodic:
            if now >= self._next_send[msg.name]:
                self._next_send[msg.name] = max(self._next_send[msg.name] + period, now)
                frames.append((msg.frame_id, self._encode(msg)))
        return frames

    def _drive(self, now: float, dt: float) -> None:
        s = self.state
        if s.drive and self._drive_start is None:
            self._drive_start, self._parking = now, False
            s.gear = "D"
        elif not s.drive and self._drive_start is not None:
            self._drive_start, self._parking = None, True
        before = s.speed_kph
        if s.drive:
            s.speed_kph = _approach(s.speed_kph, cycle_speed(now - self._drive_start),
                                    MAX_ACCEL_MS2 * 3.6 * dt)
        elif self._parking:
            s.speed_kph = _approach(s.speed_kph, 0.0, BRAKE_MS2 * 3.6 * dt)
            if s.speed_kph == 0:
                self._parking = False
                if s.gear == "D":
                    s.gear = "P"
        s.ready = s.gear != "P"
        self.braking = s.speed_kph < before

    def _physics(self, dt: float) -> None:
        s = self.state
        if not s.plugged:
            s.complete = False  # the next session starts afresh
        if s.charging:
            if not s.plugged or s.gear != "P" or s.fault:
                s.charging = False  # cable pulled, shifted out of P or charger fault
            else:
                rate = self.charge_rate if self.charge_rate is not None else \
                    s.charge_current_a * s.ac_voltage / 1000 / CAPACITY_KWH * 100 / 3600
                before = s.soc
                s.soc = min(100.0, s.soc + rate * dt)
                if s.soc >= s.charge_limit:
                    s.soc = max(before, float(s.charge_limit))  # stops at the limit
                    s.charging, s.complete = False, True
        s.odometer_km += s.speed_kph * dt / 3600

    def _at(self, when: float, action) -> None:
        self._seq += 1
        heapq.heappush(self._events, _Event(when, self._seq, action))

    def _apply(self, changes: dict) -> None:
        s = self.state
        for key, value in changes.items():
            if key == "gear" and value == "P" and s.speed_kph > 0:
                s.drive, self._parking = False, True  # a moving car stops first, then parks
            elif key == "gear":
                s.gear = value
                s.drive = s.drive and value == "D"  # the cycle is driven in D
            else:
                setattr(s, key, value)
                if key == "speed_kph":
                    self._parking = False  # a set speed is held (unless driving the cycle)
        if s.speed_kph > 0 and s.gear == "P" and not self._parking:
            s.gear = "D"

    # -- requests from the telematics unit ------------------------------------------------

    def receive(self, can_id: int, data: bytes) -> None:
        for ecu in self.ecus:
            ecu.receive(can_id, data, self.now or 0.0)
        msg = self._requests.get(can_id)
        if msg is None:
            return
        if msg.name == "NM_TCU":
            if self.state.asleep:
                self.state.asleep = False
                self.wakes += 1
                self._next_send = {name: self.now or 0.0 for name in self._next_send}
            return
        if self.state.asleep:  # a sleeping ECU does not see application frames
            self.ignored_requests += 1
            return
        checksum = next((s.name for s in msg.signals if s.name.endswith("Checksum")), None)
        if checksum:
            values = msg.decode(data, decode_choices=False)
            expected = (sum(data) - data[7]) & 0xFF
            if values[checksum] != expected:
                self.ignored_requests += 1
                return
        values = msg.decode(data)
        self.handled_requests += 1
        now = self.now or 0.0
        if msg.name == "TCU_ChargeRequest":
            self._charge_request(str(values["ChargeRequest"]), values["ChargeLimitRequest"], now)
        elif msg.name == "TCU_LockRequest":
            self._lock_request(str(values["LockRequest"]), now)

    def _charge_request(self, request: str, limit: int, now: float) -> None:
        s = self.state
        if 50 <= limit <= 100:
            self._at(now + REACTION_S, lambda: setattr(s, "charge_limit", int(limit)))
        if request == "START":
            def start():
                if s.plugged and s.gear == "P" and not s.fault and s.soc < s.charge_limit:
                    s.charging, s.complete = True, False
            self._at(now + REACTION_S, start)
        elif request == "STOP":
            self._at(now + REACTION_S, lambda: setattr(s, "charging", False))

    def _lock_request(self, request: str, now: float) -> None:
        s = self.state

        def act():
            if request == "UNLOCK" and s.speed_kph > 3:
                s.last_lock_result = "REFUSED_MOVING"
            elif request == "LOCK" and s.driver_door_open:
                s.last_lock_result = "REFUSED_DOOR_OPEN"
            elif request in ("LOCK", "UNLOCK"):
                s.locked = request == "LOCK"
                s.last_lock_result = "OK"
        self._at(now + LOCK_REACTION_S, act)

    # -- frames ---------------------------------------------------------------------------

    def _encode(self, msg) -> bytes:
        s = self.state
        n = self._counters[msg.name] = (self._counters.get(msg.name, -1) + 1) % 16
        if msg.name == "VCU_Status":
            values = {"VehicleSpeed": s.speed_kph, "Gear": s.gear, "Ready": int(s.ready),
                      "BrakePressed": int(self.braking), "Odometer": round(s.odometer_km, 1),
                      "VCU_Counter": n, "VCU_Checksum": 0}
        elif msg.name == "BMS_Status":
            current = -s.charge_current_a * s.ac_voltage / 400 if s.charging else \
                (s.speed_kph * 0.8)
            values = {"SOC": round(s.soc, 1), "PackVoltage": round(360 + s.soc * 0.6, 2),
                      "PackCurrent": round(current, 1),
                      "CellTempMax": 25 + (5 if s.charging else 0), "BMS_Counter": n}
        elif msg.name == "OBC_Status":
            state = "FAULT" if s.fault else "CHARGING" if s.charging else \
                "COMPLETE" if s.complete and s.plugged else "IDLE"
            values = {"CablePlugged": "PLUGGED" if s.plugged else "UNPLUGGED",
                      "ChargeState": state, "ChargeLimit": s.charge_limit,
                      "ChargeCurrent": s.charge_current_a if s.charging else 0,
                      "ChargeVoltageAC": s.ac_voltage if s.plugged else 0, "OBC_Counter": n}
        elif msg.name == "BCM_Status":
            values = {"DoorsLocked": "LOCKED" if s.locked else "UNLOCKED",
                      "DriverDoorOpen": int(s.driver_door_open), "PassengerDoorOpen": 0,
                      "TrunkOpen": 0, "LastLockResult": s.last_lock_result, "BCM_Counter": n,
                      "BatteryVoltage": max(0.0, min(20.46, round(s.battery_v, 2)))}
        else:
            values = {sig.name: 0 for sig in msg.signals}
        data = bytearray(msg.encode(values))
        if msg.name == "VCU_Status":
            data[7] = sum(data[:7]) & 0xFF
        return bytes(data)


def _approach(value: float, target: float, max_change: float) -> float:
    if abs(target - value) <= max_change:
        return target
    return value + max_change if target > value else value - max_change
