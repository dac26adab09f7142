"""Conditions on decoded vehicle signals, parsed once at start.

Used for command preconditions, "already in that state" checks and confirmations. The
language is the one of campaign conditions (expr.py, PROTOCOL.md §8) without the time
windows; the usual form is `Message.Signal OP literal`. A signal that was never seen or is
stale fails the condition: a precondition is never assumed.

    ChargerStatus.ChargeState == "CHARGING"
    VCU_Drive.Speed <= 0.5
    BodyStatus.Locked == true
    OBC_Status.ChargeLimit == {percent}      ({param} is replaced by the command's parameter)
    VCU_Drive.Speed < 1 and (VCU_Status.Gear == "P" or VCU_Status.Gear == "N")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from . import expr as E

OPS = E.CMP

# lookup(signal) -> (value, observed_ms) or None when never seen
Lookup = Callable[[str], "tuple[Any, int] | None"]


@dataclass(frozen=True)
class Param:
    name: str


class _Env:
    """Values for one check: the first unknown input is remembered for the why-not."""

    __slots__ = ("lookup", "now_ms", "stale_ms", "params", "why")

    def __init__(self, lookup: Lookup, now_ms: int, stale_ms: int, params):
        self.lookup, self.now_ms, self.stale_ms, self.params = lookup, now_ms, stale_ms, params
        self.why = ""

    def value(self, name: str):
        seen = self.lookup(name)
        if seen is None:
            self._unknown(f"{name} never received")
        value, observed_ms = seen
        if self.now_ms - observed_ms > self.stale_ms:
            self._unknown(f"{name} stale ({(self.now_ms - observed_ms) / 1000:.1f} s old)")
        if value is None:
            self._unknown(f"{name} invalid (null)")
        return value

    def _unknown(self, why: str):
        if not self.why:
            self.why = why
        raise E.Unknown(why)

    def window(self, fn, name, n_ms):  # refused at parse time; never reached
        self._unknown(f"{fn}({name}) has no history here")

    def param(self, name: str):
        return (self.params or {}).get(name)


@dataclass(frozen=True)
class Condition:
    text: str
    tree: E.Node = field(repr=False, compare=False)
    fn: E.Compiled = field(repr=False, compare=False)

    @property
    def signals(self) -> list[str]:
        return E.signals(self.tree)

    @property
    def signal(self) -> str:
        """The first signal read (the only one in the usual `Signal OP literal` form)."""
        names = self.signals
        return names[0] if names else ""

    @property
    def op(self) -> str:
        return self.tree.op

    @property
    def literal(self) -> Any:
        """For `Signal OP literal`: the literal (or a Param); else None."""
        simple = self._simple()
        if simple is None:
            return None
        leaf = simple[2]
        return Param(leaf.args[0]) if leaf.op == "param" else leaf.args[0]

    def _simple(self):
        t = self.tree
        if t.op in E.CMP and t.args[0].op == "sig" and t.args[1].op in (
                "num", "str", "bool", "param"):
            return t.args[0].args[0], t.op, t.args[1]
        return None

    def check(self, lookup: Lookup, now_ms: int, stale_ms: int,
              params: Mapping[str, Any] | None = None) -> tuple[bool, str]:
        """(holds, why-not). Never-seen and stale signals fail."""
        env = _Env(lookup, now_ms, stale_ms, params)
        try:
            ok = self.fn(env) is True
        except E.Unknown as e:
            return False, env.why or str(e)
        if ok:
            return True, ""
        simple = self._simple()
        if simple is not None:
            name, op, leaf = simple
            want = env.param(leaf.args[0]) if leaf.op == "param" else leaf.args[0]
            return False, f"{name} is {env.value(name)!r}, needs {op} {want!r}"
        return False, f"`{self.text}` is false"


def parse_condition(text: str, where: str) -> Condition:
    """Parse one condition; ConfigError names `where` (the config key) on a bad one."""
    try:
        tree = E.parse(text, allow_windows=False, allow_params=True)
    except E.ExprError as e:
        raise ConfigError(f"{where}: {text!r} is not a condition like `Message.Signal OP value` "
                          f"(OP one of {' '.join(OPS)}): {e}") from None
    return Condition(text, tree, E.compile_condition(tree))


def check_all(conditions, lookup: Lookup, now_ms: int, stale_ms: int,
              params: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    for c in conditions:
        ok, why = c.check(lookup, now_ms, stale_ms, params)
        if not ok:
            return False, why
    return True, ""
