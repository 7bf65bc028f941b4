"""The store on disk: its layout, atomic writes, removal, and locks.

This is the only module that knows the layout. Every file and folder is named
here, so no path string is spelled twice::

    $PINNACE_HOME/                   default ~/.local/share/pinnace
      machines/<name>/               one directory per machine (MachineFiles)
      images/<digest>/               vmlinux, initrd.img, rootfs.ext4, image.json (ImageFiles)
      refs/images/<name>             the digest an image name points at
      snapshots/<name>/              memory, state, disk.qcow2, clone.qcow2, snapshot.json
      volumes/<name>/                volume.ext4, volume.json (VolumeFiles)
      networks/<name>/               network.json, ports/, the switch's files (NetworkFiles)
      pool.json                      the warm pool's size setting
      cache/                         build layers, host probes, ready snapshots; safe to delete
        ready/<slot>.json            which ready snapshot serves an image and shape
        pool-fill.log                what detached warm-pool fillers printed
        ready/<id>/                  a ready snapshot (SnapshotFiles)
      locks/                         one lock file per object, outside its directory
      tmp/                           staging and trash: <what>-<pid>-..., removed by gc when
                                     that process is gone

Writes are atomic (temporary file, fsync, rename, fsync of the folder): a reader sees
the old file or the new one. Objects are made whole in tmp/ and renamed into place,
and removed by renaming them into tmp/ first, so a killed command leaves either the
whole object or nothing in its place, plus a folder in tmp/ that ``pinnace gc`` removes.

Locks: one ``flock`` per object, in locks/, taken through :meth:`Store.locked` (or
:meth:`Store.alocked` in async code, which polls from the event loop and so never
blocks it, and ends at once when cancelled). (Two locks live elsewhere, each guarding
one thing of its folder: a machine's agent ports, ``agent<N>.lock``, and a network's
switch start-up, ``switch.lock``.) A command that needs several takes them all at once, and they are always
taken in this order (LOCK_ORDER), so two commands can never wait for each other::

    pool filler < ready slot < image < snapshot < machine (by name) < network (by name)
    < subnets (all networks' address plan, while one is made) < volume

A lock is held by an open file; a command that dies drops its locks with it. So a
machine whose state says a command is moving it (starting, stopping) while nobody
holds its lock was left by a command that died; :mod:`pinnace.machine` finishes
or rolls back what it left.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, LockTimeout, StoreError, store_error

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME_HINT = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise ConfigError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(f"{kind} name", name, NAME_HINT)
    return name


def default_home() -> Path:
    """The store root: $PINNACE_HOME, else $XDG_DATA_HOME/pinnace, else ~/.local/share/pinnace."""
    env = os.environ.get("PINNACE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "pinnace"


class Owned:
    """An object that may be made for a process (``run --rm``, a test session): its
    folder's ``owner`` file holds that process's "PID STARTTIME"; once the process is
    gone, ``gc`` removes the object. No owner file: it is kept until removed."""

    dir: Path

    @property
    def owner(self) -> Path:
        return self.dir / "owner"

    @staticmethod
    def at(folder: Path) -> Owned:
        """The owner file of any object's folder."""
        return _AnyOwned(folder)


@dataclass(frozen=True)
class _AnyOwned(Owned):
    dir: Path


@dataclass(frozen=True)
class MachineFiles(Owned):
    """The files in one machine's directory."""

    dir: Path

    def cwd_path(self, path: Path) -> str:
        """``path`` as a process whose working directory is this folder (QEMU and its
        launcher) is given it: relative if it lies inside the folder ("disk.qcow2"), so
        that it names the same file after the folder is renamed while the process runs;
        absolute if it lies elsewhere (an image, a volume, a snapshot's memory)."""
        try:
            return path.relative_to(self.dir).as_posix()
        except ValueError:
            return str(path)

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def prev_serial_log(self) -> Path:
        """The serial log of the run before the last."""
        return self.dir / "serial.log.prev"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def qmp_sock(self) -> Path:
        return self.dir / "qmp.sock"

    def agent_sock(self, port: int) -> Path:
        return self.dir / f"agent{port}.sock"

    def agent_lock(self, port: int) -> Path:
        return self.dir / f"agent{port}.lock"

    @property
    def pid(self) -> Path:
        return self.dir / "pid"

    @property
    def exit_status(self) -> Path:
        """Written by the launcher shell when QEMU exits: QEMU's exit status."""
        return self.dir / "exit"

    @property
    def launch_token(self) -> Path:
        """The token of the last launch, which its exit status must carry."""
        return self.dir / "exit.token"

    @property
    def events(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def old_events(self) -> Path:
        """events.jsonl once it grew past its size: the one before it, kept."""
        return self.dir / "events.1.jsonl"

    @property
    def resume(self) -> Path:
        """Present when the next start restores a saved state instead of booting."""
        return self.dir / "resume.json"

    @property
    def saved_state(self) -> Path:
        return self.dir / "saved.state"

    def nic_sock(self, nic: int) -> Path:
        """Where QEMU's dgram netdev for NIC ``nic`` (on a virtual network) binds."""
        return self.dir / f"n{nic}.sock"

    def nic_peer(self, nic: int) -> Path:
        """Where that NIC sends: the network's switch binds it while the NIC is connected."""
        return self.dir / f"n{nic}.peer"

    def runtime_files(self) -> list[Path]:
        """Files that belong to one run of QEMU and are removed when it ends."""
        from .agent.protocol import AGENT_PORTS

        files = [self.qmp_sock, self.pid]
        for port in range(AGENT_PORTS):
            files += [self.agent_sock(port), self.agent_lock(port)]
        with contextlib.suppress(OSError):
            files += sorted(self.dir.glob("n[0-9]*.sock"))
        return files


@dataclass(frozen=True)
class ImageFiles:
    """The files of one built image."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"

    @property
    def manifest(self) -> Path:
        return self.dir / "image.json"

    @property
    def build_log(self) -> Path:
        return self.dir / "build.log"


@dataclass(frozen=True)
class BaseLayerFiles:
    """A cached mmdebstrap layer (``cache/base/<key>/``): what images are built from."""

    dir: Path

    @property
    def rootfs_tar(self) -> Path:
        return self.dir / "rootfs.tar"

    @property
    def debs(self) -> Path:
        """The kernel and busybox packages fetched with it."""
        return self.dir / "debs"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def build_log(self) -> Path:
        return self.dir / "build.log"


@dataclass(frozen=True)
class KernelFiles:
    """A built guest kernel in the host-wide kernel cache (``<kernel cache>/<key>/``)."""

    dir: Path

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def modules(self) -> Path:
        """The modules installed as ``make modules_install`` lays them out
        (``lib/modules/<release>/``), to be copied into an image's root."""
        return self.dir / "modules"

    @property
    def config(self) -> Path:
        """The kernel's whole .config."""
        return self.dir / "config"

    @property
    def manifest(self) -> Path:
        return self.dir / "kernel.json"

    @property
    def build_log(self) -> Path:
        return self.dir / "build.log"


def default_kernel_cache() -> Path:
    """Where built kernels live, shared by every store on the host: $PINNACE_KERNEL_CACHE,
    else /var/cache/pinnace/kernels for root, else $XDG_CACHE_HOME/pinnace/kernels."""
    env = os.environ.get("PINNACE_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return Path("/var/cache/pinnace/kernels")
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pinnace" / "kernels"


class KernelCache:
    """The host-wide kernel cache: ``<key>/`` per built kernel (KernelFiles), ``tmp/``
    for builds under way (``kernel-<pid>-...``, removed once that process is gone), and
    ``locks/<key>.lock`` so that two builds of one kernel, from any store, make it once."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else default_kernel_cache()

    def kernel(self, key: str) -> KernelFiles:
        return KernelFiles(self.root / key)

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def failed_log(self) -> Path:
        """The whole log of the last build that failed (its folder is removed)."""
        return self.root / "last-failed-build.log"

    def lock(self, key: str, timeout: float) -> FileLock:
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(exc, "making the kernel cache's folders") from None
        return FileLock(self.root / "locks" / f"{key}.lock", timeout)

    def staging_dir(self, prefix: str) -> contextlib.AbstractContextManager[Path]:
        return staging_dir(self.tmp_dir, prefix)

    def leftovers(self) -> list[Path]:
        """Builds in tmp/ whose process has died."""
        return leftovers(self.tmp_dir)

    def clean_tmp(self) -> list[Path]:
        return clean_leftovers(self.tmp_dir)


@dataclass(frozen=True)
class CacheFiles:
    """``cache/``: what can be made again, so is safe to delete."""

    dir: Path

    @property
    def qemu_version(self) -> Path:
        """The version of each QEMU binary seen (running it to ask costs a process)."""
        return self.dir / "qemu-version.json"

    @property
    def host_facts(self) -> Path:
        """Facts about the host until it reboots (its TSC frequency)."""
        return self.dir / "host.json"

    @property
    def kvm_probe(self) -> Path:
        """Whether a probe VM ran under KVM, per QEMU binary and host boot."""
        return self.dir / "kvm-probe.json"

    def base_layer(self, key: str) -> BaseLayerFiles:
        return BaseLayerFiles(self.dir / "base" / key)


@dataclass(frozen=True)
class SnapshotFiles:
    """The files of one snapshot (named, or a ready snapshot in the cache)."""

    dir: Path

    @property
    def memory(self) -> Path:
        """Guest RAM, raw; mapped copy-on-write by every clone."""
        return self.dir / "memory"

    @property
    def state(self) -> Path:
        """QEMU's device state (a migration stream without the RAM)."""
        return self.dir / "state"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def clone_disk(self) -> Path:
        """An empty overlay on disk.qcow2: each clone starts with a copy of it."""
        return self.dir / "clone.qcow2"

    @property
    def meta(self) -> Path:
        return self.dir / "snapshot.json"

    @property
    def stream(self) -> Path:
        """While a snapshot is made from a running machine: its whole saved state."""
        return self.dir / "stream"

    @property
    def run(self) -> MachineFiles:
        """While a snapshot is made: the folder of the QEMU that writes it."""
        return MachineFiles(self.dir / "run")

    def spare_volume(self, index: int) -> Path:
        """While a ready template runs: the empty disk in its volume slot ``index``, which
        each clone fills with its own volume (the template never mounts it)."""
        return self.run.dir / f"spare-vol{index}.raw"

    def spare_share(self, index: int) -> Path:
        """While a ready template runs: the empty folder in its shared-folder slot ``index``."""
        return self.run.dir / f"spare-share{index}"

    def checked(self) -> dict[str, Path]:
        """The files snapshot.json lists with their size and checksum."""
        return {"memory": self.memory, "state": self.state, "disk.qcow2": self.disk,
                "clone.qcow2": self.clone_disk}


@dataclass(frozen=True)
class VolumeFiles(Owned):
    """The files in one volume's directory."""

    dir: Path

    @property
    def image(self) -> Path:
        return self.dir / "volume.ext4"

    @property
    def meta(self) -> Path:
        return self.dir / "volume.json"


@dataclass(frozen=True)
class NetworkFiles(Owned):
    """The files in one network's directory: its description and its switch's files."""

    dir: Path

    @property
    def meta(self) -> Path:
        return self.dir / "network.json"

    @property
    def ports_dir(self) -> Path:
        """One ``<port-id>.json`` per NIC on the network, written by pinnace."""
        return self.dir / "ports"

    @property
    def captures_dir(self) -> Path:
        """One ``<id>.json`` per running capture ({"path": a pcap file}), by pinnace."""
        return self.dir / "captures"

    def port_file(self, port_id: str) -> Path:
        return self.ports_dir / f"{port_id}.json"

    def host_sock(self, nic: str) -> Path:
        """Where a simulated host of the network's switch (its router's "lan" and "wan"
        NICs, the internet's "core") binds its end of a port."""
        return self.dir / "hosts" / f"{nic}.sock"

    def host_peer(self, nic: str) -> Path:
        """The switch's end of that port (bound by the switch of the network it is on)."""
        return self.dir / "hosts" / f"{nic}.peer"

    @property
    def switch_pid(self) -> Path:
        return self.dir / "switch.pid"

    @property
    def supervisor_pid(self) -> Path:
        return self.dir / "supervisor.pid"

    @property
    def state(self) -> Path:
        """The ports the running switch has bound and rejected, rewritten when they change."""
        return self.dir / "switch.ports.json"

    @property
    def log(self) -> Path:
        return self.dir / "switch.log"

    @property
    def lock(self) -> Path:
        """Held while the switch's supervisor is started or stopped."""
        return self.dir / "switch.lock"

    @property
    def stats(self) -> Path:
        return self.dir / "switch.stats.json"


class Store:
    """A pinnace store rooted at one directory."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.home = self.home.absolute()
        # Socket paths must fit in sun_path (108 bytes): refuse a home that leaves no room.
        if not self.socket_paths_fit("x" * 16):
            raise ConfigError(
                "PINNACE_HOME", str(self.home),
                "the path is too long for unix sockets inside it; choose a shorter directory",
            )

    def socket_paths_fit(self, machine: str) -> bool:
        """True if the unix sockets of a machine with this name fit in sun_path."""
        from .agent.protocol import AGENT_PORTS

        longest = self.machine_files(machine).agent_sock(AGENT_PORTS - 1)
        return len(os.fsencode(longest)) <= 107

    def check_staging_sockets(self) -> None:
        """ConfigError unless the sockets of a QEMU run in a staging folder (which makes a
        snapshot: tmp/snapshot-<pid>-<8 chars>/run/) fit in sun_path."""
        from .agent.protocol import AGENT_PORTS

        run = SnapshotFiles(self.tmp_dir / f"snapshot-{'9' * 7}-{'x' * 8}").run
        if len(os.fsencode(run.agent_sock(AGENT_PORTS - 1))) > 107:
            raise ConfigError("PINNACE_HOME", str(self.home), "the path is too long for the "
                              "unix sockets of a snapshot being made; choose a shorter one")

    # --- directories -----------------------------------------------------------------

    @property
    def machines_dir(self) -> Path:
        return self.home / "machines"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def image_refs_dir(self) -> Path:
        return self.home / "refs" / "images"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def volumes_dir(self) -> Path:
        return self.home / "volumes"

    @property
    def networks_dir(self) -> Path:
        return self.home / "networks"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def pool_settings(self) -> Path:
        """The warm pool's settings (its size)."""
        return self.home / "pool.json"

    @property
    def pool_log(self) -> Path:
        """What the detached pool fillers printed."""
        return self.cache_dir / "pool-fill.log"

    @property
    def ready_dir(self) -> Path:
        """Ready snapshots and the pointers saying which serves an image and shape."""
        return self.cache_dir / "ready"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    def machine_files(self, name: str) -> MachineFiles:
        return MachineFiles(self.machines_dir / name)

    def image_files(self, digest: str) -> ImageFiles:
        return ImageFiles(self.images_dir / digest)

    def image_ref(self, name: str) -> Path:
        return self.image_refs_dir / name

    def snapshot_files(self, name: str) -> SnapshotFiles:
        return SnapshotFiles(self.snapshots_dir / name)

    def ready_files(self, ident: str) -> SnapshotFiles:
        return SnapshotFiles(self.ready_dir / ident)

    def ready_pointer(self, slot: str) -> Path:
        return self.ready_dir / f"{slot}.json"

    def snapshot_ref(self, files: SnapshotFiles) -> str:
        """How a machine's config names the snapshot it comes from: its folder in the store."""
        return files.dir.relative_to(self.home).as_posix()

    def snapshot_at(self, ref: str) -> tuple[SnapshotFiles, bool] | None:
        """The snapshot a reference names, and whether it is a ready one (in the cache);
        None if the reference is not one this layout makes."""
        parts = ref.split("/")
        if len(parts) == 2 and parts[0] == "snapshots" and NAME_RE.match(parts[1]):
            return self.snapshot_files(parts[1]), False
        if len(parts) == 3 and parts[:2] == ["cache", "ready"] and NAME_RE.match(parts[2]):
            return self.ready_files(parts[2]), True
        return None

    def out_of_space(self, path: Path | None = None) -> bool:
        """True if the filesystem holding ``path`` (the store) is all but full: what a
        helper program (QEMU writing a state through ``cat``) says as a broken pipe."""
        try:
            st = os.statvfs(path or self.home)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < LOW_SPACE

    def put_in_place(self, stage: Path, final: Path, what: str) -> None:
        """Rename a folder made whole in staging into place (see :func:`put_in_place`)."""
        put_in_place(stage, final, what)

    def volume_files(self, name: str) -> VolumeFiles:
        return VolumeFiles(self.volumes_dir / name)

    def network_files(self, name: str) -> NetworkFiles:
        return NetworkFiles(self.networks_dir / name)

    @property
    def cache(self) -> CacheFiles:
        return CacheFiles(self.cache_dir)

    def ensure(self) -> None:
        """Create the top-level directories (idempotent)."""
        try:
            for d in (self.machines_dir, self.images_dir, self.image_refs_dir, self.cache_dir,
                      self.locks_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(exc, "making the store's folders") from None

    def machine_configs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, config.json as a dict) of every machine whose config can be read,
        by name; damaged or vanishing ones are skipped (``status`` reports them)."""
        d = self.machines_dir
        if not d.is_dir():
            return
        for entry in sorted(d.iterdir()):
            try:
                data = read_json(entry / "config.json")
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                yield entry.name, data

    # --- locks -----------------------------------------------------------------------

    def lock(self, kind: str, name: str, timeout: float = 60.0, *,
             shared: bool = False) -> FileLock:
        """The lock on one object. Take it with :meth:`locked` or :meth:`alocked`, which
        keep LOCK_ORDER; a FileLock alone is for the single-lock helpers below."""
        if kind not in LOCK_ORDER:
            raise ValueError(f"unknown lock kind {kind!r}")
        try:
            self.locks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(exc, "making the locks folder") from None
        return FileLock(self.locks_dir / f"{kind}-{name}.lock", timeout, shared=shared)

    def _ordered(self, objs: tuple[tuple[str, str], ...], shared: tuple[tuple[str, str], ...],
                 timeout: float) -> list[FileLock]:
        exclusive = set(objs)
        keys = sorted(exclusive | set(shared), key=lambda o: (LOCK_ORDER.index(o[0]), o[1]))
        return [self.lock(kind, name, timeout, shared=(kind, name) not in exclusive)
                for kind, name in keys]

    @contextlib.contextmanager
    def locked(self, *objs: tuple[str, str], shared: tuple[tuple[str, str], ...] = (),
               timeout: float = 60.0) -> Iterator[None]:
        """Hold the locks of ``objs`` ((kind, name) pairs) and, shared with other users
        of the same things, of ``shared``: all taken in LOCK_ORDER. A shared lock keeps
        an object from being removed while it is used; removing takes it exclusively."""
        with contextlib.ExitStack() as stack:
            for lk in self._ordered(objs, shared, timeout):
                stack.enter_context(lk)
            yield

    @contextlib.asynccontextmanager
    async def alocked(self, *objs: tuple[str, str], shared: tuple[tuple[str, str], ...] = (),
                      timeout: float = 60.0) -> AsyncIterator[None]:
        """:meth:`locked` for async code: waits without blocking the event loop."""
        held: list[FileLock] = []
        try:
            for lk in self._ordered(objs, shared, timeout):
                await lk.acquire_async()
                held.append(lk)
            yield
        finally:
            for lk in reversed(held):
                lk.release()

    def lock_names(self, kind: str) -> list[str]:
        """The names that locks of ``kind`` have been taken for (their files stay)."""
        prefix = f"{kind}-"
        try:
            return sorted(p.name[len(prefix):-len(".lock")] for p in self.locks_dir.iterdir()
                          if p.name.startswith(prefix) and p.name.endswith(".lock"))
        except OSError:
            return []

    def try_locked(self, kind: str, name: str) -> FileLock | None:
        """The lock of one object if nobody holds it (taken), else None. No waiting."""
        lk = self.lock(kind, name, 0.0)
        return lk if lk.try_acquire() else None

    # --- staging and removal ---------------------------------------------------------

    def staging_dir(self, prefix: str) -> contextlib.AbstractContextManager[Path]:
        """A fresh folder under tmp/, removed unless renamed away (:func:`staging_dir`)."""
        return staging_dir(self.tmp_dir, prefix)

    def remove_tree(self, path: Path) -> None:
        """Remove a folder of the store: renamed into tmp/ first, so it vanishes at once
        and whole, then deleted (a killed command leaves it to ``gc``)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        trash = self.tmp_dir / f"delete-{os.getpid()}-{secrets.token_hex(4)}-{path.name}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def leftovers(self) -> list[Path]:
        """Folders and files in tmp/ of pinnace processes that have died."""
        return leftovers(self.tmp_dir)

    def clean_tmp(self) -> list[Path]:
        """Remove what :meth:`leftovers` finds; return what was removed."""
        return clean_leftovers(self.tmp_dir)


# --- staging: objects made whole in a tmp/ folder, then renamed into place ---------------


@contextlib.contextmanager
def staging_dir(tmp_dir: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory under ``tmp_dir`` that is removed unless the caller renamed it
    away. ``prefix`` is a word like ``machine-``; the folder carries our pid, so that
    ``gc`` can tell a dead command's leftovers from a live one's work."""
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=tmp_dir))
    except OSError as exc:
        raise store_error(exc, "making a staging folder") from None
    try:
        yield path
    finally:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def put_in_place(stage: Path, final: Path, what: str) -> None:
    """Rename a folder made whole in staging into place, durably (the parent folder is
    fsynced). FileExistsError if something is there already."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        os.rename(stage, final)
        fsync_dir(final.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
        raise store_error(exc, f"putting {what} in place") from None


def leftovers(tmp_dir: Path) -> list[Path]:
    """Entries of a tmp/ folder (``<what>-<pid>-...``) whose process has died."""
    out: list[Path] = []
    if not tmp_dir.is_dir():
        return out
    for entry in sorted(tmp_dir.iterdir()):
        m = re.match(r"^\.?[a-z]+-(\d+)-", entry.name)
        if m and not pid_alive(int(m.group(1))):
            out.append(entry)
    return out


def clean_leftovers(tmp_dir: Path) -> list[Path]:
    """Remove what :func:`leftovers` finds; return what was removed."""
    gone = leftovers(tmp_dir)
    for entry in gone:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    return gone


LOW_SPACE = 16 << 20  # bytes free below which a failed write is put down to a full disk
LOCK_POLL = 0.02  # seconds between tries of a lock someone else holds
# The order in which locks are taken (see the module's docstring).
LOCK_ORDER = ("pool", "ready", "image", "snapshot", "machine", "network", "subnets",
              "volume")


def proc_start_time(pid: int) -> int | None:
    """When process ``pid`` started (field 22 of /proc/PID/stat, in ticks since boot), or
    None if it is gone or a zombie: a pid and its start time name one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # comm may hold spaces and parentheses
    return None if fields[0] == b"Z" else int(fields[19])


def proc_argv(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (decoded leniently), or None if it is gone, a
    zombie or a kernel thread, or cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw:
        return None
    return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")]


DELETED_SUFFIX = " (deleted)"  # what the kernel appends to a removed folder's path


def proc_cwd(pid: int) -> tuple[Path, bool] | None:
    """The working directory of process ``pid`` and whether it has been removed; None if
    the process is gone (or not ours to look at). The kernel follows renames: this is
    where the folder is now, not where it was when the process started."""
    link = f"/proc/{pid}/cwd"
    try:
        target = os.readlink(link)
        deleted = os.stat(link).st_nlink == 0
    except OSError:
        return None
    if deleted and target.endswith(DELETED_SUFFIX):
        target = target[: -len(DELETED_SUFFIX)]
    return Path(target), deleted


def detached_env() -> dict[str, str]:
    """This process's environment, for a detached pinnace process that runs in / (the
    switch supervisor, a pool filler): relative PYTHONPATH entries (PYTHONPATH=src in a
    checkout) are made absolute, so it imports the same pinnace as this process."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else p
                                            for p in env["PYTHONPATH"].split(os.pathsep))
    return env


def this_process() -> str:
    """"PID STARTTIME" of this process, for an owner file."""
    pid = os.getpid()
    return f"{pid} {proc_start_time(pid)}"


def owner_of(files: Owned) -> str | None:
    """The owner an object's folder records ("PID STARTTIME"), or None if it has none."""
    try:
        return files.owner.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return ""  # unreadable: an owner nobody can match, so gc takes it as gone


def drop_owner(files: Owned) -> None:
    """Make an object no process's: kept until it is removed."""
    try:
        files.owner.unlink(missing_ok=True)
    except OSError as exc:
        raise store_error(exc, "keeping it") from None


def owner_alive(text: str) -> bool:
    """True if the process an owner file names ("PID STARTTIME") still runs."""
    words = text.split()
    if len(words) != 2 or not all(w.isdigit() for w in words):
        return False
    return proc_start_time(int(words[0])) == int(words[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """A ``flock`` on a file (exclusive, or ``shared`` with other shared holders),
    acquired with a timeout; re-entrant per object. Two FileLocks on one file conflict
    even in one process (flock belongs to the open file, not the process)."""

    def __init__(self, path: Path, timeout: float, *, shared: bool = False) -> None:
        self.path = path
        self.timeout = timeout
        self.shared = shared
        self._fd: int | None = None
        self._depth = 0

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True if taken. Never waits."""
        if self._fd is not None:
            self._depth += 1
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return False
        self._fd = fd
        self._depth = 1
        return True

    def acquire(self) -> None:
        """Take the lock, waiting up to the timeout (LockTimeout after it)."""
        deadline = time.monotonic() + self.timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise LockTimeout(str(self.path), self.timeout)
            time.sleep(LOCK_POLL)

    async def acquire_async(self) -> None:
        """:meth:`acquire` for async code: polls from the event loop, so a cancelled wait
        (Ctrl-C) ends at once and never leaves a lock taken behind it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not self.try_acquire():
            if loop.time() >= deadline:
                raise LockTimeout(str(self.path), self.timeout)
            await asyncio.sleep(LOCK_POLL)

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth == 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(path: Path) -> int | None:
    """Take a non-blocking exclusive flock on ``path``; return the fd, or None if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


# --- atomic files --------------------------------------------------------------------


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a torn one."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        # The temporary name starts with '.': readers of a folder (the switch's ports/)
        # skip such files.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise store_error(exc, f"writing {path.name}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise store_error(exc, f"writing {path.name}") from None
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_record(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object the store keeps (config.json, state.json, snapshot.json...).
    FileNotFoundError passes through; anything else unreadable is a StoreError naming
    the file and ``fix``."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise StoreError(str(path), f"cannot be read ({exc})", fix) from None
    if not isinstance(data, dict):
        raise StoreError(str(path), "is not a JSON object", fix)
    return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tail(path: Path, lines: int = 40, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a text file (guest output: decoded leniently), or ''."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    # Drop terminal control characters the guest may print; keep tabs and newlines.
    text = "".join(c for c in text if c in "\t\n" or (c.isprintable() and c != "\x1b"))
    return "\n".join(text.splitlines()[-lines:])
