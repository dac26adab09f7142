"""The campaign engine (PROTOCOL.md §8): runs the applied campaigns on the frames the
telemetry core hands it. Sans-I/O.

The engine gets the frames through one tap per message (`taps()`): the core appends every
full frame to the message's ring (no Python call) and runs the tap's work only for a frame
whose input bits changed -- inlined in the message's sampler where [telemetry] decodes the
message anyway (`TapCode`), else in the tap's own generated function.

- every signal a running campaign's condition reads has one `Sig` (its latest value);
  each signal a window reads one `windows.WSig` (its values as runs);
- conditions run as generated straight-line Python (`campaigncode.codegen`, the semantics of
  expr.compile_condition);
- a condition is evaluated only when one of its inputs changes value, and a
  `signal OP constant` one only if it holds now or held before; on each tick, those
  currently true (an input may have gone stale) and the windowed ones whose windows
  moved -- unless the bounds of their windows' values rule them out (`windows.bounds`:
  then not until a bound widens or a value input changes);
- a condition campaign's signals come from the ring (`pre_ms` at arrival rate, shared by the
  campaigns reading it, decoded only on firing); on firing those samples go out at once
  and those of the next `post_ms` at the ticks, from the ring (which keeps them until
  then), all as batches tagged campaign/trigger;
- a time campaign takes the latest value of each signal every `period_ms`.
"""

from __future__ import annotations

from bisect import bisect_left
from operator import itemgetter
from typing import Any, Callable, Sequence

from cantools.database.namedsignalvalue import NamedSignalValue

from . import expr as E
from .batch import BatchBuilder, Column
from .campaigncode import TapCode, bits, changes, codegen, decoder, shape, simple
from .campaigns import (ACTIVE, EXPIRED, SAMPLE_BYTES, Campaign, CampaignBatch, Catalog,
                        Limits, Ref, buffer_bytes, capacity, ring_frames)
from .fastdecode import build, compile_message, plan, tests
from .selection import SignalSpec
from .windows import NUM, Agg, WSig, bounds, quick_bounds


class Sig:
    """One signal some running campaign's condition reads as a value."""

    __slots__ = ("name", "ref", "value", "conditions", "simple", "tap")

    def __init__(self, name: str, ref: Ref):
        self.name, self.ref = name, ref
        self.value: Any = None  # condition inputs: decoded when their bits change
        self.conditions: list[Group] = []  # evaluated when this signal changes
        # `signal OP constant` conditions, (group, op, constant, ordered, op symbol): evaluated
        # only when they hold now or held before (most changes of a signal flip none of them)
        self.simple: list[tuple[Group, Callable, Any, bool, str]] = []
        self.tap: Tap | None = None


_T = itemgetter(1)  # a ring's frames are the core's (bus, t, can id, data)


class Tap:
    """One tapped message: its ring of frames (the telemetry core appends every full frame,
    its own (bus, t seconds, can id, data) tuple; after a feed that leaves more than `limit`,
    the engine drops the oldest beyond `cap`), the change detector of its condition inputs
    and the runs of its window signals. Frames are numbered from the tap's first: ring[i] is
    frame `base + i`."""

    __slots__ = ("message", "ring", "base", "cap", "limit", "hold", "longest", "conds", "wsigs",
                 "fast", "mask", "prev", "inputs", "gaps")

    def __init__(self, message):
        self.message = message
        self.ring: list[tuple[int, float, int, bytes]] = []
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
        self.quick: Callable[[], bool] | None = None  # bounds of `window OP constant`


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
            self._admit(c)
        self._settle(now_ms)

    def load(self, campaigns: Sequence[Campaign], now_ms: int) -> list[tuple[Campaign, str]]:
        """Check each campaign against the applied ones and those taken before it, install
        those that pass with one rebuild (a start with hundreds stored), and return the
        others with the BAD_PARAMS detail of each."""
        refused = []
        for c in campaigns:
            why = self.check_apply(c)
            if why:
                refused.append((c, why))
            else:
                self._admit(c)
        self._settle(now_ms)
        return refused

    def _admit(self, c: Campaign) -> None:
        self._stop(c.id)
        self.applied[c.id] = c

    def _settle(self, now_ms: int) -> None:
        """After the applied set changed: start what is due, then the run-time state."""
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
                    tap.cap = max(tap.cap, capacity(c.pre_ms, refs[0], 0, self.limits))
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
            tap.cap = max(tap.cap, capacity(n, w.ref, 0, self.limits))
            tap.longest = max(tap.longest, n)
        for text, group in self.groups.items():
            tree = group.tree
            group.aggs = [self.aggs[k] for k in dict.fromkeys(E.windows(tree))]
            group.wsigs = list(dict.fromkeys(a.w for a in group.aggs))
            group.quick = quick_bounds(tree, self.aggs)
            for w in group.wsigs:
                w.groups.append(group)
            if text not in self._fns:
                self._fns[text] = codegen(tree, self.sigs, self.aggs, self.stale_ms)
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
            one = simple(g.tree)
            if one is not None:
                s = self.sigs[one[0]]
                s.conditions.remove(g)
                s.simple.append((g, *one[1:]))
        for tap in self.tapmap.values():
            tap.limit = ring_frames(tap.cap)
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
                    tap.fast = changes(self._decoder(tap.message, names))
                else:
                    tap.mask = bits(tap.message, names)
            if tap.wsigs:
                names = [w.ref.signal for w in tap.wsigs]
                if tap.ring:  # a new window signal starts at the newest frame
                    at = tap.base + len(tap.ring) - 1
                    values = self._decoder(tap.message, names)(tap.ring[-1][3])
                    for w, v in zip(tap.wsigs, values):
                        if not w.starts:
                            w.add(at, shape(w.ref.spec, v) if w.ref.spec and v is not None
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
            self._cache[key] = decoder(message, names)
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
        num = NUM
        evaluate, widened = self._evaluate, self._widened

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
                        v = shape(spec, v)
                    if w is not None and w.add(tap.base + len(ring) - 1, v):
                        widened(w)
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
                v = shape(ref.spec, v)
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
        todo = list(self._true)  # an input may have gone stale
        moved = []  # windows move with time: a false condition is evaluated again only if
        for g in list(self._watch):  # its bounds allow it to hold and its windows moved
            if g.true:
                del self._watch[g]
                continue
            if g.recheck:
                g.recheck = False
                self.bound_checks += 1
                if not (g.quick() if g.quick is not None else bounds(g.tree, self, now_ms)):
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
        for r in self._timed + list(self._capturing.values()):
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
                    r.builder.add(r.cols[i], now_ms, shape(ref.spec, v) if ref.spec else v)

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
