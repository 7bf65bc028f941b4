"""Faults: the CLI, QEMU or a network switch killed with SIGKILL at a bad moment.

Each test kills something at seeded random moments (spread over the command's usual
duration, measured once first) and then checks that pinnace tells the truth and
carries on:

(a) ``pinnace ls`` shows no machine ``starting`` or ``stopping`` once the command that
    moved it is dead, and every machine it shows ``ready`` answers ``exec -- true``
    within a few seconds (a QEMU left paused is not ready);
(b) the next command on the machine works as its state says it should: ``start`` at
    rest, ``exec`` when ready, ``stop``, ``delete --force``;
(c) no QEMU of this store runs without a machine that ``ls`` shows owning it (a
    machine's own QEMU never; a staging QEMU of a dead command at most until
    ``pinnace gc``), none is left once its machine is deleted, and no network switch
    runs for a network that is gone;
(d) ``pinnace gc`` exits 0 and prints one line per thing it removed: ``removed ...``
    for a folder under $PINNACE_HOME/tmp/ left by a dead command (the line names the
    folder), ``killed ...`` for an orphan QEMU or switch process (the line names its
    pid); afterwards tmp/ holds no folder of a dead process, and a second ``pinnace gc``
    prints no such line. ``pinnace gc --dry-run`` names the same things and changes
    nothing.

The CLI runs as a user runs it (``python -m pinnace.cli``) and only its own process is
killed, as Ctrl-\\ would: QEMU and the switches are detached and live on. Machines have
no way off the host (``--net restricted``, or only a pinnace network).

PINNACE_FAULT_SEED (default 1) and PINNACE_FAULT_TRIALS (default 3) replay or widen a
run; every failure message names the trial, the delay and the seed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
SEED = os.environ.get("PINNACE_FAULT_SEED", "1")
TRIALS = int(os.environ.get("PINNACE_FAULT_TRIALS", "3"))


def trials(n: int) -> int:
    """``n`` kills at the default PINNACE_FAULT_TRIALS (3), scaled by it."""
    return max(1, n * TRIALS // 3)

START_TIMEOUT = 150.0  # a boot under TCG on a busy 2-core host
EXEC_TIMEOUT = 5.0  # "within a few seconds": a ready machine answers in well under one
LIVE = ("ready", "running", "paused")
MOVING = ("starting", "stopping")
AT_REST = ("created", "stopped", "failed", "saved")
CHANGE = re.compile(r"^(removed|killed) ")
STAGED = re.compile(r"^[A-Za-z]+-(\d+)-")  # tmp/<what>-<pid>-...: store.staging_dir's names


# --- processes -----------------------------------------------------------------------


def _processes() -> dict[int, list[str]]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            out[int(entry)] = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


def _await_dead(pids, timeout=5.0) -> set[int]:
    deadline = time.monotonic() + timeout
    left = {p for p in pids if _alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if _alive(p)}
    return left


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


# --- the lab: one store, names, the CLI -----------------------------------------------


class Lab:
    """This store, the CLI as a user runs it, unique names, and a look at its processes."""

    def __init__(self, home: str) -> None:
        self.home = str(Path(home).absolute())
        self.env = {**os.environ, "PINNACE_HOME": self.home, "PYTHONPATH": str(SRC),
                    "PINNACE_DEFAULT_NET": "restricted"}
        self.prefix = f"f{os.getpid() % 100000}"
        self._counter = itertools.count()
        # QEMU works in its machine's folder and names the files there relative to it:
        # which machine a QEMU is of is told by its working directory (resolved).
        self.real_home = os.path.realpath(self.home)
        self._machine_re = re.compile(
            "^" + re.escape(self.real_home) + r"/machines/([^/]+?)(?: \(deleted\))?/ ")

    @property
    def tmp(self) -> Path:
        return Path(self.home) / "tmp"

    def name(self, kind: str) -> str:
        return f"{self.prefix}{kind}{next(self._counter)}"

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pinnace.cli", *args]

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the CLI; a timeout is an answer (returncode None), not an exception."""
        try:
            return subprocess.run(self.argv(*args), env=self.env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            return subprocess.CompletedProcess(exc.cmd, None, "",
                                               f"{err}\n(no answer within {timeout:g} s)")

    def ls(self) -> dict[str, dict]:
        r = self.cli("ls", "--format", "json", timeout=30)
        assert r.returncode == 0, f"pinnace ls --format json failed: {r.stderr}"
        return {m["name"]: m for m in json.loads(r.stdout)}

    def names(self, noun: str) -> set[str]:
        r = self.cli(noun, "ls", "--format", "json", timeout=30)
        assert r.returncode == 0, f"pinnace {noun} ls failed: {r.stderr}"
        return {x["name"] for x in json.loads(r.stdout)}

    def qemus(self) -> dict[int, str]:
        """QEMU processes of this store (working in it, or naming it on their command
        line): pid -> "WORKING-DIRECTORY/ COMMAND LINE"."""
        out = {}
        for pid, argv in _processes().items():
            if "qemu-system" not in os.path.basename(argv[0]):
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue  # gone
            where = f"{cwd}/ {' '.join(argv)}"
            if cwd.startswith(f"{self.real_home}/") or f"{self.home}/" in where:
                out[pid] = where
        return out

    def machine_of(self, cmdline: str) -> str | None:
        m = self._machine_re.search(cmdline)
        return m.group(1) if m else None

    def switches(self) -> dict[int, tuple[str, Path]]:
        """Switch and supervisor processes of this store's networks (see
        pinnace.network.switch): pid -> ("switch" or "supervisor", network dir)."""
        return {pid: ("supervisor" if "--supervise" in argv else "switch", Path(argv[-1]))
                for pid, argv in _processes().items()
                if "pinnace.network.switch" in argv and argv[-1].startswith(f"{self.home}/")}

    def stale_tmp(self) -> list[str]:
        """Entries of tmp/ whose name names no live process."""
        if not self.tmp.is_dir():
            return []
        out = []
        for entry in sorted(os.listdir(self.tmp)):
            m = STAGED.match(entry)
            if not m or not _alive(int(m.group(1))):
                out.append(entry)
        return out


# --- one test's machines, objects and findings ----------------------------------------


class Case:
    """What one test made (cleaned up whatever happens) and what it found wrong."""

    def __init__(self, lab: Lab, test: str, rng: random.Random) -> None:
        self.lab = lab
        self.test = test
        self.rng = rng
        self.machines: set[str] = set()
        self.snapshots: set[str] = set()
        self.volumes: set[str] = set()
        self.networks: set[str] = set()
        self.ready_slots: list[str] = []
        self.problems: dict[str, str] = {}  # message -> the trial it was first seen in
        self.trial = "setup"
        self.trials: list[str] = []

    # names
    def machine(self) -> str:
        n = self.lab.name("m")
        self.machines.add(n)
        return n

    def snapshot(self) -> str:
        n = self.lab.name("s")
        self.snapshots.add(n)
        return n

    def volume(self) -> str:
        n = self.lab.name("v")
        self.volumes.add(n)
        return n

    def network(self) -> str:
        n = self.lab.name("n")
        self.networks.add(n)
        return n

    # running things
    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.lab.cli(*args, timeout=timeout)

    def ok(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A setup step: it must work, or the test cannot go on."""
        r = self.cli(*args, timeout=timeout)
        assert r.returncode == 0, (f"[{self.trial}] `pinnace {' '.join(args)}` exited "
                                   f"{r.returncode}: {r.stderr.strip()}")
        return r

    def must(self, what: str, *args: str, timeout: float = 60.0) -> bool:
        """A step the code under test must get right; a finding if it does not."""
        r = self.cli(*args, timeout=timeout)
        if r.returncode != 0:
            self.problem(f"{what}: `pinnace {' '.join(args)}` exited {r.returncode}: "
                         f"{_last_line(r.stderr)}")
        return r.returncode == 0

    def measure(self, *args: str, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        self.ok(*args, timeout=timeout)
        return time.monotonic() - t0

    def delays(self, took: float, n: int) -> list[float]:
        """``n`` moments spread over 10-95 % of ``took``: one random one in each n-th."""
        step = 0.85 / n
        return [self.rng.uniform(0.1 + i * step, 0.1 + (i + 1) * step) * took
                for i in range(n)]

    def kill_during(self, args: list[str], delay: float, trial: str, took: float) -> bool:
        """Start the CLI, SIGKILL it (only it) after ``delay`` s; True if it was killed."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            p = subprocess.Popen(self.lab.argv(*args), env=self.lab.env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            time.sleep(delay)
            killed = p.poll() is None
            if killed:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        how = (f"SIGKILL after {delay:.2f} s of ~{took:.2f} s" if killed
               else f"finished within {delay:.2f} s, not killed")
        self.trial = f"{trial}: `pinnace {' '.join(args)}`, {how}"
        self.trials.append(self.trial)
        return killed

    def kill_when(self, args: list[str], ready, what: str, limit: float, trial: str) -> bool:
        """Start the CLI and SIGKILL it as soon as ``ready(pid)`` holds (a phase of the
        command seen from outside), or after ``limit`` s if it never does."""
        with tempfile.TemporaryFile() as out:
            p = subprocess.Popen(self.lab.argv(*args), env=self.lab.env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            t0 = time.monotonic()
            seen = False
            while p.poll() is None and time.monotonic() - t0 < limit:
                if ready(p.pid):
                    seen = True
                    break
                time.sleep(0.01)
            killed = p.poll() is None
            if killed:
                os.kill(p.pid, signal.SIGKILL)
            took = time.monotonic() - t0
            p.wait(timeout=30)
        how = (f"SIGKILL after {took:.2f} s, " + (f"as soon as {what}" if seen else
               f"though {what} was not seen") if killed else "finished, not killed")
        self.trial = f"{trial}: `pinnace {' '.join(args)}`, {how}"
        self.trials.append(self.trial)
        return killed

    def problem(self, message: str) -> None:
        self.problems.setdefault(message, self.trial)

    def assert_ok(self) -> None:
        if self.problems:
            lines = [f"- [{trial}] {msg}" for msg, trial in self.problems.items()]
            pytest.fail(f"{len(lines)} problem(s) in {self.test} (PINNACE_FAULT_SEED={SEED}):\n"
                        + "\n".join(lines), pytrace=False)

    # (a) ls tells the truth
    def truth(self) -> tuple[dict[str, dict], set[str]]:
        """Check (a); return ls's machines and those shown ready that did not answer."""
        listed = self.lab.ls()
        silent = set()
        for name, m in listed.items():
            state = m["state"]
            if state in MOVING:
                self.problem(f"ls shows {name} {state!r} though the command that moved it is "
                             f"dead (pid {m.get('pid')}, reason {m.get('reason')!r})")
            elif state == "ready":
                t0 = time.monotonic()
                r = self.cli("exec", name, "--", "true", timeout=EXEC_TIMEOUT)
                if r.returncode != 0:
                    silent.add(name)
                    what = (f"did not answer within {EXEC_TIMEOUT:g} s" if r.returncode is None
                            else f"exited {r.returncode} after {time.monotonic() - t0:.1f} s: "
                                 f"{_last_line(r.stderr)}")
                    self.problem(f"ls shows {name} ready but `exec {name} -- true` {what} "
                                 "(a QEMU left paused, or no agent)")
        return listed, silent

    # (c) no QEMU without a machine
    def owners(self, listed: dict[str, dict], *, staging_allowed: bool) -> None:
        """Every QEMU of a machine is the pid ls shows for that machine; QEMUs of no
        machine (staging, of dead commands) are allowed only until gc (``staging_allowed``);
        every switch process has its network."""
        for pid, cmd in self.lab.qemus().items():
            name = self.lab.machine_of(cmd)
            if name is not None:
                m = listed.get(name)
                if m is None:
                    self.problem(f"QEMU pid {pid} of machine {name} runs, but ls does not "
                                 "list that machine")
                elif m.get("pid") != pid or m["state"] not in (*LIVE, *MOVING):
                    self.problem(f"QEMU pid {pid} of machine {name} runs, but ls shows {name} "
                                 f"{m['state']!r} with pid {m.get('pid')} (reason "
                                 f"{m.get('reason')!r}): a QEMU no command knows about")
            elif not staging_allowed:
                self.problem(f"QEMU pid {pid} of no machine (a staging QEMU of a dead "
                             f"command) still runs ({self._where(cmd)})")
        for pid, (_, d) in self.lab.switches().items():
            if not (d / "network.json").exists():
                self.problem(f"switch process pid {pid} runs for network {d.name}, which "
                             "does not exist")

    def _where(self, cmd: str) -> str:
        m = re.search(re.escape(self.lab.real_home) + r"/((tmp|cache)/[^/ ,]+)", cmd)
        return m.group(1) if m else cmd[:120]

    # (b) the next command works
    def recover(self, name: str, listed: dict[str, dict], silent: set[str], *,
                rerun: bool = False) -> str | None:
        """Bring ``name`` to a machine that answers, with the command its state calls for.
        Returns how: "as is" (it answered already), "start" (it was at rest or saved),
        "restart" (it was stuck: stopped and booted by this test), "rerun" (with
        ``rerun``, a stuck machine is deleted and made again by ``run --name``, faster
        than a boot); None if that failed."""
        m = listed.get(name)
        if m is None:
            self.problem(f"{name} is gone from ls")
            return None
        state = m["state"]
        if state == "ready" and name not in silent:
            return "as is"
        if state == "running":  # QEMU runs and the guest may be up: exec should reach it
            r = self.cli("exec", name, "--", "true", timeout=30)
            if r.returncode == 0:
                return "as is"
        how = "start"
        if state not in AT_REST and rerun:  # stuck or silent: delete --force must still work
            if not self.must(f"{name} is {state}: delete --force must work", "delete",
                             "--force", name):
                return None
            if not self.must(f"{name} deleted: its name must be free", "run", "--name", name,
                             "--net", "restricted", timeout=START_TIMEOUT):
                return None
            return "rerun"
        if state not in AT_REST:  # stuck or silent: stop must still bring it down (soon)
            if not self.must(f"{name} is {state}: stop must bring it down", "stop",
                             "--timeout", "2", name):
                return None
            state, how = "stopped", "restart"
        if not self.must(f"{name} is {state}: start must work", "start", name,
                         timeout=START_TIMEOUT):
            return None
        if not self.must(f"{name} was started: exec must work", "exec", name, "--", "true",
                         timeout=30):
            return None
        return how

    def delete(self, *names: str) -> None:
        """delete --force must work, and leave no QEMU of the machine behind."""
        listed = self.lab.ls()
        for n in names:
            if n in listed:
                self.must(f"delete --force {n}", "delete", "--force", n)
        left = {pid: self.lab.machine_of(cmd) for pid, cmd in self.lab.qemus().items()
                if self.lab.machine_of(cmd) in names}
        for pid in _await_dead(left, 3.0):
            self.problem(f"QEMU pid {pid} of {left[pid]} still runs after `delete --force`")

    # (d) gc
    def gc(self) -> None:
        """Run gc after a dead command; check what it says and does, then (c) strictly."""
        listed = self.lab.ls()
        owned = {m["pid"] for m in listed.values() if m["state"] in LIVE and m.get("pid")}
        stale = self.lab.stale_tmp()
        orphans = {pid for pid in self.lab.qemus() if pid not in owned}
        orphans |= {pid for pid, (_, d) in self.lab.switches().items()
                    if not (d / "network.json").exists()}
        r = self.cli("gc", timeout=60)
        changes: list[str] = []
        if r.returncode != 0:
            self.problem(f"`pinnace gc` exited {r.returncode}: {_last_line(r.stderr)}")
        else:
            lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
            changes += [ln for ln in lines if CHANGE.match(ln)]
            other = [ln for ln in lines if not CHANGE.match(ln)]
            if other and (changes or len(other) > 1):
                self.problem(f"`pinnace gc` printed lines that are neither 'removed ...' nor "
                             f"'killed ...': {other[:3]}")
            for entry in stale:
                if not any(ln.startswith("removed ") and entry in ln for ln in changes):
                    self.problem(f"`pinnace gc` printed no 'removed ...' line for tmp/{entry}")
            for pid in orphans:
                if not any(ln.startswith("killed ") and re.search(rf"\b{pid}\b", ln)
                           for ln in changes):
                    self.problem(f"`pinnace gc` printed no 'killed ...' line for orphan "
                                 f"pid {pid}")
        _await_dead(orphans, 3.0)
        for entry in self.lab.stale_tmp():
            self.problem(f"after gc, tmp/{entry} is still there (its process is dead)")
        self.owners(listed, staging_allowed=False)
        if r.returncode == 0 and (stale or orphans or changes):
            again = self.cli("gc", timeout=60)
            changes = [ln for ln in again.stdout.splitlines() if CHANGE.match(ln)]
            if again.returncode != 0 or changes:
                self.problem(f"a second `pinnace gc` did not find nothing to do: exit "
                             f"{again.returncode}, {changes[:3] or _last_line(again.stderr)}")

    # ready snapshots
    def forget_ready_slot(self, memory_mib: int) -> None:
        """Remove the ready snapshot of one machine shape, so the next run builds it."""
        ready = Path(self.lab.home) / "cache" / "ready"
        for pointer in ready.glob(f"*-{memory_mib}m-*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                ref = json.loads(pointer.read_text())["ref"]
                shutil.rmtree(Path(self.lab.home) / ref, ignore_errors=True)
            pointer.unlink(missing_ok=True)
        for d in ready.glob(f"*-{memory_mib}m-*"):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)

    def cleanup(self) -> None:
        """Whatever happened: delete what this test made, end what its killed commands
        left running (by pid), and remove their staging folders."""
        self.trial = "cleanup"
        for n in sorted(self.machines):
            self.cli("delete", "--force", n)
        for s in sorted(self.snapshots):
            self.cli("snapshot", "rm", s)
        for v in sorted(self.volumes):
            self.cli("volume", "rm", v)
        for n in sorted(self.networks):
            self.cli("network", "rm", n)
        ended = set()
        for pid, cmd in self.lab.qemus().items():
            owner = self.lab.machine_of(cmd)
            if owner is None or owner in self.machines:  # ours, or staging of a dead command
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    ended.add(pid)
        for pid, (_, d) in self.lab.switches().items():
            if d.name in self.networks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    ended.add(pid)
        _await_dead(ended)
        if ended:
            time.sleep(0.3)  # QEMU's launcher shell writes its exit status just after
        for mem in self.ready_slots:
            self.forget_ready_slot(int(mem))
        for entry in self.lab.stale_tmp():
            path = self.lab.tmp / entry
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(pinnace_home):
    lab = Lab(pinnace_home)
    r = lab.cli("image", "build", timeout=900)
    assert r.returncode == 0, r.stderr
    return lab


@pytest.fixture
def case(lab, request):
    c = Case(lab, request.node.name, random.Random(f"{SEED}:{request.node.name}"))
    try:
        yield c
    finally:
        c.cleanup()


def _run_machine(case: Case) -> str:
    """A ready machine, restored from the image's ready snapshot (fast)."""
    m = case.machine()
    case.ok("run", "--name", m, "--net", "restricted", timeout=START_TIMEOUT)
    return m


# --- 1. the CLI killed mid-command -------------------------------------------------------


def test_cli_killed_during_start(case):
    """A booting machine whose `start` dies is not left `starting`; start/stop go on."""
    m = case.machine()
    case.ok("create", m, "--net", "restricted")
    took = case.measure("start", m, timeout=START_TIMEOUT)
    case.ok("stop", m)
    for i, delay in enumerate(case.delays(took, trials(2))):
        case.kill_during(["start", m], delay, f"trial {i + 1}", took)
        listed, silent = case.truth()
        case.owners(listed, staging_allowed=True)
        if not case.recover(m, listed, silent):
            break
        case.gc()
        if not case.must("stop after the recovered start", "stop", m):
            break
    case.trial = "end"
    case.delete(m)
    case.assert_ok()


def test_cli_killed_during_stop_save(case):
    """An interrupted `stop --save` leaves the machine saved (start resumes it) or
    rolled back (ready/running, /tmp intact): never paused-but-ready, never stopped."""
    m = _run_machine(case)
    case.ok("exec", m, "--", "sh", "-c", "echo kept > /tmp/note")
    took = case.measure("stop", "--save", m)
    case.ok("start", m, timeout=START_TIMEOUT)
    for i, delay in enumerate(case.delays(took, trials(2))):
        case.kill_during(["stop", "--save", m], delay, f"trial {i + 1}", took)
        listed, silent = case.truth()
        case.owners(listed, staging_allowed=True)
        st = listed.get(m, {})
        if st.get("state") not in ("saved", "ready", "running"):
            case.problem(f"after an interrupted `stop --save`, {m} is {st.get('state')!r} "
                         f"(reason {st.get('reason')!r}); it must be saved (start resumes it) "
                         "or ready/running (rolled back)")
        how = case.recover(m, listed, silent, rerun=True)
        if how is None:
            break
        r = case.cli("exec", m, "--", "cat", "/tmp/note", timeout=30)
        if r.stdout != "kept\n":
            if how not in ("restart", "rerun"):  # else the test replaced it, after a finding
                case.problem(f"/tmp/note is gone from {m}: it was rebooted, not resumed or "
                             f"rolled back ({_last_line(r.stderr)})")
            case.ok("exec", m, "--", "sh", "-c", "echo kept > /tmp/note")
        case.gc()
    case.trial = "end"
    case.delete(m)
    case.assert_ok()


def test_cli_killed_during_snapshot_create(case):
    """The source machine answers after an interrupted snapshot (it is not left paused);
    the snapshot is whole or absent; gc removes the staging QEMU and folder."""
    m = _run_machine(case)
    first = case.snapshot()
    took = case.measure("snapshot", "create", m, first)
    case.ok("snapshot", "rm", first)
    tmp = case.lab.tmp
    kills = [(lambda snap, i=i, delay=delay: case.kill_during(
        ["snapshot", "create", m, snap], delay, f"trial {i + 1}", took))
        for i, delay in enumerate(case.delays(took, trials(2)))]
    # and one aimed at the moment the machine's RAM is being written (it is paused then)
    kills.append(lambda snap: case.kill_when(
        ["snapshot", "create", m, snap], lambda pid: any(tmp.glob(f"*-{pid}-*/stream")),
        "its RAM was being saved", took, "aimed trial"))
    retried = False
    for kill in kills:
        snap = case.snapshot()
        kill(snap)
        listed, silent = case.truth()
        case.owners(listed, staging_allowed=True)
        if not case.recover(m, listed, silent, rerun=True):
            break
        if snap in case.lab.names("snapshot"):
            case.must(f"snapshot {snap} is listed, so it must be whole", "snapshot", "inspect",
                      "--verify", snap)
        elif not retried:  # once per test: a create takes seconds
            retried = True
            case.must(f"snapshot {snap} is not listed, so its name must be free", "snapshot",
                      "create", m, snap)
        if snap in case.lab.names("snapshot"):
            case.must(f"snapshot rm {snap}", "snapshot", "rm", snap)
        case.gc()
    case.trial = "end"
    case.delete(m)
    case.assert_ok()


def test_cli_killed_during_run_rm(case):
    """What an interrupted `run --rm` leaves is shown truthfully and deletes cleanly."""
    run = ["run", "--rm", "--net", "restricted", "--", "true"]
    case.ok(*run, timeout=START_TIMEOUT)  # the ready snapshot exists from here on
    took = case.measure(*run, timeout=START_TIMEOUT)
    for i, delay in enumerate(case.delays(took, trials(3))):
        before = set(case.lab.ls())
        case.kill_during(run, delay, f"trial {i + 1}", took)
        listed, _ = case.truth()
        left = set(listed) - before
        case.machines |= left
        case.owners(listed, staging_allowed=True)
        case.delete(*sorted(left))
        case.gc()
    case.trial = "end"
    case.must("a run after the interrupted ones", *run, timeout=START_TIMEOUT)
    case.assert_ok()


def test_cli_killed_while_run_builds_the_ready_snapshot(case):
    """The first run of a machine shape boots a template and saves it: kill it then."""
    memory = 448  # a shape nothing else uses; its ready snapshot is removed before and after
    case.ready_slots.append(str(memory))
    case.forget_ready_slot(memory)
    run = ["run", "--rm", "--net", "restricted", "--memory", f"{memory}M", "--", "true"]
    before = set(case.lab.ls())
    old = set(case.lab.qemus())

    def template_runs() -> bool:
        return any(pid not in old and case.lab.machine_of(cmd) is None
                   for pid, cmd in case.lab.qemus().items())

    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(case.lab.argv(*run), env=case.lab.env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline and not template_runs():
            time.sleep(0.05)
        building = p.poll() is None and time.monotonic() < deadline
        delay = case.rng.uniform(0.0, 6.0)
        time.sleep(delay)
        killed = p.poll() is None
        if killed:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        out.seek(0)
        said = out.read().decode(errors="replace")
    case.trial = (f"`pinnace {' '.join(run)}` "
                  + (f"SIGKILL {delay:.2f} s after its template QEMU started" if killed
                     else "not killed"))
    assert building and killed, f"no template build to interrupt was seen: {said}"
    listed, _ = case.truth()
    left = set(listed) - before
    case.machines |= left
    case.owners(listed, staging_allowed=True)
    case.delete(*sorted(left))
    case.gc()
    case.trial = "the next run"
    case.must("the next run of that shape builds the ready snapshot again", *run,
              timeout=START_TIMEOUT)
    case.assert_ok()


def test_cli_killed_during_run_name(case):
    """An interrupted `run --name X`: X is whole and usable, or absent and X is free."""
    first = case.machine()
    took = case.measure("run", "--name", first, "--net", "restricted", timeout=START_TIMEOUT)
    case.ok("delete", "--force", first)
    for i, delay in enumerate(case.delays(took, trials(3))):
        m = case.machine()
        case.kill_during(["run", "--name", m, "--net", "restricted"], delay, f"trial {i + 1}",
                         took)
        listed, silent = case.truth()
        case.owners(listed, staging_allowed=True)
        if m in listed:
            case.recover(m, listed, silent)
        else:
            case.must(f"{m} is not listed, so its name must be free", "run", "--name", m,
                      "--net", "restricted", timeout=START_TIMEOUT)
        case.delete(m)
        case.gc()
    case.assert_ok()


def test_cli_killed_during_volume_create(case):
    """An interrupted `volume create`: the volume is whole or absent; gc cleans staging."""
    first = case.volume()
    took = case.measure("volume", "create", first, "--size", "64M")
    case.ok("volume", "rm", first)
    for i, delay in enumerate(case.delays(took, trials(3))):
        v = case.volume()
        case.kill_during(["volume", "create", v, "--size", "64M"], delay, f"trial {i + 1}", took)
        if v in case.lab.names("volume"):
            r = case.cli("volume", "inspect", v)
            if r.returncode != 0 or json.loads(r.stdout).get("size") != 64 << 20:
                case.problem(f"volume {v} is listed but not whole: exit {r.returncode}, "
                             f"{_last_line(r.stderr or r.stdout)}")
        else:
            case.must(f"volume {v} is not listed, so its name must be free", "volume", "create",
                      v, "--size", "64M")
        case.must(f"volume rm {v}", "volume", "rm", v)
        case.gc()
    case.assert_ok()


def test_cli_killed_during_network_create(case):
    """An interrupted `network create`: whole or absent, no stray switch; gc cleans."""
    first = case.network()
    took = case.measure("network", "create", first, "--subnet", "10.95.0.0/24")
    case.ok("network", "rm", first)
    for i, delay in enumerate(case.delays(took, trials(3))):
        n = case.network()
        subnet = f"10.{90 + i}.0.0/24"
        case.kill_during(["network", "create", n, "--subnet", subnet], delay, f"trial {i + 1}",
                         took)
        if n in case.lab.names("network"):
            case.must(f"network {n} is listed, so it must be whole", "network", "inspect", n)
        else:
            case.must(f"network {n} is not listed, so its name and subnet must be free",
                      "network", "create", n, "--subnet", subnet)
        case.must(f"network rm {n}", "network", "rm", n)
        left = _await_dead({pid for pid, (_, d) in case.lab.switches().items()
                            if d.name == n})
        if left:
            case.problem(f"switch processes {sorted(left)} of removed network {n} still run")
        case.gc()
    case.assert_ok()


def test_gc_kills_an_orphan_staging_qemu_and_removes_its_folder(case):
    """Deterministic: the CLI dies while `snapshot create` runs its staging QEMU. gc
    --dry-run names the QEMU and the folder and touches nothing; gc removes both and
    leaves a live machine and a live process's folder alone."""
    m = _run_machine(case)
    keep = case.lab.tmp / f"machine-{os.getpid()}-keepme"  # pytest is alive: not gc's
    keep.mkdir(parents=True, exist_ok=True)
    try:
        snap = case.snapshot()
        with tempfile.TemporaryFile() as out:
            p = subprocess.Popen(case.lab.argv("snapshot", "create", m, snap), env=case.lab.env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            deadline = time.monotonic() + 60
            staging: dict[int, str] = {}
            while p.poll() is None and time.monotonic() < deadline and not staging:
                staging = {pid: cmd for pid, cmd in case.lab.qemus().items()
                           if case.lab.machine_of(cmd) is None}
                time.sleep(0.02)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            out.seek(0)
            said = out.read().decode(errors="replace")
        case.trial = "`pinnace snapshot create` killed while its staging QEMU runs"
        assert staging, f"no staging QEMU was seen: {said}"
        time.sleep(0.5)  # a staging QEMU that ends with its command is no orphan: fine too
        staging = {pid: cmd for pid, cmd in staging.items() if _alive(pid)}
        folders = case.lab.stale_tmp()
        assert folders, "the killed snapshot create left no folder in tmp/"
        machine_pid = case.lab.ls()[m]["pid"]

        r = case.cli("gc", "--dry-run")
        if r.returncode != 0:
            case.problem(f"`pinnace gc --dry-run` exited {r.returncode}: {_last_line(r.stderr)}")
        else:
            for pid in staging:
                if not re.search(rf"\b{pid}\b", r.stdout):
                    case.problem(f"`gc --dry-run` does not name orphan QEMU pid {pid}")
            for f in folders:
                if f not in r.stdout:
                    case.problem(f"`gc --dry-run` does not name tmp/{f}")
        if not all(_alive(pid) for pid in staging) or not all(
                (case.lab.tmp / f).exists() for f in folders):
            case.problem("`gc --dry-run` changed something")

        case.trial = "gc"
        r = case.cli("gc")
        lines = r.stdout.splitlines()
        if r.returncode != 0:
            case.problem(f"`pinnace gc` exited {r.returncode}: {_last_line(r.stderr)}")
        else:
            for pid in staging:
                if not any(ln.startswith("killed ") and re.search(rf"\b{pid}\b", ln)
                           for ln in lines):
                    case.problem(f"gc printed no 'killed ...' line for QEMU pid {pid}: {lines}")
            for f in folders:
                if not any(ln.startswith("removed ") and f in ln for ln in lines):
                    case.problem(f"gc printed no 'removed ...' line for tmp/{f}: {lines}")
        left = _await_dead(staging)
        if left:
            case.problem(f"orphan staging QEMU {sorted(left)} still runs after gc")
        gone = [f for f in folders if (case.lab.tmp / f).exists()]
        if gone:
            case.problem(f"tmp/ still holds {gone} after gc")
        if not keep.is_dir():
            case.problem(f"gc removed tmp/{keep.name}, whose process (pytest) is alive")
        if not _alive(machine_pid) or case.cli("exec", m, "--", "true",
                                                 timeout=EXEC_TIMEOUT).returncode != 0:
            case.problem(f"gc harmed the live machine {m} (QEMU pid {machine_pid})")
        if snap in case.lab.names("snapshot"):
            case.problem(f"snapshot {snap} is listed though its create was killed mid-way")
        if r.returncode == 0:
            again = case.cli("gc")
            if again.returncode != 0 or any(CHANGE.match(ln) for ln in again.stdout.splitlines()):
                case.problem(f"a second gc still had work: exit {again.returncode}, "
                             f"{again.stdout.strip()[:200]}")
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    case.trial = "end"
    case.delete(m)
    case.assert_ok()


# --- 2. QEMU and the switch killed ------------------------------------------------------


def test_qemu_killed_under_a_ready_machine(case):
    """ls shows failed (QEMU killed), never ready; start works again."""
    m = _run_machine(case)
    pid = case.lab.ls()[m]["pid"]
    os.kill(pid, signal.SIGKILL)
    case.trial = f"QEMU pid {pid} of {m} killed"
    deadline = time.monotonic() + 10
    st = case.lab.ls()[m]
    while st["state"] == "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
        st = case.lab.ls()[m]
    if st["state"] != "failed" or "kill" not in st["reason"].lower():
        case.problem(f"ls shows {m} {st['state']!r} ({st['reason']!r}); expected failed, with "
                     "a reason saying QEMU was killed")
    case.owners(case.lab.ls(), staging_allowed=False)
    case.trial = "start after the kill"
    if case.must("a machine whose QEMU was killed starts again", "start", m,
                 timeout=START_TIMEOUT):
        case.must("and answers", "exec", m, "--", "true", timeout=30)
    case.trial = "end"
    case.delete(m)
    case.assert_ok()


def test_switch_killed_while_machines_ping(case):
    """The switch comes back and the machines reach each other; network rm leaves none."""
    lan = case.network()
    case.ok("network", "create", lan, "--subnet", "10.98.0.0/24")
    base = case.lab.name("p")
    a, b = f"{base}-1", f"{base}-2"
    case.machines |= {a, b}
    case.ok("run", "--count", "2", "--name", base, "--net", "restricted", "--spare-nics", "1",
            timeout=START_TIMEOUT)
    ip = {m: case.ok("network", "connect", lan, m).stdout.strip().split("/")[0] for m in (a, b)}
    case.ok("exec", a, "--", "ping", "-c", "1", "-W", "5", ip[b], timeout=30)
    net_dir = Path(case.lab.home) / "networks" / lan

    def switch_pid() -> int | None:
        r = case.cli("network", "inspect", lan)
        return json.loads(r.stdout)["switch"]["switch_pid"] if r.returncode == 0 else None

    with tempfile.TemporaryFile() as out:
        pinger = subprocess.Popen(case.lab.argv("exec", a, "--", "ping", "-n", "-i", "0.2", "-c",
                                                "20", "-W", "1", ip[b]),
                                  env=case.lab.env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=out)
        time.sleep(1.5)
        before = switch_pid()
        assert before and _alive(before), "the network has no switch running"
        os.kill(before, signal.SIGKILL)
        case.trial = f"switch pid {before} killed while {a} pings {b}"
        pinger.wait(timeout=60)
    # The switch comes back by itself, or the next command brings it back.
    deadline = time.monotonic() + 20
    reached = False
    while time.monotonic() < deadline and not reached:
        reached = all(case.cli("exec", x, "--", "ping", "-c", "1", "-W", "2", ip[y],
                               timeout=20).returncode == 0 for x, y in ((a, b), (b, a)))
    if not reached:
        case.problem(f"{a} and {b} cannot reach each other within 20 s of the switch's death")
    after = switch_pid()
    if not after or after == before or not _alive(after):
        case.problem(f"no new switch runs for {lan} (pid before {before}, now {after})")
    procs = [(role, pid) for pid, (role, d) in case.lab.switches().items() if d == net_dir]
    roles = sorted(role for role, _ in procs)
    if roles.count("switch") != 1 or roles.count("supervisor") > 1:
        case.problem(f"{lan} should have one switch (and at most one supervisor), it has "
                     f"{sorted(procs)}")
    case.owners(case.lab.ls(), staging_allowed=False)
    case.trial = "network rm after deleting the machines"
    case.delete(a, b)
    case.must(f"network rm {lan}", "network", "rm", lan)
    left = _await_dead({pid for pid, (_, d) in case.lab.switches().items() if d == net_dir})
    if left:
        case.problem(f"switch processes {sorted(left)} still run after `network rm {lan}`")
    case.assert_ok()
