"""Resolve the configured signal selection against loaded CAN databases.

Pure: takes cantools Database objects and a Selection (app/assemble.py builds it from the
[telemetry] config), returns plain specs or raises ConfigError naming the config key. Output
name default: "Message.Signal".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

EFF_FLAG = 0x80000000  # SocketCAN's marker for 29-bit ids; keeps 0x100 and 0x100x apart
AUTO = "auto"  # timeout_ms: 5 x the DBC cycle time, at least 500 ms


# -- what to select (the core's own copy of [telemetry]'s selection keys) ---------------------

@dataclass(frozen=True, slots=True)
class Sampling:
    """Per-signal sampling policy."""

    deadband: float = 0.0  # a number must move more than this to be sent
    min_interval_ms: int = 0  # at most one sample per interval (latest wins)
    heartbeat_s: float = 60.0  # re-send an unchanged value this often; 0 = off
    timeout_ms: int | str = AUTO  # null after this silence; 0 = never


@dataclass(frozen=True, slots=True)
class SignalChoice:
    """One selected signal; None sampling fields take the Selection's defaults."""

    select: str  # "Message.Signal", or a signal name unique across the bus's databases
    name: str = ""  # output name; default "Message.Signal"
    bus: str = ""  # restrict to one bus
    scale: float = 1.0
    offset: float = 0.0
    map: Mapping[str, Any] = field(default_factory=dict)
    state: bool = False
    deadband: float | None = None
    min_interval_ms: int | None = None
    heartbeat_s: float | None = None
    timeout_ms: int | str | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    messages: tuple[str, ...] = ()  # names or ids, "*" for all, "bus:Message" picks the bus
    signals: tuple[SignalChoice, ...] = ()
    defaults: Sampling = Sampling()


def can_key(frame_id: int, extended: bool) -> int:
    return frame_id | EFF_FLAG if extended else frame_id


@dataclass(frozen=True)
class SignalSpec:
    message: str
    signal: str
    out: str
    scale: float
    offset: float
    map: Mapping[str, Any] | None
    deadband: float
    min_interval_ms: int
    heartbeat_ms: int
    timeout_ms: int  # 0 = never null
    state: bool
    multiplexed: bool
    emit: bool = True  # False: watched only (command conditions), never sent as telemetry


@dataclass(frozen=True)
class MessagePlan:
    key: int  # can_key()
    message: Any  # cantools Message
    signals: tuple[SignalSpec, ...]


@dataclass(frozen=True)
class BusPlan:
    name: str
    messages: Mapping[int, Any]  # key -> cantools Message, every message of the bus's DBCs
    selected: Mapping[int, MessagePlan]


def resolve(selection: Selection, buses: Sequence[tuple[str, Sequence[Any]]],
            watch: Sequence[tuple[str, str]] = ()) -> list[BusPlan]:
    """Map the selection onto the buses. `buses` is [(bus name, [cantools Database, ...]), ...].

    `watch` is [(signal reference, config key), ...]: signals whose values the agent needs
    (command conditions) though they may not be telemetry; they are decoded, not sent.
    """
    catalogs = [(name, _catalog(dbs)) for name, dbs in buses]
    chosen: list[dict[int, dict[str, SignalSpec]]] = [{} for _ in catalogs]

    # A message reference picks the message on the first bus that has it ("bus:Message" picks
    # the bus); "*" (or "bus:*") is every message, each on the first bus that has its name.
    bus_names = [name for name, _ in catalogs]
    for i, ref in enumerate(selection.messages):
        where = f"telemetry.messages.{i}"
        bus_name, colon, ref = ref.rpartition(":") if ":" in ref else ("", "", ref)
        if colon and bus_name not in bus_names:
            raise ConfigError(f"{where}: no bus named {bus_name!r}")
        taken: set[str] = set()
        for b, (name, (messages, by_name, _)) in enumerate(catalogs):
            if bus_name and name != bus_name:
                continue
            for msg in _match_messages(ref, messages, by_name):
                if msg.name in taken:
                    continue
                taken.add(msg.name)
                for sig in msg.signals:
                    _add(chosen[b], msg, sig, SignalChoice(select=f"{msg.name}.{sig.name}"),
                         selection.defaults, where)
        if not taken:
            raise ConfigError(f"{where}: no message {ref!r} in the databases of "
                              f"{bus_name or 'any bus'}")

    for i, sc in enumerate(selection.signals):
        where = f"telemetry.signal.{i}"
        b, msg, sig = _find_signal(sc, catalogs, where)
        _add(chosen[b], msg, sig, sc, selection.defaults, where)

    for ref, where in watch:
        if _find_output(ref, chosen):
            continue
        b, msg, sig = _find_signal(SignalChoice(select=ref), catalogs, where)
        spec = _spec(msg, sig, SignalChoice(select=ref), selection.defaults, where)
        chosen[b].setdefault(can_key(msg.frame_id, msg.is_extended_frame), {}).setdefault(
            sig.name, _replace(spec, emit=False))

    plans = []
    for (name, (messages, _, _)), picked in zip(catalogs, chosen):
        selected = {key: MessagePlan(key, messages[key], tuple(specs.values()))
                    for key, specs in picked.items()}
        plans.append(BusPlan(name, messages, selected))
    _check_unique_outputs(plans)
    return plans


def _catalog(dbs):
    messages, by_name, sig_index = {}, {}, {}
    for db in dbs:
        for msg in db.messages:
            key = can_key(msg.frame_id, msg.is_extended_frame)
            messages.setdefault(key, msg)
            by_name.setdefault(msg.name, msg)
            for sig in msg.signals:
                sig_index.setdefault(sig.name, []).append(msg)
    return messages, by_name, sig_index


def _match_messages(ref: str, messages, by_name):
    if ref == "*":
        return list(messages.values())
    if ref in by_name:
        return [by_name[ref]]
    try:
        frame_id = int(ref, 0)
    except ValueError:
        return []
    return [m for m in messages.values() if m.frame_id == frame_id]


def _find_signal(sc: SignalChoice, catalogs, where: str):
    bus_names = [name for name, _ in catalogs]
    if sc.bus and sc.bus not in bus_names:
        raise ConfigError(f"{where}.bus: no bus named {sc.bus!r}")
    candidates = []
    for b, (name, (_, by_name, sig_index)) in enumerate(catalogs):
        if sc.bus and name != sc.bus:
            continue
        msg_name, dot, sig_name = sc.select.rpartition(".")
        if dot:
            msg = by_name.get(msg_name)
            if msg is not None:
                sig = next((s for s in msg.signals if s.name == sig_name), None)
                if sig is not None:
                    candidates.append((b, msg, sig))
        else:
            for msg in sig_index.get(sc.select, []):
                candidates.append((b, msg, next(s for s in msg.signals if s.name == sc.select)))
    if not candidates:
        raise ConfigError(f"{where}.select: no signal {sc.select!r} in the databases of "
                          f"{sc.bus or 'any bus'}")
    if "." not in sc.select and len({(b, m.name) for b, m, _ in candidates}) > 1:
        options = ", ".join(sorted({f"{m.name}.{s.name}" for _, m, s in candidates})[:4])
        raise ConfigError(f"{where}.select: signal name {sc.select!r} is ambiguous; "
                          f"write Message.Signal ({options})")
    return candidates[0]


def _find_output(ref: str, chosen) -> bool:
    """Is `ref` (an output name or Message.Signal) already selected as telemetry?"""
    for picked in chosen:
        for specs in picked.values():
            for spec in specs.values():
                if ref in (spec.out, f"{spec.message}.{spec.signal}"):
                    return True
    return False


def _add(picked, msg, sig, sc: SignalChoice, defaults: Sampling, where: str) -> None:
    spec = _spec(msg, sig, sc, defaults, where)
    # An explicit [[telemetry.signal]] entry overrides the same signal picked by `messages`.
    picked.setdefault(can_key(msg.frame_id, msg.is_extended_frame), {})[sig.name] = spec


def _spec(msg, sig, sc: SignalChoice, defaults: Sampling, where: str) -> SignalSpec:
    timeout = sc.timeout_ms if sc.timeout_ms is not None else defaults.timeout_ms
    if timeout == AUTO:
        timeout = max(5 * msg.cycle_time, 500) if msg.cycle_time else 0
    elif isinstance(timeout, str):
        raise ConfigError(f"{where}.timeout_ms: must be a number of ms, 0 (off) or \"auto\"")
    heartbeat_s = sc.heartbeat_s if sc.heartbeat_s is not None else defaults.heartbeat_s
    return SignalSpec(
        message=msg.name, signal=sig.name, out=sc.name or f"{msg.name}.{sig.name}",
        scale=sc.scale, offset=sc.offset, map=dict(sc.map) or None,
        deadband=sc.deadband if sc.deadband is not None else defaults.deadband,
        min_interval_ms=sc.min_interval_ms if sc.min_interval_ms is not None else defaults.min_interval_ms,
        heartbeat_ms=int(heartbeat_s * 1000), timeout_ms=int(timeout), state=sc.state,
        multiplexed=sig.multiplexer_ids is not None,
    )


def _check_unique_outputs(plans) -> None:
    seen = {}
    for plan in plans:
        for mp in plan.selected.values():
            for spec in mp.signals:
                if not spec.emit:
                    continue
                where = f"{plan.name}:{spec.message}.{spec.signal}"
                if spec.out in seen and seen[spec.out] != where:
                    raise ConfigError(f"telemetry: output name {spec.out!r} is used twice "
                                      f"({seen[spec.out]} and {where}); give one a `name`")
                seen[spec.out] = where
