"""The pytest plugin's parts that need no guest: options, markers, names, report
helpers; and ownership of networks and volumes (real files, no QEMU)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pinnace import pytest_plugin as plugin
from pinnace import reaper
from pinnace.backends.fake import FakeBackend
from pinnace.client import AsyncPinnace
from pinnace.store import drop_owner, owner_of, proc_start_time

pytest_plugins = ["pytester"]


class _Item:
    """What vm_options reads of a test item: its markers, closest first."""

    def __init__(self, *marks: pytest.MarkDecorator) -> None:
        self._marks = [m.mark for m in marks]

    def iter_markers(self, name: str):
        return (m for m in self._marks if m.name == name)


def test_vm_options_closest_marker_wins_then_the_parameter():
    item = _Item(pytest.mark.pinnace(memory="384M"),  # the function's own (closest)
                 pytest.mark.pinnace(image="img", memory="1G", cpus=2))  # its module's
    assert plugin.vm_options(item, None) == {"image": "img", "memory": "384M", "cpus": 2}
    assert plugin.vm_options(item, {"memory": "320M"})["memory"] == "320M"
    assert plugin.vm_options(item, "other")["image"] == "other"
    assert plugin.vm_options(_Item(), None) == {}


@pytest.mark.parametrize(("marks", "param", "message"), [
    ((pytest.mark.pinnace(volume="x"),), None, "pinnace option 'volume' is unknown"),
    ((pytest.mark.pinnace("img"),), None, "keyword options only"),
    ((), 3, "give an image name or a dict"),
    ((), {"disk": 1}, "pinnace option 'disk' is unknown"),
])
def test_vm_options_refuses_what_it_does_not_take(marks, param, message):
    with pytest.raises(pytest.fail.Exception, match=message):
        plugin.vm_options(_Item(*marks), param)


def test_test_folder_is_readable_unique_and_safe():
    a = plugin.test_folder("tests/test_x.py::test_y[a/b]")
    b = plugin.test_folder("tests/test_x.py::test_y[a_b]")
    assert a != b and "/" not in a and a.startswith("tests_test_x.py_test_y_a_b")
    assert len(plugin.test_folder("x" * 1000)) < 120


def test_printable_defuses_the_guests_control_characters():
    assert plugin.printable("ok\x1b[2J\x07\ttab") == "ok?[2J?\ttab"


def test_options_are_checked_in_one_line(pytester):
    pytester.makepyfile(test_a="def test_a():\n    pass\n")
    result = pytester.runpytest_subprocess("--pinnace-keep=sometimes")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--pinnace-keep: invalid choice: 'sometimes'*"])
    pytester.makeini("[pytest]\npinnace_timeout = soon\n")
    result = pytester.runpytest_subprocess()
    assert result.ret != 0
    result.stderr.fnmatch_lines(["ERROR: pinnace timeout 'soon': give a number of seconds "
                                 "above 0"])
    assert "Traceback" not in result.stderr.str()


def test_tests_using_the_fixtures_are_marked_and_can_be_deselected(pytester, tmp_path):
    """-m 'not pinnace' skips them without making anything (the store stays empty)."""
    pytester.makepyfile(test_a='''
def test_plain():
    pass

def test_machine(vm):
    raise AssertionError("must not run")

def test_net(network_factory):
    raise AssertionError("must not run")
''')
    home = tmp_path / "store"
    result = pytester.runpytest_subprocess("-m", "not pinnace", f"--pinnace-home={home}")
    result.assert_outcomes(passed=1, deselected=2)
    assert not home.exists()
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.pinnace(image=None, cpus=None, memory=None, "
                                 "net=None, timeout=None): *"])


def test_the_plugin_loads_from_its_entry_point(pytester):
    pytester.makepyfile(test_a='''
def test_loaded(request):
    plugin = request.config.pluginmanager.get_plugin("pinnace")
    assert plugin.__name__ == "pinnace.pytest_plugin"
''')
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_ephemeral_networks_and_volumes_go_with_their_owner(tmp_path):
    """A network or volume made ephemeral carries its owner; gc removes it once that
    process is gone, release() removes this process's own, keep() takes it out of
    both. Real files; the fake backend (no machines are involved)."""
    pn = AsyncPinnace(tmp_path / "home", backend=FakeBackend())

    async def main():
        mine = await pn.networks.create("mine", ephemeral=True)
        assert mine.subnet == "10.100.0.0/24"  # the first free /24 of 10.100.0.0/16
        second = await pn.networks.create("second", ephemeral=True)
        assert second.subnet == "10.100.1.0/24"
        plain = await pn.networks.create("plain", "10.100.2.0/24")
        assert (await pn.networks.create("after", ephemeral=True)).subnet == "10.100.3.0/24"
        vol = await pn.volumes.create("vol", "16M", ephemeral=True)
        assert owner_of(pn.store.network_files("mine")) and owner_of(pn.store.volume_files(vol.name))
        assert owner_of(pn.store.network_files(plain.name)) is None
        # a dead process's: its owner file names a pid that is not running
        pn.store.network_files("second").owner.write_text("999999999 1\n")
        assert [str(r) for r in await pn.gc(owned_only=True)] == [
            "removed network second (made for a process; its owner died)"]
        pn.networks.keep("after")
        removed = sorted(str(r) for r in await pn.release())
        assert removed == ["removed network mine (made for a process; its owner is done)",
                           "removed volume vol (made for a process; its owner is done)"]
        assert sorted(n.name for n in pn.networks.list()) == ["after", "plain"]
        assert await pn.gc() == []
        drop_owner(pn.store.network_files("plain"))  # (none to drop: no error)

    asyncio.run(main())


def test_subnets_are_never_shared_by_networks_made_at_once(tmp_path):
    """Eight clients (each its own event loop, in threads, as xdist workers are in
    processes) make networks without a subnet at once: eight different /24s."""
    home = tmp_path / "home"
    barrier = threading.Barrier(8)
    subnets: list[str] = []

    def make(i: int) -> None:
        pn = AsyncPinnace(home, backend=FakeBackend())
        barrier.wait()
        subnets.append(asyncio.run(pn.networks.create(f"n{i}", ephemeral=True)).subnet)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(subnets) == 8 and len(set(subnets)) == 8


def _owned_network(home, owner: str) -> AsyncPinnace:
    pn = AsyncPinnace(home, backend=FakeBackend())
    asyncio.run(pn.networks.create("net", ephemeral=True))
    pn.store.network_files("net").owner.write_text(owner + "\n")
    return pn


@pytest.mark.parametrize("disarmed", [False, True])
def test_the_reaper_releases_what_its_owner_left_when_it_dies(tmp_path, disarmed):
    """The reaper (python -m pinnace.reaper) waits on its pipe; when the owner dies it
    removes what the owner made ephemeral, unless the owner said 'done' first."""
    owner_proc = subprocess.Popen(["sleep", "60"])
    owner = f"{owner_proc.pid} {proc_start_time(owner_proc.pid)}"
    home = tmp_path / "home"
    pn = _owned_network(home, owner)
    read, write = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(Path(plugin.__file__).parents[1])}
    reaper_proc = subprocess.Popen([sys.executable, "-m", "pinnace.reaper", owner, str(home)],
                                   stdin=read, env=env)
    os.close(read)
    try:
        if disarmed:  # the owner cleaned up itself: the reaper is done at once
            os.write(write, reaper.DONE)
            os.close(write)
            assert reaper_proc.wait(timeout=30) == 0
        else:  # the pipe closes a moment before the owner is gone: it waits
            os.close(write)
            time.sleep(0.3)
            assert reaper_proc.poll() is None
        assert pn.store.network_files("net").dir.exists()
        owner_proc.kill()
        owner_proc.wait()
        assert reaper_proc.wait(timeout=30) == 0
        assert pn.store.network_files("net").dir.exists() == disarmed
    finally:
        owner_proc.kill()
        reaper_proc.kill()
        reaper_proc.wait()


def test_a_worker_is_known_by_its_config_not_the_environment(monkeypatch):
    """A pytest started inside an xdist worker inherits PYTEST_XDIST_WORKER, but is a
    plain session: it prints its own lines."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    settings = plugin.Settings(home=None, image="default", keep="never", artifacts=None,
                               timeout=None)

    class Config:
        pass

    assert plugin.PinnaceSession(Config(), settings).worker == ""  # type: ignore[arg-type]
    worker = Config()
    worker.workerinput = {"workerid": "gw1"}  # type: ignore[attr-defined]
    assert plugin.PinnaceSession(worker, settings).worker == "gw1"  # type: ignore[arg-type]
