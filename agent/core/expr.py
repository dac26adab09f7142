"""The one condition language of the agent (PROTOCOL.md §8): tokenizer, parser, evaluator.

Used by campaign conditions and by command preconditions (conditions.py). Sans-I/O: values
come from an environment passed at evaluation time.

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | cmp
    cmp     := sum (("==" | "!=" | "<" | "<=" | ">" | ">=") sum)?      (no chaining)
    sum     := prod (("+" | "-") prod)*
    prod    := unary (("*" | "/") unary)*
    unary   := ("-" | "+") unary | atom
    atom    := number | "string" | 'string' | true | false | {param} | signal
             | abs(expr) | avg(signal, N) | min(signal, N) | max(signal, N) | "(" expr ")"

A signal is an output name or Message.Signal (`[A-Za-z_][A-Za-z0-9_.]*`). Depth counts the
operator and function nodes on the longest path from the root (a bare comparison is 1).
A never-seen, stale or null input (anywhere in it: `compile_condition` looks every input up
first), a type mismatch or a division by zero makes the whole expression false (Unknown is
raised inside and caught by `holds`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from agent.errors import ExprError  # noqa: F401 - raised here, caught as E.ExprError

MAX_CHARS = 1024
MAX_DEPTH = 10
MAX_NESTING = 32  # parentheses / unary operators while parsing (keeps recursion bounded)
WINDOWS = ("avg", "min", "max")
FUNCTIONS = ("abs",) + WINDOWS
KEYWORDS = ("and", "or", "not", "true", "false")
CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
       ">": operator.gt, ">=": operator.ge}
ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}  # a OP b: b FLIP a


class Unknown(Exception):
    """An input is never-seen, stale or null (or a value cannot be computed): false."""


# -- AST ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Node:
    op: str  # "num" "str" "bool" "sig" "param" "neg" "not" "and" "or" "abs" "avg" "min" "max"
    #          or a comparison / arithmetic operator
    args: tuple = ()  # child nodes; for leaves the value (name, literal); windows (sig, N)

    @property
    def leaf(self) -> bool:
        return self.op in ("num", "str", "bool", "sig", "param")


BOOL_OPS = frozenset(("not", "and", "or", "bool", *CMP))
NUM_OPS = frozenset(("num", "neg", "abs", *WINDOWS, *ARITH))


def depth(node: Node) -> int:
    if node.leaf or node.op in WINDOWS:
        return 1 if node.op in WINDOWS else 0
    return 1 + max(depth(a) for a in node.args)


def signals(node: Node) -> list[str]:
    """Signal names the expression reads, in order of first appearance."""
    out: list[str] = []

    def walk(n: Node) -> None:
        if n.op == "sig" or n.op in WINDOWS:
            if n.args[0] not in out:
                out.append(n.args[0])
        elif not n.leaf:
            for a in n.args:
                walk(a)

    walk(node)
    return out


def value_signals(node: Node) -> list[str]:
    """Signals read by value (not only through a window)."""
    out: list[str] = []

    def walk(n: Node) -> None:
        if n.op == "sig":
            if n.args[0] not in out:
                out.append(n.args[0])
        elif not n.leaf and n.op not in WINDOWS:
            for a in n.args:
                walk(a)

    walk(node)
    return out


def windows(node: Node) -> list[tuple[str, str, int]]:
    """(function, signal, N ms) of every window in the expression."""
    if node.op in WINDOWS:
        return [(node.op, node.args[0], node.args[1])]
    if node.leaf:
        return []
    return [w for a in node.args for w in windows(a)]


def to_text(node: Node) -> str:
    """Fully parenthesised source that parses back to the same tree."""
    op, a = node.op, node.args
    if op == "num":
        return repr(a[0])
    if op == "str":
        return '"' + a[0].replace("\\", "\\\\").replace('"', '\\"') + '"'
    if op == "bool":
        return "true" if a[0] else "false"
    if op == "sig":
        return a[0]
    if op == "param":
        return "{" + a[0] + "}"
    if op in WINDOWS:
        return f"{op}({a[0]}, {a[1]})"
    if op == "abs":
        return f"abs({to_text(a[0])})"
    if op == "neg":
        return f"(-{to_text(a[0])})"
    if op == "not":
        return f"(not {to_text(a[0])})"
    return f"({to_text(a[0])} {op} {to_text(a[1])})"


# -- tokenizer ------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:0x[0-9A-Fa-f_]+)|(?:\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?)|(?:\.\d+(?:[eE][+-]?\d+)?))
  | (?P<str>"(?:[^"\\]|\\.)*"|'[^']*')
  | (?P<param>\{\w+\})
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
  | (?P<op>==|!=|<=|>=|<|>|\+|-|\*|/|\(|\)|,)
""", re.VERBOSE)


def tokenize(text: str) -> list[tuple[str, Any, int]]:
    """[(kind, value, 1-based position)] ending with ("end", None, len+1)."""
    out = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            if text[i] in "\"'":
                raise ExprError("unterminated string", i + 1)
            raise ExprError(f"unexpected character {text[i]!r}", i + 1)
        kind = m.lastgroup
        raw = m.group()
        if kind == "num":
            if m.end() < len(text) and (text[m.end()].isalpha() or text[m.end()] == "_"):
                raise ExprError(f"bad number {raw + text[m.end()]!r}", i + 1)
            clean = raw.replace("_", "")
            try:
                value: Any = int(clean, 16) if clean[:2] in ("0x", "0X") else \
                    (float(clean) if any(c in clean for c in ".eE") else int(clean))
            except ValueError:
                raise ExprError(f"bad number {raw!r}", i + 1) from None
            out.append(("num", value, i + 1))
        elif kind == "str":
            body = raw[1:-1]
            if raw[0] == '"':
                body = re.sub(r"\\(.)", r"\1", body)
            out.append(("str", body, i + 1))
        elif kind == "param":
            out.append(("param", raw[1:-1], i + 1))
        elif kind == "name":
            out.append(("kw" if raw in KEYWORDS else "name", raw, i + 1))
        elif kind == "op":
            out.append(("op", raw, i + 1))
        i = m.end()
    out.append(("end", None, len(text) + 1))
    return out


# -- parser ---------------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str, allow_windows: bool, allow_params: bool):
        self.toks = tokenize(text)
        self.i = 0
        self.nesting = 0
        self.allow_windows = allow_windows
        self.allow_params = allow_params

    def peek(self):
        return self.toks[self.i]

    def take(self):
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, value: str):
        kind, v, pos = self.take()
        if v != value or kind not in ("op",):
            raise ExprError(f"expected {value!r}, found {_show(kind, v)}", pos)
        return pos

    def nest(self, pos: int) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise ExprError(f"nested more than {MAX_NESTING} levels", pos)

    def parse(self) -> Node:
        node = self.or_()
        kind, v, pos = self.peek()
        if kind != "end":
            raise ExprError(f"unexpected {_show(kind, v)}", pos)
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.peek()[:2] == ("kw", "or"):
            pos = self.take()[2]
            node = Node("or", (self.check_bool(node, pos), self.check_bool(self.and_(), pos)))
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.peek()[:2] == ("kw", "and"):
            pos = self.take()[2]
            node = Node("and", (self.check_bool(node, pos), self.check_bool(self.not_(), pos)))
        return node

    def not_(self) -> Node:
        if self.peek()[:2] == ("kw", "not"):
            pos = self.take()[2]
            self.nest(pos)
            node = Node("not", (self.check_bool(self.not_(), pos),))
            self.nesting -= 1
            return node
        return self.cmp()

    def cmp(self) -> Node:
        left = self.sum()
        kind, v, pos = self.peek()
        if kind == "op" and v in CMP:
            self.take()
            right = self.sum()
            k2, v2, pos2 = self.peek()
            if k2 == "op" and v2 in CMP:
                raise ExprError("comparisons do not chain; join them with `and`", pos2)
            for side in (left, right):
                if side.op in BOOL_OPS - {"bool"}:
                    raise ExprError("compare values, not conditions (use parentheses and "
                                    "and/or)", pos)
            return Node(v, (left, right))
        return left

    def sum(self) -> Node:
        node = self.prod()
        while (t := self.peek())[0] == "op" and t[1] in ("+", "-"):
            self.take()
            node = Node(t[1], (self.check_num(node, t[2]), self.check_num(self.prod(), t[2])))
        return node

    def prod(self) -> Node:
        node = self.unary()
        while (t := self.peek())[0] == "op" and t[1] in ("*", "/"):
            self.take()
            node = Node(t[1], (self.check_num(node, t[2]), self.check_num(self.unary(), t[2])))
        return node

    def unary(self) -> Node:
        kind, v, pos = self.peek()
        if kind == "op" and v == "+":  # a no-op, as TOML allows on numbers
            self.take()
            return self.check_num(self.unary(), pos)
        if kind == "op" and v == "-":
            self.take()
            self.nest(pos)
            inner = self.check_num(self.unary(), pos)
            self.nesting -= 1
            if inner.op == "num":  # a negative literal, not an operation
                return Node("num", (-inner.args[0],))
            return Node("neg", (inner,))
        return self.atom()

    def atom(self) -> Node:
        kind, v, pos = self.take()
        if kind == "num":
            return Node("num", (v,))
        if kind == "str":
            return Node("str", (v,))
        if kind == "kw" and v in ("true", "false"):
            return Node("bool", (v == "true",))
        if kind == "param":
            if not self.allow_params:
                raise ExprError(f"{{{v}}} placeholders are for command conditions only", pos)
            return Node("param", (v,))
        if kind == "op" and v == "(":
            self.nest(pos)
            node = self.or_()
            self.expect(")")
            self.nesting -= 1
            return node
        if kind == "name":
            if self.peek()[:2] == ("op", "("):
                return self.call(v, pos)
            if v in FUNCTIONS:
                raise ExprError(f"{v} needs arguments: {v}(...)", pos)
            return Node("sig", (v,))
        if kind == "end":
            raise ExprError("unexpected end of expression", pos)
        raise ExprError(f"unexpected {_show(kind, v)}", pos)

    def call(self, name: str, pos: int) -> Node:
        if name not in FUNCTIONS:
            raise ExprError(f"unknown function {name!r} (known: {', '.join(FUNCTIONS)})", pos)
        self.take()  # "("
        self.nest(pos)
        if name == "abs":
            node = Node("abs", (self.check_num(self.or_(), pos),))
        else:
            if not self.allow_windows:
                raise ExprError(f"{name}() windows are for campaign conditions only", pos)
            kind, sig, spos = self.take()
            if kind != "name":
                raise ExprError(f"{name}() takes a signal name first, found {_show(kind, sig)}",
                                spos)
            self.expect(",")
            kind, n, npos = self.take()
            if kind != "num" or not isinstance(n, int) or n <= 0:
                raise ExprError(f"{name}() takes a window of N ms (an integer > 0) second, "
                                f"found {_show(kind, n)}", npos)
            node = Node(name, (sig, n))
        self.expect(")")
        self.nesting -= 1
        return node

    @staticmethod
    def check_bool(node: Node, pos: int) -> Node:
        if node.op in NUM_OPS or node.op == "str":
            raise ExprError("and/or/not need conditions, not a number or string", pos)
        return node

    @staticmethod
    def check_num(node: Node, pos: int) -> Node:
        if node.op in BOOL_OPS or node.op == "str":
            raise ExprError("arithmetic needs numbers, not a condition or string", pos)
        return node


def _show(kind: str, v) -> str:
    return "end of expression" if kind == "end" else repr(v)


def parse(text: str, allow_windows: bool = True, allow_params: bool = False,
          max_depth: int = MAX_DEPTH) -> Node:
    """Parse a condition; raises ExprError with the position of the problem."""
    if len(text) > MAX_CHARS:
        raise ExprError(f"longer than {MAX_CHARS} characters ({len(text)})", MAX_CHARS + 1)
    if not text.strip():
        raise ExprError("empty expression", 1)
    node = _Parser(text, allow_windows, allow_params).parse()
    if node.op in NUM_OPS or node.op == "str":
        raise ExprError("a condition must compare (==, <, ...) or be true/false, not a number "
                        "or string", 1)
    d = depth(node)
    if d > max_depth:
        raise ExprError(f"{d} levels deep, more than {max_depth}", 1)
    return node


# -- evaluation -----------------------------------------------------------------------------

class Env(Protocol):
    def value(self, name: str) -> Any:
        """The current value, or raise Unknown (never seen, stale, null)."""

    def window(self, fn: str, name: str, n_ms: int) -> float:
        """avg/min/max of the samples of the last n_ms, or raise Unknown."""

    def param(self, name: str) -> Any: ...


Compiled = Callable[[Env], Any]


def compile_expr(node: Node) -> Compiled:
    """A closure evaluating the tree; raises Unknown for an unknown input (see `holds`)."""
    op, a = node.op, node.args
    if op in ("num", "str", "bool"):
        const = a[0]
        return lambda env: const
    if op == "sig":
        name = a[0]
        return lambda env: env.value(name)
    if op == "param":
        pname = a[0]
        return lambda env: env.param(pname)
    if op in WINDOWS:
        fn, sig, n = op, a[0], a[1]
        return lambda env: env.window(fn, sig, n)
    if op == "not":
        inner = compile_expr(a[0])
        return lambda env: not _truth(inner(env))
    if op == "and":
        x, y = compile_expr(a[0]), compile_expr(a[1])
        return lambda env: _truth(x(env)) and _truth(y(env))
    if op == "or":
        x, y = compile_expr(a[0]), compile_expr(a[1])
        return lambda env: _truth(x(env)) or _truth(y(env))
    if op == "neg":
        inner = compile_expr(a[0])
        return lambda env: -_num(inner(env))
    if op == "abs":
        inner = compile_expr(a[0])
        return lambda env: abs(_num(inner(env)))
    x, y = compile_expr(a[0]), compile_expr(a[1])
    if op in CMP:
        f = CMP[op]

        def compare(env):
            try:
                return f(x(env), y(env))
            except TypeError:  # "CHARGING" < 3: a mismatch makes the expression false
                raise Unknown("type mismatch") from None
        return compare
    f = ARITH[op]

    def arith(env):
        try:
            return f(_num(x(env)), _num(y(env)))
        except ZeroDivisionError:
            raise Unknown("division by zero") from None
    return arith


def _truth(v) -> bool:
    if type(v) is not bool:
        raise Unknown(f"{v!r} is not true/false")
    return v


def _num(v):
    if type(v) is bool or not isinstance(v, (int, float)):
        raise Unknown(f"{v!r} is not a number")
    return v


def compile_condition(node: Node) -> Compiled:
    """compile_expr, strict about inputs: every signal and window is looked up first, so an
    unknown input makes the expression false even where and/or would not reach it."""
    fn = compile_expr(node)
    names = value_signals(node)
    wins = windows(node)

    def cond(env):
        for name in names:
            env.value(name)
        for w in wins:
            env.window(*w)
        return fn(env)
    return cond


def holds(fn: Compiled, env: Env) -> bool:
    """True only when every input is known and the expression is true."""
    try:
        return fn(env) is True
    except Unknown:
        return False
