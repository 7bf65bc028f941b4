"""Snapshots: a machine's saved RAM, device state and disk, and the ready-snapshot cache.

What a snapshot is and how it is checked lives in :mod:`.key`; this module makes
and removes them. Clones map ``memory`` with ``share=off``: unchanged pages stay
shared between them, and restore time does not grow with RAM size. A snapshot is
only made in the "mapped" form: a machine whose RAM was not in a file is first
saved as one stream (RAM inside) and loaded into a paused VMM whose RAM *is* a
shared file, which is then saved again; one path for every source.

The ready-snapshot cache (``ready()``) keeps one snapshot per image and machine shape,
made by booting the image once; its key (image digest, shape, QEMU version,
accelerator, CPU model, SNAPSHOT_FORMAT) is checked before every use and a change
rebuilds it, with a notice naming what changed.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from ..agent.client import AgentClient, clock_anchor
from ..backends.base import Backend, LaunchSpec, NatNic
from ..config import NAT_GUEST, MachineConfig
from ..errors import (
    AgentError,
    AlreadyExistsError,
    LaunchError,
    MachineError,
    NotFoundError,
    PinnaceError,
    SnapshotError,
    StoreError,
    store_error,
)
from ..images import Images
from ..store import SnapshotFiles, Store, read_json, tail, validate_name, write_json
from .key import (
    SNAPSHOT_FORMAT,
    Capture,
    Snapshot,
    SnapshotKey,
    SnapshotLookup,
    machine_key,
    sha256_file,
    snapshot_lock,
    template_mac,
    template_macs,
    verify,
)

log = logging.getLogger(__name__)

TEMPLATE_BOOT_TIMEOUT = 120.0
FULL_HINT = "free some space (pinnace gc, or delete machines, images or snapshots) and try again"
# A ready slot: image digest, CPUs, memory, accelerator, a digest of the device list.
SLOT_RE = re.compile(r"[0-9a-f]{1,12}-\d+c-\d+m-[a-z]+-[0-9a-f]{8}")
READY_LOCK_TIMEOUT = 600.0
# What a ready template holds beyond any snapshot (SNAPSHOT_FORMAT): bump it when that
# changes, and ready snapshots are rebuilt while saved machines and named snapshots stay
# loadable. 1: spare volume and shared-folder slots (machines with them restore).
READY_LAYOUT = 1


class Source(Protocol):
    """What a snapshot is made from: a machine (pinnace.machine.AsyncMachine)."""

    name: str

    @property
    def config(self) -> MachineConfig: ...

    async def capture(self, stream: Path, disk: Path) -> Capture: ...


class AsyncSnapshots:
    """The snapshots in a store, and the ready-snapshot cache."""

    def __init__(self, store: Store, backend: Backend, images: Images,
                 lookup: SnapshotLookup) -> None:
        self.store = store
        self.backend = backend
        self.images = images
        self.lookup = lookup
        # Called with a ready snapshot that a rebuilt one has replaced, before it is
        # removed (the warm pool drains its clones; set by the client's wiring).
        self.on_replaced: Callable[[Snapshot], Awaitable[Any]] | None = None

    # -- lookup --------------------------------------------------------------------------

    def get(self, name: str) -> Snapshot:
        return self.lookup.get(name)

    def by_ref(self, ref: str) -> Snapshot:
        return self.lookup.by_ref(ref)

    def list(self) -> list[Snapshot]:
        return self.lookup.list()

    def users(self, ref: str) -> tuple[str, ...]:
        return self.lookup.users(ref)

    async def remove(self, name: str) -> None:
        """Remove snapshot ``name``; refused while machines are made from it."""
        validate_name("snapshot", name)
        async with self.store.alocked(("snapshot", name), timeout=30):
            files = self.store.snapshot_files(name)
            if not files.dir.is_dir():
                raise NotFoundError("snapshot", name, "see 'pinnace snapshot ls'")
            users = self.users(self.store.snapshot_ref(files))
            if users:
                raise SnapshotError(name, f"machine(s) {', '.join(users)} are made from it; "
                                    "delete them first")
            await asyncio.to_thread(self.store.remove_tree, files.dir)

    # -- making them ---------------------------------------------------------------------

    async def create(self, machine: Source, name: str) -> Snapshot:
        """Save a running machine as snapshot ``name``; the machine keeps running. Its
        image is held (shared) meanwhile, so that it cannot be removed from under it."""
        validate_name("snapshot", name)
        final = self.store.snapshot_files(name)
        if final.dir.exists():
            raise AlreadyExistsError("snapshot", name)
        cfg = machine.config
        if cfg.volumes or cfg.shares:
            raise SnapshotError(name, f"machine {machine.name!r} has volumes or shared "
                                "folders, whose contents live outside it and cannot be saved "
                                "with it; snapshot a machine without them")
        with self.store.staging_dir("snapshot-") as stage:
            staged = SnapshotFiles(stage)
            async with self.store.alocked(shared=(("image", cfg.image_digest),)):
                return await self._create(machine, name, cfg, staged, final)

    async def _create(self, machine: Source, name: str, cfg: MachineConfig,
                      staged: SnapshotFiles, final: SnapshotFiles) -> Snapshot:
        stage = staged.dir
        try:
            captured = await machine.capture(staged.stream, staged.disk)
            clock = await self._map(staged, captured.config, captured.key, final,
                                    from_stream=True, clock=captured.clock)
        except (MachineError, SnapshotError) as exc:
            if self.store.out_of_space(stage):  # QEMU only saw its pipe break
                raise StoreError(str(stage), "no space left on the filesystem while "
                                 f"saving the snapshot ({exc})", FULL_HINT) from None
            raise
        staged.stream.unlink()
        return await self._finish(staged, final, name, captured.config,
                                  captured.key, source=machine.name, clock=clock, macs={
                                      "nat": cfg.nat_mac, "nics": [n.mac for n in cfg.nics]})

    async def ready(self, cfg: MachineConfig, accel: str, *,
                    notify: Callable[[str], Any] | None = None,
                    timeout: float | None = None) -> Snapshot:
        """The ready snapshot for this image and shape, built (once, under a lock) if it is
        missing, damaged or was made for anything else; ``timeout``: for the template's
        boot (TEMPLATE_BOOT_TIMEOUT by default)."""
        key = machine_key(self.backend, cfg, accel)
        slot = self.ready_slot(cfg, accel)
        pointer = self.store.ready_pointer(slot)
        say = notify or (lambda msg: log.warning("%s", msg))
        old = self._current(pointer)
        if old is not None and old.key == asdict(key) and _layout(pointer) == READY_LAYOUT:
            try:
                verify(old)
                return old
            except SnapshotError:
                pass
        async with self.store.alocked(("ready", slot), shared=(("image", cfg.image_digest),),
                                      timeout=READY_LOCK_TIMEOUT):
            old = self._current(pointer)  # someone may have built it while we waited
            reason = "there is none yet"
            if old is not None:
                try:
                    if old.key == asdict(key) and _layout(pointer) == READY_LAYOUT:
                        verify(old)
                        return old
                    reason = "; ".join(key.changes(old.key)) or (
                        "templates are laid out anew (spare volume and share slots)")
                except SnapshotError as exc:
                    reason = str(exc)
            say(f"building the ready snapshot of image {cfg.image!r} ({key.shape}): {reason}")
            t0 = time.monotonic()
            snap = await self._build_ready(cfg, key, slot, timeout or TEMPLATE_BOOT_TIMEOUT)
            write_json(pointer, {"ref": snap.ref, "layout": READY_LAYOUT})
            say(f"ready snapshot built in {time.monotonic() - t0:.1f} s")
            if old is not None:
                if self.on_replaced is not None:
                    await self.on_replaced(old)  # the warm pool drains its clones of it
                await self._remove_unused(old)
            return snap

    def ready_slot(self, cfg: MachineConfig, accel: str) -> str:
        """The ready-snapshot slot of a machine of this config: one per image, shape,
        accelerator and device list, each its own snapshot (what differs between two
        slots would only rebuild one over the other)."""
        key = machine_key(self.backend, cfg, accel)
        devices = hashlib.sha256(key.devices.encode()).hexdigest()[:8]
        slot = f"{cfg.image_digest[:12]}-{cfg.cpus}c-{cfg.memory_mib}m-{accel}-{devices}"
        assert SLOT_RE.fullmatch(slot), slot
        return slot

    def current_ready(self, slot: str) -> str | None:
        """The reference of the ready snapshot that serves ``slot`` now, if any."""
        try:
            ref = read_json(self.store.ready_pointer(slot))["ref"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return ref if isinstance(ref, str) else None

    async def _remove_unused(self, snap: Snapshot) -> bool:
        """Remove a ready snapshot no machine uses (under its lock, which machines being
        made from it hold shared); True if removed."""
        lock = self.store.try_locked(*snap.lock)
        if lock is None:
            return False  # machines are being made from it right now
        try:
            if self.users(snap.ref):
                return False
            await asyncio.to_thread(self.store.remove_tree, snap.path)
            return True
        finally:
            lock.release()

    def _current(self, pointer: Path) -> Snapshot | None:
        try:
            return self.by_ref(str(read_json(pointer)["ref"]))
        except (OSError, ValueError, KeyError, TypeError, PinnaceError):
            return None

    async def collect_unused(self, *, dry_run: bool) -> builtins.list[Path]:
        """Remove ready snapshots no pointer names and no machine uses (left by a crash,
        or by a rebuild while machines were being made from the old one); return them.
        What is being built or used now (its slot's or its own lock held) is skipped."""
        d = self.store.ready_dir
        if not d.is_dir():
            return []
        out = []
        for pointer in sorted(d.glob("*.json")):  # of slots named as no pinnace names them now
            if not SLOT_RE.fullmatch(pointer.stem):
                out.append(pointer)
                if not dry_run:
                    pointer.unlink(missing_ok=True)
        for entry in sorted(d.iterdir()):
            if not entry.is_dir():
                continue
            slot = entry.name.rsplit("-", 1)[0]
            building = self.store.try_locked("ready", slot)
            if building is None:
                continue
            try:
                named = {str(read_json(p)["ref"]) for p in d.glob("*.json")
                         if _readable_pointer(p)}
                ref = self.lookup.ref_of(SnapshotFiles(entry))
                if ref in named:
                    continue
                try:
                    snap = self.by_ref(ref)
                except PinnaceError:  # damaged: removed too, unless machines depend on it
                    lock = self.store.try_locked(*snapshot_lock(ref))
                    if lock is None:
                        continue
                    try:
                        if not self.users(ref):
                            out.append(entry)
                            if not dry_run:
                                await asyncio.to_thread(self.store.remove_tree, entry)
                    finally:
                        lock.release()
                    continue
                if dry_run:
                    if not self.users(ref):
                        out.append(entry)
                elif await self._remove_unused(snap):
                    out.append(entry)
            finally:
                building.release()
        return out

    async def _build_ready(self, cfg: MachineConfig, key: SnapshotKey, slot: str,
                           boot_timeout: float) -> Snapshot:
        ident = f"{slot}-{int(time.time() * 1000):x}"
        final = self.store.ready_files(ident)
        try:
            self.store.ready_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(exc, "making the ready-snapshot folder") from None
        with self.store.staging_dir("ready-") as stage:
            staged = SnapshotFiles(stage)
            clock = await self._map(staged, cfg, key, final, from_stream=False,
                                    boot_timeout=boot_timeout)
            return await self._finish(staged, final, ident, cfg, key, source="", clock=clock,
                                      macs=template_macs(cfg))

    async def _map(self, files: SnapshotFiles, cfg: MachineConfig, key: SnapshotKey,
                   final: SnapshotFiles, *, from_stream: bool,
                   clock: float | None = None,
                   boot_timeout: float = TEMPLATE_BOOT_TIMEOUT) -> float | None:
        """Run a VMM whose RAM is the shared file ``files.memory``: booted from the image,
        or loaded from ``files.stream`` (``from_stream``); then save its device state.
        Returns the guest's CLOCK_MONOTONIC when it stopped (``clock`` for a stream,
        which is loaded without running)."""
        backend = self.backend
        self.store.check_staging_sockets()
        run = files.run
        try:
            run.dir.mkdir()
        except OSError as exc:
            raise store_error(exc, "staging a snapshot") from None
        image = self.images.files_for(cfg.image_digest, cfg.image)
        boot = self.images.boot(cfg.image_digest, cfg.image)
        if from_stream:
            os.rename(files.disk, run.disk)
        else:
            await backend.create_disk(image.rootfs, run.disk)
        devices = template_devices(cfg, files)
        try:
            for path, _ in devices["volumes"]:
                path.touch()
            for path, _ in devices["shares"]:
                path.mkdir()
        except OSError as exc:
            raise store_error(exc, "staging a snapshot") from None
        spec = LaunchSpec(
            name=cfg.name, files=run, **boot.launch_fields(), cpus=cfg.cpus,
            memory_mib=cfg.memory_mib, accel=key.accel, cmdline=cfg.cmdline,
            memory_file=files.memory, memory_shared=True, incoming=from_stream, **devices,
        )
        launched = await backend.launch(spec)
        if isinstance(launched, int):
            raise LaunchError(cfg.name, f"QEMU would not start for the snapshot: "
                              f"{tail(run.qemu_log, 3).strip()}", command=(),
                              exit_code=launched)
        try:
            if not from_stream:
                agent = await AgentClient.connect(run, timeout=boot_timeout,
                                                  alive=lambda: backend.alive(launched))
                try:
                    await _warm(agent, cfg)
                    reading = await agent.monotonic()
                finally:
                    await agent.close()
            else:
                await backend.load(run, files.stream, ignore_shared=False, run=False)
            stopped = await backend.save(run, files.state, ignore_shared=True)
            if not from_stream:
                clock = clock_anchor(reading, stopped)
        except MachineError as exc:
            raise SnapshotError(cfg.name, f"QEMU could not save it: {exc.message}; "
                                f"{tail(run.qemu_log, 3).strip()}") from None
        except AgentError as exc:
            raise SnapshotError(cfg.name, f"the guest could not be readied: {exc}; "
                                f"{tail(run.serial_log, 3).strip()}") from None
        finally:
            if not await backend.quit(run, 5.0) or not await backend.wait_exit(launched, 5.0):
                await backend.kill(launched, run)
            await backend.await_exit_status(run)  # before run/ goes
        os.rename(run.disk, files.disk)
        await asyncio.to_thread(self.store.remove_tree, run.dir)
        size = await backend.disk_size(files.disk)
        await backend.create_disk(final.disk, files.clone_disk, base_format="qcow2", size=size)
        return clock

    async def _finish(self, files: SnapshotFiles, final: SnapshotFiles, name: str,
                      cfg: MachineConfig, key: SnapshotKey, *, source: str,
                      macs: dict[str, Any], clock: float | None) -> Snapshot:
        def sums() -> dict[str, dict[str, Any]]:
            return {n: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                    for n, p in files.checked().items()}

        listed = await asyncio.to_thread(sums)
        for p in (files.state, files.disk, files.clone_disk):
            os.chmod(p, 0o444)  # clones depend on these bytes never changing
        # (memory stays writable by its owner: QEMU opens it read-write even to map it private)
        write_json(files.meta, {"image": cfg.image, "key": asdict(key), "source": source,
                                "created": time.time(), "files": listed, "macs": macs,
                                "clock": clock})
        try:
            self.store.put_in_place(files.dir, final.dir, "the snapshot")
        except FileExistsError:
            raise AlreadyExistsError("snapshot", name) from None
        return self.by_ref(self.store.snapshot_ref(final))


async def _warm(agent: AgentClient, cfg: MachineConfig) -> None:
    """Walk the template through what every clone does first (the identity and network
    requests, an exec, the 9p modules its shares need; under systemd, the end of its
    boot), so the modules, binaries and files that takes are already loaded in the RAM
    that clones map; then flush the disk that the snapshot freezes. Its volumes and shares are not mounted: a mounted 9p
    share blocks saving, and a clone's volume is another disk than the template's.

    The NAT NIC gets the address every clone's has (NAT_GUEST), without the default
    route (the template's netdev is restricted): a clone only changes the MAC, and adds
    the route if it has a way out."""
    macs = template_macs(cfg)
    await asyncio.gather(
        agent.refresh_identity(cfg.name),
        *([agent.request("set_network", mac=macs["nat"], addresses=[NAT_GUEST], up=True)]
          if macs["nat"] else []),
        *(agent.request("set_network", mac=mac, addresses=[], up=False) for mac in macs["nics"]))
    if agent.welcome.get("pid") != 1:
        # The image's init is systemd, and the agent, one of its first services, answers
        # long before its boot is done: let it finish once here, not in every clone.
        # (Its answer, running or degraded, is the guest's business.)
        await agent.exec(["systemctl", "is-system-running", "--wait"],
                         timeout=TEMPLATE_BOOT_TIMEOUT)
    (await agent.exec(["true"])).check()
    if cfg.shares:  # so that a clone's first 9p mount need not run modprobe (if this
        # fails, the clone's mount runs it and says what went wrong)
        await agent.exec(["modprobe", "-q", "-a", "9pnet_virtio", "9p"])
    (await agent.exec(["sync"])).check()


def _layout(pointer: Path) -> int:
    """The template layout a ready pointer's snapshot was built with (0: before there
    was one)."""
    try:
        layout = read_json(pointer).get("layout", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return layout if isinstance(layout, int) else 0


def _readable_pointer(path: Path) -> bool:
    try:
        return isinstance(read_json(path)["ref"], str)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def template_devices(cfg: MachineConfig, files: SnapshotFiles) -> dict[str, Any]:
    """The devices of a template (the LaunchSpec's fields): the machine's shape, in the
    same order, with template MACs and no way out, and a placeholder in every volume and
    shared-folder slot (see SnapshotFiles.spare_volume), which its guest never mounts:
    a clone, launched with its own volumes and shares in those slots, mounts them after
    the restore (a volume's disk probed again: the guest saw an empty one).

    A spare disk is writable: a disk's read-only flag is a feature the guest took at its
    boot, and a saved state does not load into a device that lacks a feature the guest
    took, so a clone may make a slot read-only but not the other way round. Its guest
    never writes to it (it is empty and never mounted)."""
    nat = NatNic(template_mac(-1), restrict=True) if cfg.net != "none" else None
    return {"nat": nat, "nics": tuple(template_mac(i) for i in range(len(cfg.nics))),
            "volumes": tuple((files.spare_volume(i), False) for i in range(len(cfg.volumes))),
            "shares": tuple((files.spare_share(i), True) for i in range(len(cfg.shares)))}


__all__ = ["SNAPSHOT_FORMAT", "AsyncSnapshots", "Snapshot", "SnapshotKey", "Source", "verify"]
