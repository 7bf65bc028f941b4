import pytest
from click.testing import CliRunner

from pinnace.cli import main


def all_commands():
    out = []
    for name, cmd in main.commands.items():
        if hasattr(cmd, "commands"):
            out += [(f"{name} {sub}",) for sub in cmd.commands]
        else:
            out.append((name,))
    return out


@pytest.mark.parametrize(("verb",), all_commands())
def test_every_verb_has_help_with_an_example(verb):
    r = CliRunner().invoke(main, [*verb.split(), "--help"])
    assert r.exit_code == 0
    assert "Example" in r.output


def test_errors_are_one_line_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.setenv("PINNACE_HOME", str(tmp_path))
    runner = CliRunner()
    r = runner.invoke(main, ["create", "bad/name"])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "invalid machine name" in r.output
    r = runner.invoke(main, ["create", "vm1"])
    assert r.exit_code == 1 and "no image named 'default'" in r.output
    assert "pinnace image build" in r.output
    r = runner.invoke(main, ["start", "ghost"])
    assert r.exit_code == 1 and "no machine named 'ghost'" in r.output
    r = runner.invoke(main, ["ls", "--format", "json"])
    assert r.exit_code == 0 and r.output.strip() == "[]"
