"""``pinnace gc``: remove what commands that died left behind.

A command killed at any moment leaves the store telling the truth (see
:mod:`pinnace.store` and :mod:`pinnace.machine`), but it may leave garbage:

- staging and trash folders in tmp/ of a process that is gone;
- machines made by ``run --rm`` whose command died before deleting them, and machines,
  networks and volumes a test session made for itself (``ephemeral``) whose session died;
- VMM and switch processes that no machine or network owns any more (their
  folder is gone, or the machine's record names another process);
- ready snapshots that no pointer names and no machine uses.

Only processes whose files are inside this store are ever touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .errors import NotFoundError, PinnaceError
from .machine import LIVE, handle_of
from .machines import AsyncMachines
from .network.networks import AsyncNetworks
from .pool import AsyncPool
from .snapshots import AsyncSnapshots
from .store import (
    KernelCache,
    Owned,
    Store,
    owner_alive,
    owner_of,
    proc_argv,
    proc_cwd,
    proc_start_time,
    read_record,
)
from .volumes import AsyncVolumes

SWITCH_MODULE = "pinnace.network.switch"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removed:
    """One thing gc removed (or, in a dry run, would remove)."""

    kind: str  # "staging", "machine", "network", "volume", "process", "snapshot", "port",
    # "cgroup"
    what: str

    def __str__(self) -> str:
        verb = "killed" if self.kind == "process" else "removed"
        return f"{verb} {self.kind} {self.what}"


@dataclass(frozen=True)
class _Proc:
    pid: int
    argv: list[str]


def _processes() -> list[_Proc]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = proc_argv(int(entry))
        if argv is not None:
            out.append(_Proc(int(entry), argv))
    return out


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


class Collector:
    """Finds and removes a store's garbage."""

    def __init__(self, store: Store, machines: AsyncMachines, snapshots: AsyncSnapshots,
                 networks: AsyncNetworks, volumes: AsyncVolumes, pool: AsyncPool,
                 kernels: KernelCache) -> None:
        self.store = store
        self.volumes = volumes
        self.kernels = kernels
        self.machines = machines
        self.snapshots = snapshots
        self.networks = networks
        self.pool = pool

    async def collect(self, *, dry_run: bool = False, owned_only: bool = False
                      ) -> list[Removed]:
        """Remove the garbage (unless ``dry_run``) and return what it was. ``owned_only``:
        only what dead processes made ephemeral (a test session's first step)."""
        out: list[Removed] = []
        if owned_only:
            return await self._owned(dry_run)
        # every machine looked at: moves left half-done are settled
        await self.machines.list(pool=True)
        out += await self._owned(dry_run)
        out += await self._pool(dry_run)
        out += await self._orphan_processes(dry_run)
        for path in await self.snapshots.collect_unused(dry_run=dry_run):
            out.append(Removed("snapshot", str(path.relative_to(self.store.home))))
        for path in self.store.leftovers():
            out.append(Removed("staging", str(path.relative_to(self.store.home))))
        try:  # cgroups of CI jobs whose run was killed (their QEMUs are gone by now)
            from .backends.qemu import cgroup

            for name in await asyncio.to_thread(cgroup.gc_leftovers, "pinnace-ci"):
                out.append(Removed("cgroup", f"pinnace-ci/{name} (a CI job's, left behind)"))
        except PinnaceError:
            pass  # (no cgroups here, or not ours to touch)
        if await self.networks.retire_internet(dry_run=dry_run):
            out.append(Removed("network", "internet (made when first needed; nothing is on "
                                          "it or behind it now)"))
        for net, port in self.networks.stale_ports():
            out.append(Removed("port", f"{port} on network {net} (its router is gone)"))
            if not dry_run:
                with contextlib.suppress(PinnaceError, OSError):
                    await asyncio.to_thread(self.networks.remove_port, net, port)
        if not dry_run:
            await asyncio.to_thread(self.store.clean_tmp)
        try:  # the host-wide kernel cache: a kernel build killed half-way (GBs of source)
            for path in self.kernels.leftovers():
                out.append(Removed("staging", f"{path} (a kernel build whose command died)"))
            if not dry_run:
                await asyncio.to_thread(self.kernels.clean_tmp)
        except OSError:  # another user's cache, say: not ours to clean
            pass
        return out

    async def release(self, owner: str, *, dry_run: bool = False) -> list[Removed]:
        """Remove every machine, network and volume that process ``owner`` ("PID
        STARTTIME") made for itself (see :class:`pinnace.store.Owned`), living or not:
        what a test session does at its end."""
        return await self._owned(dry_run, owner)

    async def _owned(self, dry_run: bool, owner: str | None = None) -> list[Removed]:
        """Machines of ``run --rm`` (and of test sessions), then networks and volumes made
        for a process, whose process is gone; or, given ``owner``, all of that one's.
        Machines go first: a network or volume is removed only once nothing uses it."""
        def ours(recorded: str | None) -> bool:
            if recorded is None:
                return False
            return recorded == owner if owner is not None else not owner_alive(recorded)

        why = "its owner is done" if owner is not None else "its owner died"
        out = []
        going: set[str] = set()  # machines removed here (in a dry run: that would be)
        for name, cfg in list(self.store.machine_configs()):
            if not cfg.get("ephemeral"):
                continue
            if not ours(owner_of(self.store.machine_files(name)) or ""):
                continue
            going.add(name)
            out.append(Removed("machine", f"{name} (made by 'run --rm' or a test session; "
                                          f"{why})"))
            if not dry_run:
                with contextlib.suppress(PinnaceError):
                    await self.machines.handle(name).delete(force=True)
        for kind, folder, remove, users in (
                ("network", self.store.networks_dir, self.networks.remove,
                 self.networks.members),
                ("volume", self.store.volumes_dir, self.volumes.remove, self.volumes.users)):
            paths = sorted(folder.iterdir()) if folder.is_dir() else []
            if kind == "network":  # a network behind another goes before that one
                paths.sort(key=lambda p: -self.networks.depth(p.name))
            for path in paths:
                if not path.is_dir() or not ours(owner_of(Owned.at(path))):
                    continue
                if dry_run:
                    if set(users(path.name)) <= going:  # (else a kept machine uses it, say)
                        out.append(Removed(kind, f"{path.name} (made for a process; {why})"))
                    continue
                try:
                    await remove(path.name)
                except NotFoundError:
                    continue  # removed by someone else meanwhile
                except PinnaceError as exc:  # in use by a machine that was kept, say
                    log.info("gc: leaving %s %s: %s", kind, path.name, exc)
                    continue
                out.append(Removed(kind, f"{path.name} (made for a process; {why})"))
        return out

    async def _pool(self, dry_run: bool) -> list[Removed]:
        """Warm-pool members that are dead, stale (their ready snapshot was replaced), or
        half claimed (a claim was killed after renaming the folder: its config still
        names the member)."""
        out = []
        for name, why in await self.pool.unusable():
            out.append(Removed("machine", f"{name} (a warm-pool member {why})"))
            if not dry_run:
                with contextlib.suppress(PinnaceError):
                    await self.machines.handle(name).delete(force=True)
        return out

    async def _orphan_processes(self, dry_run: bool) -> list[Removed]:
        out = []
        killed = []
        dead_staging = {p.name for p in self.store.leftovers()}
        for proc in _processes():
            why = await self._orphan(proc, dead_staging)
            if why is None:
                continue
            out.append(Removed("process", f"{proc.pid} ({why})"))
            if not dry_run:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
        # Gone before their folders go: a launcher shell writes QEMU's exit status there.
        deadline = asyncio.get_running_loop().time() + 3.0
        while any(proc_start_time(pid) is not None for pid in killed):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        return out

    async def _orphan(self, proc: _Proc, dead_staging: set[str]) -> str | None:
        """Why ``proc`` is an orphan of this store, or None if it is not one (or not ours)."""
        argv = proc.argv
        if "-pidfile" in argv[:-1]:
            # A VMM, or the shell that launched it and waits for it (argv[0] "sh"). Both
            # work in their machine's folder (or a snapshot's staging folder): where it is
            # now, since the kernel follows renames, or where it was, if it was removed.
            qemu = os.path.basename(argv[0]).startswith("qemu-system")
            what = "QEMU" if qemu else "the launcher of a QEMU"
            where = proc_cwd(proc.pid)
            if where is None:
                return None  # it has ended since it was listed
            folder, deleted = where
            machines = self.store.machines_dir.resolve()
            tmp = self.store.tmp_dir.resolve()
            if _inside(folder, tmp):  # staging (a snapshot's): both go with the folder
                top = folder.relative_to(tmp).parts[0]
                if deleted or not (tmp / top).exists():
                    return f"{what} of tmp/{top}, a folder that was removed"
                if top in dead_staging:
                    return f"{what} of {top}, a snapshot whose command died"
                return None
            if qemu and _inside(folder, machines):
                name = folder.relative_to(machines).parts[0]
                if deleted:  # (a machine of that name made since is another folder)
                    return f"QEMU of {name}, a machine that is gone"
                return await self._machine_orphan(proc.pid, name)
            if deleted and _inside(folder, self.store.home.resolve()):
                return f"{what} of {folder.name}, a folder that was removed"
            return None
        if SWITCH_MODULE in argv and argv[-1].startswith("/"):
            folder = Path(argv[-1])
            if not _inside(folder, self.store.home):
                return None
            if folder.parent != self.store.networks_dir or not folder.is_dir():
                return f"switch of {folder.name}, a network that is gone"
        return None

    async def _machine_orphan(self, pid: int, name: str) -> str | None:
        machines = self.store.machines_dir.resolve()
        for _ in range(3):
            files = self.store.machine_files(name)
            if files.dir.is_dir():
                break
            # Renamed since its working directory was read (a warm-pool claim), or removed:
            # only the kernel's "deleted" says it is gone.
            where = proc_cwd(pid)
            if where is None:
                return None  # it has ended
            folder, deleted = where
            if deleted:
                return f"QEMU of {name}, a machine that is gone"
            if not _inside(folder, machines):
                return None
            name = folder.relative_to(machines).parts[0]
        else:
            return None  # still moving: the next gc looks again
        lock = self.store.try_locked("machine", name)
        if lock is None:
            return None  # a command is working on it: its process may not be recorded yet
        try:
            status = await self.machines.handle(name).status(holding_lock=True)
            try:
                handle = handle_of(read_record(files.state, ""))
            except (OSError, PinnaceError):
                handle = None
            if status.state in LIVE and handle is not None and handle.pid == pid:
                return None
            return f"QEMU of {name}, which is {status.state} and does not own it"
        finally:
            lock.release()


__all__ = ["Collector", "Removed"]
