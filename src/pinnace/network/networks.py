"""Virtual networks: named L2 segments with a subnet, one supervised switch each.

A network is a directory ``networks/<name>/`` holding ``network.json`` (its subnet)
and the switch's files (see :mod:`.switch`). Machines join with NICs whose QEMU
backend is a ``dgram`` unix socket; pinnace gives each NIC an address from the
subnet (the agent sets it: no DHCP) and registers it with the switch as a port file.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ipaddress
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    AlreadyExistsError,
    ConfigError,
    NetworkInUse,
    NotFoundError,
    PinnaceError,
    StoreError,
    store_error,
)
from ..store import (
    MachineFiles,
    NetworkFiles,
    Store,
    drop_owner,
    read_record,
    this_process,
    validate_name,
    write_atomic,
    write_json,
)
from .impair import Impairment, Lab, describe


@dataclass(frozen=True)
class Network:
    name: str
    path: Path
    subnet: str
    created: float
    lab: Lab = field(default_factory=Lab)  # impairments, partition, seed

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    @property
    def impairment(self) -> Impairment:
        """What every link of the network does to frames (machines may override it)."""
        return self.lab.impair

    def to_dict(self) -> dict[str, Any]:
        lab = self.lab
        return {"name": self.name, "subnet": self.subnet, "created": self.created,
                "path": str(self.path), "impair": describe(lab.impair),
                "links": {m: describe(lab.link(m)) for m, _ in lab.links},
                "partition": {"groups": [list(g) for g in lab.groups], "oneway": lab.oneway}
                if lab.groups else None, "seed": lab.seed}


# The subnet of every machine's NAT NIC (QEMU's user-mode network).
NAT_SUBNET = ipaddress.IPv4Network("10.0.2.0/24")


def check_subnet(subnet: str) -> str:
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise ConfigError("subnet", subnet, f"give an IPv4 network such as 10.77.0.0/24 ({exc})"
                          ) from None
    if not 8 <= net.prefixlen <= 29:
        raise ConfigError("subnet", subnet, "give a prefix between /8 and /29")
    if (net.is_loopback or net.is_multicast or net.is_link_local or net.is_reserved
            or net.overlaps(ipaddress.IPv4Network("0.0.0.0/8"))):
        raise ConfigError("subnet", subnet, "it is a loopback, multicast, link-local or "
                          "reserved range; use a private one such as 10.77.0.0/24")
    if net.overlaps(NAT_SUBNET):
        raise ConfigError("subnet", subnet, f"it overlaps the NAT NIC's subnet {NAT_SUBNET}, "
                          "which machines on it also have; choose another")
    return str(net)


# Where networks made without a subnet get theirs: one /24 each.
AUTO_SUBNETS = ipaddress.IPv4Network("10.100.0.0/16")


def free_subnet(taken: list[str]) -> str:
    """The first /24 of AUTO_SUBNETS that overlaps none of ``taken``."""
    used = [ipaddress.IPv4Network(t) for t in taken]
    for candidate in AUTO_SUBNETS.subnets(new_prefix=24):
        if not any(candidate.overlaps(u) for u in used):
            return str(candidate)
    raise ConfigError("subnet", "(none given)", f"every /24 of {AUTO_SUBNETS} is taken; "
                      "remove networks you no longer need, or give a subnet")


def _seed(seed: object) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        raise ConfigError("seed", str(seed), "give a whole number, 0 or more")
    return seed


def port_id(machine: str, nic: int) -> str:
    return f"{machine}.n{nic}"


class AsyncNetworks:
    """The virtual networks in a store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def dir(self) -> Path:
        return self.store.networks_dir

    def files(self, name: str) -> NetworkFiles:
        return self.store.network_files(validate_name("network", name))

    def get(self, name: str) -> Network:
        files = self.files(name)
        try:
            meta = read_record(files.meta, "")
            return Network(name, files.dir, check_subnet(str(meta["subnet"])),
                           float(meta["created"]), Lab.from_meta(meta))
        except FileNotFoundError:
            raise NotFoundError("network", name, "see 'pinnace network ls', or create it with "
                                "'pinnace network create NAME --subnet 10.77.0.0/24'") from None
        except (ValueError, KeyError, TypeError, ConfigError, StoreError) as exc:
            raise StoreError(str(files.meta), f"is damaged ({exc})", "remove the network with "
                             f"'pinnace network rm {name}'") from None

    def list(self) -> builtins.list[Network]:
        out = []
        if self.dir.is_dir():
            for entry in sorted(self.dir.iterdir()):
                try:
                    out.append(self.get(entry.name))
                except PinnaceError:
                    continue
        return out

    async def create(self, name: str, subnet: str | None = None, *,
                     ephemeral: bool = False, impair: dict[str, Any] | None = None,
                     seed: int | None = None) -> Network:
        """Make network ``name`` with ``subnet`` ("10.77.0.0/24"), or the first free /24
        of 10.100.0.0/16 if none is given. ``ephemeral``: it belongs to this process
        (a test session), and ``gc`` removes it once the process is gone (see
        :class:`pinnace.store.Owned`). ``impair``: Impairment fields for every link
        (``{"delay": 0.05, "loss": 0.01}``; see :mod:`.impair`); ``seed``: repeat a run's
        random losses and delays exactly."""
        validate_name("network", name)
        if subnet is not None:
            subnet = check_subnet(subnet)
        lab = {"impair": Impairment.from_dict(impair or {}).to_dict(), "seed": _seed(seed)}
        store = self.store
        store.ensure()
        # The address plan is checked and extended by one command at a time: two networks
        # made at once (pytest-xdist workers, say) never get overlapping subnets.
        async with store.alocked(("network", name), ("subnets", "all")):
            if self.files(name).dir.exists():
                raise AlreadyExistsError("network", name)
            others = self.list()
            if subnet is None:
                subnet = free_subnet([o.subnet for o in others])
            net = ipaddress.IPv4Network(subnet)
            for other in others:
                if ipaddress.IPv4Network(other.subnet).overlaps(net):
                    raise ConfigError("subnet", subnet, f"it overlaps network {other.name!r} "
                                      f"({other.subnet}); choose another")
            with store.staging_dir("network-") as stage:
                staged = NetworkFiles(stage)
                write_json(staged.meta, {"name": name, "subnet": subnet,
                                         "created": time.time(), **lab})
                if ephemeral:
                    write_atomic(staged.owner, this_process() + "\n")
                try:
                    staged.ports_dir.mkdir()
                except OSError as exc:
                    raise store_error(exc, "making the network") from None
                try:
                    store.put_in_place(stage, self.files(name).dir, "the network")
                except FileExistsError:
                    raise AlreadyExistsError("network", name) from None
        return self.get(name)

    def members(self, name: str) -> dict[str, builtins.list[tuple[int, str]]]:
        """Machine -> [(NIC index, address)] for every machine with a NIC on ``name``."""
        out: dict[str, builtins.list[tuple[int, str]]] = {}
        for machine, cfg in self.store.machine_configs():
            nics = cfg.get("nics")
            for i, nic in enumerate(nics if isinstance(nics, builtins.list) else []):
                if isinstance(nic, dict) and nic.get("network") == name:
                    out.setdefault(machine, []).append((i, str(nic.get("ip", ""))))
        return out

    def allocate(self, name: str, want: str | None, taken: set[str]) -> str:
        """An address on network ``name`` for a new NIC: ``want`` if it is free and in the
        subnet, else the lowest free host address from .2 (.1 is kept for a gateway).
        Call with the network's lock held; ``taken`` adds addresses being handed out."""
        network = self.get(name)
        net = ipaddress.IPv4Network(network.subnet)
        used = {ip.split("/")[0] for nics in self.members(name).values() for _, ip in nics} | taken
        if want is not None:
            try:
                addr = ipaddress.IPv4Address(want.split("/")[0])
            except ValueError:
                raise ConfigError("network address", want, "give an IPv4 address") from None
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise ConfigError("network address", want, f"it is not a host address of "
                                  f"{name!r} ({network.subnet})")
            if str(addr) in used:
                raise ConfigError("network address", want, f"another machine on {name!r} has "
                                  "it; choose another or leave it out")
            return f"{addr}/{net.prefixlen}"
        for addr in net.hosts():
            if int(addr) - int(net.network_address) >= 2 and str(addr) not in used:
                return f"{addr}/{net.prefixlen}"
        raise ConfigError("network", name, f"its subnet {network.subnet} has no free address")

    def register(self, name: str, machine: str, files: MachineFiles, nic: int, mac: str) -> None:
        """Plug a machine's NIC into the network's switch (started if it is not running)."""
        from . import switch

        network = self.get(name)
        # QEMU, working in the machine's folder, binds its end relative to it (see
        # backends.qemu.command): that name is what its frames carry.
        sock = files.nic_sock(nic)
        switch.write_port(network.path, port_id(machine, nic), switch.PortSpec(
            peer=str(files.nic_peer(nic)), qemu=str(sock), machine=machine, mac=mac,
            sender=files.cwd_path(sock)))
        if not switch.notify(network.path):  # a running switch rescans now; else start one
            switch.ensure_running(network.path)

    def unregister(self, name: str, machine: str, nic: int) -> None:
        from . import switch

        path = self.files(name).dir
        if not path.is_dir():
            return
        switch.remove_port(path, port_id(machine, nic))
        switch.notify(path)

    async def _change_lab(self, name: str, change: Callable[[dict[str, Any]], None]
                          ) -> Network:
        """Rewrite network.json with ``change`` applied (under the network's lock), then
        have its switch read it (at once, if it runs)."""
        from . import switch

        files = self.files(name)
        async with self.store.alocked(("network", name)):
            self.get(name)  # it exists and is readable
            meta = read_record(files.meta, "")
            change(meta)
            Lab.from_meta(meta)  # what is written must read back
            write_json(files.meta, meta)
        switch.notify(files.dir)
        return self.get(name)

    async def set(self, name: str, impair: dict[str, Any] | None = None, *,
                  machine: str | None = None, clear: bool = False,
                  seed: int | None = None) -> Network:
        """Change impairments while the network runs: ``impair`` (Impairment fields) over
        the network's (or, with ``machine``, over that machine's link; its other fields
        stay the network's). ``clear``: start from none (the network's, or the
        machine's own). ``seed``: a new seed for the random streams."""
        given = dict(impair or {})  # (checked merged, before anything is written)
        if machine is not None:
            validate_name("machine", machine)

        def change(meta: dict[str, Any]) -> None:
            if machine is None:
                base = {} if clear else dict(meta.get("impair") or {})
                meta["impair"] = Impairment.from_dict({**base, **given}).to_dict()
            else:
                links = dict(meta.get("links") or {})
                base = {} if clear else dict(links.get(machine) or {})
                mine = {**base, **given}
                if mine:
                    links[machine] = mine
                else:
                    links.pop(machine, None)
                meta["links"] = links
            if seed is not None:
                meta["seed"] = _seed(seed)

        return await self._change_lab(name, change)

    async def partition(self, name: str, groups: builtins.list[builtins.list[str]], *,
                        oneway: bool = False) -> Network:
        """Split the network: machines in different ``groups`` stop reaching each other
        (``oneway``: only frames from the first group to the second are dropped).
        Machines in no group reach everyone."""
        groups = [[validate_name("machine", m) for m in g] for g in groups]
        if len(groups) < 2 or any(not g for g in groups):
            raise ConfigError("partition", " ".join(",".join(g) for g in groups),
                              "give two or more groups of machines, e.g. a,b c,d")
        seen = [m for g in groups for m in g]
        if len(seen) != len(set(seen)):
            raise ConfigError("partition", " ".join(",".join(g) for g in groups),
                              "a machine can be in one group only")
        if oneway and len(groups) != 2:
            raise ConfigError("partition", "one way", "give exactly two groups: FROM TO")

        def change(meta: dict[str, Any]) -> None:
            meta["partition"] = {"groups": groups, "oneway": oneway}

        return await self._change_lab(name, change)

    @contextlib.asynccontextmanager
    async def capture(self, name: str, path: str | os.PathLike[str]) -> AsyncIterator[Path]:
        """Write every frame that crosses network ``name`` into the pcap file ``path``
        (replaced, if it exists) while the block runs; tcpdump and Wireshark read it.
        Frames are caught as they arrive at the switch, before any impairment or
        partition. If this process dies first, the switch ends the capture itself."""
        from . import switch

        network = self.get(name)
        files = self.files(name)
        target = Path(path).absolute()
        if target.is_dir() or not target.parent.is_dir():
            raise ConfigError("capture file", str(path), "give a file in a folder that exists")
        cap_id = f"c{os.getpid()}-{secrets.token_hex(3)}"
        request = files.captures_dir / f"{cap_id}.json"
        try:
            files.captures_dir.mkdir(exist_ok=True)
            write_json(request, {"path": str(target), "owner": this_process()})
        except OSError as exc:
            raise store_error(exc, "asking for a capture") from None
        try:
            await asyncio.to_thread(switch.ensure_running, network.path)
            await asyncio.to_thread(switch.notify, network.path)
            await asyncio.to_thread(switch.await_capture, network.path, cap_id, True)
            yield target
        finally:
            request.unlink(missing_ok=True)
            if await asyncio.to_thread(switch.notify, network.path):
                await asyncio.to_thread(switch.await_capture, network.path, cap_id, False)

    async def heal(self, name: str) -> Network:
        """End the network's partition."""
        return await self._change_lab(name, lambda meta: meta.pop("partition", None))

    def keep(self, name: str) -> None:
        """Make a network made ``ephemeral`` an ordinary one, which ``gc`` leaves alone."""
        drop_owner(self.files(name))

    async def remove(self, name: str) -> None:
        """Stop the network's switch and remove it; refused while machines are on it."""
        from . import switch

        path = self.files(name).dir
        async with self.store.alocked(("network", name)):
            if not path.is_dir():
                raise NotFoundError("network", name, "see 'pinnace network ls'")
            users = tuple(self.members(name))
            if users:
                raise NetworkInUse(name, users)
            await asyncio.to_thread(switch.stop, path)
            await asyncio.to_thread(self.store.remove_tree, path)


__all__ = ["AsyncNetworks", "Network", "check_subnet", "free_subnet"]
