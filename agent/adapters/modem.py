"""The cellular modem's AT port over pyserial: identity, signal, registration, operator.

`ModemPoller` owns the port. In the agent, `start()` runs a daemon thread that opens the
port (reopening with backoff when a USB modem re-enumerates), switches echo off, reads the
identity once and then polls, one command at a time spread across `poll_interval_s`, so the
modem (which also serves PPP/QMI and URCs) never sees a burst. Every reading goes to
`on_values(t_unix_s, {name: value})` from that thread; what becomes telemetry is the core's
decision (the signal strength's hysteresis is a deadband there: `deadbands()`). For the CLI,
`query_once()` and `raw(command)` do the same synchronously, without a thread.

Values (VSS-style names; Vehicle.Connectivity.IsConnectivityAvailable is standard VSS, the
others extend the Vehicle.Connectivity branch):

  Vehicle.Connectivity.Model              str   AT+CGMM, e.g. "SIMCOM_SIM7600E-H", "EC25"
  Vehicle.Connectivity.Imei               str   AT+CGSN
  Vehicle.Connectivity.Iccid              str   AT+CCID, or AT+QCCID on Quectel
  Vehicle.Connectivity.SignalStrength     int   dBm from AT+CSQ (-113 + 2*rssi); None = unknown
  Vehicle.Connectivity.Registration       str   home, roaming, searching, denied,
                                                not_registered, unknown (AT+CEREG?, AT+CREG?)
  Vehicle.Connectivity.IsConnectivityAvailable  bool  registered (home or roaming)
  Vehicle.Connectivity.AccessTechnology   str   GSM, UMTS, LTE, NB-IoT, NR... when known
  Vehicle.Connectivity.AreaCode           str   LAC/TAC (hex, as the modem reports it)
  Vehicle.Connectivity.CellId             str   cell id (hex)
  Vehicle.Connectivity.Operator           str   AT+COPS? name (or MCC+MNC); None when none
  Vehicle.Connectivity.SupplyVoltage      float volts from AT+CBC, with `read_voltage` (the
                                                power.battery_signal of a board without one)

Faults never raise into the agent: timeouts, ERROR answers, garbage lines, late answers, URCs
and reopens are counted in status(). Three commands in a row without an answer close the
port and reopen it with backoff (state "unresponsive" meanwhile).

Each (re)open starts clean: the input buffer is dropped, AT is sent and everything is
discarded until the line is quiet, so an answer to a command from before the open is not
taken for a new one; an OK without the information line a query always returns counts as
no answer (see at.INFO_COMMANDS). Registration URCs are switched on (AT+CEREG=2, AT+CREG=2)
so a change of state, area or cell arrives at once rather than at the next poll.

Link recovery (core/recovery.py decides, the runtime asks): `recover(step)` queues one step
for the modem thread -- "reread" (registration and data bearer, AT+CGACT?), "radio"
(AT+CFUN=0, then AT+CFUN=1, then a re-read) or "reset" (AT+CFUN=1,1; the port is then
reopened, as a USB modem re-enumerates). Each step is logged and counted in status().
`set_poll_interval(s)` slows the polls while the vehicle sleeps.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import serial

from ..config import ModemConfig
from ..core import at
from ..errors import BusError
from .devicethread import DeviceThread, Stopped, Unresponsive, describe

log = logging.getLogger("agent.modem")

OnValues = Callable[[float, dict[str, Any]], None]
P = "Vehicle.Connectivity."
IDENTITY = ("AT+CGMM", "AT+CGSN", "AT+CCID")
POLL = ("AT+CSQ", "AT+CEREG?", "AT+CREG?", "AT+COPS?")
SILENT_LIMIT = 3  # consecutive unanswered commands before the port is reopened
READ_SLICE_S = 0.05  # serial read timeout: the granularity of stop() and URC handling
QUIET_S = 0.2  # after the opening AT: no byte for this long means old answers are drained
# Set after ATE0; ERROR or no answer is fine (a modem without CS, or without EPS).
_CBC = re.compile(r"\+CBC:\s*(?:(\d+),\s*\d+,\s*(\d+)|([\d.]+)\s*V)", re.I)
RADIO_OFF_S = 1.0  # between AT+CFUN=0 and AT+CFUN=1: long enough for the network to notice
RECOVERY_STEPS = ("reread", "radio", "reset")
SETUP = ("AT+CMEE=1",  # numeric +CME ERROR codes rather than plain ERROR
         "AT+CEREG=2", "AT+CREG=2")  # registration URCs with area and cell (ship as n=0)


def deadbands(cfg: ModemConfig) -> dict[str, float]:
    """The core's deadband for the modem's values (TelemetryCore.value_deadbands).

    Hysteresis, as OVMS has it: RSSI flickers by one 2 dB step at the edge of a cell, and
    every flicker would be telemetry noise. The setting means "moves by this much or more";
    a deadband means "moves by more than this"; dBm readings are whole numbers."""
    band = math.ceil(cfg.signal_hysteresis_db) - 1
    return {P + "SignalStrength": float(band)} if band > 0 else {}


class _Timeout(Exception):
    pass


class ModemPoller(DeviceThread):
    """One modem AT port. Thread-safe counters; one command at a time (an internal lock)."""

    thread_name = "modem"
    faults = (serial.SerialException, OSError, ValueError)
    log = log

    def __init__(self, cfg: ModemConfig, on_values: OnValues, backoff_s: float = 0.5,
                 backoff_cap_s: float = 30.0):
        super().__init__("modem", cfg.port, backoff_s, backoff_cap_s)
        self.cfg = cfg
        self.on_values = on_values
        self.counters = {name: 0 for name in (
            "commands", "timeouts", "errors", "garbage_lines", "urcs", "late_answers",
            "parse_errors")}
        self.values: dict[str, Any] = {}  # last value of each name, for status displays
        self._port: serial.Serial | None = None
        self._channel = at.AtChannel()
        self._silent = 0
        self._regs: dict[str, at.Registration | None] = {"+CEREG": None, "+CREG": None}
        self._io = threading.RLock()
        self._plan: list[tuple[float, str]] = []  # this poll cycle: (monotonic due, command)
        self._cycle_end = 0.0
        self.poll_interval_s = cfg.poll_interval_s  # set_poll_interval() while asleep
        self.bearer: bool | None = None  # a PDP context active (AT+CGACT?), None: not read
        self._steps: list[str] = []  # recovery steps waiting for the thread
        self._step_running = False
        self.recovery = {"steps": {s: 0 for s in RECOVERY_STEPS}, "last": ""}

    # -- lifecycle ------------------------------------------------------------------------

    def status(self) -> dict:
        """State, counters and `values`: the last value delivered for each name."""
        return {"state": self.state, "port": self.cfg.port, "last_error": self.last_error,
                **self.counters, "port_errors": self.errors, "opens": self.opens,
                "reopens": self.reopens, "poll_interval_s": self.poll_interval_s,
                "bearer": self.bearer, "recovery": {"steps": dict(self.recovery["steps"]),
                                                    "last": self.recovery["last"]},
                "values": dict(self.values)}

    # -- power and link recovery (any thread) ----------------------------------------------

    def set_poll_interval(self, seconds: float) -> None:
        """Poll every `seconds` from the next cycle on (asleep: slow; awake: the config's)."""
        if seconds != self.poll_interval_s:
            self.poll_interval_s = seconds
            self._cycle_end = min(self._cycle_end, time.monotonic() + seconds)

    def registered(self) -> bool | None:
        """The modem's last word on registration; None when it is not answering."""
        if self.state != "open":
            return None
        return self.values.get(P + "IsConnectivityAvailable")

    @property
    def recovering(self) -> bool:
        """A recovery step is queued or running (the next one waits for its outcome)."""
        return bool(self._steps) or self._step_running

    def recover(self, step: str) -> None:
        """Queue one recovery step ("reread", "radio", "reset") for the modem thread."""
        if step not in RECOVERY_STEPS:
            raise ValueError(f"unknown recovery step {step!r}")
        self._steps.append(step)

    # -- synchronous use (CLI) ------------------------------------------------------------

    def query_once(self) -> dict[str, Any]:
        """Open the port, read identity and network state once, return the values.

        Raises BusError when the port cannot be opened or the modem does not answer."""
        with self._io:
            own = self._port is None
            if own:
                self._open_or_raise()
            try:
                self._init()
                values: dict[str, Any] = {}
                for cmd in IDENTITY + POLL:
                    values.update(self._poll_one(cmd))
                return values
            except (_Timeout, Unresponsive):
                raise BusError(f"modem on {self.cfg.port}: no answer within "
                               f"{self.cfg.command_timeout_s} s; is this the AT port?") from None
            except (serial.SerialException, OSError) as e:
                raise BusError(f"modem on {self.cfg.port}: {e}") from None
            finally:
                if own:
                    self._close()

    def raw(self, command: str) -> at.AtResult:
        """Send one AT command (echo off first) and return its answer. Raises BusError."""
        with self._io:
            own = self._port is None
            if own:
                self._open_or_raise()
            try:
                if own:
                    self._init()
                return self._command(command)
            except ValueError as e:
                raise BusError(f"modem: {e}") from None
            except _Timeout as e:
                raise BusError(f"modem on {self.cfg.port}: no answer to {e.args[0]!r} within "
                               f"{self.cfg.command_timeout_s} s") from None
            except (serial.SerialException, OSError) as e:
                raise BusError(f"modem on {self.cfg.port}: {e}") from None
            finally:
                if own:
                    self._close()

    # -- the thread (DeviceThread's loop) --------------------------------------------------

    def _open(self) -> None:
        """Open the port and set the modem up: "open" means it answers, with echo off."""
        with self._io:
            self._port = self._serial()
            self._silent = 0
            try:
                self._init()
            except _Timeout as e:
                raise Unresponsive(f"no answer to {e.args[0]}") from None
        self._plan_cycle(first=True)

    def _read_once(self) -> bool:
        """One step of the poll cycle: the command that is due, else one read slice for URCs.
        True when the modem answered."""
        if self._steps:
            self._step_running = True
            try:
                self._recovery_step(self._steps.pop(0))
            finally:
                self._step_running = False
            return self._silent == 0
        now = time.monotonic()
        if not self._plan and now >= self._cycle_end:
            self._plan_cycle(first=False)
        if self._plan and now >= self._plan[0][0]:
            with self._io:
                values = self._poll_one(self._plan.pop(0)[1])
            if values:
                self._emit(values)
            return self._silent == 0
        with self._io:
            self._read_events()  # blocks at most READ_SLICE_S
        return False

    def _plan_cycle(self, first: bool) -> None:
        cycle = [c for c, name in zip(IDENTITY, ("Model", "Imei", "Iccid"))
                 if P + name not in self.values] + list(POLL)
        if self.cfg.read_voltage:
            cycle.append("AT+CBC")
        # The first cycle after an open runs back to back so values appear at once;
        # later ones are spread over the interval, one command per slot.
        gap = 0.0 if first else self.poll_interval_s / len(cycle)
        start = time.monotonic()
        self._plan = [(start + i * gap, cmd) for i, cmd in enumerate(cycle)]
        self._cycle_end = start + self.poll_interval_s

    def _recovery_step(self, step: str) -> None:
        self.recovery["steps"][step] += 1
        try:
            with self._io:
                if step == "radio":
                    self._command("AT+CFUN=0")
                    if self._stop.wait(RADIO_OFF_S):
                        raise Stopped
                    self._command("AT+CFUN=1")
                elif step == "reset":
                    self._command("AT+CFUN=1,1")
                    self.values.pop(P + "IsConnectivityAvailable", None)
                    self.bearer = None
                    self._note(step, "modem reset; reopening the port")
                    raise Unresponsive("reset by link recovery")
                self._reread()
            self._note(step, f"registered {self.registered()}, bearer {self.bearer}")
        except _Timeout as e:
            self._note(step, f"no answer to {e.args[0]}")

    def _reread(self) -> None:
        for cmd in ("AT+CEREG?", "AT+CREG?"):
            values = self._poll_one(cmd)
            if values:
                self._emit(values)
        result = self._command("AT+CGACT?")
        if result.ok:
            states = [ln.split(":", 1)[1].split(",") for ln in result.lines
                      if ln.upper().startswith("+CGACT:")]
            self.bearer = any(len(p) > 1 and p[1].strip() == "1" for p in states)

    def _note(self, step: str, result: str) -> None:
        self.recovery["last"] = f"{step}: {result}"
        log.warning("modem: link recovery step %s: %s", step, result)

    # -- commands -------------------------------------------------------------------------

    def _init(self) -> None:
        self._sync()
        # ATE0 answers "ATE0\r\r\nOK" while echo is still on; the channel drops the echo.
        # Its answer proves the modem is alive, so a timeout here is a real fault.
        self._command("ATE0")
        for command in SETUP:
            try:
                self._command(command)
            except _Timeout:
                pass

    def _sync(self) -> None:
        """Drop what is left from before this open: buffered bytes, then, after an AT, every
        byte until the line is quiet (late answers still on their way). Raises _Timeout when
        AT gets no answer at all."""
        port = self._port
        if port is None:
            raise serial.SerialException("port not open")
        port.reset_input_buffer()
        self._command("AT")
        end = time.monotonic() + self.cfg.command_timeout_s  # a babbling line: give up
        quiet = time.monotonic() + QUIET_S
        dropped = 0
        while time.monotonic() < min(quiet, end):
            if self._stop.is_set():
                raise Stopped
            data = port.read(max(1, port.in_waiting))
            if data:
                dropped += len(data)
                quiet = time.monotonic() + QUIET_S
        if dropped:
            log.debug("modem: dropped %d stale bytes after opening", dropped)
        self._channel = at.AtChannel()  # nothing in flight, no half line

    def _poll_one(self, cmd: str) -> dict[str, Any]:
        """Run one identity/poll command and return the values it yields (maybe none).

        Raises Unresponsive once SILENT_LIMIT commands in a row went unanswered."""
        try:
            result = self._command(cmd)
            if cmd == "AT+CCID" and not result.ok:
                result = self._command("AT+QCCID")  # Quectel spelling
            if not result.ok:
                return {}
            return self._values(cmd, result)
        except _Timeout:
            if self._silent >= SILENT_LIMIT:
                raise Unresponsive(f"{SILENT_LIMIT} commands without an answer") from None
            return {}
        except at.AtParseError as e:
            self.counters["parse_errors"] += 1
            log.debug("modem: %s: %s", cmd, e)
            return {}

    def _values(self, cmd: str, result: at.AtResult) -> dict[str, Any]:
        lines = result.lines
        if cmd == "AT+CGMM":
            return {P + "Model": at.parse_model(lines)}
        if cmd == "AT+CGSN":
            return {P + "Imei": at.parse_imei(lines)}
        if cmd == "AT+CCID":
            return {P + "Iccid": at.parse_iccid(lines)}
        if cmd == "AT+CSQ":
            return {P + "SignalStrength": at.parse_csq(lines)}
        if cmd in ("AT+CEREG?", "AT+CREG?"):
            prefix = cmd[2:-1]
            line = next((ln for ln in lines if ln.upper().startswith(prefix + ":")), None)
            if line is None:
                raise at.AtParseError(f"no {prefix}: line in {lines!r}")
            self._regs[prefix] = at.parse_registration(line)
            return self._registration_values()
        if cmd == "AT+CBC":  # SIMCom "+CBC: 3.805V"; Quectel "+CBC: 0,76,3805" (mV)
            m = next((m for ln in lines if (m := _CBC.search(ln))), None)
            if m is None:
                raise at.AtParseError(f"no +CBC: line in {lines!r}")
            volts = float(m.group(3)) if m.group(3) else int(m.group(2)) / 1000
            return {P + "SupplyVoltage": round(volts, 3)}
        if cmd == "AT+COPS?":
            op = at.parse_cops(lines)
            out: dict[str, Any] = {P + "Operator": op.name}
            if op.act:
                out[P + "AccessTechnology"] = op.act
            return out
        return {}

    def _registration_values(self) -> dict[str, Any]:
        reg = at.combine_registration(self._regs["+CEREG"], self._regs["+CREG"])
        if reg is None:
            return {}
        out: dict[str, Any] = {P + "Registration": reg.state,
                               P + "IsConnectivityAvailable": reg.state in ("home", "roaming")}
        if reg.area:
            out[P + "AreaCode"] = reg.area
        if reg.cell:
            out[P + "CellId"] = reg.cell
        if reg.act:
            out[P + "AccessTechnology"] = reg.act
        return out

    def _command(self, command: str) -> at.AtResult:
        """Send one command and wait for its final result. Raises _Timeout, SerialException."""
        port = self._port
        if port is None:
            raise serial.SerialException("port not open")
        self._settle(port)
        data = self._channel.begin(command)
        self.counters["commands"] += 1
        port.write(data)
        deadline = time.monotonic() + self.cfg.command_timeout_s
        while time.monotonic() < deadline:
            if self._stop.is_set():
                raise Stopped
            for result in self._read_events(port):
                if result.command == command and not result.late:
                    self._silent = 0
                    if not result.ok:
                        self.counters["errors"] += 1
                    return result
        # No answer: it may still come; the channel will recognise it as late (for up to
        # one more timeout) instead of taking it for the next command's answer.
        self._channel.abandon(time.monotonic(), self.cfg.command_timeout_s)
        self.counters["timeouts"] += 1
        self._silent += 1
        log.debug("modem: %s timed out", command)
        raise _Timeout(command)

    def _settle(self, port: serial.Serial) -> None:
        """Before a new command, give an abandoned one's late answer its chance to arrive."""
        while not self._channel.settle(time.monotonic()):
            if self._stop.is_set():
                raise Stopped
            self._read_events(port)

    def _read_events(self, port: serial.Serial | None = None) -> list[at.AtResult]:
        """One read slice: feed the channel, count/handle URCs and garbage; return results."""
        port = port or self._port
        if port is None:
            raise serial.SerialException("port not open")
        data = port.read(max(1, port.in_waiting))  # blocks at most READ_SLICE_S
        if data:
            self._channel.receive_data(data)
        results = []
        while (event := self._channel.next_event()) is not at.NEED_DATA:
            if isinstance(event, at.AtResult):
                if event.late:
                    self.counters["late_answers"] += 1
                    self._silent = 0  # slow but alive: reopening the port would not help
                else:
                    results.append(event)
            elif isinstance(event, at.Urc):
                self.counters["urcs"] += 1
                self._urc(event.line)
            else:
                self.counters["garbage_lines"] += 1
        return results

    def _urc(self, line: str) -> None:
        """An unsolicited registration change is applied at once; other URCs are only counted."""
        head = line.split(":")[0].upper()
        if head in self._regs:
            try:
                self._regs[head] = at.parse_registration(line)
            except at.AtParseError:
                self.counters["parse_errors"] += 1
                return
            if self._thread is not None:
                self._emit(self._registration_values())

    # -- port -----------------------------------------------------------------------------

    def _serial(self) -> serial.Serial:
        self._channel = at.AtChannel()  # a new port starts with nothing in flight
        # exclusive: a second user of the AT port (the CLI beside the agent) would steal
        # half of each answer; with a lock it gets a clear "in use" instead.
        return serial.Serial(self.cfg.port, self.cfg.baud, timeout=READ_SLICE_S,
                             write_timeout=self.cfg.command_timeout_s, exclusive=True)

    def _open_or_raise(self) -> None:
        try:
            self._port = self._serial()
        except (serial.SerialException, OSError, ValueError) as e:
            if "lock" in str(e).lower():
                raise BusError(f"modem: {self.cfg.port} is in use by another process (the "
                               "agent?); stop it first") from None
            why = os.strerror(e.errno) if getattr(e, "errno", None) else describe(e)
            raise BusError(f"modem: cannot open {self.cfg.port}: {why}; check [modem] port "
                           "in the config") from None

    def _close(self) -> None:
        with self._io:
            port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as e:  # a vanished device may refuse
                log.debug("modem: close: %s", e)

    def _emit(self, values: dict[str, Any]) -> None:
        self.values.update(values)
        try:
            self.on_values(time.time(), values)
        except Exception:  # a sink bug must not stop polling
            log.exception("modem: on_values failed")
