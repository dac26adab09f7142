"""Collection campaigns (PROTOCOL.md §8): validation, start/expiry, and the engine. Sans-I/O.

A campaign arrives as `campaign.apply`; `check_campaign` validates the whole document
against this vehicle's signals and limits before anything changes. The engine runs the
active ones on frames the telemetry core hands it through one tap per message (`taps()`):
the core appends every full frame to the message's ring (no Python call) and runs the
tap's work only for a frame whose input bits changed -- inlined in the message's sampler
where [telemetry] decodes the message anyway (`TapCode`), else in the tap's own generated
function.

- every signal a running campaign's condition reads has one `Sig` (its latest value);
  each signal a window reads one `WSig`: its values as runs (the frame where each begins),
  recorded as its bits change; a window (`Agg`) reads the runs and the ring when queried,
  so a repeated value costs no Python step;
- conditions run as generated straight-line Python (`_codegen`, the semantics of
  expr.compile_condition);
- a condition is evaluated only when one of its inputs changes value, and a
  `signal OP constant` one only if it holds now or held before; on each tick, those
  currently true (an input may have gone stale) and the windowed ones whose windows
  moved -- unless the bounds of their windows' values rule them out (`_bounds`: then not
  until a bound widens or a value input changes);
- a condition campaign's signals come from the ring (`pre_ms` at arrival rate, shared by the
  campaigns reading it, decoded only on firing); on firing those samples go out at once
  and those of the next `post_ms` at the ticks, from the ring (which keeps them until
  then), all as batches tagged campaign/trigger;
- a time campaign takes the latest value of each signal every `period_ms`.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from operator import itemgetter, mul, sub
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import cbor2
from cantools.database.namedsignalvalue import NamedSignalValue

from ..errors import ParamError
from . import expr as E
from .batch import Batch, BatchBuilder, Column
from .fastdecode import build, compile_message, plan, tests
from .registry import Family, no_params, show
from .selection import BusPlan, SignalSpec
from .telemetry import map_key

APPLY, REMOVE, LIST = "campaign.apply", "campaign.remove", "campaign.list"
WAITING, ACTIVE, EXPIRED = "waiting", "active", "expired"
MAX_DOC_BYTES = 256 * 1024  # a campaign document, CBOR-encoded
SAMPLE_BYTES = 128  # what one buffered (t, frame) or (t, value) costs in memory, for the budget
DEFAULT_PRIORITY = 5  # a campaign without `priority`; base telemetry has the same
MIN_PERIOD_MS = 100  # the engine ticks every 100 ms
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
        for b, bp in enumerate(plans):
            for key, msg in bp.messages.items():
                for sig in msg.signals:
                    self.refs.setdefault(f"{msg.name}.{sig.name}", Ref(b, key, msg, sig.name, None))
        for b, bp in enumerate(plans):
            for key, mp in bp.selected.items():
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


def _slack(cap: int) -> int:
    """Frames a ring may hold beyond its capacity before it is trimmed back (trimming each
    ring after every feed would cost more than the frames' own decoding)."""
    return cap // 4 + 4


def _ring_frames(cap: int) -> int:
    return cap + _slack(cap)


def buffer_bytes(c: Campaign, catalog: Catalog, limits: Limits) -> int:
    """Memory the campaign's rings and window runs may hold: a ring of frames per message
    it captures from (pre_ms at the rate of `_capacity`, and its slack), and per window
    the ring of its message over N ms and the runs of its signal (at most one per frame;
    a run costs half a frame). Rings are trimmed after the feed that passes their slack,
    and shared: counted for each campaign."""
    total = 0
    if c.condition is not None and c.pre_ms:
        messages = {}
        for s in c.signals:
            ref = catalog.get(s.name)
            messages[(ref.bus, ref.key)] = ref
        for ref in messages.values():
            total += _ring_frames(_capacity(c.pre_ms, ref, 0, limits)) * SAMPLE_BYTES
    if c.tree is not None:
        for _fn, sig, n in E.windows(c.tree):
            ref = catalog.get(sig)
            total += 2 * _ring_frames(_capacity(n, ref, 0, limits)) * SAMPLE_BYTES
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
    """One signal some running campaign's condition reads as a value."""

    __slots__ = ("name", "ref", "value", "conditions", "simple", "tap")

    def __init__(self, name: str, ref: Ref):
        self.name, self.ref = name, ref
        self.value: Any = None  # condition inputs: decoded when their bits change
        self.conditions: list[Group] = []  # evaluated when this signal changes
        # `signal OP constant` conditions, (group, op, constant): evaluated only when they
        # hold now or held before (most changes of a signal flip none of them)
        self.simple: list[tuple[Group, Callable, Any, bool, str]] = []
        self.tap: Tap | None = None


_NUM = (int, float)
_T = itemgetter(1)  # a ring's frames are the core's (bus, t, can id, data)


class WSig:
    """One signal some window reads, as runs of one value over the frames of its message:
    `starts` the absolute index (see Tap) of the frame where each run begins, `values` its
    value, `counts` the length of each run but the last (frames, repeats included). A frame
    that repeats the value costs no Python step: the ring counts it. `lo`/`hi` bound every
    value a window of it can hold now or later (widened as runs arrive, narrowed from the
    runs inside the window at most once per window length), for `Group.bounds`."""

    __slots__ = ("name", "ref", "tap", "starts", "values", "bad", "lo", "hi", "narrowed",
                 "longest", "groups", "limit")

    def __init__(self, name: str, ref: Ref):
        self.name, self.ref = name, ref
        self.tap: Tap | None = None
        self.starts: list[int] = []
        self.values: list = []
        self.bad = 0  # runs held whose value is not a number (null, a name)
        self.lo, self.hi = math.inf, -math.inf
        self.narrowed = -1
        self.longest = 0  # ms: its longest window
        self.groups: list[Group] = []  # the windowed conditions that read it
        self.limit = 64  # runs kept before the ones older than the ring go

    def add(self, at: int, v) -> bool:
        """A run of `v` from the frame at index `at`; True if the bounds widened. (The
        generated tap, `CampaignEngine._tap_code`, inlines this: keep the two in step.)"""
        starts = self.starts
        if starts and v == self.values[-1] and v.__class__ is self.values[-1].__class__:
            return False
        starts.append(at)
        self.values.append(v)
        if len(starts) > self.limit:
            self.trim()
        if v.__class__ not in _NUM:
            self.bad += 1
            return False
        if v < self.lo or v > self.hi or v != v:
            self.widen(v)
            return True
        return False

    def widen(self, v) -> None:
        self.lo = min(self.lo, v) if v == v else -math.inf
        self.hi = max(self.hi, v) if v == v else math.inf

    def trim(self) -> None:
        """Drop the runs that ended before the ring's oldest frame."""
        base = self.tap.base
        k = bisect_right(self.starts, base) - 1
        if k > 0:
            if self.bad:
                self.bad -= sum(v.__class__ not in _NUM for v in self.values[:k])
            del self.starts[:k], self.values[:k]
        self.limit = max(64, 2 * len(self.starts))

    def span(self, now: int, n: int) -> tuple[int, int, int]:
        """(first, k, end): the index of the window's first frame, the run holding it and
        one past the newest frame; first == end if no frame is in the window."""
        tap = self.tap
        end = tap.base + len(tap.ring)
        starts = self.starts
        if not starts:
            return end, -1, end
        first = max(tap.first(now - n), starts[0])
        return first, bisect_right(starts, first) - 1, end

    def window(self, fn: str, now: int, n: int):
        """avg/min/max of the samples of the last `n` ms at `now`; None if there is none
        that is a number."""
        first, k, end = self.span(now, n)
        if first >= end:
            return None
        starts, values = self.starts, self.values
        last = len(starts) - 1
        if k == last:  # one run: exactly its value
            v = values[k]
            if v.__class__ not in _NUM:
                return None
            return float(v) if fn == "avg" else v
        if not self.bad:
            if fn == "min":
                return min(values[k:])
            if fn == "max":
                return max(values[k:])
            total = (values[k] * (starts[k + 1] - first)  # (run lengths: start to start)
                     + sum(map(mul, values[k + 1:last],
                               map(sub, starts[k + 2:last + 1], starts[k + 1:last])))
                     + values[last] * (end - starts[last]))
            return total / (end - first)
        total = count = 0  # some runs are not numbers: step through them
        best = None
        for q in range(k, last + 1):
            v = values[q]
            if v.__class__ not in _NUM:
                continue
            lo = first if q == k else starts[q]
            hi = starts[q + 1] if q < last else end
            if fn == "avg":
                total += v * (hi - lo)
                count += hi - lo
            elif best is None or (v < best if fn == "min" else v > best):
                best = v
        if fn != "avg":
            return best
        return total / count if count else None

    def narrow(self, now: int) -> None:
        """Bounds from the runs inside the longest window now (later windows start later)."""
        self.narrowed = now
        first, k, end = self.span(now, self.longest)
        nums = [v for v in self.values[max(k, 0):] if v.__class__ in _NUM]
        if first >= end or not nums:
            self.lo, self.hi = math.inf, -math.inf
        elif any(v != v for v in nums):
            self.lo, self.hi = -math.inf, math.inf
        else:
            self.lo, self.hi = min(nums), max(nums)

    def held(self) -> int:
        return len(self.starts)


class Agg:
    """avg/min/max(signal, n ms) of a condition: read from its WSig when queried."""

    __slots__ = ("fn", "name", "n", "w")

    def __init__(self, fn: str, name: str, n: int, w: WSig):
        self.fn, self.name, self.n, self.w = fn, name, n, w

    def query(self, now: int):
        """The aggregate at `now`, or None when no sample is in the window."""
        return self.w.window(self.fn, now, self.n)


class Tap:
    """One tapped message: its ring of frames (the telemetry core appends every full frame,
    its own (bus, t seconds, can id, data) tuple;
    the engine drops the oldest at ticks beyond `cap`), the change detector of its
    condition inputs and the runs of its window signals. Frames are numbered from the
    tap's first: ring[i] is frame `base + i`."""

    __slots__ = ("message", "ring", "base", "cap", "limit", "hold", "longest", "conds", "wsigs",
                 "fast", "mask", "prev", "inputs", "gaps")

    def __init__(self, message):
        self.message = message
        self.ring: list[tuple[float, bytes]] = []
        self.base = 0
        self.cap = 1  # at least the last frame
        self.limit = 1  # trimmed back to `cap` after a feed that leaves more than this
        self.hold: int | None = None  # the oldest frame a capture has yet to take
        self.longest = 0  # ms: the longest window over its signals
        self.gaps = 0  # trims that dropped frames a window still covered
        self.reset()

    def reset(self) -> None:
        self.conds: list[Sig] = []
        self.wsigs: list[WSig] = []
        # one decoder for both, over `inputs`: (spec, Sig or None, WSig or None) per signal
        self.fast = None
        self.inputs: list[tuple[SignalSpec | None, Sig | None, WSig | None]] = []
        self.mask: int | None = None  # their bits (compiled messages; None: any change)
        self.prev = None  # the last frame it decoded (an int, or values: see _changes)

    @property
    def last(self) -> bytes | None:
        return self.ring[-1][3] if self.ring else None

    @property
    def last_t(self) -> int:
        """ms of the last full frame, -1 if none arrived."""
        return int(self.ring[-1][1] * 1000) if self.ring else -1

    def first(self, lo_ms: int) -> int:
        """The index of the first frame at or after `lo_ms` (frames arrive in time order)."""
        ring = self.ring
        i = bisect_left(ring, lo_ms / 1000, key=_T)
        n = len(ring)
        while i < n and int(ring[i][1] * 1000) < lo_ms:
            i += 1
        while i > 0 and int(ring[i - 1][1] * 1000) >= lo_ms:
            i -= 1
        return self.base + i

    def trim(self) -> None:
        """Keep the newest `cap` frames, and those from `hold` on."""
        ring = self.ring
        k = len(ring) - self.cap
        if self.hold is not None:
            k = min(k, self.hold - self.base)
        if k <= 0:
            return
        if self.longest and int(ring[k - 1][1] * 1000) >= int(ring[-1][1] * 1000) - \
                self.longest:
            self.gaps += 1  # frames faster than sized for: a window loses its oldest
        del ring[:k]
        self.base += k


class Part:
    """The signals one campaign captures from one message; `pos` is the next frame the
    capture after a trigger takes."""

    __slots__ = ("tap", "cols", "decode", "refs", "pos")

    def __init__(self, tap: Tap, cols: list[int], decode, refs: list[Ref]):
        self.tap, self.cols, self.decode, self.refs = tap, cols, decode, refs
        self.pos = 0


class Group:
    """The running campaigns with one condition text: evaluated once for all of them."""

    __slots__ = ("fn", "members", "windowed", "true", "aggs", "wvals", "tree", "recheck",
                 "wsigs", "quick")

    def __init__(self, fn, windowed: bool, tree: E.Node):
        self.fn, self.windowed, self.tree = fn, windowed, tree
        self.members: list[Running] = []
        self.true = False  # the last evaluation
        self.aggs: list[Agg] = []  # its windows
        self.wsigs: list[WSig] = []  # ... and their signals
        self.wvals: list | None = None  # their values when a tick last evaluated it
        self.recheck = True  # an input moved since `bounds` last ruled it out
        self.quick: Callable[[], bool] | None = None  # _bounds of `window OP constant`


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


class TapCode:
    """What a tap does with a frame, as lines of Python for a generated decoder to inline:
    the telemetry core's sampler of the message, which decodes the frame anyway, or the
    tap's own function (`CampaignEngine._tap_code`). `signals[k]` is the DBC name of the
    tap's input k; `emit(k, sig, pad, env)` the lines for it once its raw value `r` is
    extracted (sig: the decoder's fastdecode.Signal for it, `t_ms` in scope); `tail` the
    lines that end the function's work (the conditions to evaluate); `env` what they
    read. The lines catch what they raise: a bug here must not cost the core the frame."""

    def __init__(self, engine: CampaignEngine, tap: Tap):
        self.tap = tap
        self.signals = [(s or w).ref.signal for _spec, s, w in tap.inputs]
        self.env: dict[str, Any] = {"_tT": tap, "_tR": tap.ring, "_tD": [], "_tNUM": _NUM,
                                    "_tev": engine._evaluate, "_twid": engine._widened,
                                    "_tfail": engine._failed, "_tshape": _shape}
        self.tail = ["    if _tD:  # the conditions to evaluate",
                     "        try:",
                     "            tdirty = _tD[:]",
                     "            _tD.clear()",
                     "            _tev(tdirty, t_ms)",
                     "        except Exception as e:",
                     "            _tfail(e)"]
        self._k = 0

    def emit(self, k: int, sig, pad: str, env: dict[str, Any]) -> list[str]:
        spec, s, w = self.tap.inputs[k]
        q = f"{pad}    "
        if sig.choices is None:
            out = [f"{q}tv = {sig.value}"]
        else:
            out = [f"{q}tc = {sig.choices}.get(r)",
                   f"{q}tv = tc.name if tc is not None else {sig.value}"]
        if spec is not None:
            env[f"_tP{k}"] = spec
            out.append(f"{q}tv = _tshape(_tP{k}, tv)")
        anything = sig.choices is not None or spec is not None  # (else a number, one type)
        if w is not None:
            env[f"_tW{k}"] = w  # WSig.add, inlined
            new = "not tx or tv != tx[-1]" + \
                (" or tv.__class__ is not tx[-1].__class__" if anything else "")
            out += [f"{q}tw = _tW{k}",
                    f"{q}tx = tw.values",
                    f"{q}if {new}:",
                    f"{q}    ty = tw.starts",
                    f"{q}    ty.append(_tT.base + len(_tR) - 1)",
                    f"{q}    tx.append(tv)",
                    f"{q}    if len(ty) > tw.limit:",
                    f"{q}        tw.trim()"]
            test = "tv < tw.lo or tv > tw.hi or tv != tv"
            if anything:
                out += [f"{q}    if tv.__class__ not in _tNUM:",
                        f"{q}        tw.bad += 1",
                        f"{q}    elif {test}:"]
            else:
                out.append(f"{q}    if {test}:")
            out += [f"{q}        tw.widen(tv)",
                    f"{q}        _twid(tw)"]
        if s is not None:
            env[f"_tS{k}"] = s
            changed = "tv != ts.value" + \
                (" or type(tv) is not type(ts.value)" if anything else "")
            out += [f"{q}ts = _tS{k}",
                    f"{q}if {changed}:",
                    f"{q}    ts.value = tv"]
            if s.conditions:
                env[f"_tL{k}"] = s.conditions
                out.append(f"{q}    _tD.extend(_tL{k})")
            for g, _op, c, ordered, sym in s.simple:
                n = self._k
                self._k += 1
                env[f"_tG{n}"], env[f"_tC{n}"] = g, c
                test = f"tv {sym} _tC{n}"
                if ordered and anything:
                    test = f"tv.__class__ not in _tNUM or {test}"
                out += [f"{q}    if _tG{n}.true or {test}:",
                        f"{q}        _tD.append(_tG{n})"]
        return [f"{pad}try:", *out, f"{pad}except Exception as e:", f"{pad}    _tfail(e)"]


class CampaignEngine:
    """Runs the active campaigns. Feed it through `taps()` (installed on the telemetry core),
    call `tick(now_ms)` often (every 100 ms: captures after a trigger are taken then) and
    `trim()` after each feed (the core does, see set_taps), and take `take_batches()`."""

    def __init__(self, catalog: Catalog, limits: Limits = Limits(), stale_ms: int = 5000,
                 batch_age_ms: int = 1000, batch_bytes: int = 65536):
        self.catalog, self.limits, self.stale_ms = catalog, limits, stale_ms
        self.batch_age_ms, self.batch_bytes = batch_age_ms, batch_bytes
        self.applied: dict[str, Campaign] = {}
        self.running: dict[str, Running] = {}
        self.sigs: dict[str, Sig] = {}
        self.wsigs: dict[str, WSig] = {}
        self.aggs: dict[tuple[str, str, int], Agg] = {}
        self.tapmap: dict[tuple[int, int], Tap] = {}
        self.closed: list[CampaignBatch] = []
        self.changed = True  # the set of tapped messages may differ: re-install taps
        self.evaluations = 0
        self.bound_checks = 0  # windowed conditions ruled out (or not) by their bounds
        self.errors = 0  # taps that raised (bugs), counted
        self.last_error = ""
        self._now = 0
        # (dicts as ordered sets: evaluation order, and so batch order, is reproducible)
        self._true: dict[Group, None] = {}  # re-evaluated each tick: an input may go stale
        self._watch: dict[Group, None] = {}  # windowed, false, not ruled out by bounds
        self._next_change = -1  # ms of the next start or expiry among the applied
        self.groups: dict[str, Group] = {}  # condition text -> its running campaigns
        self._fns: dict[str, Any] = {}  # condition text -> generated code
        self._timed: list[Running] = []  # time campaigns
        self._capturing: dict[str, Running] = {}  # condition campaigns after a trigger
        self._held = False  # a ring may hold frames for a capture (Tap.hold)
        self._rings: list[tuple[list, int, Tap]] = []  # (ring, limit, tap) to trim
        self._cache: dict = {}  # compiled decoders (the catalog's messages live as long)

    @property
    def window_gaps(self) -> int:
        """Ring trims that dropped frames a window still covered (frames far faster than
        the ring was sized for)."""
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
        self.apply_many([c], now_ms)

    def apply_many(self, campaigns: Sequence[Campaign], now_ms: int) -> None:
        """Install (or replace) checked campaigns, the run-time state built once."""
        for c in campaigns:
            self._stop(c.id)
            self.applied[c.id] = c
        self._next_change = -1
        self._sync(now_ms)
        self._rebuild()

    def load(self, campaigns: Sequence[Campaign], now_ms: int) -> list[tuple[Campaign, str]]:
        """Check each campaign against the applied ones and those taken before it, install
        those that pass with one rebuild (a start with hundreds stored), and return the
        others with the BAD_PARAMS detail of each."""
        refused = []
        for c in campaigns:
            why = self.check_apply(c)
            if why:
                refused.append((c, why))
                continue
            self._stop(c.id)
            self.applied[c.id] = c
        self._next_change = -1
        self._sync(now_ms)
        self._rebuild()
        return refused

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
            if self._capturing.pop(cid, None) is not None:
                self._take(r)  # the frames since the last tick
            self._close(r)

    def _rebuild(self) -> None:
        """Signals, taps, rings, window runs and the condition index for the running set;
        what stays keeps its values, runs and ring contents."""
        for r in self._capturing.values():  # their parts are made again: take what is due
            self._take(r)
        old_taps = self.tapmap
        self.tapmap = {}
        self.groups = {}
        self._true, self._watch = {}, {}
        self._timed = [r for r in self.running.values() if r.c.period_ms is not None]
        used: set[str] = set()
        used_w: set[str] = set()
        used_aggs: set[tuple[str, str, int]] = set()
        for sg in self.sigs.values():
            sg.conditions = []

        def tap_of(ref: Ref) -> Tap:
            key = (ref.bus, ref.key)
            tap = self.tapmap.get(key)
            if tap is None:
                tap = old_taps.get(key) or Tap(ref.message)  # its ring is kept
                tap.reset()
                tap.cap, tap.longest = 1, 0
                self.tapmap[key] = tap
            return tap

        def sig(name: str) -> Sig:
            used.add(name)
            s = self.sigs.get(name)
            if s is None:
                s = self.sigs[name] = Sig(name, self.catalog.get(name))
            s.tap = tap_of(s.ref)
            return s

        for r in self.running.values():
            c = r.c
            by_msg: dict[tuple[int, int], list[int]] = {}
            for i, req in enumerate(c.signals):
                ref = self.catalog.get(req.name)
                tap_of(ref)
                by_msg.setdefault((ref.bus, ref.key), []).append(i)
            r.parts = []
            for key, cols in by_msg.items():
                tap = self.tapmap[key]
                refs = [self.catalog.get(c.signals[i].name) for i in cols]
                part = Part(tap, cols, self._decoder(tap.message, [x.signal for x in refs]),
                            refs)
                part.pos = tap.base + len(tap.ring)
                r.parts.append(part)
                if c.condition is not None and c.pre_ms:
                    tap.cap = max(tap.cap, _capacity(c.pre_ms, refs[0], 0, self.limits))
            if c.tree is None:
                continue
            group = self.groups.get(c.condition)
            if group is None:
                group = self.groups[c.condition] = Group(None, r.windowed, c.tree)
                for name in E.value_signals(c.tree):
                    sig(name).conditions.append(group)
            group.members.append(r)
            group.true = group.true or r.prev
            for fn, name, n in E.windows(c.tree):
                used_aggs.add((fn, name, n))
                used_w.add(name)
                w = self.wsigs.get(name)
                if w is None:
                    w = self.wsigs[name] = WSig(name, self.catalog.get(name))
                if (fn, name, n) not in self.aggs:
                    self.aggs[(fn, name, n)] = Agg(fn, name, n, w)
        gone = [n for n in self.sigs if n not in used]
        gone_aggs = [k for k in self.aggs if k not in used_aggs]
        for name in gone:
            del self.sigs[name]
        for key in gone_aggs:
            del self.aggs[key]
        for name in [n for n in self.wsigs if n not in used_w]:
            del self.wsigs[name]
        if gone or gone_aggs:
            self._fns = {}  # generated code holds those objects: build it again
        for w in self.wsigs.values():
            w.groups, w.longest = [], 0
        for (fn, name, n), agg in self.aggs.items():
            w = agg.w
            w.longest = max(w.longest, n)
            tap = w.tap = tap_of(w.ref)
            if w not in tap.wsigs:
                tap.wsigs.append(w)
            tap.cap = max(tap.cap, _capacity(n, w.ref, 0, self.limits))
            tap.longest = max(tap.longest, n)
        for text, group in self.groups.items():
            tree = group.tree
            group.aggs = [self.aggs[k] for k in dict.fromkeys(E.windows(tree))]
            group.wsigs = list(dict.fromkeys(a.w for a in group.aggs))
            group.quick = _quick_bounds(tree, self.aggs)
            for w in group.wsigs:
                w.groups.append(group)
            if text not in self._fns:
                self._fns[text] = _codegen(tree, self.sigs, self.aggs, self.stale_ms)
            group.fn = self._fns[text]
            if group.true:
                self._true[group] = None
            elif group.windowed:
                self._watch[group] = None  # (recheck is set: the first tick looks at it)
        for s in self.sigs.values():
            s.simple = []
            if s.conditions:
                s.tap.conds.append(s)
        for g in self.groups.values():
            simple = _simple(g.tree)
            if simple is not None:
                s = self.sigs[simple[0]]
                s.conditions.remove(g)
                s.simple.append((g, *simple[1:]))
        for tap in self.tapmap.values():
            tap.limit = _ring_frames(tap.cap)
            inputs: dict[str, list] = {}
            for s in tap.conds:
                inputs[s.name] = [s.ref, s, None]
            for w in tap.wsigs:
                inputs.setdefault(w.name, [w.ref, None, None])[2] = w
            tap.inputs = [(ref.spec, s, w) for ref, s, w in inputs.values()]
            if inputs:
                names = [ref.signal for ref, _s, _w in inputs.values()]
                tap.fast = self._compiled(tap.message, names)
                if tap.fast is None:  # multiplexed / float: decode and compare
                    tap.fast = _changes(self._decoder(tap.message, names))
                else:
                    tap.mask = _bits(tap.message, names)
            if tap.wsigs:
                names = [w.ref.signal for w in tap.wsigs]
                if tap.ring:  # a new window signal starts at the newest frame
                    at = tap.base + len(tap.ring) - 1
                    values = self._decoder(tap.message, names)(tap.ring[-1][3])
                    for w, v in zip(tap.wsigs, values):
                        if not w.starts:
                            w.add(at, _shape(w.ref.spec, v) if w.ref.spec and v is not None
                                  else v)
        for key, tap in old_taps.items():
            if key not in self.tapmap:
                tap.ring.clear()  # not tapped any more (the core lets go of it)
        self._rings = [(tap.ring, tap.limit, tap) for tap in self.tapmap.values()]
        self._held = True  # (the parts are new: the holds are taken again)
        self._hold()
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

    def taps(self) -> dict[tuple[int, int], tuple]:
        """(bus, can key) -> (ring, on_change, mask, code) for every message a running
        campaign reads, as TelemetryCore.set_taps takes them: the core appends every full
        frame to `ring`, and has on_change or `code` (a TapCode, None when the message is
        not compiled) see a frame whose bits under `mask` differ from the frame before
        (mask None: any bit; on_change None: no condition or window reads the message)."""
        self.changed = False
        out = {}
        for k, tap in self.tapmap.items():
            fn = mask = None
            code = None
            if tap.inputs:
                fn, mask = self._tap_fn(tap), tap.mask
                if mask is not None:
                    fn, code = self._tap_code(tap, fn)
            out[k] = (tap.ring, fn, mask, code)
        return out

    def _tap_fn(self, tap: Tap) -> Callable[[float, bytes], None]:
        """For a frame whose condition or window bits changed (the core tests the mask):
        the signals decoded where their bits changed; for a window signal whose value
        changed, a new run (WSig.add, inlined); for a condition input, the conditions that
        read it evaluated (a `signal OP constant` one only if it holds or held)."""
        length = tap.message.length
        fast, inputs, ring = tap.fast, tap.inputs, tap.ring
        wsigs = tap.wsigs
        named = NamedSignalValue
        watch = self._watch
        num = _NUM
        evaluate = self._evaluate

        def fn(t: float, data: bytes, _le=None, _dl=None) -> None:
            try:
                if len(data) != length:  # longer than its DBC length: no values from it
                    at = tap.base + len(ring) - 1
                    for w in wsigs:
                        w.add(at, None)
                    tap.prev = None
                    return
                tap.prev, changed = fast(data, tap.prev)
                dirty = None
                for i, v in changed:
                    spec, s, w = inputs[i]
                    if type(v) is named:
                        v = v.name
                    if spec is not None:
                        v = _shape(spec, v)
                    if w is not None:
                        last = w.values[-1] if w.values else _NEVER
                        if v != last or v.__class__ is not last.__class__:
                            if w.add(tap.base + len(ring) - 1, v):
                                for g in w.groups:  # bounds widened: look at the next tick
                                    g.recheck = True
                                    if not g.true:
                                        watch[g] = None
                    if s is None or (v == s.value and type(v) is type(s.value)):
                        continue
                    s.value = v
                    if dirty is None:
                        dirty = []
                    if s.conditions:
                        dirty.extend(s.conditions)
                    if s.simple:
                        isnum = v.__class__ in num
                        for g, op, c, ordered, _sym in s.simple:
                            if g.true or not isnum and ordered or op(v, c):
                                dirty.append(g)
                if dirty:
                    evaluate(dirty, int(t * 1000))
            except Exception as e:  # noqa: BLE001 - a bug here must not cost the core the frame
                self._failed(e)
        return fn

    def _tap_code(self, tap: Tap, slow: Callable[[float, bytes], None]):
        """`_tap_fn` as straight-line Python for a compiled message (`slow` takes frames of
        another length): per input signal `if its bits changed:` its value, a new run for a
        window signal, and for a condition input whose value changed its conditions, each
        `signal OP constant` one tested inline. The same results as `_tap_fn`. Returns the
        function and the `TapCode` the core's sampler inlines (or None)."""
        code = TapCode(self, tap)
        env = dict(code.env)
        env["_slow"], env["_from"] = slow, int.from_bytes
        sigs = plan(tap.message, code.signals, env)
        if sigs is None:
            return slow, None
        # From the core: le and dl (the bits that differ from the frame before; those under
        # the mask are the ones that differ from the last frame this tap saw, as the frames
        # between were not handed over). Without them (the frame before unknown): every
        # signal decoded.
        lines = ["def tap(t, data, le=None, dl=-1):",
                 "    if le is None:",
                 f"        if len(data) != {tap.message.length}:",
                 "            _slow(t, data)",
                 "            return",
                 "        le = _from(data, 'little')",
                 "    be = None",
                 "    t_ms = int(t * 1000.0)"]
        lines += tests(sigs, lambda sig, pad: code.emit(sig.index, sig, pad, env))
        lines += code.tail
        return build(lines, "tap", f"<tap {tap.message.name}>", env), code

    def _widened(self, w: WSig) -> None:
        """A window signal's bounds widened: its conditions are looked at again at the next
        tick."""
        for g in w.groups:
            if g.true or g.quick is not None and not g.quick():
                continue  # (true: evaluated at every tick anyway)
            g.recheck = True
            self._watch[g] = None

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

    def _take(self, r: Running) -> None:
        """The frames that arrived since the last take, up to the end of the capture, into
        the campaign's batch (a capture after its trigger reads the ring at ticks)."""
        until = r.capture_until
        for part in r.parts:
            tap = part.tap
            ring = tap.ring
            i = part.pos - tap.base
            part.pos = tap.base + len(ring)
            if i >= len(ring):
                continue
            data = values = None
            for _b, t, _i, d in ring[max(i, 0):]:
                t_ms = int(t * 1000)
                if t_ms > until:
                    break
                if d != data:  # a repeated frame: the same values
                    data, values = d, part.decode(d)
                self._capture(r, part, t_ms, values)

    # -- conditions -----------------------------------------------------------------------

    def window(self, fn: str, name: str, n_ms: int) -> float:
        """avg/min/max(name, n_ms) at the engine's current time (for views and tests)."""
        agg = self.aggs.get((fn, name, n_ms))
        v = None if agg is None else agg.query(self._now)
        if v is None:
            raise E.Unknown(f"{name}: no sample in the last {n_ms} ms")
        return v

    def _evaluate(self, groups, now_ms: int, changed: bool = True) -> None:
        """`changed`: a value input of these conditions changed (not a tick)."""
        self._now = now_ms
        if len(groups) > 1:
            groups = dict.fromkeys(groups)  # each once, in order
        for g in groups:
            self.evaluations += 1
            g.wvals = None  # (a tick sets them again where it evaluates)
            ok = g.fn(now_ms)
            if g.windowed and not ok and (changed or g.true):
                g.recheck = True  # its inputs moved: its bounds may allow it now
                self._watch[g] = None
            if not ok and not g.true:
                continue  # false before too: no member's state changes
            g.true = ok
            if ok:
                self._true[g] = None
            else:
                self._true.pop(g, None)
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
            tap = part.tap
            ring = tap.ring
            part.pos = tap.base + len(ring)  # after the trigger: taken at the ticks
            tap.hold = part.pos if tap.hold is None else min(tap.hold, part.pos)
            self._held = True
            if not ring or not r.c.pre_ms:
                continue
            if int(ring[0][1] * 1000) > lo and tap.base and len(ring) >= tap.cap:
                r.overflow += 1  # frames came faster than the ring was sized for
            data = values = None
            for _b, t, _i, d in ring[tap.first(lo) - tap.base:]:
                t_ms = int(t * 1000)
                if lo <= t_ms <= now_ms:  # (frames out of time order: only those inside)
                    if d != data:  # a repeated frame: the same values
                        data, values = d, part.decode(d)
                    self._capture(r, part, t_ms, values)
        self._close(r)  # the pre-trigger part goes out at once
        r.capture_until = now_ms + r.c.post_ms
        self._capturing[r.c.id] = r

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
        """Start/expiry, time campaigns, captures and their ends, batch age, ring trims,
        conditions that move with time. Returns the ids of campaigns that expired (and
        were removed)."""
        expired = self._sync(now_ms)
        self._now = now_ms
        todo = list(self._true) if self._true else []  # an input may have gone stale
        moved = []  # windows move with time: a false condition is evaluated again only if
        for g in list(self._watch):  # its bounds allow it to hold and its windows moved
            if g.true:
                del self._watch[g]
                continue
            if g.recheck:
                g.recheck = False
                self.bound_checks += 1
                if not (g.quick() if g.quick is not None else _bounds(g.tree, self, now_ms)):
                    del self._watch[g]  # not before an input or a bound moves
                    continue
            values = [agg.query(now_ms) for agg in g.aggs]
            if values != g.wvals:
                moved.append((g, values))
        if moved:
            todo += [g for g, _v in moved]
        if todo:
            self._evaluate(todo, now_ms, changed=False)
            for g, values in moved:
                g.wvals = values
                if not g.true:  # still false: the bounds may be wider than the windows
                    for w in g.wsigs:
                        if now_ms - w.narrowed >= w.longest:
                            w.narrow(now_ms)
                            g.recheck = True
        for r in self._timed + list(self._capturing.values()) if self._timed or \
                self._capturing else ():
            c = r.c
            if c.period_ms is not None and now_ms >= r.next_due:
                r.next_due = max(r.next_due + c.period_ms, now_ms - c.period_ms + 1)
                self._sample_latest(r, now_ms)
            if r.capture_until >= 0:
                self._take(r)
                if now_ms > r.capture_until:
                    r.capture_until = -1
                    del self._capturing[c.id]
                    self._close(r)
                    r.trigger_ms = None
            deadline = r.builder.deadline_ms
            if deadline is not None and now_ms >= deadline:
                self._close(r)
        self._hold()
        return expired

    def trim(self) -> None:
        """Rings back to their capacity (keeping what captures have yet to take): the
        telemetry core calls this after each feed."""
        for ring, limit, tap in self._rings:
            if len(ring) > limit:
                tap.trim()

    def _hold(self) -> None:
        """Each ring keeps the frames from the oldest a capture has yet to take."""
        if not self._held and not self._capturing:
            return
        for tap in self.tapmap.values():
            tap.hold = None
        for r in self._capturing.values():
            for part in r.parts:
                tap = part.tap
                tap.hold = part.pos if tap.hold is None else min(tap.hold, part.pos)
        self._held = bool(self._capturing)

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
            if r.capture_until >= 0:
                self._take(r)
            self._close(r)

    def take_batches(self) -> list[CampaignBatch]:
        out, self.closed = self.closed, []
        return out

    # -- views ----------------------------------------------------------------------------

    def held_bytes(self, cid: str) -> int:
        """Bytes in the rings and window runs this campaign reads (both are shared)."""
        r = self.running.get(cid)
        if r is None:
            return 0
        taps = {}
        if r.c.condition is not None and r.c.pre_ms:
            taps = {id(p.tap): p.tap for p in r.parts}
        n = 0
        if r.c.tree is not None:
            for w in dict.fromkeys(self.aggs[k].w for k in E.windows(r.c.tree)
                                   if k in self.aggs):
                taps[id(w.tap)] = w.tap
                n += w.held()
        n += sum(len(tap.ring) for tap in taps.values())
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



_NEVER = object()  # no run yet
_ORDERED = ("<", "<=", ">", ">=")
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def _simple(tree: E.Node) -> tuple[str, Callable, Any, bool, str] | None:
    """(signal, op(value, constant), constant, ordered, op) for `signal OP constant` (or
    `constant OP signal`): what the generated code computes once the value is fresh and,
    for an ordering, a number against a number; else None."""
    if tree.op not in E.CMP:
        return None
    a, b = tree.args
    op = tree.op
    if a.op != "sig":
        a, b, op = b, a, _FLIP[op]
    if a.op != "sig" or b.op not in ("num", "str", "bool"):
        return None
    c = b.args[0]
    ordered = op in _ORDERED
    if ordered and c.__class__ not in _NUM:
        return None
    return a.args[0], E.CMP[op], c, ordered, op


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
            pre.append(f"    if not r or now - int(r[-1][1] * 1000) > {int(stale_ms)}: "
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


class _Never(Exception):
    """The condition is false until one of its inputs changes value or a bound widens."""


class _Maybe(Exception):
    """The bounds cannot rule the condition out."""


def _bounds(tree: E.Node, engine: CampaignEngine, now: int) -> bool:
    """False if `tree` cannot hold whatever its windows hold within their signals' bounds
    (WSig.lo/hi), its value inputs as they are: then it stays false until a value input
    changes or a bound widens, and ticks need not evaluate it. True: it might."""
    try:
        kind, *v = _iv(tree, engine, now)
    except _Never:
        return False
    except _Maybe:
        return True
    return kind == "b" and v[0] is not False


def _iv(n: E.Node, engine: CampaignEngine, now: int) -> tuple:
    """("n", lo, hi) a number within [lo, hi]; ("x", v) exactly v (not a number);
    ("b", True/False/None) a truth value, None: either."""
    op, a = n.op, n.args
    if op == "num":
        return ("n", a[0], a[0])
    if op == "str":
        return ("x", a[0])
    if op == "bool":
        return ("b", a[0])
    if op == "sig":
        s = engine.sigs[a[0]]
        if s.value is None:
            raise _Never  # never seen (or null): false whatever else holds
        if now - s.tap.last_t > engine.stale_ms or not s.tap.ring:
            raise _Maybe  # stale: it may be fresh again without a change
        v = s.value
        if v.__class__ in _NUM:
            return ("n", v, v)
        return ("b", v) if v is True or v is False else ("x", v)
    if op in E.WINDOWS:
        w = engine.aggs[(op, a[0], a[1])].w
        if w.lo > w.hi:
            raise _Never  # no number since the bounds were taken: only a new run changes it
        return ("n", w.lo, w.hi)
    if op in ("not", "and", "or"):
        xs = [_iv(x, engine, now) for x in a]
        if any(x[0] != "b" for x in xs):
            raise _Maybe
        t = [x[1] for x in xs]
        if op == "not":
            return ("b", None if t[0] is None else not t[0])
        if op == "and":
            return ("b", False if False in t else (True if t == [True, True] else None))
        return ("b", True if True in t else (False if t == [False, False] else None))
    xs = [_iv(x, engine, now) for x in a]
    if op in E.CMP:
        return _cmp(op, *xs)
    if any(x[0] != "n" for x in xs):
        raise _Never  # arithmetic on a name or a truth value: a type error, false
    if op == "neg":
        return ("n", -xs[0][2], -xs[0][1])
    if op == "abs":
        lo, hi = xs[0][1], xs[0][2]
        if lo >= 0:
            return ("n", lo, hi)
        if hi <= 0:
            return ("n", -hi, -lo)
        return ("n", 0, max(-lo, hi))
    (_, alo, ahi), (_, blo, bhi) = xs
    if op == "+":
        out = (alo + blo, ahi + bhi)
    elif op == "-":
        out = (alo - bhi, ahi - blo)
    else:
        if op == "/":
            if blo <= 0 <= bhi:
                raise _Maybe  # (a division by zero is false; near zero, anything)
            blo, bhi = 1 / bhi, 1 / blo
        ps = (alo * blo, alo * bhi, ahi * blo, ahi * bhi)
        out = (min(ps), max(ps))
    if out[0] != out[0] or out[1] != out[1]:
        raise _Maybe  # inf - inf
    return ("n", *out)


def _quick_bounds(tree: E.Node, aggs: Mapping) -> Callable[[], bool] | None:
    """`_bounds` of `window OP number` (or `number OP window`) as a closure: what most
    windowed conditions are, looked at whenever a bound of theirs widens."""
    if tree.op not in E.CMP:
        return None
    a, b = tree.args
    op = tree.op
    if a.op not in E.WINDOWS:
        a, b, op = b, a, _FLIP[op]
    if a.op not in E.WINDOWS or b.op != "num":
        return None
    w, c = aggs[(a.op, a.args[0], a.args[1])].w, b.args[0]
    return {">": lambda: w.lo <= w.hi and w.hi > c,
            ">=": lambda: w.lo <= w.hi and w.hi >= c,
            "<": lambda: w.lo <= w.hi and w.lo < c,
            "<=": lambda: w.lo <= w.hi and w.lo <= c,
            "==": lambda: w.lo <= c <= w.hi,
            "!=": lambda: w.lo <= w.hi and not w.lo == w.hi == c}[op]


def _cmp(op: str, x: tuple, y: tuple) -> tuple:
    if x[0] == "n" and y[0] == "n" and (x[1] != x[2] or y[1] != y[2]):
        (_, alo, ahi), (_, blo, bhi) = x, y
        if op in (">", ">="):
            (alo, ahi), (blo, bhi), op = (blo, bhi), (alo, ahi), "<" if op == ">" else "<="
        if op == "<":
            return ("b", True if ahi < blo else (False if alo >= bhi else None))
        if op == "<=":
            return ("b", True if ahi <= blo else (False if alo > bhi else None))
        disjoint = ahi < blo or bhi < alo
        if op == "==":
            return ("b", False if disjoint else None)
        return ("b", True if disjoint else None)
    if "b" in (x[0], y[0]) and (None in (x[1],) + (y[1],) or "n" in (x[0], y[0])):
        raise _Maybe  # a truth value that is either, or against a range of numbers
    u = x[1]
    w = y[1]
    if x[0] == "n" and y[0] == "b" or y[0] == "n" and x[0] == "b":
        raise _Maybe
    try:  # exact values, or a number (any in its range: the same result) against a name
        return ("b", bool(_OPS[op](u, w)))
    except TypeError:
        return ("b", False)


_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


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
