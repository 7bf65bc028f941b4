"""Job cgroups (backends/qemu/cgroup.py): real groups on this host (root, v1 or v2), and a
fake cgroup v2 tree in tmp for the v2 paths a v1 host cannot run."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pinnace.backends.qemu import cgroup
from pinnace.backends.qemu.cgroup import Cgroup, CgroupHost, Limits
from pinnace.errors import ConfigError, HostError

MiB = 1 << 20

# --- real cgroups ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host() -> CgroupHost:
    if os.geteuid() != 0:
        pytest.skip("real cgroups: needs root (writes under /sys/fs/cgroup)")
    found = cgroup.detect()
    if found.problem:
        pytest.skip(f"real cgroups: none usable here: {found.problem}")
    if set(found.controllers) != set(cgroup.CONTROLLERS):
        pytest.skip(f"real cgroups: only {', '.join(found.controllers)} writable here, "
                    "the tests need memory, cpu and pids")
    return found


@pytest.fixture(scope="module")
def parent(host: CgroupHost) -> Iterator[str]:
    """A parent of this test run's own, removed at the end with whatever is left in it."""
    name = f"pinnace-test-{os.getpid()}"
    yield name
    for path in host.dirs(name):
        for sub in (p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else ():
            Cgroup(sub, parent=name, host=host).remove()
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()


def job_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def reap() -> Iterator[None]:
    """Kill what a test started and left running, reap it and close its pipes."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        with proc:
            pass


def start(group: Cgroup, code: str) -> subprocess.Popen[str]:
    """``python3 -c code`` in the group; the code waits for a line on stdin first, so it
    does nothing before it is in the group."""
    proc: subprocess.Popen[str] = cgroup.spawn_in(group, [sys.executable, "-c", textwrap.dedent(code)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    STARTED.append(proc)
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_create_writes_the_limits(host: CgroupHost, parent: str) -> None:
    name = job_name()
    group = Cgroup.create(name, Limits(64 * MiB, 0.5, 32), parent=parent, host=host)
    try:
        if host.version == "v1":
            mounts = dict(host.mounts)
            mem = mounts["memory"] / parent / name
            assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * MiB
            if (mem / "memory.memsw.limit_in_bytes").exists():
                assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 64 * MiB
            assert "oom_kill_disable 0" in (mem / "memory.oom_control").read_text()
            cpu = mounts["cpu"] / parent / name
            assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert (mounts["pids"] / parent / name / "pids.max").read_text().strip() == "32"
            assert sorted(group.paths) == sorted({m / parent / name for m in mounts.values()})
        else:
            (path,) = group.paths
            assert (path / "memory.max").read_text().strip() == str(64 * MiB)
            assert (path / "cpu.max").read_text().split() == ["50000", "100000"]
            assert (path / "pids.max").read_text().strip() == "32"
        # Again, with the limits lifted: the same group, new values.
        again = Cgroup.create(name, Limits(), parent=parent, host=host)
        assert again.paths == group.paths
        if host.version == "v1":
            assert (dict(host.mounts)["pids"] / parent / name / "pids.max").read_text() == "max\n"
            cpu = dict(host.mounts)["cpu"] / parent / name
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "-1"
        assert group.procs() == []
        assert group.oom_killed() is False
    finally:
        group.remove()


def test_memory_hog_is_oom_killed(host: CgroupHost, parent: str) -> None:
    group = Cgroup.create(job_name(), Limits(64 * MiB, None, None), parent=parent, host=host)
    try:
        proc = start(group, """
            import sys
            sys.stdin.readline()
            hoard = []
            while True:
                hoard.append(b"\\x01" * (1 << 20))  # written, so really resident
        """)
        assert group.procs() == [proc.pid]
        go(proc)
        assert proc.wait(timeout=10) == -9
        count, source = group.oom_kills()
        assert group.oom_killed(), source
        assert count >= 1
        assert "oom_kill" in source  # the kernel's count, not the failcnt fallback
        peak = group.usage()["memory_peak"]
        assert peak is not None and 32 * MiB < peak <= 64 * MiB
    finally:
        group.remove()


def test_pids_limit_stops_a_fork_loop(host: CgroupHost, parent: str) -> None:
    limit = 32
    group = Cgroup.create(job_name(), Limits(pids=limit), parent=parent, host=host)
    try:
        proc = start(group, """
            import os, sys
            sys.stdin.readline()
            r, w = os.pipe()
            n, err = 0, 0
            while n < 1000:
                try:
                    pid = os.fork()
                except OSError as e:
                    err = e.errno
                    break
                if pid == 0:
                    os.close(w)
                    os.read(r, 1)  # until the parent closes its end
                    os._exit(0)
                n += 1
            print(n, err, flush=True)
            os.close(w)
            for _ in range(n):
                os.wait()
        """)
        go(proc)
        out, _ = proc.communicate(timeout=10)
        forked, err = map(int, out.split())
        assert err == errno.EAGAIN
        assert forked == limit - 1  # the loop itself is the 32nd
        assert proc.returncode == 0
        assert group.usage()["pids_current"] == 0
    finally:
        group.remove()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a CPU limit shows only with 2+ CPUs")
def test_cpu_limit_halves_a_busy_loop(host: CgroupHost, parent: str) -> None:
    group = Cgroup.create(job_name(), Limits(cpus=0.5), parent=parent, host=host)
    try:
        proc = start(group, """
            import sys, time
            sys.stdin.readline()
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                pass
        """)
        before = group.usage()["cpu_usage_ns"]
        if before is None:
            pytest.skip("no CPU accounting (cpuacct) for the group here")
        t0 = time.monotonic()
        go(proc)
        assert proc.wait(timeout=10) == 0
        wall = time.monotonic() - t0
        used = (group.usage()["cpu_usage_ns"] or 0) - before
        assert 0.3 < used / 1e9 / wall < 0.7, (used, wall)
    finally:
        group.remove()


def test_remove_kills_leftovers_everywhere(host: CgroupHost, parent: str) -> None:
    group = Cgroup.create(job_name(), Limits(128 * MiB, 1, 16), parent=parent, host=host)
    proc = start(group, """
        import os, sys, time
        sys.stdin.readline()
        if os.fork() == 0:
            os.setsid()  # a grandchild in a session of its own: still in the group
            time.sleep(60)
            os._exit(0)
        print(os.getpid(), flush=True)
        time.sleep(60)
    """)
    go(proc)
    assert proc.stdout is not None
    proc.stdout.readline()
    deadline = time.monotonic() + 5
    while len(group.procs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = group.procs()
    assert proc.pid in pids and len(pids) == 2
    # A cgroup below the group (as a job could make) goes too.
    (group.paths[0] / "inner").mkdir()
    group.remove()
    assert proc.wait(timeout=5) == -9
    assert all(gone(pid) for pid in pids)
    assert not any(p.exists() for p in group.paths)
    assert not group.exists()
    group.remove()  # idempotent


def test_remove_refuses_to_kill_the_caller(host: CgroupHost, parent: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    group = Cgroup.create(job_name(), Limits(), parent=parent, host=host)
    try:
        proc = start(group, "import sys; sys.stdin.readline()")
        with monkeypatch.context() as m:  # as if the caller had put itself in the group
            m.setattr(os, "getpid", lambda: proc.pid)
            with pytest.raises(HostError, match="refusing to kill it"):
                group.remove()
        go(proc)
        proc.wait(timeout=5)
    finally:
        group.remove()


def test_gc_removes_only_empty_groups(host: CgroupHost, parent: str) -> None:
    empty = Cgroup.create(job_name(), Limits(pids=8), parent=parent, host=host)
    busy = Cgroup.create(job_name(), Limits(pids=8), parent=parent, host=host)
    proc = start(busy, "import sys; sys.stdin.readline()")
    try:
        assert cgroup.gc_leftovers(parent, host=host) == []  # too young
        assert cgroup.gc_leftovers(parent, host=host, min_age=0) == [empty.name]
        assert not empty.exists()
        assert busy.exists() and busy.procs() == [proc.pid]
        go(proc)
        proc.wait(timeout=5)
        assert cgroup.gc_leftovers(parent, host=host, min_age=0) == [busy.name]
    finally:
        busy.remove()


def test_spawn_in_kills_the_child_when_it_cannot_be_moved(host: CgroupHost,
                                                          parent: str) -> None:
    group = Cgroup(job_name(), parent=parent, host=host)  # never created
    with pytest.raises(HostError, match=r"cgroup\.procs: No such file"):
        cgroup.spawn_in(group, ["sleep", "30"])
    assert children_running("sleep") == []  # killed and reaped


def children_running(program: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and Path(f"/proc/{entry}/cmdline").read_bytes(
                    ).split(b"\0")[0] == program.encode():
                out.append(int(entry))
    return out


def test_unified_mount_without_controllers_is_an_error() -> None:
    """This host's hybrid v2 mount (if any) has none of memory, cpu, pids."""
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.controllers").is_file():
        pytest.skip("no hybrid cgroup v2 mount at /sys/fs/cgroup/unified")
    if {"memory", "cpu", "pids"} & set((unified / "cgroup.controllers").read_text().split()):
        pytest.skip("this host's unified mount has controllers")
    found = cgroup.detect(unified, base="/")  # the root, even if this user may not write it
    assert found.version == "v2" and found.controllers == ()
    with pytest.raises(HostError, match="offers none of memory, cpu, pids") as info:
        Cgroup.create("x", Limits(), parent="pinnace-never", host=found)
    assert "\n" not in str(info.value)
    assert not (unified / "pinnace-never").exists()


def test_real_v2_core_on_the_hybrid_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    """The v2 paths that need no controller, on this host's real cgroup v2 mount: a group
    made in it, a process moved in, CPU time from cpu.stat, and remove() by cgroup.kill
    alone (the per-pid SIGKILL fallback switched off) and rmdir."""
    unified = Path("/sys/fs/cgroup/unified")
    if os.geteuid() != 0 or not (unified / "cgroup.controllers").is_file():
        pytest.skip("needs root and a hybrid cgroup v2 mount at /sys/fs/cgroup/unified")
    if not os.access(unified, os.W_OK):
        pytest.skip(f"{unified} is not writable")
    host = CgroupHost("v2", unified)  # no controllers: only the core files
    parent = f"pinnace-test-{os.getpid()}"
    group = Cgroup.create(job_name(), Limits(), parent=parent, host=host)
    try:
        assert group.paths == [unified / parent / group.name]
        proc = start(group, """
            import sys
            sys.stdin.readline()
            while True:
                pass
        """)
        go(proc)
        assert group.procs() == [proc.pid]
        time.sleep(0.2)
        assert (group.usage()["cpu_usage_ns"] or 0) > 50_000_000
        assert group.oom_kills() == (0, "no memory controller in this group")
        if not (group.paths[0] / "cgroup.kill").exists():
            pytest.skip("this kernel has no cgroup.kill (Linux < 5.14)")
        monkeypatch.setattr(Cgroup, "_kill", lambda self, pids: None)
        group.remove()
        assert proc.wait(timeout=5) == -9
        assert not group.exists()
        assert (unified / parent).is_dir()
    finally:
        monkeypatch.undo()
        group.remove()
        with contextlib.suppress(FileNotFoundError):
            (unified / parent).rmdir()


# --- names and limits --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", ".hidden", "../x", "-x", "a b",
                                  "memory.max", "cgroup.procs", "tasks", "cpu.x",
                                  "x" * 129, "ä", "a\n"])
def test_bad_names_are_refused(name: str) -> None:
    host = CgroupHost("v2", Path("/nonexistent"), controllers=("memory",))
    with pytest.raises(ConfigError):
        Cgroup(name, host=host)
    with pytest.raises(ConfigError):
        Cgroup("ok", parent=name, host=host)


def test_good_names() -> None:
    host = CgroupHost("v2", Path("/r"), controllers=("memory",), base_parts=("a",))
    group = Cgroup("job-1.2_X", parent="ci.pinnace", host=host)
    assert group.paths == [Path("/r/a/ci.pinnace/job-1.2_X")]
    assert cgroup.validate_name("x" * 128) == "x" * 128


def test_limit_parsing() -> None:
    assert cgroup.parse_memory("2G") == 2 << 30
    assert cgroup.parse_memory("512M") == 512 * MiB
    assert cgroup.parse_memory("512") == 512 * MiB  # MiB, as --memory
    assert cgroup.parse_cpus("1.5") == 1.5
    assert cgroup.parse_pids("64") == 64
    limits = Limits.parse("2G", "1.5", "256")
    assert limits == Limits(2 << 30, 1.5, 256)
    assert limits.cpu_quota_us() == 150_000
    assert Limits.parse("max", None, "max") == Limits()
    assert Limits(cpus=0.01).cpu_quota_us() == 1000
    for bad in ("0", "-1", "abc", "nan", "inf", "0.001"):
        with pytest.raises(ConfigError):
            cgroup.parse_cpus(bad)
    for bad in ("0", "-3", "1.5", str(cgroup.MAX_PIDS + 1)):
        with pytest.raises(ConfigError):
            cgroup.parse_pids(bad)
    with pytest.raises(ConfigError):
        cgroup.parse_memory("lots")
    with pytest.raises(ConfigError):
        Limits(memory_bytes=4096)
    with pytest.raises(ConfigError):
        Limits(pids=True)


def test_add_refuses_pid_0() -> None:
    group = Cgroup("x", host=CgroupHost("v2", Path("/r"), controllers=("pids",)))
    with pytest.raises(ConfigError):
        group.add(0)


# --- a fake cgroup v2 tree ---------------------------------------------------------------

ALL = "cpuset cpu io memory hugetlb pids rdma misc"


def kernel_files(path: Path, *, procs: str = "", root: bool = False,
                 controllers: str = "cpu memory pids") -> Path:
    """What the kernel shows in a v2 cgroup (the root has no cgroup.type nor limits)."""
    path.mkdir(parents=True, exist_ok=True)
    files = {"cgroup.controllers": controllers + "\n", "cgroup.subtree_control": "",
             "cgroup.procs": procs, "cpu.stat": "usage_usec 0\n"}
    if not root:
        files |= {"cgroup.type": "domain\n", "memory.max": "max\n", "memory.swap.max": "max\n",
                  "cpu.max": "max 100000\n", "pids.max": "max\n", "memory.current": "0\n",
                  "memory.peak": "0\n", "pids.current": "0\n", "cgroup.kill": "",
                  "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"}
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    """A v2 root whose pinnace/job the kernel would have made (mkdir of a fake directory
    makes no files; create() finds these and writes them)."""
    root = kernel_files(tmp_path / "cg", root=True, controllers=ALL, procs="1\n")
    kernel_files(root / "pinnace")
    kernel_files(root / "pinnace" / "job")
    return root


def test_fake_v2_files_and_delegation(fake: Path) -> None:
    host = cgroup.detect(fake, own_cgroup="/")
    assert (host.version, host.controllers, host.base) == ("v2", ("memory", "cpu", "pids"),
                                                           fake)
    group = Cgroup.create("job", Limits(64 * MiB, 1.5, 32), host=host)
    job = fake / "pinnace" / "job"
    assert group.paths == [job]
    assert (fake / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (fake / "pinnace" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (job / "memory.max").read_text() == str(64 * MiB)
    assert (job / "memory.swap.max").read_text() == "0"
    assert (job / "cpu.max").read_text() == "150000 100000"
    assert (job / "pids.max").read_text() == "32"
    assert (job / "cgroup.subtree_control").read_text() == ""  # the job's group is a leaf
    # Again, limits lifted; controllers enabled already (as the kernel lists them: no '+')
    # are not written again.
    (fake / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    (fake / "pinnace" / "cgroup.subtree_control").write_text("memory\n")
    Cgroup.create("job", Limits(), host=host)
    assert (fake / "cgroup.subtree_control").read_text() == "cpu io memory pids\n"
    assert (fake / "pinnace" / "cgroup.subtree_control").read_text() == "+cpu +pids"
    assert [(job / f).read_text() for f in ("memory.max", "memory.swap.max", "cpu.max",
                                            "pids.max")] == ["max", "max", "max 100000", "max"]


def test_fake_v2_oom_and_usage(fake: Path) -> None:
    group = Cgroup.create("job", Limits(64 * MiB), host=cgroup.detect(fake, own_cgroup="/"))
    job = fake / "pinnace" / "job"
    assert not group.oom_killed()
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    assert group.oom_killed()
    assert group.oom_kills() == (1, f"{job / 'memory.events'} oom_kill")
    (job / "memory.current").write_text("1234\n")
    (job / "memory.peak").write_text("5678\n")
    (job / "pids.current").write_text("3\n")
    (job / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (job / "cgroup.procs").write_text("11\n12\n")
    assert group.usage() == {"memory_current": 1234, "memory_peak": 5678, "pids_current": 3,
                             "cpu_usage_ns": 1_500_000}
    assert group.procs() == [11, 12]


def test_fake_v2_base_in_a_delegated_subtree(tmp_path: Path) -> None:
    """Not the real root (it has cgroup.type: a cgroup namespace's root) and holding
    processes: the base is the deepest cgroup above ours that holds none."""
    root = kernel_files(tmp_path / "cg", controllers=ALL, procs="1\n")
    own = "/user.slice/user-1000.slice/user@1000.service/app.slice/run-1.scope"
    path = root
    for part, procs in [("user.slice", ""), ("user-1000.slice", ""),
                        ("user@1000.service", "900\n"), ("app.slice", ""),
                        ("run-1.scope", f"{os.getpid()}\n")]:
        path = kernel_files(path / part, procs=procs)
    kernel_files(path.parent / "pinnace" / "job")
    kernel_files(path.parent / "pinnace")
    host = cgroup.detect(root, own_cgroup=own)
    assert host.base == path.parent  # app.slice
    Cgroup.create("job", Limits(pids=4), host=host)
    assert (path.parent / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (path.parent / "pinnace" / "job").is_dir()
    # With processes everywhere up the tree, there is no base, and creating says why.
    (path.parent / "cgroup.procs").write_text("5\n")
    for p in (root / "user.slice", root / "user.slice" / "user-1000.slice"):
        (p / "cgroup.procs").write_text("6\n")
    host = cgroup.detect(root, own_cgroup=own)
    assert host.problem.startswith(f"cgroup v2: no cgroup from {own} up to {root}")
    with pytest.raises(HostError, match="Delegate=yes") as info:
        Cgroup.create("job", Limits(), host=host)
    assert "\n" not in str(info.value)
    # An explicit base is taken as given.
    assert cgroup.detect(root, base="user.slice", own_cgroup=own).base == root / "user.slice"


def test_fake_v2_without_controllers(tmp_path: Path) -> None:
    root = kernel_files(tmp_path / "cg", root=True, controllers="")
    host = cgroup.detect(root, own_cgroup="/")
    assert host.version == "v2" and host.controllers == ()
    with pytest.raises(HostError, match=r"offers none of memory, cpu, pids .*'empty'") as info:
        Cgroup.create("job", Limits(), host=host)
    assert "\n" not in str(info.value)
    assert "subtree_control" in info.value.hint
    assert cgroup.gc_leftovers(host=host) == []


def test_fake_v2_missing_controller_for_a_limit(tmp_path: Path) -> None:
    root = kernel_files(tmp_path / "cg", root=True, controllers="cpu memory")
    kernel_files(root / "pinnace")
    job = kernel_files(root / "pinnace" / "job")
    (job / "pids.max").unlink()
    host = cgroup.detect(root, own_cgroup="/")
    assert host.controllers == ("memory", "cpu")
    with pytest.raises(HostError, match=r"cgroup.controllers lacks pids"):
        Cgroup.create("job", Limits(pids=10), host=host)
    Cgroup.create("job", Limits(memory_bytes=64 * MiB), host=host)
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu"
    assert (job / "memory.max").read_text() == str(64 * MiB)


def test_fake_v2_symlinks_are_not_followed(fake: Path, tmp_path: Path) -> None:
    elsewhere = kernel_files(tmp_path / "elsewhere")
    (fake / "pinnace" / "evil").symlink_to(elsewhere)
    host = cgroup.detect(fake, own_cgroup="/")
    with pytest.raises(HostError, match=r"pinnace/evil: .*symlink") as info:
        Cgroup.create("evil", Limits(pids=1), host=host)
    assert "\n" not in str(info.value)
    assert (elsewhere / "pids.max").read_text() == "max\n"
    with pytest.raises(HostError, match="symlink"):
        Cgroup("evil", host=host).usage()


def test_fake_v2_write_error_names_the_file(fake: Path) -> None:
    (fake / "pinnace" / "job" / "pids.max").unlink()
    (fake / "pinnace" / "job" / "pids.max").mkdir()  # EISDIR on open for writing
    host = cgroup.detect(fake, own_cgroup="/")
    with pytest.raises(HostError, match=r"cannot write '5' to .*/pinnace/job/pids.max: ") as info:
        Cgroup.create("job", Limits(pids=5), host=host)
    assert "\n" not in str(info.value)
