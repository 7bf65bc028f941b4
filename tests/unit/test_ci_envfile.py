"""$GITHUB_ENV / $GITHUB_OUTPUT / $GITHUB_PATH as GitHub's runner reads them."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pinnace.ci.envfile import EnvFileError, parse, paths


def test_name_value_lines_and_the_last_one_wins():
    assert parse("A=1\nB=two words\n\nA=3\n") == {"A": "3", "B": "two words"}


def test_a_value_may_hold_equals_signs_and_be_empty():
    assert parse("URL=a=b==c\nEMPTY=\n") == {"URL": "a=b==c", "EMPTY": ""}


def test_the_multi_line_form():
    text = "JSON<<EOF\n{\n  \"a\": 1\n}\nEOF\nNEXT=x\n"
    assert parse(text) == {"JSON": '{\n  "a": 1\n}', "NEXT": "x"}


def test_a_delimiter_with_an_equals_after_it_is_still_a_heredoc():
    # '<<' before '=': the heredoc form (GitHub compares the positions).
    assert parse("X<<ghadelimiter_1=2\nv\nghadelimiter_1=2\n") == {"X": "v"}


def test_crlf_lines():
    assert parse("A=1\r\nB<<E\r\nl1\r\nE\r\n") == {"A": "1", "B": "l1"}


@pytest.mark.parametrize("text", ["JUST A LINE\n", "A<<EOF\nno end\n", "A<<\nx\n",
                                  "=value\n", "1BAD=x\n", "sp ace=x\n"])
def test_malformed_files_are_one_line_errors(text):
    with pytest.raises(EnvFileError) as exc:
        parse(text, "GITHUB_OUTPUT")
    assert "\n" not in str(exc.value) and "GITHUB_OUTPUT" in str(exc.value)


def test_paths_in_order():
    assert paths("/opt/a/bin\n\n  /b  \n") == ["/opt/a/bin", "/b"]


@given(st.text(max_size=300))
def test_anything_parses_or_is_an_env_file_error(text):
    try:
        parse(text)
    except EnvFileError:
        pass
