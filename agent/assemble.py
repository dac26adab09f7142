"""Wiring the configuration to the core: load the databases, resolve the selection."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .adapters.dbc import load_database
from .config import Config, TelemetryConfig
from .errors import ConfigError, DbcError
from .core.selection import BusPlan, resolve
from .core.telemetry import TelemetryCore


def bus_plans(config: Config) -> list[BusPlan]:
    """Load every bus's databases and resolve the selection. Raises ConfigError/DbcError."""
    cache: dict[Path, object] = {}
    buses = []
    for bus in config.bus:
        dbs = []
        for path in bus.dbc:
            if path not in cache:
                cache[path] = load_database(path)
            dbs.append(cache[path])
        buses.append((bus.name, dbs))
    try:
        return resolve(config.telemetry, buses)
    except ConfigError as e:
        if isinstance(e, DbcError) or config.path is None:
            raise
        raise ConfigError(f"{config.path}: {e}") from None


def plans_for_dbc(paths: Sequence[str | Path], telemetry: TelemetryConfig | None = None) -> list[BusPlan]:
    """One bus with every signal of the given databases (for `replay --dbc`)."""
    telemetry = telemetry or TelemetryConfig(messages=("*",))
    return resolve(telemetry, [("can0", [load_database(p) for p in paths])])


def telemetry_core(plans: list[BusPlan], telemetry: TelemetryConfig) -> TelemetryCore:
    return TelemetryCore(plans, telemetry.max_batch_age_ms, telemetry.max_batch_bytes)
