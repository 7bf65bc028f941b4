"""A running machine's folder renamed under it (machines/A -> machines/B): its QEMU and
the QEMU's launcher name the folder's files relative to their working directory, the
folder, so everything goes on under the new name; and gc still finds the QEMU of a
folder that was removed. (Groundwork for a warm pool: a clone waits under a pool name
and is renamed to its user's when claimed.)"""

import os
import shutil
import time

import pytest

from pinnace.client import Machine
from pinnace.errors import AlreadyExistsError
from pinnace.store import proc_start_time


def _rename(pn, m, new):
    """The internal rename (not in the sync API), run on the sync client's loop."""
    return Machine(pn._loop.run(m.aio.rename(new)), pn._loop)


def _orphans(pn, *words):
    """What ``gc --dry-run`` would kill that mentions any of ``words``."""
    return [str(r) for r in pn.gc(dry_run=True)
            if r.kind == "process" and any(w in r.what for w in words)]


def _await(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_running_machine_renamed_keeps_working_under_its_new_name(make_machine, pn):
    m = make_machine.restored()
    old_path, pid = m.path, m.status().pid
    assert pid is not None
    new = f"{m.name}-claimed"
    renamed = _rename(pn, m, new)
    try:
        assert not old_path.exists() and renamed.path.is_dir()
        assert renamed.config.name == new
        with pytest.raises(AlreadyExistsError):  # refused: the target exists
            _rename(pn, make_machine(), new)

        st = renamed.status()
        assert str(st.state) in ("ready", "running") and st.pid == pid
        # The same QEMU, working in the folder where it is now; the backend knows it
        # as the new folder's VMM and not the old one's.
        assert os.readlink(f"/proc/{pid}/cwd") == str(renamed.path.resolve())
        backend = pn.aio.backend
        assert backend.find(renamed.aio.paths).pid == pid
        assert backend.find(pn.store.machine_files(m.name)) is None

        # The agent (its sockets moved with the folder) and QMP answer.
        assert renamed.exec(["hostname"]).ok
        renamed.pause()
        assert str(renamed.status().state) == "paused"
        renamed.resume()
        # The serial console is written into the renamed folder's log.
        log = renamed.path / "serial.log"
        size = log.stat().st_size
        renamed.exec(["sh", "-c", "echo relocated-marker > /dev/ttyS0"]).check()
        _await(lambda: b"relocated-marker" in log.read_bytes()[size:])

        assert _orphans(pn, str(pid), new, m.name) == []

        # A clean poweroff: the launcher writes QEMU's exit status at the new path.
        st = renamed.stop()
        assert str(st.state) == "stopped" and st.exit_code == 0, st
        assert "powered off" in st.reason
        assert (renamed.path / "exit").read_text().split()[0] == "0"
        assert not old_path.exists()  # nothing wrote to the old place
        assert str(renamed.status().state) == "stopped"
        assert _orphans(pn, str(pid), new, m.name) == []
    finally:
        if renamed.path.exists():
            renamed.delete(force=True)


def test_gc_kills_the_qemu_of_a_machine_folder_removed_behind_its_back(make_machine, pn):
    """The folder is removed with rm -rf while QEMU runs, and a new machine takes its
    name: gc kills the old QEMU (its folder is gone) and leaves the new machine alone."""
    m = make_machine.restored()
    pid = m.status().pid
    shutil.rmtree(m.path)
    newcomer = pn.machines.create(m.name)
    try:
        said = [str(r) for r in pn.gc() if r.kind == "process" and str(pid) in r.what]
        assert said == [f"killed process {pid} (QEMU of {m.name}, a machine that is gone)"]
        _await(lambda: proc_start_time(pid) is None, 5)  # gone (or a zombie)
        assert str(newcomer.status().state) == "created"
    finally:
        newcomer.delete(force=True)


def test_a_renamed_machine_stays_on_its_network(network, make_machine, pn):
    """Its NIC's sockets moved with the folder: the switch is told the new paths."""
    lan = network("10.77.70.0/24")
    [a] = pn.machines.run(name=f"tr{os.getpid() % 10000}-a", networks=[f"{lan}:10.77.70.2"])
    b = None
    try:
        [b] = pn.machines.run(name=f"tr{os.getpid() % 10000}-b",
                              networks=[f"{lan}:10.77.70.3"])
        a.exec(["ping", "-c", "1", "-W", "5", "10.77.70.3"]).check()
        b = _rename(pn, b, f"tr{os.getpid() % 10000}-b2")
        assert b.config.nics[0].network == lan
        a.exec(["ping", "-c", "2", "-W", "5", "10.77.70.3"]).check()
        b.exec(["ping", "-c", "2", "-W", "5", "10.77.70.2"]).check()
        assert sorted(pn.aio.networks.members(lan)) == sorted([a.name, b.name])
    finally:
        for x in (a, b):
            if x is not None and x.path.exists():
                x.delete(force=True)
