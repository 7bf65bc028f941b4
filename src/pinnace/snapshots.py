"""Snapshots: a machine's saved RAM, device state and disk, and clones started from them.

A snapshot directory holds::

    memory         guest RAM, raw; mapped copy-on-write by every clone (never changes)
    state          QEMU's device state (a migration stream without the RAM)
    disk.qcow2     the disk as it was, an overlay on the image's root filesystem
    clone.qcow2    an empty overlay on disk.qcow2: each clone starts with a copy of it
    snapshot.json  what it was made from (its key), and the size and sha256 of each file

Clones map ``memory`` with ``share=off``: unchanged pages stay shared between them,
and restore time does not grow with RAM size. A snapshot is only made in the
"mapped" form: a machine whose RAM was not in a file is first saved as one stream
(RAM inside) and loaded into a paused QEMU whose RAM *is* a shared file, which is
then saved again; one path for every source.

The ready-snapshot cache (``ready()``) keeps one snapshot per image and machine shape,
made by booting the image once; its key (image digest, shape, QEMU version,
accelerator, CPU model, SNAPSHOT_FORMAT) is checked before every use and a change
rebuilds it, with a notice naming what changed.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .agent.client import AgentClient, anchor_from, clock_anchor
from .backends.qemu import command as qcmd
from .backends.qemu import host as qhost
from .backends.qemu import process as qproc
from .backends.qemu.qmp import MigrationFailed, load_state, quit_qemu, save_state
from .config import NAT_GUEST
from .errors import (
    AgentError,
    AlreadyExistsError,
    ConfigError,
    MachineError,
    NotFoundError,
    SnapshotError,
)
from .store import MachineFiles, read_json, tail, validate_name, write_json

if TYPE_CHECKING:
    from .client import AsyncPinnace
    from .config import MachineConfig
    from .machine import AsyncMachine

log = logging.getLogger(__name__)

# Bump when what a snapshot holds or how it is loaded changes: old ones are rebuilt.
# 3: NICs in the device list; MACs in snapshot.json. 4: ready templates have the NAT address.
SNAPSHOT_FORMAT = 4
# Files smaller than this are checksummed before every restore; larger ones by size only
# (and fully by `pinnace snapshot inspect --verify`).
QUICK_SUM_LIMIT = 8 << 20
TEMPLATE_BOOT_TIMEOUT = 120.0


@dataclass(frozen=True)
class SnapshotFiles:
    dir: Path

    @property
    def memory(self) -> Path:
        return self.dir / "memory"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def clone_disk(self) -> Path:
        return self.dir / "clone.qcow2"

    @property
    def meta(self) -> Path:
        return self.dir / "snapshot.json"

    def checked(self) -> dict[str, Path]:
        return {"memory": self.memory, "state": self.state, "disk.qcow2": self.disk,
                "clone.qcow2": self.clone_disk}


@dataclass(frozen=True)
class SnapshotKey:
    """Everything a saved state depends on: load it only where all of it matches."""

    image_digest: str
    cpus: int
    memory_mib: int
    devices: str
    nics: int
    qemu: str
    accel: str
    cpu_model: str
    format: int

    @property
    def shape(self) -> str:
        return f"{self.cpus} CPU, {self.memory_mib}M, {self.nics} NIC"

    def changes(self, old: dict[str, Any]) -> list[str]:
        """What differs from an older key, as 'field old -> new' phrases."""
        out = []
        for k, v in asdict(self).items():
            if old.get(k) != v:
                shown_old, shown_new = old.get(k), v
                if k == "image_digest":
                    shown_old, shown_new = str(shown_old or "?")[:12], str(v)[:12]
                out.append(f"{k.replace('_', ' ')} {shown_old} -> {shown_new}")
        return out


@dataclass(frozen=True)
class Snapshot:
    """A snapshot in the store, as its snapshot.json describes it."""

    name: str
    path: Path
    ref: str  # its directory relative to the store root; machine configs point here
    image: str
    key: dict[str, Any]
    source: str
    created: float
    files: dict[str, dict[str, Any]]
    macs: dict[str, Any]  # the MACs its NICs were saved with ({"nat": ..., "nics": [...]})
    clock: float | None = None  # the guest's CLOCK_MONOTONIC when it was saved

    @property
    def memory_mib(self) -> int:
        return int(self.key["memory_mib"])

    @property
    def cpus(self) -> int:
        return int(self.key["cpus"])

    @property
    def shape(self) -> str:
        return f"{self.cpus} CPU, {self.memory_mib}M, {self.key.get('nics', 0)} NIC"

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(snap: Snapshot, *, full: bool = False) -> None:
    """Raise SnapshotError if a file is missing, of the wrong size or (small files, or all
    with ``full``) of the wrong checksum."""
    files = SnapshotFiles(snap.path)
    for fname, path in files.checked().items():
        want = snap.files.get(fname)
        if want is None:
            raise SnapshotError(snap.name, f"snapshot.json does not list {fname}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SnapshotError(snap.name, f"{fname} is missing") from None
        if size != want["size"]:
            raise SnapshotError(snap.name, f"{fname} is {size} bytes, snapshot.json says "
                                f"{want['size']} (truncated or changed)")
        if (full or size <= QUICK_SUM_LIMIT) and sha256_file(path) != want["sha256"]:
            raise SnapshotError(snap.name, f"{fname} does not match its checksum")


def machine_key(pn: AsyncPinnace, cfg: MachineConfig, accel: str) -> SnapshotKey:
    binary = qhost.qemu_binary()
    return SnapshotKey(
        image_digest=cfg.image_digest, cpus=cfg.cpus, memory_mib=cfg.memory_mib,
        devices=qcmd.devices_key(cfg.net != "none", len(cfg.nics), len(cfg.volumes),
                                 len(cfg.shares)),
        nics=int(cfg.net != "none") + len(cfg.nics), qemu=qhost.cached_qemu_version(binary, pn.store.cache_dir),
        accel=accel, cpu_model=qcmd.CPU_MODEL[accel], format=SNAPSHOT_FORMAT,
    )


def _read(path: Path, name: str, ref: str) -> Snapshot:
    try:
        meta = read_json(path / "snapshot.json")
        return Snapshot(name=name, path=path, ref=ref, image=str(meta["image"]),
                        key=dict(meta["key"]), source=str(meta.get("source", "")),
                        created=float(meta["created"]), files=dict(meta["files"]),
                        macs=dict(meta.get("macs") or {"nat": "", "nics": []}),
                        clock=anchor_from(meta.get("clock")))
    except FileNotFoundError:
        raise NotFoundError("snapshot", name, "see 'pinnace snapshot ls'") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(name, f"snapshot.json is damaged ({exc})") from None


class AsyncSnapshots:
    """The snapshots in a store, and the ready-snapshot cache."""

    def __init__(self, pinnace: AsyncPinnace) -> None:
        self._pn = pinnace

    @property
    def _dir(self) -> Path:
        return self._pn.store.home / "snapshots"

    @property
    def _ready_dir(self) -> Path:
        return self._pn.store.cache_dir / "ready"

    # -- lookup --------------------------------------------------------------------------

    def get(self, name: str) -> Snapshot:
        validate_name("snapshot", name)
        return _read(self._dir / name, name, f"snapshots/{name}")

    def by_ref(self, ref: str) -> Snapshot:
        """The snapshot a machine config points at (``snapshots/NAME`` or ``cache/ready/ID``)."""
        parts = ref.split("/")
        if len(parts) == 2 and parts[0] == "snapshots":
            return self.get(parts[1])
        if len(parts) == 3 and parts[:2] == ["cache", "ready"]:
            validate_name("snapshot", parts[2])
            return _read(self._ready_dir / parts[2], f"ready snapshot {parts[2]}", ref)
        raise ConfigError("snapshot reference", ref, "the machine's config.json is damaged")

    def list(self) -> list[Snapshot]:
        out = []
        if self._dir.is_dir():
            for entry in sorted(self._dir.iterdir()):
                with contextlib.suppress(NotFoundError, SnapshotError, ConfigError):
                    out.append(self.get(entry.name))
        return out

    def users(self, ref: str) -> tuple[str, ...]:
        """Machines whose disk or RAM depends on the snapshot at ``ref``."""
        users: builtins.list[str] = []
        d = self._pn.store.machines_dir
        if d.is_dir():
            for entry in sorted(d.iterdir()):
                with contextlib.suppress(OSError, ValueError):
                    if read_json(entry / "config.json").get("snapshot") == ref:
                        users.append(entry.name)
        return tuple(users)

    async def remove(self, name: str) -> None:
        snap = self.get(name)
        with self._pn.store.lock("snapshot", name, timeout=30):
            users = self.users(snap.ref)
            if users:
                raise SnapshotError(name, f"machine(s) {', '.join(users)} are made from it; "
                                    "delete them first")
            self._trash(snap.path)

    def _trash(self, path: Path) -> None:
        trash = self._pn.store.tmp_dir / f"delete-{os.getpid()}-{path.name}"
        self._pn.store.tmp_dir.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # -- making them ---------------------------------------------------------------------

    async def create(self, machine: AsyncMachine, name: str) -> Snapshot:
        """Save a running machine as snapshot ``name``; the machine keeps running."""
        from .machine import STOPPABLE, MachineState

        validate_name("snapshot", name)
        store = self._pn.store
        final = self._dir / name
        if final.exists():
            raise AlreadyExistsError("snapshot", name)
        self._dir.mkdir(parents=True, exist_ok=True)
        with store.staging_dir("snapshot-") as stage:
            async with await machine._locked():
                st = await machine._require("snapshot", STOPPABLE)
                cfg = machine.config
                if cfg.volumes or cfg.shares:
                    raise SnapshotError(name, f"machine {machine.name!r} has volumes or shared "
                                        "folders, whose contents live outside it and cannot "
                                        "be saved with it; snapshot a machine without them")
                key = machine_key(self._pn, cfg, st.accel or "tcg")
                reading = await machine._guest_clock(st.state)
                await machine._drop_agent()
                stream = stage / "stream"
                try:
                    stopped = await save_state(machine.paths.qmp_sock, machine.name, stream,
                                               ignore_shared=False)
                    await asyncio.to_thread(shutil.copyfile, machine.paths.disk,
                                            SnapshotFiles(stage).disk)
                finally:
                    if st.state != MachineState.PAUSED:
                        await machine._resume_cpus()
            clock = await self._map(stage, cfg, key, final, from_stream=stream,
                                    clock=clock_anchor(reading, stopped))
            stream.unlink()
            return await self._finish(stage, final, name, f"snapshots/{name}", cfg.image, key,
                                      source=machine.name, clock=clock, macs={
                                          "nat": cfg.nat_mac, "nics": [n.mac for n in cfg.nics]})

    async def ready(self, cfg: MachineConfig, accel: str, *, notify: Any = None) -> Snapshot:
        """The ready snapshot for this image and shape, built (once, under a lock) if it is
        missing, damaged or was made for anything else."""
        key = machine_key(self._pn, cfg, accel)
        slot = f"{cfg.image}-{cfg.cpus}c-{cfg.memory_mib}m-{key.nics}n"
        pointer = self._ready_dir / f"{slot}.json"
        say = notify or (lambda msg: log.warning("%s", msg))
        old = self._current(pointer)
        if old is not None and old.key == asdict(key):
            try:
                verify(old)
                return old
            except SnapshotError:
                pass
        with self._pn.store.lock("ready", slot, timeout=600):
            old = self._current(pointer)  # someone may have built it while we waited
            reason = "there is none yet"
            if old is not None:
                try:
                    if old.key == asdict(key):
                        verify(old)
                        return old
                    reason = "; ".join(key.changes(old.key))
                except SnapshotError as exc:
                    reason = str(exc)
            say(f"building the ready snapshot of image {cfg.image!r} ({key.shape}): {reason}")
            t0 = time.monotonic()
            snap = await self._build_ready(cfg, key, slot)
            write_json(pointer, {"ref": snap.ref})
            say(f"ready snapshot built in {time.monotonic() - t0:.1f} s")
            if old is not None and not self.users(old.ref):
                with contextlib.suppress(OSError):
                    self._trash(old.path)
            return snap

    def _current(self, pointer: Path) -> Snapshot | None:
        try:
            return self.by_ref(str(read_json(pointer)["ref"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError, NotFoundError, SnapshotError,
                ConfigError):
            return None

    async def _build_ready(self, cfg: MachineConfig, key: SnapshotKey, slot: str) -> Snapshot:
        ident = f"{slot}-{int(time.time() * 1000):x}"
        final = self._ready_dir / ident
        self._ready_dir.mkdir(parents=True, exist_ok=True)
        with self._pn.store.staging_dir("ready-") as stage:
            clock = await self._map(stage, cfg, key, final, from_stream=None)
            return await self._finish(stage, final, ident, f"cache/ready/{ident}", cfg.image, key,
                                      source="", clock=clock, macs=template_macs(cfg))

    async def _map(self, stage: Path, cfg: MachineConfig, key: SnapshotKey, final: Path,
                   *, from_stream: Path | None, clock: float | None = None) -> float | None:
        """Run a QEMU whose RAM is the shared file stage/memory: booted from the image
        (``from_stream`` None) or loaded from a stream; then save its device state.
        Returns the guest's CLOCK_MONOTONIC when it stopped (``clock`` for a stream,
        which is loaded without running)."""
        files = SnapshotFiles(stage)
        run = MachineFiles(stage / "run")
        run.dir.mkdir()
        image = self._pn.images.files_for(cfg.image_digest, cfg.image)
        if from_stream is None:
            from .machine import create_disk

            await asyncio.to_thread(create_disk, image.rootfs, run.disk)
        else:
            os.rename(files.disk, run.disk)
        spec = qcmd.LaunchSpec(
            name=cfg.name, files=run, kernel=image.kernel,
            initrd=image.initrd, cpus=cfg.cpus, memory_mib=cfg.memory_mib, accel=key.accel,
            cmdline=cfg.cmdline, tsc_khz=qhost.cached_tsc_khz(self._pn.store.cache_dir),
            memory_file=files.memory, memory_shared=True, incoming=from_stream is not None,
            **template_devices(cfg),
        )
        argv = qcmd.build_argv(qhost.qemu_binary(), spec)
        launched = await asyncio.to_thread(qproc.launch, argv, spec.files)
        if isinstance(launched, int):
            raise MachineError(cfg.name, f"QEMU would not start for the snapshot: "
                               f"{tail(run.qemu_log, 3).strip()}")
        try:
            if from_stream is None:
                agent = await AgentClient.connect(spec.files, timeout=TEMPLATE_BOOT_TIMEOUT,
                                                  alive=launched.alive)
                try:
                    await _warm(agent, cfg)
                    reading = await agent.monotonic()
                finally:
                    await agent.close()
            else:
                await load_state(run.qmp_sock, cfg.name, from_stream, ignore_shared=False,
                                 run=False)
            stopped = await save_state(run.qmp_sock, cfg.name, files.state, ignore_shared=True)
            if from_stream is None:
                clock = clock_anchor(reading, stopped)
        except (MigrationFailed, ConnectionError) as exc:
            raise SnapshotError(cfg.name, f"QEMU could not save it: {exc}; "
                                f"{tail(run.qemu_log, 3).strip()}") from None
        except AgentError as exc:
            raise SnapshotError(cfg.name, f"the guest could not be readied: {exc}; "
                                f"{tail(run.serial_log, 3).strip()}") from None
        finally:
            if not await quit_qemu(run.qmp_sock, cfg.name) or not await asyncio.to_thread(
                    qproc.wait_exit, launched, 5.0):
                await asyncio.to_thread(qproc.kill, launched, spec.files)
            await asyncio.to_thread(qproc.await_exit_status, spec.files)  # before run/ goes
        os.rename(run.disk, files.disk)
        shutil.rmtree(run.dir, ignore_errors=True)
        size = await asyncio.to_thread(_virtual_size, files.disk)
        await asyncio.to_thread(subprocess.run, [
            qhost.qemu_img(), "create", "-q", "-f", "qcow2", "-u", "-b", str(final / "disk.qcow2"),
            "-F", "qcow2", str(files.clone_disk), str(size)], check=True, capture_output=True)
        return clock

    async def _finish(self, stage: Path, final: Path, name: str, ref: str, image: str,
                      key: SnapshotKey, *, source: str, macs: dict[str, Any],
                      clock: float | None) -> Snapshot:
        files = SnapshotFiles(stage)

        def sums() -> dict[str, dict[str, Any]]:
            return {n: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                    for n, p in files.checked().items()}

        listed = await asyncio.to_thread(sums)
        for p in (files.state, files.disk, files.clone_disk):
            os.chmod(p, 0o444)  # clones depend on these bytes never changing
        # (memory stays writable by its owner: QEMU opens it read-write even to map it private)
        write_json(files.meta, {"image": image, "key": asdict(key), "source": source,
                                "created": time.time(), "files": listed, "macs": macs,
                                "clock": clock})
        try:
            os.rename(stage, final)
        except OSError:
            if final.exists():
                raise AlreadyExistsError("snapshot", name) from None
            raise
        return _read(final, name, ref)


async def _warm(agent: AgentClient, cfg: MachineConfig) -> None:
    """Walk the template through what every clone does first (the identity and network
    requests and an exec), so the modules, binaries and files that takes are already
    loaded in the RAM that clones map; then flush the disk that the snapshot freezes.

    The NAT NIC gets the address every clone's has (NAT_GUEST), without the default
    route (the template's netdev is restricted): a clone only changes the MAC, and adds
    the route if it has a way out."""
    macs = template_macs(cfg)
    await asyncio.gather(
        agent.refresh_identity(cfg.name),
        *([agent.request("set_network", mac=macs["nat"], addresses=[NAT_GUEST], up=True)]
          if macs["nat"] else []),
        *(agent.request("set_network", mac=mac, addresses=[], up=False) for mac in macs["nics"]))
    (await agent.exec(["true"])).check()
    (await agent.exec(["sync"])).check()


def template_devices(cfg: MachineConfig) -> dict[str, Any]:
    """The NICs of a template: the machine's shape, with template MACs and no way out."""
    nat = qcmd.NatNic(qcmd.template_mac(-1), restrict=True) if cfg.net != "none" else None
    return {"nat": nat, "nics": tuple(qcmd.template_mac(i) for i in range(len(cfg.nics)))}


def template_macs(cfg: MachineConfig) -> dict[str, Any]:
    """What resume.json records as the MACs a restored machine's NICs come back with;
    ``template``: the guest's NICs are as _warm left them."""
    return {"nat": qcmd.template_mac(-1) if cfg.net != "none" else "",
            "nics": [qcmd.template_mac(i) for i in range(len(cfg.nics))], "template": True}


def _virtual_size(disk: Path) -> int:
    import json

    out = subprocess.run([qhost.qemu_img(), "info", "--output=json", "-U", str(disk)],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["virtual-size"])


__all__ = ["AsyncSnapshots", "Snapshot", "SnapshotKey", "verify"]
