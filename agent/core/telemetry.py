"""The telemetry core: frames in, samples and batches out. Sans-I/O.

Frames carry their own timestamps (float seconds, UTC); the core never reads a clock.
A live bus, a log replay, the tests and the benchmarks all drive this same object:

    core = TelemetryCore(plans, max_batch_age_ms=1000)
    core.feed(bus_index, t, can_id, data)   # per frame
    core.tick(t)                            # periodically, for heartbeats/timeouts/age
    for batch in core.take_batches(): ...

Two rules keep a sender on the bus from faking freshness:
- A signal is observed only when a frame carried it completely: a frame shorter than the DBC
  says (DLC 1, DLC 0 with the right id) refreshes just the signals that fit in its bytes
  (per-signal `seen_ms`); a frame of full length refreshes its whole message (`seen`).
- Live (`frame_skew_s` set), time is the agent's own: only tick(now) from the runtime moves the
  core's clock, frames never do, and a frame stamped later than that clock plus the skew is
  taken at clock + skew. So a frame stamped 30 minutes ahead neither keeps a signal fresh nor
  holds back timeouts and batch deadlines. Replays (no skew) keep running on frame time.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from cantools.database.namedsignalvalue import NamedSignalValue

from .batch import Batch, BatchBuilder, Column
from .fastdecode import Signal, build, compile_message, plan, tests
from .selection import BusPlan, SignalSpec

MISSING = object()
TICK_S = 0.1  # how often frame time drives tick() during replay (heartbeats, timeouts, age)


def map_key(v) -> str:
    """TOML table keys are strings: 3 and 3.0 both map through "3"."""
    if type(v) is str:
        return v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


class SignalState(Column):
    """One selected signal: its policy (copied flat for speed) and what was seen and sent."""

    __slots__ = ("spec", "sig", "scale", "offset", "map", "deadband", "min_interval",
                 "heartbeat", "timeout", "state", "emit", "shaped", "raw", "value", "seen_ms", "sent", "sent_ms",
                 "pending", "msg")

    def __init__(self, spec: SignalSpec):
        super().__init__(spec.out)
        self.spec = spec
        self.sig = spec.signal
        self.scale = spec.scale if (spec.scale != 1.0 or spec.offset != 0.0) else None
        self.offset = spec.offset
        self.map = spec.map
        self.deadband = spec.deadband
        self.min_interval = spec.min_interval_ms
        self.heartbeat = spec.heartbeat_ms
        self.timeout = spec.timeout_ms
        self.state = spec.state
        self.emit = spec.emit
        self.shaped = bool(self.map is not None or self.scale is not None or self.deadband
                           or self.min_interval or self.state or not self.emit)
        self.raw: Any = MISSING  # last decoded value (before mapping); MISSING after a timeout
        self.value: Any = None  # last output value
        self.seen_ms = -1  # multiplexed signals only: when last present (else msg.seen)
        self.msg: MessageState | None = None
        self.sent: Any = MISSING
        self.sent_ms = -1  # time of the last sample (of buf's last row, when it has rows)
        self.pending: Any = MISSING  # throttled value waiting for its interval


class MessageState:
    __slots__ = ("message", "decode", "fast", "step", "prev", "length", "signals", "seen",
                 "last", "timeout", "mux", "present", "carried", "ring", "tap", "tapmask",
                 "tapcode")

    def __init__(self, message, signals: list[SignalState], codes=None):
        self.message = message
        self.decode = message.decode
        self.fast = compile_message(message, [s.sig for s in signals], codes)
        # fn(data, prev, t) -> new prev: the fast path once `prev` is known (see _sampler)
        self.step = _no_samples
        self.prev = None  # the last frame as a little-endian int, for the fast path
        self.length = message.length
        self.signals = signals
        self.seen = -1.0  # float seconds of the last frame, changed or not
        self.last = None  # bytes of the last frame
        self.timeout = min((s.timeout for s in signals if s.timeout), default=0)
        self.mux = any(s.spec.multiplexed for s in signals)
        self.present: set = set()  # for multiplexed messages: signals in the last decoded frame
        self.carried: list[int] = []  # after a short frame: indices of the signals it carried
        self.ring = None  # campaigns: every full frame appended (see set_taps)
        self.tap = None  # campaigns: fn(t, data[, le, dl]) given a changed full frame ...
        self.tapmask = -1  # ... whose bits under this mask changed (the sampler tests it)
        self.tapcode = None  # ... or what the sampler inlines for it (a campaigns.TapCode)
        for s in signals:
            s.msg = self


def _no_signals(data, prev):
    """A message tapped for campaigns only: no signals, but the frame as the next `prev`."""
    return int.from_bytes(data, "little"), ()


def _tap_step(entry: MessageState):
    """The fast path of a message tapped for campaigns only: the tap for changed bits."""
    tap, mask, from_bytes = entry.tap, entry.tapmask, int.from_bytes

    def step(data, prev, t):
        le = from_bytes(data, "little")
        dl = le ^ prev
        if dl & mask:
            tap(t, data, le, dl)
        return le
    return step


def _no_samples(data, prev, t):
    return 0


def _sampler(entry: MessageState, b: BatchBuilder, update, codes=None):
    """The fast path after the first frame, generated per message: decode the signals whose
    bits changed and sample them, with TelemetryCore._update() and BatchBuilder.add() inlined
    for signals without shaping (keep the three in step); shaped signals go through update().
    fn(data, prev, t) -> the frame as an int, for the next call's `prev`."""
    signals = entry.signals
    env: dict[str, Any] = {"_from": int.from_bytes, "_b": b, "_open": b.open_column,
                           "_update": update, "_signals": signals}
    names = [s.sig for s in signals]
    # Campaigns: the tap's work inlined where its signals are decoded (entry.tapcode), its
    # signals that [telemetry] does not select decoded for it too; else (no code) the tap
    # called for a frame whose bits under its mask changed.
    code = entry.tapcode
    sigs = None
    if code is not None:
        names += [n for n in dict.fromkeys(code.signals) if n not in names]
        sigs = plan(entry.message, names, env)
        if sigs is None:  # (a signal of the tap's the sampler cannot take)
            code, names = None, names[:len(signals)]
    if sigs is None:
        sigs = plan(entry.message, names, env)
    if sigs is None:
        return None
    shaped = any(s.shaped for s in signals)
    motorola = any("be = _from" in line for sig in sigs for line in sig.raw)
    tap = entry.tap if code is None else None
    if tap is not None:
        env["_tap"] = tap
    taps_of: dict[str, list[int]] = {}
    if code is not None:
        env.update(code.env)
        for k, name in enumerate(code.signals):
            taps_of.setdefault(name, []).append(k)
    lines = ["def sample(data, prev, t):",
             "    le = _from(data, 'little')",
             "    dl = le ^ prev",
             f"    if dl & {entry.tapmask}:" if tap is not None else "",
             "        _tap(t, data, le, dl)" if tap is not None else "",
             "    be = None" if motorola else "",
             "    t_ms = int(t * 1000.0)",  # the same value as * 1000, a cheaper multiply
             # No open batch (t0 < 0): the first sample opens its column, which sets t0 and
             # gives the right dt; a sample earlier than t0 is seen there too, or, in a column
             # with rows, as earlier than the column's last row (sent_ms).
             "    dt = t_ms - _b.t0",
             "    n = 0"]  # the samples' estimated size, as BatchBuilder.add() counts it
    if shaped:
        lines.append("    out = []")

    def emit(sig: Signal, pad: str) -> list[str]:
        lines = sample(sig, pad) if sig.index < len(signals) else []
        for k in taps_of.pop(names[sig.index], ()):  # (once per signal)
            lines += code.emit(k, sig, pad, env)
        return lines

    def sample(sig: Signal, pad: str) -> list[str]:
        s = signals[sig.index]
        if s.shaped:  # what _update() takes: (index, decoded value)
            if sig.choices is None:
                return [f"{pad}out.append(({sig.index}, {sig.value}))"]
            return [f"{pad}c = {sig.choices}.get(r)",
                    f"{pad}out.append(({sig.index}, c if c is not None else {sig.value}))"]
        env[f"_S{sig.index}"] = s
        code = [f"{pad}s = _S{sig.index}"]
        v = "v"
        if sig.choices is None:
            if sig.value == "r":
                v = "r"
            else:
                code.append(f"{pad}v = {sig.value}")
            code.append(f"{pad}s.raw = s.value = s.sent = {v}")
        else:  # raw keeps the NamedSignalValue, the sample is its name
            code += [f"{pad}c = {sig.choices}.get(r)",
                     f"{pad}if c is None:",
                     f"{pad}    v = {sig.value}",
                     f"{pad}    s.raw = s.value = s.sent = v",
                     f"{pad}else:",
                     f"{pad}    s.raw = c",
                     f"{pad}    v = s.value = s.sent = c.name",
                     f"{pad}    n += len(v)"]
        return code + [f"{pad}buf = s.buf",
                       f"{pad}if not buf:",
                       f"{pad}    dt = _open(s, t_ms)",
                       f"{pad}elif t_ms < s.sent_ms:",
                       f"{pad}    _b.late = True",
                       f"{pad}s.sent_ms = t_ms",
                       f"{pad}buf.append((dt, {v}))",
                       f"{pad}n += 15"]

    lines += tests(sigs, emit)
    lines += ["    if n:",
              "        _b.budget -= n"]
    if shaped:
        lines += ["    if out:",
                  "        _update(_signals, out, t_ms, False)",
                  "    if n and _b.budget <= 0:",
                  "        _b.close()"]
    else:
        lines += ["        if _b.budget <= 0:",
                  "            _b.close()"]
    if code is not None:
        lines += code.tail
    lines.append("    return le")
    return build(lines, "sample", f"<sampler {entry.message.name}>", env, codes)


class _NoFrame:
    """Stands in for a CAN message behind values from other sources."""

    def __init__(self, name: str):
        self.name = name
        self.length = 0
        self.signals: list = []
        self.decode = None

    def is_multiplexed(self) -> bool:
        return False


class BusCounters:
    """Per-bus frame counters; `entries` maps can_key -> MessageState (None: not selected)."""

    __slots__ = ("name", "entries", "decoded", "unchanged", "unselected", "unknown_ids",
                 "decode_errors", "bad_length", "unknown_id_set")
    FIELDS = ("frames", "decoded", "unchanged", "unselected", "unknown_ids", "decode_errors",
              "bad_length")

    def __init__(self, name: str, entries: dict):
        self.name = name
        self.entries = entries
        self.decoded = self.unchanged = self.unselected = 0
        self.unknown_ids = self.decode_errors = self.bad_length = 0
        self.unknown_id_set: set[int] = set()

    @property
    def frames(self) -> int:
        # Every frame lands in exactly one of these; derived to keep the hot path short.
        return (self.decoded + self.unchanged + self.unselected + self.unknown_ids
                + self.decode_errors)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}


class TelemetryCore:
    """Decode -> sample -> batch for any number of buses."""

    def __init__(self, plans: Sequence[BusPlan], max_batch_age_ms: int = 1000,
                 max_batch_bytes: int = 65536, external_heartbeat_ms: int = 60_000,
                 value_deadbands: Mapping[str, float] | None = None,
                 frame_skew_s: float | None = None, codes=None):
        # `codes`: decoders compiled by an earlier start (fastdecode.compile_message), for
        # the messages built here; not kept.
        self.external_heartbeat_ms = external_heartbeat_ms
        # Deadbands of named values from other sources (feed_values), e.g. the modem's signal
        # strength; set before the first value of that name arrives.
        self.value_deadbands: dict[str, float] = dict(value_deadbands or {})
        self.frame_skew_s = frame_skew_s  # live: frames are clamped to the tick clock + this
        self.clock: float | None = None  # the last tick(now) when live
        self.future_frames = 0  # live: frames stamped beyond clock + skew (clamped)
        self.batches = BatchBuilder(max_batch_age_ms, max_batch_bytes)
        self.counters: list[BusCounters] = []
        self._messages = [plan.messages for plan in plans]  # for run-time selection
        self.state_changed = False  # set when a signal marked `state` changes; caller resets
        self.signals: list[SignalState] = []
        for plan in plans:
            entries: dict[int, MessageState | None] = {key: None for key in plan.messages}
            for key, mp in plan.selected.items():
                states = [SignalState(s) for s in mp.signals]
                self.signals.extend(states)
                entries[key] = entry = MessageState(mp.message, states, codes)
                if entry.fast is not None:
                    entry.step = self._first_step(entry)
            self.counters.append(BusCounters(plan.name, entries))
        self._timed = [m for c in self.counters for m in c.entries.values()
                       if m is not None and m.timeout]
        self._heartbeats = [s for s in self.signals if s.heartbeat and s.emit]
        self._by_name: dict[str, SignalState] = {}
        for s in self.signals:
            self._by_name.setdefault(f"{s.spec.message}.{s.sig}", s)
            self._by_name[s.out] = s
        self._throttled: list[SignalState] = []
        self.internal_errors = 0  # frames that raised inside the core (bugs), counted
        self.last_internal_error = ""
        self._next_tick = -1.0
        self._next_heartbeat_ms = 0
        self.quiet = False  # the vehicle sleeps: no timeouts, no heartbeats (set_quiet)
        self._resumed_ms = -1  # timeouts and heartbeats count from here after a quiet spell
        self._after_feed: Callable[[], None] | None = None  # set_taps

    def _first_step(self, entry: MessageState):
        """The message's sampler, generated when its second frame arrives (after start-up,
        and not cached with the decoders): the messages of a database that never appear on
        the bus cost no code (1.5 MB for the Tesla DBC's)."""
        def first(data, prev, t):
            step = _sampler(entry, self.batches, self._update)
            entry.step = step
            return step(data, prev, t)
        return first

    def prepare(self) -> None:
        """Generate every selected message's sampler now rather than at its second frame
        (benchmarks and replays that want no compiling while they run)."""
        for c in self.counters:
            for entry in c.entries.values():
                if entry is not None and entry.fast is not None and entry.signals:
                    entry.step = _sampler(entry, self.batches, self._update)

    @property
    def samples(self) -> int:
        """Samples emitted so far (closed batches and the open one)."""
        return self.batches.closed_samples + self.batches.open_samples

    # -- per frame (hot path) -------------------------------------------------------------

    def feed(self, bus: int, t: float, can_id: int, data: bytes) -> None:
        """Take one frame received on bus index `bus` at time `t` (UTC seconds)."""
        self.feed_many(((bus, t, can_id, data),))

    def feed_many(self, frames: Iterable[tuple[int, float, int, bytes]]) -> None:
        """Take frames (bus index, time in UTC seconds, can id, data), in order. The loop
        lives here, not in the caller: ~12 % faster than a feed() call per frame.

        Never raises: a frame that trips an unexpected error (a bug) is counted in
        `internal_errors` and the rest of the frames are still taken."""
        it = iter(frames)
        while True:
            try:
                self._feed(it)
                break
            except Exception as e:  # noqa: BLE001 - one bad frame must not lose the others
                self._internal_error(e)
        if self._after_feed is not None:
            try:
                self._after_feed()
            except Exception as e:  # noqa: BLE001 - once, not in the loop above
                self._internal_error(e)

    def _internal_error(self, e: Exception) -> None:
        self.internal_errors += 1
        self.last_internal_error = f"{type(e).__name__}: {e}"[:200]

    def _feed(self, frames) -> None:
        counters = self.counters
        update = self._update
        live = self.frame_skew_s is not None
        # Live, frames never drive ticks; they are clamped to the runtime's clock instead.
        next_tick = float("inf") if live else self._next_tick
        latest = float("inf") if not live or self.clock is None else self.clock + self.frame_skew_s
        edge = min(next_tick, latest)  # one comparison per frame for both
        for frame in frames:
            bus, t, can_id, data = frame
            if t >= edge:
                if not live:
                    self.tick(t)
                    edge = self._next_tick
                elif t > latest:
                    self.future_frames += 1
                    t = latest
                    frame = (bus, t, can_id, data)
            c = counters[bus]
            entry = c.entries.get(can_id)
            if entry is None:
                if can_id in c.entries:
                    c.unselected += 1
                    continue
                c.unknown_ids += 1
                if len(c.unknown_id_set) < 1024:
                    c.unknown_id_set.add(can_id)
                continue
            if len(data) != entry.length:
                c.bad_length += 1
                if len(data) < entry.length:  # carries only some signals: only those are fresh
                    self._short_frame(entry, c, t, data)
                    continue
                entry.prev = None  # longer: cantools decodes it; the fast path resynchronises
            entry.seen = t
            if entry.ring is not None:
                entry.ring.append(frame)  # (the frame itself: no tuple to make)
            if data == entry.last:
                c.unchanged += 1
                continue
            entry.last = data
            prev = entry.prev
            if prev is not None:  # the fast path decoded the frame before: only what changed
                entry.prev = entry.step(data, prev, t)  # (it calls the tap, if any)
                c.decoded += 1
                continue
            if entry.tap is not None:
                entry.tap(t, data)
            fast = entry.fast
            if fast is not None and len(data) == entry.length:
                entry.prev, changed = fast(data, None)
                c.decoded += 1
                if changed:
                    update(entry.signals, changed, int(t * 1000), True)
                continue
            changed = self._decode(entry, c, t, data)
            if changed is not None:
                update(entry.signals, changed, int(t * 1000), True)

    def _short_frame(self, entry: MessageState, c: BusCounters, t: float, data: bytes) -> None:
        """A frame shorter than its DBC length: decode what it carries completely (cantools'
        allow_truncated) and refresh only those signals."""
        entry.prev = None  # the fast path resynchronises on the next frame of normal length
        if data == entry.last:  # the same short frame again: the same signals, refreshed
            c.unchanged += 1
            t_ms = int(t * 1000)
            for i in entry.carried:
                entry.signals[i].seen_ms = t_ms
            return
        entry.last = data
        changed = self._decode(entry, c, t, data)
        entry.carried = [i for i, _ in changed or ()]
        if changed is not None:
            self._update(entry.signals, changed, int(t * 1000), True)

    @staticmethod
    def _decode(entry: MessageState, c: BusCounters, t: float, data: bytes) -> list | None:
        """cantools' decode (multiplexed messages, floats, frames of another length; a short
        one yields only the signals it carries completely): [(index, value), ...] with their
        seen_ms set, or None (counted) when the frame does not decode."""
        try:
            values = entry.decode(data, True, True, False, True)
        except Exception:  # cantools raises several types on bad frames; never fatal
            c.decode_errors += 1
            return None
        c.decoded += 1
        t_ms = int(t * 1000)
        changed = []
        for i, s in enumerate(entry.signals):
            v = values.get(s.sig, MISSING)
            if v is not MISSING:
                changed.append((i, v))
                s.seen_ms = t_ms
        if entry.mux:
            entry.present = set(values)
        return changed

    def _update(self, signals: list[SignalState], changed, t_ms: int, full: bool) -> None:
        """Sample new values: changed = [(index into signals, decoded value), ...]."""
        b = self.batches
        named = NamedSignalValue
        n = cost = 0  # added to the batch after the frame: one size check per frame
        for i, v in changed:
            s = signals[i]
            if full and v == s.raw and type(v) is type(s.raw):
                continue
            s.raw = v
            if type(v) is named:
                v = v.name
            if s.shaped:
                v = self._shape(s, t_ms, v)
                if v is MISSING:
                    continue
                s.pending = MISSING  # only shaped signals are ever throttled
            else:
                s.value = v
            # _emit() and BatchBuilder.add(), inlined: this is the per-sample hot path.
            buf = s.buf
            if not buf:
                b.open_column(s, t_ms)
            elif t_ms < s.sent_ms:  # sent_ms: the time of buf's last row
                b.late = True
            s.sent = v
            s.sent_ms = t_ms
            dt = t_ms - b.t0
            if dt < 0:
                b.late = True
            buf.append((dt, v))
            n += 1
            cost += 15 if type(v) is not str else 15 + len(v)
        if n:
            b.budget -= cost
            if b.budget <= 0:  # closes after the frame that crossed it (<= one frame over)
                b.close()

    def _shape(self, s: SignalState, t_ms: int, v):
        """Mapping, scaling, deadband and throttle; MISSING when the sample is held back."""
        if s.map is not None:
            out = s.map.get(map_key(v), MISSING)
            if out is MISSING and type(s.raw) is NamedSignalValue:
                out = s.map.get(map_key(s.raw.value), MISSING)  # the raw number behind a name
            v = v if out is MISSING else out
        elif s.scale is not None and type(v) is not str:
            v = v * s.scale + s.offset
        s.value = v
        if s.state:
            self.state_changed = True
        if not s.emit:
            return MISSING  # watched for command conditions only
        last = s.sent
        if s.deadband and last is not MISSING and last is not None and v is not None \
                and type(v) is not str and type(last) is not str and abs(v - last) <= s.deadband:
            return MISSING
        if s.min_interval and s.sent_ms >= 0 and t_ms - s.sent_ms < s.min_interval:
            if s.pending is MISSING:
                self._throttled.append(s)
            s.pending = v
            return MISSING
        return v

    def _emit(self, s: SignalState, t_ms: int, v) -> None:
        s.sent = v
        s.sent_ms = t_ms
        s.pending = MISSING
        self.batches.add(s, t_ms, v)

    # -- time-driven work -----------------------------------------------------------------

    def set_quiet(self, quiet: bool, t: float) -> None:
        """Asleep (power.py): a silent bus is no news, so no nulls from timeouts and no
        heartbeats. On resuming, both count from `t`: a signal times out only if its frames
        stay away for its timeout after the wake, and no heartbeat burst re-sends old values;
        and every signal is sent again with its first frame."""
        if self.quiet and not quiet:
            self._resumed_ms = int(t * 1000)
            # The first frames after the wake are news even if unchanged: decoded in full and
            # sent, so the cloud sees the vehicle's values as they are now.
            for c in self.counters:
                for entry in c.entries.values():
                    if entry is not None:
                        entry.last = entry.prev = None
                        for sig in entry.signals:
                            sig.raw = sig.sent = MISSING
        self.quiet = quiet

    def tick(self, t: float) -> None:
        """Advance time to `t` (UTC seconds): throttled values, timeouts, heartbeats, batch age.
        Live, this is the agent's clock (see the module docstring)."""
        if self.frame_skew_s is not None:
            self.clock = t
        self._next_tick = t + TICK_S
        now = int(t * 1000)
        if self._throttled:
            keep = []
            for s in self._throttled:
                if s.pending is MISSING:
                    continue
                if now - s.sent_ms >= s.min_interval:
                    self._emit(s, max(now, s.sent_ms + s.min_interval), s.pending)
                else:
                    keep.append(s)
            self._throttled = keep
        if not self.quiet:
            resumed = self._resumed_ms
            for entry in self._timed:
                if entry.mux or (entry.seen >= 0 and now - max(int(entry.seen * 1000), resumed)
                                 > entry.timeout):
                    self._expire(entry, now)
        if now >= self._next_heartbeat_ms and not self.quiet:
            self._next_heartbeat_ms = now + 1000
            resumed = self._resumed_ms
            for s in self._heartbeats:
                if s.sent_ms + s.heartbeat > now:
                    continue  # sent within its heartbeat: most are, so this goes first
                if s.sent is not MISSING and s.pending is MISSING and \
                        now - max(s.sent_ms, resumed) >= s.heartbeat:
                    self._emit(s, now, s.value)
        deadline = self.batches.deadline_ms
        if deadline is not None and now >= deadline:
            self.batches.close()

    def _expire(self, entry: MessageState, now: int) -> None:
        for s in entry.signals:
            if not s.timeout or s.raw is MISSING:
                continue
            seen = max(self.observed_ms(s), self._resumed_ms)
            if now - seen > s.timeout:
                # Forget the frame so that the next one is decoded in full and re-sent.
                entry.last = entry.prev = None
                s.raw = MISSING
                s.value = None
                if s.state:
                    self.state_changed = True
                if s.sent is not None and s.emit:
                    self._emit(s, now, None)

    # -- values that do not come from CAN (modem, GNSS) ------------------------------------

    def feed_values(self, t: float, values: dict) -> None:
        """Take named values observed at `t` (UTC s) from a non-CAN source: sampled on change
        (plus heartbeats) like signals, under their own names, with `value_deadbands`."""
        if t >= self._next_tick:
            self.tick(t)
        t_ms = int(t * 1000)
        for name, value in values.items():
            s = self._by_name.get(name)
            if s is None:
                s = self._external(name)
            s.msg.seen = t
            self._update([s], [(0, value)], t_ms, True)

    def _external(self, name: str, spec: SignalSpec | None = None) -> SignalState:
        spec = spec or SignalSpec(message="", signal=name, out=name, scale=1.0, offset=0.0,
                                  map=None, deadband=self.value_deadbands.get(name, 0.0),
                                  min_interval_ms=0, heartbeat_ms=self.external_heartbeat_ms,
                                  timeout_ms=0, state=False, multiplexed=False)
        s = SignalState(spec)
        MessageState(_NoFrame(name), [s])
        self.signals.append(s)
        self._by_name[name] = s
        if s.heartbeat:
            self._heartbeats.append(s)
        return s

    def add_value_signal(self, spec: SignalSpec) -> None:
        """Declare a non-CAN value (an OBD-II PID) with its own sampling policy, before its
        first feed_values(); spec.out is its name."""
        if spec.out not in self._by_name:
            self._external(spec.out, spec)

    def ignore_ids(self, bus: int, can_keys) -> None:
        """Frames with these ids on this bus are known non-telemetry (diagnostic requests and
        responses): counted as unselected, never as unknown ids. DBC messages keep theirs."""
        entries = self.counters[bus].entries
        for key in can_keys:
            entries.setdefault(key, None)

    def flush(self) -> None:
        """Close the open batch now (shutdown, end of a replay)."""
        for s in self._throttled:
            if s.pending is not MISSING:
                self._emit(s, s.sent_ms + s.min_interval, s.pending)
        self._throttled = []
        self.batches.close()

    def take_batches(self) -> list[Batch]:
        return self.batches.take()

    # -- run-time selection (campaigns) ---------------------------------------------------

    def set_taps(self, taps: Mapping[tuple[int, int], tuple[Any, Any, int | None, Any]],
                 after_feed: Callable[[], None] | None = None) -> None:
        """For these (bus index, can key) messages, taps[key] = (ring, on_change, mask,
        code): append every full frame, (bus, t, can id, data) as fed, to `ring`; call
        on_change (if not None) for each frame that differs from the one before in the bits
        of `mask` (None: in any bit) -- as on_change(t, data, le, dl), le the frame as a
        little-endian int and dl its bits that differ from the frame before, or as
        on_change(t, data) when the frame before is not known (the first, or after one of
        another length). Where `code` (a campaigns.TapCode) is given, the message's sampler
        inlines it instead of calling on_change (which still takes the frames after an
        unknown one). Also for messages [telemetry] does not select (they are received
        from now on, not sent). Messages no longer listed go back to what [telemetry] makes
        of them. `after_feed()` is called after each feed_many() (the campaign engine trims
        its rings there)."""
        self._after_feed = after_feed if taps else None
        for c_index, c in enumerate(self.counters):
            for key, entry in list(c.entries.items()):
                if entry is None or entry.ring is None or (c_index, key) in taps:
                    continue
                entry.ring = entry.tap = entry.tapcode = None
                entry.tapmask = -1
                if not entry.signals:  # selected for a campaign only
                    c.entries[key] = None
                elif entry.fast is not None:
                    entry.step = self._first_step(entry)  # the sampler without the tap
        for (bus, key), (ring, tap, mask, code) in taps.items():
            c = self.counters[bus]
            entry = c.entries.get(key, MISSING)
            if entry is MISSING:
                continue  # not in this bus's databases
            if entry is None:
                entry = c.entries[key] = MessageState(self._messages[bus][key], [])
                entry.fast = _no_signals  # the tap decodes what it needs
            mask = -1 if mask is None else mask
            if tap is not None and tap is not entry.tap:
                entry.last = None  # a new tap sees the next frame, even a repeat
                entry.prev = None  # ... through the core, not a sampler built without it
            if tap is not entry.tap or mask != entry.tapmask or ring is not entry.ring or \
                    code is not entry.tapcode:
                entry.ring, entry.tap, entry.tapmask, entry.tapcode = ring, tap, mask, code
                if not entry.signals:
                    entry.step = _tap_step(entry) if tap is not None else _no_samples
                elif entry.fast is not None:  # the sampler with the tap in it, built now
                    entry.step = _sampler(entry, self.batches, self._update)  # (not mid-run)

    def tapped(self, bus: int) -> list[int]:
        """Can keys of bus `bus` that must be received: selected or tapped."""
        return [k for k, e in self.counters[bus].entries.items() if e is not None]

    # -- views ----------------------------------------------------------------------------

    def snapshot(self, state_only: bool = False) -> dict[str, list]:
        """Last-known values: output name -> [t_ms last observed, value] (PROTOCOL.md §4)."""
        return {s.out: [self.observed_ms(s), s.value] for s in self.signals
                if self.observed_ms(s) >= 0 and s.emit and (s.state or not state_only)}

    def lookup(self, name: str):
        """(value, observed UTC ms) of a signal: by output name the output value, by
        Message.Signal the decoded one (value-table names as strings); None if it was never
        received or is unknown."""
        s = self._by_name.get(name)
        if s is None or self.observed_ms(s) < 0:
            return None
        if name == s.out:
            return s.value, self.observed_ms(s)
        # By Message.Signal: the decoded value as the DBC defines it (before any mapping).
        raw = s.raw
        if raw is MISSING:
            return None, self.observed_ms(s)
        return (raw.name if type(raw) is NamedSignalValue else raw), self.observed_ms(s)

    def last_frame(self, bus: int, can_id: int) -> bytes | None:
        """The last frame received with this id on this bus (for read-modify-write sends)."""
        entry = self.counters[bus].entries.get(can_id)
        return entry.last if entry is not None else None

    @staticmethod
    def observed_ms(s: SignalState) -> int:
        """When signal `s` was last observed (its frame arrived), in UTC ms; -1 if never."""
        m = s.msg
        if m.mux and s.sig not in m.present:
            return s.seen_ms
        # A short frame refreshes single signals (s.seen_ms) without refreshing the message.
        return max(int(m.seen * 1000) if m.seen >= 0 else -1, s.seen_ms)

    def value_of(self, name: str):
        return self._by_name[name].value
