"""A clock the checks can trust: the system clock, never earlier than a time floor. Sans-I/O.

The floor is the newest trusted time the vehicle has seen:
- the `iat` of an accepted command (signed by a trusted key, and at most max_skew_ms ahead of
  the time the gate used, so one command moves the floor by at most that much);
- GNSS time from a valid RMC fix (status A).
(TUF timestamp metadata is not a source: it carries a version and an expiry, no issue time, so
it gives no lower bound on the current time.)

The floor was true when it was observed, so floor + the monotonic time elapsed since is still a
lower bound on the true time (monotonic time stops during suspend: the bound only gets lower,
never wrong). After a restart the persisted floor is anchored at the monotonic time it was
loaded. now_ms(system_ms, mono_ms) = max(system_ms, that bound): a TCU whose RTC battery died
and that boots in 1970 evaluates every check against the floor instead, and says so
(`behind`). A clock set ahead cannot be corrected this way (a floor only bounds from below);
a GNSS fix that disagrees with the system clock by more than the allowed skew is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["TrustedClock", "ClockState", "SOURCES"]

SOURCES = ("none", "command", "gnss", "stored")
BEHIND_TOLERANCE_MS = 2000  # a cloud clock a little ahead is not "behind"


@dataclass(frozen=True, slots=True)
class ClockState:
    """What is persisted: the floor and where it came from."""

    floor_ms: int
    source: str


class TrustedClock:
    def __init__(self, floor_ms: int = 0, source: str = "none", mono_ms: int = 0,
                 behind_tolerance_ms: int = BEHIND_TOLERANCE_MS):
        """floor_ms as loaded (0: none yet), anchored at mono_ms (now, on this boot)."""
        if source not in SOURCES:
            raise ValueError(f"unknown clock source {source!r}")
        self.floor_ms = max(0, int(floor_ms))
        self.source = source
        self._anchor_mono_ms = mono_ms
        self.tolerance_ms = behind_tolerance_ms
        self.behind = False
        self.behind_by_ms = 0
        self.gnss_skew_ms: int | None = None  # system - GNSS at the last valid fix
        self.skew_warning = False

    def bound_ms(self, mono_ms: int) -> int:
        """The lower bound on the true time: floor + monotonic time since it was observed."""
        if self.floor_ms == 0:
            return 0
        return self.floor_ms + max(0, mono_ms - self._anchor_mono_ms)

    def now_ms(self, system_ms: int, mono_ms: int) -> int:
        """The time every check uses: the system clock, never earlier than the bound."""
        bound = self.bound_ms(mono_ms)
        self.behind_by_ms = max(0, bound - system_ms)
        self.behind = self.behind_by_ms > self.tolerance_ms
        return max(system_ms, bound)

    def observe(self, trusted_ms: int, mono_ms: int, source: str) -> bool:
        """A trusted time seen at mono_ms; True when it raised the bound (persist it)."""
        if source not in SOURCES:
            raise ValueError(f"unknown clock source {source!r}")
        if type(trusted_ms) is not int or trusted_ms <= self.bound_ms(mono_ms):
            return False
        self.floor_ms, self.source, self._anchor_mono_ms = trusted_ms, source, mono_ms
        return True

    def gnss_fix(self, gnss_ms: int, system_ms: int, mono_ms: int, max_skew_ms: int) -> bool:
        """A valid RMC fix: raise the floor, measure the system clock against it. Returns
        True when the floor rose. `skew_warning` says |system - GNSS| > max_skew_ms."""
        self.gnss_skew_ms = system_ms - gnss_ms
        self.skew_warning = abs(self.gnss_skew_ms) > max_skew_ms
        return self.observe(gnss_ms, mono_ms, "gnss")

    def state(self, mono_ms: int) -> ClockState:
        """What to persist: the current bound (a floor that has kept up with elapsed time)."""
        return ClockState(self.bound_ms(mono_ms), self.source if self.floor_ms else "none")

    def status(self) -> dict:
        out = {"clock": "behind" if self.behind else "ok", "floor_ms": self.floor_ms,
               "floor_source": self.source}
        if self.behind:
            out["behind_ms"] = self.behind_by_ms
        if self.gnss_skew_ms is not None:
            out["gnss_skew_ms"] = self.gnss_skew_ms
            out["gnss_skew_warning"] = self.skew_warning
        return out


def rmc_time_ms(values: dict) -> int | None:
    """GNSS time (ms) from the values of one valid RMC sentence (agent.core.nmea's
    location_values: a Timestamp and, only with status A, a Latitude), else None."""
    stamp = values.get("Vehicle.CurrentLocation.Timestamp")
    if not isinstance(stamp, str) or "Vehicle.CurrentLocation.Latitude" not in values:
        return None
    try:
        t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    return int(t.timestamp() * 1000)
