"""Remote diagnostics (PROTOCOL.md §9): DTCs, OBD-II PIDs, the per-ECU scheduler. Sans-I/O.

What is here: DTC codes in the §9 form, the OBD-II mode 01 PID table and its decoding, modes
03/07/0A, the retained `diagnostics` record and its change detection, the `diag.*` command
family's parameter checks, and `DiagScheduler`, which decides what is asked of which ECU when:

    sched = DiagScheduler(ecus, lookup, clear_preconditions, stale_ms, queue_size, now_ms)
    sched.submit(command_id, name, params, now_ms) -> [Status]     # an Accepted diag.* command
    sched.poll(now_ms) -> [Request]                                # what to send now
    sched.done(token, Result, now_ms) -> [Status | Values]         # an answer (or timeout)

At most one request is outstanding per ECU, requests to one ECU are spaced, commands go
before periodic work, and an ECU that does not answer is backed off (never a retry storm).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ParamError
from .conditions import Condition, Lookup, check_all
from .executor import Status
from .registry import Family, show as _show
from .protocol import (ACCEPTED, BAD_PARAMS, BUSY, FAILED, NO_RESPONSE, PRECONDITION_FAILED,
                       REJECTED, SUCCEEDED)

READ_DTCS, CLEAR_DTCS, READ_DATA = "diag.read_dtcs", "diag.clear_dtcs", "diag.read_data"
COMMANDS = frozenset({READ_DTCS, CLEAR_DTCS, READ_DATA})
NOT_ANSWERED = "NO_RESPONSE"  # the §9 error of an ECU that did not answer in time

# -- DTCs -----------------------------------------------------------------------------------

CONFIRMED, PENDING = 0x08, 0x04  # ISO 14229 status bits that OBD-II modes 03 / 07 stand for


def dtc_code(value: int) -> str:
    """The five-character form of a 2-byte DTC: 0x0A80 -> "P0A80", 0xC100 -> "U0100"."""
    return f"{'PCBU'[(value >> 14) & 3]}{(value >> 12) & 3}{value & 0xFFF:03X}"


def uds_dtc_code(value: int) -> str:
    """A 3-byte UDS DTC with its failure-type byte: 0x0A801C -> "P0A80-1C"."""
    return f"{dtc_code(value >> 8)}-{value & 0xFF:02X}"


def parse_dtc(text: str) -> int:
    """"P0A80" -> 0x0A80, "P0A80-1C" -> 0x0A801C. Raises ValueError."""
    head, sep, ftb = text.partition("-")
    if len(head) != 5 or head[0] not in "PCBU" or head[1] not in "0123":
        raise ValueError(f"{text!r} is not a DTC such as P0A80 or P0A80-1C")
    try:
        value = ("PCBU".index(head[0]) << 14) | (int(head[1]) << 12) | int(head[2:], 16)
        if sep:
            if len(ftb) != 2:
                raise ValueError
            value = value << 8 | int(ftb, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a DTC such as P0A80 or P0A80-1C") from None
    return value


def dtc_list(pairs) -> list[dict]:
    """[(code, status), ...] -> §9 entries, sorted by code, one per code."""
    merged: dict[str, int] = {}
    for code, status in pairs:
        merged[code] = merged.get(code, 0) | status
    return [{"code": c, "status": merged[c]} for c in sorted(merged)]


def decode_obd_dtcs(payload: bytes, mode: int) -> list[str]:
    """Codes in a mode 03/07/0A answer (`43 N A1 B1 ...`; the count byte is ISO 15765-4's,
    tolerated when absent). 0x0000 is padding. Raises ValueError on a foreign answer."""
    if not payload or payload[0] != mode + 0x40:
        raise ValueError(f"not a mode {mode:02X} answer: {payload[:4].hex()}")
    body = payload[1:]
    if len(body) % 2:  # the count byte, then that many codes
        body = body[1:1 + 2 * body[0]]
    codes = []
    for i in range(0, len(body) - 1, 2):
        value = body[i] << 8 | body[i + 1]
        if value:
            codes.append(dtc_code(value))
    return codes


def merge_obd(confirmed, pending, permanent) -> list[dict]:
    """Modes 03/07/0A -> §9 entries: confirmed 0x08, pending 0x04; a permanent code is a
    confirmed one the ECU keeps (0x08)."""
    return dtc_list([*((c, CONFIRMED) for c in confirmed), *((c, PENDING) for c in pending),
                     *((c, CONFIRMED) for c in permanent)])


# -- OBD-II mode 01 PIDs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pid:
    pid: int
    name: str
    size: int  # data bytes
    unit: str
    decode: Callable[[bytes], Any]


def _u(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _bitmap(base: int) -> Callable[[bytes], frozenset]:
    return lambda b: frozenset(base + 1 + i for i in range(32) if _u(b) >> (31 - i) & 1)


_TABLE = [
    (0x01, "DtcCount", 4, "", lambda b: b[0] & 0x7F),  # emission DTCs stored (MIL: bit 7)
    (0x04, "EngineLoad", 1, "%", lambda b: round(b[0] * 100 / 255, 1)),
    (0x05, "CoolantTemp", 1, "degC", lambda b: b[0] - 40),
    (0x0C, "EngineSpeed", 2, "rpm", lambda b: _u(b) / 4),
    (0x0D, "VehicleSpeed", 1, "km/h", lambda b: b[0]),
    (0x0F, "IntakeAirTemp", 1, "degC", lambda b: b[0] - 40),
    (0x11, "ThrottlePosition", 1, "%", lambda b: round(b[0] * 100 / 255, 1)),
    (0x1F, "RunTime", 2, "s", _u),
    (0x21, "DistanceWithMil", 2, "km", _u),
    (0x2F, "FuelLevel", 1, "%", lambda b: round(b[0] * 100 / 255, 1)),
    (0x31, "DistanceSinceCleared", 2, "km", _u),
    (0x42, "ControlModuleVoltage", 2, "V", lambda b: _u(b) / 1000),
    (0x46, "AmbientAirTemp", 1, "degC", lambda b: b[0] - 40),
    (0x5B, "HybridBatteryRemaining", 1, "%", lambda b: round(b[0] * 100 / 255, 1)),
    (0x5C, "EngineOilTemp", 1, "degC", lambda b: b[0] - 40),
    (0xA6, "Odometer", 4, "km", lambda b: _u(b) / 10),
]
PIDS: dict[int, Pid] = {p: Pid(p, n, s, u, d) for p, n, s, u, d in _TABLE}
BITMAPS = tuple(range(0x00, 0x100, 0x20))  # "PIDs supported [base+1 .. base+32]"
for _base in BITMAPS:
    PIDS[_base] = Pid(_base, f"PidsSupported{_base + 1:02X}", 4, "", _bitmap(_base))
_BY_NAME = {p.name.lower(): p.pid for p in PIDS.values()}


def pid_number(ref: int | str) -> int:
    """A PID by number or table name ("VehicleSpeed", case-insensitive). Raises ValueError
    for one the table does not decode."""
    if type(ref) is str:
        n = _BY_NAME.get(ref.lower())
        if n is None:
            raise ValueError(f"unknown PID name {ref!r} (known: "
                             f"{', '.join(p.name for p in PIDS.values() if p.pid not in BITMAPS)})")
        return n
    if type(ref) is not int or ref not in PIDS:
        raise ValueError(f"PID {ref!r} is not one this agent decodes (known: "
                         f"{', '.join(f'0x{p:02X}' for p in sorted(PIDS))})")
    return ref


def decode_mode01(payload: bytes) -> dict[int, Any]:
    """`41 PID data [PID data ...]` -> {pid: value}. Stops at a PID the table does not know
    (its length is unknown). Raises ValueError on a foreign or truncated answer."""
    if len(payload) < 2 or payload[0] != 0x41:
        raise ValueError(f"not a mode 01 answer: {payload[:4].hex()}")
    out: dict[int, Any] = {}
    i = 1
    while i < len(payload):
        spec = PIDS.get(payload[i])
        if spec is None:
            break
        data = payload[i + 1:i + 1 + spec.size]
        if len(data) < spec.size:
            if out:
                break  # trailing padding
            raise ValueError(f"PID 0x{spec.pid:02X}: {len(data)} of {spec.size} bytes")
        out[spec.pid] = spec.decode(data)
        i += 1 + spec.size
    return out


def negative_code(payload: bytes) -> int | None:
    """The NRC of a negative response `7F SID NRC`, else None."""
    return payload[2] if len(payload) >= 3 and payload[0] == 0x7F else None


def nrc_error(code: int) -> str:
    return f"NRC_0x{code:02X}"


# -- the retained record --------------------------------------------------------------------


def diagnostics_payload(vin: str, t_ms: int, ecus: Mapping[str, Mapping]) -> dict:
    """§9: `{v, vin, t, ecus: {name: {t, dtcs}}}`."""
    return {"v": 1, "vin": vin, "t": t_ms,
            "ecus": {n: {"t": e["t"], "dtcs": list(e["dtcs"])} for n, e in sorted(ecus.items())}}


class DtcStore:
    """The DTCs last read from each ECU. `t` is when the list was first read as it is now:
    an unchanged re-read changes nothing, so the retained record changes only with the DTCs."""

    def __init__(self):
        self.ecus: dict[str, dict] = {}
        self.changed = False  # set by update(); the caller resets after publishing

    def update(self, ecu: str, dtcs: list[dict], t_ms: int) -> bool:
        old = self.ecus.get(ecu)
        if old is not None and old["dtcs"] == dtcs:
            return False
        self.ecus[ecu] = {"t": t_ms, "dtcs": dtcs}
        self.changed = True
        return True

    def payload(self, vin: str, t_ms: int) -> dict:
        return diagnostics_payload(vin, t_ms, self.ecus)


# -- the command family's parameters --------------------------------------------------------


def check_params(name: str, params: Mapping) -> None:
    """§9 parameter checks of diag.*; raises ParamError(detail) -> BAD_PARAMS."""
    if name in (READ_DTCS, CLEAR_DTCS):
        extra = sorted(set(params) - {"ecus"}, key=str)
        if extra:
            raise ParamError(f"{name} takes no parameter {_show(extra[0])} (only 'ecus')")
        if "ecus" in params:
            ecus = params["ecus"]
            if type(ecus) is not list or not 1 <= len(ecus) <= 32:
                raise ParamError(f"ecus: must be a list of 1-32 ECU names, got {_show(ecus)}")
            for e in ecus:
                if type(e) is not str or not 1 <= len(e) <= 32:
                    raise ParamError(f"ecus: {_show(e)} is not an ECU name")
            if len(set(ecus)) != len(ecus):
                raise ParamError("ecus: an ECU is named twice")
    elif name == READ_DATA:
        extra = sorted(set(params) - {"ecu", "did"}, key=str)
        if extra:
            raise ParamError(f"{name} takes no parameter {_show(extra[0])}")
        ecu, did = params.get("ecu"), params.get("did")
        if type(ecu) is not str or not 1 <= len(ecu) <= 32:
            raise ParamError(f"ecu: needed, an ECU name, got {_show(ecu)}")
        if type(did) is not int or not 0 <= did <= 0xFFFF:
            raise ParamError(f"did: needed, an integer 0..65535, got {_show(did)}")
    else:
        raise ParamError(f"{name} is not a diag command")


FAMILY = Family("diag", COMMANDS, check_params)


# -- the scheduler --------------------------------------------------------------------------

DTCS, CLEAR, DID, PID, SUPPORTED = "dtcs", "clear", "did", "pid", "supported"
BACKOFF_MIN_MS, BACKOFF_MAX_MS = 1000, 60_000


@dataclass(frozen=True, slots=True)
class PidPlan:
    pid: int
    interval_ms: int
    out: str  # signal name


@dataclass(frozen=True, slots=True)
class EcuPlan:
    name: str
    protocol: str  # "uds" / "obd"
    dtc_interval_ms: int  # 0: on command only
    spacing_ms: int
    pids: tuple[PidPlan, ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    """Ask `ecu` for `op` (dtcs, clear, did, pid, supported) with `arg` (DID, PID, bitmap)."""

    token: int
    ecu: str
    op: str
    arg: int | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """What came back: ok with `value`, or `error` ("NO_RESPONSE", "NRC_0x31", ...).
    dtcs/clear-read: list of §9 entries; pid: {pid: value}; supported: frozenset of PIDs;
    did: (hex, value or None)."""

    ok: bool
    value: Any = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Values:
    """PID values for the telemetry core (feed_values)."""

    t_ms: int
    values: dict


@dataclass
class _Job:
    id: str
    name: str
    ecus: list[str]
    did: int | None = None
    results: dict = field(default_factory=dict)


@dataclass
class _Ecu:
    plan: EcuPlan
    busy: int | None = None  # token outstanding
    busy_op: tuple | None = None
    free_at: int = 0  # spacing: no request before this
    next_dtcs: int = 0
    backoff_ms: int = 0
    retry_at: int = 0  # periodic work waits for this after a failure
    supported: frozenset | None = None  # mode 01 PIDs; None: not yet known
    next_bitmap: int | None = 0  # the next supported-PIDs query (None: discovery done)
    pids_unsupported: str = ""  # why the ECU has no PIDs ("NRC_0x12"): no more queries
    dropped: set = field(default_factory=set)  # configured PIDs it does not support
    next_pid: dict = field(default_factory=dict)  # pid -> due ms
    queue: deque = field(default_factory=deque)  # (job, op, arg) from commands
    answered: int = 0
    failed: int = 0
    last_error: str = ""


class DiagScheduler:
    def __init__(self, ecus: list[EcuPlan], lookup: Lookup, clear_preconditions:
                 tuple[Condition, ...], stale_ms: int, queue_size: int, now_ms: int,
                 first_read_ms: int = 2000):
        self.lookup = lookup
        self.preconditions = clear_preconditions
        self.stale_ms = stale_ms
        self.queue_size = queue_size
        self.ecus: dict[str, _Ecu] = {}
        for i, plan in enumerate(ecus):
            e = _Ecu(plan)
            # Staggered first reads: the buses are busy enough at start.
            e.next_dtcs = now_ms + first_read_ms + 250 * i if plan.dtc_interval_ms else -1
            if plan.protocol != "obd" or not plan.pids:
                e.next_bitmap = None
            e.next_pid = {p.pid: now_ms for p in plan.pids}
            self.ecus[plan.name] = e
        self.store = DtcStore()
        self.jobs: dict[str, _Job] = {}
        self._token = 0
        self._tokens: dict[int, tuple[str, tuple, _Job | None]] = {}

    # -- commands -------------------------------------------------------------------------

    def submit(self, command_id: str, name: str, params: Mapping, now_ms: int) -> list[Status]:
        """An Accepted diag.* command (parameters already checked by check_params)."""
        if name == READ_DATA:
            ecus = [params["ecu"]]
        else:
            ecus = list(params.get("ecus") or self.ecus)
        unknown = [n for n in ecus if n not in self.ecus]
        if unknown:
            return [Status(command_id, REJECTED, BAD_PARAMS,
                           f"no ECU named {unknown[0]!r} (ECUs: {', '.join(self.ecus)})")]
        if name == READ_DATA and self.ecus[ecus[0]].plan.protocol != "uds":
            return [Status(command_id, REJECTED, BAD_PARAMS,
                           f"{ecus[0]} speaks OBD-II; diag.read_data needs a UDS ECU")]
        if name == CLEAR_DTCS:
            ok, why = check_all(self.preconditions, self.lookup, now_ms, self.stale_ms)
            if not ok:
                return [Status(command_id, REJECTED, PRECONDITION_FAILED, why)]
        if len(self.jobs) >= self.queue_size:
            return [Status(command_id, REJECTED, BUSY,
                           f"{len(self.jobs)} diag commands already running")]
        job = _Job(command_id, name, ecus, params.get("did"))
        self.jobs[command_id] = job
        op = {READ_DTCS: DTCS, CLEAR_DTCS: CLEAR, READ_DATA: DID}[name]
        for n in ecus:
            self.ecus[n].queue.append((job, op, job.did))
        return [Status(command_id, ACCEPTED)]

    def running(self, command_id: str) -> bool:
        return command_id in self.jobs

    # -- what to send ---------------------------------------------------------------------

    def poll(self, now_ms: int) -> list:
        """Requests to send now (and the Status of a clear whose preconditions no longer
        hold when its turn comes: that ECU is not cleared)."""
        out: list = []
        for e in self.ecus.values():
            if e.busy is not None or now_ms < e.free_at:
                continue
            picked = self._next(e, now_ms)
            while picked is not None and picked[1] == CLEAR and not self.recheck_clear(now_ms)[0]:
                why = self.recheck_clear(now_ms)[1]
                out += self._job_step(picked[0], e.plan.name, CLEAR,
                                      Result(False, error=f"{PRECONDITION_FAILED}: {why}"), now_ms)
                picked = self._next(e, now_ms)
            if picked is None:
                continue
            job, op, arg = picked
            self._token += 1
            e.busy, e.busy_op = self._token, (op, arg)
            self._tokens[self._token] = (e.plan.name, (op, arg), job)
            out.append(Request(self._token, e.plan.name, op, arg))
        return out

    def _next(self, e: _Ecu, now: int):
        if e.queue:
            return e.queue.popleft()
        if now < e.retry_at:
            return None
        if e.next_dtcs >= 0 and now >= e.next_dtcs:
            return None, DTCS, None
        if e.next_bitmap is not None:
            return None, SUPPORTED, e.next_bitmap
        if e.supported is not None:
            due = [p for p in e.plan.pids if p.pid not in e.dropped and now >= e.next_pid[p.pid]]
            if due:
                p = min(due, key=lambda p: e.next_pid[p.pid])
                e.next_pid[p.pid] = max(e.next_pid[p.pid] + p.interval_ms, now)
                return None, PID, p.pid
        return None

    def next_due_ms(self) -> int | None:
        """The earliest time poll() may have something to send (None: only on command)."""
        times = []
        for e in self.ecus.values():
            if e.busy is not None:
                continue
            base = e.free_at
            if e.queue:
                times.append(base)
                continue
            work = [t for t in (e.next_dtcs,) if t >= 0]
            if e.next_bitmap is not None:
                work.append(0)
            elif e.supported is not None:
                work += [e.next_pid[p.pid] for p in e.plan.pids if p.pid not in e.dropped]
            if work:
                times.append(max(base, e.retry_at, min(work)))
        return min(times) if times else None

    # -- answers --------------------------------------------------------------------------

    def done(self, token: int, result: Result, now_ms: int) -> list:
        """The outcome of Request `token`; returns command Statuses and PID Values."""
        name, (op, arg), job = self._tokens.pop(token)
        e = self.ecus[name]
        e.busy = e.busy_op = None
        e.free_at = now_ms + e.plan.spacing_ms
        out: list = []
        if result.ok:
            e.answered += 1
            e.backoff_ms = 0
            e.retry_at = 0
        else:
            e.failed += 1
            e.last_error = result.error
            if not result.error.startswith("NRC_"):  # no answer, bus down: back off
                e.backoff_ms = min(BACKOFF_MAX_MS, max(BACKOFF_MIN_MS, 2 * e.backoff_ms))
                e.retry_at = now_ms + e.backoff_ms
        if op == DTCS:
            if job is None:
                e.next_dtcs = now_ms + e.plan.dtc_interval_ms
            if result.ok:
                self.store.update(name, result.value, now_ms)
        elif op == SUPPORTED:
            self._supported(e, arg, result, now_ms)
        elif op == PID:
            if result.ok and arg in result.value:
                out.append(Values(now_ms, {p.out: result.value[arg] for p in e.plan.pids
                                           if p.pid == arg}))
            elif not result.ok and result.error.startswith("NRC_"):
                e.dropped.add(arg)  # 7F 01 12: not supported after all; never asked again
        if job is not None:
            out += self._job_step(job, name, op, result, now_ms)
        return out

    def _supported(self, e: _Ecu, base: int, result: Result, now_ms: int) -> None:
        if result.ok:
            bits = frozenset(result.value)
            e.supported = (e.supported or frozenset()) | (bits - {base + 0x20})
            e.next_bitmap = base + 0x20 if base + 0x20 in bits and base + 0x20 < 0x100 else None
            if e.next_bitmap is None:
                e.dropped = {p.pid for p in e.plan.pids if p.pid not in e.supported}
                e.next_pid = dict.fromkeys(e.next_pid, now_ms)  # polls start now
        elif result.error.startswith("NRC_"):
            # An old ECU's `7F 01 12` to a supported-PIDs query: no mode 01 here, cleanly.
            e.next_bitmap = None
            e.supported = e.supported or frozenset()
            if not e.supported:
                e.pids_unsupported = result.error
            e.dropped = {p.pid for p in e.plan.pids if p.pid not in e.supported}
        # NO_RESPONSE: asked again after the back-off

    def _job_step(self, job: _Job, name: str, op: str, result: Result, now_ms: int) -> list:
        if op == CLEAR and result.ok:
            self.ecus[name].queue.appendleft((job, DTCS, None))  # read again after clearing
            return []
        if op == CLEAR:
            job.results[name] = {"error": result.error}
        elif op == DTCS:
            job.results[name] = {"dtcs": result.value} if result.ok else {"error": result.error}
        else:  # DID
            job.results[name] = result
        if len(job.results) < len(job.ecus):
            return []
        del self.jobs[job.id]
        if job.name == READ_DATA:
            r = job.results[name]
            if not r.ok:
                return [Status(job.id, FAILED, NO_RESPONSE, f"{name}: {r.error}")]
            hex_, value = r.value
            body = {"ecu": name, "did": job.did, "hex": hex_}
            if value is not None:
                body["value"] = value
            return [Status(job.id, SUCCEEDED, result=body)]
        result_map = {"ecus": {n: job.results[n] for n in job.ecus}}
        if any("dtcs" in r for r in job.results.values()):
            return [Status(job.id, SUCCEEDED, result=result_map)]
        refused = [r["error"] for r in job.results.values()
                   if r["error"].startswith(PRECONDITION_FAILED)]
        if len(refused) == len(job.results):
            return [Status(job.id, FAILED, PRECONDITION_FAILED, refused[0], result=result_map)]
        return [Status(job.id, FAILED, NO_RESPONSE, "no ECU answered", result=result_map)]

    def recheck_clear(self, now_ms: int) -> tuple[bool, str]:
        """The clear preconditions again, right before a clear request goes out."""
        return check_all(self.preconditions, self.lookup, now_ms, self.stale_ms)

    # -- views ----------------------------------------------------------------------------

    def status(self) -> dict:
        out = {}
        for n, e in self.ecus.items():
            s = {"answered": e.answered, "failed": e.failed, "last_error": e.last_error,
                 "dtcs": len(self.store.ecus.get(n, {}).get("dtcs", ()))}
            if e.plan.protocol == "obd" and e.plan.pids:
                s["pids_supported"] = sorted(e.supported) if e.supported is not None else None
                s["pids_not_polled"] = sorted(e.dropped)
                if e.pids_unsupported:
                    s["mode01"] = f"not supported ({e.pids_unsupported})"
            out[n] = s
        return out
