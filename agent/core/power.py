"""The vehicle's power state, as the agent follows it (PROTOCOL.md §10). Sans-I/O.

    m = PowerMachine(PowerPolicy(sleep_after_ms=60_000, buses=2), now_ms)
    m.frame(bus, t_ms)       # a frame was seen on bus `bus` (cheap; call once per drain)
    m.voltage(v, t_ms)       # a new 12 V reading
    m.tick(now_ms)           # periodically
    -> each returns a list of Change(state, previous, reason, t_ms, actions)

States: "awake"; "asleep" when every bus has been silent for `sleep_after_ms`; "protect" while
the 12 V reading is below `protect_below_v`, left only once it is back at `protect_resume_v` or
above (hysteresis). Before asleep, once every bus has been silent for `quiet_after_ms`
(shorter than any signal's timeout), the core is quieted while still awake: a vehicle
going to sleep silences every ECU at once, and that is not a storm of timeouts; the first
frame resumes it (and then a signal that stays away times out as usual). Protect wins over asleep: a low battery is a reason to stay quiet whether
or not the buses talk. `tick` also yields a HEARTBEAT action every `heartbeat_ms` while not
awake: the slow signed status that says the vehicle is still there.
"""

from __future__ import annotations

from dataclasses import dataclass

AWAKE, ASLEEP, PROTECT = "awake", "asleep", "protect"
STATES = (AWAKE, ASLEEP, PROTECT)

# Actions for the app (agent/app/power.py), in the order they are to be carried out.
CLOSE_BATCH = "close_batch"  # close the open telemetry batch now
PUBLISH_STATE = "publish_state"  # a §4 state record: the last-known values before the quiet
PUBLISH_STATUS = "publish_status"  # the signed §5 status with `power`
FLUSH_OUTBOX = "flush_outbox"  # let the uplink drain what is queued while the link is up
QUIET = "quiet"  # stop periodic work: no heartbeats, no timeouts, no batches
RESUME = "resume"  # periodic work again; the first batch closes early
SLOW_POLLING = "slow_polling"  # modem and GNSS at the slow interval, long MQTT keepalive
FAST_POLLING = "fast_polling"
ON_SLEEP = "on_sleep"  # run the configured on-sleep command (the board may suspend)
DROP_BATCHES = "drop_batches"  # protect: telemetry is not published (counted as dropped)
KEEP_BATCHES = "keep_batches"
HEARTBEAT = "heartbeat"  # the slow signed status while not awake


@dataclass(frozen=True)
class PowerPolicy:
    sleep_after_ms: int  # 0: never asleep
    buses: int
    heartbeat_ms: int = 3_600_000
    protect_below_v: float | None = None  # None: no protect state
    protect_resume_v: float | None = None
    quiet_after_ms: int = 300  # every bus silent this long: quiet the core (not a state)


@dataclass(frozen=True)
class Change:
    state: str
    previous: str
    reason: str
    t_ms: int
    actions: tuple[str, ...]


_ENTER = {
    ASLEEP: (CLOSE_BATCH, PUBLISH_STATE, PUBLISH_STATUS, FLUSH_OUTBOX, QUIET, SLOW_POLLING,
             ON_SLEEP),
    PROTECT: (CLOSE_BATCH, PUBLISH_STATE, PUBLISH_STATUS, FLUSH_OUTBOX, QUIET, SLOW_POLLING,
              DROP_BATCHES),
    AWAKE: (RESUME, FAST_POLLING, PUBLISH_STATUS, PUBLISH_STATE),
}


class PowerMachine:
    def __init__(self, policy: PowerPolicy, now_ms: int):
        if policy.protect_below_v is not None:
            resume = policy.protect_resume_v
            if resume is None or resume <= policy.protect_below_v:
                raise ValueError("protect_resume_v must be above protect_below_v (hysteresis)")
        self.policy = policy
        self.state = AWAKE
        self.reason = "started"
        self.since_ms = now_ms
        self.last_frame_ms = [now_ms] * policy.buses  # start counts as "heard": a grace period
        self.low_battery = False
        self.drowsy = False  # awake, every bus silent for quiet_after_ms: the core is quiet
        self.volts: float | None = None
        self.changes = {s: 0 for s in STATES}  # entries into each state, for status displays
        self._next_heartbeat = 0

    # -- events ---------------------------------------------------------------------------

    def frame(self, bus: int, t_ms: int) -> list[Change]:
        if t_ms > self.last_frame_ms[bus]:
            self.last_frame_ms[bus] = t_ms
        if self.state == ASLEEP:
            return self._go(AWAKE, f"frame on bus {bus}", t_ms)
        if self.drowsy:
            self.drowsy = False
            return [Change(self.state, self.state, f"frame on bus {bus}", t_ms, (RESUME,))]
        return []

    def voltage(self, volts: float, t_ms: int) -> list[Change]:
        p = self.policy
        self.volts = volts
        if p.protect_below_v is None:
            return []
        if not self.low_battery and volts < p.protect_below_v:
            self.low_battery = True
            return self._go(PROTECT, f"12 V at {volts:.2f} V, below {p.protect_below_v:g} V", t_ms)
        if self.low_battery and volts >= p.protect_resume_v:
            self.low_battery = False
            state = ASLEEP if self._all_silent(t_ms) else AWAKE
            return self._go(state, f"12 V back at {volts:.2f} V", t_ms)
        return []

    def tick(self, now_ms: int) -> list[Change]:
        out: list[Change] = []
        if self.state == AWAKE and self._all_silent(now_ms):
            out = self._go(ASLEEP, f"every bus silent for {self.policy.sleep_after_ms // 1000} s",
                           now_ms)
        elif self.state == AWAKE and not self.drowsy and self._all_silent(
                now_ms, min(self.policy.quiet_after_ms, self.policy.sleep_after_ms)):
            self.drowsy = True
            out = [Change(AWAKE, AWAKE, "every bus silent", now_ms, (QUIET,))]
        elif self.state != AWAKE and now_ms >= self._next_heartbeat:
            self._next_heartbeat = now_ms + self.policy.heartbeat_ms
            out = [Change(self.state, self.state, "heartbeat", now_ms, (HEARTBEAT,))]
        return out

    # -- views ----------------------------------------------------------------------------

    def bus_asleep(self, bus: int, now_ms: int) -> bool:
        """Has this bus been silent for sleep_after_ms (a command on it needs waking it)?"""
        after = self.policy.sleep_after_ms
        return bool(after) and now_ms - self.last_frame_ms[bus] >= after

    def bus_heard_since(self, bus: int, t_ms: int) -> bool:
        return self.last_frame_ms[bus] >= t_ms

    def status(self) -> dict:
        return {"state": self.state, "reason": self.reason, "since_ms": self.since_ms,
                "volts": self.volts, "entered": dict(self.changes)}

    # -- internals ------------------------------------------------------------------------

    def _all_silent(self, now_ms: int, for_ms: int | None = None) -> bool:
        p = self.policy
        after = p.sleep_after_ms if for_ms is None else for_ms
        return bool(p.sleep_after_ms) and all(
            now_ms - self.last_frame_ms[i] >= after for i in range(p.buses))

    def _go(self, state: str, reason: str, t_ms: int) -> list[Change]:
        if self.low_battery and state != PROTECT:
            return []  # protect holds until the battery recovers
        previous = self.state
        if state == previous:
            return []
        self.state, self.reason, self.since_ms = state, reason, t_ms
        self.drowsy = False
        self.changes[state] += 1
        self._next_heartbeat = t_ms + self.policy.heartbeat_ms
        actions = _ENTER[state]
        if previous == PROTECT:
            actions = (KEEP_BATCHES, *actions)
        if state == PROTECT and previous == ASLEEP:
            actions = tuple(a for a in actions if a != ON_SLEEP)
        return [Change(state, previous, reason, t_ms, actions)]
