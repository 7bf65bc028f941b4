"""Virtual networks: named L2 segments with a subnet, one supervised switch each.

A network is a directory ``networks/<name>/`` holding ``network.json`` (its subnet)
and the switch's files (see :mod:`.switch`). Machines join with NICs whose QEMU
backend is a ``dgram`` unix socket; pinnace gives each NIC an address from the
subnet (the agent sets it: no DHCP) and registers it with the switch as a port file.
"""

from __future__ import annotations

import builtins
import contextlib
import ipaddress
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AlreadyExistsError, ConfigError, NotFoundError, PinnaceError
from ..store import MachineFiles, read_json, validate_name, write_json

if TYPE_CHECKING:
    from ..client import AsyncPinnace


class NetworkInUse(PinnaceError):
    def __init__(self, name: str, machines: tuple[str, ...]) -> None:
        self.name, self.machines = name, machines
        who = ", ".join(repr(m) for m in machines)
        super().__init__(f"network {name!r}: machine{'s' if len(machines) > 1 else ''} {who} "
                         "joined it; delete them or 'pinnace network disconnect' them first")


@dataclass(frozen=True)
class Network:
    name: str
    path: Path
    subnet: str
    created: float

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "subnet": self.subnet, "created": self.created,
                "path": str(self.path)}


def check_subnet(subnet: str) -> str:
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise ConfigError("subnet", subnet, f"give an IPv4 network such as 10.77.0.0/24 ({exc})"
                          ) from None
    if not 8 <= net.prefixlen <= 29:
        raise ConfigError("subnet", subnet, "give a prefix between /8 and /29")
    return str(net)


def port_id(machine: str, nic: int) -> str:
    return f"{machine}.n{nic}"


class AsyncNetworks:
    """The virtual networks in a store."""

    def __init__(self, pinnace: AsyncPinnace) -> None:
        self._pn = pinnace

    @property
    def dir(self) -> Path:
        return self._pn.store.home / "networks"

    def get(self, name: str) -> Network:
        validate_name("network", name)
        path = self.dir / name
        try:
            meta = read_json(path / "network.json")
            return Network(name, path, check_subnet(str(meta["subnet"])), float(meta["created"]))
        except FileNotFoundError:
            raise NotFoundError("network", name, "see 'pinnace network ls', or create it with "
                                "'pinnace network create NAME --subnet 10.77.0.0/24'") from None
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise ConfigError("network", name, f"its network.json is damaged ({exc}); "
                              "remove it with 'pinnace network rm'") from None

    def list(self) -> builtins.list[Network]:
        out = []
        if self.dir.is_dir():
            for entry in sorted(self.dir.iterdir()):
                with contextlib.suppress(PinnaceError):
                    out.append(self.get(entry.name))
        return out

    async def create(self, name: str, subnet: str) -> Network:
        validate_name("network", name)
        subnet = check_subnet(subnet)
        net = ipaddress.IPv4Network(subnet)
        store = self._pn.store
        store.ensure()
        with store.lock("network", name):
            if (self.dir / name).exists():
                raise AlreadyExistsError("network", name)
            for other in self.list():
                if ipaddress.IPv4Network(other.subnet).overlaps(net):
                    raise ConfigError("subnet", subnet, f"it overlaps network {other.name!r} "
                                      f"({other.subnet}); choose another")
            self.dir.mkdir(parents=True, exist_ok=True)
            with store.staging_dir("network-") as stage:
                write_json(stage / "network.json", {"name": name, "subnet": subnet,
                                                    "created": time.time()})
                (stage / "ports").mkdir()
                os.rename(stage, self.dir / name)
        return self.get(name)

    def members(self, name: str) -> dict[str, builtins.list[tuple[int, str]]]:
        """Machine -> [(NIC index, address)] for every machine with a NIC on ``name``."""
        out: dict[str, builtins.list[tuple[int, str]]] = {}
        d = self._pn.store.machines_dir
        if d.is_dir():
            for entry in sorted(d.iterdir()):
                with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                    nics = read_json(entry / "config.json").get("nics") or []
                    for i, nic in enumerate(nics):
                        if nic.get("network") == name:
                            out.setdefault(entry.name, []).append((i, str(nic.get("ip", ""))))
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
        switch.write_port(network.path, port_id(machine, nic), switch.PortSpec(
            peer=str(files.nic_peer(nic)), qemu=str(files.nic_sock(nic)), machine=machine, mac=mac))
        if not switch.notify(network.path):  # a running switch rescans now; else start one
            switch.ensure_running(network.path)

    def unregister(self, name: str, machine: str, nic: int) -> None:
        from . import switch

        path = self.dir / name
        if not path.is_dir():
            return
        switch.remove_port(path, port_id(machine, nic))
        switch.notify(path)

    async def remove(self, name: str) -> None:
        """Stop the network's switch and remove it; refused while machines are on it."""
        from . import switch

        validate_name("network", name)
        store = self._pn.store
        with store.lock("network", name):
            path = self.dir / name
            if not path.is_dir():
                raise NotFoundError("network", name, "see 'pinnace network ls'")
            users = tuple(self.members(name))
            if users:
                raise NetworkInUse(name, users)
            switch.stop(path)
            store.tmp_dir.mkdir(parents=True, exist_ok=True)
            trash = store.tmp_dir / f"network-{os.getpid()}-{name}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


__all__ = ["AsyncNetworks", "Network", "NetworkInUse", "check_subnet"]
