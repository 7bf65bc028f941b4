"""Volumes: data that outlives a machine.

A volume is a sparse file formatted ext4, made once and attached to machines::

    $PINNACE_HOME/volumes/<name>/
      volume.ext4    the filesystem; sparse, so it holds only the blocks written to it
      volume.json    {"name", "size" (bytes), "journal", "created" (epoch), "label"}

A volume is built whole in a staging directory and renamed into place, so a volume
either exists complete or not at all. It cannot be removed while a machine's
config.json lists it under ``"volumes"``.

Errors raised here (in :mod:`pinnace.errors`): VolumeError (a volume is damaged or
could not be made) and VolumeInUse (machines have it attached).
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import parse_size
from .errors import (
    AlreadyExistsError,
    ConfigError,
    HostError,
    NotFoundError,
    StoreError,
    VolumeError,
    VolumeInUse,
    store_error,
)
from .store import (
    NAME_RE,
    Store,
    VolumeFiles,
    drop_owner,
    owner_of,
    read_record,
    this_process,
    validate_name,
    write_atomic,
    write_json,
)

log = logging.getLogger(__name__)

MIN_SIZE = 16 << 20  # below this ext4's journal and metadata leave next to no room
MAX_SIZE = 16 << 40
BLOCK_SIZE = 4096  # sizes round up to whole ext4 blocks
LABEL_MAX = 16  # bytes in an ext4 volume label
MKFS_TIMEOUT = 600.0
MKFS = "mkfs.ext4"
# Debian keeps mkfs.ext4 in sbin, which is not on an ordinary user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Volume:
    """A volume in the store, as its volume.json describes it."""

    name: str
    path: Path  # its directory
    image: Path  # the ext4 file a machine attaches
    size: int  # bytes, as the guest sees the disk
    journal: bool
    created: float
    label: str  # the ext4 label: the name, cut to 16 bytes
    labels: dict[str, str] = field(default_factory=dict)  # what its maker noted on it

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return {"name": self.name, "path": str(self.path), "image": str(self.image),
                "size": self.size, "journal": self.journal, "created": self.created,
                "label": self.label, "labels": dict(self.labels)}


def volume_size(value: str | int) -> int:
    """Parse and check a volume size ('10G', '512M', or a bare number of MiB) into bytes,
    rounded up to whole 4 KiB blocks."""
    size = parse_size(value, "volume size")
    if size < MIN_SIZE:
        raise ConfigError("volume size", value, "a volume must be at least 16M, so that ext4 "
                          "has room for its metadata and journal")
    size = -(-size // BLOCK_SIZE) * BLOCK_SIZE
    if size > MAX_SIZE:
        raise ConfigError("volume size", value, "a volume can be at most 16T")
    return size


def mkfs_binary() -> str:
    """The path of mkfs.ext4 (looked up on PATH, then in the sbin directories)."""
    found = shutil.which(MKFS)
    if found:
        return found
    for d in _SBIN_DIRS:
        path = os.path.join(d, MKFS)
        if os.access(path, os.X_OK):
            return path
    raise HostError(f"{MKFS} was not found (volumes are formatted with it)",
                    "install it with: apt-get install e2fsprogs")


def _damaged(name: str, path: Path, problem: str) -> VolumeError:
    return VolumeError(name, f"{path} {problem}; repair it, or remove the volume with "
                       f"'pinnace volume rm {name}'")


def _read(files: VolumeFiles, name: str) -> Volume:
    try:
        meta = read_record(files.meta, "")
    except FileNotFoundError:
        if not files.dir.is_dir():
            raise NotFoundError("volume", name, "see 'pinnace volume ls'") from None
        raise _damaged(name, files.meta, "is missing") from None
    except StoreError as exc:
        raise _damaged(name, files.meta, exc.problem) from None
    size, journal, created = meta.get("size"), meta.get("journal"), meta.get("created")
    label = meta.get("label", name[:LABEL_MAX])
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise _damaged(name, files.meta, f"has a bad size {size!r}")
    if not isinstance(journal, bool):
        raise _damaged(name, files.meta, f"has a bad journal flag {journal!r}")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise _damaged(name, files.meta, f"has a bad creation time {created!r}")
    if not isinstance(label, str):
        raise _damaged(name, files.meta, f"has a bad label {label!r}")
    labels = meta.get("labels", {})
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _damaged(name, files.meta, f"has bad labels {labels!r}")
    try:
        actual = files.image.stat().st_size
    except FileNotFoundError:
        raise _damaged(name, files.image, "is missing") from None
    except OSError as exc:
        raise _damaged(name, files.image, f"cannot be read ({exc.strerror})") from None
    if actual != size:
        raise _damaged(name, files.image, f"is {actual} bytes, but volume.json says {size}")
    return Volume(name=name, path=files.dir, image=files.image, size=size, journal=journal,
                  created=float(created), label=label, labels=labels)


def _make_sparse(path: Path, size: int, asked: str | int) -> None:
    """Create ``path`` (it must not exist) as a sparse file of ``size`` bytes."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ConfigError("volume size", asked, f"the filesystem holding {path.parent} "
                              "cannot hold a file this large; choose a smaller size") from exc
        raise store_error(exc, "making the volume's file") from None
    finally:
        os.close(fd)


def _mkfs(mkfs: str, image: Path, *, name: str, label: str, journal: bool) -> None:
    """Format ``image`` ext4 in place."""
    argv = [mkfs, "-q", "-F", "-b", str(BLOCK_SIZE), "-L", label]
    if not journal:
        argv += ["-O", "^has_journal"]
    # The file is new and sparse, so its unwritten blocks already read as zeros: letting
    # mkfs skip zeroing the journal (lazy_journal_init) keeps a journalled volume sparse too
    # (an 8T volume allocates ~110M instead of ~1.1G). -b 4096: the same block size
    # whatever the host's mke2fs.conf says for small filesystems.
    argv += ["-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", "-m", "0", str(image)]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=MKFS_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise VolumeError(name, f"{MKFS} did not finish within {MKFS_TIMEOUT:g} s; "
                          "is the filesystem under PINNACE_HOME very slow?") from None
    except OSError as exc:
        raise HostError(f"cannot run {mkfs}: {exc.strerror}",
                        "install it with: apt-get install e2fsprogs") from exc
    if r.returncode != 0:
        detail = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()
        raise VolumeError(name, f"{MKFS} failed with exit code {r.returncode}: "
                          + " / ".join(detail[-5:]))


def _copy_sparse(src: Path, dst: Path, name: str) -> None:
    """Copy a volume's file, keeping its holes (so a copy takes what the data takes)."""
    try:
        r = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=MKFS_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VolumeError(name, f"copying {src} failed: {exc}") from None
    if r.returncode != 0:
        raise VolumeError(name, f"copying {src} failed: {r.stderr.strip()[-300:]}")


class AsyncVolumes:
    """The volumes in a store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def dir(self) -> Path:
        """The directory that holds one directory per volume."""
        return self.store.volumes_dir

    def files(self, name: str) -> VolumeFiles:
        """The files of volume ``name`` (which need not exist)."""
        return self.store.volume_files(validate_name("volume", name))

    # -- lookup --------------------------------------------------------------------------

    def get(self, name: str) -> Volume:
        """The volume ``name``; NotFoundError if there is none, VolumeError if it is damaged."""
        return _read(self.files(name), name)

    def list(self) -> builtins.list[Volume]:
        """Every readable volume, by name; damaged ones are skipped with a notice."""
        out: builtins.list[Volume] = []
        if not self.dir.is_dir():
            return out
        for entry in sorted(self.dir.iterdir()):
            if not NAME_RE.match(entry.name) or not entry.is_dir():
                continue
            try:
                out.append(self.get(entry.name))
            except (NotFoundError, VolumeError) as exc:  # removed meanwhile, or damaged
                log.warning("skipping %s", exc)
        return out

    def users(self, name: str) -> tuple[str, ...]:
        """Machines whose config.json attaches volume ``name``; unreadable configs are skipped."""
        users: builtins.list[str] = []
        for machine, cfg in self.store.machine_configs():
            attached = cfg.get("volumes")
            if isinstance(attached, builtins.list) and any(
                    isinstance(v, dict) and v.get("source") == name for v in attached):
                users.append(machine)
        return tuple(users)

    def usage(self, vol: Volume) -> int:
        """Bytes the volume's file actually takes on the host (0 if it has gone)."""
        try:
            return vol.image.stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    # -- changes -------------------------------------------------------------------------

    async def create(self, name: str, size: str | int, *, journal: bool = True,
                     ephemeral: bool = False, labels: Mapping[str, str] | None = None,
                     source: str | None = None) -> Volume:
        """Make volume ``name``: a sparse file of ``size`` ('10G'; a bare number is MiB)
        formatted ext4, with or without a journal; or, with ``source``, a copy of that
        volume (its size and contents; ``size`` and ``journal`` are then its). An existing
        volume is never touched. ``ephemeral``: it belongs to this process (a test
        session), and ``gc`` removes it once the process is gone (see
        :class:`pinnace.store.Owned`). ``labels``: notes kept with it (``Volume.labels``)."""
        files = self.files(name)
        if source is not None:
            src = self.get(source)
            size = nbytes = src.size
            journal = src.journal
        else:
            nbytes = volume_size(size)
        if files.dir.exists():
            raise AlreadyExistsError("volume", name)
        mkfs = mkfs_binary()
        return await asyncio.to_thread(self._create, name, size, nbytes, journal, mkfs,
                                       ephemeral, dict(labels or {}), source)

    def keep(self, name: str) -> None:
        """Make a volume made ``ephemeral`` an ordinary one, which ``gc`` leaves alone."""
        drop_owner(self.files(name))

    def _create(self, name: str, asked: str | int, size: int, journal: bool, mkfs: str,
                ephemeral: bool, labels: dict[str, str], source: str | None) -> Volume:
        store = self.store
        final = self.files(name)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_error(exc, "making the volumes folder") from None
        with store.staging_dir("volume-") as stage:
            staged = VolumeFiles(stage)
            label = name[:LABEL_MAX]
            if source is None:
                _make_sparse(staged.image, size, asked)
                _mkfs(mkfs, staged.image, name=name, label=label, journal=journal)
            else:
                # Copied under the source's lock, which a machine using it holds shared
                # (so it is not removed meanwhile; its writers are the caller's to stop).
                with store.locked(shared=(("volume", source),)):
                    src = self.get(source)
                    label = src.label
                    _copy_sparse(src.image, staged.image, name)
            meta: dict[str, Any] = {"name": name, "size": size, "journal": journal,
                                    "created": time.time(), "label": label}
            if labels:
                meta["labels"] = labels
            write_json(staged.meta, meta)
            if ephemeral:
                write_atomic(staged.owner, this_process() + "\n")
            with store.locked(("volume", name)):
                try:
                    store.put_in_place(stage, final.dir, "the volume")
                except FileExistsError:
                    raise AlreadyExistsError("volume", name) from None
        log.info("volume %s: created, %d bytes, journal %s", name, size, journal)
        return self.get(name)

    async def remove(self, name: str, *, owner: str | None = None) -> None:
        """Delete volume ``name`` and its data; refused (VolumeInUse) while a machine uses it.
        A damaged volume can be removed too. ``owner``: only if its owner file still says
        that ("PID STARTTIME"; NotFoundError otherwise), checked under its lock."""
        validate_name("volume", name)
        await asyncio.to_thread(self._remove, name, owner)

    def _remove(self, name: str, owner: str | None = None) -> None:
        files = self.files(name)
        with self.store.locked(("volume", name)):
            if not files.dir.is_dir() or (owner is not None and owner_of(files) != owner):
                raise NotFoundError("volume", name, "see 'pinnace volume ls'")
            users = self.users(name)
            if users:
                raise VolumeInUse(name, users)
            # Renamed away first, so the volume disappears at once, even if deleting takes a while.
            self.store.remove_tree(files.dir)
        log.info("volume %s: removed", name)


__all__ = ["AsyncVolumes", "Volume", "mkfs_binary", "volume_size"]
