"""A GNSS receiver on a pseudo-terminal, emitting NMEA GGA + RMC along a route.

    gnss = SimulatedGnss([(48.1173, 11.5167), (48.1300, 11.5500)], speed_kmh=50,
                         rate_hz=5, link=tmp_path / "ttyGNSS").start()
    ... GnssConfig(port=gnss.path) ...
    gnss.corrupt_every = 4   # every 4th sentence with a data digit changed (see corrupt())
    gnss.fix = False         # lose the fix: GGA quality 0, RMC status V
    gnss.inject(b"\\xff\\xfe$GPG")  # raw noise / a cut sentence
    gnss.unplug(); gnss.replug()
    gnss.stop()

The position moves along the route's straight segments (great-circle distance, linear
interpolation, fine at road scale) at `speed_kmh`, stopping at the last point. `nmea()`,
`fix_sentences()`, `corrupt()` and `Route` are pure, for tests that want exact sentences.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path

from ..core.nmea import KNOTS_TO_KMH, checksum
from .pty import PtyDevice

EARTH_RADIUS_M = 6371008.8


def nmea(body: str) -> str:
    """A complete sentence with checksum: nmea("GPGGA,...") -> "$GPGGA,...*hh\\r\\n"."""
    return f"${body}*{checksum(body):02X}\r\n"


def _lat(v: float) -> tuple[str, str]:
    d = int(abs(v))
    return f"{d:02d}{(abs(v) - d) * 60:07.4f}", "N" if v >= 0 else "S"


def _lon(v: float) -> tuple[str, str]:
    d = int(abs(v))
    return f"{d:03d}{(abs(v) - d) * 60:07.4f}", "E" if v >= 0 else "W"


def fix_sentences(when: datetime, lat: float, lon: float, *, altitude_m: float = 520.0,
                  speed_kmh: float = 0.0, heading_deg: float = 0.0, satellites: int = 9,
                  fix: bool = True, talker: str = "GN") -> list[str]:
    """GGA and RMC for one epoch (fix=False: quality 0 / status V, no position)."""
    hms = when.strftime("%H%M%S.") + f"{when.microsecond // 10000:02d}"
    la, ns = _lat(lat) if fix else ("", "")
    lo, ew = _lon(lon) if fix else ("", "")
    gga = (f"{talker}GGA,{hms},{la},{ns},{lo},{ew},{1 if fix else 0},{satellites:02d},"
           f"{0.9 if fix else 99.9},{f'{altitude_m:.1f}' if fix else ''},M,47.0,M,,")
    knots = f"{speed_kmh / KNOTS_TO_KMH:.2f}" if fix else ""
    course = f"{heading_deg:.1f}" if fix else ""
    rmc = (f"{talker}RMC,{hms},{'A' if fix else 'V'},{la},{ns},{lo},{ew},{knots},{course},"
           f"{when.strftime('%d%m%y')},,,{'A' if fix else 'N'}")
    return [nmea(gga), nmea(rmc)]


def corrupt(sentence: str) -> str:
    """A transmission error: the first digit of the latitude (of the time without a fix) is
    changed and the original checksum kept, so only checksum verification can tell."""
    body, star, rest = sentence.partition("*")
    fields = body.split(",")
    i = 3 if fields[0].endswith("RMC") else 2  # latitude in RMC / GGA
    i = i if fields[i][:1].isdigit() else 1
    fields[i] = str((int(fields[i][0]) + 1) % 10) + fields[i][1:]
    return ",".join(fields) + star + rest


def _distance_m(a, b) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    h = (math.sin((la2 - la1) / 2) ** 2
         + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2)
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


def _bearing(a, b) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (*a, *b))
    y = math.sin(lo2 - lo1) * math.cos(la2)
    x = math.cos(la1) * math.sin(la2) - math.sin(la1) * math.cos(la2) * math.cos(lo2 - lo1)
    return math.degrees(math.atan2(y, x)) % 360


class Route:
    """Points (lat, lon) joined by straight segments; position(distance) interpolates."""

    def __init__(self, points):
        self.points = [(float(a), float(b)) for a, b in points]
        if not self.points:
            raise ValueError("a route needs at least one point")
        self.legs = [_distance_m(a, b) for a, b in zip(self.points, self.points[1:])]
        self.length_m = sum(self.legs)

    def position(self, distance_m: float) -> tuple[float, float, float]:
        """(lat, lon, heading_deg) after `distance_m` along the route (clamped to its end)."""
        if len(self.points) == 1:
            return (*self.points[0], 0.0)
        distance_m = max(distance_m, 0.0)
        for (a, b), leg in zip(zip(self.points, self.points[1:]), self.legs):
            if distance_m <= leg:
                f = distance_m / leg if leg else 1.0
                return (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, _bearing(a, b))
            distance_m -= leg
        a, b = self.points[-2], self.points[-1]
        return (*b, _bearing(a, b))


class SimulatedGnss(PtyDevice):
    """NMEA emitter. Attributes may be changed while it runs."""

    def __init__(self, route, *, speed_kmh: float = 50.0, rate_hz: float = 1.0,
                 altitude_m: float = 520.0, satellites: int = 9, talker: str = "GN",
                 link: str | Path | None = None):
        super().__init__(link, name="sim-gnss")
        self.route = route if isinstance(route, Route) else Route(route)
        self.speed_kmh = speed_kmh
        self.rate_hz = rate_hz
        self.altitude_m = altitude_m
        self.satellites = satellites
        self.talker = talker
        self.fix = True
        self.corrupt_every = 0  # 0 = never; N = every Nth sentence is corrupted in transit
        self.sentences_sent = 0
        self.distance_m = 0.0
        self._last = time.monotonic()

    def inject(self, data: bytes) -> None:
        """Raw bytes onto the line (noise, a cut sentence)."""
        self.write(data)

    def _step(self) -> None:
        self._stop.wait(1.0 / self.rate_hz)
        now = time.monotonic()
        self.distance_m = min(self.distance_m + self.speed_kmh / 3.6 * (now - self._last),
                              self.route.length_m)
        self._last = now
        lat, lon, heading = self.route.position(self.distance_m)
        moving = self.distance_m < self.route.length_m
        for s in fix_sentences(datetime.now(UTC), lat, lon, altitude_m=self.altitude_m,
                               speed_kmh=self.speed_kmh if moving else 0.0, heading_deg=heading,
                               satellites=self.satellites, fix=self.fix, talker=self.talker):
            self.sentences_sent += 1
            if self.corrupt_every and self.sentences_sent % self.corrupt_every == 0:
                s = corrupt(s)
            self.write(s.encode("ascii"))
