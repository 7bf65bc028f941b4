"""What a snapshot is: its key, its description, and the checks made before loading it.

A snapshot directory holds (see :class:`pinnace.store.SnapshotFiles`)::

    memory         guest RAM, raw; mapped copy-on-write by every clone (never changes)
    state          QEMU's device state (a migration stream without the RAM)
    disk.qcow2     the disk as it was, an overlay on the image's root filesystem
    clone.qcow2    an empty overlay on disk.qcow2: each clone starts with a copy of it
    snapshot.json  what it was made from (its key), and the size and sha256 of each file

A saved state loads only where everything it depends on is the same: the key
(image digest, shape, devices, VMM version, accelerator, CPU model, format).
This module only reads; making snapshots is :mod:`pinnace.snapshots`.
"""

from __future__ import annotations

import builtins
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..agent.client import anchor_from
from ..backends.base import Backend
from ..config import MachineConfig
from ..errors import ConfigError, NotFoundError, SnapshotError, StoreError
from ..store import SnapshotFiles, Store, read_record, validate_name

# Bump when what a snapshot holds or how it is loaded changes: old ones are rebuilt.
# 3: NICs in the device list; MACs in snapshot.json. 4: ready templates have the NAT address.
# (What only ready templates hold is versioned apart, READY_LAYOUT in pinnace.snapshots:
# bumping this one would make every saved machine and named snapshot unloadable.)
SNAPSHOT_FORMAT = 4
# Files smaller than this are checksummed before every restore; larger ones by size only
# (and fully by `pinnace snapshot inspect --verify`).
QUICK_SUM_LIMIT = 8 << 20


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
class Capture:
    """A running machine's state saved for a snapshot: the config and key it was saved
    under, and the guest's CLOCK_MONOTONIC at the moment it stopped."""

    config: MachineConfig
    key: SnapshotKey
    clock: float | None


def machine_key(backend: Backend, cfg: MachineConfig, accel: str) -> SnapshotKey:
    """The key of a machine of this config running under ``accel`` on this host."""
    ident = backend.identity(accel)
    return SnapshotKey(
        image_digest=cfg.image_digest, cpus=cfg.cpus, memory_mib=cfg.memory_mib,
        devices=backend.devices_key(cfg.net != "none", len(cfg.nics), len(cfg.volumes),
                                    len(cfg.shares)),
        nics=int(cfg.net != "none") + len(cfg.nics), qemu=ident["qemu"], accel=accel,
        cpu_model=ident["cpu_model"], format=SNAPSHOT_FORMAT,
    )


def template_mac(nic: int) -> str:
    """The MAC of NIC ``nic`` (-1: the NAT NIC) in a ready-snapshot template; each clone
    replaces it with its own after restore."""
    return f"02:70:6e:00:00:{nic + 1:02x}"


def template_macs(cfg: MachineConfig) -> dict[str, Any]:
    """What resume.json records as the MACs a restored machine's NICs come back with;
    ``template``: the guest's NICs are as the template's warm-up left them."""
    return {"nat": template_mac(-1) if cfg.net != "none" else "",
            "nics": [template_mac(i) for i in range(len(cfg.nics))], "template": True}


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

    @property
    def paths(self) -> SnapshotFiles:
        return SnapshotFiles(self.path)

    @property
    def ready(self) -> bool:
        """A ready snapshot (in the cache, made by ``run``), not a named one."""
        return ready_ref(self.ref)

    @property
    def lock(self) -> tuple[str, str]:
        """The (kind, name) of its lock: users hold it shared, removal exclusively."""
        return snapshot_lock(self.ref)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def snapshot_lock(ref: str) -> tuple[str, str]:
    """The (kind, name) of the lock of the snapshot at ``ref``, from the reference alone
    (no file is read): a ready snapshot's name is prefixed, so it never meets a named one."""
    ident = ref.rsplit("/", 1)[-1]
    return ("snapshot", f"ready.{ident}" if ready_ref(ref) else ident)


def ready_ref(ref: str) -> bool:
    """The reference names a ready snapshot (in the cache), not a named one."""
    return ref.startswith("cache/")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(snap: Snapshot, *, full: bool = False) -> None:
    """Raise SnapshotError if a file is missing, of the wrong size or (small files, or all
    with ``full``) of the wrong checksum."""
    for fname, path in snap.paths.checked().items():
        want = snap.files.get(fname)
        if not isinstance(want, dict):
            raise SnapshotError(snap.name, f"snapshot.json does not list {fname}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SnapshotError(snap.name, f"{fname} is missing") from None
        if size != want.get("size"):
            raise SnapshotError(snap.name, f"{fname} is {size} bytes, snapshot.json says "
                                f"{want.get('size')} (truncated or changed)")
        if (full or size <= QUICK_SUM_LIMIT) and sha256_file(path) != want.get("sha256"):
            raise SnapshotError(snap.name, f"{fname} does not match its checksum")


def read_snapshot(files: SnapshotFiles, name: str, ref: str, fix: str) -> Snapshot:
    """The snapshot in ``files.dir``; NotFoundError if there is none, SnapshotError
    naming snapshot.json and ``fix`` if it is damaged."""
    try:
        meta = read_record(files.meta, fix)
        return Snapshot(name=name, path=files.dir, ref=ref, image=str(meta["image"]),
                        key=dict(meta["key"]), source=str(meta.get("source", "")),
                        created=float(meta["created"]), files=dict(meta["files"]),
                        macs=dict(meta.get("macs") or {"nat": "", "nics": []}),
                        clock=anchor_from(meta.get("clock")))
    except FileNotFoundError:
        raise NotFoundError("snapshot", name, "see 'pinnace snapshot ls'") from None
    except StoreError as exc:
        raise SnapshotError(name, str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(name, f"{files.meta} is damaged ({exc}); {fix}") from None


class SnapshotLookup:
    """Finding snapshots in a store: by name, or by the reference a machine keeps."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, name: str) -> Snapshot:
        validate_name("snapshot", name)
        files = self.store.snapshot_files(name)
        return read_snapshot(files, name, self.store.snapshot_ref(files),
                             f"remove it with 'pinnace snapshot rm {name}'")

    def by_ref(self, ref: str) -> Snapshot:
        """The snapshot a machine config points at (named, or a ready one in the cache)."""
        found = self.store.snapshot_at(ref)
        if found is None:
            raise ConfigError("snapshot reference", ref, "the machine's config.json is damaged")
        files, ready = found
        if ready:
            return read_snapshot(files, f"ready snapshot {files.dir.name}", ref,
                                 "it is rebuilt by the next 'pinnace run'")
        return self.get(files.dir.name)

    def ref_of(self, files: SnapshotFiles) -> str:
        """The reference machine configs use for the snapshot in ``files.dir``."""
        return self.store.snapshot_ref(files)

    def list(self) -> builtins.list[Snapshot]:
        out = []
        d = self.store.snapshots_dir
        if d.is_dir():
            for entry in sorted(d.iterdir()):
                try:
                    out.append(self.get(entry.name))
                except (NotFoundError, SnapshotError, ConfigError):
                    continue
        return out

    def users(self, ref: str) -> tuple[str, ...]:
        """Machines whose disk or RAM depends on the snapshot at ``ref``."""
        return tuple(name for name, cfg in self.store.machine_configs()
                     if cfg.get("snapshot") == ref)


__all__ = ["SNAPSHOT_FORMAT", "Capture", "Snapshot", "SnapshotKey", "SnapshotLookup", "machine_key",
           "read_snapshot", "ready_ref", "sha256_file", "snapshot_lock", "template_mac", "template_macs", "verify"]
