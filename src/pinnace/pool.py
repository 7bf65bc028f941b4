"""The warm pool: restored, warmed-up clones waiting to be claimed.

A restore under TCG costs ~0.3 s however small the guest (its translation cache starts
empty); a machine that is already running answers an exec in a few tens of ms. So
``run`` (and the API's create-and-start) first tries to claim a pool member: a clone of
the ready snapshot of the same image and shape, restored and warmed up ahead of time.

- A member is an ordinary machine whose config has ``pool`` set to its pool key (the
  ready slot and the NAT mode: what its QEMU was launched with). ``ls`` hides members
  unless asked; ``pinnace pool ls`` shows them.
- Claiming takes the member's lock without waiting (two claims can never get one
  member: the second finds it locked, or gone), rewrites its config under the new name
  and renames its folder, which a running QEMU survives (its paths are relative to its
  folder). Then it gets what a restored clone gets: its hostname, the host's clock,
  fresh entropy. Its MAC and address are its own already (each member has its own).
- After a claim, a detached ``pinnace pool fill`` refills the pool to its size (a
  setting, 0 by default: off). No daemon: the filler exits once the pool is full.
- A member made from a ready snapshot that has been rebuilt or removed is stale: it is
  never handed out, and ``fill``, ``gc`` and the snapshot's replacement remove it.
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
from dataclasses import dataclass
from typing import Any

from .config import MachineConfig, default_net
from .errors import ConfigError, PinnaceError
from .machine import LIVE, AsyncMachine, MachineState
from .machines import AsyncMachines
from .snapshots import AsyncSnapshots
from .snapshots.key import Snapshot
from .store import Store, read_json, write_json

log = logging.getLogger(__name__)

POOL_PREFIX = "pool-"
MAX_POOL = 32
SIZE_ENV = "PINNACE_POOL_SIZE"


@dataclass(frozen=True)
class PoolShape:
    """What a pool serves: the machines ``run`` would make with these arguments."""

    image: str
    cpus: int
    memory_mib: int
    net: str

    def args(self) -> list[str]:
        """The ``pinnace pool fill`` options that name this shape."""
        return ["--image", self.image, "--cpus", str(self.cpus),
                "--memory", f"{self.memory_mib}M", "--net", self.net]


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

    def __init__(self, store: Store, machines: AsyncMachines, snapshots: AsyncSnapshots) -> None:
        self.store = store
        self.machines = machines
        self.snapshots = snapshots

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

    def _configs(self, key: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        return [(name, cfg) for name, cfg in self.store.machine_configs()
                if cfg.get("pool") and (key is None or cfg.get("pool") == key)]

    async def list(self) -> list[Member]:
        out = []
        for name, cfg in self._configs():
            st = await self.machines.handle(name).status()
            out.append(Member(name, str(cfg["pool"]), str(cfg.get("snapshot", "")),
                              str(st.state), self._stale(cfg), _created(self.store, name)))
        return out

    def _stale(self, cfg: dict[str, Any]) -> bool:
        """True if the member's ready snapshot is no longer the one its slot points at,
        or its image is gone."""
        slot = str(cfg.get("pool", "")).split("/", 1)[0]
        if not self.store.image_files(str(cfg.get("image_digest", ""))).manifest.exists():
            return True
        return self.snapshots.current_ready(slot) != cfg.get("snapshot")

    async def unusable(self) -> builtins.list[tuple[str, str]]:
        """(name, why) of members to remove: dead, stale, or half claimed (a claim killed
        between renaming the folder and rewriting its config). Members being worked on
        (locked) are left alone."""
        out = []
        for name, cfg in self.store.machine_configs():
            if not cfg.get("pool"):
                continue
            lock = self.store.try_locked("machine", name)
            if lock is None:
                continue
            try:
                if cfg.get("name") != name:
                    out.append((name, f"half claimed as {name!r}"))
                elif self._stale(cfg):
                    out.append((name, "of a ready snapshot that was replaced"))
                else:
                    st = await self.machines.handle(name).status(holding_lock=True)
                    if st.state not in LIVE:
                        out.append((name, f"that is {st.state}"))
            except PinnaceError:
                out.append((name, "that is damaged"))
            finally:
                lock.release()
        return out

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
        return PoolShape(image, cfg.cpus, cfg.memory_mib, net), self.key_of(cfg, choice.accel), cfg

    async def fill(self, *, image: str = "default", cpus: int | None = None,
                   memory: str | int | None = None, net: str | None = None,
                   size: int | None = None, notify: Any = None) -> builtins.list[str]:
        """Start members until the pool of this shape has ``size`` (default: the setting)
        live, current ones; remove stale and dead ones. Returns the names started. Only
        one filler per shape works at a time; a second returns at once."""
        want = self.size() if size is None else _check_size(size, "pool size")
        shape, key, _ = await self.shape_of(image, cpus, memory, net)
        lock = self.store.try_locked("pool", key.replace("/", "-"))
        if lock is None:
            return []  # another filler is at it
        started: builtins.list[str] = []
        try:
            while True:
                live = await self._prune(key)
                if live >= want:
                    return started
                name = f"{POOL_PREFIX}{secrets.token_hex(4)}"
                [m] = await self.machines.run(image=shape.image, name=name, cpus=shape.cpus,
                                              memory=f"{shape.memory_mib}M", net=shape.net,
                                              notify=notify, pool=key, claim=False)
                await m.exec(["true"])  # warm: the exec path is translated and cached
                await m.close()
                started.append(name)
        finally:
            lock.release()

    async def _prune(self, key: str) -> int:
        """Remove this pool's stale and dead members; return how many live ones remain."""
        live = 0
        for name, cfg in self._configs(key):
            m = self.machines.handle(name)
            try:
                st = await m.status()
            except PinnaceError:
                continue
            if self._stale(cfg) or st.state not in LIVE:
                await self._remove(m)
            elif st.state == MachineState.READY:
                live += 1
        return live

    async def _remove(self, m: AsyncMachine) -> None:
        lock = self.store.try_locked("machine", m.name)
        if lock is None:
            return  # being claimed or worked on right now
        lock.release()
        with contextlib.suppress(PinnaceError):
            await m.delete(force=True)

    async def drain(self, *, snapshot: str | None = None, image_digest: str | None = None,
                    stale_only: bool = False) -> builtins.list[str]:
        """Remove members (of one ready snapshot, or one image, or stale ones, or all)."""
        gone = []
        for name, cfg in self._configs():
            if snapshot is not None and cfg.get("snapshot") != snapshot:
                continue
            if image_digest is not None and cfg.get("image_digest") != image_digest:
                continue
            if stale_only and not self._stale(cfg):
                continue
            with contextlib.suppress(PinnaceError):
                await self.machines.handle(name).delete(force=True)
                gone.append(name)
        return gone

    # -- claiming ------------------------------------------------------------------------

    def key_of(self, shape: MachineConfig, accel: str) -> str:
        return pool_key(self.snapshots.ready_slot(shape, accel), shape.net)

    async def claim(self, shape: MachineConfig, accel: str, snap: Snapshot, name: str, *,
                    ephemeral: bool = False) -> AsyncMachine | None:
        """A live member of the pool of ``shape`` made from ``snap``, now named ``name``
        with its identity refreshed; or None if there is none free."""
        for member, cfg in self._configs(self.key_of(shape, accel)):
            if cfg.get("snapshot") != snap.ref:
                continue  # stale: fill and gc remove it
            m = await self.machines.adopt(member, name, ephemeral=ephemeral, check=LIVE)
            if m is not None:
                return m
        return None

    def spawn_fill(self, cfg: MachineConfig) -> None:
        """Refill the pool of ``cfg``'s shape in a detached process (no daemon: it exits
        once the pool is full); its output goes to the pool's log in the store's cache."""
        shape = PoolShape(cfg.image, cfg.cpus, cfg.memory_mib, cfg.net)
        log_path = self.store.pool_log
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as logf:
                logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} fill "
                           f"{' '.join(shape.args())}\n".encode())
                # Through a shell that starts it in the background and exits at once: the
                # filler is nobody's child (no zombie, nothing to wait for), in a session
                # of its own (Ctrl-C in the terminal does not reach it).
                subprocess.run(
                    ["sh", "-c", '"$@" &', "sh", sys.executable, "-m", "pinnace.cli", "pool",
                     "fill", *shape.args()],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, check=False,
                    env={**os.environ, "PINNACE_HOME": str(self.store.home)})
        except OSError as exc:
            log.warning("could not start refilling the warm pool: %s", exc)


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
