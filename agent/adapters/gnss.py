"""A GNSS receiver's NMEA port over pyserial: position into Vehicle.CurrentLocation.*.

`GnssReader` reads in a daemon thread, reopens a vanished port with backoff (a USB receiver
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


class GnssReader(DeviceThread):
    """One NMEA port read by a daemon thread. Counters for status displays."""

    thread_name = "gnss"
    ready_states = ("open", "silent")
    faults = (serial.SerialException, OSError, ValueError)
    log = log

    def __init__(self, cfg: GnssConfig, on_values: OnValues, backoff_s: float = 0.5,
                 backoff_cap_s: float = 30.0, silent_s: float = SILENT_S):
        super().__init__("gnss", cfg.port, backoff_s, backoff_cap_s)
        self.cfg = cfg
        self.silent_s = silent_s
        self.on_values = on_values
        self.reader = NmeaReader()
        self.values: dict[str, Any] = {}  # last value of each name, for status displays
        self.last_sentence_monotonic: float | None = None
        self._port: serial.Serial | None = None

    def status(self) -> dict:
        r = self.reader
        return {"state": self.state, "port": self.cfg.port, "sentences": r.sentences,
                "bad_checksums": r.bad_checksums, "garbage_lines": r.garbage_lines,
                "unsupported": r.unsupported, "port_errors": self.errors,
                "opens": self.opens, "reopens": self.reopens, "last_error": self.last_error,
                "values": dict(self.values)}

    def _open(self) -> None:
        self._port = serial.Serial(self.cfg.port, self.cfg.baud, timeout=0.2, exclusive=True)
        self.reader = _carry_counters(self.reader)  # drop a half line from the old port
        self.last_sentence_monotonic = time.monotonic()

    def _read_once(self) -> bool:
        """One read; True only when data came (a port that opens but gives nothing, then
        fails, keeps backing off)."""
        data = self._port.read(max(1, self._port.in_waiting))
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
        return bool(data)

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
