"""Simulated ECUs that answer diagnostics over ISO-TP on the simulator's bus. Sans-I/O.

An ISO 15765-2 server written here from the standard (not the client library the agent uses,
so each tests the other): single frames in, single or first + consecutive frames out with the
tester's flow control (block size, STmin), padded to 8 bytes. The models:

  bms   UDS 0x7E4/0x7EC: 0x19 (40 DTCs, multi-frame, after two 0x78 response-pending),
        0x14, 0x22 (VIN, serial, SOC); OBD mode 01 PID 0x5B
  vcu   OBD-II 0x7E0/0x7E8 (also functional 0x7DF): mode 01 (speed, run time, voltage,
        odometer, ...), modes 03/07/0A/04; UDS 0x19/0x14; 0x22 is an unsupported service
  abs   an old ECU on 0x7E1/0x7E9: `7F 01 12` to every mode 01 query, no DTCs
  (0x7E2/0x7EA is configured in the demo but nobody answers: an ECU that never answers)

The simulator's `fault` (the charger fault) makes the VCU set P0D27 (UDS P0D27-1C), reported
by the next read and cleared by a clear while the fault is gone.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..core.diag import parse_dtc

PAD = 0xAA
FC_TIMEOUT_S = 1.0
FUNCTIONAL_ID = 0x7DF
VIN = "DEMO0EV0000000001"

Answer = list  # [(delay s, payload bytes), ...]; empty: say nothing


class IsoTpServer:
    """The ECU side of ISO-TP for one request/response id pair (11-bit, normal addressing)."""

    def __init__(self, request_id: int, response_id: int, functional: bool = False):
        self.request_id = request_id
        self.response_id = response_id
        self.functional = functional
        self._due: list[tuple[float, bytes]] = []  # answers waiting for their time
        self._tx: deque[bytes] = deque()  # consecutive frames of the answer being sent
        self._waiting_fc_since: float | None = None
        self._block_left = 0
        self._block_size = 0
        self._stmin_s = 0.0
        self._next_cf = 0.0
        self.frames_in = 0

    def receive(self, can_id: int, data: bytes, now: float) -> bytes | None:
        """A frame for this ECU; returns a complete request payload, or None."""
        if can_id != self.request_id and not (self.functional and can_id == FUNCTIONAL_ID):
            return None
        if not data:
            return None
        self.frames_in += 1
        kind = data[0] >> 4
        if kind == 0:  # single frame
            size = data[0] & 0x0F
            return bytes(data[1:1 + size]) if 0 < size <= len(data) - 1 else None
        if kind == 3 and self._waiting_fc_since is not None and can_id == self.request_id:
            status = data[0] & 0x0F
            if status == 0:  # clear to send
                self._block_size = data[1] if len(data) > 1 else 0
                self._block_left = self._block_size
                st = data[2] if len(data) > 2 else 0
                self._stmin_s = st / 1000 if st <= 0x7F else 0.0001 * (st - 0xF0) \
                    if 0xF1 <= st <= 0xF9 else 0.127
                self._waiting_fc_since = None
                self._next_cf = now
            elif status == 2:  # overflow: abort
                self._abort()
        return None  # first frames (requests over 7 bytes) are not needed by these models

    def answer(self, payload: bytes, at: float) -> None:
        self._due.append((at, payload))
        self._due.sort(key=lambda x: x[0])

    def step(self, now: float) -> list[tuple[int, bytes]]:
        out = []
        if self._waiting_fc_since is not None and now - self._waiting_fc_since > FC_TIMEOUT_S:
            self._abort()
        while self._tx and self._waiting_fc_since is None and now >= self._next_cf:
            out.append((self.response_id, self._tx.popleft()))
            self._next_cf = now + self._stmin_s
            if self._block_size:
                self._block_left -= 1
                if self._block_left == 0 and self._tx:
                    self._waiting_fc_since = now
            if self._stmin_s:
                break
        if not self._tx and self._waiting_fc_since is None:
            while self._due and self._due[0][0] <= now:
                _, payload = self._due.pop(0)
                if len(payload) <= 7:
                    out.append((self.response_id, _pad(bytes([len(payload)]) + payload)))
                    continue
                size = len(payload)
                out.append((self.response_id, bytes([0x10 | size >> 8, size & 0xFF]) + payload[:6]))
                rest, seq = payload[6:], 1
                while rest:
                    self._tx.append(_pad(bytes([0x20 | seq]) + rest[:7]))
                    rest, seq = rest[7:], (seq + 1) & 0x0F
                self._waiting_fc_since = now
                break
        return out

    def _abort(self) -> None:
        self._tx.clear()
        self._waiting_fc_since = None


def _pad(frame: bytes) -> bytes:
    return frame + bytes([PAD]) * (8 - len(frame))


def _neg(sid: int, code: int) -> bytes:
    return bytes([0x7F, sid, code])


class SimEcu:
    """One ECU: an ISO-TP server and a service function (payload, now) -> Answer."""

    def __init__(self, name: str, request_id: int, response_id: int, model,
                 functional: bool = False):
        self.name = name
        self.tp = IsoTpServer(request_id, response_id, functional)
        self.model = model  # .serve(payload, now) -> Answer; optional .sync(now)
        self.requests = 0

    def receive(self, can_id: int, data: bytes, now: float) -> None:
        payload = self.tp.receive(can_id, data, now)
        if payload:
            self.requests += 1
            for delay, answer in self.model.serve(payload, now):
                self.tp.answer(answer, now + delay)

    def step(self, now: float) -> list[tuple[int, bytes]]:
        sync = getattr(self.model, "sync", None)
        if sync is not None:
            sync(now)
        return self.tp.step(now)


class DtcMemory:
    """Stored DTCs of one ECU: 3-byte UDS DTC -> ISO 14229 status byte."""

    def __init__(self, codes: dict[str, int] | None = None):
        self.dtcs: dict[int, int] = {parse_dtc(c): s for c, s in (codes or {}).items()}

    def uds_answer(self, sub: int, mask: int) -> bytes:
        body = bytearray([0x59, sub, 0xFF])
        for dtc, status in sorted(self.dtcs.items()):
            if sub == 0x0A or status & mask:
                body += dtc.to_bytes(3, "big") + bytes([status])
        return bytes(body)

    def obd_codes(self, mode: int) -> list[int]:
        bit = {0x03: 0x08, 0x07: 0x04, 0x0A: 0x08}[mode]
        return sorted({dtc >> 8 for dtc, status in self.dtcs.items() if status & bit})


def _obd_dtc_answer(mode: int, codes: list[int]) -> bytes:
    body = bytearray([mode + 0x40, len(codes)])
    for c in codes:
        body += c.to_bytes(2, "big")
    return bytes(body)


def _bitmaps(pids) -> dict[int, bytes]:
    """Supported-PID bitmaps (0x00, 0x20, ...) for this set, each chaining to the next."""
    pids = set(pids)
    top = max(pids, default=0)
    out = {}
    for base in range(0, 0x100, 0x20):
        if base > top:
            break
        bits = 0
        for i in range(32):
            p = base + 1 + i
            if p in pids or (i == 31 and p <= top and any(q > p for q in pids)):
                bits |= 1 << (31 - i)
        out[base] = bits.to_bytes(4, "big")
    return out


def _mode01(pids: dict[int, Callable[[], bytes]], payload: bytes) -> Answer:
    maps = _bitmaps(pids)
    body = bytearray([0x41])
    for pid in payload[1:7]:
        if pid in maps:
            body += bytes([pid]) + maps[pid]
        elif pid in pids:
            body += bytes([pid]) + pids[pid]()
    return [(0.002, bytes(body))] if len(body) > 1 else [(0.002, _neg(0x01, 0x12))]


class BmsModel:
    """Battery management: many stored DTCs (a multi-frame answer), slow to look them up."""

    PENDING_S = (0.0, 0.12)  # two 0x78 response-pending answers
    ANSWER_S = 0.3

    def __init__(self, vehicle):
        self.vehicle = vehicle
        self.memory = DtcMemory(self.initial_dtcs())

    @staticmethod
    def initial_dtcs() -> dict[str, int]:
        """40 DTCs: cell voltage/temperature sensor codes with failure types and statuses."""
        out = {}
        for i in range(40):
            code = f"P0{0xA80 + i * 3:03X}"[:5] if i < 20 else f"P1{0xB00 + i:03X}"
            ftb = (0x1C, 0x16, 0x17, 0x4B, 0x00)[i % 5]
            status = (0x08, 0x2F, 0x24, 0x09, 0x28)[i % 5]
            out[f"{code}-{ftb:02X}"] = status
        return out

    def serve(self, p: bytes, now: float) -> Answer:
        sid = p[0]
        if sid == 0x19 and len(p) >= 2 and p[1] in (0x02, 0x0A):
            mask = p[2] if len(p) > 2 else 0xFF
            pending = [(d, _neg(0x19, 0x78)) for d in self.PENDING_S]
            return pending + [(self.ANSWER_S, self.memory.uds_answer(p[1], mask))]
        if sid == 0x14 and len(p) == 4:
            self.memory.dtcs.clear()
            return [(0.01, b"\x54")]
        if sid == 0x22 and len(p) == 3:
            did = p[1] << 8 | p[2]
            data = {0xF190: VIN.encode(), 0xF18C: b"BMS-000123",
                    0x0101: int(self.vehicle.state.soc * 10).to_bytes(2, "big")}.get(did)
            return [(0.005, b"\x62" + p[1:3] + data)] if data else [(0.005, _neg(0x22, 0x31))]
        if sid == 0x3E and len(p) == 2:
            return [(0.002, b"\x7e\x00")]
        if sid == 0x01:
            soc = lambda: bytes([round(self.vehicle.state.soc * 255 / 100)])  # noqa: E731
            return _mode01({0x5B: soc}, p)
        return [(0.005, _neg(sid, 0x11))]


class VcuModel:
    """Vehicle control unit: the OBD-II ECU of the EV (0x7E0/0x7E8, and functional 0x7DF)."""

    FAULT_DTC = "P0D27-1C"  # battery charger input voltage out of range
    FAULT_STATUS = 0x2F

    def __init__(self, vehicle, started: float | None = None):
        self.vehicle = vehicle
        self.memory = DtcMemory()
        self.started = started

    def sync(self, now: float) -> None:
        """The charger fault sets its DTC (again, after a clear) while it is active."""
        if self.started is None:
            self.started = now
        if self.vehicle.state.fault:
            self.memory.dtcs[parse_dtc(self.FAULT_DTC)] = self.FAULT_STATUS

    def pids(self, now: float) -> dict[int, Callable[[], bytes]]:
        s = self.vehicle.state
        run = int(now - (self.started or now))
        return {
            0x01: lambda: bytes([(0x80 if self.memory.dtcs else 0)
                                 | len(self.memory.obd_codes(3)), 0, 0, 0]),
            0x05: lambda: bytes([25 + 40]),
            0x0C: lambda: int(s.speed_kph * 40 * 4).to_bytes(2, "big"),
            0x0D: lambda: bytes([min(255, round(s.speed_kph))]),
            0x1F: lambda: min(run, 0xFFFF).to_bytes(2, "big"),
            0x21: lambda: (0).to_bytes(2, "big"),  # km driven with the MIL on
            0x31: lambda: min(round(s.odometer_km) % 4000, 0xFFFF).to_bytes(2, "big"),
            0x42: lambda: (14200).to_bytes(2, "big"),
            0x46: lambda: bytes([18 + 40]),
            0xA6: lambda: round(s.odometer_km * 10).to_bytes(4, "big"),
        }

    def serve(self, p: bytes, now: float) -> Answer:
        self.sync(now)
        sid = p[0]
        if sid == 0x01:
            return _mode01(self.pids(now), p)
        if sid in (0x03, 0x07, 0x0A):
            return [(0.003, _obd_dtc_answer(sid, self.memory.obd_codes(sid)))]
        if sid == 0x04 or (sid == 0x14 and len(p) == 4):
            self.memory.dtcs.clear()
            return [(0.01, bytes([sid + 0x40]))]
        if sid == 0x19 and len(p) >= 2 and p[1] in (0x02, 0x0A):
            return [(0.003, self.memory.uds_answer(p[1], p[2] if len(p) > 2 else 0xFF))]
        return [(0.003, _neg(sid, 0x11))]  # 0x22 and the rest: service not supported


class OldEcuModel:
    """An old ECU: answers mode 03 (no DTCs) and `7F 01 12` to every mode 01 query."""

    def serve(self, p: bytes, now: float) -> Answer:
        if p[0] == 0x03:
            return [(0.003, b"\x43\x00")]
        return [(0.003, _neg(p[0], 0x12 if p[0] == 0x01 else 0x11))]


def standard_ecus(vehicle) -> list[SimEcu]:
    """The simulated EV's diagnosable ECUs (the demo configuration's [[diagnostics.ecu]])."""
    return [SimEcu("bms", 0x7E4, 0x7EC, BmsModel(vehicle)),
            SimEcu("vcu", 0x7E0, 0x7E8, VcuModel(vehicle), functional=True),
            SimEcu("abs", 0x7E1, 0x7E9, OldEcuModel())]
