"""Making machines: create (from an image or a snapshot), clone, run, and listing them.

A machine's directory is built whole in the store's staging area and renamed into
place, so a machine exists complete or not at all. ``run`` starts machines from the
ready snapshot of their image and shape (see :mod:`pinnace.snapshots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .config import MachineConfig, Mount, Nic, PortForward, default_net, random_mac
from .errors import (
    AlreadyExistsError,
    ConfigError,
    NotFoundError,
    PinnaceError,
    StateError,
    store_error,
)
from .images import DEFAULT_IMAGE
from .machine import (
    AT_REST,
    AsyncMachine,
    MachineEnv,
    MachineState,
    MachineStatus,
    notice_accel,
)
from .snapshots import AsyncSnapshots
from .snapshots.key import Snapshot, machine_key, snapshot_lock
from .store import MachineFiles, this_process, validate_name, write_atomic, write_json


class Pool(Protocol):
    """What ``run`` asks of the warm pool (pinnace.pool.AsyncPool)."""

    def size(self) -> int: ...

    async def claim(self, shape: MachineConfig, accel: str, snap: Snapshot, name: str, *,
                    ephemeral: bool = False) -> AsyncMachine | None: ...

    def spawn_fill(self, shape: MachineConfig) -> None: ...


def pool_eligible(devices: dict[str, Any]) -> bool:
    """True if ``run`` with these devices may take a warm-pool member: a pool member has
    a NAT NIC (restricted or not) and nothing else, so no forwards, networks or disks."""
    return not any(devices.get(k) for k in ("ports", "networks", "spare_nics", "volumes",
                                             "shares")) \
        and (devices.get("net") or default_net()) in ("nat", "restricted")


class AsyncMachines:
    """The machines in a store."""

    def __init__(self, env: MachineEnv, snapshots: AsyncSnapshots) -> None:
        self.env = env
        self.snapshots = snapshots
        self.pool: Pool | None = None  # set by the client's wiring

    def handle(self, name: str) -> AsyncMachine:
        """A handle on machine ``name``, which need not exist (yet)."""
        return AsyncMachine(name, self.env)

    async def get(self, name: str) -> AsyncMachine:
        """A handle on an existing machine."""
        validate_name("machine", name)
        m = self.handle(name)
        if not m.paths.dir.is_dir():
            raise NotFoundError("machine", name, "see 'pinnace ls'")
        return m

    async def create(self, name: str, *, image: str = DEFAULT_IMAGE, cpus: int | None = None,
                     memory: str | int | None = None, cmdline: str | None = None,
                     boot_timeout: float | None = None, accel: str | None = None,
                     snapshot: str | Snapshot | None = None, ephemeral: bool = False,
                     pool: str = "", **devices: Any) -> AsyncMachine:
        """Create a stopped machine with its own disk overlay on ``image``; or, from
        ``snapshot``, one whose first start restores that snapshot (in a fraction of a
        second) instead of booting.

        Devices (see :meth:`_devices`): ``net`` ("nat", "restricted" or "none"),
        ``ports`` (["8080:80", "127.0.0.1:5353:53/udp"]), ``networks`` (["lan",
        "lan:10.77.0.9"]), ``spare_nics`` (disconnected NICs to connect later),
        ``volumes`` (["data:/data", "cache:/cache:ro"]), ``shares`` (["./src:/src:ro"]).
        """
        validate_name("machine", name)
        if snapshot is not None:
            snap = (snapshot if isinstance(snapshot, Snapshot)
                    else self.env.snapshots.get(snapshot))
            return await self._from_snapshot(name, snap, cpus=cpus, memory=memory,
                                             boot_timeout=boot_timeout, accel=accel,
                                             ephemeral=ephemeral, pool=pool, **devices)
        images = self.env.images
        digest = images.resolve(image)
        files = images.files_for(digest, image)
        cfg = MachineConfig.build(name=name, image=image, image_digest=digest, cpus=cpus,
                                  memory=memory, cmdline=cmdline, boot_timeout=boot_timeout,
                                  accel=accel, ephemeral=ephemeral)
        return await self._materialise(cfg, base=files.rootfs, devices=devices)

    def _devices(self, name: str, *, net: str | None = None,
                 ports: Sequence[str | PortForward] = (), networks: Sequence[str] = (),
                 spare_nics: int = 0, volumes: Sequence[str | Mount] = (),
                 shares: Sequence[str | Mount] = (), taken: dict[str, set[str]] | None = None,
                 ) -> dict[str, Any]:
        """Config fields for a machine's NICs, volumes and shares, checked and resolved:
        MACs made, addresses handed out (hold the networks' locks). A machine on a
        network gets only that NIC unless ``net`` asks for NAT as well."""
        if isinstance(spare_nics, bool) or not isinstance(spare_nics, int) \
                or not 0 <= spare_nics <= 8:
            raise ConfigError("spare NICs", spare_nics, "give 0 to 8")
        if net is None:
            net = "none" if networks else default_net()
        nics = []
        joined: list[str] = []
        for spec in networks:
            netname, _, ip = str(spec).partition(":")
            self.env.networks.check_joins(netname, joined)
            joined.append(netname)
            taken_here = (taken or {}).setdefault(netname, set())
            addr = self.env.networks.allocate(netname, ip or None, taken_here)
            taken_here.add(addr.split("/")[0])
            nics.append(Nic(random_mac(), netname, addr))
        nics += [Nic(random_mac()) for _ in range(spare_nics)]
        vols = [v if isinstance(v, Mount) else Mount.parse(v, "volume") for v in volumes]
        for v in vols:
            self.env.volumes.get(v.source)  # it must exist
        return {
            "net": net, "nat_mac": random_mac() if net != "none" else "",
            "ports": tuple(p if isinstance(p, PortForward) else PortForward.parse(p)
                           for p in ports),
            "nics": tuple(nics), "volumes": tuple(vols),
            "shares": tuple(m if isinstance(m, Mount) else Mount.parse(m, "share")
                            for m in shares),
        }

    async def _from_snapshot(self, name: str, snap: Snapshot, *, cpus: int | None,
                             memory: str | int | None, boot_timeout: float | None,
                             accel: str | None, ephemeral: bool, pool: str = "",
                             **devices: Any) -> AsyncMachine:
        cfg = MachineConfig.build(name=name, image=snap.image,
                                  image_digest=snap.key["image_digest"], cpus=snap.cpus,
                                  memory_mib=snap.memory_mib, boot_timeout=boot_timeout,
                                  accel=snap.key["accel"], snapshot=snap.ref,
                                  ephemeral=ephemeral, pool=pool)
        asked = MachineConfig.build(name=name, cpus=cpus or snap.cpus,
                                    memory=memory if memory is not None else f"{snap.memory_mib}M",
                                    accel=accel or snap.key["accel"])
        if (asked.cpus, asked.memory_mib) != (cfg.cpus, cfg.memory_mib) or (
                accel not in (None, "auto") and accel != snap.key["accel"]):
            raise ConfigError("machine shape", f"{asked.cpus} CPU, {asked.memory_mib}M, {asked.accel}",
                              f"snapshot {snap.name!r} was made with {snap.shape}, "
                              f"{snap.key['accel']}; a restored machine keeps its snapshot's shape")
        attached = [*(devices.get("volumes") or ()), *(devices.get("shares") or ())]
        if attached and not snap.ready:
            raise ConfigError("volume" if devices.get("volumes") else "share",
                              str(attached[0]), f"snapshot {snap.name!r} has no volumes or "
                              "shared folders (a named snapshot never has), and a machine "
                              "made from it keeps its snapshot's devices; create it from "
                              "the image instead (without --snapshot), or use 'pinnace run', "
                              "which restores the image's ready snapshot with them")
        files = snap.paths
        resume = {"state": str(files.state), "memory": str(files.memory), "ignore_shared": True,
                  "snapshot": snap.ref, "macs": snap.macs, "clock": snap.clock}
        return await self._materialise(cfg, copy_disk=files.clone_disk, resume=resume,
                                       devices=devices)

    async def _materialise(self, cfg: MachineConfig, *, base: Path | None = None,
                           copy_disk: Path | None = None, resume: dict[str, Any] | None = None,
                           devices: dict[str, Any] | None = None,
                           hold: tuple[tuple[str, str], ...] = (),
                           check: Callable[[], Awaitable[None]] | None = None) -> AsyncMachine:
        """Build the machine's directory in staging and rename it into place whole: a disk
        overlay on ``base``, or a copy of ``copy_disk``. ``devices`` (create's options) are
        resolved here, under the locks of the networks they name, so two machines never
        get one address. ``hold``: more locks to take with those (all in the store's
        order); ``check`` runs once they are held."""
        store = self.env.store
        if not store.socket_paths_fit(cfg.name):
            raise ConfigError("machine name", cfg.name, "it is too long for this PINNACE_HOME's "
                              "socket paths; choose a shorter name or a shorter PINNACE_HOME")
        m = self.handle(cfg.name)
        store.ensure()  # only now: a command refused for bad input leaves no folders
        nets = sorted({str(n).partition(":")[0] for n in (devices or {}).get("networks") or ()})
        locks = [("network", validate_name("network", n)) for n in nets]
        for n in nets:
            await self.env.networks.named(n)  # (the internet is made when first named)
        # What it is made from must not be removed meanwhile: held shared with other
        # machines being made from the same things; removal takes them exclusively.
        used = [("image", cfg.image_digest)]
        if cfg.snapshot:
            used.append(snapshot_lock(cfg.snapshot))  # its snapshot.json is read under it
        for v in (devices or {}).get("volumes") or ():
            used.append(("volume", (v if isinstance(v, Mount) else Mount.parse(str(v),
                                                                             "volume")).source))
        async with store.alocked(("machine", cfg.name), *locks, *hold, shared=tuple(used),
                                 timeout=30):
            if check is not None:
                await check()
            if m.paths.dir.exists():
                raise AlreadyExistsError("machine", cfg.name)
            if devices is not None:
                cfg = cfg.with_changes(**self._devices(cfg.name, **devices))
            if cfg.snapshot:
                snap = self.env.snapshots.by_ref(cfg.snapshot)
                changed = machine_key(self.env.backend, cfg, snap.key["accel"]).changes(snap.key)
                if changed:
                    raise ConfigError("machine shape", "; ".join(changed), f"snapshot "
                                      f"{snap.name!r} has other devices; a restored machine "
                                      "keeps its snapshot's devices")
            with store.staging_dir("machine-") as stage:
                staged = MachineFiles(stage)
                if copy_disk is not None:
                    try:
                        await asyncio.to_thread(shutil.copyfile, copy_disk, staged.disk)
                        os.chmod(staged.disk, 0o644)  # a snapshot's clone.qcow2 is read-only
                    except OSError as exc:
                        raise store_error(exc, "copying the machine's disk") from None
                else:
                    assert base is not None
                    await self.env.backend.create_disk(base, staged.disk)
                write_json(staged.config, cfg.to_dict())
                write_json(staged.state, {"state": "created", "reason": ""})
                if cfg.ephemeral:
                    write_atomic(staged.owner, this_process() + "\n")
                if resume is not None:
                    write_json(staged.resume, resume)
                try:
                    store.put_in_place(stage, m.paths.dir, "the new machine")
                except FileExistsError:
                    raise AlreadyExistsError("machine", cfg.name) from None
        m.event("created", image=cfg.image, digest=cfg.image_digest)
        return m

    async def clone(self, source: str, name: str) -> AsyncMachine:
        """A new machine with a copy of ``source``'s config and disk; the source must be at rest."""
        validate_name("machine", name)
        src = await self.get(source)
        cfg = src.config.with_changes(name=name, ephemeral=False)

        async def at_rest() -> None:  # checked holding the source's lock: it cannot start
            st = await src.status(holding_lock=True)
            if st.state not in AT_REST:
                raise StateError(source, "clone", str(st.state), [str(s) for s in AT_REST])

        devices = {  # the same devices; its own MACs and addresses
            "net": cfg.net, "ports": cfg.ports, "volumes": cfg.volumes, "shares": cfg.shares,
            "networks": [n.network for n in cfg.nics if n.network],
            "spare_nics": sum(1 for n in cfg.nics if not n.network)}
        return await self._materialise(cfg, copy_disk=src.paths.disk, devices=devices,
                                       hold=(("machine", source),), check=at_rest)

    async def run(self, *, image: str = DEFAULT_IMAGE, name: str | None = None, count: int = 1,
                  cpus: int | None = None, memory: str | int | None = None,
                  accel: str | None = None, notify: Any = None, rm: bool = False,
                  pool: str = "", claim: bool = True, timeout: float | None = None,
                  **devices: Any) -> list[AsyncMachine]:
        """Start ``count`` machines from the image's ready snapshot, concurrently.

        The first run of an image and shape boots it once and saves the ready snapshot;
        later runs restore it, or claim a member of the warm pool (see
        :mod:`pinnace.pool`) when one is waiting (``claim``). Names are ``name`` (or
        ``name-1``..``name-N``), else random. ``devices`` are create's; volumes and
        shares are mounted once restored (the ready snapshot has empty slots for them).
        ``rm``: the caller deletes them when done (if it dies first, ``pinnace gc``
        does). ``pool``: make warm-pool members of that pool (its filler does).
        ``timeout``: seconds each wait may take (the template's boot, a restore), instead
        of pinnace's defaults.
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 256:
            raise ConfigError("count", count, "give between 1 and 256 machines")
        digest = self.env.images.resolve(image)
        self.env.images.files_for(digest, image)
        cfg = MachineConfig.build(name=name or "run", image=image, image_digest=digest,
                                  cpus=cpus, memory=memory, accel=accel)
        if name is not None:
            names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
            for n in names:
                validate_name("machine", n)
        else:
            names = [f"run-{secrets.token_hex(3)}" for _ in range(count)]
        # The ready snapshot's shape: NICs, volume and share slots as these machines'
        # (its template has spare NICs, empty disks and folders in them).
        nets = devices.get("networks") or ()
        shape = cfg.with_changes(**self._devices(cfg.name, **{
            **devices, "networks": [], "spare_nics": len(nets)
            + int(devices.get("spare_nics") or 0),
            "net": devices.get("net") or ("none" if nets else default_net())}))
        choice = await self.env.backend.choose_accel(cfg.accel)
        notice_accel(choice, cfg.accel)
        snap = await self.snapshots.ready(shape, choice.accel, notify=notify, timeout=timeout)
        claimed: list[AsyncMachine] = []
        if self.pool is not None and claim and not pool and pool_eligible(devices):
            claimed = await self._claim(names, shape, snap, choice.accel, rm)
        rest = names[len(claimed):]
        made = await asyncio.gather(*(self.create(
            n, image=image, cpus=cpus, memory=memory, accel=accel, snapshot=snap,
            ephemeral=rm, pool=pool, **devices) for n in rest), return_exceptions=True)
        machines = [m for m in made if isinstance(m, AsyncMachine)]
        errors = [e for e in made if isinstance(e, BaseException)]
        if not errors:
            started = await asyncio.gather(*(m.start(timeout=timeout) for m in machines),
                                           return_exceptions=True)
            errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(m.delete(force=True) for m in claimed + machines),
                                 return_exceptions=True)
            raise errors[0]
        return claimed + machines

    async def _claim(self, names: list[str], shape: MachineConfig, snap: Snapshot,
                     accel: str, rm: bool) -> list[AsyncMachine]:
        """Take warm-pool members for as many of ``names`` as there are; then have the
        pool refilled in the background (if it has a size)."""
        assert self.pool is not None
        refill = self.pool.size() > 0  # read first: a bad $PINNACE_POOL_SIZE claims nothing
        claimed: list[AsyncMachine] = []
        try:
            for n in names:
                m = await self.pool.claim(shape, accel, snap, n, ephemeral=rm)
                if m is None:
                    break
                claimed.append(m)
        except BaseException:
            await asyncio.gather(*(m.delete(force=True) for m in claimed),
                                 return_exceptions=True)
            raise
        if refill:
            self.pool.spawn_fill(shape)
        return claimed

    async def adopt(self, member: str, name: str, *, ephemeral: bool = False
                    ) -> AsyncMachine | None:
        """Make running warm-pool machine ``member`` the machine ``name``: its guest is
        given what a restored clone gets (its hostname, the host's clock, fresh entropy),
        then its folder is renamed (its QEMU runs on: its paths are relative to its
        folder) and its config made an ordinary machine's. None if ``member`` is taken (by
        a concurrent claim), gone, or not ready. The member's lock is taken only if free
        (so two claims never wait for each other, whatever the order of names); the new
        name's is waited for."""
        validate_name("machine", name)
        store = self.env.store
        if not store.socket_paths_fit(name):
            raise ConfigError("machine name", name, "it is too long for this PINNACE_HOME's "
                              "socket paths; choose a shorter name or a shorter PINNACE_HOME")
        held = store.try_locked("machine", member)
        if held is None:
            return None
        src = self.handle(member)
        m = self.handle(name)
        moved = False
        try:
            async with store.alocked(("machine", name), timeout=30):
                if not src.paths.dir.is_dir():
                    return None  # claimed by someone else a moment ago
                try:
                    cfg = src.config
                    st = await src.status(holding_lock=True)
                except PinnaceError:
                    return None
                if not cfg.pool or cfg.name != member or st.state != MachineState.READY:
                    return None
                if m.paths.dir.exists():
                    raise AlreadyExistsError("machine", name)
                # Its identity first, while it is still a member: a claim killed before
                # the rename leaves a member (the next claim renews it all again).
                agent = await src.agent()
                await agent.refresh_identity(name)
                await src.close()
                # Renamed, then its config: a claim killed in between leaves a folder
                # whose config names another machine, which gc removes.
                try:
                    store.put_in_place(src.paths.dir, m.paths.dir, "the claimed machine")
                except FileExistsError:
                    raise AlreadyExistsError("machine", name) from None
                moved = True
                if ephemeral:
                    write_atomic(m.paths.owner, this_process() + "\n")
                write_json(m.paths.config, cfg.with_changes(
                    name=name, pool="", ephemeral=ephemeral).to_dict())
        except BaseException:
            if moved:  # (its locks are released: delete takes them itself)
                with contextlib.suppress(PinnaceError):
                    await m.delete(force=True)
            raise
        finally:
            held.release()
        m.event("claimed", member=member)
        return m

    async def list(self, *, pool: bool = False) -> list[MachineStatus]:
        """Every machine's status, reconciled with its process; damaged ones show as broken.
        Warm-pool members (see :mod:`pinnace.pool`) only with ``pool``."""
        out: list[MachineStatus] = []
        d = self.env.store.machines_dir
        if not d.is_dir():
            return out
        members = set() if pool else {n for n, cfg in self.env.store.machine_configs()
                                      if cfg.get("pool") and cfg.get("name") == n}
        for entry in sorted(d.iterdir()):
            if entry.name in members:
                continue
            try:
                validate_name("machine", entry.name)
                out.append(await self.handle(entry.name).status())
            except (PinnaceError, OSError) as exc:  # a damaged directory must not break ls
                out.append(MachineStatus(entry.name, MachineState.BROKEN, str(exc)))
        return out

    async def delete(self, name: str, *, force: bool = False) -> None:
        await (await self.get(name)).delete(force=force)

__all__ = ["AsyncMachines"]
