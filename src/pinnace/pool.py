"""The warm pool: restored, warmed-up clones waiting to be claimed.

A restore under TCG costs ~0.3 s however small the guest (its translation cache starts
empty); a machine that is already running answers an exec in a few tens of ms. So
``run`` (and the API's create-and-start) first tries to claim a pool member: a clone of
the ready snapshot of the same image and shape, restored and warmed up ahead of time.

- A member is an ordinary machine whose config has ``pool`` set to its pool key (the
  ready slot, which names image, shape, accelerator and devices, and the NAT mode: what
  its QEMU was launched with). ``ls`` hides members unless asked; ``pinnace pool ls``
  shows them.
- Claiming takes the member's lock without waiting (two claims can never get one
  member: the second finds it locked, or gone), gives its guest what a restored clone
  gets (its hostname, the host's clock, fresh entropy; its MAC and address are its own
  already), renames its folder, which a running QEMU survives (its paths are relative
  to its folder), and rewrites its config under the new name.
- After each ``run`` the pool could serve, a detached ``pinnace pool fill`` refills it
  to its size (a setting, 0 by default: off). No daemon: the filler exits once the pool
  is full.
- A member made from what no longer serves its image and shape (a ready snapshot
  rebuilt or removed, an image name pointing elsewhere) is stale: it is never handed
  out, and ``fill``, ``gc`` and the snapshot's replacement remove it.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import MachineConfig, default_net
from .errors import AlreadyExistsError, ConfigError, PinnaceError
from .machine import LIVE, AsyncMachine, MachineState
from .machines import AsyncMachines
from .snapshots import AsyncSnapshots
from .snapshots.key import Snapshot
from .store import FileLock, Store, detached_env, read_json, write_json

log = logging.getLogger(__name__)

POOL_PREFIX = "pool-"
MAX_POOL = 32
DRAIN_WAIT = 120.0  # seconds a drain waits for a filler to stop
LOG_LIMIT = 1 << 20  # bytes of the fillers' log kept before it is rotated
SIZE_ENV = "PINNACE_POOL_SIZE"


@dataclass(frozen=True)
class PoolShape:
    """What a pool serves: the machines ``run`` would make with these arguments."""

    image: str
    cpus: int
    memory_mib: int
    net: str
    accel: str = "auto"

    def args(self) -> list[str]:
        """The ``pinnace pool fill`` options that name this shape."""
        return ["--image", self.image, "--cpus", str(self.cpus),
                "--memory", f"{self.memory_mib}M", "--net", self.net, "--accel", self.accel]


@dataclass(frozen=True)
class Member:
    """One waiting clone."""

    name: str
    key: str
    snapshot: str
    state: str
    stale: bool
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "snapshot": self.snapshot,
                "state": self.state, "stale": self.stale, "created": self.created}


def pool_key(slot: str, net: str) -> str:
    return f"{slot}/{net}"


class AsyncPool:
    """The pool of one store."""

    def __init__(self, store: Store, machines: AsyncMachines, snapshots: AsyncSnapshots, *,
                 detached: bool = True) -> None:
        self.store = store
        self.machines = machines
        self.snapshots = snapshots
        # Whether spawn_fill may start `pinnace pool fill` (the QEMU backend's CLI): not
        # for a client on another backend, whose fillers would run QEMU in its store.
        self.detached = detached

    # -- the size setting ----------------------------------------------------------------

    def size(self) -> int:
        """Members kept per shape: $PINNACE_POOL_SIZE, else the store's setting, else 0."""
        env = os.environ.get(SIZE_ENV)
        if env is not None and env.strip():
            return _check_size(env, f"${SIZE_ENV}")
        try:
            data = read_json(self.store.pool_settings)
        except (OSError, ValueError):
            return 0
        value = data.get("size", 0) if isinstance(data, dict) else 0
        return value if isinstance(value, int) and 0 <= value <= MAX_POOL else 0

    def set_size(self, size: int) -> None:
        size = _check_size(size, "pool size")
        self.store.ensure()
        write_json(self.store.pool_settings, {"size": size})

    # -- members -------------------------------------------------------------------------

    def _configs(self, key: str | None = None) -> builtins.list[tuple[str, dict[str, Any]]]:
        """Members (of pool ``key``): configs with ``pool`` set, in a folder of their own
        name (a folder whose config names another is a claim killed half-way: gc's)."""
        return [(name, cfg) for name, cfg in self.store.machine_configs()
                if cfg.get("pool") and cfg.get("name") == name
                and (key is None or cfg.get("pool") == key)]

    async def list(self) -> builtins.list[Member]:
        out = []
        for name, cfg in self._configs():
            try:
                st = await self.machines.handle(name).status()
            except PinnaceError:
                continue  # claimed or removed meanwhile
            out.append(Member(name, str(cfg["pool"]), str(cfg.get("snapshot", "")),
                              str(st.state), self._stale(cfg), _created(self.store, name)))
        return out

    def _stale(self, cfg: dict[str, Any]) -> bool:
        """True if the member was made from what no longer serves its image and shape:
        its image is gone or its name now points at another, or its slot's ready
        snapshot is another one."""
        digest = str(cfg.get("image_digest", ""))
        if not self.store.image_files(digest).manifest.exists():
            return True
        try:
            if self.machines.env.images.resolve(str(cfg.get("image", ""))) != digest:
                return True
        except PinnaceError:
            return True
        slot = str(cfg.get("pool", "")).split("/", 1)[0]
        return self.snapshots.current_ready(slot) != cfg.get("snapshot")

    def _locked_config(self, name: str) -> tuple[FileLock, dict[str, Any]] | None:
        """Member ``name``'s lock (taken if free, never waiting) and its config as it is
        under that lock; None if it is taken, gone or unreadable."""
        lock = self.store.try_locked("machine", name)
        if lock is None:
            return None
        try:
            cfg = read_json(self.store.machine_files(name).config)
        except (OSError, ValueError):
            lock.release()
            return None
        if not isinstance(cfg, dict):
            lock.release()
            return None
        return lock, cfg

    async def unusable(self) -> builtins.list[tuple[str, str]]:
        """(name, why) of members to remove: dead, stale, or half claimed (a claim killed
        between renaming the folder and rewriting its config). Members being worked on
        (locked) are left alone; each is judged by its config as read under its lock."""
        out = []
        for name, _ in self.store.machine_configs():
            held = self._locked_config(name)
            if held is None:
                continue
            lock, cfg = held
            try:
                if not cfg.get("pool"):
                    continue
                st = await self.machines.handle(name).status(holding_lock=True)
                why = self._unusable(name, cfg, st.state)
                if why is not None:
                    out.append((name, why))
            except PinnaceError:
                out.append((name, "that is damaged"))
            finally:
                lock.release()
        return out

    def _unusable(self, name: str, cfg: dict[str, Any], state: MachineState) -> str | None:
        """Why a member (named ``name``, its folder) must go, or None if it may serve."""
        if cfg.get("name") != name:
            return f"half claimed as {name!r}"
        if self._stale(cfg):
            return "of an image or ready snapshot that was replaced"
        if state not in LIVE:
            return f"that is {state}"
        return None

    async def shape_of(self, image: str = "default", cpus: int | None = None,
                       memory: str | int | None = None, net: str | None = None,
                       accel: str | None = None) -> tuple[PoolShape, str, MachineConfig]:
        """The shape, pool key and machine config of ``run`` with these arguments."""
        env = self.machines.env
        digest = env.images.resolve(image)
        env.images.files_for(digest, image)
        net = net or default_net()
        if net not in ("nat", "restricted"):
            raise ConfigError("net", net, "a pool serves machines with a NAT NIC: "
                              "'nat' or 'restricted'")
        cfg = MachineConfig.build(name="pool", image=image, image_digest=digest, cpus=cpus,
                                  memory=memory, accel=accel, net=net, nat_mac="02:00:00:00:00:01")
        choice = await env.backend.choose_accel(cfg.accel)
        shape = PoolShape(image, cfg.cpus, cfg.memory_mib, net, cfg.accel)
        return shape, self.key_of(cfg, choice.accel), cfg

    async def fill(self, *, image: str = "default", cpus: int | None = None,
                   memory: str | int | None = None, net: str | None = None,
                   accel: str | None = None, size: int | None = None,
                   notify: Any = None) -> builtins.list[str]:
        """Start members until the pool of this shape has ``size`` (default: the setting,
        read again before each) live, current ones; remove stale, dead and surplus ones.
        Returns the names started. One filler per shape works at a time: without a
        ``size``, a second returns at once (the first goes on until the pool is full);
        with one, it waits for the first and then fills to its size."""
        fixed = None if size is None else _check_size(size, "pool size")
        shape, key, _ = await self.shape_of(image, cpus, memory, net, accel)
        if fixed is None:  # a refill: if another filler is at it, it fills the pool
            lock = self.store.try_locked("pool", _lock_name(key))
            if lock is None:
                return []
        else:  # a size asked for: wait for another filler, then fill to that size
            lock = self.store.lock("pool", _lock_name(key), timeout=DRAIN_WAIT)
            await lock.acquire_async()
        started: builtins.list[str] = []
        try:
            while self.store.home.is_dir():  # the store may be removed meanwhile
                want = self.size() if fixed is None else fixed
                live = await self._prune(key, want)
                if live >= want:
                    break
                name = f"{POOL_PREFIX}{secrets.token_hex(4)}"
                [m] = await self.machines.run(image=shape.image, name=name, cpus=shape.cpus,
                                              memory=f"{shape.memory_mib}M", net=shape.net,
                                              accel=shape.accel, notify=notify, pool=key,
                                              claim=False)
                started.append(name)
                try:  # warm: the exec path translated and cached in the guest (TCG)
                    await m.exec(["true"])
                except PinnaceError:
                    pass  # claimed already (it is ready before it is warm)
                await m.close()
        finally:
            lock.release()
        return started

    async def _prune(self, key: str, want: int) -> int:
        """Remove this pool's stale and dead members, and those beyond ``want``; return
        how many live ones remain."""
        live = 0
        for name, cfg in self._configs(key):
            m = self.machines.handle(name)
            try:
                st = await m.status()
            except PinnaceError:
                continue
            if self._unusable(name, cfg, st.state) is not None or live >= want:
                await self._remove(name, lambda c: True)
            elif st.state == MachineState.READY:
                live += 1
        return live

    async def _remove(self, name: str, wanted: Callable[[dict[str, Any]], bool]) -> bool:
        """Remove member ``name`` if it still is one (judged under its lock, which a claim
        holds while it renames it) and ``wanted`` says so; True if removed."""
        held = self._locked_config(name)
        if held is None:
            return False  # being claimed or worked on right now
        lock, cfg = held
        try:
            member = bool(cfg.get("pool")) and cfg.get("name") == name and wanted(cfg)
        finally:
            lock.release()
        if not member:
            return False
        try:  # a claim taking it now renames it away first: then there is nothing here
            await self.machines.handle(name).delete(force=True)
        except PinnaceError:
            return False
        return True

    async def drain(self, *, snapshot: str | None = None, image_digest: str | None = None,
                    wait_for_fillers: bool = True) -> builtins.list[str]:
        """Remove members (of one ready snapshot, or one image, or all). Fillers at work
        are waited for first (a size of 0 makes them stop), so that none refills behind
        the drain; not when called from a ready snapshot's replacement, which holds its
        slot's lock (fillers take theirs after the pool's)."""
        def wanted(cfg: dict[str, Any]) -> bool:
            return ((snapshot is None or cfg.get("snapshot") == snapshot)
                    and (image_digest is None or cfg.get("image_digest") == image_digest))

        gone = []
        fillers = set(self.store.lock_names("pool")) if wait_for_fillers else set()
        for lock_name in sorted(fillers):  # every pool's filler, even of an empty pool
            lock = self.store.lock("pool", lock_name, timeout=DRAIN_WAIT)
            await lock.acquire_async()
            try:
                gone += [name for name, cfg in self._configs()
                         if _lock_name(str(cfg["pool"])) == lock_name
                         and await self._remove(name, wanted)]
            finally:
                lock.release()
        for name, _ in self._configs():  # members of no filler's pool (made by hand)
            if await self._remove(name, wanted):
                gone.append(name)
        return gone

    # -- claiming ------------------------------------------------------------------------

    def key_of(self, shape: MachineConfig, accel: str) -> str:
        return pool_key(self.snapshots.ready_slot(shape, accel), shape.net)

    async def claim(self, shape: MachineConfig, accel: str, snap: Snapshot, name: str, *,
                    ephemeral: bool = False) -> AsyncMachine | None:
        """A live member of the pool of ``shape`` made from ``snap``, now named ``name``
        with its identity refreshed; or None if there is none free (a member that fails
        to be claimed is removed, and the next one tried)."""
        for member, cfg in self._configs(self.key_of(shape, accel)):
            if cfg.get("snapshot") != snap.ref or self._stale(cfg):
                continue  # stale: fill and gc remove it
            try:
                m = await self.machines.adopt(member, name, ephemeral=ephemeral)
            except AlreadyExistsError:
                raise
            except PinnaceError as exc:
                log.warning("could not claim warm-pool member %s (%s); trying another", member,
                            exc)
                continue
            if m is not None:
                return m
        return None

    def spawn_fill(self, cfg: MachineConfig) -> None:
        """Refill the pool of ``cfg``'s shape in a detached process (no daemon: it exits
        once the pool is full); its output goes to the pool's log in the store's cache."""
        if not self.detached:
            return
        shape = PoolShape(cfg.image, cfg.cpus, cfg.memory_mib, cfg.net, cfg.accel)
        log_path = self.store.pool_log
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if log_path.stat().st_size > LOG_LIMIT:  # keep the last runs only
                    log_path.replace(log_path.with_suffix(".log.old"))
            with open(log_path, "ab") as logf:
                logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} fill "
                           f"{' '.join(shape.args())}\n".encode())
                # Through a shell that starts it in the background and exits at once: the
                # filler is nobody's child (no zombie, nothing to wait for), in a session
                # of its own (Ctrl-C in the terminal does not reach it), in / (it keeps no
                # folder busy), importing the same pinnace as this process.
                subprocess.run(
                    ["sh", "-c", '"$@" &', "sh", sys.executable, "-m", "pinnace.cli", "pool",
                     "fill", *shape.args()],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, check=False, cwd="/",
                    env={**detached_env(), "PINNACE_HOME": str(self.store.home)})
        except OSError as exc:
            log.warning("could not start refilling the warm pool: %s", exc)


def _lock_name(key: str) -> str:
    return key.replace("/", "-")


def _check_size(value: object, what: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if isinstance(value, bool) or not 0 <= n <= MAX_POOL:
        raise ConfigError(what, value, f"give 0 (off) to {MAX_POOL} machines")
    return n


def _created(store: Store, name: str) -> float:
    try:
        return store.machine_files(name).config.stat().st_mtime
    except OSError:
        return 0.0


__all__ = ["AsyncPool", "Member", "PoolShape", "pool_key"]
