"""The pytest plugin as its users run it: pytest sessions of their own (pytester, in
subprocesses, so that the plugin loads from its entry point) that boot real machines.
Each inner test notes what it made in made.jsonl; the outer test checks the report,
the store and the processes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pinnace.errors import NotFoundError
from pinnace.store import proc_argv

pytest_plugins = ["pytester"]

HELPERS = '''
import json, os, pathlib

def record(**fields):
    """Note what a test made, for the test that runs this session."""
    fields["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "")
    with open(pathlib.Path(__file__).parent / "made.jsonl", "a") as f:
        f.write(json.dumps(fields) + "\\n")
'''
INNER_TIMEOUT = 900


def made(pytester) -> list[dict]:
    path = pytester.path / "made.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_test(pytester) -> dict[str, dict]:
    return {r["test"]: r for r in made(pytester) if "test" in r}


def run_inner(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args,
                                         timeout=INNER_TIMEOUT)


def gone(pn, name: str) -> bool:
    return not pn.store.machine_files(name).dir.exists()


def test_passing_failing_marker_and_evidence(pytester, pn):
    """A passing test, a failing one (its report shows the machine's state, last
    commands and console; its full logs go under --pinnace-artifacts), a marker that
    chooses memory and an indirect parameter: and no machine is left afterwards."""
    pytester.makepyfile(helpers=HELPERS)
    pytester.makepyfile(test_inner='''
import pytest
from helpers import record

def test_passes(vm):
    record(test="passes", name=vm.name)
    assert vm.exec(["uname", "-s"]).stdout == b"Linux\\n"

@pytest.mark.pinnace(memory="384M")
def test_memory(vm):
    record(test="memory", name=vm.name)
    kib = int(vm.exec("grep MemTotal /proc/meminfo").stdout.split()[1])
    assert 300_000 < kib <= 384 * 1024

@pytest.mark.pinnace(memory="384M")
@pytest.mark.parametrize("vm", [{"memory": "320M"}], indirect=True)
def test_param_over_marker(vm):
    record(test="param", name=vm.name)
    kib = int(vm.exec("grep MemTotal /proc/meminfo").stdout.split()[1])
    assert kib <= 320 * 1024

def test_fails(vm):
    record(test="fails", name=vm.name)
    vm.exec("echo console-marker-7f3a > /dev/console")
    vm.exec(["false"])
    assert vm.exec(["cat", "/etc/hostname"]).stdout == b"something else\\n"
''')
    artifacts = pytester.path / "artifacts"
    result = run_inner(pytester, f"--pinnace-artifacts={artifacts}")
    result.assert_outcomes(passed=3, failed=1)
    tests = by_test(pytester)
    bad = tests["fails"]["name"]
    result.stdout.fnmatch_lines([
        f"*pinnace machine {bad}*",
        "state: ready",
        "last commands:",
        "*exit 0*echo console-marker-7f3a > /dev/console",
        "*exit 1*false",
        "*exit 0*cat /etc/hostname",
        "console (last 30 lines):",
        "*console-marker-7f3a*",
        f"full logs: {artifacts}/*/{bad}",
    ])
    assert "pinnace machine pt-test-passes" not in result.stdout.str()  # only failures
    [folder] = list(artifacts.glob(f"*test_fails*/{bad}"))
    assert "console-marker-7f3a" in (folder / "serial.log").read_text()
    assert '"command": "false", ' in (folder / "events.jsonl").read_text()
    assert "Linux version" in (folder / "dmesg.txt").read_text()
    assert {"config.json", "state.json"} <= {p.name for p in folder.iterdir()}
    for t in tests.values():
        assert gone(pn, t["name"]), t


def test_keep_failed(pytester, pn):
    """--pinnace-keep=failed: a failed test's machine stays running, out of any session's
    hands (gc leaves it), and the report says how to reach it; a passing test's goes."""
    pytester.makepyfile(helpers=HELPERS)
    pytester.makepyfile(test_inner='''
from helpers import record

def test_ok(vm):
    record(test="ok", name=vm.name)

def test_bad(vm, network_factory):
    net = network_factory()
    record(test="bad", name=vm.name, network=net.name)
    assert False, "keep me"
''')
    result = run_inner(pytester, "--pinnace-keep=failed")
    tests = by_test(pytester)
    try:
        result.assert_outcomes(passed=1, failed=1)
        bad = tests["bad"]["name"]
        result.stdout.fnmatch_lines([
            f"kept running: 'pinnace shell {bad}' gets a shell in it; "
            f"'pinnace delete --force {bad}' removes it",
            "*pinnace: machines kept running*",
            f"*test_bad: kept {bad}: *",
        ])
        assert gone(pn, tests["ok"]["name"])
        kept = pn.machines.get(bad)
        assert str(kept.status().state) == "ready"
        assert not kept.config.ephemeral
        assert kept.exec(["true"]).exit_code == 0
        assert not any(bad in str(r) for r in pn.gc(dry_run=True))
        assert pn.networks.get(tests["bad"]["network"])  # its network is kept with it
    finally:
        if "bad" in tests:
            pn.machines.delete(tests["bad"]["name"], force=True)
            pn.networks.remove(tests["bad"]["network"])


def test_xdist_two_workers(pytester, pn):
    """pytest-xdist with two workers: each worker's machines have their own names, all
    are removed, and the ready snapshot of a new shape is built once for both."""
    pytest.importorskip("xdist")
    memory = f"{random.randrange(264, 480, 8)}M"  # a shape no ready snapshot has yet
    pytester.makepyfile(helpers=HELPERS)
    pytester.makepyfile(test_inner=f'''
import pytest, time
from helpers import record

@pytest.mark.pinnace(memory="{memory}")
@pytest.mark.parametrize("i", range(4))
def test_many(vm, network_factory, i):
    net = network_factory()
    record(test=f"many{{i}}", name=vm.name, snapshot=vm.config.snapshot, network=net.name,
           subnet=net.subnet)
    assert vm.exec(["true"]).exit_code == 0
    time.sleep(1)
''')
    result = run_inner(pytester, "-n", "2")
    records = made(pytester)
    try:
        result.assert_outcomes(passed=4)
        assert {r["worker"] for r in records} == {"gw0", "gw1"}
        names = [r["name"] for r in records]
        assert len(set(names)) == 4
        for r in records:
            assert r["name"].startswith(f"pt{r['worker'][2:]}-test-many"), r
            assert gone(pn, r["name"])
            with pytest.raises(NotFoundError):
                pn.networks.get(r["network"])
        assert len({r["snapshot"] for r in records}) == 1  # built once, by one worker
    finally:
        for r in records[:1]:  # the odd shape's ready snapshot is of no further use
            for pointer in pn.store.ready_dir.glob("*.json"):
                if r["snapshot"] and json.loads(pointer.read_text()).get("ref") == r["snapshot"]:
                    pointer.unlink()
            pn.gc()


HOLD = '''
import time
from helpers import record

def test_hold(vm_factory, network_factory, volume_factory):
    net = network_factory()
    vol = volume_factory("64M")
    m = vm_factory(networks=[net], volumes=[(vol, "/data")])
    record(test="hold", name=m.name, network=net.name, volume=vol.name)
    time.sleep(600)
'''


def reapers_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        argv = proc_argv(int(entry)) if entry.isdigit() else None
        if argv and "pinnace.reaper" in argv and any(a.startswith(f"{pid} ") for a in argv):
            out.append(int(entry))
    return out


def kill_holding_session(pytester, pn, *, reaper_too: bool, sig=signal.SIGKILL) -> dict:
    """Start a session whose test holds a machine, a network and a volume; kill it with
    ``sig`` (and its reaper first with SIGKILL, if asked) once they exist, and wait for
    it to end. Returns what it made."""
    pytester.makepyfile(helpers=HELPERS, test_hold=HOLD)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                             "test_hold.py"], cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + INNER_TIMEOUT
        while not by_test(pytester).get("hold"):
            assert proc.poll() is None, "the session ended before it made its machine"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        [reaper] = reapers_of(proc.pid)
        if reaper_too:
            os.kill(reaper, signal.SIGKILL)
    finally:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=120)
        finally:
            proc.kill()
            proc.wait()
    return by_test(pytester)["hold"]


def left_behind(pn, left: dict) -> list[str]:
    return [kind for kind, path in (
        ("machine", pn.store.machine_files(left["name"]).dir),
        ("network", pn.store.network_files(left["network"]).dir),
        ("volume", pn.store.volume_files(left["volume"]).dir)) if path.exists()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_session_cleans_up_itself(pytester, pn, sig):
    """Ctrl-C (SIGINT), or SIGTERM (an IDE's stop button): the session's own teardown
    removes its machine, network and volume (its reaper was killed first, so it was
    not the reaper)."""
    left = kill_holding_session(pytester, pn, reaper_too=True, sig=sig)
    assert left_behind(pn, left) == []


def test_sigkilled_session_is_cleaned_by_its_reaper(pytester, pn):
    """A session killed with SIGKILL: its reaper removes its machine, network and
    volume within seconds."""
    left = kill_holding_session(pytester, pn, reaper_too=False)
    deadline = time.monotonic() + 60
    while left_behind(pn, left):
        assert time.monotonic() < deadline, f"still there: {left_behind(pn, left)}"
        time.sleep(0.2)


def test_sigkilled_session_and_reaper_are_cleaned_by_the_next(pytester, pn):
    """A session killed with SIGKILL, its reaper too: its machine runs on (QEMU outlives
    them), and the next session removes it, its network and volume before it makes
    anything, saying so."""
    left = kill_holding_session(pytester, pn, reaper_too=True)
    time.sleep(1)
    assert left_behind(pn, left) == ["machine", "network", "volume"]
    assert str(pn.machines.get(left["name"]).status().state) == "ready"
    pytester.makepyfile(test_next="def test_next(pinnace):\n    pass\n")
    result = run_inner(pytester, "test_next.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"pinnace: removed machine {left['name']} *its owner died*"])
    assert left_behind(pn, left) == []


def test_a_machine_that_dies_fails_its_test_with_the_reason(pytester):
    """A guest whose kernel panics, that runs out of memory or whose QEMU is killed fails
    its test at once, saying which: not after a command's timeout."""
    pytester.makepyfile(test_inner='''
import os, signal, threading, time
import pytest

def test_panic(vm):
    vm.exec("echo c > /proc/sysrq-trigger", timeout=120)

@pytest.mark.pinnace(memory="256M")
def test_oom(vm):
    vm.exec("sysctl -qw vm.panic_on_oom=1 && tail /dev/zero", timeout=120)

def test_killed(vm):
    pid = vm.status().pid
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    vm.exec(["sleep", "120"], timeout=120)
''')
    t0 = time.monotonic()
    result = run_inner(pytester)
    took = time.monotonic() - t0
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines_random([
        "*MachineCrashed*the machine died during a command: the guest kernel panicked: "
        "sysrq triggered crash*",
        "*MachineCrashed*the machine died during a command: the guest ran out of memory "
        "and its kernel panicked*",
        "*MachineCrashed*the machine died during a command: QEMU killed by SIGKILL*",
        "state: failed (the guest kernel panicked: sysrq triggered crash)",
    ])
    assert took < 120, f"{took:.0f} s: a dead machine was waited for"


def test_disabled_with_no_pinnace(pytester):
    """-p no:pinnace turns the plugin off: its fixtures are gone."""
    pytester.makepyfile(test_inner="def test_x(vm):\n    pass\n")
    result = run_inner(pytester, "-p", "no:pinnace")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'vm' not found*"])


@pytest.fixture(autouse=True)
def _inner_env(monkeypatch):
    # The inner sessions use the outer one's store and restricted NAT (tests/conftest.py).
    assert os.environ.get("PINNACE_DEFAULT_NET") == "restricted"


def test_the_docs_examples_pass(pytester, pn):
    """Every test in docs/pytest.md, run as written there (with the second image it
    builds, as it says), passes."""
    docs = (Path(__file__).parents[2] / "docs" / "pytest.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, flags=re.S)
    tests = [b for b in blocks if "def test_" in b]
    assert len(tests) >= 5
    built = re.search(r"pinnace image build (tools --package \S+)", docs)
    assert built, "the docs say how the second image is built"
    name, _, package = built.group(1).partition(" --package ")
    pn.images.build(name, packages=[package])
    for i, block in enumerate(tests):
        pytester.makepyfile(**{f"test_doc{i}": block})
    result = run_inner(pytester)
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"passed"}, result.stdout.str()  # none failed, none skipped
    assert outcomes["passed"] >= sum(block.count("def test_") for block in tests)


def test_testinfra_hosts_option_reaches_a_machine(pytester, pn):
    """`pytest --hosts=pinnace://NAME`: testinfra's own `host` fixture on a machine kept
    running outside the session (the plugin registers the backend; no import needed)."""
    pytest.importorskip("testinfra")
    [m] = pn.machines.run(name=f"hosts-{os.getpid()}", rm=True)
    try:
        pytester.makepyfile(test_inner='''
def test_host(host):
    assert host.backend.get_connection_type() == "pinnace"
    assert host.file("/etc/os-release").contains("bookworm")
    assert host.check_output("hostname") == host.backend.get_hostname()
''')
        result = run_inner(pytester, f"--hosts=pinnace://{m.name}", "-v")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*test_host[[]pinnace://{m.name}[]] PASSED*"])
    finally:
        m.delete(force=True)
