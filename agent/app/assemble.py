"""Wiring the configuration to the core: load the databases, resolve the selection,
compile the command actions."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..adapters.dbc import DecoderCache, load_database
from ..config import ActionConfig, Config, SamplingConfig, SignalConfig, TelemetryConfig
from ..core.selection import BusPlan, Sampling, Selection, SignalChoice, can_key, resolve
from ..core.telemetry import TelemetryCore
from ..errors import ConfigError, DbcError

if TYPE_CHECKING:  # the executor is imported only where there are [commands]
    from ..core.executor import ActionPlan

_PARAM = re.compile(r"^\{(\w+)\}$")


def bus_plans(config: Config, cache_dir: Path | None = None) -> list[BusPlan]:
    """Load every bus's databases and resolve the selection (plus the signals that command
    conditions read). Raises ConfigError/DbcError naming the file and key. `cache_dir`: keep
    parsed databases there (the agent's fast start)."""
    cache: dict[Path, object] = {}
    buses = []
    for i, bus in enumerate(config.bus):
        dbs = []
        for j, path in enumerate(bus.dbc):
            if path not in cache:
                try:
                    cache[path] = load_database(path, cache_dir)
                except DbcError as e:  # name the config file and key as well as the DBC
                    where = f"{config.path}: " if config.path else ""
                    raise DbcError(f"{where}bus.{i}.dbc.{j}: {e}") from None
            dbs.append(cache[path])
        buses.append((bus.name, dbs))
    try:
        watch = [(s, where) for where, c in _conditions(config) for s in c.signals]
        plans = Plans(resolve(selection(config.telemetry), buses, watch))
    except ConfigError as e:
        raise _in_file(config, e) from None
    if cache_dir is not None:
        plans.decoders = DecoderCache(cache_dir)
    return plans


class Plans(list):
    """bus_plans()' list of BusPlan, with the decoder cache that goes with its databases'
    cache (None without one) for the first telemetry_core() built from them."""

    decoders: DecoderCache | None = None


def selection(telemetry: TelemetryConfig) -> Selection:
    """[telemetry]'s selection keys as the core's Selection (same names, same meaning)."""
    return Selection(messages=tuple(telemetry.messages),
                     signals=tuple(_copy(SignalChoice, s) for s in telemetry.signal),
                     defaults=_copy(Sampling, telemetry.defaults))


def _copy(cls, source: SignalConfig | SamplingConfig):
    return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


def action_plans(config: Config, plans: list[BusPlan]) -> dict[str, ActionPlan]:
    """Compile [[commands.action]] into executor plans. Raises ConfigError."""
    if config.commands is None:
        return {}
    out = {}
    try:
        for i, action in enumerate(config.commands.action):
            where = f"commands.action.{i}"
            if action.name in out:
                raise ConfigError(f"{where}.name: {action.name!r} is configured twice")
            out[action.name] = _action(action, plans, config, where)
    except ConfigError as e:
        raise _in_file(config, e) from None
    return out


def _action(action: ActionConfig, plans: list[BusPlan], config: Config, where: str) -> ActionPlan:
    from ..core.conditions import Param, parse_condition
    from ..core.executor import ActionPlan, FramePlan

    def conds(items, key):
        return tuple(parse_condition(text, f"{where}.{key}.{j}") for j, text in enumerate(items))

    def compile_frames(items, key):
        frames = []
        for j, fc in enumerate(items):
            fwhere = f"{where}.{key}.{j}"
            bus, msg = _find_message(fc.message, fc.bus, plans, config, fwhere)
            names = {s.name for s in msg.signals}
            for name in [*fc.signals, *fc.defaults, fc.counter, fc.checksum]:
                if name and name not in names:
                    raise ConfigError(f"{fwhere}: message {msg.name} has no signal {name!r}")
            signals = {k: (Param(m.group(1)) if isinstance(v, str) and (m := _PARAM.match(v))
                           else v) for k, v in fc.signals.items()}
            frames.append(FramePlan(bus, can_key(msg.frame_id, msg.is_extended_frame), msg,
                                    signals, dict(fc.defaults), fc.repeat, fc.interval_ms,
                                    fc.counter, fc.checksum))
        return tuple(frames)

    frames = compile_frames(action.frame, "frame")
    wake = compile_frames(action.wake, "wake")
    return ActionPlan(action.name, action.actuator or action.name.split(".")[0],
                      conds(action.preconditions, "preconditions"), conds(action.already, "already"),
                      conds(action.confirm, "confirm"), action.timeout_ms, action.stale_ms,
                      frames, wake, action.wake_timeout_ms)


def _find_message(name: str, bus_name: str, plans: list[BusPlan], config: Config, where: str):
    for i, plan in enumerate(plans):
        if bus_name and plan.name != bus_name:
            continue
        for msg in plan.messages.values():
            if msg.name == name:
                return i, msg
    raise ConfigError(f"{where}.message: no message {name!r} in the databases of "
                      f"{bus_name or 'any bus'}")


def _condition(text: str, where: str):
    from ..core.conditions import parse_condition  # imported only where there are conditions

    return parse_condition(text, where)


def _conditions(config: Config):
    if config.updates is not None:
        for j, text in enumerate(config.updates.preconditions):
            where = f"updates.preconditions.{j}"
            yield where, _condition(text, where)
    if config.diagnostics is not None:
        for j, text in enumerate(config.diagnostics.clear_preconditions):
            where = f"diagnostics.clear_preconditions.{j}"
            yield where, _condition(text, where)
    if getattr(config, "rental", None) is not None:
        for j, text in enumerate(config.rental.end_conditions):
            where = f"rental.end_conditions.{j}"
            yield where, _condition(text, where)
    if config.commands is None:
        return
    for i, action in enumerate(config.commands.action):
        for key in ("preconditions", "already", "confirm"):
            for j, text in enumerate(getattr(action, key)):
                where = f"commands.action.{i}.{key}.{j}"
                yield where, _condition(text, where)


def _in_file(config: Config, e: ConfigError) -> ConfigError:
    if isinstance(e, DbcError) or config.path is None:
        return e
    return ConfigError(f"{config.path}: {e}")


def plans_for_dbc(paths: Sequence[str | Path], telemetry: TelemetryConfig | None = None) -> list[BusPlan]:
    """One bus with every signal of the given databases (for `replay --dbc`)."""
    telemetry = telemetry or TelemetryConfig(messages=("*",))
    return resolve(selection(telemetry), [("can0", [load_database(p) for p in paths])])


FRAME_SKEW_S = 1.0  # live: a frame may be stamped at most this far past the agent's clock


def telemetry_core(plans: list[BusPlan], telemetry: TelemetryConfig,
                   live: bool = False) -> TelemetryCore:
    """The core for these plans; `live` (the agent, not a replay) runs on the agent's clock."""
    decoders = getattr(plans, "decoders", None)
    core = TelemetryCore(plans, telemetry.max_batch_age_ms, telemetry.max_batch_bytes,
                         frame_skew_s=FRAME_SKEW_S if live else None, codes=decoders)
    if decoders is not None:  # it served this core: saved, and not kept in memory
        decoders.save()
        plans.decoders = None
    return core
