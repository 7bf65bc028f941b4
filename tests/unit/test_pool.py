"""The warm pool on the fake backend: fill, claim (once each, also concurrently), the
claimed machine's identity, staleness, gc of dead and half-claimed members, settings."""

from __future__ import annotations

import asyncio
import json

import pytest

from pinnace.errors import ConfigError

from .fakes import arun, fake_store


@pytest.fixture
def pn(tmp_path, monkeypatch):
    monkeypatch.setenv("PINNACE_DEFAULT_NET", "restricted")
    monkeypatch.delenv("PINNACE_POOL_SIZE", raising=False)
    pn = fake_store(tmp_path)
    pn.spawned = []
    pn.pool.spawn_fill = pn.spawned.append  # the detached refill: recorded, not started
    return pn


def launches(pn):
    return sum(1 for c in pn.backend.calls if c[0] == "launch")


def test_fill_starts_hidden_members_and_run_claims_one_without_a_restore(pn):
    async def main():
        started = await pn.pool.fill(size=2)
        assert len(started) == 2
        assert await pn.machines.list() == []  # members are hidden from ls
        assert {st.name for st in await pn.machines.list(pool=True)} == set(started)
        before = launches(pn)
        [m] = await pn.machines.run(name="web")
        assert launches(pn) == before  # no VMM started: a running member was taken
        assert m.name == "web" and m.config.name == "web" and not m.config.pool
        assert m.paths.dir.is_dir() and str((await m.status()).state) == "ready"
        assert pn.backend.guest(m.paths).hostname == "web"  # its own identity
        assert (await m.exec(["hostname"])).stdout == b"web\n"
        assert [st.name for st in await pn.machines.list()] == ["web"]
        members = await pn.pool.list()
        assert len(members) == 1 and members[0].name in started and members[0].name != "web"
        assert pn.spawned == []  # size 0 (the default): no refill
        # the claimed machine is an ordinary one: it stops and deletes like any other
        await m.stop()
        assert str((await m.status()).state) == "stopped"
        await m.delete()
        assert not m.paths.dir.exists()

    arun(pn, main())


def test_concurrent_claims_never_share_a_member(pn):
    async def main():
        await pn.pool.fill(size=3)
        runs = await asyncio.gather(*(pn.machines.run(name=f"c{i}") for i in range(5)))
        names = [ms[0].name for ms in runs]
        assert sorted(names) == [f"c{i}" for i in range(5)]
        pids = {(await ms[0].status()).pid for ms in runs}
        assert len(pids) == 5  # five VMMs: three claimed, two restored
        assert await pn.pool.list() == []

    arun(pn, main())


def test_a_claim_refills_in_the_background_when_the_pool_has_a_size(pn):
    async def main():
        pn.pool.set_size(2)
        assert pn.pool.size() == 2
        [m] = await pn.machines.run()  # pool empty: restored, and a refill is asked for
        assert m.name.startswith("run-") and len(pn.spawned) == 1
        assert pn.spawned[0].memory_mib == 512 and pn.spawned[0].net == "restricted"
        assert len(await pn.pool.fill()) == 2  # what the detached filler does
        await pn.machines.run(rm=True)
        assert len(pn.spawned) == 2
        # machines the pool cannot serve do not touch it
        await pn.machines.run(net="none")
        assert len(await pn.pool.list()) == 1 and len(pn.spawned) == 2

    arun(pn, main())


def test_a_stale_member_is_never_handed_out_and_goes(pn):
    async def main():
        [old] = await pn.pool.fill(size=1)
        cfg = json.loads(pn.store.machine_files(old).config.read_text())
        slot = cfg["pool"].split("/")[0]
        pn.store.ready_pointer(slot).write_text(json.dumps({"ref": "cache/ready/gone"}))
        assert (await pn.pool.list())[0].stale
        before = launches(pn)
        await pn.machines.run(name="fresh")
        assert launches(pn) > before  # not the stale member
        gone = await pn.gc()
        assert any(old in str(r) and "replaced" in str(r) for r in gone)
        assert not pn.store.machine_files(old).dir.exists()

    arun(pn, main())


def test_replacing_the_ready_snapshot_drains_its_members(pn):
    async def main():
        await pn.pool.fill(size=2)
        member = (await pn.pool.list())[0]
        snap_ref = member.snapshot
        snap = pn.snapshots.by_ref(snap_ref)
        assert pn.snapshots.on_replaced is not None
        await pn.snapshots.on_replaced(snap)  # what ready() does once it built a new one
        assert await pn.pool.list() == []

    arun(pn, main())


def test_gc_removes_dead_and_half_claimed_members(pn):
    async def main():
        a, b = await pn.pool.fill(size=2)
        pn.backend.exit(pn.store.machine_files(a), 137)  # its VMM died
        # a claim killed between renaming b's folder and rewriting its config
        pn.store.put_in_place(pn.store.machine_files(b).dir,
                              pn.store.machine_files("claimed").dir, "a test")
        gone = [str(r) for r in await pn.gc()]
        assert any(a in r and "that is failed" in r for r in gone), gone
        assert any("claimed" in r and "half claimed" in r for r in gone), gone
        assert await pn.machines.list(pool=True) == []

    arun(pn, main())


def test_size_setting_and_its_bad_values(pn, monkeypatch):
    assert pn.pool.size() == 0
    pn.pool.set_size(3)
    assert pn.pool.size() == 3
    monkeypatch.setenv("PINNACE_POOL_SIZE", "1")
    assert pn.pool.size() == 1
    for bad in (-1, 33, "x", True):
        with pytest.raises(ConfigError, match="0 \\(off\\) to 32"):
            pn.pool.set_size(bad)
    monkeypatch.setenv("PINNACE_POOL_SIZE", "lots")
    with pytest.raises(ConfigError, match="PINNACE_POOL_SIZE"):
        pn.pool.size()


def test_a_pool_serves_only_machines_with_a_nat_nic(pn):
    async def main():
        with pytest.raises(ConfigError, match="'nat' or 'restricted'"):
            await pn.pool.fill(size=1, net="none")

    arun(pn, main())


def test_members_of_an_image_name_now_pointing_elsewhere_are_stale(pn):
    async def main():
        [old] = await pn.pool.fill(size=1)
        digest = pn.store.image_ref("default").read_text().strip()
        other = ("e" if digest[0] != "e" else "d") * len(digest)  # "default" rebuilt
        files = pn.store.image_files(other)
        files.dir.mkdir(parents=True)
        for p in (files.kernel, files.initrd, files.rootfs):
            p.write_bytes(b"")
        files.manifest.write_text(json.dumps({"digest": other, "created": 0}))
        pn.store.image_ref("default").write_text(other + "\n")
        assert (await pn.pool.list())[0].stale
        [m] = await pn.machines.run(name="new")
        assert m.config.image_digest == other
        assert [x.name for x in await pn.pool.list()] == [old]  # not handed out
        assert any(old in str(r) for r in await pn.gc())
        assert await pn.pool.list() == []

    arun(pn, main())


def test_fill_trims_surplus_and_a_bad_size_claims_nothing(pn, monkeypatch):
    async def main():
        await pn.pool.fill(size=3)
        assert await pn.pool.fill(size=1) == []
        assert len(await pn.pool.list()) == 1
        monkeypatch.setenv("PINNACE_POOL_SIZE", "lots")
        with pytest.raises(ConfigError, match="PINNACE_POOL_SIZE"):
            await pn.machines.run(name="web")
        assert not pn.store.machine_files("web").dir.exists()
        assert len(await pn.pool.list()) == 1  # nothing was taken

    arun(pn, main())


def test_drain_removes_members_only(pn):
    async def main():
        await pn.pool.fill(size=2)
        [m] = await pn.machines.run(name="keep")
        assert len(await pn.pool.drain()) == 1
        assert await pn.pool.list() == []
        assert str((await m.status()).state) == "ready"

    arun(pn, main())


def test_drain_waits_for_a_filler_at_work_even_of_an_empty_pool(pn):
    import asyncio

    async def main():
        await pn.pool.fill(size=1)
        [member] = await pn.pool.list()
        lock_name = member.key.replace("/", "-")
        filler = pn.store.lock("pool", lock_name, timeout=1)  # a filler at work
        filler.acquire()
        draining = asyncio.ensure_future(pn.pool.drain())
        await asyncio.sleep(0.2)
        assert not draining.done()  # waits: the filler would refill behind it
        filler.release()
        assert await draining == [member.name]

    arun(pn, main())
