"""Code the campaign engine generates and the decoders it builds: the tap's work as lines
for a decoder to inline (`TapCode`), conditions as straight-line Python (`codegen`), and
how a `signal OP constant` condition is recognised (`simple`). Sans-I/O.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from cantools.database.namedsignalvalue import NamedSignalValue

from . import expr as E
from .fastdecode import compile_message, plan
from .selection import SignalSpec
from .telemetry import map_key
from .windows import NUM


def decoder(message, names: list[str]) -> Callable[[bytes], list]:
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


def bits(message, names: list[str]) -> int:
    """The bits of these signals, as a mask on the frame read as a little-endian integer
    (fastdecode's per-signal masks: the message must be one it compiles)."""
    mask = 0
    for sig in plan(message, names, {}):
        mask |= sig.mask
    return mask


class TapCode:
    """What a tap does with a frame, as lines of Python for a generated decoder to inline:
    the telemetry core's sampler of the message, which decodes the frame anyway, or the
    tap's own function (`CampaignEngine._tap_code`). `signals[k]` is the DBC name of the
    tap's input k; `emit(k, sig, pad, env)` the lines for it once its raw value `r` is
    extracted (sig: the decoder's fastdecode.Signal for it, `t_ms` in scope); `tail` the
    lines that end the function's work (the conditions to evaluate); `env` what they
    read. The lines catch what they raise: a bug here must not cost the core the frame."""

    def __init__(self, engine, tap):
        self.tap = tap
        self.signals = [(s or w).ref.signal for _spec, s, w in tap.inputs]
        self.env: dict[str, Any] = {"_tT": tap, "_tR": tap.ring, "_tD": [], "_tNUM": NUM,
                                    "_tev": engine._evaluate, "_twid": engine._widened,
                                    "_tfail": engine._failed, "_tshape": shape}
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


_ORDERED = ("<", "<=", ">", ">=")


def simple(tree: E.Node) -> tuple[str, Callable, Any, bool, str] | None:
    """(signal, op(value, constant), constant, ordered, op) for `signal OP constant` (or
    `constant OP signal`): what the generated code computes once the value is fresh and,
    for an ordering, a number against a number; else None."""
    if tree.op not in E.CMP:
        return None
    a, b = tree.args
    op = tree.op
    if a.op != "sig":
        a, b, op = b, a, E.FLIP[op]
    if a.op != "sig" or b.op not in ("num", "str", "bool"):
        return None
    c = b.args[0]
    ordered = op in _ORDERED
    if ordered and c.__class__ not in NUM:
        return None
    return a.args[0], E.CMP[op], c, ordered, op


def codegen(tree: E.Node, sigs: Mapping, aggs: Mapping, stale_ms: int):
    """The condition as straight-line Python, fn(now_ms) -> bool, with the semantics of
    expr.compile_expr + holds (the tests check the two agree): every input is checked first
    (never seen, stale, null, or of the wrong kind for how it is used: false), then one
    expression; a type mismatch or a division by zero is false."""
    env: dict[str, Any] = {"NUM": NUM}
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
                pre.append(f"    if {var}.__class__ not in NUM: return False")
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


def changes(decode):
    """A change-detecting decoder (like fastdecode's) over a plain one: (values, changed)."""
    def fn(data, prev):
        values = decode(data)
        if prev is None:
            return values, list(enumerate(values))
        return values, [(i, v) for i, (v, p) in enumerate(zip(values, prev)) if v != p]
    return fn


def shape(spec: SignalSpec, v):
    """A [telemetry] output name's value: its map or scale (no deadband or throttle)."""
    if spec.map is not None:
        out = spec.map.get(map_key(v))
        return v if out is None else out
    if (spec.scale != 1.0 or spec.offset != 0.0) and type(v) is not str:
        return v * spec.scale + spec.offset
    return v
