"""A cgroup of its own for each job's QEMU: memory, CPU and pids limits, and the OOM verdict.

Where groups live::

    cgroup v2   <base>/<parent>/<name>          one directory; <base> is the cgroup root when
                                                it is ours to write (root, like runc's cgroupfs
                                                driver), else the deepest cgroup above this
                                                process that it may write and that holds no
                                                processes of its own (a delegated subtree,
                                                e.g. app.slice under systemd's user@UID.service)
    cgroup v1   <hierarchy>/<parent>/<name>     one directory in each writable hierarchy among
                                                memory, cpu and pids (and cpuacct, for usage)

v2 gives the group its controllers by writing ``+memory +cpu +pids`` (those that are
missing) into ``cgroup.subtree_control`` of ``<base>`` and of ``<parent>``; the job's group
itself stays a leaf, as cgroup v2's no-internal-processes rule wants.

Limits written (``None`` lifts one)::

    v2  memory.max, memory.swap.max (0 with a memory limit: no swap), cpu.max
        ("QUOTA 100000"), pids.max
    v1  memory.oom_control = 0 (the kernel's OOM killer stays on, even if the parent turned
        it off), memory.limit_in_bytes and memory.memsw.limit_in_bytes (the same: no swap;
        when swap accounting is on), cpu.cfs_period_us = 100000 and cpu.cfs_quota_us,
        pids.max

Putting a process in: :func:`spawn_in` starts it with :class:`subprocess.Popen` and writes
its pid into ``cgroup.procs`` of every hierarchy at once (``preexec_fn`` is not safe in a
threaded program, and ``CLONE_INTO_CGROUP`` is not in the standard library). Until then —
the child's exec and first instructions, well under a millisecond to a few — it runs in its
parent's cgroup: what it allocates in that window stays charged there (neither v1 nor v2
moves charges) and a child it forks then stays outside. QEMU allocates guest RAM lazily,
long after, so the window costs nothing in practice; a program that must not start outside
should wait for a byte on stdin before doing anything (as the tests here do).

Every path below the cgroup root (v2) or a hierarchy's mount (v1) is built from validated
names and opened one component at a time with ``O_NOFOLLOW``: a symlink is an error, never
followed. Errors are one-line :class:`HostError`\\ s naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ...config import parse_size
from ...errors import ConfigError, HostError

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PARENT = "pinnace"
CONTROLLERS = ("memory", "cpu", "pids")  # the ones limits need, in the order they are enabled
CPU_PERIOD_US = 100_000  # the CFS period; a limit of N CPUs is a quota of N * period
MIN_CPUS = 0.01  # a 1 ms quota per period, the least the kernel takes
MAX_CPUS = 4096.0
MIN_MEMORY = 1 << 20
MAX_PIDS = 4_194_304  # PID_MAX_LIMIT: pids.max takes no more
REMOVE_TIMEOUT = 5.0
GC_MIN_AGE = 60.0  # gc leaves younger empty groups alone: their process may be on its way in

Version = Literal["v2", "v1", "none"]

DELEGATE_HINT = ("run as root, or give the user a delegated cgroup "
                 "(systemd-run --user --scope -p Delegate=yes -- pinnace ...)")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A group named like a control file ("memory.max", "tasks") would clash with one.
_FILE_PREFIXES = frozenset({
    "cgroup", "memory", "cpu", "cpuacct", "cpuset", "pids", "io", "blkio", "hugetlb", "rdma",
    "misc", "devices", "freezer", "net_cls", "net_prio", "perf_event", "notify_on_release",
    "release_agent", "tasks",
})
# A file only a v1 hierarchy of that controller has (pids' root has none of its own).
_V1_MARKERS = {"memory": "memory.limit_in_bytes", "cpu": "cpu.shares",
               "cpuacct": "cpuacct.usage", "pids": None}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def validate_name(name: str, field: str = "cgroup name") -> str:
    """``name`` if it can be one path component of a cgroup, else ConfigError."""
    if (not isinstance(name, str) or not _NAME_RE.fullmatch(name)
            or name.split(".", 1)[0] in _FILE_PREFIXES):
        raise ConfigError(field, name, "use 1 to 128 letters, digits, '-', '_' or '.', "
                          "starting with a letter or digit, not named like a cgroup file "
                          "(memory.max, tasks)")
    return name


# --- limits ------------------------------------------------------------------------------


def parse_memory(value: str | int) -> int:
    """'2G', '512M', '1.5GiB' into bytes; a bare number is MiB, as for ``--memory``."""
    return parse_size(value, "memory limit")


def parse_cpus(value: str | float) -> float:
    """'1.5' or 0.5: how many CPUs' worth of time per period (a CFS quota, not a pinning)."""
    try:
        cpus = float(value) if not isinstance(value, bool) else math.nan
    except ValueError:
        cpus = math.nan
    if not MIN_CPUS <= cpus <= MAX_CPUS:  # False for nan
        raise ConfigError("cpus", value, f"give a number of CPUs such as 0.5 or 2 "
                          f"(from {MIN_CPUS:g} to {MAX_CPUS:g})")
    return cpus


def parse_pids(value: str | int) -> int:
    """'64' or 64: the most processes and threads the group may hold at once."""
    try:
        pids = int(value) if not isinstance(value, bool) else 0
    except ValueError:
        pids = 0
    if not 1 <= pids <= MAX_PIDS:
        raise ConfigError("pids", value, f"give a whole number from 1 to {MAX_PIDS}")
    return pids


_UNLIMITED = ("", "max", "none", "unlimited")


def _lifted(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() in _UNLIMITED


@dataclass(frozen=True)
class Limits:
    """A job's limits; ``None`` leaves one unlimited."""

    memory_bytes: int | None = None
    cpus: float | None = None  # CFS quota / period: 1.5 is 150 ms of CPU time per 100 ms
    pids: int | None = None  # processes and threads

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and (
                isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int)
                or self.memory_bytes < MIN_MEMORY):
            raise ConfigError("memory limit", self.memory_bytes, "give at least 1M (in bytes)")
        if self.cpus is not None:
            parse_cpus(self.cpus)
        if self.pids is not None:
            if isinstance(self.pids, bool) or not isinstance(self.pids, int):
                raise ConfigError("pids", self.pids, "give a whole number")
            parse_pids(self.pids)

    @classmethod
    def parse(cls, memory: str | int | None = None, cpus: str | float | None = None,
              pids: str | int | None = None) -> Limits:
        """From option strings: ``Limits.parse("2G", "1.5", "256")``; "max" or None lifts one."""
        return cls(
            memory_bytes=None if memory is None or _lifted(memory) else parse_memory(memory),
            cpus=None if cpus is None or _lifted(cpus) else parse_cpus(cpus),
            pids=None if pids is None or _lifted(pids) else parse_pids(pids),
        )

    def cpu_quota_us(self) -> int | None:
        return None if self.cpus is None else max(1000, round(self.cpus * CPU_PERIOD_US))


# --- paths opened without following symlinks ---------------------------------------------


@dataclass(frozen=True)
class _Loc:
    """A cgroup directory: ``anchor`` (the v2 root or a v1 mount, found by detect) and the
    components below it, each opened with O_NOFOLLOW."""

    anchor: Path
    parts: tuple[str, ...]

    @property
    def path(self) -> Path:
        return self.anchor.joinpath(*self.parts)

    def child(self, name: str) -> _Loc:
        return _Loc(self.anchor, (*self.parts, name))


@contextlib.contextmanager
def _dirfd(loc: _Loc) -> Iterator[int]:
    fd = os.open(loc.anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in loc.parts:
            new = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = new
        yield fd
    finally:
        os.close(fd)


def _hint(exc: OSError) -> str:
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return DELEGATE_HINT
    if code == errno.EROFS:
        return "the cgroup filesystem is mounted read-only here (a container?): give it a " \
               "writable cgroup mount"
    if code == errno.ENOENT:
        return "the cgroup or file is missing: is the controller built into the kernel and " \
               "enabled for this cgroup (its parent's cgroup.subtree_control)?"
    if code in (errno.ELOOP, errno.ENOTDIR):
        return "something that is not a directory (a symlink?) is in the way; pinnace never " \
               "follows symlinks under the cgroup root: remove it"
    if code == errno.ESRCH:
        return "the process has exited already"
    if code == errno.EINVAL:
        return "the kernel refused the value"
    return "check the cgroup's files and permissions"


def _error(exc: OSError, what: str, hint: str = "") -> HostError:
    return HostError(f"{what}: {exc.strerror or exc}", hint or _hint(exc))


def _write(loc: _Loc, name: str, value: str, *, busy_hint: str = "") -> None:
    try:
        with _dirfd(loc) as dfd:
            fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dfd)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
    except OSError as exc:
        hint = busy_hint if exc.errno == errno.EBUSY and busy_hint else ""
        raise _error(exc, f"cannot write {value!r} to {loc.path / name}", hint) from None


def _read(loc: _Loc, name: str) -> str | None:
    """The file's text; None when it or the cgroup is missing."""
    try:
        with _dirfd(loc) as dfd:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                chunks = []
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
            finally:
                os.close(fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _error(exc, f"cannot read {loc.path / name}") from None
    return b"".join(chunks).decode(errors="replace")


def _exists(loc: _Loc, name: str = "") -> bool:
    try:
        with _dirfd(loc) as dfd:
            if name:
                os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _error(exc, f"cannot look at {loc.path / name}") from None


def _mkdir(loc: _Loc) -> None:
    parent, name = _Loc(loc.anchor, loc.parts[:-1]), loc.parts[-1]
    try:
        with _dirfd(parent) as dfd:
            try:
                os.mkdir(name, 0o755, dir_fd=dfd)
            except FileExistsError:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)  # a directory, not a symlink
                os.close(fd)
    except OSError as exc:
        raise _error(exc, f"cannot create the cgroup {loc.path}") from None


def _subdirs(loc: _Loc) -> list[str]:
    try:
        with _dirfd(loc) as dfd, os.scandir(dfd) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _error(exc, f"cannot list {loc.path}") from None


def _int_field(text: str | None, key: str) -> int | None:
    """``key N`` from a flat-keyed file (memory.events, memory.oom_control, cpu.stat)."""
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            with contextlib.suppress(ValueError):
                return int(v)
    return None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


# --- what the host offers ----------------------------------------------------------------


@dataclass(frozen=True)
class CgroupHost:
    """What :func:`detect` found. ``problem`` (with ``hint``) is why no group can be made
    here, '' when one can; ``controllers`` are those a group gets: for v2 those the base
    can delegate, for v1 the writable hierarchies among memory, cpu, pids."""

    version: Version
    root: Path
    controllers: tuple[str, ...] = ()
    base_parts: tuple[str, ...] = ()  # v2: the base, below root
    mounts: tuple[tuple[str, Path], ...] = ()  # v1: (controller, its hierarchy), cpuacct too
    problem: str = ""
    hint: str = ""
    notes: tuple[str, ...] = ()

    @property
    def base(self) -> Path | None:
        return self.root.joinpath(*self.base_parts) if self.version == "v2" else None

    def require(self) -> None:
        if self.problem:
            raise HostError(self.problem, self.hint)

    def locs(self, *parts: str) -> list[tuple[tuple[str, ...], _Loc]]:
        """The directories of ``parts`` (e.g. parent, name): (controllers, loc) each."""
        if self.version == "v2":
            return [(self.controllers, _Loc(self.root, (*self.base_parts, *parts)))]
        out: dict[Path, tuple[list[str], _Loc]] = {}
        for ctrl, mount in self.mounts:
            entry = out.setdefault(mount, ([], _Loc(mount, parts)))
            entry[0].append(ctrl)
        return [(tuple(c), loc) for c, loc in out.values()]

    def dirs(self, *parts: str) -> list[Path]:
        """The directories ``parts`` (e.g. ``(parent,)`` or ``(parent, name)``) stand for."""
        return [loc.path for _, loc in self.locs(*parts)]


def _v1_hierarchy(root: Path, ctrl: str) -> Path | None:
    """The v1 hierarchy of ``ctrl`` under ``root``: its directory (a mount-point symlink
    such as cpu -> cpu,cpuacct, to a sibling, is the one symlink taken), or None."""
    path = root / ctrl
    if path.is_symlink():
        target = os.readlink(path)
        if "/" in target or target in (".", ".."):
            return None
        path = root / target
    if path.is_symlink() or not path.is_dir():
        return None
    marker = _V1_MARKERS[ctrl]
    if not (path / "tasks").is_file() or (marker and not (path / marker).is_file()):
        return None
    return path


def _own_cgroup_v2() -> tuple[str, ...]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return _split_cgroup_path(line[3:])
    return ()


def _split_cgroup_path(path: str) -> tuple[str, ...]:
    parts = tuple(p for p in path.strip().split("/") if p)
    if any(p in (".", "..") for p in parts):
        raise HostError(f"odd cgroup path {path!r}", "give base as a path below the root")
    return parts


def _has_procs(loc: _Loc) -> bool:
    return bool((_read(loc, "cgroup.procs") or "").split())


def _usable_base(loc: _Loc) -> bool:
    """May this process give ``loc``'s children controllers? It must be able to write its
    cgroup.subtree_control and make directories in it, and ``loc`` must hold no processes
    of its own unless it is the real root (which has no cgroup.type; a cgroup namespace's
    root does)."""
    path = loc.path
    if not (os.access(path, os.W_OK) and os.access(path / "cgroup.subtree_control", os.W_OK)):
        return False
    return not _exists(loc, "cgroup.type") or not _has_procs(loc)


def _choose_base(root: Path, own: tuple[str, ...]) -> _Loc | None:
    """The root when this process may delegate from it (root on the host, like runc's
    cgroupfs driver), else the deepest cgroup above this process's own that it may
    (a delegated subtree), else None."""
    candidates = [_Loc(root, ())] + [_Loc(root, own[:i]) for i in range(len(own), 0, -1)]
    return next((c for c in candidates if _exists(c) and _usable_base(c)), None)


def _detect_v2(root: Path, base: str | None, own: tuple[str, ...] | None) -> CgroupHost:
    own = _own_cgroup_v2() if own is None else own
    chosen = _choose_base(root, own) if base is None else _Loc(root, _split_cgroup_path(base))
    if chosen is None:
        return CgroupHost(
            "v2", root, problem=f"cgroup v2: no cgroup from /{'/'.join(own)} up to {root} "
            "lets this process create child cgroups with controllers (each is read-only to "
            "it or holds processes of its own)",
            hint=DELEGATE_HINT + ", or move this process into a child cgroup so that its "
            "delegated cgroup holds no processes of its own")
    text = _read(chosen, "cgroup.controllers")
    if text is None:
        return CgroupHost("v2", root, base_parts=chosen.parts,
                          problem=f"{chosen.path / 'cgroup.controllers'} is missing",
                          hint="give base as an existing cgroup below the cgroup v2 root")
    available = set(text.split())
    controllers = tuple(c for c in CONTROLLERS if c in available)
    if not controllers:
        return CgroupHost(
            "v2", root, base_parts=chosen.parts,
            problem=f"cgroup v2 at {chosen.path} offers none of memory, cpu, pids "
                    f"(its cgroup.controllers: {text.strip() or 'empty'!r})",
            hint="on a hybrid host they belong to cgroup v1 hierarchies (boot with "
                 "systemd.unified_cgroup_hierarchy=1); else enable them in the parent's "
                 "cgroup.subtree_control (systemd: Delegate=memory cpu pids)")
    return CgroupHost("v2", root, controllers=controllers, base_parts=chosen.parts)


def detect(root: Path | str = CGROUP_ROOT, *, base: str | None = None,
           own_cgroup: str | None = None) -> CgroupHost:
    """What this host offers for limiting a job: cgroup v2, v1 or none (see ``problem``).

    ``root`` is the cgroup mount (tests point it at a fake tree); ``base`` forces the v2
    cgroup (a path below ``root``) that groups' parent is made in; ``own_cgroup`` stands in
    for this process's v2 cgroup (the ``0::`` line of /proc/self/cgroup).
    """
    root = Path(root)
    own = None if own_cgroup is None else _split_cgroup_path(own_cgroup)
    if (root / "cgroup.controllers").is_file():
        return _detect_v2(root, base, own)
    mounts: list[tuple[str, Path]] = []
    notes: list[str] = []
    absent, readonly = [], []
    for ctrl in (*CONTROLLERS, "cpuacct"):
        path = _v1_hierarchy(root, ctrl)
        if path is None:
            absent.append(ctrl)
        elif not os.access(path, os.W_OK):
            readonly.append(ctrl)
        else:
            mounts.append((ctrl, path))
    if absent:
        notes.append(f"no cgroup v1 hierarchy for {', '.join(absent)} under {root}")
    if readonly:
        notes.append(f"the cgroup v1 hierarchies of {', '.join(readonly)} under {root} are "
                     "read-only to this process")
    controllers = tuple(c for c, _ in mounts if c in CONTROLLERS)
    unified = root / "unified"
    if controllers:
        if (unified / "cgroup.controllers").is_file():
            notes.append(f"hybrid: cgroup v2 at {unified} is not used")
        return CgroupHost("v1", root, controllers=controllers, mounts=tuple(mounts),
                          notes=tuple(notes))
    if (unified / "cgroup.controllers").is_file():
        v2 = _detect_v2(unified, base, own)
        if not v2.problem:
            return v2
        return CgroupHost("none", root, problem=f"{'; '.join(notes)}; and {v2.problem}",
                          hint=v2.hint, notes=tuple(notes))
    if mounts:  # cpuacct alone
        return CgroupHost("none", root, problem="; ".join(notes), hint=DELEGATE_HINT)
    return CgroupHost("none", root, problem=f"no cgroup filesystem at {root} "
                      f"({'; '.join(notes) or 'nothing mounted'})",
                      hint="mount cgroup2 on /sys/fs/cgroup (or the v1 memory, cpu and pids "
                           "hierarchies), or run on a host that has them",
                      notes=tuple(notes))


# --- a job's group -----------------------------------------------------------------------


class Cgroup:
    """One job's cgroup: in v2 one directory, in v1 one per hierarchy (:attr:`paths`)."""

    def __init__(self, name: str, *, parent: str = DEFAULT_PARENT,
                 host: CgroupHost | None = None) -> None:
        """The group ``parent/name``, existing or not; :meth:`create` makes it."""
        self.name = validate_name(name)
        self.parent = validate_name(parent, "cgroup parent")
        self.host = host if host is not None else detect()
        self.host.require()
        self._locs = self.host.locs(self.parent, self.name)

    def __repr__(self) -> str:
        return f"Cgroup({self.parent}/{self.name}, {self.host.version}, {self.paths})"

    @property
    def version(self) -> Version:
        return self.host.version

    @property
    def paths(self) -> list[Path]:
        return [loc.path for _, loc in self._locs]

    def _loc(self, ctrl: str) -> _Loc | None:
        return next((loc for ctrls, loc in self._locs if ctrl in ctrls), None)

    def exists(self) -> bool:
        return any(_exists(loc) for _, loc in self._locs)

    # --- making it ---

    @classmethod
    def create(cls, name: str, limits: Limits, *, parent: str = DEFAULT_PARENT,
               host: CgroupHost | None = None) -> Cgroup:
        """Make the group (or take the existing one) and set its limits: idempotent."""
        group = cls(name, parent=parent, host=host)
        h = group.host
        wanted = {"memory": limits.memory_bytes is not None, "cpu": limits.cpus is not None,
                  "pids": limits.pids is not None}
        missing = [c for c in CONTROLLERS if wanted[c] and c not in h.controllers]
        if missing:
            if h.version == "v2":
                base = h.base or h.root
                raise HostError(
                    f"{base / 'cgroup.controllers'} lacks {', '.join(missing)}",
                    "enable them in its parent's cgroup.subtree_control (systemd: "
                    f"Delegate={' '.join(CONTROLLERS)}), or drop those limits")
            raise HostError(
                f"no writable cgroup v1 hierarchy for {', '.join(missing)} under {h.root}",
                DELEGATE_HINT + ", or drop those limits")
        if h.version == "v2":
            group._create_v2(limits)
        else:
            group._create_v1(limits)
        return group

    def _create_v2(self, limits: Limits) -> None:
        h = self.host
        busy = ("cgroup v2 gives controllers only to the children of a cgroup without "
                "processes of its own: run pinnace in a child cgroup, or pass detect(base=) "
                "a cgroup without processes")
        base = _Loc(h.root, h.base_parts)
        parent = base.child(self.parent)
        _delegate(base, h.controllers, busy)
        _mkdir(parent)
        _delegate(parent, h.controllers, busy)
        job = parent.child(self.name)
        _mkdir(job)
        if "memory" in h.controllers:
            mem = limits.memory_bytes
            _write(job, "memory.max", "max" if mem is None else str(mem))
            if _exists(job, "memory.swap.max"):  # absent without swap accounting
                _write(job, "memory.swap.max", "max" if mem is None else "0")
        if "cpu" in h.controllers:
            quota = limits.cpu_quota_us()
            _write(job, "cpu.max", f"{'max' if quota is None else quota} {CPU_PERIOD_US}")
        if "pids" in h.controllers:
            _write(job, "pids.max", "max" if limits.pids is None else str(limits.pids))

    def _create_v1(self, limits: Limits) -> None:
        for _, loc in self.host.locs(self.parent):
            _mkdir(loc)
        for _, loc in self._locs:
            _mkdir(loc)
        mem = self._loc("memory")
        if mem is not None:
            _write(mem, "memory.oom_control", "0")
            new = limits.memory_bytes if limits.memory_bytes is not None else -1
            files = ["memory.limit_in_bytes"]
            if _exists(mem, "memory.memsw.limit_in_bytes"):  # swap accounting is on
                # memsw may never be below the memory limit: raise it first, lower it last.
                current = _int(_read(mem, "memory.limit_in_bytes")) or 0
                raising = new == -1 or new > current
                files = (["memory.memsw.limit_in_bytes", *files] if raising
                         else [*files, "memory.memsw.limit_in_bytes"])
            for f in files:
                _write(mem, f, str(new))
        cpu = self._loc("cpu")
        if cpu is not None:
            quota = limits.cpu_quota_us()
            _write(cpu, "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu, "cpu.cfs_quota_us", "-1" if quota is None else str(quota))
        pids = self._loc("pids")
        if pids is not None:
            _write(pids, "pids.max", "max" if limits.pids is None else str(limits.pids))

    # --- processes ---

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group, in every hierarchy.
        Call it right after starting the process (see :func:`spawn_in`); if it fails
        half-way on v1, the process is in some hierarchies only: kill it."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ConfigError("pid", pid, "give the pid of a started process (0 would move "
                              "the caller itself)")
        for _, loc in self._locs:
            _write(loc, "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        """The processes in the group and any cgroups below it, in every hierarchy."""
        pids: set[int] = set()

        def walk(loc: _Loc) -> None:
            pids.update(int(p) for p in (_read(loc, "cgroup.procs") or "").split())
            for sub in _subdirs(loc):
                walk(loc.child(sub))

        for _, loc in self._locs:
            walk(loc)
        pids.discard(0)  # a process outside this pid namespace
        return sorted(pids)

    # --- what happened ---

    def oom_kills(self) -> tuple[int, str]:
        """How many processes the OOM killer took from the group, and where that was read:
        v2 memory.events ``oom_kill``; v1 memory.oom_control ``oom_kill`` (Linux >= 4.13),
        else memory.failcnt, which counts the times the limit was hit (a weaker sign).
        Read it before :meth:`remove`: the counts go with the directory."""
        mem = self._loc("memory")
        if mem is None:
            return 0, "no memory controller in this group"
        if self.version == "v2":
            count = _int_field(_read(mem, "memory.events"), "oom_kill")
            return count or 0, f"{mem.path / 'memory.events'} oom_kill"
        count = _int_field(_read(mem, "memory.oom_control"), "oom_kill")
        if count is not None:
            return count, f"{mem.path / 'memory.oom_control'} oom_kill"
        hits = _int(_read(mem, "memory.failcnt")) or 0
        return hits, (f"{mem.path / 'memory.failcnt'} (times the limit was hit; this kernel "
                      "counts no OOM kills)")

    def oom_killed(self) -> bool:
        """Did the kernel's OOM killer kill a process of the group? (see :meth:`oom_kills`)"""
        return self.oom_kills()[0] > 0

    def usage(self) -> dict[str, int | None]:
        """memory_current, memory_peak (bytes), pids_current, cpu_usage_ns: None when this
        host does not say (no such controller; memory.peak needs Linux 5.19 on v2)."""
        mem, pids, cpu = self._loc("memory"), self._loc("pids"), self._loc("cpuacct")
        out: dict[str, int | None] = dict.fromkeys(
            ("memory_current", "memory_peak", "pids_current", "cpu_usage_ns"))
        if self.version == "v2":
            job = self._locs[0][1]
            if mem is not None:
                out["memory_current"] = _int(_read(mem, "memory.current"))
                out["memory_peak"] = _int(_read(mem, "memory.peak"))
            usec = _int_field(_read(job, "cpu.stat"), "usage_usec")  # a core file
            out["cpu_usage_ns"] = None if usec is None else usec * 1000
        else:
            if mem is not None:
                out["memory_current"] = _int(_read(mem, "memory.usage_in_bytes"))
                out["memory_peak"] = _int(_read(mem, "memory.max_usage_in_bytes"))
            if cpu is not None:
                out["cpu_usage_ns"] = _int(_read(cpu, "cpuacct.usage"))
        if pids is not None:
            out["pids_current"] = _int(_read(pids, "pids.current"))
        return out

    # --- taking it down ---

    def _kill(self, pids: Sequence[int]) -> None:
        """SIGKILL those of ``pids`` still in the group. Each pid is pinned with a pidfd
        first and signalled only if the group still lists it afterwards: a pid that died
        and was reused by another process in the meantime is never signalled."""
        fds: dict[int, int] = {}
        try:
            for pid in pids:
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                except OSError:  # no pidfd (Linux < 5.3): plain kill
                    fds[pid] = -1
            still = set(self.procs())
            for pid, fd in fds.items():
                if pid not in still:
                    continue
                try:
                    if fd >= 0:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except OSError as exc:
                    raise _error(exc, f"cannot kill process {pid} of {self.paths[0]}") from None
        finally:
            for fd in fds.values():
                if fd >= 0:
                    os.close(fd)

    def remove(self, timeout: float = REMOVE_TIMEOUT) -> None:
        """Kill what is left in the group (v2 cgroup.kill when the kernel has it, else
        SIGKILL to each process in cgroup.procs, again until none is left), wait until it
        is empty, and remove its directory in every hierarchy. Idempotent."""
        if not self.exists():
            return
        deadline = time.monotonic() + timeout
        pids = self.procs()
        if os.getpid() in pids:
            raise HostError(f"this process ({os.getpid()}) is in {self.paths[0]}; refusing "
                            "to kill it", "move it out of the group before removing it")
        job = self._locs[0][1]
        if pids and self.version == "v2" and _exists(job, "cgroup.kill"):
            _write(job, "cgroup.kill", "1")
        delay = 0.002
        while pids:
            if time.monotonic() > deadline:
                raise HostError(
                    f"processes {', '.join(map(str, pids[:8]))} in {self.paths[0]} did not "
                    f"die within {timeout:g} s of SIGKILL",
                    f"see what they wait for (ps -o pid,stat,wchan -p {pids[0]}); then run "
                    "pinnace gc")
            self._kill(pids)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            pids = self.procs()
        while True:
            try:
                self._rmdirs()
                return
            except HostError:
                # An exiting task can keep a cgroup busy for a moment after it left procs.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _rmdirs(self) -> None:
        for _, loc in self._locs:
            _rmtree(loc)


def _delegate(loc: _Loc, controllers: Sequence[str], busy_hint: str) -> None:
    """Enable ``controllers`` for the children of ``loc``: those not enabled yet, in one
    write to its cgroup.subtree_control (the kernel lists them without '+')."""
    current = {t.lstrip("+") for t in (_read(loc, "cgroup.subtree_control") or "").split()}
    todo = [c for c in controllers if c not in current]
    if todo:
        _write(loc, "cgroup.subtree_control", " ".join(f"+{c}" for c in todo),
               busy_hint=busy_hint)


def _rmtree(loc: _Loc) -> None:
    """rmdir the cgroup ``loc`` and the cgroups below it, deepest first (rmdir of a cgroup
    takes its control files with it; it fails EBUSY while a process is in it)."""
    for sub in _subdirs(loc):
        _rmtree(loc.child(sub))
    try:
        with _dirfd(_Loc(loc.anchor, loc.parts[:-1])) as dfd:
            os.rmdir(loc.parts[-1], dir_fd=dfd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        hint = ("a process is still in it" if exc.errno == errno.EBUSY else "")
        raise _error(exc, f"cannot remove the cgroup {loc.path}", hint) from None


def spawn_in(cgroup: Cgroup, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **popen_kwargs)``, then the child's pid into the group at
    once (the window before that is in the module's docstring). If the move fails, the
    child is killed and reaped, and the HostError raised."""
    proc: subprocess.Popen[Any] = subprocess.Popen(list(argv), **popen_kwargs)
    try:
        cgroup.add(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def gc_leftovers(parent: str = DEFAULT_PARENT, *, host: CgroupHost | None = None,
                 min_age: float = GC_MIN_AGE) -> list[str]:
    """Remove the groups under ``parent`` that hold no process any more (in any hierarchy)
    and are at least ``min_age`` seconds old (a younger one may be waiting for its process);
    return their names. A group that gains a process meanwhile is left alone. Nothing to do
    on a host without usable cgroups."""
    parent = validate_name(parent, "cgroup parent")
    host = host if host is not None else detect()
    if host.problem:
        return []
    names: set[str] = set()
    for _, loc in host.locs(parent):
        names.update(_subdirs(loc))
    removed = []
    now = time.time()
    for name in sorted(names):
        try:
            group = Cgroup(name, parent=parent, host=host)
        except ConfigError:
            continue  # not a name pinnace gives: not ours
        if group.procs() or now - _newest_mtime(group) < min_age:
            continue
        try:
            group._rmdirs()
        except HostError:
            continue  # a process moved in after all; or EBUSY while one leaves: next time
        removed.append(name)
    return removed


def _newest_mtime(group: Cgroup) -> float:
    newest = 0.0
    for path in group.paths:
        with contextlib.suppress(FileNotFoundError):
            newest = max(newest, os.lstat(path).st_mtime)
    return newest
