"""Collection campaigns (PROTOCOL.md §8): validation, start/expiry, and the engine. Sans-I/O.

A campaign arrives as `campaign.apply`; `check_campaign` validates the whole document
against this vehicle's signals and limits before anything changes. The engine runs the
active ones on frames the telemetry core hands it through one tap per message (`taps()`):
the core appends every full frame to the message's ring (no Python call) and calls the
tap's function only for a frame that differs from the one before.

- every signal a running campaign reads has one `Sig` (its latest value), and each time
  window of a condition one `Agg` (avg/min/max kept as runs of one value);
- conditions run as generated straight-line Python (`_codegen`, the semantics of
  expr.compile_condition);
- a condition is evaluated only when one of its inputs changes value (the index
  signal -> conditions; the tap masks a changed frame against its inputs' bits first), plus
  on each tick for those currently true (an input may have gone stale) and for windowed ones
  whose windows moved;
- windows take the ring's new frames when queried or ticked (`Tap.catch_up`), decoding only
  where the window signal's bits changed;
- a condition campaign's signals come from the ring (`pre_ms` at arrival rate, shared by the
  campaigns reading it, decoded only on firing); on firing those samples and those of the
  next `post_ms` (taken as they arrive through a hook on the ring) go out as batches tagged
  campaign/trigger;
- a time campaign takes the latest value of each signal every `period_ms`.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import cbor2
from cantools.database.namedsignalvalue import NamedSignalValue

from ..errors import ParamError
from . import expr as E
from .batch import Batch, BatchBuilder, Column
from .fastdecode import compile_message
from .registry import Family, no_params, show
from .selection import BusPlan, SignalSpec
from .telemetry import map_key

APPLY, REMOVE, LIST = "campaign.apply", "campaign.remove", "campaign.list"
WAITING, ACTIVE, EXPIRED = "waiting", "active", "expired"
MAX_DOC_BYTES = 256 * 1024  # a campaign document, CBOR-encoded
SAMPLE_BYTES = 128  # what one buffered (t, frame) or (t, value) costs in memory, for the budget
DEFAULT_PRIORITY = 5  # a campaign without `priority`; base telemetry has the same
MIN_PERIOD_MS = 100  # the engine ticks every 100 ms
CATCH_UP_MS = 1000  # windows read their message's ring at least this often (each tick)
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True)
class Limits:
    max_campaigns: int = 1024
    max_conditions: int = 512  # active condition campaigns
    max_signals: int = 256  # per campaign
    max_buffer_bytes: int = 16 << 20  # every ring and window history together
    max_capture_ms: int = 600_000  # pre_ms, post_ms
    max_window_ms: int = 600_000  # N of avg/min/max
    assumed_period_ms: int = 10  # a message without a DBC cycle time: assume 100 Hz


# -- what this vehicle's signals are --------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    bus: int
    key: int  # can key of the message
    message: Any  # cantools Message
    signal: str
    spec: SignalSpec | None  # set when named by a [telemetry] output name: values are shaped

    @property
    def period_ms(self) -> int:
        return self.message.cycle_time or 0


class Catalog:
    """Every name a campaign may use: each `Message.Signal` of the buses' DBCs and each
    [telemetry] output name."""

    def __init__(self, plans: Sequence[BusPlan]):
        self.refs: dict[str, Ref] = {}
        for b, plan in enumerate(plans):
            for key, msg in plan.messages.items():
                for sig in msg.signals:
                    self.refs.setdefault(f"{msg.name}.{sig.name}", Ref(b, key, msg, sig.name, None))
        for b, plan in enumerate(plans):
            for key, mp in plan.selected.items():
                for spec in mp.signals:
                    if spec.emit and spec.out not in self.refs:
                        self.refs[spec.out] = Ref(b, key, mp.message, spec.signal, spec)

    def get(self, name: str) -> Ref | None:
        return self.refs.get(name)


# -- the document ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SignalReq:
    name: str
    min_interval_ms: int = 0
    deadband: float = 0.0


@dataclass(frozen=True)
class Campaign:
    id: str
    version: int
    signals: tuple[SignalReq, ...]
    start: int = 0
    expiry: int | None = None
    priority: int = DEFAULT_PRIORITY
    period_ms: int | None = None  # a time campaign
    condition: str | None = None  # a condition campaign
    rising_edge: bool = True
    min_interval_ms: int = 0
    pre_ms: int = 0
    post_ms: int = 0
    max_bytes: int | None = None
    doc: Mapping = field(default_factory=dict, compare=False, repr=False)  # as applied
    tree: E.Node | None = field(default=None, compare=False, repr=False)

    def state(self, now_ms: int) -> str:
        if self.expiry is not None and now_ms >= self.expiry:
            return EXPIRED
        return WAITING if now_ms < self.start else ACTIVE

    def inputs(self) -> list[str]:
        names = [s.name for s in self.signals]
        if self.tree is not None:
            names += [n for n in E.signals(self.tree) if n not in names]
        return names


def _uint(v, where: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        raise ParamError(f"{where}: must be an integer {rng}, not {show(v)}")
    return v


def _keys(m, allowed: set[str], where: str) -> None:
    if not isinstance(m, Mapping):
        raise ParamError(f"{where}: must be a map, not {show(m)}")
    extra = sorted(k for k in m if k not in allowed)
    if extra:
        raise ParamError(f"{where}: unknown key {show(extra[0])} (known: {', '.join(sorted(allowed))})")


def parse_campaign(doc, catalog: Catalog, limits: Limits) -> Campaign:
    """The whole document checked; raises ParamError with a detail naming the field."""
    _keys(doc, {"id", "version", "start", "expiry", "priority", "signals", "trigger",
                "max_bytes"}, "campaign")
    size = len(cbor2.dumps(dict(doc)))
    if size > MAX_DOC_BYTES:
        raise ParamError(f"campaign: {size} bytes, over the {MAX_DOC_BYTES}-byte limit")
    for k in ("id", "version", "signals", "trigger"):
        if k not in doc:
            raise ParamError(f"campaign.{k}: missing")
    cid = doc["id"]
    if not isinstance(cid, str) or not _ID.match(cid):
        raise ParamError(f"campaign.id: 1-64 characters [A-Za-z0-9._:-], not {show(cid)}")
    version = _uint(doc["version"], "campaign.version")
    start = _uint(doc.get("start", 0), "campaign.start")
    expiry = doc.get("expiry")
    if expiry is not None:
        _uint(expiry, "campaign.expiry")
        if expiry <= start:
            raise ParamError("campaign.expiry: must be after start")
    priority = _uint(doc.get("priority", DEFAULT_PRIORITY), "campaign.priority", 0, 9)
    max_bytes = doc.get("max_bytes")
    if max_bytes is not None:
        _uint(max_bytes, "campaign.max_bytes", 1)

    sigs = doc["signals"]
    if not isinstance(sigs, list) or not sigs:
        raise ParamError("campaign.signals: must be a non-empty list")
    if len(sigs) > limits.max_signals:
        raise ParamError(f"campaign.signals: {len(sigs)} signals, more than "
                         f"{limits.max_signals}")
    reqs = []
    for i, s in enumerate(sigs):
        where = f"campaign.signals.{i}"
        _keys(s, {"name", "min_interval_ms", "deadband"}, where)
        name = s.get("name")
        if not isinstance(name, str) or not name:
            raise ParamError(f"{where}.name: must be a signal name")
        deadband = s.get("deadband", 0.0)
        if isinstance(deadband, bool) or not isinstance(deadband, (int, float)) \
                or not deadband >= 0 or math.isinf(deadband):
            raise ParamError(f"{where}.deadband: must be a number >= 0, not {show(deadband)}")
        reqs.append(SignalReq(name, _uint(s.get("min_interval_ms", 0), f"{where}.min_interval_ms"),
                              float(deadband)))
    names = [r.name for r in reqs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ParamError(f"campaign.signals: {dupes[0]!r} is listed twice")

    trig = doc["trigger"]
    fields: dict[str, Any] = {}
    tree = None
    if isinstance(trig, Mapping) and "period_ms" in trig:
        _keys(trig, {"period_ms"}, "campaign.trigger")
        fields["period_ms"] = _uint(trig["period_ms"], "campaign.trigger.period_ms",
                                    MIN_PERIOD_MS, 86_400_000)
    elif isinstance(trig, Mapping) and "condition" in trig:
        _keys(trig, {"condition", "rising_edge", "min_interval_ms", "pre_ms", "post_ms"},
              "campaign.trigger")
        text = trig["condition"]
        if not isinstance(text, str):
            raise ParamError("campaign.trigger.condition: must be a string")
        try:
            tree = E.parse(text)
        except E.ExprError as e:
            raise ParamError(f"campaign.trigger.condition: {e}") from None
        for fn, sig, n in E.windows(tree):
            if n > limits.max_window_ms:
                raise ParamError(f"campaign.trigger.condition: {fn}({sig}, {n}): window over "
                                 f"{limits.max_window_ms} ms")
        edge = trig.get("rising_edge", True)
        if type(edge) is not bool:
            raise ParamError("campaign.trigger.rising_edge: must be true or false")
        fields.update(condition=text, rising_edge=edge,
                      min_interval_ms=_uint(trig.get("min_interval_ms", 0),
                                            "campaign.trigger.min_interval_ms"),
                      pre_ms=_uint(trig.get("pre_ms", 0), "campaign.trigger.pre_ms", 0,
                                   limits.max_capture_ms),
                      post_ms=_uint(trig.get("post_ms", 0), "campaign.trigger.post_ms", 0,
                                    limits.max_capture_ms))
    else:
        raise ParamError("campaign.trigger: must be {period_ms} (time) or {condition, ...} "
                         "(condition)")
    c = Campaign(cid, version, tuple(reqs), start, expiry, priority, max_bytes=max_bytes,
                 doc=dict(doc), tree=tree, **fields)
    unknown = [n for n in c.inputs() if catalog.get(n) is None]
    if unknown:
        raise ParamError(f"campaign: unknown signal(s) {', '.join(unknown[:8])}"
                         f"{' ...' if len(unknown) > 8 else ''} (use an output name or "
                         "Message.Signal of this vehicle's databases)")
    need = buffer_bytes(c, catalog, limits)
    if need > limits.max_buffer_bytes:
        raise ParamError(f"campaign: its buffers need {need} bytes, over campaigns."
                         f"max_buffer_bytes ({limits.max_buffer_bytes}); shorten pre_ms or "
                         "windows, or name fewer signals")
    return c


def _capacity(ms: int, ref: Ref, min_interval_ms: int, limits: Limits) -> int:
    """Samples in `ms` at the faster of the DBC cycle time and `assumed_period_ms` (senders
    are often faster than their DBC says), or one per `min_interval_ms`."""
    period = min(ref.period_ms or limits.assumed_period_ms, limits.assumed_period_ms)
    return math.ceil(ms / max(period, min_interval_ms, 1)) + 1


def _catch_up_capacity(n: int, ref: Ref, limits: Limits) -> int:
    """What the ring of a window's message must hold so that no frame is gone before the
    window takes it (at the next tick or query, within CATCH_UP_MS), and never more than
    the window's own history."""
    return min(_capacity(n, ref, 0, limits), _capacity(CATCH_UP_MS, ref, 0, limits))


def buffer_bytes(c: Campaign, catalog: Catalog, limits: Limits) -> int:
    """Memory the campaign's rings and window histories may hold: a ring of frames per
    message it captures from (pre_ms at the rate of `_capacity`), a history per window and
    the stretch of ring its window reads from (`_catch_up_capacity`). Each is a bounded
    deque of at most this capacity (rings are shared: counted for each campaign)."""
    total = 0
    if c.condition is not None and c.pre_ms:
        messages = {}
        for s in c.signals:
            ref = catalog.get(s.name)
            messages[(ref.bus, ref.key)] = ref
        for ref in messages.values():
            total += _capacity(c.pre_ms, ref, 0, limits) * SAMPLE_BYTES
    if c.tree is not None:
        for _fn, sig, n in E.windows(c.tree):
            ref = catalog.get(sig)
            total += (_capacity(n, ref, 0, limits)
                      + _catch_up_capacity(n, ref, limits)) * SAMPLE_BYTES
    return total


def campaign_family(catalog: Catalog, limits: Limits) -> Family:
    """The `campaign` family, its checks bound to this vehicle's signals and limits."""

    def check(name: str, params: Mapping) -> None:
        if name == APPLY:
            _keys(params, {"campaign"}, "params")
            if "campaign" not in params:
                raise ParamError("params.campaign: missing")
            parse_campaign(params["campaign"], catalog, limits)
        elif name == REMOVE:
            _keys(params, {"id"}, "params")
            cid = params.get("id")
            if not isinstance(cid, str) or not _ID.match(cid):
                raise ParamError(f"params.id: a campaign id, not {show(cid)}")
        else:
            no_params(name, params)

    return Family("campaign", frozenset((APPLY, REMOVE, LIST)), check)


# -- batches --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CampaignBatch(Batch):
    campaign: str = ""
    trigger: int | None = None
    priority: int = DEFAULT_PRIORITY
    max_bytes: int | None = None

    def payload(self, vin: str, seq: int, drop: int = 0) -> dict:
        body = Batch.payload(self, vin, seq, drop)
        body["campaign"] = self.campaign
        if self.trigger is not None:
            body["trigger"] = self.trigger
        return body


# -- the engine -----------------------------------------------------------------------------

def _decoder(message, names: list[str]) -> Callable[[bytes], list]:
    """fn(data) -> the values of `names` (value-table names as strings; None if absent)."""
    fast = compile_message(message, names)
    named = NamedSignalValue
    if fast is not None:
        n = len(names)
        length = message.length

        def decode(data: bytes) -> list:
            out = [None] * n
            if len(data) == length:
                for i, v in fast(data, None)[1]:
                    out[i] = v.name if type(v) is named else v
            return out
        return decode

    def slow(data: bytes) -> list:
        try:
            values = message.decode(data, True, True, False, True)
        except Exception:  # noqa: BLE001 - a bad frame; the core counts it
            return [None] * len(names)
        return [v.name if type(v) is named else v
                for v in (values.get(name) for name in names)]
    return slow


def _bits(message, names: list[str]) -> int:
    """The bits of these signals, as a mask on the frame read as a little-endian integer."""
    by_name = {s.name: s for s in message.signals}
    mask = 0
    for name in names:
        sig = by_name[name]
        if sig.byte_order == "little_endian":
            mask |= ((1 << sig.length) - 1) << sig.start
            continue
        pos = sig.start  # Motorola: from the MSB (bit 7 = a byte's MSB) down
        for _ in range(sig.length):
            mask |= 1 << pos
            pos = pos + 15 if pos % 8 == 0 else pos - 1
    return mask


class Sig:
    """One signal some running campaign reads."""

    __slots__ = ("name", "ref", "value", "conditions", "tap")

    def __init__(self, name: str, ref: Ref):
        self.name, self.ref = name, ref
        self.value: Any = None  # condition inputs: decoded when their bits change
        self.conditions: list[Group] = []  # evaluated when this signal changes
        self.tap: Tap | None = None


_NUM = (int, float)


class Agg:
    """avg/min/max of one signal over the samples of the last `n` ms. Samples arrive in runs
    of one value (`Tap.catch_up`) and are kept as runs, so a sample costs its time and no
    Python step of its own:
    - avg: the times of the samples (a list read from `head`), the runs (index of their
      first sample, value) and the running total of the samples from `head` on;
    - min/max: a monotonic deque of (time, value) candidates, one per run.
    At most `cap` samples are kept (the oldest go first). Samples that are not numbers
    (null after a timeout, names) are not counted."""

    __slots__ = ("fn", "name", "n", "cap", "times", "head", "runs", "rhead", "total", "q",
                 "tap", "sv")

    def __init__(self, fn: str, name: str, n: int, cap: int):
        self.fn, self.name, self.n, self.cap = fn, name, n, cap
        self.q: deque = deque()  # min/max: (t, v) candidates
        self.tap: Tap | None = None
        self.sv: Any = None  # steady: the one value (Tap.catch_up)
        self.clear()

    def clear(self) -> None:
        self.times: list[int] = []
        self.head = 0
        self.runs: list[tuple[int, Any]] = []  # (index into times, value)
        self.rhead = 0  # the run holding times[head]
        self.total = 0
        self.q.clear()

    def add(self, t: int, v) -> None:
        self.extend([t], [(0, 1, v)])

    def extend(self, times: list[int], runs) -> None:
        """Samples in arrival order, `times[i]` ms each, as runs (start, end, value): the
        samples times[start:end] all have `value`. The same result as adding them one by
        one; the window ends at the last."""
        num = _NUM
        if self.fn == "avg":
            mine, mruns = self.times, self.runs
            total = self.total
            for start, end, v in runs:
                if v.__class__ not in num:
                    continue
                if len(mruns) == self.rhead or mruns[-1][1] != v:
                    mruns.append((len(mine), v))
                mine.extend(times[start:end])
                total += v * (end - start)
            self.total = total
            if len(mine) - self.head > self.cap:  # faster than sized for: the oldest go
                self._drop(len(mine) - self.cap)
        else:
            q, cap, low = self.q, self.cap, self.fn == "min"
            for start, end, v in runs:  # of a run, only its last can be the min/max
                if v.__class__ not in num:
                    continue
                if low:
                    while q and q[-1][1] >= v:
                        q.pop()
                else:
                    while q and q[-1][1] <= v:
                        q.pop()
                q.append((times[end - 1], v))
                if len(q) > cap:
                    q.popleft()
        self._prune(times[-1])

    def _drop(self, head: int) -> None:
        """avg: the samples before index `head` leave the window."""
        times, runs = self.times, self.runs
        h, r, total = self.head, self.rhead, self.total
        while h < head:
            end = runs[r + 1][0] if r + 1 < len(runs) else len(times)
            stop = end if end < head else head
            total -= runs[r][1] * (stop - h)
            h = stop
            if h == end:
                r += 1
        if h >= len(times):  # empty: start over, no drift carried into the next samples
            self.clear()
            return
        self.head, self.rhead, self.total = h, r, total
        if h > 256 and h * 2 > len(times):  # compact
            del times[:h]
            self.runs = [(max(i - h, 0), v) for i, v in runs[r:]]
            self.head = self.rhead = 0

    def _prune(self, now: int) -> None:
        lo = now - self.n
        if self.fn == "avg":
            times = self.times
            if self.head < len(times) and times[self.head] < lo:
                self._drop(bisect_left(times, lo, self.head))
            return
        q = self.q
        while q and q[0][0] < lo:
            q.popleft()

    def steady(self, v) -> bool:
        """Whether the window's value is `v` for as long as samples of `v` keep coming."""
        if v.__class__ not in _NUM:
            return False
        if self.fn == "avg":
            return self.rhead == len(self.runs) - 1 and self.runs[-1][1] == v and \
                len(self.times) > self.head
        return len(self.q) == 1 and self.q[0][1] == v

    def query(self, now: int):
        """The aggregate at `now`, or None when no sample is in the window."""
        tap = self.tap
        if tap is not None and tap.ring and tap.ring[-1] is not tap.wseen:
            if tap.wsteady and not tap.wdirty:  # new frames, all of the one value
                if int(tap.ring[-1][0] * 1000) < now - self.n:
                    return None  # (the newest is out of the window: so are all)
                return float(self.sv) if self.fn == "avg" else self.sv
            tap.catch_up()
        self._prune(now)
        if self.fn != "avg":
            return self.q[0][1] if self.q else None
        k = len(self.times) - self.head
        if not k:
            return None
        if self.rhead == len(self.runs) - 1:  # one value: exactly it (and the sum again)
            v = self.runs[-1][1]
            self.total = v * k
            return float(v)
        return self.total / k

    def __len__(self) -> int:
        return len(self.times) - self.head if self.fn == "avg" else len(self.q)


class Ring(deque):
    """A tapped message's frames, (t seconds, data): the telemetry core appends every full
    frame at arrival rate, a C call and no more. While a campaign captures after its
    trigger, the engine shadows `append` on the instance (an attribute), so those frames
    also go to the capture as they arrive; otherwise the ring is only read (on firing, by
    windows)."""


class Tap:
    """One tapped message: its ring of frames, the change detector of its condition inputs
    (run by the core for changed frames only) and the window aggregates it feeds."""

    __slots__ = ("message", "ring", "conds", "fast", "mask", "prev", "aggs", "wdecode",
                 "wspecs", "wmask", "wseen", "wprev", "wvalues", "wle", "wdirty", "wsteady",
                 "gaps", "active")

    def __init__(self, message):
        self.message = message
        self.ring = Ring(maxlen=1)  # at least the last frame
        self.gaps = 0  # window catch-ups that found frames gone from the ring
        self.reset()

    def reset(self) -> None:
        self.conds: list[Sig] = []
        self.fast = None
        self.mask: int | None = None  # the condition inputs' bits (compiled messages)
        self.prev = None  # the last changed frame as a little-endian int (fastdecode)
        self.aggs: list[tuple[Agg, Ref]] = []
        self.wdecode = None
        self.wspecs: list[SignalSpec | None] = []  # of the window signals (output names)
        self.wmask: int | None = None  # the window signals' bits (compiled messages)
        self.wseen = self.ring[-1] if self.ring else None  # the last frame the windows took
        self.wprev: Any = None  # ... its bits (or bytes), and the window values decoded
        self.wvalues: list = []
        self.wle: int | None = None  # the window bits of the last changed frame (tap fn)
        self.wdirty = True  # a window bit may have moved since the last catch-up
        self.wsteady = False  # every window holds one value, that of the newest frame
        self.active: list[tuple[Running, Part]] = []  # campaigns capturing after a trigger

    @property
    def last(self) -> bytes | None:
        return self.ring[-1][1] if self.ring else None

    @property
    def last_t(self) -> int:
        """ms of the last full frame, -1 if none arrived."""
        return int(self.ring[-1][0] * 1000) if self.ring else -1

    def catch_up(self, force: bool = False) -> None:
        """The frames that arrived since the last call, into the window aggregates (the
        same result as adding each on arrival). A frame is decoded only where the window
        signals' bits changed; the frames in between make a run of the same values, so
        a repeated value costs a comparison, not a decode."""
        ring = self.ring
        if not ring or (self.wsteady and not self.wdirty and not force):
            return  # (steady: the frames since only repeat the windows' one value)
        seen = self.wseen
        newest = self.wseen = ring[-1]
        if newest is seen:
            return
        new = []
        for item in reversed(ring):
            if item is seen:
                break
            new.append(item)
        else:
            if seen is not None:  # more frames than the ring holds came since: the newest
                if any(agg.cap > ring.maxlen for agg, _ref in self.aggs):
                    self.gaps += 1  # (else the newest frames hold all a window keeps)
                for agg, _ref in self.aggs:
                    agg.clear()
        new.reverse()
        prev, values, mask, decode = self.wprev, self.wvalues, self.wmask, self.wdecode
        length = self.message.length
        from_bytes = int.from_bytes
        times = []
        cuts = [0]  # where the values change, and the values from there on
        rows = [values]
        i = -1
        for t, d in new:
            i += 1
            times.append(int(t * 1000))
            if mask is None or len(d) != length:
                key = d  # not compiled, or a frame of another length: the bytes decide
            else:
                key = from_bytes(d, "little")
                if prev.__class__ is int and not (key ^ prev) & mask:
                    prev = key
                    continue
            if key == prev:
                continue
            prev = key
            values = [v if v is None or spec is None else _shape(spec, v)
                      for spec, v in zip(self.wspecs, decode(d))]
            if i:
                cuts.append(i)
                rows.append(values)
            else:
                rows[0] = values
        self.wprev, self.wvalues = prev, values
        cuts.append(i + 1)
        steady = self.wmask is not None
        for j, (agg, _ref) in enumerate(self.aggs):
            agg.extend(times, [(cuts[k], cuts[k + 1], row[j]) for k, row in enumerate(rows)])
            steady = steady and agg.cap <= ring.maxlen and agg.steady(values[j])
            agg.sv = values[j]  # the value of the newest frame
        self.wsteady, self.wdirty = steady, False


class Part:
    """The signals one campaign captures from one message."""

    __slots__ = ("tap", "cols", "decode", "refs")

    def __init__(self, tap: Tap, cols: list[int], decode, refs: list[Ref]):
        self.tap, self.cols, self.decode, self.refs = tap, cols, decode, refs


class Group:
    """The running campaigns with one condition text: evaluated once for all of them."""

    __slots__ = ("fn", "members", "windowed", "true", "aggs", "wvals")

    def __init__(self, fn, windowed: bool):
        self.fn, self.windowed = fn, windowed
        self.members: list[Running] = []
        self.true = False  # the last evaluation
        self.aggs: list[Agg] = []  # its windows
        self.wvals: list | None = None  # their values when a tick last evaluated it


class Running:
    """One active campaign's run-time state."""

    def __init__(self, c: Campaign, now_ms: int, batch_age_ms: int, batch_bytes: int):
        self.c = c
        self.windowed = bool(c.tree is not None and E.windows(c.tree))
        self.cols = [Column(s.name) for s in c.signals]
        self.builder = BatchBuilder(batch_age_ms, batch_bytes)
        self.parts: list[Part] = []
        self.last_in: list[tuple[int, Any]] = [(-1, None)] * len(c.signals)  # filter state
        self.prev = False
        self.last_fire = None
        self.capture_until = -1  # capturing while now <= this
        self.trigger_ms: int | None = None
        self.firings = 0
        self.overflow = 0  # firings whose pre_ms reached further back than the ring held
        self.next_due = now_ms + (c.period_ms or 0)
        self.batches = 0


class CampaignEngine:
    """Runs the active campaigns. Feed it through `taps()` (installed on the telemetry core),
    call `tick(now_ms)` often (at least every CATCH_UP_MS of frames), and take
    `take_batches()`."""

    def __init__(self, catalog: Catalog, limits: Limits = Limits(), stale_ms: int = 5000,
                 batch_age_ms: int = 1000, batch_bytes: int = 65536):
        self.catalog, self.limits, self.stale_ms = catalog, limits, stale_ms
        self.batch_age_ms, self.batch_bytes = batch_age_ms, batch_bytes
        self.applied: dict[str, Campaign] = {}
        self.running: dict[str, Running] = {}
        self.sigs: dict[str, Sig] = {}
        self.aggs: dict[tuple[str, str, int], Agg] = {}
        self.tapmap: dict[tuple[int, int], Tap] = {}
        self.closed: list[CampaignBatch] = []
        self.changed = True  # the set of tapped messages may differ: re-install taps
        self.evaluations = 0
        self.errors = 0  # taps that raised (bugs), counted
        self.last_error = ""
        self._now = 0
        self._ticked: list[Group] = []  # windowed conditions, re-evaluated per tick
        self._windowed: list[Tap] = []  # taps feeding window aggregates
        self._next_change = -1  # ms of the next start or expiry among the applied
        self.groups: dict[str, Group] = {}  # condition text -> its running campaigns
        self._fns: dict[str, Any] = {}  # condition text -> generated code
        self._timed: list[Running] = []  # time campaigns
        self._capturing: dict[str, Running] = {}  # condition campaigns after a trigger
        self._cache: dict = {}  # compiled decoders (the catalog's messages live as long)

    @property
    def window_gaps(self) -> int:
        """Window catch-ups that found frames gone from the ring that a window longer than
        the ring would have kept (ticks too rare, or frames far faster than sized for)."""
        return sum(tap.gaps for tap in self.tapmap.values())

    # -- applying -----------------------------------------------------------------------

    def check_apply(self, c: Campaign) -> str:
        """'' if `c` may replace/join the applied ones, else the BAD_PARAMS detail."""
        old = self.applied.get(c.id)
        if old is not None and c.version <= old.version:
            return (f"campaign {c.id}: version {c.version} is not newer than the applied "
                    f"version {old.version}")
        others = [x for x in self.applied.values() if x.id != c.id]
        if len(others) + 1 > self.limits.max_campaigns:
            return f"campaign {c.id}: {self.limits.max_campaigns} campaigns are applied already"
        if c.condition is not None and \
                sum(x.condition is not None for x in others) + 1 > self.limits.max_conditions:
            return (f"campaign {c.id}: {self.limits.max_conditions} condition campaigns are "
                    "applied already (campaigns.max_conditions)")
        used = sum(buffer_bytes(x, self.catalog, self.limits) for x in others)
        need = buffer_bytes(c, self.catalog, self.limits)
        if used + need > self.limits.max_buffer_bytes:
            return (f"campaign {c.id}: its buffers need {need} bytes, only "
                    f"{self.limits.max_buffer_bytes - used} of campaigns.max_buffer_bytes "
                    f"({self.limits.max_buffer_bytes}) are free; shorten pre_ms or windows, "
                    "or remove a campaign")
        return ""

    def apply(self, c: Campaign, now_ms: int) -> None:
        """Install (or replace) a checked campaign."""
        self._stop(c.id)
        self.applied[c.id] = c
        self._next_change = -1
        self._sync(now_ms)
        self._rebuild()

    def remove(self, cid: str, now_ms: int) -> bool:
        if cid not in self.applied:
            return False
        self._stop(cid)
        del self.applied[cid]
        self._rebuild()
        return True

    def list(self, now_ms: int) -> list[dict]:
        return [{"id": c.id, "version": c.version, "state": c.state(now_ms)}
                for c in sorted(self.applied.values(), key=lambda c: c.id)]

    def _sync(self, now_ms: int) -> list[str]:
        """Start the campaigns whose time has come, stop and drop the expired; returns the
        ids of expired ones (removed)."""
        if now_ms < self._next_change:
            return []
        expired = []
        started = False
        nxt = float("inf")  # the next start or expiry: nothing to do before it
        for c in list(self.applied.values()):
            if c.start > now_ms:
                nxt = min(nxt, c.start)
            elif c.expiry is not None and c.expiry > now_ms:
                nxt = min(nxt, c.expiry)
            state = c.state(now_ms)
            if state == EXPIRED:
                self._stop(c.id)
                del self.applied[c.id]
                expired.append(c.id)
            elif state == ACTIVE and c.id not in self.running:
                self.running[c.id] = Running(c, now_ms, self.batch_age_ms, self.batch_bytes)
                started = True
        self._next_change = nxt
        if expired or started:
            self._rebuild()
        return expired

    def _stop(self, cid: str) -> None:
        r = self.running.pop(cid, None)
        if r is not None:
            self._close(r)
            self._capturing.pop(cid, None)
            for part in r.parts:
                self._set_active(part.tap, [x for x in part.tap.active if x[0] is not r])

    def _rebuild(self) -> None:
        """Signals, taps, rings, window aggregates and the condition index for the running
        set; what stays keeps its values, aggregates and ring contents."""
        for tap in self._windowed:  # what the rings hold goes to the windows of the old set
            tap.catch_up(force=True)
        old_taps = self.tapmap
        self.tapmap = {}
        self._ticked = []
        self.groups = {}
        self._timed = [r for r in self.running.values() if r.c.period_ms is not None]
        used: set[str] = set()
        used_aggs: set[tuple[str, str, int]] = set()
        for sg in self.sigs.values():
            sg.conditions = []

        def sig(name: str) -> Sig:
            used.add(name)
            s = self.sigs.get(name)
            if s is None:
                s = self.sigs[name] = Sig(name, self.catalog.get(name))
            key = (s.ref.bus, s.ref.key)
            tap = self.tapmap.get(key)
            if tap is None:
                tap = old_taps.get(key) or Tap(s.ref.message)  # its ring is kept
                tap.reset()
                self.tapmap[key] = tap
            s.tap = tap
            return s

        ring_cap: dict[tuple[int, int], int] = {}
        for r in self.running.values():
            c = r.c
            by_msg: dict[tuple[int, int], list[int]] = {}
            for i, req in enumerate(c.signals):
                s = sig(req.name)
                by_msg.setdefault((s.ref.bus, s.ref.key), []).append(i)
            r.parts = []
            for key, cols in by_msg.items():
                tap = self.tapmap[key]
                refs = [self.sigs[c.signals[i].name].ref for i in cols]
                r.parts.append(Part(tap, cols, self._decoder(tap.message,
                                                             [x.signal for x in refs]), refs))
                if c.condition is not None and c.pre_ms:
                    cap = _capacity(c.pre_ms, refs[0], 0, self.limits)
                    ring_cap[key] = max(ring_cap.get(key, 0), cap)
            if c.tree is not None:
                group = self.groups.get(c.condition)
                if group is None:
                    group = self.groups[c.condition] = Group(None, r.windowed)
                    for name in E.value_signals(c.tree):
                        sig(name).conditions.append(group)
                    if r.windowed:
                        self._ticked.append(group)
                group.members.append(r)
                group.true = group.true or r.prev
                for fn, name, n in E.windows(c.tree):
                    sg = sig(name)
                    used_aggs.add((fn, name, n))
                    if (fn, name, n) not in self.aggs:
                        self.aggs[(fn, name, n)] = Agg(fn, name, n,
                                                       _capacity(n, sg.ref, 0, self.limits))
                    key = (sg.ref.bus, sg.ref.key)
                    ring_cap[key] = max(ring_cap.get(key, 0),
                                        _catch_up_capacity(n, sg.ref, self.limits))
        gone = [n for n in self.sigs if n not in used]
        gone_aggs = [k for k in self.aggs if k not in used_aggs]
        for name in gone:
            del self.sigs[name]
        for key in gone_aggs:
            del self.aggs[key]
        if gone or gone_aggs:
            self._fns = {}  # generated code holds those objects: build it again
        for text, group in self.groups.items():
            tree = group.members[0].c.tree
            group.aggs = [self.aggs[w] for w in dict.fromkeys(E.windows(tree))]
            if text not in self._fns:
                self._fns[text] = _codegen(group.members[0].c.tree, self.sigs, self.aggs,
                                           self.stale_ms)
            group.fn = self._fns[text]
        for s in self.sigs.values():
            if s.conditions:
                s.tap.conds.append(s)
        for (fn, name, n), agg in self.aggs.items():
            agg.tap = self.sigs[name].tap
            agg.tap.aggs.append((agg, self.sigs[name].ref))
        for key, tap in self.tapmap.items():
            cap = max(ring_cap.get(key, 0), 1)
            if tap.ring.maxlen != cap:
                tap.ring = Ring(tap.ring, maxlen=cap)  # (the core gets it with taps())
            if tap.conds:
                names = [s.ref.signal for s in tap.conds]
                tap.fast = self._compiled(tap.message, names)
                if tap.fast is None:  # multiplexed / float: decode and compare
                    tap.fast = _changes(self._decoder(tap.message, names))
                else:
                    tap.mask = _bits(tap.message, names)
            if tap.aggs:
                names = [ref.signal for _a, ref in tap.aggs]
                tap.wdecode = self._decoder(tap.message, names)
                tap.wspecs = [ref.spec for _a, ref in tap.aggs]
                if self._compiled(tap.message, names) is not None:
                    tap.wmask = _bits(tap.message, names)
        self._windowed = [tap for tap in self.tapmap.values() if tap.aggs]
        active: dict[int, list] = {}
        for r in self.running.values():  # captures in progress carry on
            if r.capture_until >= 0:
                for part in r.parts:
                    active.setdefault(id(part.tap), []).append((r, part))
        for key, tap in old_taps.items():
            if key not in self.tapmap:
                self._set_active(tap, [])  # not tapped any more: no capture hook left
        for tap in self.tapmap.values():
            self._set_active(tap, active.get(id(tap), []))
        self.changed = True

    def _decoder(self, message, names: list[str]):
        key = ("d", id(message), tuple(names))
        if key not in self._cache:
            self._cache[key] = _decoder(message, names)
        return self._cache[key]

    def _compiled(self, message, names: list[str]):
        key = ("c", id(message), tuple(names))
        if key not in self._cache:
            self._cache[key] = compile_message(message, names)
        return self._cache[key]

    # -- taps: what the telemetry core must hand over ------------------------------------

    def taps(self) -> dict[tuple[int, int], tuple[Ring, Callable[[float, bytes], None] | None]]:
        """(bus, can key) -> (ring, on_change) for every message a running campaign reads:
        the core appends (t_seconds, data) of every full frame to `ring`, and calls
        on_change(t_seconds, data) for a frame that differs from the one before (None: no
        condition reads the message)."""
        self.changed = False
        return {k: (tap.ring, self._tap_fn(tap) if tap.conds or tap.wmask is not None
                    else None) for k, tap in self.tapmap.items()}

    def _tap_fn(self, tap: Tap) -> Callable[[float, bytes], None]:
        """The condition inputs of one message, for a frame that differs from the one
        before: decoded where their bits changed, the conditions of those whose value
        changed evaluated."""
        length = tap.message.length
        fast, mask, conds, wmask = tap.fast, tap.mask, tap.conds, tap.wmask
        from_bytes = int.from_bytes
        named = NamedSignalValue

        def fn(t: float, data: bytes) -> None:
            if len(data) != length:
                tap.wdirty = True
                return
            try:
                le = from_bytes(data, "little")
                if wmask is not None:  # have the window signals' bits moved? (see catch_up)
                    if tap.wle is None or (le ^ tap.wle) & wmask:
                        tap.wdirty = True
                    tap.wle = le
                    if not conds:
                        return
                prev = tap.prev
                if mask is not None and prev is not None and not (le ^ prev) & mask:
                    tap.prev = le  # most changes: counters, other signals
                    return
                tap.prev, changed = fast(data, prev)
                dirty = []
                for i, v in changed:
                    s = conds[i]
                    if type(v) is named:
                        v = v.name
                    if s.ref.spec is not None:
                        v = _shape(s.ref.spec, v)
                    if v != s.value or type(v) is not type(s.value):
                        s.value = v
                        dirty.extend(s.conditions)
                if dirty:
                    self._evaluate(dirty, int(t * 1000))
            except Exception as e:  # noqa: BLE001 - a bug here must not cost the core the frame
                self._failed(e)
        return fn

    def _failed(self, e: Exception) -> None:
        self.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"[:200]

    # -- captures -------------------------------------------------------------------------

    def _capture(self, r: Running, part: Part, t_ms: int, values: list) -> None:
        """The campaign's signals of one frame (`part.decode`d) into its batch, with their
        own filters."""
        reqs = r.c.signals
        for i, ref, v in zip(part.cols, part.refs, values):
            if v is None:
                continue
            if ref.spec is not None:
                v = _shape(ref.spec, v)
            req = reqs[i]
            if req.min_interval_ms or req.deadband:
                lt, lv = r.last_in[i]
                if req.min_interval_ms and lt >= 0 and t_ms - lt < req.min_interval_ms:
                    continue
                if req.deadband and lt >= 0 and type(v) is not str and type(lv) is not str \
                        and lv is not None and abs(v - lv) <= req.deadband:
                    continue
                r.last_in[i] = (t_ms, v)
            r.builder.add(r.cols[i], t_ms, v)

    def _set_active(self, tap: Tap, active: list) -> None:
        """The campaigns capturing from this message after their trigger: while there are
        any, every frame the core appends to the ring also goes to them."""
        tap.active = active
        ring = tap.ring
        if not active:
            ring.__dict__.pop("append", None)
            return
        if "append" in ring.__dict__:
            return
        push = deque.append
        engine = self

        def append(item) -> None:
            push(ring, item)
            t, data = item
            t_ms = int(t * 1000)
            try:
                for r, part in tap.active:
                    if r.capture_until >= t_ms:
                        engine._capture(r, part, t_ms, part.decode(data))
            except Exception as e:  # noqa: BLE001 - a bug here must not cost the core the frame
                engine._failed(e)
        ring.append = append

    # -- conditions -----------------------------------------------------------------------

    def window(self, fn: str, name: str, n_ms: int) -> float:
        """avg/min/max(name, n_ms) at the engine's current time (for views and tests)."""
        agg = self.aggs.get((fn, name, n_ms))
        v = None if agg is None else agg.query(self._now)
        if v is None:
            raise E.Unknown(f"{name}: no sample in the last {n_ms} ms")
        return v

    def _evaluate(self, groups, now_ms: int) -> None:
        self._now = now_ms
        if len(groups) > 1:
            groups = dict.fromkeys(groups)  # each once, in order
        for g in groups:
            self.evaluations += 1
            g.wvals = None  # (a tick sets them again where it evaluates)
            ok = g.fn(now_ms)
            if not ok and not g.true:
                continue  # false before too: no member's state changes
            g.true = ok
            for r in g.members:
                fire = ok and (not r.prev or not r.c.rising_edge)
                r.prev = ok
                if not fire or r.capture_until >= now_ms:
                    continue  # (a firing during a capture of the same campaign is not new)
                if r.last_fire is not None and now_ms - r.last_fire < r.c.min_interval_ms:
                    continue
                self._fire(r, now_ms)

    def _fire(self, r: Running, now_ms: int) -> None:
        r.firings += 1
        r.last_fire = now_ms
        r.trigger_ms = now_ms
        lo = now_ms - r.c.pre_ms
        r.last_in = [(-1, None)] * len(r.c.signals)
        for part in r.parts:
            ring = part.tap.ring
            if not ring or not r.c.pre_ms:
                continue
            if int(ring[0][0] * 1000) > lo and len(ring) == ring.maxlen:
                r.overflow += 1  # frames came faster than the ring was sized for
            data = values = None
            for t, d in ring:
                t_ms = int(t * 1000)
                if lo <= t_ms <= now_ms:
                    if d != data:  # a repeated frame: the same values
                        data, values = d, part.decode(d)
                    self._capture(r, part, t_ms, values)
        self._close(r)  # the pre-trigger part goes out at once
        r.capture_until = now_ms + r.c.post_ms
        self._capturing[r.c.id] = r
        if r.c.post_ms:
            for part in r.parts:
                self._set_active(part.tap, part.tap.active + [(r, part)])

    def _close(self, r: Running) -> None:
        b = r.builder
        if b.close() is None:
            return
        for batch in b.take():
            r.batches += 1
            self.closed.append(CampaignBatch(batch.t0, batch.t_end, batch.sig, batch.samples,
                                             r.c.id, r.trigger_ms, r.c.priority, r.c.max_bytes))

    # -- time -------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[str]:
        """Start/expiry, time campaigns, capture ends, batch age, conditions that move with
        time. Returns the ids of campaigns that expired (and were removed)."""
        expired = self._sync(now_ms)
        self._now = now_ms
        for tap in self._windowed:  # rings hold a bounded stretch: windows take it now
            tap.catch_up()
        todo = [g for g in self.groups.values() if g.true]  # an input may have gone stale
        moved = []  # windows move with time: a false condition whose windows did not is not
        for g in self._ticked:  # evaluated again (its value inputs did not change either)
            if not g.true:
                values = [agg.query(now_ms) for agg in g.aggs]
                if values != g.wvals:
                    moved.append((g, values))
        if moved:
            todo += [g for g, _v in moved]
        if todo:
            self._evaluate(todo, now_ms)
            for g, values in moved:
                g.wvals = values
        for r in self._timed + list(self._capturing.values()):
            c = r.c
            if c.period_ms is not None and now_ms >= r.next_due:
                r.next_due = max(r.next_due + c.period_ms, now_ms - c.period_ms + 1)
                self._sample_latest(r, now_ms)
            if r.capture_until >= 0 and now_ms > r.capture_until:
                r.capture_until = -1
                del self._capturing[c.id]
                for part in r.parts:
                    self._set_active(part.tap, [x for x in part.tap.active if x[0] is not r])
                self._close(r)
                r.trigger_ms = None
            deadline = r.builder.deadline_ms
            if deadline is not None and now_ms >= deadline:
                self._close(r)
        return expired

    def _sample_latest(self, r: Running, now_ms: int) -> None:
        """A time campaign: the latest value of each signal (not stale) at `now_ms`."""
        for part in r.parts:
            tap = part.tap
            if not tap.ring or now_ms - tap.last_t > self.stale_ms:
                continue
            for i, ref, v in zip(part.cols, part.refs, part.decode(tap.last)):
                if v is not None:
                    r.builder.add(r.cols[i], now_ms, _shape(ref.spec, v) if ref.spec else v)

    def flush(self) -> None:
        for r in self.running.values():
            self._close(r)

    def take_batches(self) -> list[CampaignBatch]:
        out, self.closed = self.closed, []
        return out

    # -- views ----------------------------------------------------------------------------

    def held_bytes(self, cid: str) -> int:
        """Bytes in the rings and histories this campaign reads (rings are shared)."""
        r = self.running.get(cid)
        if r is None:
            return 0
        n = 0
        if r.c.condition is not None and r.c.pre_ms:
            n += sum(len(p.tap.ring) for p in r.parts)
        if r.c.tree is not None:
            n += sum(len(self.aggs[w]) for w in E.windows(r.c.tree) if w in self.aggs)
        return n * SAMPLE_BYTES

    def status(self, now_ms: int) -> list[dict]:
        out = []
        for c in sorted(self.applied.values(), key=lambda c: c.id):
            r = self.running.get(c.id)
            out.append({"id": c.id, "version": c.version, "state": c.state(now_ms),
                        "kind": "condition" if c.condition is not None else "time",
                        "priority": c.priority, "firings": r.firings if r else 0,
                        "batches": r.batches if r else 0, "held_bytes": self.held_bytes(c.id),
                        "ring_overflow": r.overflow if r else 0,
                        "capturing": bool(r and r.capture_until >= now_ms)})
        return out


def _codegen(tree: E.Node, sigs: Mapping[str, Sig], aggs: Mapping, stale_ms: int):
    """The condition as straight-line Python, fn(now_ms) -> bool, with the semantics of
    expr.compile_expr + holds (the tests check the two agree): every input is checked first
    (never seen, stale, null, or of the wrong kind for how it is used: false), then one
    expression; a type mismatch or a division by zero is false."""
    env: dict[str, Any] = {"_NUM": _NUM}
    pre: list[str] = []
    names: dict[str, str] = {}
    wins: dict[tuple, str] = {}
    checked: set[tuple[str, str]] = set()

    def value(name: str, ctx: str) -> str:
        var = names.get(name)
        if var is None:
            var = names[name] = f"v{len(names)}"
            env[f"S{var}"] = sigs[name]
            pre.append(f"    r = S{var}.tap.ring")  # its last frame: when last seen
            pre.append(f"    if not r or now - int(r[-1][0] * 1000) > {int(stale_ms)}: "
                       "return False")
            pre.append(f"    {var} = S{var}.value")
            pre.append(f"    if {var} is None: return False")
        if (name, ctx) not in checked:
            checked.add((name, ctx))
            if ctx == "num":
                pre.append(f"    if {var}.__class__ not in _NUM: return False")
            elif ctx == "bool":
                pre.append(f"    if {var} is not True and {var} is not False: return False")
        return var

    def window(node: E.Node) -> str:
        key = (node.op, node.args[0], node.args[1])
        var = wins.get(key)
        if var is None:
            var = wins[key] = f"w{len(wins)}"
            env[f"A{var}"] = aggs[key]
            pre.append(f"    {var} = A{var}.query(now)")
            pre.append(f"    if {var} is None: return False")
        return var

    def emit(n: E.Node, ctx: str) -> str:
        op, a = n.op, n.args
        if op in ("num", "str"):
            return repr(a[0])
        if op == "bool":
            return "True" if a[0] else "False"
        if op == "sig":
            return value(a[0], ctx)
        if op in E.WINDOWS:
            return window(n)
        if op == "neg":
            return f"(-{emit(a[0], 'num')})"
        if op == "abs":
            return f"abs({emit(a[0], 'num')})"
        if op == "not":
            return f"(not {emit(a[0], 'bool')})"
        if op in ("and", "or"):
            return f"({emit(a[0], 'bool')} {op} {emit(a[1], 'bool')})"
        if op in E.CMP:
            return f"({emit(a[0], 'cmp')} {op} {emit(a[1], 'cmp')})"
        return f"({emit(a[0], 'num')} {op} {emit(a[1], 'num')})"  # + - * /

    body = emit(tree, "bool")
    src = "\n".join(["def cond(now):", *pre, "    try:", f"        return {body} is True",
                     "    except (TypeError, ZeroDivisionError, OverflowError):",
                     "        return False"])
    exec(compile(src, "<condition>", "exec"), env)  # noqa: S102 - generated from our own tree
    return env["cond"]


def _changes(decode):
    """A change-detecting decoder (like fastdecode's) over a plain one: (values, changed)."""
    def fn(data, prev):
        values = decode(data)
        if prev is None:
            return values, list(enumerate(values))
        return values, [(i, v) for i, (v, p) in enumerate(zip(values, prev)) if v != p]
    return fn


def _shape(spec: SignalSpec, v):
    """A [telemetry] output name's value: its map or scale (no deadband or throttle)."""
    if spec.map is not None:
        out = spec.map.get(map_key(v))
        return v if out is None else out
    if (spec.scale != 1.0 or spec.offset != 0.0) and type(v) is not str:
        return v * spec.scale + spec.offset
    return v
