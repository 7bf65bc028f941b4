"""Many CLI calls at once on one machine; a store on a full filesystem."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pinnace import Pinnace


def cli(home, *args, timeout=240, **kw):
    env = {**os.environ, "PINNACE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "pinnace.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, **kw)


def one_line_error(r) -> bool:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("pinnace: error: ")


def test_twenty_concurrent_cli_calls_on_one_machine(pn, pinnace_home, machine, tmp_path):
    """exec, cp both ways, stop and start, twenty at once: each succeeds with all of its
    output, or fails with one line; afterwards the machine works."""
    rng = random.Random(11)
    src = tmp_path / "in.txt"
    src.write_text("payload\n" * 1000)
    env = {**os.environ, "PINNACE_HOME": str(pinnace_home)}
    calls = []
    for i in range(20):
        kind = rng.choice(["exec", "exec", "exec", "put", "get", "stop", "start"])
        if kind == "exec":
            argv = ["exec", machine.name, "--", "sh", "-c", f"seq 1 {200 + i}"]
        elif kind == "put":
            argv = ["cp", str(src), f"{machine.name}:/tmp/in-{i}.txt"]
        elif kind == "get":
            argv = ["cp", f"{machine.name}:/etc/os-release", str(tmp_path / f"out-{i}")]
        else:
            argv = [kind, machine.name]
        calls.append((i, kind, subprocess.Popen(
            [sys.executable, "-m", "pinnace.cli", *argv], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    outcomes = {}
    for i, kind, proc in calls:
        out, err = proc.communicate(timeout=300)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if r.returncode == 0:
            if kind == "exec":
                assert out == "".join(f"{n}\n" for n in range(1, 200 + i + 1)), (i, out[-200:])
            elif kind == "get":
                assert "ID=debian" in (tmp_path / f"out-{i}").read_text()
            outcomes[i] = "ok"
        else:
            assert one_line_error(r), f"call {i} ({kind}) failed with:\n{err}"
            assert "Traceback" not in err
            outcomes[i] = err.strip()
    assert "ok" in outcomes.values()
    st = machine.status()
    assert st.state in ("ready", "stopped"), st
    if st.state == "stopped":
        machine.start()
    assert machine.exec(["echo", "fine"]).stdout == b"fine\n"


@pytest.fixture
def small_store(pn, tmp_path_factory):
    """A store on a 48 MiB filesystem, sharing the test store's image (by a link, so the
    image takes no room in it)."""
    mnt = Path(tempfile.mkdtemp(prefix="pn-full-", dir="/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48M", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.strip()}")
    try:
        home = mnt / "h"
        image = pn.images.get("default")
        small = Pinnace(home)
        small.store.ensure()
        (small.store.images_dir / image.digest).symlink_to(image.path)
        small.store.image_ref("default").write_text(image.digest + "\n")
        base = pn.store.cache.base_layer("x").dir.parent
        yield small, home, base
        small.close()
    finally:
        subprocess.run(["pkill", "-KILL", "-f", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        os.rmdir(mnt)


def test_snapshot_on_a_full_filesystem(small_store):
    """The saved state does not fit: a clear error, the machine runs on, nothing half-made
    is listed or left in tmp/."""
    small, home, _ = small_store
    m = small.machines.create("m", memory="256M", net="none")
    m.start()
    r = cli(home, "snapshot", "create", "m", "snap")
    assert r.returncode == 1 and one_line_error(r), r.stderr
    assert "space" in r.stderr or "full" in r.stderr or "No space" in r.stderr, r.stderr
    assert cli(home, "snapshot", "ls", "--format", "json").stdout.strip() == "[]"
    assert m.status().state == "ready"
    assert m.exec(["echo", "alive"]).stdout == b"alive\n"
    assert list(small.store.tmp_dir.iterdir()) == []
    m.delete(force=True)


def test_image_build_on_a_full_filesystem(small_store):
    """The image does not fit: a clear error, no image listed, nothing left in tmp/."""
    small, home, base = small_store
    for linked in small.store.images_dir.iterdir():  # built here, not borrowed
        linked.unlink()
    cache_base = small.store.cache.base_layer("x").dir.parent
    cache_base.parent.mkdir(parents=True, exist_ok=True)
    cache_base.symlink_to(base)  # the mmdebstrap layer, from the test store's cache
    r = cli(home, "image", "build", "big", timeout=600)
    assert r.returncode == 1, r.stderr
    assert "pinnace: error:" in r.stderr and "Traceback" not in r.stderr
    assert "space" in r.stderr or "full" in r.stderr, r.stderr
    listed = json.loads(cli(home, "image", "ls", "--format", "json").stdout)
    assert [i for i in listed if "big" in i["names"]] == []
    assert [p.name for p in small.store.tmp_dir.iterdir()] == []


def test_qemu_runs_sandboxed_and_its_state_still_saves_and_loads(make_machine):
    """QEMU runs under seccomp (-sandbox: it may not start programs), so a machine's
    state goes to and from its file through a descriptor: a restored machine, then a
    stop --save and a start of it, each work and each QEMU has the filter."""

    def seccomp(m) -> str:
        status = Path(f"/proc/{m.status().pid}/status").read_text()
        return next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Seccomp:"))

    m = make_machine.restored()  # (loaded from the ready snapshot's state)
    assert seccomp(m) == "2"  # a filter, not just strict mode
    m.exec(["sh", "-c", "echo kept > /tmp/x"]).check()
    m.stop(save=True)  # (the state saved)
    m.start()
    assert seccomp(m) == "2"
    assert m.exec(["cat", "/tmp/x"]).stdout == b"kept\n"
