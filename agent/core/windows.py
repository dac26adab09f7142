"""The windows of campaign conditions (`avg/min/max(signal, N ms)`, PROTOCOL.md §8) and the
bounds that let the engine skip conditions they rule out. Sans-I/O.

A signal some window reads keeps its values as runs (`WSig`): the frame where each value
begins, recorded by the engine's tap as the signal's bits change; a window (`Agg`) is read
from the runs and the frame times in its message's ring when it is queried, so a frame
that repeats a value costs no Python step. `bounds` decides by interval arithmetic whether a
condition can hold at all while its windows' values stay within their signals' bounds.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from operator import mul, sub
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import expr as E

if TYPE_CHECKING:
    from .campaigns import Ref
# (the engine, its taps and groups are campaignengine's, which imports this module: here they
# are what they are used as, not imported)

NUM = (int, float)


class WSig:
    """One signal some window reads, as runs of one value over the frames of its message:
    `starts` the absolute index (see Tap) of the frame where each run begins, `values` its
    value (a run's length, repeats included, is from its start to the next one's). A frame
    that repeats the value costs no Python step: the ring counts it. `lo`/`hi` bound every
    value a window of it can hold now or later (widened as runs arrive, narrowed from the
    runs inside the window at most once per window length), for `bounds`."""

    __slots__ = ("name", "ref", "tap", "starts", "values", "bad", "lo", "hi", "narrowed",
                 "longest", "groups", "limit")

    def __init__(self, name: str, ref: Ref):
        self.name, self.ref = name, ref
        self.tap: Any = None  # the Tap of its message (campaignengine)
        self.starts: list[int] = []
        self.values: list = []
        self.bad = 0  # runs held whose value is not a number (null, a name)
        self.lo, self.hi = math.inf, -math.inf
        self.narrowed = -1
        self.longest = 0  # ms: its longest window
        self.groups: list = []  # the windowed conditions (Groups) that read it
        self.limit = 64  # runs kept before the ones older than the ring go

    def add(self, at: int, v) -> bool:
        """A run of `v` from the frame at index `at`; True if the bounds widened. (The
        generated tap code, `campaigncode.TapCode.emit`, inlines this: keep the two in step.)"""
        starts = self.starts
        if starts and v == self.values[-1] and v.__class__ is self.values[-1].__class__:
            return False
        starts.append(at)
        self.values.append(v)
        if len(starts) > self.limit:
            self.trim()
        if v.__class__ not in NUM:
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
                self.bad -= sum(v.__class__ not in NUM for v in self.values[:k])
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
            if v.__class__ not in NUM:
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
            if v.__class__ not in NUM:
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
        nums = [v for v in self.values[max(k, 0):] if v.__class__ in NUM]
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


class _Never(Exception):
    """The condition is false until one of its inputs changes value or a bound widens."""


class _Maybe(Exception):
    """The bounds cannot rule the condition out."""


def bounds(tree: E.Node, engine: Any, now: int) -> bool:
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


def _iv(n: E.Node, engine: Any, now: int) -> tuple:
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
        if v.__class__ in NUM:
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


def quick_bounds(tree: E.Node, aggs: Mapping) -> Callable[[], bool] | None:
    """`bounds` of `window OP number` (or `number OP window`) as a closure: what most
    windowed conditions are, looked at whenever a bound of theirs widens."""
    if tree.op not in E.CMP:
        return None
    a, b = tree.args
    op = tree.op
    if a.op not in E.WINDOWS:
        a, b, op = b, a, E.FLIP[op]
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
    try:  # exact values, or a number (any in its range: the same result) against a name
        return ("b", bool(E.CMP[op](x[1], y[1])))
    except TypeError:
        return ("b", False)
