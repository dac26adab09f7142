"""NMEA 0183 GGA and RMC sentences, sans-I/O: bytes in, fixes and values out.

Why our own parser and not pynmea2: no extra dependency on the vehicle; we need only two
sentence types; and we want strictness pynmea2 does not give by default (it accepts a
sentence without a checksum and parses fields lazily, so a corrupt field surfaces later as
an exception in the caller). Here every sentence must carry a correct `*hh` checksum and
every field is validated when the sentence is parsed, in a few dozen lines.

`NmeaReader` frames bytes into sentences and counts what it drops; `parse_sentence` parses
one line and raises NmeaError(reason) with reason "checksum", "format" or "unsupported";
`location_values` maps a parsed sentence to Vehicle.CurrentLocation.* values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from agent.errors import NmeaError

KNOTS_TO_KMH = 1.852
MAX_SENTENCE = 120  # NMEA says 82 characters; some receivers send a little more


@dataclass(frozen=True, slots=True, kw_only=True)
class Gga:
    """GGA: fix data. Position fields are None when quality is 0 (no fix)."""
    talker: str
    time_utc: str  # hhmmss[.ss] as sent
    latitude: float | None
    longitude: float | None
    quality: int  # 0 none, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning...
    satellites: int
    hdop: float | None
    altitude_m: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rmc:
    """RMC: recommended minimum. `valid` is status A; position/speed None when not valid."""
    talker: str
    timestamp: datetime | None  # date + time, UTC
    valid: bool
    latitude: float | None
    longitude: float | None
    speed_kmh: float | None
    heading_deg: float | None  # course over ground, true


def checksum(body: str) -> int:
    """XOR of the characters between '$' and '*'."""
    value = 0
    for ch in body:
        value ^= ord(ch)
    return value


def parse_sentence(line: str) -> Gga | Rmc:
    """Parse one sentence ("$GPGGA,...*47"). Raises NmeaError."""
    line = line.strip()
    if not line.startswith(("$", "!")) or len(line) > MAX_SENTENCE:
        raise NmeaError("format", f"not an NMEA sentence: {line[:40]!r}")
    body, star, given = line[1:].rpartition("*")
    if not star or len(given) != 2:
        raise NmeaError("checksum", f"no checksum: {line[:40]!r}")
    try:
        expected = int(given, 16)
    except ValueError:
        raise NmeaError("checksum", f"bad checksum digits {given!r}") from None
    if checksum(body) != expected:
        raise NmeaError("checksum", f"checksum {given} != {checksum(body):02X} in {line[:40]!r}")
    fields = body.split(",")
    tag = fields[0]
    if len(tag) != 5 or not tag.isalpha():
        raise NmeaError("format", f"bad address field {tag!r}")
    try:
        if tag[2:] == "GGA":
            return _gga(tag[:2], fields)
        if tag[2:] == "RMC":
            return _rmc(tag[:2], fields)
    except (ValueError, IndexError) as e:
        raise NmeaError("format", f"{tag}: {e}") from None
    raise NmeaError("unsupported", f"sentence {tag} not used")


def _gga(talker: str, f: list[str]) -> Gga:
    if len(f) < 15:
        raise ValueError(f"{len(f) - 1} fields, need 14")
    _time(f[1])
    quality = int(f[6])
    lat, lon = None, None
    if quality:
        lat, lon = _coord(f[2], f[3], "NS", 2), _coord(f[4], f[5], "EW", 3)
    if quality and (lat is None or lon is None):
        raise ValueError("fix quality set but no position")
    if f[10] not in ("M", "") or f[12] not in ("M", ""):
        raise ValueError("altitude units are not metres")
    return Gga(talker=talker, time_utc=f[1], latitude=lat, longitude=lon, quality=quality,
               satellites=int(f[7]) if f[7] else 0, hdop=_num(f[8]),
               altitude_m=_num(f[9]) if quality else None)


def _rmc(talker: str, f: list[str]) -> Rmc:
    if len(f) < 12:
        raise ValueError(f"{len(f) - 1} fields, need 11")
    if f[2] not in ("A", "V"):
        raise ValueError(f"status {f[2]!r} is neither A nor V")
    valid = f[2] == "A" and (len(f) < 13 or f[12] != "N")  # mode N: data not valid (NMEA 2.3)
    stamp = None
    if f[1] and f[9]:
        hh, mm, ss = _time(f[1])
        d = f[9]
        if len(d) != 6 or not d.isdigit():
            raise ValueError(f"bad date {d!r}")
        yy = int(d[4:])  # two-digit year: GPS began in 1980, so 80..99 are the 1900s
        micros = min(round((ss % 1) * 1e6), 999_999)
        stamp = datetime(yy + (1900 if yy >= 80 else 2000), int(d[2:4]), int(d[:2]),
                         hh, mm, int(ss), micros, tzinfo=UTC)
    lat, lon = _coord(f[3], f[4], "NS", 2), _coord(f[5], f[6], "EW", 3)
    if valid and (lat is None or lon is None):
        raise ValueError("status A but no position")
    speed, course = _num(f[7]), _num(f[8])
    if course is not None and not 0 <= course <= 360:
        raise ValueError(f"course {course} out of range")
    return Rmc(talker=talker, timestamp=stamp, valid=valid,
               latitude=lat if valid else None, longitude=lon if valid else None,
               speed_kmh=round(speed * KNOTS_TO_KMH, 3) if valid and speed is not None else None,
               heading_deg=course if valid else None)


def _time(text: str) -> tuple[int, int, float]:
    if len(text) < 6 or not text[:6].isdigit():
        raise ValueError(f"bad time {text!r}")
    hh, mm, ss = int(text[:2]), int(text[2:4]), float(text[4:])
    if hh > 23 or mm > 59 or ss >= 61:
        raise ValueError(f"bad time {text!r}")
    return hh, mm, ss


def _coord(value: str, hemi: str, hemis: str, deg_digits: int) -> float | None:
    """ddmm.mmmm / dddmm.mmmm + hemisphere → signed decimal degrees; None when empty."""
    if not value and not hemi:
        return None
    if hemi not in hemis or "." not in value or value.index(".") != deg_digits + 2:
        raise ValueError(f"bad coordinate {value!r},{hemi!r}")
    degrees, minutes = int(value[:deg_digits]), float(value[deg_digits:])
    if minutes >= 60 or degrees > (90 if deg_digits == 2 else 180):
        raise ValueError(f"coordinate out of range {value!r}")
    result = degrees + minutes / 60
    return -result if hemi == hemis[1] else result


def _num(text: str) -> float | None:
    return float(text) if text else None


class NmeaReader:
    """Frames a byte stream into sentences. Counters say what was dropped and why."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.sentences = 0
        self.bad_checksums = 0
        self.garbage_lines = 0  # not NMEA, malformed fields, overlong runs, non-ASCII
        self.unsupported = 0  # valid NMEA we do not use (GSV, VTG, ...)

    def feed(self, data: bytes) -> list[Gga | Rmc]:
        """Feed bytes (any chunking); returns the sentences completed by them."""
        self._buf += data
        out = []
        while True:
            cut = min((i for i in (self._buf.find(b"\r"), self._buf.find(b"\n")) if i >= 0),
                      default=-1)
            if cut < 0:
                break
            raw, self._buf = bytes(self._buf[:cut]), self._buf[cut + 1:]
            sentence = self._parse(raw)
            if sentence is not None:
                out.append(sentence)
        start = self._buf.rfind(b"$")
        if len(self._buf) > MAX_SENTENCE:  # no line end: keep only a possible sentence start
            self.garbage_lines += 1
            self._buf = self._buf[start:] if 0 <= start and len(self._buf) - start <= MAX_SENTENCE \
                else bytearray()
        return out

    def _parse(self, raw: bytes) -> Gga | Rmc | None:
        raw = raw.strip()
        if not raw:
            return None
        start = raw.rfind(b"$")  # a sentence glued to the tail of a cut one: keep the sentence
        if start > 0:
            self.garbage_lines += 1
            raw = raw[start:]
        try:
            sentence = parse_sentence(raw.decode("ascii"))
        except UnicodeDecodeError:
            self.garbage_lines += 1
            return None
        except NmeaError as e:
            if e.reason == "checksum":
                self.bad_checksums += 1
            elif e.reason == "unsupported":
                self.unsupported += 1
            else:
                self.garbage_lines += 1
            return None
        self.sentences += 1
        return sentence


PREFIX = "Vehicle.CurrentLocation."


def location_values(sentence: Gga | Rmc) -> dict[str, object]:
    """Vehicle.CurrentLocation.* values carried by one sentence (nothing invented when no fix).

    GGA → FixQuality, Satellites, and with a fix Latitude, Longitude, Altitude, Hdop.
    RMC → with status A Latitude, Longitude, Speed (km/h), Heading; Timestamp (ISO 8601) always.
    """
    v: dict[str, object] = {}
    if isinstance(sentence, Gga):
        v[PREFIX + "FixQuality"] = sentence.quality
        v[PREFIX + "Satellites"] = sentence.satellites
        if sentence.quality:
            v[PREFIX + "Latitude"] = round(sentence.latitude, 7)
            v[PREFIX + "Longitude"] = round(sentence.longitude, 7)
            if sentence.altitude_m is not None:
                v[PREFIX + "Altitude"] = sentence.altitude_m
            if sentence.hdop is not None:
                v[PREFIX + "Hdop"] = sentence.hdop
        return v
    if sentence.timestamp is not None:
        v[PREFIX + "Timestamp"] = sentence.timestamp.isoformat().replace("+00:00", "Z")
    if sentence.valid:
        v[PREFIX + "Latitude"] = round(sentence.latitude, 7)
        v[PREFIX + "Longitude"] = round(sentence.longitude, 7)
        if sentence.speed_kmh is not None:
            v[PREFIX + "Speed"] = sentence.speed_kmh
        if sentence.heading_deg is not None:
            v[PREFIX + "Heading"] = sentence.heading_deg
    return v
