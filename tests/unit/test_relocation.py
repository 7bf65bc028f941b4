"""A machine's folder renamed while its VMM runs, without QEMU: the launcher and the way
a folder's VMM is recognised (by the pid file's process working in the folder), gc's
view of VMMs by their working directory, and the internal rename on the fake backend.
(The same with real QEMU: tests/guest/test_relocate.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pinnace.backends.base import Handle
from pinnace.backends.qemu import process as qproc
from pinnace.errors import AlreadyExistsError, ConfigError, NotFoundError, StateError
from pinnace.store import MachineFiles, proc_argv, proc_cwd, proc_start_time

from .fakes import arun, fake_store

# A stand-in for QEMU: writes its pid file (relative, like QEMU's), waits for a file
# named "go" in its working directory, then exits 3.
FAKE_QEMU = ["sh", "-c", 'echo $$ > pid; i=0; while [ ! -e go ] && [ $i -lt 500 ]; do '
             'sleep 0.01; i=$((i+1)); done; exit 3', "qemu-system-fake", "-pidfile", "pid"]


def _wait(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_launcher_writes_the_exit_status_into_the_renamed_folder(tmp_path):
    files = MachineFiles(tmp_path / "a")
    files.dir.mkdir()
    handle = qproc.launch(FAKE_QEMU, files)
    assert isinstance(handle, Handle)
    assert qproc.is_vmm_of(handle.pid, files)
    moved = MachineFiles(tmp_path / "b")
    os.rename(files.dir, moved.dir)
    assert qproc.is_vmm_of(handle.pid, moved)  # the kernel follows the rename
    assert not qproc.is_vmm_of(handle.pid, files)
    assert proc_cwd(handle.pid) == (moved.dir.resolve(), False)
    (moved.dir / "go").touch()
    assert qproc.wait_exit(handle, 5.0)
    assert qproc.await_exit_status(moved, 5.0) == 3
    assert not files.dir.exists()  # nothing was written to the old place


def test_a_folder_s_vmm_is_the_pid_file_s_process_working_there(tmp_path):
    files = MachineFiles(tmp_path / "a")
    files.dir.mkdir()
    other = MachineFiles(tmp_path / "b")
    other.dir.mkdir()
    # Not ours: a process without -pidfile, and one of ours working in another folder.
    with subprocess.Popen(["sleep", "30"], cwd=files.dir) as stranger:
        try:
            assert not qproc.is_vmm_of(stranger.pid, files)
        finally:
            stranger.kill()
    handle = qproc.launch(FAKE_QEMU, other)
    assert isinstance(handle, Handle)
    try:
        assert not qproc.is_vmm_of(handle.pid, files)
        files.pid.write_text(f"{handle.pid}\n")  # a pid file naming someone else's VMM
        assert not qproc.is_vmm_of(handle.pid, files)
    finally:
        (other.dir / "go").touch()
        qproc.wait_exit(handle, 5.0)
    assert not qproc.is_vmm_of(handle.pid, other)  # gone
    assert proc_cwd(handle.pid) is None


@contextlib.contextmanager
def fake_vmm(folder: Path, tmp_path: Path, *, launcher: bool = False):
    """A process that gc takes for a QEMU (argv[0] qemu-system-*, with -pidfile), or for
    its launcher shell, working in ``folder``; killed with its session at the end."""
    qemu = tmp_path / "bin" / "qemu-system-fake"
    if not qemu.exists():
        qemu.parent.mkdir(exist_ok=True)
        qemu.symlink_to("/bin/sh")
    argv0 = "sh" if launcher else str(qemu)
    p = subprocess.Popen([argv0, "-c", "sleep 60; :", "-pidfile", "pid"], cwd=folder,
                         start_new_session=True)
    # (until it has exec'd, it shows the command line of this process)
    _wait(lambda: "-pidfile" in (proc_argv(p.pid) or ())
          and (proc_cwd(p.pid) or (None,))[0] == folder.resolve())
    try:
        yield p.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _killed(removed) -> dict[int, str]:
    return {int(r.what.split()[0]): r.what.split(" ", 1)[1] for r in removed
            if r.kind == "process"}


def test_gc_knows_vmms_by_their_working_directory(tmp_path):
    pn = fake_store(tmp_path)
    store = pn.store

    async def main():
        kept = await pn.machines.create("kept")
        await pn.machines.create("moved")
        staging = store.tmp_dir / "ready-999999999-xyz" / "run"  # of a dead command
        staging.mkdir(parents=True)
        with fake_vmm(kept.paths.dir, tmp_path, launcher=True) as launcher, \
                fake_vmm(store.machine_files("moved").dir, tmp_path) as moved, \
                fake_vmm(store.machine_files("kept").dir, tmp_path) as stray, \
                fake_vmm(staging, tmp_path) as staged:
            os.rename(store.machine_files("moved").dir, store.machine_files("moved2").dir)
            found = _killed(await pn.gc(dry_run=True))
            assert launcher not in found  # a machine's launcher is left to end with its QEMU
            assert found[stray] == "(QEMU of kept, which is created and does not own it)"
            assert found[moved] == "(QEMU of moved2, which is created and does not own it)"
            assert found[staged] == "(QEMU of ready-999999999-xyz, a snapshot whose command died)"

            shutil.rmtree(store.machine_files("moved2").dir)  # removed behind its back
            await pn.machines.create("moved2")  # and a new machine of that name
            found = _killed(await pn.gc(dry_run=True))
            assert found[moved] == "(QEMU of moved2, a machine that is gone)"

            found = _killed(await pn.gc())
            assert moved in found and staged in found
            _wait(lambda: proc_start_time(moved) is None and proc_start_time(staged) is None)
            assert proc_start_time(launcher) is not None  # (not a QEMU: left alone)

    arun(pn, main())


def test_rename_of_a_running_machine(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await pn.machines.create("pool-1")
        await m.start()
        pid = (await m.status()).pid
        other = await pn.machines.create("taken")
        with pytest.raises(AlreadyExistsError):
            await m.rename("taken")
        with pytest.raises(ConfigError):
            await m.rename("bad/name")
        with pytest.raises(ConfigError):
            await m.rename("pool-1")
        renamed = await m.rename("user-1")
        assert renamed.name == "user-1" and renamed.config.name == "user-1"
        assert not m.paths.dir.exists() and other.paths.dir.exists()
        with pytest.raises(NotFoundError):
            await m.status()
        st = await renamed.status()
        assert str(st.state) == "ready" and st.pid == pid
        assert (await renamed.exec(["echo", "hi"])).stdout == b"hi\n"
        events = [json.loads(ln) for ln in renamed.paths.events.read_text().splitlines()]
        assert events[-2]["event"] == "renamed" and events[-2]["was"] == "pool-1"
        assert events[-1]["event"] == "exec" and events[-1]["command"] == "echo hi"
        assert events[-1]["exit_code"] == 0
        st = await renamed.stop()
        assert str(st.state) == "stopped" and st.exit_code == 0
        assert sorted(s.name for s in await pn.machines.list()) == ["taken", "user-1"]

    arun(pn, main())


def test_rename_of_a_saved_machine_resumes_under_the_new_name(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await pn.machines.create("a")
        await m.start()
        await m.stop(save=True)
        assert json.loads(m.paths.resume.read_text())["state"] == "saved.state"
        renamed = await m.rename("b")
        assert str((await renamed.start()).state) == "ready"
        assert ("load", "b") in pn.backend.calls

    arun(pn, main())


def test_rename_of_a_broken_machine_is_refused(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await pn.machines.create("a")
        m.paths.state.write_text("{damaged")
        with pytest.raises(StateError):
            await m.rename("b")
        assert m.paths.dir.exists()

    arun(pn, main())
