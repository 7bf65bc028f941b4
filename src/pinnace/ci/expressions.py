"""GitHub Actions expressions, ``${{ <expression> }}``, evaluated as GitHub evaluates them.

The grammar, coercions and functions are those of GitHub's documentation (the
expressions and contexts pages) and, where it says nothing, of the runner's own
evaluator (actions/runner, ``src/Sdk/DTExpressions2``):

- literals ``null``, ``true``, ``false``, numbers (``711``, ``-9.2``, ``0xff``,
  ``-2.99e-2``, ``NaN``, ``Infinity``) and strings in single quotes (``'It''s'``);
- ``( )``, ``a.b``, ``a['b']``, ``a[0]``, object filters ``a.*.b``, ``!``,
  ``< <= > >=``, ``== !=``, ``&&`` and ``||`` (these two give one of their operands, not
  a boolean, as in JavaScript);
- loose equality: values of different types are compared as numbers (null is 0, true
  1, a string the number it spells, '' 0, anything else NaN); strings compare ignoring
  case; an object or array equals only itself; NaN equals nothing;
- falsy are ``false``, ``0``, ``-0``, ``''``, ``null`` and ``NaN``;
- a missing property, or an index into what is neither object nor array, is null;
- context names, property names and function names ignore case;
- functions contains, startsWith, endsWith, format, join, toJSON, fromJSON and case;
  hashFiles and the status functions success, failure, always and cancelled are the
  caller's to give.

Values are Python's: None, bool, int or float, str, a Mapping (an object), a list or
tuple (an array). Whole number literals come back as int.

:func:`parse` gives the syntax tree, :func:`evaluate` the value of one expression,
:func:`interpolate` a string with each ``${{ }}`` in it replaced, and :func:`condition`
the answer of a job's or step's ``if:``. Every problem raises :class:`ExpressionError`,
one line naming the expression. The standard library only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..errors import ExpressionError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "STATUS_FUNCTIONS",
    "Call",
    "Compare",
    "ExpressionError",
    "Index",
    "Literal",
    "Logical",
    "NamedValue",
    "Node",
    "Not",
    "Wildcard",
    "condition",
    "evaluate",
    "interpolate",
    "parse",
]

MAX_LENGTH = 21000  # GitHub's limits on an expression's text and its tree's depth
MAX_DEPTH = 50
MAX_NESTING = 100  # brackets, calls and '!' inside each other: bounds the parser's recursion
MAX_RESULT = 5 << 20  # characters a format(), join() or toJSON() may make (10 MB to .NET)

STATUS_FUNCTIONS = ("success", "failure", "always", "cancelled")

# Lowercase name: the name as documented, least and most arguments (the runner's).
_FUNCTIONS: dict[str, tuple[str, int, int]] = {
    "contains": ("contains", 2, 2),
    "startswith": ("startsWith", 2, 2),
    "endswith": ("endsWith", 2, 2),
    "format": ("format", 1, 255),
    "join": ("join", 1, 2),
    "tojson": ("toJSON", 1, 1),
    "fromjson": ("fromJSON", 1, 1),
    "case": ("case", 3, 255),
    "hashfiles": ("hashFiles", 1, 255),
    **{name: (name, 0, 0) for name in STATUS_FUNCTIONS},
}

Functions = Mapping[str, Callable[..., Any]]


# --- the syntax tree ---------------------------------------------------------------------


class Node:
    """A node of an expression's syntax tree."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Literal(Node):
    """null, true, false, a number or a string."""

    value: bool | int | float | str | None


@dataclass(frozen=True, slots=True)
class NamedValue(Node):
    """A context by name: ``github``, ``env``, ``steps``... (``pos``: 0-based offset)."""

    name: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Wildcard(Node):
    """The ``*`` of an object filter, ``a.*`` or ``a[*]``."""


@dataclass(frozen=True, slots=True)
class Index(Node):
    """``target.name`` (``index`` a string Literal), ``target[index]`` or ``target.*``."""

    target: Node
    index: Node


@dataclass(frozen=True, slots=True)
class Not(Node):
    """``!operand``."""

    operand: Node


@dataclass(frozen=True, slots=True)
class Compare(Node):
    """``left op right``, op one of ``== != < <= > >=``."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Logical(Node):
    """``a && b && ...`` or ``a || b || ...`` (op ``&&`` or ``||``), flattened."""

    op: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Call(Node):
    """A function call; ``name`` as written (functions ignore case)."""

    name: str
    args: tuple[Node, ...]
    pos: int = field(default=0, compare=False)


def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Index):
        return (node.target, node.index)
    if isinstance(node, Not):
        return (node.operand,)
    if isinstance(node, Compare):
        return (node.left, node.right)
    if isinstance(node, (Logical, Call)):
        return node.args
    return ()


def _walk(node: Node) -> Iterator[Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(_children(current)))


# --- reading the text --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # num str bool null name func prop op ( ) [ ] , . * eof
    text: str
    pos: int
    value: Any = None


_BOUNDARY = frozenset("([)],.!><=&|")
_OPERATORS = ("!=", ">=", "<=", "==", "&&", "||")
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
# After these a '.' starts a number (.5), after anything else it is a dereference.
_NUMBER_AFTER = frozenset({"", ",", "(", "[", "op"})


def _is_space(c: str) -> bool:
    # .NET's Char.IsWhiteSpace, which Python's isspace() matches but for these four
    return c.isspace() and c not in "\x1c\x1d\x1e\x1f"


def _is_boundary(c: str) -> bool:
    return c in _BOUNDARY or _is_space(c)


def _strip(s: str) -> str:
    start, end = 0, len(s)
    while start < end and _is_space(s[start]):
        start += 1
    while end > start and _is_space(s[end - 1]):
        end -= 1
    return s[start:end]


def _parse_number(text: str) -> float:
    """A string as a number the way GitHub converts one (JavaScript's Number(), roughly):
    '' is 0, decimal and exponent forms, 0x hex and 0o octal (32-bit), else NaN."""
    s = _strip(text)
    if not s:
        return 0.0
    if _DECIMAL.match(s):
        return float(s)
    if len(s) > 2 and s[0] == "0" and s[1] in "xo":
        digits, base = s[2:], (16 if s[1] == "x" else 8)
        allowed = "0123456789abcdefABCDEF" if base == 16 else "01234567"
        if all(c in allowed for c in digits):
            digits = digits.lstrip("0") or "0"
            if len(digits) <= 11:
                value = int(digits, base)
                if value <= 0xFFFFFFFF:  # an Int32, read as two's complement
                    return float(value - (1 << 32) if value >= 1 << 31 else value)
        return math.nan
    if s in ("Infinity", "+Infinity"):
        return math.inf
    if s == "-Infinity":
        return -math.inf
    return math.nan


def _literal_number(value: float) -> int | float:
    negative_zero = value == 0 and math.copysign(1.0, value) < 0
    if value.is_integer() and abs(value) < 2**53 and not negative_zero:
        return int(value)
    return value


def _unexpected(text: str, raw: str, pos: int) -> ExpressionError:
    return ExpressionError(text, f"unexpected symbol {raw!r}", pos + 1)


def _lex(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while True:
        while i < n and _is_space(text[i]):
            i += 1
        if i >= n:
            break
        c, start = text[i], i
        last = tokens[-1].kind if tokens else ""
        if c in "()[],*":
            tokens.append(_Token(c, c, i))
            i += 1
        elif c == "'":
            value, i = _read_string(text, i)
            tokens.append(_Token("str", text[start:i], start, value))
        elif c in "!<>=&|":
            if text[i:i + 2] in _OPERATORS:
                tokens.append(_Token("op", text[i:i + 2], i))
                i += 2
            elif c in "!<>":
                tokens.append(_Token("op", c, i))
                i += 1
            else:  # a lone = & |
                i += 1
                while i < n and not _is_boundary(text[i]):
                    i += 1
                raise _unexpected(text, text[start:i], start)
        elif c == "." and last not in _NUMBER_AFTER:
            tokens.append(_Token(".", c, i))
            i += 1
        elif c in ".+-" or "0" <= c <= "9":
            i += 1
            while i < n and (not _is_boundary(text[i]) or text[i] == "."):
                i += 1
            number = _parse_number(text[start:i])
            if math.isnan(number):
                raise _unexpected(text, text[start:i], start)
            tokens.append(_Token("num", text[start:i], start, _literal_number(number)))
        else:
            i += 1
            while i < n and not _is_boundary(text[i]):
                i += 1
            word = text[start:i]
            if not _KEYWORD.match(word):
                raise _unexpected(text, word, start)
            tokens.append(_keyword(text, word, start, i, last))
    tokens.append(_Token("eof", "", n))
    return tokens


_WORDS: dict[str, tuple[str, Any]] = {  # case matters here: `True` is a context's name
    "true": ("bool", True), "false": ("bool", False), "null": ("null", None),
    "NaN": ("num", math.nan), "Infinity": ("num", math.inf),
}


def _keyword(text: str, word: str, start: int, end: int, last: str) -> _Token:
    if last == ".":
        return _Token("prop", word, start)  # any word after a dot, even `true`
    if word in _WORDS:
        kind, value = _WORDS[word]
        return _Token(kind, word, start, value)
    while end < len(text) and _is_space(text[end]):
        end += 1
    kind = "func" if end < len(text) and text[end] == "(" else "name"
    return _Token(kind, word, start)


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The string literal at ``start`` ('' is a quote) and the offset after it."""
    parts: list[str] = []
    i = start + 1
    while True:
        quote = text.find("'", i)
        if quote < 0:
            raise ExpressionError(text, f"unclosed string {_clip(text[start:], 40)!r}",
                                  start + 1)
        parts.append(text[i:quote])
        if text.startswith("''", quote):
            parts.append("'")
            i = quote + 2
        else:
            return "".join(parts), quote + 1


# --- parsing -----------------------------------------------------------------------------

_PRECEDENCE = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<": 4, "<=": 4, ">": 4, ">=": 4}


class _Parser:
    def __init__(self, text: str, tokens: list[_Token], extra: frozenset[str]) -> None:
        self.text = text
        self.tokens = tokens
        self.extra = extra  # the caller's functions, lowercase
        self.i = 0
        self.nesting = 0

    def parse(self) -> Node:
        if self.peek().kind == "eof":
            return Literal(None)  # GitHub's evaluator: no tokens, null
        node = self.binary(0)
        if self.peek().kind != "eof":
            raise self.error(self.peek())
        return node

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def error(self, tok: _Token) -> ExpressionError:
        if tok.kind == "eof":
            last = self.tokens[self.i - 1] if self.i else tok
            return ExpressionError(self.text, f"unexpected end of expression after {last.text!r}",
                                   last.pos + 1)
        return _unexpected(self.text, tok.text, tok.pos)

    def expect(self, kind: str) -> None:
        if self.peek().kind != kind:
            raise self.error(self.peek())
        self.i += 1

    def enter(self, tok: _Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise ExpressionError(self.text, f"brackets, calls and '!' nested more than "
                                  f"{MAX_NESTING} deep", tok.pos + 1)

    def binary(self, min_precedence: int) -> Node:
        left = self.unary()
        while True:
            tok = self.peek()
            precedence = _PRECEDENCE.get(tok.text, 0) if tok.kind == "op" else 0
            if precedence == 0 or precedence < min_precedence:
                return left
            self.i += 1
            right = self.binary(precedence + 1)
            if tok.text in ("&&", "||"):
                left = Logical(tok.text, _flat(tok.text, left) + _flat(tok.text, right))
            else:
                left = Compare(tok.text, left, right)

    def unary(self) -> Node:
        tok = self.peek()
        if tok.kind == "op" and tok.text == "!":
            self.i += 1
            self.enter(tok)
            node = Not(self.unary())
            self.nesting -= 1
            return node
        return self.postfix()

    def postfix(self) -> Node:
        node, chains = self.primary()
        while chains:  # GitHub allows . and [ ] after a context, a call or ( ), not a literal
            tok = self.peek()
            if tok.kind == ".":
                self.i += 1
                name = self.peek()
                if name.kind == "prop":
                    node = Index(node, Literal(name.text))
                elif name.kind == "*":
                    node = Index(node, Wildcard())
                else:
                    raise self.error(name)
                self.i += 1
            elif tok.kind == "[":
                self.i += 1
                self.enter(tok)
                if self.peek().kind == "*":
                    self.i += 1
                    index: Node = Wildcard()
                else:
                    index = self.binary(0)
                self.expect("]")
                self.nesting -= 1
                node = Index(node, index)
            else:
                break
        return node

    def primary(self) -> tuple[Node, bool]:
        tok = self.peek()
        if tok.kind in ("num", "str", "bool", "null"):
            self.i += 1
            return Literal(tok.value), False
        if tok.kind == "name":
            self.i += 1
            return NamedValue(tok.text, tok.pos), True
        if tok.kind == "func":
            return self.call(), True
        if tok.kind == "(":
            self.i += 1
            self.enter(tok)
            node = self.binary(0)
            self.expect(")")
            self.nesting -= 1
            return node, True
        raise self.error(tok)

    def call(self) -> Call:
        tok = self.peek()
        key = tok.text.lower()
        known = _FUNCTIONS.get(key)
        if known is None and key not in self.extra:
            raise ExpressionError(self.text, f"unrecognized function {tok.text!r}", tok.pos + 1)
        self.i += 1
        self.expect("(")
        self.enter(tok)
        args: list[Node] = []
        if self.peek().kind == ")":
            self.i += 1
        else:
            while True:
                args.append(self.binary(0))
                if self.peek().kind == ")":
                    self.i += 1
                    break
                self.expect(",")
        self.nesting -= 1
        if known is not None:
            name, least, most = known
            if len(args) < least:
                raise ExpressionError(self.text, f"too few arguments to {name}(): it takes "
                                      f"{'at least ' if most > least else ''}{least}", tok.pos + 1)
            if len(args) > most:
                raise ExpressionError(self.text, f"too many arguments to {name}(): it takes "
                                      f"{'at most ' if most > least else ''}{most}", tok.pos + 1)
            if key == "case" and len(args) % 2 == 0:
                raise ExpressionError(self.text, "case() takes an odd number of arguments "
                                      "(predicate, value pairs and a default)", tok.pos + 1)
        return Call(tok.text, tuple(args), tok.pos)


def _flat(op: str, node: Node) -> tuple[Node, ...]:
    return node.args if isinstance(node, Logical) and node.op == op else (node,)


def parse(text: str, *, functions: Iterable[str] = ()) -> Node:
    """The syntax tree of one expression (without ``${{ }}``); an empty one is null, as
    in GitHub's evaluator. ``functions``: names of functions beyond GitHub's that the
    expression may call. Raises ExpressionError on a syntax error, with its position
    (1-based)."""
    if not isinstance(text, str):
        raise ExpressionError(repr(text), "an expression must be a string")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(text, f"exceeded max expression length {MAX_LENGTH}")
    extra = frozenset(name.lower() for name in functions)
    node = _Parser(text, _lex(text), extra).parse()
    stack = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ExpressionError(text, f"exceeded max expression depth {MAX_DEPTH}")
        stack.extend((child, depth + 1) for child in _children(current))
    return node


# --- values ------------------------------------------------------------------------------

_NULL, _BOOL, _NUM, _STR, _ARR, _OBJ = range(6)
_KIND_NAMES = ("null", "boolean", "number", "string", "array", "object")
_MISSING: Any = object()


class _Filtered(list[Any]):
    """The array an object filter (``*``) makes: an index applies to each item."""


def _kind(value: Any) -> int:
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, (int, float)):
        return _NUM
    if isinstance(value, str):
        return _STR
    if isinstance(value, (list, tuple)):
        return _ARR
    return _OBJ


def _is_array(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _is_primitive(value: Any) -> bool:
    return _kind(value) <= _STR


def _float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _to_number(value: Any) -> float:
    kind = _kind(value)
    if kind == _NULL:
        return 0.0
    if kind == _BOOL:
        return 1.0 if value else 0.0
    if kind == _NUM:
        return _float(value)
    if kind == _STR:
        return _parse_number(value)
    return math.nan


def _truthy(value: Any) -> bool:
    kind = _kind(value)
    if kind == _NULL:
        return False
    if kind == _BOOL:
        return bool(value)
    if kind == _NUM:
        number = _float(value)
        return not (number == 0 or math.isnan(number))
    if kind == _STR:
        return bool(value)
    return True


def _format_number(value: int | float) -> str:
    """A number as GitHub prints one (.NET's "G15"): 711, -9.2, 0.0299, 1E+15, and -0 as 0."""
    number = _float(value)
    if number == 0:
        return "0"
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return format(number, ".15G")


def _coerce_string(value: Any) -> str:
    """GitHub's conversion to a string, inside expressions (format, join, contains)."""
    kind = _kind(value)
    if kind == _NULL:
        return ""
    if kind == _BOOL:
        return "true" if value else "false"
    if kind == _NUM:
        return _format_number(value)
    if kind == _STR:
        return str(value)
    return "Array" if kind == _ARR else "Object"


def _to_string(value: Any) -> str:
    """A value as interpolate() puts it in a string: objects and arrays as toJSON() does."""
    return _to_json(value) if _kind(value) >= _ARR else _coerce_string(value)


def _to_json(value: Any, level: int = 0) -> str:
    """toJSON(): JSON indented by two spaces, numbers as GitHub prints them."""
    if isinstance(value, Mapping) or _is_array(value):
        is_map = isinstance(value, Mapping)
        if not value:
            return "{}" if is_map else "[]"
        pad = "\n" + "  " * (level + 1)
        if is_map:
            items = [f"{pad}{_json_string(k)}: {_to_json(v, level + 1)}" for k, v in value.items()]
        else:
            items = [pad + _to_json(v, level + 1) for v in value]
        opening, closing = ("{", "}") if is_map else ("[", "]")
        return opening + ",".join(items) + "\n" + "  " * level + closing
    kind = _kind(value)
    if kind == _NULL:
        return "null"
    if kind == _STR:
        return _json_string(value)
    if kind == _OBJ:
        return "{}"  # an object of no kind JSON knows
    return _coerce_string(value)


def _json_string(value: Any) -> str:
    return json.dumps(value if isinstance(value, str) else _coerce_string(value),
                      ensure_ascii=False)


class _Upper(dict[int, int]):
    """Code point to its one-character uppercase, as .NET's OrdinalIgnoreCase compares
    (no 'ß' -> 'SS'; the dotless i, U+0131, stays itself). Caches the common scripts."""

    def __missing__(self, code: int) -> int:
        char = chr(code)
        upper = char.upper()
        result = ord(upper) if len(upper) == 1 and char != "\u0131" else code
        if code < 0x3000:
            self[code] = result
        return result


_UPPER = _Upper()


def _fold(s: str) -> str:
    return s.upper() if s.isascii() else s.translate(_UPPER)


def _get(obj: Mapping[Any, Any], key: str) -> Any:
    """obj[key] ignoring case (GitHub's objects do), or _MISSING."""
    value = obj.get(key, _MISSING)
    if value is not _MISSING:
        return value
    folded = _fold(key)
    for name, value in obj.items():
        if isinstance(name, str) and _fold(name) == folded:
            return value
    return _MISSING


def _coerce(a: Any, b: Any) -> tuple[Any, int, Any, int]:
    """Both sides to one type if they differ, as GitHub does: to numbers."""
    ka, kb = _kind(a), _kind(b)
    while ka != kb:
        if ka == _NUM and kb == _STR:
            b, kb = _to_number(b), _NUM
        elif ka == _STR and kb == _NUM:
            a, ka = _to_number(a), _NUM
        elif ka in (_BOOL, _NULL):
            a, ka = _to_number(a), _NUM
        elif kb in (_BOOL, _NULL):
            b, kb = _to_number(b), _NUM
        else:
            break
    return a, ka, b, kb


def _equals(a: Any, b: Any) -> bool:
    a, ka, b, kb = _coerce(a, b)
    if ka != kb:
        return False
    if ka == _NULL:
        return True
    if ka == _NUM:
        return _float(a) == _float(b)  # NaN equals nothing
    if ka == _STR:
        return _fold(a) == _fold(b)
    if ka == _BOOL:
        return bool(a) == bool(b)
    return a is b  # objects and arrays: the same instance only


def _greater(a: Any, b: Any) -> bool:
    a, ka, b, kb = _coerce(a, b)
    if ka != kb:
        return False
    if ka == _NUM:
        return _float(a) > _float(b)
    if ka == _STR:
        return _fold(a) > _fold(b)
    if ka == _BOOL:
        return bool(a) and not b
    return False


def _less(a: Any, b: Any) -> bool:
    return _greater(b, a)


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return _equals(a, b)
    if op == "!=":
        return not _equals(a, b)
    if op == "<":
        return _less(a, b)
    if op == ">":
        return _greater(a, b)
    if op == "<=":
        return _equals(a, b) or _less(a, b)
    return _equals(a, b) or _greater(a, b)


def _index_key(index: Any) -> str | None:
    return _coerce_string(index) if _is_primitive(index) else None


def _index_int(index: Any) -> int | None:
    number = _to_number(index)
    if math.isnan(number) or number < 0 or number > 2**31 - 1:
        return None
    return math.floor(number)


def _clip(s: str, limit: int = 80) -> str:
    return s if len(s) <= limit else s[:limit - 3] + "..."


# --- evaluation --------------------------------------------------------------------------


class _Args:
    """A call's arguments, each evaluated when first asked for (as the runner does)."""

    def __init__(self, evaluator: _Evaluator, nodes: tuple[Node, ...]) -> None:
        self.evaluator = evaluator
        self.nodes = nodes
        self.values: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, i: int) -> Any:
        if i not in self.values:
            self.values[i] = self.evaluator.eval(self.nodes[i])
        return self.values[i]


def _unavailable(key: str) -> str | None:
    if key == "hashfiles":
        return "hashFiles is only available in steps"
    if key in STATUS_FUNCTIONS:
        return f"{key}() is only available in if: conditions"
    return None


class _Evaluator:
    def __init__(self, text: str, contexts: Mapping[str, Any], functions: Functions) -> None:
        self.text = text
        self.contexts = contexts
        self.functions = {name.lower(): fn for name, fn in functions.items()}

    def error(self, problem: str, pos: int | None = None) -> ExpressionError:
        return ExpressionError(self.text, problem, pos)

    def check(self, node: Node) -> None:
        """What GitHub checks before it evaluates: every context and function is here."""
        for current in _walk(node):
            if isinstance(current, NamedValue) and _get(self.contexts, current.name) is _MISSING:
                names = ", ".join(sorted(str(name) for name in self.contexts)) or "none"
                raise self.error(f"unrecognized named-value {current.name!r} (the contexts "
                                 f"here: {names})", current.pos + 1)
            if isinstance(current, Call) and current.name.lower() not in self.functions:
                problem = _unavailable(current.name.lower())
                if problem:
                    raise self.error(problem, current.pos + 1)

    def run(self, node: Node) -> Any:
        self.check(node)
        try:
            value = self.eval(node)
        except RecursionError:
            raise self.error("a value is nested too deeply to evaluate") from None
        return list(value) if isinstance(value, _Filtered) else value

    def eval(self, node: Node) -> Any:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, NamedValue):
            value = _get(self.contexts, node.name)
            return None if value is _MISSING else value
        if isinstance(node, Index):
            return self.index(node)
        if isinstance(node, Not):
            return not _truthy(self.eval(node.operand))
        if isinstance(node, Compare):
            return _compare(node.op, self.eval(node.left), self.eval(node.right))
        if isinstance(node, Logical):
            stop = node.op == "||"  # || stops at the first truthy value, && at the first falsy
            result = None
            for arg in node.args:
                result = self.eval(arg)
                if _truthy(result) == stop:
                    break
            return result
        if isinstance(node, Call):
            return self.call(node)
        raise self.error("'*' belongs after '.' or '['")

    def index(self, node: Index) -> Any:
        target = self.eval(node.target)
        star = isinstance(node.index, Wildcard)
        if isinstance(target, _Filtered):
            index = None if star else self.eval(node.index)
            out = _Filtered()
            for item in target:
                if isinstance(item, Mapping):
                    if star:
                        out.extend(item.values())
                    elif (key := _index_key(index)) is not None:
                        value = _get(item, key)
                        if value is not _MISSING:
                            out.append(value)
                elif _is_array(item):
                    if star:
                        out.extend(item)
                    elif (n := _index_int(index)) is not None and n < len(item):
                        out.append(item[n])
            return out
        if isinstance(target, Mapping):
            if star:
                return _Filtered(target.values())
            key = _index_key(self.eval(node.index))
            value = _MISSING if key is None else _get(target, key)
            return None if value is _MISSING else value
        if _is_array(target):
            if star:
                return _Filtered(target)
            n = _index_int(self.eval(node.index))
            return target[n] if n is not None and n < len(target) else None
        return _Filtered() if star else None

    def call(self, node: Call) -> Any:
        key = node.name.lower()
        given = self.functions.get(key)
        if given is not None:
            return given(*[self.eval(arg) for arg in node.args])
        builtin = _BUILTINS.get(key)
        if builtin is None:
            raise self.error(_unavailable(key) or f"unrecognized function {node.name!r}",
                             node.pos + 1)
        return builtin(self, _Args(self, node.args))

    def limit(self, result: str) -> str:
        if len(result) > MAX_RESULT:
            raise self.error(f"a result of more than {MAX_RESULT} characters")
        return result

    # The functions: GitHub's, from the runner's Sdk/Functions.

    def contains(self, args: _Args) -> bool:
        search = args[0]
        if _is_primitive(search):
            item = args[1]
            return _is_primitive(item) and \
                _fold(_coerce_string(item)) in _fold(_coerce_string(search))
        if _is_array(search) and search:
            item = args[1]
            return any(_equals(item, value) for value in search)
        return False

    def startswith(self, args: _Args) -> bool:
        return self._affix(args, str.startswith)

    def endswith(self, args: _Args) -> bool:
        return self._affix(args, str.endswith)

    def _affix(self, args: _Args, test: Callable[[str, str], bool]) -> bool:
        left = args[0]
        if not _is_primitive(left):
            return False
        right = args[1]
        return _is_primitive(right) and test(_fold(_coerce_string(left)),
                                             _fold(_coerce_string(right)))

    def format(self, args: _Args) -> str:
        fmt = _coerce_string(args[0])
        pieces: list[str | tuple[int, str]] = []
        i, n = 0, len(fmt)
        while i < n:
            left, right = fmt.find("{", i), fmt.find("}", i)
            if left >= 0 and (right < 0 or right > left):
                if fmt.startswith("{{", left):
                    pieces.append(fmt[i:left + 1])
                    i = left + 2
                    continue
                digits = re.match(r"[0-9]+", fmt[left + 1:]) if right > left + 1 else None
                index = _small_int(digits.group()) if digits else None
                spec = _format_spec(fmt, left + 1 + len(digits.group())) if digits else None
                if index is None or spec is None:
                    raise self.error(f"the format string {_clip(fmt)!r} is invalid")
                if index > len(args) - 2:
                    raise self.error(f"the format string {_clip(fmt)!r} references more "
                                     "arguments than were supplied")
                pieces.append(fmt[i:left])
                pieces.append((index, spec[0]))
                i = spec[1] + 1
            elif right >= 0:
                if not fmt.startswith("}}", right):
                    raise self.error(f"the format string {_clip(fmt)!r} is invalid")
                pieces.append(fmt[i:right + 1])
                i = right + 2
            else:
                pieces.append(fmt[i:])
                break
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = args[piece[0] + 1]
            if piece[1]:
                raise self.error(f"the format specifiers {_clip(piece[1])!r} are not valid for "
                                 f"a {_KIND_NAMES[_kind(value)]}")
            out.append(_coerce_string(value))
        return self.limit("".join(out))

    def join(self, args: _Args) -> str:
        items = args[0]
        if _is_array(items) and items:
            separator = ","
            if len(items) > 1 and len(args) > 1 and _is_primitive(args[1]):
                separator = _coerce_string(args[1])
            return self.limit(separator.join(_coerce_string(item) for item in items))
        return _coerce_string(items) if _is_primitive(items) else ""

    def tojson(self, args: _Args) -> str:
        return self.limit(_to_json(args[0]))

    def fromjson(self, args: _Args) -> Any:
        text = _coerce_string(args[0])
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise self.error(f"fromJSON cannot read {_clip(text)!r}: {e.msg} at line "
                             f"{e.lineno} column {e.colno}") from None
        except (ValueError, RecursionError) as e:
            raise self.error(f"fromJSON cannot read {_clip(text)!r}: {e}") from None

    def case(self, args: _Args) -> Any:
        for i in range(0, len(args) - 1, 2):
            predicate = args[i]
            if not isinstance(predicate, bool):
                raise self.error("case() predicates must be true or false, not a "
                                 f"{_KIND_NAMES[_kind(predicate)]}")
            if predicate:
                return args[i + 1]
        return args[len(args) - 1]


_BUILTINS: dict[str, Callable[[_Evaluator, _Args], Any]] = {
    "contains": _Evaluator.contains,
    "startswith": _Evaluator.startswith,
    "endswith": _Evaluator.endswith,
    "format": _Evaluator.format,
    "join": _Evaluator.join,
    "tojson": _Evaluator.tojson,
    "fromjson": _Evaluator.fromjson,
    "case": _Evaluator.case,
}


def _small_int(digits: str) -> int | None:
    """A format argument's index: a .NET Byte, 0 to 255."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 3 and int(digits) <= 255 else None


def _format_spec(fmt: str, start: int) -> tuple[str, int] | None:
    """After ``{N``: '}' or ':specifiers}' ('}}' a brace in them): (specifiers, offset of
    the closing brace), or None."""
    if fmt.startswith("}", start):
        return "", start
    if not fmt.startswith(":", start):
        return None
    spec: list[str] = []
    i = start + 1
    while i < len(fmt):
        if fmt[i] != "}":
            spec.append(fmt[i])
            i += 1
        elif fmt.startswith("}}", i):
            spec.append("}")
            i += 2
        else:
            return "".join(spec), i
    return None


def evaluate(text: str, contexts: Mapping[str, Any], *,
             functions: Functions | None = None) -> Any:
    """The value of one expression (without ``${{ }}``) over ``contexts`` (``github``,
    ``env``, ``matrix``...: names ignore case). ``functions``: more functions by name, and
    hashFiles and the status functions if the place allows them; names ignore case, and
    one given overrides GitHub's of that name."""
    functions = functions or {}
    node = parse(text, functions=functions)
    return _Evaluator(text, contexts, functions).run(node)


# --- templates and conditions ------------------------------------------------------------

_Segment = tuple[str, str]  # the expression (trimmed), its text with the ${{ }}


def _split(text: str) -> list[str | _Segment]:
    """Text and ``${{ }}`` segments, found as GitHub finds them: the first ``}}`` outside a
    string literal closes an expression."""
    parts: list[str | _Segment] = []
    done = 0
    start = text.find("${{")
    while start >= 0:
        if start > done:
            parts.append(text[done:start])
        in_string, end = False, -1
        for i in range(start + 3, len(text)):
            if text[i] == "'":
                in_string = not in_string  # '' (an escaped quote) toggles twice
            elif not in_string and text[i] == "}" and text[i - 1] == "}":
                end = i
                break
        if end < 0:
            raise ExpressionError(text, "'${{' is not closed by '}}'", start + 1)
        parts.append((_strip(text[start + 3:end - 1]), text[start:end + 1]))
        done = end + 1
        start = text.find("${{", done)
    if done < len(text):
        parts.append(text[done:])
    return parts


def _parse_segment(segment: _Segment, functions: Iterable[str]) -> Node:
    expression, raw = segment
    if not expression:
        raise ExpressionError(raw, "an expression was expected")
    return parse(expression, functions=functions)


def interpolate(text: str, contexts: Mapping[str, Any], *,
                functions: Functions | None = None) -> str:
    """``text`` with each ``${{ expression }}`` replaced by its value as a string: null as
    '', true and false, numbers as GitHub prints them (711, -9.2, 1E+15), objects and
    arrays as toJSON() makes them. All are parsed before any is evaluated."""
    parts = _split(text)
    if not any(isinstance(part, tuple) for part in parts):
        return text
    functions = functions or {}
    parsed = [part if isinstance(part, str) else (part[0], _parse_segment(part, functions))
              for part in parts]
    out = []
    for part in parsed:
        if isinstance(part, str):
            out.append(part)
        else:
            out.append(_to_string(_Evaluator(part[0], contexts, functions).run(part[1])))
    return "".join(out)


def condition(text: str | None, contexts: Mapping[str, Any], *,
              status: Callable[[str], bool], functions: Functions | None = None) -> bool:
    """Whether a job's or step's ``if:`` holds. ``text`` may be wrapped in ``${{ }}``; one
    that calls none of success(), failure(), always() and cancelled() means
    ``success() && (text)``, and an empty one ``success()``, as on GitHub. ``status(name)``
    answers those four. Text around ``${{ }}`` makes the whole a string (true unless
    empty), as on GitHub."""
    every: dict[str, Callable[..., Any]] = dict(functions or {})
    every.update({name: partial(status, name) for name in STATUS_FUNCTIONS})
    expression = _strip(text or "")
    node: Node | None = None
    if "${{" in expression:
        parts = _split(expression)
        if len(parts) == 1 and isinstance(parts[0], tuple):
            inner = _parse_segment(parts[0], every)
            if isinstance(inner, Literal) and isinstance(inner.value, str) and \
                    parts[0][0].startswith("'"):
                # GitHub reads ${{ 'text' }} as the string `text`, and that as the if:
                expression = _strip(inner.value)
                node = parse(expression, functions=every) if expression else None
            else:
                expression, node = parts[0][0], inner
        else:  # as GitHub does: format('text {0} text', expression)
            fmt: list[str] = []
            args: list[Node] = []
            for part in parts:
                if isinstance(part, str):
                    fmt.append(part.replace("{", "{{").replace("}", "}}"))
                else:
                    fmt.append("{" + str(len(args)) + "}")
                    args.append(_parse_segment(part, every))
            node = Call("format", (Literal("".join(fmt)), *args))
    elif expression:
        node = parse(expression, functions=every)
    if node is None:
        node = Call("success", ())
    elif not any(isinstance(n, Call) and n.name.lower() in STATUS_FUNCTIONS for n in _walk(node)):
        node = Logical("&&", (Call("success", ()), node))
    return _truthy(_Evaluator(expression, contexts, every).run(node))
