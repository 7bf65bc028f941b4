"""Snapshots and clones against real guests: save/resume, clone isolation, the ready cache."""

import os
import subprocess
import sys
import time

import pytest

from pinnace import ConfigError, SnapshotError, StateError
from pinnace.snapshots import key as snapkey


def test_stop_save_then_start_resumes_processes_and_tmp(machine):
    machine.exec("echo kept > /tmp/note; nohup sleep 1000 > /dev/null 2>&1 & echo $! > /tmp/pid")
    pid = machine.exec(["cat", "/tmp/pid"]).stdout_text.strip()
    st = machine.stop(save=True)
    assert st.state == "saved"
    st = machine.start()
    assert st.state == "ready"
    assert machine.exec(["cat", "/tmp/note"]).stdout == b"kept\n"
    assert machine.exec(["kill", "-0", pid]).exit_code == 0  # still running
    assert machine.status().state == "ready"
    machine.stop(save=True)
    assert machine.halt().state == "stopped"  # discards the saved state
    machine.start()
    assert machine.exec(["test", "-e", "/tmp/note"]).exit_code == 1  # a fresh boot


def clock_error(m) -> float:
    """How far (seconds) the guest's wall clock is from the host's: the guest reads it
    between two readings of the host's."""
    before = time.time()
    guest = float(m.exec(["date", "+%s.%N"]).stdout_text)
    after = time.time()
    return max(0.0, before - guest, guest - after)


def test_restored_clocks_are_the_hosts(pn, machine, make_machine):
    """A restored guest's clock stood still while it was saved; set_time puts it right
    however long the requests waited (the snapshot records where the guest's monotonic
    clock stopped). Saved 2 s before restoring, so a wrong anchor shows as seconds."""
    snap = f"clock-{os.getpid()}"
    pn.snapshots.create(machine, snap)
    try:
        machine.stop(save=True)
        time.sleep(2)
        clone = make_machine(snapshot=snap)
        clone.start()
        machine.start()
        assert clock_error(clone) < 0.1
        assert clock_error(machine) < 0.1
        [run] = pn.machines.run()
        try:
            assert clock_error(run) < 0.1
        finally:
            run.delete(force=True)
        clone.delete(force=True)
    finally:
        pn.snapshots.remove(snap)


def test_clones_of_a_snapshot_are_separate_machines(pn, machine, make_machine):
    machine.exec("echo base > /root/base.txt").check()
    snap = f"snap-{os.getpid()}"
    pn.snapshots.create(machine, snap)
    try:
        assert machine.status().state == "ready"  # the source keeps running
        a = make_machine(snapshot=snap)
        b = make_machine(snapshot=snap)
        a.start()
        b.start()
        ha, hb = (m.exec(["hostname"]).stdout_text.strip() for m in (a, b))
        assert (ha, hb) == (a.name, b.name)
        ra, rb = (m.exec(["cat", "/proc/sys/kernel/random/uuid"]).stdout for m in (a, b))
        assert ra != rb
        assert a.exec(["cat", "/root/base.txt"]).stdout == b"base\n"
        a.exec("echo only-a > /root/a.txt").check()
        assert b.exec(["test", "-e", "/root/a.txt"]).exit_code == 1
        c = make_machine(snapshot=snap)
        c.start()
        assert c.exec(["test", "-e", "/root/a.txt"]).exit_code == 1
        with pytest.raises(SnapshotError, match="made from it"):
            pn.snapshots.remove(snap)
        with pytest.raises(ConfigError, match=r"1024M.*was made with 1 CPU, 512M"):
            make_machine(snapshot=snap, memory="1G")
    finally:
        for m in pn.machines.list():
            if m.name != machine.name:
                pn.machines.delete(m.name, force=True)
        pn.snapshots.remove(snap)


def test_ready_cache_rebuilds_on_key_change_and_damage(pn, monkeypatch):
    notices = []

    async def go():
        ms = await pn.aio.machines.run(notify=notices.append)
        for m in ms:
            await m.delete(force=True)
        return ms

    _run(pn, go())  # builds it if this store has none
    notices.clear()
    _run(pn, go())
    assert notices == []  # restored, not rebuilt
    current = snapkey.SNAPSHOT_FORMAT
    monkeypatch.setattr(snapkey, "SNAPSHOT_FORMAT", 999)
    _run(pn, go())
    assert any(f"format {current} -> 999" in n for n in notices), notices
    monkeypatch.undo()
    notices.clear()
    _run(pn, go())  # back to the current format: rebuilt again, keyed by format
    ready = _run(pn, _current_ready(pn))
    os.truncate(ready.path / "memory", 4096)
    notices.clear()
    ms = _run(pn, pn.aio.machines.run(notify=notices.append))
    try:
        assert any("memory is 4096 bytes" in n for n in notices), notices
        assert _run(pn, ms[0].exec(["true"])).exit_code == 0
    finally:
        _run(pn, ms[0].delete(force=True))


def test_cli_run_rm_passes_the_exit_code(pn, pinnace_home):
    env = {**os.environ, "PINNACE_HOME": str(pinnace_home)}
    r = subprocess.run([sys.executable, "-m", "pinnace.cli", "run", "--rm", "--", "sh", "-c",
                        "hostname; exit 5"], env=env, capture_output=True, text=True)
    assert r.returncode == 5, r.stderr
    name = r.stdout.strip()
    assert name.startswith("run-")
    assert name not in [m.name for m in pn.machines.list()]  # --rm deleted it


# -- helpers -------------------------------------------------------------------------


def _run(pn, coro):
    return pn._loop.run(coro)


async def _current_ready(pn):
    from pinnace.config import MachineConfig

    cfg = MachineConfig.build(name="x", image="default",
                              image_digest=pn.images.resolve("default"))
    cfg = cfg.with_changes(**pn.aio.machines._devices("x"))  # the shape run() gives it
    return await pn.aio.snapshots.ready(cfg, "tcg")


def test_start_without_wait_restores_a_clone(pn, machine, make_machine):
    """A machine made from a snapshot restores on start(wait=False) too: its QEMU does
    not sit waiting for a state while it shows as running (regression)."""
    snap = f"nowait-{os.getpid()}"
    pn.snapshots.create(machine, snap)
    try:
        clone = make_machine(snapshot=snap)
        st = clone.start(wait=False)
        assert st.state == "ready"
        assert clone.exec(["hostname"]).stdout_text.strip() == clone.name
        clone.delete(force=True)
    finally:
        pn.snapshots.remove(snap)


def test_pause_and_resume(machine):
    machine.exec("date +%s > /tmp/before").check()
    assert machine.pause().state == "paused"
    with pytest.raises(StateError, match="it is paused"):
        machine.exec(["true"])
    assert machine.status().state == "paused"
    assert machine.resume().state == "ready"
    assert machine.exec(["cat", "/tmp/before"]).exit_code == 0
    machine.pause()
    assert machine.stop().state == "stopped"  # a paused machine can be stopped
