"""The Python API: ``AsyncPinnace`` (the asyncio core) and ``Pinnace`` (its sync facade).

The facade holds no logic: it runs the core's coroutines on a private event loop
in a background thread, so it also works where the caller already has a loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .agent.client import ExecResult, Process
from .backends.base import Backend
from .ci.api import AsyncCI
from .config import MachineConfig
from .gc import Collector, Removed
from .images import AsyncImages, Image, Images
from .machine import AsyncMachine, MachineEnv, MachineStatus
from .machines import AsyncMachines
from .network.networks import AsyncNetworks, NetCheck, Network, Punch
from .pool import AsyncPool, Member
from .snapshots import AsyncSnapshots, Snapshot
from .snapshots.key import SnapshotLookup
from .store import KernelCache, Store, this_process
from .volumes import AsyncVolumes, Volume

if TYPE_CHECKING:
    from .ci.runner import RunResult

T = TypeVar("T")


class AsyncPinnace:
    """The asyncio core of the API: one store, and its images, machines, snapshots,
    volumes and networks. This is the wiring: it decides which store and backend each
    part gets, and holds no logic of its own. ``backend`` defaults to QEMU."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 backend: Backend | None = None) -> None:
        self.store = Store(home)
        detached = backend is None  # pool fillers run `pinnace pool fill`: QEMU's
        if backend is None:
            from .backends.qemu import QemuBackend

            backend = QemuBackend(self.store.cache)
        self.backend = backend
        images = Images(self.store)
        self.images = AsyncImages(images)
        self.volumes = AsyncVolumes(self.store)
        self.networks = AsyncNetworks(self.store)
        lookup = SnapshotLookup(self.store)
        self.snapshots = AsyncSnapshots(self.store, backend, images, lookup)
        env = MachineEnv(self.store, backend, images, lookup, self.volumes, self.networks)
        self.machines = AsyncMachines(env, self.snapshots)
        self.pool = AsyncPool(self.store, self.machines, self.snapshots, detached=detached)
        self.machines.pool = self.pool
        # (ready() calls it holding the slot's lock: fillers, which take theirs before the
        # slot's, are not waited for; what they add of the old snapshot is stale)
        self.snapshots.on_replaced = lambda snap: self.pool.drain(snapshot=snap.ref,
                                                                  wait_for_fillers=False)
        self.images.before_remove = lambda digest: self.pool.drain(image_digest=digest)
        self.ci = AsyncCI(self.machines, backend, images=images, volumes=self.volumes)
        self.collector = Collector(self.store, self.machines, self.snapshots, self.networks,
                                   self.volumes, self.pool, KernelCache())

    async def gc(self, *, dry_run: bool = False, owned_only: bool = False) -> list[Removed]:
        """Remove what crashed commands left behind; see :mod:`pinnace.gc`. ``owned_only``:
        only the machines, networks and volumes of processes that are gone."""
        return await self.collector.collect(dry_run=dry_run, owned_only=owned_only)

    async def release(self, owner: str | None = None, *, dry_run: bool = False
                      ) -> list[Removed]:
        """Remove the machines, networks and volumes this process (or ``owner``, "PID
        STARTTIME") made ephemeral: a test session's last step."""
        return await self.collector.release(owner or this_process(), dry_run=dry_run)


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

    @property
    def aio(self) -> AsyncMachine:
        """The asyncio handle this one drives."""
        return self._m

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

    def pause(self) -> MachineStatus:
        return self._loop.run(self._m.pause())

    def resume(self) -> MachineStatus:
        return self._loop.run(self._m.resume())

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

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._m.history(limit)

    def address(self, network: Any) -> str:
        return self._m.address(network)

    def keep(self) -> MachineConfig:
        return self._loop.run(self._m.keep())

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

    def __init__(self, asnaps: AsyncSnapshots, amachines: AsyncMachines, loop: _Loop) -> None:
        self._s = asnaps
        self._ms = amachines
        self._loop = loop

    def create(self, machine: str | Machine, name: str) -> Snapshot:
        """Save the running ``machine`` (a handle or a name) as snapshot ``name``."""
        m = machine.aio if isinstance(machine, Machine) else self._loop.run(
            self._ms.get(str(machine)))
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

    def create(self, name: str, size: str | int, *, journal: bool = True,
               ephemeral: bool = False) -> Volume:
        return self._loop.run(self._v.create(name, size, journal=journal, ephemeral=ephemeral))

    def keep(self, name: str) -> None:
        self._v.keep(name)

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

    def create(self, name: str, subnet: str | None = None, *, ephemeral: bool = False,
               impair: dict[str, Any] | None = None, seed: int | None = None,
               nat: str | None = None, nat_options: dict[str, Any] | None = None,
               wan_ip: str | None = None, upstream: str = "internet") -> Network:
        return self._loop.run(self._n.create(name, subnet, ephemeral=ephemeral, impair=impair,
                                             seed=seed, nat=nat, nat_options=nat_options,
                                             wan_ip=wan_ip, upstream=upstream))

    def netcheck(self, machine: Machine) -> NetCheck:
        """The NAT ``machine`` sits behind, classified from inside (RFC 5780)."""
        return self._loop.run(self._n.netcheck(machine._m))

    def punch(self, a: Machine, b: Machine, *, port: int = 4000,
              duration: float = 6.0) -> Punch:
        """Try UDP hole punching between ``a`` and ``b`` (see AsyncNetworks.punch)."""
        return self._loop.run(self._n.punch(a._m, b._m, port=port, duration=duration))

    def internet(self) -> Network:
        """The simulated internet (made if need be)."""
        return self._loop.run(self._n.ensure_internet())

    def set(self, name: str, impair: dict[str, Any] | None = None, **options: Any) -> Network:
        return self._loop.run(self._n.set(name, impair, **options))

    def partition(self, name: str, groups: builtins.list[builtins.list[str]], *,
                  oneway: bool = False) -> Network:
        return self._loop.run(self._n.partition(name, groups, oneway=oneway))

    def heal(self, name: str) -> Network:
        return self._loop.run(self._n.heal(name))

    @contextlib.contextmanager
    def capture(self, name: str, path: str | os.PathLike[str], *,
                side: str = "lan") -> Iterator[Path]:
        """Write what crosses network ``name`` (``side="wan"``: the outside of its
        router) into pcap file ``path`` in the block."""
        cm = self._n.capture(name, path, side=side)
        target = self._loop.run(cm.__aenter__())
        try:
            yield target
        finally:
            self._loop.run(cm.__aexit__(None, None, None))

    def keep(self, name: str) -> None:
        self._n.keep(name)

    def get(self, name: str) -> Network:
        return self._n.get(name)

    def list(self) -> list[Network]:
        return self._n.list()

    def remove(self, name: str) -> None:
        self._loop.run(self._n.remove(name))


class CI:
    """``pinnace.ci`` in the sync API: workflow files run in fresh machines."""

    def __init__(self, aci: AsyncCI, loop: _Loop) -> None:
        self._c = aci
        self._loop = loop

    def run(self, path: str | os.PathLike[str], **options: Any) -> RunResult:
        """Run a workflow file; see AsyncCI.run for the options."""
        return self._loop.run(self._c.run(path, **options))

    def workflows(self, root: str | os.PathLike[str] = ".") -> list[Path]:
        return self._c.workflows(root)

    def caches(self) -> list[dict[str, Any]]:
        """The saved cache entries (see AsyncCI.caches)."""
        return self._c.caches()

    def remove_caches(self, name: str | None = None, key: str | None = None) -> list[str]:
        """Remove saved cache entries (see AsyncCI.remove_caches)."""
        return self._loop.run(self._c.remove_caches(name, key))


class Pool:
    """``pinnace.pool`` in the sync API: the warm pool (see :mod:`pinnace.pool`)."""

    def __init__(self, apool: AsyncPool, loop: _Loop) -> None:
        self._p = apool
        self._loop = loop

    def size(self) -> int:
        return self._p.size()

    def set_size(self, size: int) -> None:
        self._p.set_size(size)

    def list(self) -> list[Member]:
        return self._loop.run(self._p.list())

    def fill(self, **options: Any) -> builtins.list[str]:
        return self._loop.run(self._p.fill(**options))

    def drain(self, **options: Any) -> builtins.list[str]:
        return self._loop.run(self._p.drain(**options))


class Pinnace:
    """The sync API: ``Pinnace().machines.create(...)``, ``Pinnace().images.build()``."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 backend: Backend | None = None) -> None:
        self._loop = _Loop()
        self.aio = AsyncPinnace(home, backend=backend)
        self.store = self.aio.store
        self.images: Images = self.aio.images.sync
        self.machines = Machines(self.aio.machines, self._loop)
        self.snapshots = Snapshots(self.aio.snapshots, self.aio.machines, self._loop)
        self.volumes = Volumes(self.aio.volumes, self._loop)
        self.networks = Networks(self.aio.networks, self._loop)
        self.pool = Pool(self.aio.pool, self._loop)
        self.ci = CI(self.aio.ci, self._loop)

    def gc(self, *, dry_run: bool = False, owned_only: bool = False) -> list[Removed]:
        return self._loop.run(self.aio.gc(dry_run=dry_run, owned_only=owned_only))

    def release(self, owner: str | None = None, *, dry_run: bool = False) -> list[Removed]:
        return self._loop.run(self.aio.release(owner, dry_run=dry_run))

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> Pinnace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncMachines", "AsyncPinnace", "Image", "Machine", "Machines", "Pinnace", "Snapshots",
           "SyncProcess"]
