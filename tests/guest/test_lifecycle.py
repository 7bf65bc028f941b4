"""Real guests under QEMU: lifecycle, failures told apart, store left intact."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pinnace import (
    AlreadyExistsError,
    BootTimeout,
    ConfigError,
    MachineCrashed,
    MachineState,
    NotFoundError,
    StateError,
)


def test_create_start_exec_stop_start_delete(pn, make_machine):
    m = make_machine(memory="384M")
    assert m.status().state == MachineState.CREATED
    st = m.start()
    assert st.state == MachineState.READY and st.pid
    r = m.exec(["uname", "-r"])
    assert r.exit_code == 0
    assert r.stdout_text.strip() == pn.images.get("default").manifest["kernel_version"]
    assert m.exec(["hostname"]).stdout_text.strip() == m.name
    m.exec("echo kept > /root/file && sync")
    with pytest.raises(StateError) as exc:
        m.start()
    assert exc.value.state == "ready" and "stopped" in exc.value.allowed
    with pytest.raises(StateError):
        m.configure(cpus=2)
    st = m.stop()
    assert st.state == MachineState.STOPPED
    assert not any(p.name.endswith(".sock") for p in m.path.iterdir())
    m.configure(cpus=2)
    m.start()
    assert m.exec("nproc").stdout_text.strip() == "2"
    assert m.exec(["cat", "/root/file"]).stdout_text == "kept\n"
    m.delete(force=True)
    assert not m.path.exists()


def test_exec_exit_codes_and_streams(machine):
    r = machine.exec("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    r = machine.exec(["cat"], input=b"round trip")
    assert r.stdout == b"round trip"
    r = machine.exec(["sleep", "30"], timeout=1)
    assert r.timed_out and r.signal == signal.SIGKILL
    r = machine.exec("kill -TERM $$")
    assert r.signal == signal.SIGTERM and r.exit_code == 128 + signal.SIGTERM


def test_kill_9_of_qemu_shows_failed_not_running(machine, pn):
    pid = machine.status().pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while machine.status().state == MachineState.READY and time.monotonic() < deadline:
        time.sleep(0.05)
    st = machine.status()
    assert st.state == MachineState.FAILED
    assert "SIGKILL" in st.reason
    listed = {s.name: s for s in pn.machines.list()}
    assert listed[machine.name].state == MachineState.FAILED
    machine.start()  # a failed machine can be started again
    assert machine.exec("true").ok


def test_hung_init_hits_boot_timeout_with_serial_tail(make_machine):
    # An init that says so and sleeps, never starting the agent: a boot that hangs.
    m = make_machine(cmdline='init=/bin/sh -- -c "echo hung-init; exec sleep 1000"',
                     boot_timeout=8)
    t0 = time.monotonic()
    with pytest.raises(BootTimeout) as exc:
        m.start()
    assert 8 <= time.monotonic() - t0 < 30
    assert "hung-init" in exc.value.log_tail
    assert "within 8 s" in str(exc.value)
    st = m.status()
    assert st.state == MachineState.FAILED and "timed out" in st.reason
    assert st.pid is None


def test_crash_during_boot_is_not_a_timeout(make_machine):
    m = make_machine(cmdline="init=/does/not/exist", boot_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(MachineCrashed) as exc:
        m.start()
    assert time.monotonic() - t0 < 40
    assert "Kernel panic" in exc.value.log_tail
    assert m.status().state == MachineState.FAILED


def test_bad_input_changes_nothing(pn, machine):
    before = sorted(os.listdir(pn.store.machines_dir))
    with pytest.raises(AlreadyExistsError):
        pn.machines.create(machine.name)
    with pytest.raises(NotFoundError, match="image build"):
        pn.machines.create("noimage", image="no-such-image")
    with pytest.raises(ConfigError, match="memory"):
        pn.machines.create("badmem", memory="12")
    with pytest.raises(ConfigError, match="name"):
        pn.machines.create("../escape")
    assert sorted(os.listdir(pn.store.machines_dir)) == before
    assert machine.exec("true").ok  # the existing machine is untouched


def cli(*args, check=False, **kw):
    return subprocess.run([sys.executable, "-m", "pinnace.cli", *args], capture_output=True,
                          text=True, check=check, timeout=180, **kw)


def test_cli_exec_passes_exit_code_and_streams(machine):
    r = cli("exec", machine.name, "--", "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "hi\n", "oops\n")
    r = cli("exec", "-i", machine.name, "--", "tr", "a-z", "A-Z", input="shout\n")
    assert r.stdout == "SHOUT\n"
    r = cli("exec", machine.name, "--", "no-such-command")
    assert r.returncode == 127
    r = cli("ls", "--format", "json")
    assert any(m["name"] == machine.name and m["state"] == "ready"
               for m in __import__("json").loads(r.stdout))
    assert machine.name in cli("ls", "-q").stdout.split()


def test_cli_wrong_state_is_one_line(make_machine):
    m = make_machine()
    r = cli("stop", m.name)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert "it is created" in r.stderr and "cannot stop machine" in r.stderr and "that needs it to be" in r.stderr


def test_concurrent_starts_are_serialised(make_machine):
    m = make_machine()
    procs = [subprocess.Popen([sys.executable, "-m", "pinnace.cli", "start", m.name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=180)
        results.append((p.returncode, err))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "it is ready" in loser
    assert m.status().state == MachineState.READY
