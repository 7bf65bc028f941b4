"""The whole state table of a machine, every verb in every state, on the fake backend;
restores, the ready-snapshot cache and run; moves left half-done by a dead command."""

from __future__ import annotations

import json
import os

import pytest

from pinnace import StateError
from pinnace.backends.base import INCOMING, PAUSED, RUNNING, SAVED
from pinnace.backends.fake import FakeBackend
from pinnace.errors import ConfigError, LaunchError, MachineError, SnapshotError
from pinnace.snapshots import key as snapkey

from .fakes import arun, fake_store

STATES = ("created", "ready", "running", "paused", "stopped", "saved", "failed")


async def put_in(pn, name, state):
    """A machine named ``name`` in ``state``, reached the way a user would reach it."""
    backend = pn.backend
    m = await pn.machines.create(name)
    if state == "created":
        return m
    if state == "failed":
        backend.fail["launch"] = 1
        with pytest.raises(LaunchError):
            await m.start()
        return m
    await m.start(wait=state != "running")
    if state == "paused":
        await m.pause()
    elif state == "stopped":
        await m.stop()
    elif state == "saved":
        await m.stop(save=True)
    return m


async def left_mid_save(pn, m):
    """What ``stop --save`` leaves when killed once the state is saved whole: the busy
    mark, the saved state, and resume.json (written last)."""
    record = json.loads(m.paths.state.read_text())
    m.paths.state.write_text(json.dumps({**record, "busy": "save"}))
    await pn.backend.save(m.paths, m.paths.saved_state, ignore_shared=False)
    m.paths.resume.write_text(json.dumps({"state": str(m.paths.saved_state), "memory": None,
                                          "ignore_shared": False, "snapshot": "", "key": {}}))


async def verb(pn, m, what):
    if what == "start":
        await m.start()
    elif what == "start --no-wait":
        await m.start(wait=False)
    elif what == "stop":
        await m.stop()
    elif what == "stop --save":
        await m.stop(save=True)
    elif what in ("halt", "kill", "pause", "resume"):
        await getattr(m, what)()
    elif what == "delete":
        await m.delete()
    elif what == "delete --force":
        await m.delete(force=True)
    elif what == "configure":
        await m.configure(cpus=2)
    elif what == "exec":
        assert (await m.exec(["echo", "hi"])).stdout == b"hi\n"
    elif what == "snapshot":
        await pn.snapshots.create(m, f"s-{m.name}")
    else:
        raise AssertionError(what)


LIVE = ("ready", "running", "paused")
# verb -> {state before: state after}; a state missing here must be refused with StateError.
TABLE = {
    "start": {"created": "ready", "stopped": "ready", "failed": "ready", "saved": "ready"},
    "start --no-wait": {"created": "running", "stopped": "running", "failed": "running",
                        "saved": "ready"},  # a saved state is restored, wait or not
    "stop": dict.fromkeys(LIVE, "stopped"),
    "stop --save": dict.fromkeys(LIVE, "saved"),
    "halt": {**dict.fromkeys(LIVE, "stopped"), "saved": "stopped"},
    "kill": dict.fromkeys(LIVE, "stopped"),
    "pause": {"ready": "paused", "running": "paused"},
    "resume": {"paused": "ready"},
    "delete": dict.fromkeys(("created", "stopped", "failed", "saved"), "deleted"),
    "delete --force": dict.fromkeys(STATES, "deleted"),
    "configure": {"created": "created", "stopped": "stopped", "failed": "failed"},
    "exec": {"ready": "ready", "running": "running"},
    "snapshot": dict.fromkeys(LIVE, None),  # None: the state it had
}


@pytest.mark.parametrize("what", list(TABLE))
def test_every_verb_in_every_state(tmp_path, what):
    pn = fake_store(tmp_path)

    async def main():
        seen = {}
        made = []
        try:
            await walk(seen, made)
        finally:
            for m in made:  # close the handles' agent connections in this loop
                await m.close()
        want = {s: (TABLE[what].get(s, "refused") or s) for s in STATES}
        assert seen == want

    async def walk(seen, made):
        for state in STATES:
            m = await put_in(pn, f"m-{state}", state)
            made.append(m)
            assert (await m.status()).state == state
            expected = TABLE[what].get(state, "refused")
            if expected == "refused":
                with pytest.raises(StateError) as exc:
                    await verb(pn, m, what)
                assert exc.value.state == state and exc.value.allowed
                after = str((await m.status()).state)
                assert after == state, f"{what} refused in {state} but moved it to {after}"
                seen[state] = "refused"
                continue
            await verb(pn, m, what)
            if expected == "deleted":
                assert not m.paths.dir.exists()
                assert pn.backend.guest(m.paths) is None  # nothing left running
                seen[state] = "deleted"
                continue
            st = await m.status()
            seen[state] = str(st.state)
            guest = pn.backend.guest(m.paths)
            if st.state in ("ready", "running"):
                assert guest is not None and guest.state == RUNNING
            elif st.state == "paused":  # (after a save, QEMU says postmigrate: paused too)
                assert guest is not None and guest.state in (PAUSED, SAVED)
            else:
                assert guest is None, f"{st.state} but its VMM runs"

    arun(pn, main())


def test_a_state_error_says_what_was_found_and_what_is_needed(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await pn.machines.create("web")
        with pytest.raises(StateError) as exc:
            await m.exec(["true"])
        assert str(exc.value) == ("cannot reach the guest agent of machine 'web': it is "
                                  "created, and that needs it to be ready or running")

    arun(pn, main())


# -- restores --------------------------------------------------------------------------


def test_start_without_wait_carries_out_a_pending_restore(tmp_path):
    """Regression: start(wait=False) on a machine made from a snapshot launched the VMM
    waiting for its state and returned; the machine showed as running while its VMM
    waited forever. A pending restore is now always carried out."""
    pn = fake_store(tmp_path)

    async def main():
        src = await put_in(pn, "src", "ready")
        snap = await pn.snapshots.create(src, "snap")
        clone = await pn.machines.create("clone", snapshot=snap)
        st = await clone.start(wait=False)
        assert str(st.state) == "ready"
        assert pn.backend.guest(clone.paths).state == RUNNING  # not INCOMING
        assert pn.backend.guest(clone.paths).hostname == "clone"  # its own identity
        assert not clone.paths.resume.exists()

    arun(pn, main())


def test_a_failed_restore_leaves_the_machine_failed_and_restorable(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        src = await put_in(pn, "src", "ready")
        snap = await pn.snapshots.create(src, "snap")
        clone = await pn.machines.create("clone", snapshot=snap)
        pn.backend.fail["load"] = "fail"
        with pytest.raises(MachineError, match="restoring the saved state failed"):
            await clone.start()
        st = await clone.status()
        assert str(st.state) == "failed" and "restoring" in st.reason
        assert pn.backend.guest(clone.paths) is None
        assert clone.paths.resume.exists()  # the next start tries again
        assert str((await clone.start()).state) == "ready"

    arun(pn, main())


def test_a_failed_save_keeps_the_machine_running(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        pn.backend.fail["save"] = "fail"
        with pytest.raises(MachineError, match="saving failed, the machine keeps running"):
            await m.stop(save=True)
        assert str((await m.status()).state) == "ready"
        assert pn.backend.guest(m.paths).state == RUNNING
        assert not m.paths.saved_state.exists() and not m.paths.resume.exists()
        assert (await m.exec(["echo", "ok"])).stdout == b"ok\n"

    arun(pn, main())


def test_boot_timeout_and_crash_are_told_apart(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await pn.machines.create("m", boot_timeout=0.3)
        pn.backend.fail["boot"] = "hang"
        with pytest.raises(MachineError, match=r"did not become ready within 0\.3 s"):
            await m.start()
        st = await m.status()
        assert str(st.state) == "failed" and "timed out" in st.reason
        await m.start()
        pn.backend.exit(m.paths, 137)  # the VMM is killed behind pinnace's back
        st = await m.status()
        assert str(st.state) == "failed" and "killed by SIGKILL" in st.reason

    arun(pn, main())


# -- the ready-snapshot cache and run ----------------------------------------------------


def test_ready_cache_hit_miss_key_change_and_damage(tmp_path, monkeypatch):
    pn = fake_store(tmp_path)
    notices: list[str] = []

    def launches():
        return sum(1 for c in pn.backend.calls if c[0] == "launch")

    async def run_once():
        [m] = await pn.machines.run(notify=notices.append)
        assert str((await m.status()).state) == "ready"
        await m.delete(force=True)

    async def main():
        await run_once()  # miss: built once (a launch for the template, one for the clone)
        assert any("there is none yet" in n for n in notices), notices
        assert launches() == 2
        notices.clear()
        await run_once()  # hit: restored, nothing built
        assert notices == [] and launches() == 3
        ready_dirs = {p for p in pn.store.ready_dir.iterdir() if p.is_dir()}
        monkeypatch.setattr(snapkey, "SNAPSHOT_FORMAT", 999)
        await run_once()  # key change: rebuilt, saying what changed
        assert any(f"format {snapkey.SNAPSHOT_FORMAT}" in n or "-> 999" in n for n in notices)
        new_dirs = {p for p in pn.store.ready_dir.iterdir() if p.is_dir()}
        assert not (ready_dirs & new_dirs)  # the old one, unused, was removed
        notices.clear()
        [current] = new_dirs
        (current / "state").chmod(0o644)
        (current / "state").write_text("damaged")
        await run_once()  # damage: rebuilt, saying why
        assert any("state" in n and ("checksum" in n or "bytes" in n) for n in notices), notices

    arun(pn, main())


def test_run_starts_count_machines_and_cleans_up_on_failure(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        ms = await pn.machines.run(name="w", count=3)
        assert [m.name for m in ms] == ["w-1", "w-2", "w-3"]
        hostnames = {pn.backend.guest(m.paths).hostname for m in ms}
        assert hostnames == {"w-1", "w-2", "w-3"}
        for m in ms:
            await m.delete(force=True)
        pn.backend.fail["load"] = "fail"  # the second run's first restore fails
        with pytest.raises(MachineError):
            await pn.machines.run(name="x", count=2)
        assert [s.name for s in await pn.machines.list()] == []  # none left behind
        assert not pn.backend.guests

    arun(pn, main())


def test_run_with_volumes_and_shares_restores_and_mounts_them(tmp_path):
    """A ready snapshot has empty slots for volumes and shares: run restores (no boot)
    and the agent mounts them, probing each volume's disk again first; a machine's own
    saved state has them mounted already, so its resume sends no mounts."""
    pn = fake_store(tmp_path)
    share = tmp_path / "share"
    share.mkdir()

    async def main():
        vol = await pn.volumes.create("data", "16M")
        notices: list[str] = []
        [m] = await pn.machines.run(name="m", volumes=["data:/data:ro"],
                                    shares=[f"{share}:/src"], notify=notices.append)
        assert any("building the ready snapshot" in n for n in notices)  # its own slot
        assert ("load", "m") in pn.backend.calls  # restored, not booted
        assert json.loads(m.paths.state.read_text()).get("restored") is True
        guest = pn.backend.guest(m.paths)
        assert guest.spec.volumes == ((vol.image, True),)
        assert guest.spec.shares == ((share, False),)
        assert guest.mounts == [
            {"fstype": "ext4", "source": "pinnace-vol0", "path": "/data", "ro": True,
             "rescan": True},
            {"fstype": "9p", "source": "pinnace-share0", "path": "/src", "ro": False}]
        await m.stop(save=True)
        await m.start()
        assert pn.backend.guest(m.paths).mounts == []  # still mounted in its RAM
        await m.delete(force=True)
        notices.clear()
        [again] = await pn.machines.run(name="n", volumes=["data:/data"],
                                        shares=[f"{share}:/src:ro"], notify=notices.append)
        assert notices == []  # the same slots (read-only or not): the same ready snapshot
        assert [x["ro"] for x in pn.backend.guest(again.paths).mounts] == [False, True]
        await again.delete(force=True)

    arun(pn, main())


def test_a_ready_template_has_empty_slots_it_never_mounts(tmp_path):
    pn = fake_store(tmp_path)
    share = tmp_path / "share"
    share.mkdir()
    launched = []
    launch = pn.backend.launch

    async def spy(spec):
        launched.append(spec)
        if spec.memory_shared:  # the template: its placeholders exist while it runs
            assert all(p.is_file() and p.stat().st_size == 0 for p, _ in spec.volumes)
            assert all(p.is_dir() and not any(p.iterdir()) for p, _ in spec.shares)
        return await launch(spec)

    pn.backend.launch = spy

    async def main():
        await pn.volumes.create("a", "16M")
        await pn.volumes.create("b", "16M")
        [m] = await pn.machines.run(volumes=["a:/a", "b:/b:ro"], shares=[f"{share}:/s:ro"])
        template = launched[0]
        assert [ro for _, ro in template.volumes] == [False, False]  # writable: see why
        assert [ro for _, ro in template.shares] == [True]
        assert not template.volumes[0][0].exists()  # gone with the template's run folder
        assert [c for c in pn.backend.calls if c[0] == "launch"] == [
            ("launch", "run"), ("launch", m.name)]
        await m.delete(force=True)

    arun(pn, main())


def test_a_named_snapshot_refuses_volumes_clearly(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        await pn.volumes.create("data", "16M")
        src = await put_in(pn, "src", "ready")
        await pn.snapshots.create(src, "warm")
        with pytest.raises(ConfigError) as exc:
            await pn.machines.create("c", snapshot="warm", volumes=["data:/data"])
        msg = str(exc.value)
        assert "'warm' has no volumes" in msg and "without --snapshot" in msg
        assert "\n" not in msg
        assert not (pn.store.machines_dir / "c").exists()
        await src.close()

    arun(pn, main())


def test_gc_deletes_run_rm_machines_whose_command_died(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        [mine] = await pn.machines.run(name="mine", rm=True)
        [orphan] = await pn.machines.run(name="orphan", rm=True)
        assert mine.config.ephemeral
        orphan.paths.owner.write_text("1 1\n")  # a process that is gone
        removed = await pn.gc()
        assert [str(r) for r in removed if r.kind == "machine"] == [
            "removed machine orphan (made by 'run --rm' or a test session; its owner died)"]
        assert mine.paths.dir.exists() and not orphan.paths.dir.exists()
        assert await pn.gc() == []

    arun(pn, main())


# -- a command that died in the middle of a move -----------------------------------------


def test_a_start_whose_command_died_is_rolled_back(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        record = json.loads(m.paths.state.read_text())
        record["state"] = "starting"  # as a start killed before the agent answered leaves it
        m.paths.state.write_text(json.dumps(record))
        st = await m.status()
        assert str(st.state) == "failed" and "interrupted" in st.reason
        assert pn.backend.guest(m.paths) is None  # its VMM was killed
        assert str((await m.start()).state) == "ready"

    arun(pn, main())


def test_a_move_in_progress_is_left_alone(tmp_path):
    """While the command doing it lives (it holds the lock), 'starting' is the truth."""
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        record = json.loads(m.paths.state.read_text())
        m.paths.state.write_text(json.dumps({**record, "state": "starting"}))
        async with pn.store.alocked(("machine", "m")):
            assert str((await m.status()).state) == "starting"
        assert pn.backend.guest(m.paths).state == RUNNING

    arun(pn, main())


@pytest.mark.parametrize("busy", ["snapshot", "save"])
def test_a_guest_left_paused_by_a_dead_save_runs_again(tmp_path, busy):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        await pn.backend.save(m.paths, m.paths.dir / "partial", ignore_shared=False)
        record = json.loads(m.paths.state.read_text())
        m.paths.state.write_text(json.dumps({**record, "busy": busy}))
        st = await m.status()
        assert str(st.state) == "ready"
        assert pn.backend.guest(m.paths).state == RUNNING
        assert "busy" not in json.loads(m.paths.state.read_text())
        assert (await m.exec(["echo", "back"])).stdout == b"back\n"

    arun(pn, main())


def test_a_save_that_finished_before_its_command_died_is_finished(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        await left_mid_save(pn, m)
        st = await m.status()
        assert str(st.state) == "saved"
        assert pn.backend.guest(m.paths) is None

    arun(pn, main())


def test_damaged_files_name_themselves_and_spare_the_others(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        a = await put_in(pn, "a", "stopped")
        b = await put_in(pn, "b", "stopped")
        c = await put_in(pn, "c", "ready")
        a.paths.config.write_text("{not json")
        b.paths.state.write_text("[]")
        listed = {s.name: s for s in await pn.machines.list()}
        assert str(listed["c"].state) == "ready"
        assert str(listed["b"].state) == "broken" and "state.json" in listed["b"].reason
        assert "delete --force b" in listed["b"].reason
        with pytest.raises(Exception, match=r"config\.json.*delete --force a") as exc:
            await a.start()
        assert "Traceback" not in str(exc.value)
        snap = await pn.snapshots.create(c, "snap")
        snap.paths.meta.write_text("{}")
        with pytest.raises(SnapshotError, match=r"snapshot\.json.*snapshot rm snap"):
            pn.snapshots.get("snap")
        assert [s.name for s in pn.snapshots.list()] == []  # listed without the damaged one
        assert (await c.exec(["echo", "fine"])).stdout == b"fine\n"

    arun(pn, main())


def test_fake_pids_name_no_real_process():
    assert FakeBackend().alive.__self__ is not None
    from pinnace.backends.fake import FAKE_PID_BASE

    with open("/proc/sys/kernel/pid_max") as f:
        assert FAKE_PID_BASE > int(f.read())
    assert INCOMING != RUNNING
    assert os.getpid() < FAKE_PID_BASE


def test_a_start_killed_before_it_recorded_its_vmm_still_has_it_killed(tmp_path):
    """Killed between launching the VMM and writing its pid down: the VMM is found by
    its files, and rolled back with the start."""
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        m.paths.state.write_text(json.dumps({"state": "starting", "reason": ""}))
        st = await m.status()
        assert str(st.state) == "failed" and "interrupted" in st.reason
        assert pn.backend.guest(m.paths) is None
        await m.close()

    arun(pn, main())


def test_a_save_that_fails_after_pausing_is_rolled_back(tmp_path):
    """Anything that goes wrong once the guest is paused for a save (here a bug-like
    error; a Ctrl-C or a full disk alike) leaves the busy mark, and the next look at
    the machine runs the guest again."""
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        pn.backend.fail["save"] = RuntimeError("boom")
        with pytest.raises(RuntimeError):
            await m.stop(save=True)
        assert json.loads(m.paths.state.read_text()).get("busy") == "save"
        assert str((await m.status()).state) == "ready"
        assert pn.backend.guest(m.paths).state == RUNNING
        await m.close()

    arun(pn, main())


def test_gc_recovers_a_machine_a_dead_snapshot_left_paused(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        await pn.backend.save(m.paths, m.paths.dir / "partial", ignore_shared=False)
        record = json.loads(m.paths.state.read_text())
        m.paths.state.write_text(json.dumps({**record, "busy": "snapshot"}))
        await pn.gc()
        assert pn.backend.guest(m.paths).state == RUNNING
        assert "busy" not in json.loads(m.paths.state.read_text())
        await m.close()

    arun(pn, main())


def test_a_save_whose_qemu_had_quit_is_saved_not_stopped(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "ready")
        await left_mid_save(pn, m)
        pn.backend.exit(m.paths, 0)  # QEMU had quit when the command died
        assert str((await m.status()).state) == "saved"
        await m.close()

    arun(pn, main())


def test_a_failed_resume_can_be_halted_and_is_not_reconfigured(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "saved")
        pn.backend.fail["load"] = "fail"
        with pytest.raises(MachineError):
            await m.start()
        assert str((await m.status()).state) == "failed"
        with pytest.raises(StateError, match="saved state"):
            await m.configure(cpus=2)
        assert str((await m.halt()).state) == "stopped"
        assert not m.paths.resume.exists() and not m.paths.saved_state.exists()
        await m.configure(cpus=2)
        assert str((await m.start()).state) == "ready"  # boots
        await m.close()

    arun(pn, main())


def test_status_during_a_start_in_progress_says_starting(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        m = await put_in(pn, "m", "stopped")
        m.paths.state.write_text(json.dumps({"state": "starting", "reason": ""}))
        async with pn.store.alocked(("machine", "m")):  # the starting command lives
            assert str((await m.status()).state) == "starting"

    arun(pn, main())


def test_ready_snapshots_per_accelerator_and_long_image_names(tmp_path):
    """run --accel tcg and run (KVM here) keep a ready snapshot each; an image with a
    long name gets one too (ready ids are built from the digest)."""
    pn = fake_store(tmp_path, FakeBackend(kvm=True))
    notices: list[str] = []

    async def main():
        long = "i" * 60
        pn.store.image_ref(long).write_text(pn.store.image_ref("default").read_text())
        for accel, image in [("tcg", "default"), (None, "default"), ("tcg", "default"),
                             (None, "default"), (None, long), (None, long)]:
            [m] = await pn.machines.run(image=image, accel=accel, notify=notices.append)
            await m.delete(force=True)
        builds = [n for n in notices if n.startswith("building")]
        assert len(builds) == 2, notices  # one per accelerator; the long name shares it

    arun(pn, main())


def test_a_killed_save_of_a_restored_machine_keeps_its_saved_state(tmp_path):
    """A machine from run() carries 'restored': a save whose command died after QEMU quit
    must settle as saved with its saved state, and start must resume it."""
    pn = fake_store(tmp_path)

    async def main():
        [m] = await pn.machines.run(name="m")
        await left_mid_save(pn, m)  # and QEMU had quit
        pn.backend.exit(m.paths, 0)
        st = await m.status()
        assert str(st.state) == "saved"
        assert m.paths.resume.exists() and m.paths.saved_state.exists()
        await m.close()

    arun(pn, main())


def test_a_used_resume_file_is_not_taken_for_a_new_save(tmp_path):
    """A resume.json left after a restore (its command died before removing it) must
    not make a failed save look finished: the guest runs on, not killed as saved."""
    pn = fake_store(tmp_path)

    async def main():
        [m] = await pn.machines.run(name="m")
        snap_resume = {"state": "x", "memory": "y", "ignore_shared": True,
                       "snapshot": "snapshots/s", "key": {}}
        m.paths.resume.write_text(json.dumps(snap_resume))  # left behind, already used
        pn.backend.fail["save"] = "fail"
        with pytest.raises(MachineError):
            await m.stop(save=True)
        st = await m.status()
        assert str(st.state) == "ready"
        assert pn.backend.guest(m.paths).state == RUNNING
        assert not m.paths.resume.exists()
        await m.close()

    arun(pn, main())


def test_gc_keeps_a_damaged_ready_snapshot_that_machines_use(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        [keep] = await pn.machines.run(name="keep")
        await keep.stop()
        ref = keep.config.snapshot
        snap_dir = pn.store.home / ref
        (snap_dir / "snapshot.json").write_text("{damaged")
        [m] = await pn.machines.run(name="other")  # rebuilds the slot
        await m.delete(force=True)
        removed = await pn.gc()
        assert snap_dir.is_dir(), removed
        await keep.close()

    arun(pn, main())


def test_the_no_kvm_notice_is_said_once(tmp_path, caplog):
    pn = fake_store(tmp_path)

    async def main():
        for name in ("a", "b"):
            m = await pn.machines.create(name)
            await m.start()
            await m.close()

    with caplog.at_level("WARNING", logger="pinnace"):
        arun(pn, main())
    said = [r for r in caplog.records if "KVM is not usable" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"


def test_a_new_template_layout_rebuilds_ready_snapshots_but_not_saved_machines(tmp_path):
    """Ready templates are versioned apart from snapshots (READY_LAYOUT): a pointer from
    before rebuilds its snapshot; a machine saved meanwhile still resumes."""
    pn = fake_store(tmp_path)

    async def main():
        saved = await put_in(pn, "saved", "saved")
        await pn.machines.run(name="a")
        pointers = list(pn.store.ready_dir.glob("*.json"))
        assert len(pointers) == 1
        assert json.loads(pointers[0].read_text())["layout"] >= 1
        pointers[0].write_text(json.dumps({"ref": json.loads(pointers[0].read_text())["ref"]}))
        notices: list[str] = []
        await pn.machines.run(name="b", notify=notices.append)
        assert any("laid out anew" in n for n in notices), notices
        assert str((await saved.start()).state) == "ready"  # its saved state still loads

    arun(pn, main())


def test_a_forced_delete_unmounts_writable_volumes_before_the_kill(tmp_path):
    pn = fake_store(tmp_path)

    async def main():
        await pn.volumes.create("data", "16M")
        await pn.volumes.create("ro", "16M")
        [m] = await pn.machines.run(name="m", volumes=["data:/data"])
        [r] = await pn.machines.run(name="r", volumes=["ro:/ro:ro"])
        await m.delete(force=True)
        await r.delete(force=True)
        calls = pn.backend.calls
        assert calls.index(("unmount", "m")) < calls.index(("exit", "m:137"))
        assert ("unmount", "r") not in calls  # nothing of its own to lose

    arun(pn, main())
