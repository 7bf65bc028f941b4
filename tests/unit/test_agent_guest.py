"""Pieces of the guest agent that run anywhere: who a command runs as, what a hostname
may be; and how the host puts a guest's kernel panic into words."""

from __future__ import annotations

import os
import pwd

import pytest

from pinnace.agent import guest
from pinnace.machine import panic_reason


def test_a_named_user_gets_its_groups_and_home():
    env: dict[str, str] = {"HOME": "/root"}
    ident = guest.as_user("nobody", env, {})
    nobody = pwd.getpwnam("nobody")
    assert ident == {"user": nobody.pw_uid, "group": nobody.pw_gid,
                     "extra_groups": os.getgrouplist("nobody", nobody.pw_gid)}
    assert env == {"HOME": nobody.pw_dir, "USER": "nobody", "LOGNAME": "nobody"}
    asked = {"HOME": "/srv"}
    env = dict(asked)
    guest.as_user("nobody", env, asked)
    assert env["HOME"] == "/srv"  # what the request set is kept


def test_a_uid_without_a_name_gets_its_own_group_only():
    env: dict[str, str] = {}
    assert guest.as_user("4000123", env, {}) == {"user": 4000123, "group": 4000123,
                                                 "extra_groups": []}
    assert env == {"HOME": "/"}
    assert guest.as_user("0", {}, {})["user"] == 0
    assert guest.as_user(None, {}, {}) == {}


@pytest.mark.parametrize("user", ["no-such-user", "²", "a\0b", "99999999999999999999"])
def test_an_unknown_user_is_a_bad_request(user):
    with pytest.raises(guest.RequestFailed, match="no user"):
        guest.as_user(user, {}, {})


@pytest.mark.parametrize(("name", "ok"), [
    ("web-1", True), ("a.b.c", True), ("x" * 64, True), ("x" * 65, False), ("", False),
    ("a b", False), ("a\nb", False), ("ünï", False), ("a/b", False), ("a_b", False),
])
def test_hostnames(name, ok):
    assert guest.is_hostname(name) is ok


CRASH = """[   12.3] sysrq: Trigger a crash
[   12.3] Kernel panic - not syncing: sysrq triggered crash
[   12.3] CPU: 0 PID: 77 Comm: sh Not tainted 6.1.0 #1
[   12.3] Call Trace:
[   12.4] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---
"""
OOM = """[    5.0] tail invoked oom-killer: gfp_mask=0x140cca
[    5.1] Out of memory: Killed process 90 (tail)
[    5.2] Kernel panic - not syncing: System is deadlocked on memory
[    5.2] ---[ end Kernel panic - not syncing: System is deadlocked on memory ]---
"""


def test_panic_reasons_in_one_line():
    assert panic_reason(CRASH) == "the guest kernel panicked: sysrq triggered crash"
    assert panic_reason(CRASH.splitlines()[-1]) == (
        "the guest kernel panicked: sysrq triggered crash")  # only the end marker left
    assert panic_reason(OOM) == ("the guest ran out of memory and its kernel panicked: "
                                 "System is deadlocked on memory")
    hostile = "Kernel panic - not syncing: \x1b[2J" + "A" * 500
    said = panic_reason(hostile)
    assert "\x1b" not in said and len(said) < 200


def test_under_systemd_commands_do_not_inherit_the_services_environment(monkeypatch):
    for name in ("INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID"):
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    guest.set_environment()
    assert not {"INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID"} & set(os.environ)
    assert os.environ["HOME"] == "/root" and os.environ["LANG"] == "de_DE.UTF-8"
    assert os.environ["PATH"].startswith("/usr/local/sbin:")


class _Done(Exception):
    pass


class _Kernel:
    """libc() as power() uses it: records the calls instead of making them."""

    def __init__(self):
        self.calls = []

    def mount(self, *args):
        self.calls.append("remount-ro")
        return 0

    def reboot(self, cmd):
        self.calls.append(hex(cmd))
        raise _Done


class _Ran:
    def __init__(self, code, stderr=b""):
        self.returncode, self.stderr = code, stderr


@pytest.mark.parametrize(("answer", "kernel_calls"), [
    (_Ran(0), []),  # systemd takes it from here
    (_Ran(1, b"Failed to connect to bus"), ["remount-ro", "0x4321fedc"]),
    (FileNotFoundError(2, "no systemctl"), ["remount-ro", "0x4321fedc"]),
])
def test_power_off_when_not_pid_1_asks_systemd_first(monkeypatch, answer, kernel_calls):
    import subprocess

    kernel = _Kernel()
    asked = []

    class FakeSubprocess:
        DEVNULL = subprocess.DEVNULL
        SubprocessError = subprocess.SubprocessError

        @staticmethod
        def run(argv, **kw):
            asked.append(argv)
            if isinstance(answer, BaseException):
                raise answer
            return answer

    monkeypatch.setattr(guest, "IS_INIT", False)
    monkeypatch.setattr(guest, "_subprocess", lambda: FakeSubprocess)
    monkeypatch.setattr(guest, "libc", lambda: kernel)
    monkeypatch.setattr(guest, "unmount_attached", lambda: ([], []))
    monkeypatch.setattr(guest.os, "sync", lambda: None)
    monkeypatch.setattr(guest.os, "kill", lambda *a: pytest.fail("not PID 1: kills nothing"))
    if kernel_calls:
        with pytest.raises(_Done):
            guest.power("poweroff")
    else:
        guest.power("poweroff")
    assert asked == [["systemctl", "--no-block", "poweroff"]]
    assert kernel.calls == kernel_calls


def test_files_collected_after_an_exec_are_regular_files_only_and_capped(tmp_path):
    import base64

    (tmp_path / "env").write_text("A=1\n")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "big").write_bytes(b"x" * (guest.COLLECT_BYTES + 10))
    os.mkfifo(tmp_path / "fifo")  # would block a plain open() forever
    (tmp_path / "link").symlink_to(tmp_path / "env")
    got = guest.collect_files([str(tmp_path / n) for n in
                               ("env", "empty", "big", "fifo", "link", "none")])
    assert got[0] == [4, base64.b64encode(b"A=1\n").decode()]
    assert got[1] == [0, ""]
    assert got[2][0] == guest.COLLECT_BYTES + 10
    assert len(base64.b64decode(got[2][1])) == guest.COLLECT_BYTES
    assert got[3:] == [[-1, ""], [-1, ""], [-1, ""]]


def test_what_the_host_takes_of_collected_files():
    from pinnace.agent.client import _collected

    assert _collected([[3, "YWJj"], [-1, ""]]) == [(3, b"abc"), (-1, b"")]
    assert _collected([[-7, ""]]) == [(-1, b"")]
    for bad in (None, "x", [[1]], [["1", "YQ=="]], [[True, "YQ=="]], [[1, "!!"]],
                [[1, "ü"]]):
        assert _collected(bad) is None, bad
