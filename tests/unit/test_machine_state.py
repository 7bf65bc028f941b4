"""The state machine and reconciliation, on real files and real processes (no QEMU)."""

import asyncio
import json
import subprocess

import pytest

from pinnace import AsyncPinnace, MachineState, StateError
from pinnace.backends.qemu.process import proc_start_time
from pinnace.config import MachineConfig
from pinnace.store import write_json


def make(tmp_path, state, **fields):
    pn = AsyncPinnace(tmp_path)
    pn.store.ensure()
    files = pn.store.machine_files("m1")
    files.dir.mkdir()
    write_json(files.config, MachineConfig.build(name="m1").to_dict())
    write_json(files.state, {"state": state, "reason": "", **fields})
    return pn, files


def status(pn):
    async def go():
        return await (await pn.machines.get("m1")).status()

    return asyncio.run(go())


def test_live_process_keeps_its_state(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        pn, _ = make(tmp_path, "ready", pid=proc.pid, pid_start=proc_start_time(proc.pid))
        st = status(pn)
        assert st.state == MachineState.READY and st.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("exit_code", "serial", "state", "reason"), [
    ("137", "", MachineState.FAILED, "killed by SIGKILL"),
    ("1", "", MachineState.FAILED, "exit code 1"),
    ("0", "reboot: Power down", MachineState.STOPPED, "the guest powered off"),
    ("0", "Kernel panic - not syncing", MachineState.FAILED, "panicked"),
])
def test_dead_process_settles(tmp_path, exit_code, serial, state, reason):
    proc = subprocess.Popen(["true"])
    proc.wait()
    pn, files = make(tmp_path, "ready", pid=proc.pid, pid_start=1)
    files.exit_status.write_text(exit_code + "\n")
    files.serial_log.write_text(serial + "\n")
    st = status(pn)
    assert st.state == state and reason in st.reason
    assert st.pid is None
    recorded = json.loads(files.state.read_text())
    assert recorded["state"] == str(state)  # written back, so the next look agrees
    assert status(pn).state == state


def test_stopping_machine_that_died_is_stopped(tmp_path):
    pn, _ = make(tmp_path, "stopping", pid=999999999, pid_start=1)
    assert status(pn).state == MachineState.STOPPED


def test_damaged_state_is_broken_not_a_crash(tmp_path):
    pn, files = make(tmp_path, "ready")
    files.state.write_text("{not json")
    assert status(pn).state == MachineState.BROKEN
    (pn.store.machines_dir / "junk dir").mkdir()
    listed = asyncio.run(pn.machines.list())
    assert {s.name: s.state for s in listed} == {"junk dir": MachineState.BROKEN,
                                                   "m1": MachineState.BROKEN}


@pytest.mark.parametrize(("state", "action"), [
    ("created", "stop"), ("stopped", "halt"), ("created", "kill"), ("failed", "stop"),
])
def test_wrong_state_names_found_and_allowed(tmp_path, state, action):
    pn, _ = make(tmp_path, state)

    async def go():
        m = await pn.machines.get("m1")
        await getattr(m, action)()

    with pytest.raises(StateError) as exc:
        asyncio.run(go())
    assert exc.value.state == state
    assert "ready" in exc.value.allowed
    assert f"cannot {action} machine 'm1': it is {state}" in str(exc.value)


def test_configure_only_at_rest(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        pn, _ = make(tmp_path, "ready", pid=proc.pid, pid_start=proc_start_time(proc.pid))

        async def go():
            m = await pn.machines.get("m1")
            await m.configure(cpus=2)

        with pytest.raises(StateError, match=r"cannot configure machine .m1.: it is ready, and that needs it to be created or stopped"):
            asyncio.run(go())
    finally:
        proc.kill()
        proc.wait()
