"""The testinfra backend's own layer, with a fake machine: specs, registration, how a
command is built (sudo included) and what comes back. Real guests: tests/guest."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import testinfra
import testinfra.backend
import testinfra.host

import pinnace.testinfra as pt
from pinnace.agent.client import ExecResult
from pinnace.errors import CommandFailed, ConfigError, NotFoundError, StateError


class FakeMachine:
    """Records what the backend asks of Machine.exec; answers from ``reply``."""

    def __init__(self, name: str = "web", reply=None, error: Exception | None = None):
        self.name = name
        self.calls: list[dict] = []
        self.reply = reply or (lambda argv: ExecResult(argv=argv, exit_code=0, stdout=b"ok\n"))
        self.error = error

    def exec(self, argv, *, input=None, timeout=60.0, env=None, cwd=None, user=None):
        self.calls.append({"argv": list(argv), "timeout": timeout, "user": user,
                           "input": input, "env": env, "cwd": cwd})
        if self.error is not None:
            raise self.error
        return self.reply(list(argv))


class FakeMachines:
    def __init__(self, machines):
        self.machines = {m.name: m for m in machines}
        self.asked: list[str] = []

    def get(self, name):
        self.asked.append(name)
        if name not in self.machines:
            raise NotFoundError("machine", name, "see 'pinnace ls'")
        return self.machines[name]


class FakePinnace:
    def __init__(self, *machines):
        self.machines = FakeMachines(machines)


def backend(spec: str, **kwargs) -> pt.PinnaceBackend:
    b = testinfra.backend.get_backend(spec, **kwargs)
    assert isinstance(b, pt.PinnaceBackend)
    return b


# -- specs ------------------------------------------------------------------------------


def test_plain_spec():
    m = FakeMachine()
    b = backend("pinnace://web", machine=m)
    assert (b.name, b.user, b.sudo, b.sudo_user) == ("web", None, False, None)
    assert b.timeout == pt.DEFAULT_TIMEOUT == 60.0
    assert b.get_connection_type() == "pinnace"
    assert b.get_hostname() == "web"
    assert b.get_pytest_id() == "pinnace://web"
    b.run("true")
    assert m.calls[0]["user"] is None and m.calls[0]["timeout"] == 60.0


def test_user_spec():
    m = FakeMachine()
    b = backend("pinnace://alice@web", machine=m)
    assert (b.name, b.user) == ("web", "alice")
    assert b.get_pytest_id() == "pinnace://alice@web"
    b.run("whoami")
    assert m.calls == [{"argv": ["/bin/sh", "-c", "whoami"], "timeout": 60.0, "user": "alice",
                        "input": None, "env": None, "cwd": None}]


def test_query_options():
    m = FakeMachine()
    b = backend("pinnace://web?sudo=true&sudo_user=bob&timeout=5", machine=m)
    assert (b.name, b.sudo, b.sudo_user, b.timeout) == ("web", True, "bob", 5.0)
    b.run("id -u")
    assert m.calls[0]["argv"] == ["/bin/sh", "-c", "sudo -u bob /bin/sh -c 'id -u'"]
    assert m.calls[0]["timeout"] == 5.0


def test_keyword_options_as_get_host_passes_them():
    m = FakeMachine()
    b = backend("pinnace://web", machine=m, sudo=True, timeout=2.5)
    assert b.sudo and b.sudo_user is None and b.timeout == 2.5
    b.run("whoami")
    assert m.calls[0]["argv"][2] == "sudo /bin/sh -c whoami"


@pytest.mark.parametrize("timeout", ["0", "-1", "soon", "nan", "inf"])
def test_bad_timeout(timeout):
    with pytest.raises(ConfigError, match="timeout"):
        backend(f"pinnace://web?timeout={timeout}", machine=FakeMachine())


@pytest.mark.parametrize("spec", ["pinnace://", "pinnace://@web", "pinnace://alice@"])
def test_bad_spec(spec):
    with pytest.raises(ConfigError, match="pinnace://NAME"):
        backend(spec)


def test_machine_of_another_name():
    with pytest.raises(ConfigError, match="'db'"):
        backend("pinnace://web", machine=FakeMachine("db"))


# -- registration -----------------------------------------------------------------------


def test_registered_on_import_and_idempotent():
    assert testinfra.backend.BACKENDS["pinnace"] == "pinnace.testinfra.PinnaceBackend"
    before = dict(testinfra.backend.BACKENDS)
    pt.register()
    pt.register()
    assert testinfra.backend.BACKENDS == before
    assert testinfra.backend.get_backend_class("pinnace") is pt.PinnaceBackend


def test_registration_in_a_fresh_interpreter():
    code = ("import testinfra.backend as b; assert 'pinnace' not in b.BACKENDS; "
            "import pinnace.testinfra; "
            "assert b.BACKENDS['pinnace'] == 'pinnace.testinfra.PinnaceBackend'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pinnace_and_its_cli_do_not_import_testinfra():
    code = ("import importlib, pkgutil, sys, pinnace, pinnace.cli\n"
            "for m in pkgutil.iter_modules(pinnace.cli.__path__):\n"
            "    if m.name != '__main__':\n        importlib.import_module('pinnace.cli.' + m.name)\n"
            "from pinnace import Pinnace, errors\n"
            "bad = sorted(n for n in sys.modules if n == 'testinfra' or n.startswith("
            "('testinfra.', 'pinnace.testinfra')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- commands ---------------------------------------------------------------------------


def test_run_builds_through_get_command_and_quotes_args():
    m = FakeMachine()
    b = backend("pinnace://web", machine=m)
    out = b.run("ls -l -- %s", "/;echo inject")
    assert m.calls[0]["argv"] == ["/bin/sh", "-c", "ls -l -- '/;echo inject'"]
    assert out.command == b"ls -l -- '/;echo inject'"

    seen = []
    b.get_command = lambda command, *args: seen.append((command, args)) or "swapped"
    b.run("echo %s", "x")
    assert seen == [("echo %s", ("x",))]
    assert m.calls[-1]["argv"] == ["/bin/sh", "-c", "swapped"]


def test_sudo_context_wraps_the_command():
    m = FakeMachine()
    host = pt.host_for(m)
    with host.sudo():
        host.run("whoami")
        with host.sudo("nobody"):
            host.run("echo %s", "a b")
        host.run("id")
    host.run("whoami")
    nested = f"sudo -u nobody /bin/sh -c {shlex.quote(shlex.quote('a b').join(['echo ', '']))}"
    assert [c["argv"][2] for c in m.calls] == [
        "sudo /bin/sh -c whoami",
        f"sudo /bin/sh -c {shlex.quote(nested)}",
        "sudo /bin/sh -c id",
        "whoami",
    ]
    assert all(c["argv"][:2] == ["/bin/sh", "-c"] and c["user"] is None for c in m.calls)


def test_outputs_are_the_guests_bytes():
    raw_out, raw_err = b"\xff\xfe not utf-8 \x00\n", b"\x80err"
    m = FakeMachine(reply=lambda argv: (
        ExecResult(argv=argv, exit_code=0, stdout=b"UTF-8\n") if "locale" in argv[2]
        else ExecResult(argv=argv, exit_code=3, stdout=raw_out, stderr=raw_err)))
    host = pt.host_for(m)
    out = host.run("anything")
    assert (out.rc, out.stdout_bytes, out.stderr_bytes) == (3, raw_out, raw_err)
    assert out.failed and not out.succeeded
    with pytest.raises(UnicodeDecodeError):
        out.stdout  # noqa: B018  (testinfra decodes with the guest's encoding: UTF-8)


def test_check_output_and_rc():
    m = FakeMachine(reply=lambda argv: ExecResult(argv=argv, exit_code=0, stdout=b"root\n"))
    host = pt.host_for(m)
    assert host.check_output("whoami") == "root"
    m.reply = lambda argv: ExecResult(argv=argv, exit_code=1, stderr=b"nope\n")
    out = host.run("false")
    assert (out.rc, out.stdout, out.stderr) == (1, "", "nope\n")
    with pytest.raises(AssertionError):
        host.check_output("false")


def test_timed_out_command_raises():
    m = FakeMachine(reply=lambda argv: ExecResult(argv=argv, exit_code=137, signal=9,
                                                  timed_out=True))
    b = backend("pinnace://web?timeout=3", machine=m)
    with pytest.raises(CommandFailed, match=r"killed after 3 s; pinnace://web\?timeout="):
        b.run("sleep 10")


def test_not_running_names_the_fix():
    m = FakeMachine(error=StateError("web", "reach the guest agent of", "stopped",
                                     ["ready", "running"]))
    with pytest.raises(StateError, match="pinnace start web") as info:
        pt.host_for(m).run("true")
    assert info.value.state == "stopped" and "\n" not in str(info.value)
    m.error = StateError("web", "reach the guest agent of", "paused", ["ready", "running"])
    with pytest.raises(StateError, match="pinnace resume web"):
        pt.host_for(m).run("true")


def test_machine_deleted_under_a_handle():
    m = FakeMachine(error=NotFoundError("machine", "web", "see 'pinnace ls'"))
    with pytest.raises(NotFoundError, match="pinnace ls"):
        pt.host_for(m).run("true")


# -- which machine ----------------------------------------------------------------------


def test_looked_up_by_name_once_through_the_client():
    m = FakeMachine()
    client = FakePinnace(m)
    b = backend("pinnace://web", pinnace=client)
    assert client.machines.asked == []  # lazily
    b.run("true")
    b.run("true")
    assert client.machines.asked == ["web"] and len(m.calls) == 2


def test_no_such_machine():
    b = backend("pinnace://ghost", pinnace=FakePinnace())
    with pytest.raises(NotFoundError, match=r"no machine named 'ghost'; see 'pinnace ls'"):
        b.run("true")


def test_default_client_from_pinnace_home(monkeypatch, tmp_path):
    import pinnace.client

    made = []

    class Client(FakePinnace):
        def __init__(self, home):
            super().__init__(FakeMachine())
            made.append(home)

        def close(self):
            pass

    monkeypatch.setattr(pinnace.client, "Pinnace", Client)
    monkeypatch.setattr(pt, "_clients", {})
    monkeypatch.setenv("PINNACE_HOME", str(tmp_path / "a"))
    backend("pinnace://web").run("true")
    backend("pinnace://web").run("true")
    monkeypatch.setenv("PINNACE_HOME", str(tmp_path / "b"))
    backend("pinnace://web").run("true")
    assert made == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_host_for_is_fresh_and_not_cached():
    m = FakeMachine()
    cached = dict(testinfra.host.Host._host_cache)
    h1, h2 = pt.host_for(m), pt.host_for(m)
    assert h1 is not h2 and h1.backend is not h2.backend
    assert h1.backend._host is h1
    assert testinfra.host.Host._host_cache == cached
    hu = pt.host_for(m, user="alice", sudo=True)
    assert (hu.backend.user, hu.backend.sudo) == ("alice", True)
    assert repr(hu) == "<testinfra.host.Host pinnace://alice@web>"
