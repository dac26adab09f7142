"""Collection campaigns (PROTOCOL.md §8): the documents, their validation against this
vehicle's signals and limits, the `campaign` family of commands, and the batches they send.
Sans-I/O.

A campaign arrives as `campaign.apply`; `parse_campaign` (in the family's parameter check)
validates the whole document before anything changes, `CampaignEngine.check_apply` against
the applied set. The engine that runs them is `campaignengine.py`; the windows of their
conditions, `windows.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import cbor2

from ..errors import ParamError
from . import expr as E
from .batch import Batch
from .registry import Family, no_params, show
from .selection import BusPlan, SignalSpec

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


def capacity(ms: int, ref: Ref, min_interval_ms: int, limits: Limits) -> int:
    """Samples in `ms` at the faster of the DBC cycle time and `assumed_period_ms` (senders
    are often faster than their DBC says), or one per `min_interval_ms`."""
    period = min(ref.period_ms or limits.assumed_period_ms, limits.assumed_period_ms)
    return math.ceil(ms / max(period, min_interval_ms, 1)) + 1


def _slack(cap: int) -> int:
    """Frames a ring may hold beyond its capacity before it is trimmed back (trimming each
    ring after every feed would cost more than the frames' own decoding)."""
    return cap // 4 + 4


def ring_frames(cap: int) -> int:
    return cap + _slack(cap)


def buffer_bytes(c: Campaign, catalog: Catalog, limits: Limits) -> int:
    """Memory the campaign's rings and window runs may hold: a ring of frames per message
    it captures from (pre_ms at the rate of `capacity`, and its slack), and per window
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
            total += ring_frames(capacity(c.pre_ms, ref, 0, limits)) * SAMPLE_BYTES
    if c.tree is not None:
        for _fn, sig, n in E.windows(c.tree):
            ref = catalog.get(sig)
            total += 2 * ring_frames(capacity(n, ref, 0, limits)) * SAMPLE_BYTES
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
