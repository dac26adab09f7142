"""Rate limits with the time passed in. Pure."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


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


class Lru:
    """A dict of at most `size` entries; the least recently set or touched goes first."""

    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict = OrderedDict()

    def get(self, key, default=None):
        return self._d.get(key, default)

    def set(self, key, value) -> None:
        d = self._d
        d[key] = value
        d.move_to_end(key)
        if len(d) > self.size:
            d.popitem(last=False)

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The commands topic's budgets (config [commands] carries the same names)."""

    reject_rate_per_s: float = 20.0  # answers to refused messages (any reason), per second
    reject_burst: int = 40
    # ... and of those, answers to what the precheck refused (garbage, strangers): nobody
    # reads them, and under a flood they would crowd the uplink (responses go first).
    # Never more than the reject budget.
    garbage_rate_per_s: float = 1.0
    garbage_burst: int = 5
    verify_rate_per_s: float = 20.0  # signature checks per trusted kid, per second
    verify_burst: int = 40
    verify_sample: float = 0.05  # over budget: share of a kid's messages verified all the same
    redelivery_interval_ms: int = 5000  # one command answered at most once per interval
    cache_size: int = 4096  # fingerprints and ids remembered (verified, forged, answered)
    unverified_size: int = 32768  # fingerprints dropped over budget, remembered for a re-send


# Admission.screen()'s verdicts
VERIFY = "verify"  # check the signature (through the gate)
ANSWER = "answer"  # refused by the precheck: answer it (within the reject budget)
REDELIVER = "redeliver"  # verified before, due for an answer again: check it and re-answer


class Admission:
    """Who gets a signature check on the commands topic. Pure; time passed in.

    Order, for one message after CommandGate.precheck:
      * refused by the precheck (not COSE, unknown kid): answered while the global garbage
        budget (`garbage_rate_per_s`, never more than the reject budget) has tokens,
        else dropped ("flood_dropped"); no signature check either way;
      * fingerprint of a message verified before: the same command again. It goes on (to be
        answered with its latest status) at most once per `redelivery_interval_ms` per command
        id, else dropped ("redelivery_dropped") -- no signature check, no outbox row;
      * fingerprint that failed its signature check before: dropped ("forged_dropped");
      * else the kid's own bucket (`verify_rate_per_s`): garbage and strangers never spend a
        trusted key's share. Over budget, a fingerprint seen before (a cloud re-sending the same
        message) is verified from a second, smaller bucket of that kid's, and any message with
        probability `verify_sample`; the rest are dropped ("budget_dropped"). Forgeries must
        then be new every time, and a genuine command re-sent gets repeated chances.
    The gate's own rejections are answered within the reject budget when they carry a verified
    id, else (a bad signature, say) within the garbage budget (`answer_rejection`).
    The runtime reports back what the gate found (`verified`, `forged`).
    """

    def __init__(self, limits: AdmissionLimits, rng: Callable[[], float]):
        self.limits = limits
        self._rng = rng  # uniform in [0, 1)
        self.reject = TokenBucket(limits.reject_rate_per_s, limits.reject_burst)
        self._garbage = TokenBucket(min(limits.reject_rate_per_s, limits.garbage_rate_per_s),
                                    min(limits.reject_burst, limits.garbage_burst))
        self._kid_buckets: dict[bytes, tuple[TokenBucket, TokenBucket]] = {}
        self._verified = Lru(limits.cache_size)  # fingerprint -> command id (or the fingerprint)
        self._forged = Lru(limits.cache_size)  # fingerprint -> True
        self._answered = Lru(limits.cache_size)  # command id -> when last let through
        self._unverified = Lru(limits.unverified_size)  # fingerprint -> True (dropped once)

    def screen(self, kid: bytes | None, fingerprint: bytes | None, now_ms: int) -> str:
        """VERIFY, REDELIVER, ANSWER or the counter name of a drop. kid None: refused by the
        precheck."""
        if kid is None:
            return ANSWER if self._garbage.take(now_ms) else "flood_dropped"
        key = self._verified.get(fingerprint)
        if key is not None:
            return REDELIVER if self.redelivery_due(key, now_ms) else "redelivery_dropped"
        if fingerprint in self._forged:
            return "forged_dropped"
        buckets = self._kid_buckets.get(kid)
        if buckets is None:
            lim = self.limits
            repeat_rate = max(1.0, lim.verify_rate_per_s / 4)
            buckets = self._kid_buckets[kid] = (
                TokenBucket(lim.verify_rate_per_s, lim.verify_burst),
                TokenBucket(repeat_rate, max(1, int(repeat_rate * 2))))
        if buckets[0].take(now_ms):
            return VERIFY
        if fingerprint in self._unverified and buckets[1].take(now_ms):
            return VERIFY
        if self._rng() < self.limits.verify_sample:
            return VERIFY
        self._unverified.set(fingerprint, True)
        return "budget_dropped"

    def answer_rejection(self, verified_id: bool, now_ms: int) -> bool:
        """May the gate's rejection be answered now? One without a verified id (a bad
        signature, a payload that does not decode) is as anonymous as garbage: it spends the
        garbage budget; one with an id spends the reject budget."""
        return (self.reject if verified_id else self._garbage).take(now_ms)

    def redelivery_due(self, key: str | bytes, now_ms: int) -> bool:
        """May command `key` (its id) be answered again now? True also notes that it is."""
        last = self._answered.get(key)
        if last is not None and 0 <= now_ms - last < self.limits.redelivery_interval_ms:
            return False
        self._answered.set(key, now_ms)
        return True

    def verified(self, fingerprint: bytes, key: str | bytes, now_ms: int) -> None:
        """The gate verified this message (command id `key`, or the fingerprint if it had no
        valid id) and it was answered now."""
        self._verified.set(fingerprint, key)
        self._answered.set(key, now_ms)

    def forged(self, fingerprint: bytes) -> None:
        self._forged.set(fingerprint, True)
