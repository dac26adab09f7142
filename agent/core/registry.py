"""Which command names this vehicle knows, grouped by family. Sans-I/O.

A family (actions, state, update, ...) claims exact command names and checks their
parameters; the gate (core/commands.py) asks the registry at step 10 (UNKNOWN_COMMAND: the
name is in no family) and step 11 (BAD_PARAMS: the family's check_params raised ParamError).
Each family's executor is an app-layer Handler (agent/app/families.py).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.errors import ParamError


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # "actions", "state", "update", "diag", "campaign", ...
    commands: frozenset[str]  # exact command names this family answers
    check_params: Callable[[str, Mapping], None]  # raises agent.errors.ParamError(detail)


class Registry:
    """Immutable name -> family map. A name claimed by two families raises ValueError."""

    __slots__ = ("_by_name", "names", "families")

    def __init__(self, families: Iterable[Family]):
        by_name: dict[str, Family] = {}
        families_seen: list[Family] = []
        for family in families:
            if any(f.name == family.name for f in families_seen):
                raise ValueError(f"command family {family.name!r} is registered twice")
            families_seen.append(family)
            for name in family.commands:
                if name in by_name:
                    raise ValueError(f"command {name!r} is claimed by families "
                                     f"{by_name[name].name!r} and {family.name!r}")
                by_name[name] = family
        self._by_name = types.MappingProxyType(by_name)
        self.names: frozenset[str] = frozenset(by_name)
        self.families: tuple[Family, ...] = tuple(f for f in families_seen)

    def family_of(self, name: str) -> Family | None:
        return self._by_name.get(name)


def no_params(name: str, params: Mapping) -> None:
    """check_params for commands that take none."""
    if params:
        raise ParamError(f"{name} takes no parameter {show(sorted(params)[0])}")


def show(value: object, limit: int = 48) -> str:
    """repr() cut short: details echo untrusted values, keep responses small."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
