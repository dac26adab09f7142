"""Conditions on decoded vehicle signals: `Message.Signal OP literal`, parsed once at start.

Used for command preconditions, "already in that state" checks and confirmations. A signal
that was never seen or is stale fails every condition: a precondition is never assumed.

    ChargerStatus.ChargeState == "CHARGING"
    VCU_Drive.Speed <= 0.5
    BodyStatus.Locked == true
    OBC_Status.ChargeLimit == {percent}      ({param} is replaced by the command's parameter)
    BCM_Status.DriverDoorOpen == 0 | driver door open    (after " | ": the label a failure shows)
"""

from __future__ import annotations

import operator
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import ConfigError

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<=": operator.le, ">=": operator.ge,
    "<": operator.lt, ">": operator.gt,
}
_FORM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(==|!=|<=|>=|<|>)\s*(.+?)\s*$")
_PARAM = re.compile(r"^\{(\w+)\}$")

# lookup(signal) -> (value, observed_ms) or None when never seen
Lookup = Callable[[str], "tuple[Any, int] | None"]


@dataclass(frozen=True)
class Condition:
    text: str
    signal: str
    op: str
    literal: Any  # a number, str or bool; or a Param
    label: str = ""  # shown instead of the technical why-not when it fails

    def check(self, lookup: Lookup, now_ms: int, stale_ms: int,
              params: Mapping[str, Any] | None = None) -> tuple[bool, str]:
        """(holds, why-not). Never-seen and stale signals fail. With a label, why-not is
        "<label> (<technical why-not>)"."""
        ok, why = self._check(lookup, now_ms, stale_ms, params)
        return ok, (f"{self.label} ({why})" if self.label and not ok else why)

    def _check(self, lookup: Lookup, now_ms: int, stale_ms: int,
               params: Mapping[str, Any] | None) -> tuple[bool, str]:
        seen = lookup(self.signal)
        if seen is None:
            return False, f"{self.signal} never received"
        value, observed_ms = seen
        if now_ms - observed_ms > stale_ms:
            return False, f"{self.signal} stale ({(now_ms - observed_ms) / 1000:.1f} s old)"
        if value is None:
            return False, f"{self.signal} invalid (null)"
        want = self.literal
        if isinstance(want, Param):
            want = (params or {}).get(want.name)
        try:
            ok = OPS[self.op](value, want)
        except TypeError:  # "CHARGING" < 3: a mismatch, not a crash
            ok = False
        return ok, "" if ok else f"{self.signal} is {value!r}, needs {self.op} {want!r}"


@dataclass(frozen=True)
class Param:
    name: str


def parse_condition(text: str, where: str) -> Condition:
    """Parse one condition; ConfigError names `where` (the config key) on a bad one."""
    full, label = text, ""
    head, sep, tail = text.rpartition(" | ")
    if sep and '"' not in tail and "'" not in tail:
        text, label = head, tail.strip()
    m = _FORM.match(text)
    if not m:
        raise ConfigError(f"{where}: {text!r} is not `Message.Signal OP value` "
                          f"(OP one of {' '.join(OPS)})")
    signal, op, raw = m.groups()
    pm = _PARAM.match(raw)
    if pm:
        return Condition(full, signal, op, Param(pm.group(1)), label)
    try:
        literal = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{where}: {raw!r} is not a number, \"string\", true/false or "
                          "{param}") from None
    if isinstance(literal, (list, dict)):
        raise ConfigError(f"{where}: compare with a single value, not {raw!r}")
    return Condition(full, signal, op, literal, label)


def check_all(conditions, lookup: Lookup, now_ms: int, stale_ms: int,
              params: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    for c in conditions:
        ok, why = c.check(lookup, now_ms, stale_ms, params)
        if not ok:
            return False, why
    return True, ""
