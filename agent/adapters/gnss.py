"""A GNSS receiver's NMEA port over pyserial: position into Vehicle.CurrentLocation.*.

`GnssService` reads in a daemon thread, reopens a vanished port with backoff (a USB receiver
or a modem's NMEA port re-enumerating), and hands each GGA/RMC's values to
`on_values(t_unix_s, {name: value})`. See agent.core.nmea.location_values for the names:

  Vehicle.CurrentLocation.Latitude / .Longitude   float  degrees (WGS84), + north / + east
  Vehicle.CurrentLocation.Altitude                float  m above mean sea level (GGA)
  Vehicle.CurrentLocation.Speed                   float  km/h over ground (RMC)
  Vehicle.CurrentLocation.Heading                 float  degrees true, course over ground (RMC)
  Vehicle.CurrentLocation.FixQuality              int    GGA quality: 0 none, 1 GPS, 2 DGPS...
  Vehicle.CurrentLocation.Satellites              int    satellites in use (GGA)
  Vehicle.CurrentLocation.Hdop                    float  horizontal dilution of precision (GGA)
  Vehicle.CurrentLocation.Timestamp               str    ISO 8601 UTC of the fix (RMC)

The sample time is the agent's clock at reception (like CAN frames), not the fix time,
which is carried in .Timestamp. Garbage, bad checksums and silence are counted, never raised.
A port that opens but fails to read (a device that keeps dropping off) is retried with the
same backoff as one that fails to open; the backoff restarts only once data arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import serial

from ..config import GnssConfig
from ..core.nmea import NmeaReader, location_values
from .devicethread import DeviceThread

log = logging.getLogger("agent.gnss")

OnValues = Callable[[float, dict[str, Any]], None]
SILENT_S = 5.0  # no sentence for this long (at >= 1 Hz): state "silent"


class GnssService(DeviceThread):
    """One NMEA port read by a daemon thread. Counters for status displays."""

    thread_name = "gnss"
    ready_states = ("open", "silent")

    def __init__(self, cfg: GnssConfig, on_values: OnValues, backoff_s: float = 0.5,
                 backoff_cap_s: float = 30.0, silent_s: float = SILENT_S):
        self.cfg = cfg
        self.silent_s = silent_s
        self.on_values = on_values
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.state = "closed"
        self.reader = NmeaReader()
        self.port_errors = 0
        self.opens = 0
        self.reopens = 0
        self.last_error = ""
        self.values: dict[str, Any] = {}  # last value of each name, for status displays
        self.last_sentence_monotonic: float | None = None
        self._init_thread()
        self._port: serial.Serial | None = None

    def status(self) -> dict:
        r = self.reader
        return {"state": self.state, "port": self.cfg.port, "sentences": r.sentences,
                "bad_checksums": r.bad_checksums, "garbage_lines": r.garbage_lines,
                "unsupported": r.unsupported, "port_errors": self.port_errors,
                "opens": self.opens, "reopens": self.reopens, "last_error": self.last_error,
                "values": dict(self.values)}

    def _run(self) -> None:
        delay = self.backoff_s
        failed = False
        while not self._stop.is_set():
            if self._port is None:
                try:
                    self._port = serial.Serial(self.cfg.port, self.cfg.baud, timeout=0.2,
                                               exclusive=True)
                except (serial.SerialException, OSError, ValueError) as e:
                    self._fault("open", e)
                    failed = True
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff_cap_s)
                    continue
                self.opens += 1
                if failed:
                    self.reopens += 1
                    log.info("gnss: reopened %s", self.cfg.port)
                failed = False
                self.reader = _carry_counters(self.reader)  # drop a half line from the old port
                self.state = "open"
                self.last_sentence_monotonic = time.monotonic()
            try:
                data = self._port.read(max(1, self._port.in_waiting))
            except (serial.SerialException, OSError) as e:
                self._fault("read", e)
                self._close()
                failed = True
                self._stop.wait(delay)  # else a port that opens but cannot be read spins
                delay = min(delay * 2, self.backoff_cap_s)
                continue
            if data:
                delay = self.backoff_s  # a working port: the next fault starts afresh
            now = time.monotonic()
            for sentence in self.reader.feed(data) if data else ():
                self.last_sentence_monotonic = now
                values = location_values(sentence)
                if values:
                    self.values.update(values)
                    try:
                        self.on_values(time.time(), values)
                    except Exception:  # a sink bug must not stop reading
                        log.exception("gnss: on_values failed")
            silent = now - (self.last_sentence_monotonic or now) > self.silent_s
            self.state = "silent" if silent else "open"

    def _fault(self, what: str, e: Exception) -> None:
        self.port_errors += 1
        self.state = "down"
        text = f"{type(e).__name__}: {e}"
        if text != self.last_error:  # log each distinct fault once, not every retry
            log.warning("gnss: %s failed on %s: %s", what, self.cfg.port, text)
        self.last_error = text

    def _close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as e:
                log.debug("gnss: close: %s", e)


def _carry_counters(old: NmeaReader) -> NmeaReader:
    new = NmeaReader()
    new.sentences, new.bad_checksums = old.sentences, old.bad_checksums
    new.garbage_lines, new.unsupported = old.garbage_lines, old.unsupported
    return new
