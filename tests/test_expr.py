"""The condition language (core/expr.py): every operator, precedence, errors with their
positions, round trips, and evaluation against plain Python."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import expr as E


class Env:
    def __init__(self, values=None, history=None, now=0):
        self.values = values or {}
        self.history = history or {}
        self.now = now

    def value(self, name):
        if name not in self.values or self.values[name] is None:
            raise E.Unknown(name)
        return self.values[name]

    def window(self, fn, name, n):
        vals = [v for t, v in self.history.get(name, []) if self.now - n <= t <= self.now]
        if not vals:
            raise E.Unknown(name)
        return {"avg": lambda x: sum(x) / len(x), "min": min, "max": max}[fn](vals)

    def param(self, name):
        return {"p": 7}.get(name)


def ev(text, **values):
    return E.holds(E.compile_expr(E.parse(text, allow_params=True)), Env(values))


@pytest.mark.parametrize("text, expected", [
    ("a == 1", True), ("a != 1", False), ("a < 2", True), ("a <= 1", True), ("a > 1", False),
    ("a >= 1", True), ("a + 1 == 2", True), ("a - 3 == -2", True), ("a * 4 == 4", True),
    ("a / 4 == 0.25", True), ("abs(a - 3) == 2", True), ("not a == 2", True),
    ("a == 1 and b == 2", True), ("a == 1 and b == 3", False), ("a == 2 or b == 2", True),
    ("a == 2 or b == 3", False), ("(a == 1)", True), ("true", True), ("false", False),
    ("s == \"CHARGING\"", True), ("s == 'CHARGING'", True), ("s != \"IDLE\"", True),
    ("flag", True), ("flag == true", True), ("not flag", False), ("a == {p} - 6", True),
    ("a == 0x1", True), ("a == 1_0 - 9", True), ("a == +1", True), ("a == 1e0", True),
    ("-a == -1", True), ("- -a == 1", True),
])
def test_every_operator(text, expected):
    assert ev(text, a=1, b=2, s="CHARGING", flag=True) is expected


@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3 == 7", True),  # * before +
    ("(1 + 2) * 3 == 9", True),
    ("10 - 4 - 3 == 3", True),  # left associative
    ("12 / 3 / 2 == 2", True),
    ("true or true and false", True),  # and before or
    ("(true or true) and false", False),
    ("not false and false", False),  # not binds tighter than and
    ("not (false and false)", True),
    ("a + 1 > 1 and a < 2", True),  # arithmetic, then comparison, then and
    ("-a * 2 == -2", True),
])
def test_precedence(text, expected):
    assert ev(text, a=1) is expected


@pytest.mark.parametrize("text, pos, fragment", [
    ("a ==", 5, "unexpected end"),
    ("a == 1 and", 11, "unexpected end"),
    ("a === 1", 5, "unexpected character '='"),
    ("(a == 1", 8, "expected ')'"),
    ("a == 1)", 7, "unexpected ')'"),
    ("a == 1 b", 8, "unexpected 'b'"),
    ("a == \"x", 6, "unterminated string"),
    ("a == 1 ? 2", 8, "unexpected character '?'"),
    ("a < b < c", 7, "do not chain"),
    ("a + (b == 1) > 0", 3, "arithmetic needs numbers"),
    ("a == 1 and 5", 8, "need conditions"),
    ("foo(a) > 1", 1, "unknown function 'foo'"),
    ("avg(a) > 1", 6, "expected ','"),
    ("avg(a, 0) > 1", 8, "integer > 0"),
    ("avg(1, 10) > 1", 5, "signal name first"),
    ("abs > 1", 1, "needs arguments"),
    ("a + 1", 1, "must compare"),
    ("12ab == 1", 1, "bad number"),
    ("", 1, "empty"),
])
def test_errors_carry_positions(text, pos, fragment):
    with pytest.raises(E.ExprError) as e:
        E.parse(text)
    assert e.value.pos == pos, str(e.value)
    assert fragment in str(e.value)
    assert str(e.value).endswith(f"at position {pos}")


def test_limits_length_and_depth():
    long = "a == 1" + " or a == 1" * 110
    assert len(long) > E.MAX_CHARS
    with pytest.raises(E.ExprError, match="longer than 1024"):
        E.parse(long)
    ok = "a" + " + a" * 9 + " > 1"  # 9 additions + the comparison: depth 10
    assert E.depth(E.parse(ok)) == 10
    with pytest.raises(E.ExprError, match="11 levels deep, more than 10"):
        E.parse("a" + " + a" * 10 + " > 1")
    with pytest.raises(E.ExprError, match="nested more than"):
        E.parse("(" * 40 + "a > 1" + ")" * 40)
    # parentheses alone add no depth
    assert E.depth(E.parse("((((a > 1))))")) == 1


def test_unknown_inputs_make_it_false():
    assert ev("a == 1") is False  # never seen
    assert ev("a == 1", a=None) is False  # null
    assert ev("a == 1 or b == 2", b=2) is False  # one unknown input: the whole is false
    assert ev("not a == 1") is False
    assert ev("a / b > 1", a=1, b=0) is False  # division by zero
    assert ev("s < 3", s="CHARGING") is False  # a type mismatch
    assert ev("s + 1 > 3", s="x") is False


def test_windows_and_params_are_refused_where_not_allowed():
    with pytest.raises(E.ExprError, match="campaign conditions only"):
        E.parse("avg(a, 100) > 1", allow_windows=False)
    with pytest.raises(E.ExprError, match="command conditions only"):
        E.parse("a == {p}")


def test_signals_and_windows_are_listed():
    tree = E.parse("M.A > 1 and avg(M.B, 500) < M.A + max(M.C, 20)")
    assert E.signals(tree) == ["M.A", "M.B", "M.C"]
    assert E.windows(tree) == [("avg", "M.B", 500), ("max", "M.C", 20)]


# -- round trips ----------------------------------------------------------------------------

names = st.sampled_from(["a", "M.S", "Vehicle.Speed", "B_1.x2"])
numbers = st.one_of(st.integers(0, 10 ** 6), st.floats(0, 1e6, allow_nan=False,
                                                        allow_infinity=False))


def num_tree(depth: int):
    leaf = st.one_of(numbers.map(lambda v: E.Node("num", (v,))), names.map(lambda n: E.Node("sig", (n,))),
                     st.tuples(st.sampled_from(E.WINDOWS), names, st.integers(1, 10 ** 6)).map(
                         lambda w: E.Node(w[0], (w[1], w[2]))))
    if depth == 0:
        return leaf
    sub = num_tree(depth - 1)
    return st.one_of(leaf, st.tuples(st.sampled_from("+-*/"), sub, sub).map(
        lambda t: E.Node(t[0], (t[1], t[2]))), sub.map(lambda x: E.Node("abs", (x,))),
        sub.filter(lambda x: x.op != "num").map(lambda x: E.Node("neg", (x,))))


def bool_tree(depth: int):
    cmp = st.tuples(st.sampled_from(list(E.CMP)), num_tree(2), num_tree(2)).map(
        lambda t: E.Node(t[0], (t[1], t[2])))
    leaf = st.one_of(cmp, st.booleans().map(lambda b: E.Node("bool", (b,))),
                     st.tuples(names, st.text("abc XY\"\\", max_size=5)).map(
                         lambda t: E.Node("==", (E.Node("sig", (t[0],)), E.Node("str", (t[1],))))))
    if depth == 0:
        return leaf
    sub = bool_tree(depth - 1)
    return st.one_of(leaf, st.tuples(st.sampled_from(["and", "or"]), sub, sub).map(
        lambda t: E.Node(t[0], (t[1], t[2]))), sub.map(lambda x: E.Node("not", (x,))))


@settings(max_examples=300, deadline=None)
@given(bool_tree(3))
def test_round_trip(tree):
    text = E.to_text(tree)
    if len(text) > E.MAX_CHARS or E.depth(tree) > E.MAX_DEPTH:
        return
    assert E.parse(text) == tree
    assert E.to_text(E.parse(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(-50, 50), st.integers(-50, 50), st.integers(1, 9),
       st.sampled_from(list(E.CMP)), st.sampled_from(["and", "or"]))
def test_evaluation_matches_python(x, y, z, cmp, join):
    text = f"(a + b * c) {cmp} (b - a) / c {join} not abs(a) > b"
    py = text.replace("abs", "abs").replace("not ", "not ")
    expected = eval(py, {"abs": abs}, {"a": x, "b": y, "c": z})  # noqa: S307 - test literal
    assert ev(text, a=x, b=y, c=z) is bool(expected)
