"""GitHub Actions expressions (pinnace.ci.expressions): the examples of GitHub's
expressions page, its comparison and coercion rules, the functions, interpolation into
strings, the implicit success() of an if:, syntax errors, and random text."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pinnace
from pinnace.ci.expressions import (
    MAX_LENGTH,
    Call,
    Compare,
    ExpressionError,
    Index,
    Literal,
    Logical,
    NamedValue,
    Not,
    Wildcard,
    condition,
    evaluate,
    interpolate,
    parse,
)
from pinnace.errors import ConfigError

FRUITS = [{"name": "apple", "quantity": 1}, {"name": "orange", "quantity": 2},
          {"name": "pear", "quantity": 1}]
VEGETABLES = {
    "scallions": {"colors": ["green", "white", "red"], "ediblePortions": ["roots", "stalks"]},
    "beets": {"colors": ["purple", "red", "gold", "white", "pink"],
              "ediblePortions": ["roots", "stems", "leaves"]},
    "artichokes": {"colors": ["green", "purple", "red", "black"],
                   "ediblePortions": ["hearts", "stems", "leaves"]},
}


def contexts():
    return {
        "github": {
            "ref": "refs/heads/main",
            "event_name": "push",
            "run_id": 12345678901,
            "event": {"issue": {"labels": [{"name": "bug"}, {"name": "help wanted"}]}},
        },
        "env": {"continue": "true", "time": "3", "EMPTY": ""},
        "matrix": {"os": "ubuntu-latest", "node": 20},
        "steps": {"demo": {"conclusion": "failure", "outputs": {"n": "5"}}},
        "fruits": FRUITS,
        "vegetables": VEGETABLES,
        "nothing": None,
    }


def ev(text, **kw):
    return evaluate(text, contexts(), **kw)


CASES = [
    # Literals (the page's "Example of literals")
    ("null", None), ("false", False), ("true", True), ("711", 711), ("-9.2", -9.2),
    ("0xff", 255), ("-2.99e-2", -0.0299), ("'Mona the Octocat'", "Mona the Octocat"),
    ("'It''s open source!'", "It's open source!"), ("''", ""), ("1.5e3", 1500), (".5", 0.5),
    ("+3", 3), ("0o17", 15), ("0xfF", 255), ("Infinity", math.inf), ("+Infinity", math.inf),
    ("", None), ("  ", None),  # no tokens: null, as GitHub's evaluator has it
    # Operators: grouping, index, dereference, not
    ("(1)", 1), ("((('x')))", "x"), ("github['ref']", "refs/heads/main"),
    ("github.event.issue.labels[0].name", "bug"), ("github.event.issue.labels[1]['name']",
                                                    "help wanted"),
    ("github.event.issue.labels['1'].name", "help wanted"),  # a string index as a number
    ("github.event.issue.labels[1.9].name", "help wanted"),  # floored
    ("github.event.issue.labels[-1]", None), ("github.event.issue.labels[2]", None),
    ("github.event.issue.labels.name", None), ("github.nope", None), ("github.nope.deeper", None),
    ("nothing", None), ("nothing.x", None), ("nothing[0]", None), ("(nothing).x", None),
    ("steps.demo.outputs.n", "5"), ("fromJSON('{\"a\":1}').a", 1),
    ("fromJSON('[10, 20]')[1]", 20), ("fromJSON('{\"1\":\"one\"}')[1]", "one"),
    # names ignore case: contexts, properties, functions
    ("GitHub.REF", "refs/heads/main"), ("GITHUB['Event'].Issue.LABELS[0].NaMe", "bug"),
    ("CONTAINS('abc', 'B')", True), ("tojson(null)", "null"), ("ToJson(1)", "1"),
    ("! false", True),
    # Comparisons: the page's coercion table
    ("1 == '1'", True), ("1 == 1.0", True), ("'abc' == 'ABC'", True), ("'abc' != 'ABC'", False),
    ("null == 0", True), ("null == null", True), ("null == false", True), ("null == ''", True),
    ("true == 1", True), ("false == 0", True), ("true == 2", False), ("'' == 0", True),
    ("' 1 ' == 1", True), ("'0x10' == 16", True), ("'1e2' == 100", True), ("'abc' == 0", False),
    ("'true' == true", False), ("'1' == true", True),
    ("NaN == NaN", False), ("NaN != NaN", True), ("NaN < 1", False), ("NaN >= NaN", False),
    ("'abc' == NaN", False), ("fromJSON('[]') == fromJSON('[]')", False),
    ("github.event == github.event", True), ("fromJSON('{}') == 0", False),
    ("fromJSON('[]') == ''", False), ("fromJSON('{}') == fromJSON('{}')", False),
    ("1 < 2", True), ("2 <= 2", True), ("3 > 2", True), ("2 >= 3", False),
    ("'a' < 'b'", True), ("'B' > 'a'", True), ("'abc' <= 'ABC'", True), ("1 < '2'", True),
    ("null < 1", True), ("'abc' < 1", False), ("'abc' >= 1", False), ("true > false", True),
    ("false >= false", True), ("1 < 2 == true", True), ("matrix.node >= 18", True),
    ("steps.demo.outputs.n > 3", True), ("fromJSON(env.time) == 3", True),
    # && and || give an operand, like JavaScript
    ("'a' && 'b'", "b"), ("'' && 'b'", ""), ("null && 'b'", None), ("0 && github", 0),
    ("'a' || 'b'", "a"), ("null || 'x'", "x"), ("0 || ''", ""), ("false || null", None),
    ("github.ref == 'refs/heads/main' && 'value_for_main_branch' || 'value_for_other_branches'",
     "value_for_main_branch"),
    ("github.ref == 'refs/heads/dev' && 'value_for_main_branch' || 'value_for_other_branches'",
     "value_for_other_branches"),
    ("1 || 0 && 0", 1), ("(1 || 0) && 0", 0), ("!1 == false", True),
    # Truthiness: false, 0, -0, '', null, NaN are falsy
    ("!false", True), ("!0", True), ("!-0", True), ("!''", True), ("!null", True),
    ("!NaN", True), ("!'0'", False), ("!'false'", False), ("!fromJSON('[]')", False),
    ("!fromJSON('{}')", False), ("!env.EMPTY", True), ("!!github", True),
    # Object filters (the page's examples)
    ("fruits.*.name", ["apple", "orange", "pear"]), ("fruits[*].quantity", [1, 2, 1]),
    ("vegetables.*.ediblePortions", [["roots", "stalks"], ["roots", "stems", "leaves"],
                                     ["hearts", "stems", "leaves"]]),
    ("vegetables.*.ediblePortions.*",
     ["roots", "stalks", "roots", "stems", "leaves", "hearts", "stems", "leaves"]),
    ("vegetables.*.ediblePortions[0]", ["roots", "roots", "hearts"]),
    ("vegetables.*.nope", []), ("fruits.*", FRUITS), ("nothing.*", []), ("fruits.*[0]", []),
    ("github.event.issue.labels.*.name", ["bug", "help wanted"]),
    ("contains(vegetables.*.ediblePortions.*, 'STEMS')", True),
    # contains
    ("contains('Hello world', 'llo')", True), ("contains('Hello world', 'LLO')", True),
    ("contains('Hello world', 'xyz')", False), ("contains('abc', '')", True),
    ("contains(github.event.issue.labels.*.name, 'bug')", True),
    ("contains(github.event.issue.labels.*.name, 'Help Wanted')", True),
    ("contains(github.event.issue.labels.*.name, 'help')", False),
    ("contains(fromJSON('[\"push\", \"pull_request\"]'), github.event_name)", True),
    ("contains(fromJSON('[1, 2]'), '1')", True), ("contains(fromJSON('[]'), null)", False),
    ("contains(fromJSON('{\"a\": 1}'), 'a')", False), ("contains(123, 2)", True),
    ("contains(true, 'ru')", True), ("contains('abc', fromJSON('[]'))", False),
    # startsWith, endsWith
    ("startsWith('Hello world', 'He')", True), ("startsWith('Hello world', 'he')", True),
    ("startsWith('Hello world', 'world')", False), ("endsWith('Hello world', 'ld')", True),
    ("endsWith('Hello world', 'WORLD')", True), ("endsWith('Hello world', 'He')", False),
    ("startsWith(github.ref, 'refs/heads/')", True), ("startsWith(fromJSON('[]'), '')", False),
    ("startsWith(12.5, 12)", True),
    # format
    ("format('Hello {0} {1} {2}', 'Mona', 'the', 'Octocat')", "Hello Mona the Octocat"),
    ("format('{{Hello {0} {1} {2}!}}', 'Mona', 'the', 'Octocat')", "{Hello Mona the Octocat!}"),
    ("format('{0}{0}{1}', 'a', 'b')", "aab"), ("format('plain')", "plain"),
    ("format('{{}}')", "{}"), ("format('{0} {1} {2} {3}', null, true, 1.50, 0xff)",
                               " true 1.5 255"),
    ("format('{0}', fromJSON('[1]'))", "Array"), ("format('{0}', github)", "Object"),
    ("format('{0:}', 'x')", "x"), ("format('{00}', 'x')", "x"),
    # join
    ("join(github.event.issue.labels.*.name, ', ')", "bug, help wanted"),
    ("join(fromJSON('[\"a\", \"b\"]'))", "a,b"), ("join(fromJSON('[1, true, null]'), '-')",
                                                  "1-true-"),
    ("join('abc', '-')", "abc"), ("join(fromJSON('[]'))", ""), ("join(fromJSON('{}'))", ""),
    ("join(fruits.*.name, fromJSON('[]'))", "apple,orange,pear"), ("join(null)", ""),
    # toJSON and fromJSON
    ("toJSON(fromJSON('{\"a\": [1, 2], \"b\": {}, \"c\": []}'))",
     '{\n  "a": [\n    1,\n    2\n  ],\n  "b": {},\n  "c": []\n}'),
    ("toJSON('x')", '"x"'), ("toJSON(null)", "null"), ("toJSON(true)", "true"),
    ("toJSON(1.0)", "1"), ("toJSON(1e20)", "1E+20"), ("toJSON('a\"b\\c')", '"a\\"b\\\\c"'),
    ("toJSON(fruits[0])", '{\n  "name": "apple",\n  "quantity": 1\n}'),
    ("fromJSON('true')", True), ("fromJSON('10')", 10), ("fromJSON(' [1] ')[0]", 1),
    ("fromJSON('null')", None), ("fromJSON(env.continue)", True),
    ("fromJSON(toJSON(fruits))[2].NAME", "pear"),
    # case
    ("case(true, 'a', 'b')", "a"), ("case(false, 'a', 'b')", "b"),
    ("case(1 == 2, 'x', github.ref == 'refs/heads/main', 'main', 'other')", "main"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_evaluate(text, expected):
    got = ev(text)
    assert got == expected
    assert type(got) is type(expected) or isinstance(expected, (list, float))


def test_negative_zero_and_nan():
    assert math.copysign(1.0, ev("-0")) == -1.0
    assert math.isnan(ev("NaN"))


@pytest.mark.parametrize(("text", "expected"), [
    ("${{ 711 }}", "711"), ("${{ -9.2 }}", "-9.2"), ("${{ 0xff }}", "255"),
    ("${{ -2.99e-2 }}", "-0.0299"), ("${{ 1e15 }}", "1E+15"), ("${{ 1e-5 }}", "1E-05"),
    ("${{ 123456789012345 }}", "123456789012345"), ("${{ 0.1 }}", "0.1"),
    ("${{ 1.0 }}", "1"), ("${{ 2.50 }}", "2.5"),
    ("${{ github.run_id }}", "12345678901"), ("${{ matrix.node }}", "20"),
    ("${{ null }}", ""), ("${{ nothing }}", ""), ("${{ true }}", "true"),
    ("${{ false }}", "false"), ("${{ NaN }}", "NaN"), ("${{ Infinity }}", "Infinity"),
    ("${{ 'Mona' }}", "Mona"), ("${{ -0 }}", "0"), ("${{ -1.50 }}", "-1.5"), ("${{ fromJSON('{\"a\":1}') }}", '{\n  "a": 1\n}'),
    ("${{ fruits.*.quantity }}", "[\n  1,\n  2,\n  1\n]"), ("${{ fromJSON('[]') }}", "[]"),
    # several in one string, text around
    ("a${{ 1 }}b${{ 'x' }}c", "a1bxc"), ("${{1}}${{2}}", "12"),
    ("ref=${{ github.ref }}, os=${{ matrix.os }}!", "ref=refs/heads/main, os=ubuntu-latest!"),
    # }} inside string literals does not close the expression
    ("${{ '}}' }}", "}}"), ("x ${{ 'It''s }}' }} y", "x It's }} y"),
    ("${{ format('{{0}}') }}", "{0}"), ("${{ format('{0}}}', 'a') }}", "a}"),
    ("${{ 1 }}}", "1}"),
    # no expressions at all
    ("plain text", "plain text"), ("", ""), ("}} {{ $ { {", "}} {{ $ { {"), ("$ {{ 1 }}", "$ {{ 1 }}"),
    ("${ { 1 }}", "${ { 1 }}"),
])
def test_interpolate(text, expected):
    assert interpolate(text, contexts()) == expected


def test_interpolate_parses_everything_before_evaluating():
    calls = []
    with pytest.raises(ExpressionError, match="unexpected symbol"):
        interpolate("${{ hashFiles('a') }} ${{ 1 2 }}", contexts(),
                    functions={"hashFiles": lambda *a: calls.append(a)})
    assert calls == []


@pytest.mark.parametrize(("text", "problem"), [
    ("${{ 1 ", "not closed"), ("a ${{ '}}", "not closed"), ("${{ }}", "an expression was expected"),
    ("${{}}", "an expression was expected"), ("${{ nope }}", "unrecognized named-value 'nope'"),
    ("${{ 1 ) }}", "unexpected symbol ')'"),
])
def test_interpolate_errors(text, problem):
    with pytest.raises(ExpressionError) as exc:
        interpolate(text, contexts())
    assert problem in str(exc.value) and "\n" not in str(exc.value)


def test_functions_from_the_caller():
    hashes = []

    def hash_files(*patterns):
        hashes.append(patterns)
        return "abc123"

    functions = {"hashFiles": hash_files, "success": lambda: True, "Double": lambda x: x * 2}
    assert ev("format('{0}-{1}', matrix.os, hashFiles('**/package-lock.json', '!x'))",
              functions=functions) == "ubuntu-latest-abc123"
    assert hashes == [("**/package-lock.json", "!x")]
    assert ev("HASHFILES('a') == 'ABC123'", functions=functions) is True
    assert hashes[1:] == [("a",)]
    assert ev("success() && 'ran'", functions=functions) == "ran"
    assert ev("double(21)", functions=functions) == 42
    assert ev("join(fruits.*.name)", functions={"join": lambda a, s=",": "mine"}) == "mine"
    # format() evaluates only the arguments it uses, as the runner does
    assert ev("format('x', hashFiles('a'))", functions=functions) == "x"
    assert len(hashes) == 2


@pytest.mark.parametrize(("text", "problem"), [
    ("hashFiles('**/*.lock')", "hashFiles is only available in steps"),
    ("success()", r"success\(\) is only available in if: conditions"),
    ("false && always()", r"always\(\) is only available"),  # checked before evaluating
    ("nope", "unrecognized named-value 'nope'"), ("false && nope.x", "named-value 'nope'"),
    ("format('{0}')", "references more arguments than were supplied"),
    ("format('{1}', 'a')", "references more arguments"), ("format('{0', 1)", "is invalid"),
    ("format('}', 1)", "is invalid"), ("format('{', 1)", "is invalid"),
    ("format('{x}', 1)", "is invalid"), ("format('{256}', 1)", "is invalid"),
    ("format('{0:x}', 1)", "format specifiers 'x' are not valid for a number"),
    ("fromJSON('')", "fromJSON cannot read ''"), ("fromJSON('{')", "fromJSON cannot read"),
    ("fromJSON('[' + ']')", "unexpected symbol"), ("fromJSON(' ')", "fromJSON cannot read"),
    ("case('yes', 1, 2)", "case\\(\\) predicates must be true or false, not a string"),
    ("fromJSON(format('{0}{1}', join(fromJSON('[1]')), 'x'))", "fromJSON cannot read '1x'"),
])
def test_evaluation_errors(text, problem):
    with pytest.raises(ExpressionError, match=problem) as exc:
        ev(text)
    assert "\n" not in str(exc.value)


SYNTAX_ERRORS = [
    ("(1", "unexpected end of expression", 2), ("((github.ref)", "unexpected end of expression after ')'", 13),
    ("1)", "unexpected symbol ')'", 2), ("github.ref)", "unexpected symbol ')'", 11),
    ("()", "unexpected symbol ')'", 2),
    ("foo(1)", "unrecognized function 'foo'", 1), ("github.ref && bar()", "unrecognized function",
                                                   15),
    ("github(1)", "unrecognized function 'github'", 1),
    ("1 ==", "unexpected end of expression", 3), ("&& 1", "unexpected symbol '&&'", 1),
    ("1 = 1", "unexpected symbol '='", 3), ("1 & 1", "unexpected symbol '&'", 3),
    ("1 | 1", "unexpected symbol '|'", 3), ("github github", "unexpected symbol 'github'", 8),
    ("1 2", "unexpected symbol '2'", 3), ("'unterminated", "unclosed string", 1),
    ('"double quotes"', "unexpected symbol '\"double'", 1), ("1.2.3", "'1.2.3'", 1),
    ("12abc", "'12abc'", 1), ("#", "'#'", 1), ("github.", "unexpected end", 7),
    ("github..ref", "unexpected symbol '.'", 8), ("github.0", "unexpected symbol '0'", 8),
    ("github[", "unexpected end", 7), ("github[0", "unexpected end", 8),
    ("github[]", "unexpected symbol ']'", 8), ("format('x',)", "unexpected symbol ')'", 12),
    ("format(,)", "unexpected symbol ','", 8), ("'a'.b", "unexpected symbol '.'", 4),
    ("'a'[0]", "unexpected symbol '['", 4), ("1.x", "'1.x'", 1), ("true(1)", "'('", 5),
    ("github.*x", "unexpected symbol 'x'", 9), ("*", "unexpected symbol '*'", 1),
    ("github[*x]", "unexpected symbol 'x'", 9), ("!", "unexpected end", 1),
    ("contains('a')", "too few arguments to contains(): it takes 2", 1),
    ("contains('a', 'b', 'c')", "too many arguments", 1), ("success(1)", "too many", 1),
    ("toJSON()", "too few arguments to toJSON()", 1), ("join()", "at least 1", 1),
    ("case(true, 1)", "at least 3", 1), ("case(true, 1, false, 2)", "odd number", 1),
    ("${{ 1 }}", "unexpected symbol '${{'", 1), ("github.ref\n==", "unexpected end", 12),
    ("-0xFF", "unexpected symbol '-0xFF'", 1), ("0x01p2", "'0x01p2'", 1), ("-Inf", "'-Inf'", 1),
    ("1 @abc 2", "'@abc'", 3), ("\U0001f60a Emoji!!", "unexpected symbol '\U0001f60a'", 1),
    ("1 =2 =3", "unexpected symbol '=2'", 3), (".github/workflow.md", "'.github/workflow.md'", 1),
    ("github/workflow.md", "'github/workflow'", 1),
]


@pytest.mark.parametrize(("text", "problem", "position"), SYNTAX_ERRORS)
def test_syntax_errors(text, problem, position):
    with pytest.raises(ExpressionError) as exc:
        parse(text)
    error = exc.value
    assert problem in str(error)
    assert isinstance(error, ConfigError)
    assert error.expression == text and error.position == position
    message = str(error)
    assert "\n" not in message and message.startswith(f"invalid expression {text!r}: ")
    if position is not None:
        assert message.endswith(f" at position {position}")
    with pytest.raises(ExpressionError):
        ev(text)


def test_the_error_is_public_and_a_config_error():
    assert pinnace.ExpressionError is ExpressionError
    assert issubclass(ExpressionError, ConfigError)
    error = ExpressionError("x" * 500, "bad")
    assert len(str(error)) < 250 and error.expression == "x" * 500


def test_parse_tree():
    assert parse("a.b[0] && !c || d == 'x'") == Logical("||", (
        Logical("&&", (Index(Index(NamedValue("a"), Literal("b")), Literal(0)),
                       Not(NamedValue("c")))),
        Compare("==", NamedValue("d"), Literal("x"))))
    assert parse("a && b && (c && d)") == Logical("&&", tuple(
        NamedValue(n) for n in "abcd"))
    assert parse("fromJSON('[]').*[*]") == Index(Index(
        Call("fromJSON", (Literal("[]"),)), Wildcard()), Wildcard())
    assert parse("steps.my-step.outputs.true") == Index(Index(Index(
        NamedValue("steps"), Literal("my-step")), Literal("outputs")), Literal("true"))
    assert parse("myFn(1)", functions=["MYFN"]) == Call("myFn", (Literal(1),))


def test_limits():
    assert ev("(" * 60 + "1" + ")" * 60) == 1  # groups are no tree nodes on GitHub either
    assert ev("!" * 49 + "true") is False  # 50 levels, the leaf counted
    with pytest.raises(ExpressionError, match="exceeded max expression depth 50"):
        ev("!" * 50 + "true")
    with pytest.raises(ExpressionError, match="exceeded max expression depth 50"):
        ev("github" + ".a" * 50)
    with pytest.raises(ExpressionError, match="nested more than 100 deep"):
        ev("(" * 5000 + "1" + ")" * 5000)
    with pytest.raises(ExpressionError, match=f"exceeded max expression length {MAX_LENGTH}"):
        ev("'" + "x" * MAX_LENGTH + "'")
    with pytest.raises(ExpressionError, match="fromJSON cannot read"):
        ev("fromJSON('" + "[" * 5000 + "')")
    nested: dict = {}
    nested["self"] = nested
    with pytest.raises(ExpressionError, match="nested too deeply"):
        evaluate("toJSON(x)", {"x": nested})
    # toJSON of toJSON doubles the backslashes each time: a cap, not a hang
    with pytest.raises(ExpressionError, match="a result of more than"):
        ev("toJSON(" * 45 + "'\"'" + ")" * 45)


class Status:
    def __init__(self, **answers):
        self.answers = {"success": True, "failure": False, "always": True, "cancelled": False}
        self.answers.update(answers)
        self.asked = []

    def __call__(self, name):
        self.asked.append(name)
        return self.answers[name]


PASSED = {}
FAILED = {"success": False, "failure": True}
CANCELLED = {"success": False, "cancelled": True}


@pytest.mark.parametrize(("text", "answers", "expected"), [
    # empty or missing: success()
    ("", PASSED, True), ("", FAILED, False), (None, FAILED, False), ("  ", PASSED, True),
    # no status function: success() && (...)
    ("true", PASSED, True), ("true", FAILED, False), ("${{ true }}", FAILED, False),
    ("github.ref == 'refs/heads/main'", PASSED, True),
    ("github.ref == 'refs/heads/main'", FAILED, False),
    ("${{ github.ref == 'refs/heads/dev' }}", PASSED, False),
    ("${{ ! startsWith(github.ref, 'refs/tags/') }}", PASSED, True),
    ("github.event_name == 'push' || true", CANCELLED, False),
    # a status function anywhere: no implicit success()
    ("always()", FAILED, True), ("${{ always() }}", CANCELLED, True), ("Always()", FAILED, True),
    ("failure()", FAILED, True), ("failure()", PASSED, False), ("cancelled()", CANCELLED, True),
    ("success()", FAILED, False), ("!cancelled()", FAILED, True),
    ("failure() && steps.demo.conclusion == 'failure'", FAILED, True),
    ("always() && github.ref == 'refs/heads/dev'", PASSED, False),
    ("github.ref == 'refs/heads/main' || always()", CANCELLED, True),
    ("${{ success() || failure() }}", FAILED, True),
    # the value's truthiness decides
    ("'non-empty'", PASSED, True), ("0", PASSED, False), ("env.EMPTY", PASSED, False),
    ("steps.demo.outputs.n", PASSED, True),
    # text around ${{ }} makes a string (GitHub's format()), truthy unless empty
    ("${{ false }} && true", PASSED, True), ("${{ false }} && true", FAILED, False),
    ("${{ always() }} or not", FAILED, True),
    # ${{ 'text' }} is read as the condition's text
    ("${{ 'failure()' }}", FAILED, True), ("${{ 'failure()' }}", PASSED, False),
    ("${{ '' }}", FAILED, False),
])
def test_condition(text, answers, expected):
    status = Status(**answers)
    assert condition(text, contexts(), status=status) is expected


def test_condition_asks_status_only_as_needed():
    status = Status(success=False)
    assert condition("github.ref == 'x'", contexts(), status=status) is False
    assert status.asked == ["success"]  # && stops at the first falsy operand
    status = Status()
    assert condition("always() || failure()", contexts(), status=status) is True
    assert status.asked == ["always"]


def test_condition_takes_hash_files():
    assert condition("hashFiles('x') != ''", contexts(), status=Status(),
                     functions={"hashFiles": lambda *p: "h"}) is True
    with pytest.raises(ExpressionError, match="hashFiles is only available in steps"):
        condition("hashFiles('x') != ''", contexts(), status=Status())


@pytest.mark.parametrize("text", ["github.", "${{ 1 ", "${{ }}", "a ${{ ) }} b", "x == "])
def test_condition_errors(text):
    with pytest.raises(ExpressionError):
        condition(text, contexts(), status=Status())


# Random text: nothing but ExpressionError ever comes out.

TOKENS = ["github", "env", "matrix", "fruits", "vegetables", "nothing", "nope", ".", "*", "[",
          "]", "(", ")", ",", "!", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "null", "true",
          "false", "NaN", "Infinity", "0", "1", "-1.5", "0xff", "1e400", "'a'", "'{0}'", "''",
          "'{'", "'['", "'}}'", "contains", "startsWith", "endsWith", "format", "join",
          "toJSON", "fromJSON", "case", "hashFiles", "success", "always", "ref", "event",
          "name", "'${{'", "${{", "}}", "=", "&", "'x", "\"", "\n", " "]


def check_only_expression_errors(text):
    for run in (lambda: ev(text), lambda: interpolate(text, contexts()),
                lambda: interpolate("${{ " + text + " }}", contexts()),
                lambda: condition(text, contexts(), status=Status())):
        try:
            run()
        except ExpressionError as e:
            assert "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=14).map("".join))
def test_token_soup_raises_only_expression_errors(text):
    check_only_expression_errors(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=14).map(" ".join))
def test_spaced_token_soup_raises_only_expression_errors(text):
    check_only_expression_errors(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_random_text_raises_only_expression_errors(text):
    check_only_expression_errors(text)
