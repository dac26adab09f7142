"""When to kick the cellular link, and how hard. Sans-I/O.

    policy = RecoveryPolicy(after_ms=120_000, backoff_ms=30_000, max_per_hour=6,
                            power_cycle=True)
    step = policy.poll(now_ms, link_up, registered, bearer)   # None or the step to run now

The link is "down" while the broker is unreachable; the modem's own view decides whether it
is the modem's fault: a step runs only when the link has been down for `after_ms` AND the
modem reports no registration or no data bearer (a broker outage is not cured by resetting
the radio). Steps escalate one at a time -- re-read registration, radio off/on, modem reset,
power cycle -- each after the previous one had `backoff_ms * 2**level` to work; the last step
repeats. At most `max_per_hour` steps in any hour. Once the link is up again, the next outage
starts from the first step.
"""

from __future__ import annotations

from collections import deque

REREAD, RADIO, RESET, POWER_CYCLE = "reread", "radio", "reset", "power_cycle"
STEPS = (REREAD, RADIO, RESET, POWER_CYCLE)
HOUR_MS = 3_600_000


class RecoveryPolicy:
    def __init__(self, after_ms: int, backoff_ms: int, max_per_hour: int,
                 power_cycle: bool = False):
        self.after_ms = after_ms
        self.backoff_ms = backoff_ms
        self.max_per_hour = max_per_hour
        self.steps = STEPS if power_cycle else STEPS[:-1]
        self.down_since: int | None = None
        self.level = 0  # index of the next step in this outage
        self.next_ms = 0  # no step before this
        self.counts = {s: 0 for s in self.steps}
        self.capped = 0  # steps held back by the hourly cap
        self.recoveries = 0  # outages that ended after at least one step
        self.last_step = ""
        self.last_step_ms: int | None = None
        self._recent: deque[int] = deque()  # times of the steps in the last hour

    def poll(self, now_ms: int, link_up: bool, registered: bool | None,
             bearer: bool | None) -> str | None:
        """The step to run now, or None. `registered`/`bearer`: the modem's last reading
        (None: unknown -- a modem that does not answer is treated as not registered)."""
        if link_up:
            if self.level:
                self.recoveries += 1
            self.down_since, self.level = None, 0
            return None
        if self.down_since is None:
            self.down_since = now_ms
        if now_ms - self.down_since < self.after_ms or now_ms < self.next_ms:
            return None
        if registered is True and bearer is not False:
            return None  # the modem is fine: the broker or the network beyond it is not
        while self._recent and now_ms - self._recent[0] >= HOUR_MS:
            self._recent.popleft()
        if len(self._recent) >= self.max_per_hour:
            self.capped += 1
            self.next_ms = self._recent[0] + HOUR_MS
            return None
        step = self.steps[min(self.level, len(self.steps) - 1)]
        self.next_ms = now_ms + self.backoff_ms * (1 << min(self.level, 6))
        self.level += 1
        self.counts[step] += 1
        self._recent.append(now_ms)
        self.last_step, self.last_step_ms = step, now_ms
        return step

    def status(self) -> dict:
        return {"down_since_ms": self.down_since, "level": self.level, "steps": dict(self.counts),
                "capped": self.capped, "recoveries": self.recoveries,
                "last_step": self.last_step, "last_step_ms": self.last_step_ms}
