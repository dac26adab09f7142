"""Rate limits with the time passed in. Pure."""

from __future__ import annotations


class TokenBucket:
    """`rate_per_s` tokens per second, at most `burst` saved up; starts full. Time passed in."""

    def __init__(self, rate_per_s: float, burst: int):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last_ms: int | None = None

    def take(self, now_ms: int) -> bool:
        """Spend one token if there is one; False means: drop this one."""
        if self._last_ms is not None and now_ms > self._last_ms:
            self._tokens = min(self.burst, self._tokens + (now_ms - self._last_ms) * self.rate_per_ms)
        # A clock step backwards refills nothing but moves the reference point.
        self._last_ms = now_ms
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class RateLimit:
    """At most one event per interval; remembers a wish made too early (trailing edge)."""

    def __init__(self, interval_ms: int):
        self.interval_ms = interval_ms
        self.last_ms = -(10**15)
        self.wanted = False

    def want(self) -> None:
        self.wanted = True

    def due(self, now_ms: int) -> bool:
        """True (and resets) when a wanted event may happen now."""
        if self.wanted and now_ms - self.last_ms >= self.interval_ms:
            self.wanted = False
            self.last_ms = now_ms
            return True
        return False
