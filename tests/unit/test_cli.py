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


def test_image_build_passes_init_and_apt_ready(tmp_path, monkeypatch):
    from pinnace.images import Image, Images

    monkeypatch.setenv("PINNACE_HOME", str(tmp_path))
    calls = []

    def fake_build(self, name, packages, **kw):
        calls.append((name, packages, kw))
        return Image("ab" * 16, (name,), tmp_path, {})

    monkeypatch.setattr(Images, "build", fake_build)
    runner = CliRunner()
    r = runner.invoke(main, ["image", "build", "ci", "--init", "systemd", "--apt-ready",
                             "-p", "jq"])
    assert r.exit_code == 0, r.output
    name, packages, kw = calls.pop()
    assert (name, packages, kw["init"], kw["apt_ready"]) == ("ci", ("jq",), "systemd", True)
    r = runner.invoke(main, ["image", "build"])
    assert r.exit_code == 0, r.output
    name, packages, kw = calls.pop()
    assert (name, kw["init"], kw["apt_ready"]) == ("default", "agent", False)
    for bad, words in ((["--init", "upstart"], "'upstart' is not one of 'agent', 'systemd'"),
                       (["--init"], "requires an argument"),
                       (["--apt-ready=yes"], "does not take a value")):
        r = runner.invoke(main, ["image", "build", "x", *bad])
        assert r.exit_code == 2 and words in r.output, r.output
        assert r.output.strip().count("\n") == 0, r.output
    assert calls == []


def test_image_build_preset_is_given_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PINNACE_HOME", str(tmp_path))
    for extra in (["-p", "curl"], ["--init", "systemd"], ["--apt-ready"], ["mine"]):
        r = CliRunner().invoke(main, ["image", "build", "--preset", "ubuntu", *extra])
        assert r.exit_code == 2 and "give it alone" in r.output, (extra, r.output)
    r = CliRunner().invoke(main, ["image", "build", "--preset", "nope"])
    assert r.exit_code == 2 and "'nope' is not 'ubuntu'" in r.output
