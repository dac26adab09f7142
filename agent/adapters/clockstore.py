"""The persisted time floor (agent.core.clock): `{storage}/clock.json`, written atomically.

    {"floor_ms": 1767225600000, "source": "gnss"}

Written (temp file, fsync, rename, fsync of the directory) when an observation raised the
floor more than RAISE_MIN_MS above the stored one carried forward by the monotonic time since
it was written, and every `save_interval_ms` of monotonic time so that the stored floor keeps
up with the time the vehicle has been running. With a monotonic clock a little slow against
GNSS, nearly every fix (one a second) raises the floor by a few ms; writing each would be a
flash page and two fsyncs a second for less than a restart already misses (up to
`save_interval_ms` of running time). An unreadable or corrupt file is logged and treated as
no floor: the floor only protects against a clock behind it, it never refuses anything itself.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..core.clock import SOURCES, TrustedClock
from .atomic import atomic_write

log = logging.getLogger("agent.clock")

FILE = "clock.json"
SAVE_INTERVAL_MS = 10 * 60 * 1000
RAISE_MIN_MS = 1000  # smaller raises wait for the interval


def mono_ms() -> int:
    """Monotonic ms for the clock: CLOCK_BOOTTIME where there is one (counts suspend too)."""
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.clock_gettime_ns(clock) // 1_000_000


def system_ms() -> int:
    return time.time_ns() // 1_000_000


class ClockStore:
    def __init__(self, directory: Path, save_interval_ms: int = SAVE_INTERVAL_MS,
                 mono=mono_ms):
        self.path = Path(directory) / FILE
        self.save_interval_ms = save_interval_ms
        self._mono = mono
        floor, source = self._load()
        self.clock = TrustedClock(floor, "stored" if floor else "none", self._mono())
        self.loaded_source = source
        self._saved_mono = self._mono()
        self._saved_bound = floor  # the floor_ms last written (0: none)
        self.save_failures = 0

    def _load(self) -> tuple[int, str]:
        try:
            raw = json.loads(self.path.read_text())
            floor, source = raw["floor_ms"], raw["source"]
            if type(floor) is not int or floor < 0 or source not in SOURCES:
                raise ValueError("bad values")
            return floor, source
        except FileNotFoundError:
            return 0, "none"
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("time floor %s unreadable (%s): starting without one", self.path, e)
            return 0, "none"

    def save(self) -> bool:
        state = self.clock.state(self._mono())
        data = json.dumps({"floor_ms": state.floor_ms, "source": state.source}).encode()
        try:
            atomic_write(self.path, data, 0o600)
        except OSError as e:
            self.save_failures += 1
            log.error("cannot store the time floor: %s", e)
            return False
        self._saved_mono = self._mono()
        self._saved_bound = state.floor_ms
        return True

    def _raised(self) -> bool:
        """The floor is RAISE_MIN_MS or more above the stored one carried forward."""
        mono = self._mono()
        if not self._saved_bound:
            return True
        return (self.clock.bound_ms(mono) - self._saved_bound - (mono - self._saved_mono)
                >= RAISE_MIN_MS)

    def observed(self, raised: bool) -> None:
        """Call after clock.observe()/gnss_fix(): persist a floor raised by RAISE_MIN_MS or
        more at once."""
        if raised and self._raised():
            self.save()

    def tick(self) -> None:
        """Call now and then: persist a floor raised since the last save (an accepted command's
        iat), and the advancing bound every save_interval_ms."""
        if not self.clock.floor_ms:
            return
        if self._mono() - self._saved_mono >= self.save_interval_ms or self._raised():
            self.save()
