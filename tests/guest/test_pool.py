"""The warm pool with real guests: claimed clones are ordinary machines with their own
identity, claims are exclusive, the detached refill works, gc removes dead members."""

import os
import signal
import time

import pytest


@pytest.fixture
def pool(pn, monkeypatch):
    monkeypatch.setenv("PINNACE_POOL_SIZE", "0")  # refills only where a test asks
    pn.pool.drain()
    yield pn.pool
    pn.pool.drain()


def identity(m):
    out = m.exec("hostname; cat /sys/class/net/eth0/address; date +%s.%N").stdout.decode()
    host, mac, clock = out.split()
    return host, mac, float(clock)


def test_a_claimed_member_is_an_ordinary_machine_with_its_own_identity(pn, pool, make_machine):
    members = pool.fill(size=2)
    assert len(members) == 2
    listed = {st.name for st in pn.machines.list()}
    assert not listed & set(members)  # hidden from ls
    t0 = time.monotonic()
    [m] = pn.machines.run(name=f"pooled-{os.getpid()}")
    took = time.monotonic() - t0
    make_machine.track(m)
    assert m.name not in members and m.status().state == "ready"
    host, mac, clock = identity(m)
    assert host == m.name
    assert abs(clock - time.time()) < 2.0  # the host's clock, not the member's fill time
    [left] = pool.list()
    other = pn.machines.get(left.name)
    _, other_mac, _ = identity(other)
    assert mac != other_mac
    assert not (pn.store.machine_files(left.name).dir / "owner").exists()
    # the claimed machine lives on like any other: stop (clean poweroff), start again
    m.stop()
    st = m.status()
    assert st.state == "stopped", st
    m.start()
    assert identity(m)[0] == m.name
    print(f"claim + identity took {took * 1000:.0f} ms")


def test_concurrent_runs_never_share_a_member(pn, pool, make_machine):
    pool.fill(size=2)
    ms = pn.machines.run(count=3, name=f"cc{os.getpid()}")
    for m in ms:
        make_machine.track(m)
    hosts = {m.exec("hostname").stdout.decode().strip() for m in ms}
    assert hosts == {m.name for m in ms}
    assert len({m.status().pid for m in ms}) == 3
    assert pool.list() == []


def test_the_detached_refill_fills_the_pool_after_a_claim(pn, pool, make_machine, monkeypatch):
    monkeypatch.setenv("PINNACE_POOL_SIZE", "1")
    [m] = pn.machines.run(rm=True)  # pool empty: restored; a filler is started
    make_machine.track(m)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready = [x for x in pool.list() if x.state == "ready" and not x.stale]
        if ready:
            break
        time.sleep(0.5)
    else:
        log = pn.store.pool_log.read_text() if pn.store.pool_log.exists() else ""
        pytest.fail(f"the pool was not refilled; its log:\n{log[-2000:]}")
    [member] = ready
    member_pid = pn.machines.get(member.name).status().pid
    monkeypatch.setenv("PINNACE_POOL_SIZE", "0")
    [claimed] = pn.machines.run()
    make_machine.track(claimed)
    assert claimed.status().pid == member_pid  # the refilled member, not a new restore
    assert pool.list() == []


def test_gc_removes_a_member_whose_qemu_died(pn, pool):
    [name] = pool.fill(size=1)
    pid = pn.machines.get(name).status().pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    removed = [str(r) for r in pn.gc()]
    assert any(name in r and "warm-pool member" in r for r in removed), removed
    assert pool.list() == []
