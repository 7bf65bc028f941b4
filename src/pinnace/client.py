"""The Python API: ``AsyncPinnace`` (the asyncio core) and ``Pinnace`` (its sync facade).

The facade holds no logic: it runs the core's coroutines on a private event loop
in a background thread, so it also works where the caller already has a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from .agent.client import ExecResult, Process
from .config import MachineConfig, Mount, Nic, PortForward, default_net, random_mac
from .errors import AlreadyExistsError, ConfigError, NotFoundError
from .images import DEFAULT_IMAGE, AsyncImages, Image, Images
from .machine import AsyncMachine, MachineStatus, create_disk
from .network.networks import AsyncNetworks, Network
from .snapshots import AsyncSnapshots, Snapshot
from .store import MachineFiles, Store, validate_name, write_json
from .volumes import AsyncVolumes, Volume

T = TypeVar("T")


class AsyncMachines:
    """The machines in a store."""

    def __init__(self, pinnace: AsyncPinnace) -> None:
        self._pn = pinnace

    def _handle(self, name: str) -> AsyncMachine:
        return AsyncMachine(self._pn, name)

    async def get(self, name: str) -> AsyncMachine:
        """A handle on an existing machine."""
        validate_name("machine", name)
        m = self._handle(name)
        if not m.paths.config.exists():
            raise NotFoundError("machine", name, "see 'pinnace ls'")
        return m

    async def create(self, name: str, *, image: str = DEFAULT_IMAGE, cpus: int | None = None,
                     memory: str | int | None = None, cmdline: str | None = None,
                     boot_timeout: float | None = None, accel: str | None = None,
                     snapshot: str | Snapshot | None = None, **devices: Any) -> AsyncMachine:
        """Create a stopped machine with its own disk overlay on ``image``; or, from
        ``snapshot``, one whose first start restores that snapshot (in a fraction of a
        second) instead of booting.

        Devices (see :meth:`_devices`): ``net`` ("nat", "restricted" or "none"),
        ``ports`` (["8080:80", "127.0.0.1:5353:53/udp"]), ``networks`` (["lan",
        "lan:10.77.0.9"]), ``spare_nics`` (disconnected NICs to connect later),
        ``volumes`` (["data:/data", "cache:/cache:ro"]), ``shares`` (["./src:/src:ro"]).
        """
        validate_name("machine", name)
        store = self._pn.store
        store.ensure()
        if snapshot is not None:
            snap = snapshot if isinstance(snapshot, Snapshot) else self._pn.snapshots.get(snapshot)
            return await self._from_snapshot(name, snap, cpus=cpus, memory=memory,
                                             boot_timeout=boot_timeout, accel=accel, **devices)
        digest = self._pn.images.sync.resolve(image)
        files = self._pn.images.files_for(digest, image)
        cfg = MachineConfig.build(name=name, image=image, image_digest=digest, cpus=cpus,
                                  memory=memory, cmdline=cmdline, boot_timeout=boot_timeout,
                                  accel=accel)
        return await asyncio.to_thread(self._materialise, cfg, files.rootfs, None, None, devices)

    def _devices(self, name: str, *, net: str | None = None,
                 ports: Sequence[str | PortForward] = (), networks: Sequence[str] = (),
                 spare_nics: int = 0, volumes: Sequence[str | Mount] = (),
                 shares: Sequence[str | Mount] = (), taken: dict[str, set[str]] | None = None,
                 ) -> dict[str, Any]:
        """Config fields for a machine's NICs, volumes and shares, checked and resolved:
        MACs made, addresses handed out (hold the networks' locks). A machine on a
        network gets only that NIC unless ``net`` asks for NAT as well."""
        if not isinstance(spare_nics, int) or not 0 <= spare_nics <= 8:
            raise ConfigError("spare NICs", spare_nics, "give 0 to 8")
        if net is None:
            net = "none" if networks else default_net()
        nics = []
        for spec in networks:
            netname, _, ip = str(spec).partition(":")
            self._pn.networks.get(netname)
            taken_here = (taken or {}).setdefault(netname, set())
            addr = self._pn.networks.allocate(netname, ip or None, taken_here)
            taken_here.add(addr.split("/")[0])
            nics.append(Nic(random_mac(), netname, addr))
        nics += [Nic(random_mac()) for _ in range(spare_nics)]
        vols = [v if isinstance(v, Mount) else Mount.parse(v, "volume") for v in volumes]
        for v in vols:
            self._pn.volumes.get(v.source)  # it must exist
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
                             accel: str | None, **devices: Any) -> AsyncMachine:
        cfg = MachineConfig.build(name=name, image=snap.image,
                                  image_digest=snap.key["image_digest"], cpus=snap.cpus,
                                  memory_mib=snap.memory_mib, boot_timeout=boot_timeout,
                                  accel=snap.key["accel"], snapshot=snap.ref)
        asked = MachineConfig.build(name=name, cpus=cpus or snap.cpus,
                                    memory=memory if memory is not None else f"{snap.memory_mib}M",
                                    accel=accel or snap.key["accel"])
        if (asked.cpus, asked.memory_mib) != (cfg.cpus, cfg.memory_mib) or (
                accel not in (None, "auto") and accel != snap.key["accel"]):
            raise ConfigError("machine shape", f"{asked.cpus} CPU, {asked.memory_mib}M, {asked.accel}",
                              f"snapshot {snap.name!r} was made with {snap.shape}, "
                              f"{snap.key['accel']}; a restored machine keeps its snapshot's shape")
        from .snapshots import SnapshotFiles

        files = SnapshotFiles(snap.path)
        resume = {"state": str(files.state), "memory": str(files.memory), "ignore_shared": True,
                  "snapshot": snap.ref, "macs": snap.macs, "clock": snap.clock}
        return await asyncio.to_thread(self._materialise, cfg, Path(), files.clone_disk, resume,
                                       devices)

    def _materialise(self, cfg: MachineConfig, rootfs: Path, disk_from: Path | None,
                     resume: dict[str, Any] | None = None,
                     devices: dict[str, Any] | None = None) -> AsyncMachine:
        """Build the machine's directory in staging and rename it into place whole.
        ``devices`` (create's options) are resolved here, under the locks of the
        networks they name, so two machines never get one address."""
        store = self._pn.store
        if not store.socket_paths_fit(cfg.name):
            raise ConfigError("machine name", cfg.name, "it is too long for this PINNACE_HOME's "
                              "socket paths; choose a shorter name or a shorter PINNACE_HOME")
        m = self._handle(cfg.name)
        nets = sorted({str(n).partition(":")[0] for n in (devices or {}).get("networks") or ()})
        with contextlib.ExitStack() as locks:
            for net in nets:
                locks.enter_context(store.lock("network", validate_name("network", net)))
            locks.enter_context(store.lock("machine", cfg.name, timeout=30))
            if m.paths.dir.exists():
                raise AlreadyExistsError("machine", cfg.name)
            if devices is not None:
                cfg = cfg.with_changes(**self._devices(cfg.name, **devices))
            if cfg.snapshot:
                from .snapshots import machine_key

                snap = self._pn.snapshots.by_ref(cfg.snapshot)
                changed = machine_key(self._pn, cfg, snap.key["accel"]).changes(snap.key)
                if changed:
                    raise ConfigError("machine shape", "; ".join(changed), f"snapshot "
                                      f"{snap.name!r} has other devices; a restored machine "
                                      "keeps its snapshot's devices")
            with store.staging_dir("machine-") as stage:
                staged = MachineFiles(stage)
                if disk_from is not None:
                    shutil.copyfile(disk_from, staged.disk)
                    os.chmod(staged.disk, 0o644)  # a snapshot's clone.qcow2 is read-only
                else:
                    create_disk(rootfs, staged.disk)
                write_json(staged.config, cfg.to_dict())
                write_json(staged.state, {"state": "created", "reason": ""})
                if resume is not None:
                    write_json(staged.resume, resume)
                os.rename(stage, m.paths.dir)
        m._event("created", image=cfg.image, digest=cfg.image_digest)
        return m

    async def clone(self, source: str, name: str) -> AsyncMachine:
        """A new machine with a copy of ``source``'s config and disk; the source must be at rest."""
        from .machine import AT_REST

        validate_name("machine", name)
        src = await self.get(source)
        async with await src._locked():
            await src._require("clone", AT_REST)
            cfg = src.config.with_changes(name=name)
            devices = {  # the same devices; its own MACs and addresses
                "net": cfg.net, "ports": cfg.ports, "volumes": cfg.volumes, "shares": cfg.shares,
                "networks": [n.network for n in cfg.nics if n.network],
                "spare_nics": sum(1 for n in cfg.nics if not n.network)}
            return await asyncio.to_thread(self._materialise, cfg, Path(), src.paths.disk, None,
                                           devices)

    async def run(self, *, image: str = DEFAULT_IMAGE, name: str | None = None, count: int = 1,
                  cpus: int | None = None, memory: str | int | None = None,
                  accel: str | None = None, notify: Any = None,
                  **devices: Any) -> list[AsyncMachine]:
        """Start ``count`` machines from the image's ready snapshot, concurrently.

        The first run of an image and shape boots it once and saves the ready snapshot;
        later runs restore it. Names are ``name`` (or ``name-1``..``name-N``), else random.
        ``devices`` are create's; machines with volumes or shares boot instead (what a
        disk holds is not in a snapshot's RAM).
        """
        from .backends.qemu import host as qhost

        if not 1 <= count <= 256:
            raise ConfigError("count", count, "give between 1 and 256 machines")
        store = self._pn.store
        store.ensure()
        digest = self._pn.images.sync.resolve(image)
        files = self._pn.images.files_for(digest, image)
        cfg = MachineConfig.build(name=name or "run", image=image, image_digest=digest,
                                  cpus=cpus, memory=memory, accel=accel)
        if name is not None:
            names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
        else:
            names = [f"run-{secrets.token_hex(3)}" for _ in range(count)]
        snap: Snapshot | None = None
        if not devices.get("volumes") and not devices.get("shares"):
            nets = devices.get("networks") or ()
            shape = cfg.with_changes(**self._devices(cfg.name, **{
                **devices, "networks": [], "spare_nics": len(nets)
                + int(devices.get("spare_nics") or 0),
                "net": devices.get("net") or ("none" if nets else default_net())}))
            choice = await asyncio.to_thread(qhost.choose_accel, cfg.accel, store.cache_dir,
                                             files.kernel, files.initrd)
            snap = await self._pn.snapshots.ready(shape, choice.accel, notify=notify)
        made = await asyncio.gather(*(self.create(
            n, image=image, cpus=cpus, memory=memory, accel=accel, snapshot=snap, **devices)
            for n in names), return_exceptions=True)
        machines = [m for m in made if isinstance(m, AsyncMachine)]
        errors = [e for e in made if isinstance(e, BaseException)]
        if not errors:
            started = await asyncio.gather(*(m.start() for m in machines), return_exceptions=True)
            errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(m.delete(force=True) for m in machines), return_exceptions=True)
            raise errors[0]
        return machines

    async def list(self) -> list[MachineStatus]:
        """Every machine's status, reconciled with its process; damaged ones show as broken."""
        from .machine import MachineState

        out: list[MachineStatus] = []
        d = self._pn.store.machines_dir
        if not d.is_dir():
            return out
        for entry in sorted(d.iterdir()):
            try:
                validate_name("machine", entry.name)
                out.append(await self._handle(entry.name).status())
            except Exception as exc:  # a damaged directory must not break ls
                out.append(MachineStatus(entry.name, MachineState.BROKEN, str(exc)))
        return out

    async def delete(self, name: str, *, force: bool = False) -> None:
        await (await self.get(name)).delete(force=force)


class AsyncPinnace:
    """The asyncio core of the API: one store, its images and machines."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.store = Store(home)
        self.images = AsyncImages(Images(self.store))
        self.machines = AsyncMachines(self)
        self.snapshots = AsyncSnapshots(self)
        self.volumes = AsyncVolumes(self)
        self.networks = AsyncNetworks(self)


# --- the sync facade -------------------------------------------------------------------


class _Loop:
    """A private event loop in a daemon thread; ``run`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pinnace-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class Files:
    """``machine.files`` in the sync API."""

    def __init__(self, amachine: AsyncMachine, loop: _Loop) -> None:
        self._m = amachine
        self._loop = loop

    def put(self, local: str | os.PathLike[str], remote: str) -> int:
        return self._loop.run(self._m.files.put(local, remote))

    def get(self, remote: str, local: str | os.PathLike[str]) -> int:
        return self._loop.run(self._m.files.get(remote, local))


class SyncProcess:
    """Sync face of a running guest command: iterate for ``(stream, bytes)`` as output
    arrives, then ``wait()``; ``write``/``close_stdin``/``signal`` as in Process."""

    def __init__(self, proc: Process, loop: _Loop) -> None:
        self._proc = proc
        self._loop = loop

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        it = self._proc.__aiter__()

        async def step() -> tuple[int, bytes] | None:
            try:
                return await it.__anext__()
            except StopAsyncIteration:
                return None

        while (item := self._loop.run(step())) is not None:
            yield item

    def write(self, data: bytes) -> None:
        self._loop.run(self._proc.write(data))

    def close_stdin(self) -> None:
        self._loop.run(self._proc.close_stdin())

    def signal(self, sig: int) -> None:
        self._loop.run(self._proc.signal(sig))

    def wait(self) -> ExecResult:
        return self._loop.run(self._proc.wait())

    def abandon(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._proc.abandon)

    def __enter__(self) -> SyncProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abandon()


class Machine:
    """Sync handle on a machine; every method mirrors AsyncMachine's."""

    def __init__(self, amachine: AsyncMachine, loop: _Loop) -> None:
        self._m = amachine
        self._loop = loop
        self.files = Files(amachine, loop)

    def __repr__(self) -> str:
        return f"<Machine {self.name}>"

    @property
    def name(self) -> str:
        return self._m.name

    @property
    def config(self) -> MachineConfig:
        return self._m.config

    @property
    def path(self) -> Path:
        return self._m.paths.dir

    def status(self) -> MachineStatus:
        return self._loop.run(self._m.status())

    def start(self, *, wait: bool = True, timeout: float | None = None) -> MachineStatus:
        return self._loop.run(self._m.start(wait=wait, timeout=timeout))

    def stop(self, *, timeout: float = 10.0, save: bool = False) -> MachineStatus:
        return self._loop.run(self._m.stop(timeout=timeout, save=save))

    def halt(self) -> MachineStatus:
        return self._loop.run(self._m.halt())

    def kill(self) -> MachineStatus:
        return self._loop.run(self._m.kill())

    def delete(self, *, force: bool = False) -> None:
        self._loop.run(self._m.delete(force=force))

    def configure(self, **changes: Any) -> MachineConfig:
        return self._loop.run(self._m.configure(**changes))

    def connect(self, network: str, ip: str | None = None) -> str:
        return self._loop.run(self._m.connect(network, ip))

    def disconnect(self, network: str) -> None:
        self._loop.run(self._m.disconnect(network))

    def exec(self, argv: list[str] | str, *, input: bytes | None = None,
             timeout: float | None = 60.0, env: dict[str, str] | None = None,
             cwd: str | None = None, user: str | None = None) -> ExecResult:
        return self._loop.run(self._m.exec(argv, input=input, timeout=timeout, env=env,
                                           cwd=cwd, user=user))

    def start_process(self, argv: list[str] | str, **options: Any) -> SyncProcess:
        """Start a command and stream its output: ``for stream, data in proc``."""
        return SyncProcess(self._loop.run(self._m.start_process(argv, **options)), self._loop)

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._loop.run(self._m.ping(timeout))

    def set_time(self, epoch: float | None = None) -> float:
        return self._loop.run(self._m.set_time(epoch))

    def set_hostname(self, hostname: str) -> None:
        self._loop.run(self._m.set_hostname(hostname))

    def reseed(self, nbytes: int = 64) -> None:
        self._loop.run(self._m.reseed(nbytes))

    def set_network(self, ifname: str, addresses: list[str], **options: Any) -> list[dict[str, Any]]:
        return self._loop.run(self._m.set_network(ifname, addresses, **options))

    def info(self, timeout: float = 10.0) -> dict[str, Any]:
        return self._loop.run(self._m.info(timeout))

    def serial_tail(self, lines: int = 30) -> str:
        return self._m.serial_tail(lines)

    def close(self) -> None:
        self._loop.run(self._m.close())

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Machines:
    """Sync face of AsyncMachines."""

    def __init__(self, amachines: AsyncMachines, loop: _Loop) -> None:
        self._ms = amachines
        self._loop = loop

    def get(self, name: str) -> Machine:
        return Machine(self._loop.run(self._ms.get(name)), self._loop)

    def create(self, name: str, **options: Any) -> Machine:
        return Machine(self._loop.run(self._ms.create(name, **options)), self._loop)

    def clone(self, source: str, name: str) -> Machine:
        return Machine(self._loop.run(self._ms.clone(source, name)), self._loop)

    def run(self, **options: Any) -> list[Machine]:
        """Start machines from the image's ready snapshot (see AsyncMachines.run)."""
        return [Machine(m, self._loop) for m in self._loop.run(self._ms.run(**options))]

    def list(self) -> list[MachineStatus]:
        return self._loop.run(self._ms.list())

    def delete(self, name: str, *, force: bool = False) -> None:
        self._loop.run(self._ms.delete(name, force=force))

    def __iter__(self) -> Iterator[MachineStatus]:
        return iter(self.list())


class Snapshots:
    """Sync face of AsyncSnapshots."""

    def __init__(self, asnaps: AsyncSnapshots, loop: _Loop) -> None:
        self._s = asnaps
        self._loop = loop

    def create(self, machine: str | Machine, name: str) -> Snapshot:
        m = machine._m if isinstance(machine, Machine) else None
        if m is None:
            m = self._loop.run(self._s._pn.machines.get(str(machine)))
        return self._loop.run(self._s.create(m, name))

    def get(self, name: str) -> Snapshot:
        return self._s.get(name)

    def list(self) -> list[Snapshot]:
        return self._s.list()

    def remove(self, name: str) -> None:
        self._loop.run(self._s.remove(name))


class Volumes:
    """Sync face of AsyncVolumes."""

    def __init__(self, avols: AsyncVolumes, loop: _Loop) -> None:
        self._v = avols
        self._loop = loop

    def create(self, name: str, size: str | int, *, journal: bool = True) -> Volume:
        return self._loop.run(self._v.create(name, size, journal=journal))

    def get(self, name: str) -> Volume:
        return self._v.get(name)

    def list(self) -> list[Volume]:
        return self._v.list()

    def remove(self, name: str) -> None:
        self._loop.run(self._v.remove(name))


class Networks:
    """Sync face of AsyncNetworks."""

    def __init__(self, anets: AsyncNetworks, loop: _Loop) -> None:
        self._n = anets
        self._loop = loop

    def create(self, name: str, subnet: str) -> Network:
        return self._loop.run(self._n.create(name, subnet))

    def get(self, name: str) -> Network:
        return self._n.get(name)

    def list(self) -> list[Network]:
        return self._n.list()

    def remove(self, name: str) -> None:
        self._loop.run(self._n.remove(name))


class Pinnace:
    """The sync API: ``Pinnace().machines.create(...)``, ``Pinnace().images.build()``."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self._loop = _Loop()
        self.aio = AsyncPinnace(home)
        self.store = self.aio.store
        self.images: Images = self.aio.images.sync
        self.machines = Machines(self.aio.machines, self._loop)
        self.snapshots = Snapshots(self.aio.snapshots, self._loop)
        self.volumes = Volumes(self.aio.volumes, self._loop)
        self.networks = Networks(self.aio.networks, self._loop)

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> Pinnace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncMachines", "AsyncPinnace", "Image", "Machine", "Machines", "Pinnace", "Snapshots",
           "SyncProcess"]
