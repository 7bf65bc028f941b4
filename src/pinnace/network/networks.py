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
import json
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
    MachineError,
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
from .router import RouterSpec, mac_for, out_path

# The simulated internet: one network, made when first needed, never the host's own.
# Its .1 is its gateway and services (DNS, STUN, echo), .2 STUN's other address; .1-.9
# are kept for such services, and machines and NAT routers get addresses from .10.
INTERNET = "internet"
INTERNET_SUBNET = "203.0.113.0/24"  # TEST-NET-3 (RFC 5737): never a real host's
INTERNET_RESERVED = 10


@dataclass(frozen=True)
class Network:
    name: str
    path: Path
    subnet: str
    created: float
    lab: Lab = field(default_factory=Lab)  # impairments, partition, seed
    router: RouterSpec | None = None  # a NAT (or a plain router) to an upstream network
    internet: bool = False  # the simulated internet

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    @property
    def gateway(self) -> str | None:
        """Where its machines send what is not on the network: its router, or on the
        internet its core (both the subnet's .1); None on a network with neither."""
        if self.router is None and not self.internet:
            return None
        return str(ipaddress.IPv4Network(self.subnet).network_address + 1)

    @property
    def nameservers(self) -> list[str]:
        """The internet's DNS, for machines that can reach it."""
        if self.gateway is None:
            return []
        return [str(ipaddress.IPv4Network(INTERNET_SUBNET).network_address + 1)]

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
                if lab.groups else None, "seed": lab.seed,
                "router": self.router.to_dict() if self.router else None,
                "internet": self.internet}


STUN = str(ipaddress.IPv4Network(INTERNET_SUBNET).network_address + 1)  # and DNS, echo
_PROBE = "/tmp/pinnace-natprobe.py"


async def _probe(machine: Any, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run :mod:`.natprobe` (copied in) in ``machine``; its JSON object (from the guest:
    size-capped, and its fields are checked by whoever reads them)."""
    from . import natprobe

    await machine.files.put(natprobe.__file__, _PROBE)
    r = await machine.exec(["python3", _PROBE, *args], timeout=timeout)
    try:
        data = json.loads(r.stdout[:65536].decode("utf-8", "replace"))
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        tail = r.stderr[-2000:].decode("utf-8", "replace").strip().splitlines()[-1:]
        raise MachineError(machine.name, f"the NAT probe gave no result "
                           f"({(tail or ['no output'])[0][:200]!r}); is python3 in its "
                           "image?") from None
    if data.get("error"):
        raise MachineError(machine.name, f"the NAT probe failed: {str(data['error'])[:200]}")
    return data


def _endpoint(machine: str, text: object) -> str:
    """An "address:port" the guest reported, checked."""
    try:
        host, _, port = str(text).rpartition(":")
        ipaddress.IPv4Address(host)
        if not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise MachineError(machine, f"the NAT probe reported {str(text)[:64]!r}, not an "
                           "address and port") from None
    return f"{host}:{int(port)}"


@dataclass(frozen=True)
class Punch:
    """What a hole punch between two machines did: each one's public address, and
    whether each heard the other."""

    a: str
    b: str
    a_public: str
    b_public: str
    a_heard: bool
    b_heard: bool

    @property
    def ok(self) -> bool:
        """A direct path, both ways."""
        return self.a_heard and self.b_heard

    def describe(self) -> str:
        ends = f"{self.a} ({self.a_public}) <-> {self.b} ({self.b_public})"
        if self.ok:
            return f"{ends}: a direct UDP path opened, both ways"
        if self.a_heard or self.b_heard:
            heard, deaf = (self.a, self.b) if self.a_heard else (self.b, self.a)
            return f"{ends}: one way only: {heard} heard {deaf}, not the other way"
        return f"{ends}: no direct path (neither heard the other)"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


_BEHAVIOURS = {"eim": "endpoint-independent", "adm": "address-dependent",
               "apdm": "address-and-port-dependent", "eif": "endpoint-independent",
               "adf": "address-dependent", "apdf": "address-and-port-dependent"}


@dataclass(frozen=True)
class NetCheck:
    """The NAT a machine sits behind, as seen from inside (RFC 5780): its public
    address and port for a local one, the mapping and filtering behaviours (eim/adm/
    apdm, eif/adf/apdf; None if a test could not tell), port preservation, hairpinning."""

    machine: str
    local: str
    mapped: str
    nat: bool
    mapping: str | None
    filtering: str | None
    preserves_port: bool
    hairpin: bool

    @classmethod
    def from_probe(cls, machine: str, data: dict[str, Any]) -> NetCheck:
        """Read natprobe's classification (from the guest: nothing in it is trusted)."""
        words = [data.get(k) for k in ("mapping", "filtering")]
        if any(w is not None and w not in _BEHAVIOURS for w in words):
            raise MachineError(machine, f"the NAT probe reported {words!r}, not behaviours")
        return cls(machine, _endpoint(machine, data.get("local")),
                   _endpoint(machine, data.get("mapped")), data.get("nat") is True,
                   words[0], words[1], data.get("preserves_port") is True,
                   data.get("hairpin") is True)

    def describe(self) -> list[str]:
        """Lines for people."""
        if not self.nat:
            return [f"{self.machine}: no NAT: {self.local} is what the internet sees"]
        return [f"{self.machine}: behind a NAT: {self.local} is {self.mapped} outside",
                f"  mapping:        {_BEHAVIOURS.get(self.mapping or '', 'unknown')}",
                f"  filtering:      {_BEHAVIOURS.get(self.filtering or '', 'unknown')}",
                f"  port preserved: {'yes' if self.preserves_port else 'no'}",
                f"  hairpinning:    {self._hairpin()}"]

    def _hairpin(self) -> str:
        if self.hairpin:
            return "yes"
        if self.mapping in ("adm", "apdm"):  # the probe's way back needs another mapping
            return "not seen (its mapping depends on the destination, so it cannot be told)"
        return "no"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# The subnet of every machine's NAT NIC (QEMU's user-mode network).
NAT_SUBNET = ipaddress.IPv4Network("10.0.2.0/24")


def check_subnet(subnet: str, *, public: bool = False) -> str:
    """``subnet`` as a network's subnet, or ConfigError. ``public``: the internet's
    (a documentation range) is one too."""
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
    if net.overlaps(ipaddress.IPv4Network(INTERNET_SUBNET)) and not (
            public and str(net) == INTERNET_SUBNET):
        raise ConfigError("subnet", subnet, f"it overlaps {INTERNET_SUBNET}, the simulated "
                          "internet's; choose another")
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


def host_port(files: NetworkFiles, nic: str, label: str, mac: bytes, ip: str,
              routes: tuple[str, ...] = ()) -> Any:
    """The port of a simulated host's NIC ("lan", "wan", "core") of network ``files``."""
    from .switch import PortSpec

    sock = str(files.host_sock(nic))
    return PortSpec(peer=str(files.host_peer(nic)), qemu=sock, machine=label, mac=mac.hex(":"),
                    sender=out_path(sock), ip=ip, routes=routes)


def wan_port(network: str) -> str:
    """The port id of a network's router on its upstream network."""
    return f"{network}.wan"


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
            router = meta.get("router")
            return Network(name, files.dir, check_subnet(str(meta["subnet"]), public=True),
                           float(meta["created"]), Lab.from_meta(meta),
                           RouterSpec.from_dict(router) if router is not None else None,
                           meta.get("internet") is True)
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
                     seed: int | None = None, nat: str | None = None,
                     nat_options: dict[str, Any] | None = None, wan_ip: str | None = None,
                     upstream: str = INTERNET) -> Network:
        """Make network ``name`` with ``subnet`` ("10.77.0.0/24"), or the first free /24
        of 10.100.0.0/16 if none is given. ``ephemeral``: it belongs to this process
        (a test session), and ``gc`` removes it once the process is gone (see
        :class:`pinnace.store.Owned`). ``impair``: Impairment fields for every link
        (``{"delay": 0.05, "loss": 0.01}``; see :mod:`.impair`); ``seed``: repeat a run's
        random losses and delays exactly.

        ``nat``: put the network behind a router (its subnet's .1, the machines' default
        route) with this NAT preset (see :data:`.nat.PRESETS`; "none" routes without
        translating), ``nat_options`` overriding its fields (mapping, filtering, hairpin,
        timeout, port_preserve). Its outside is ``wan_ip`` (default: the next free
        address) on ``upstream``: the simulated internet (made now if need be), or
        another network behind a NAT (a carrier-grade NAT)."""
        from .nat import preset

        validate_name("network", name)
        if name == INTERNET:
            raise ConfigError("network name", name, "the simulated internet is made when "
                              "first needed (a NAT, or a machine with --network internet)")
        if subnet is not None:
            subnet = check_subnet(subnet)
        lab = {"impair": Impairment.from_dict(impair or {}).to_dict(), "seed": _seed(seed)}
        config = None
        if nat is not None:
            config = preset(nat, **(nat_options or {}))
            validate_name("network", upstream)
            if upstream == name:
                raise ConfigError("upstream network", upstream, "give another network")
            if upstream == INTERNET:
                await self.ensure_internet()
            up = self.get(upstream)
            if up.gateway is None:
                raise ConfigError("upstream network", upstream, "it is neither the internet "
                                  "nor behind a NAT, so it leads nowhere; give one that is")
            if not config.translate and not up.internet:
                raise ConfigError("NAT", "none", "a routed network (no translation) can sit "
                                  "on the internet only, which routes its subnet to it")
        elif nat_options or wan_ip:
            raise ConfigError("NAT", "options without --nat", "give --nat PRESET as well")
        await self._make(name, subnet, ephemeral=ephemeral, meta=lab, config=config,
                         wan_ip=wan_ip, upstream=upstream, preset_name=nat)
        return self.get(name)

    async def named(self, name: str) -> Network:
        """Network ``name`` (NotFoundError if there is none), the internet made if need be."""
        if name == INTERNET:
            return await self.ensure_internet()
        return self.get(name)

    async def ensure_internet(self) -> Network:
        """The simulated internet, made if it does not exist yet (with its switch, so
        its core answers)."""
        from . import switch

        try:
            net = self.get(INTERNET)
        except NotFoundError:
            try:
                await self._make(INTERNET, INTERNET_SUBNET, meta={"internet": True})
            except AlreadyExistsError:
                pass  # made by another command meanwhile
            net = self.get(INTERNET)
        if not net.internet:
            raise ConfigError("network", INTERNET, "a network of that name exists and is not "
                              "pinnace's simulated internet; rename or remove it")
        await asyncio.to_thread(switch.ensure_running, net.path)
        return net

    async def _make(self, name: str, subnet: str | None, *, ephemeral: bool = False,
                    meta: dict[str, Any], config: Any = None, wan_ip: str | None = None,
                    upstream: str = INTERNET, preset_name: str | None = None) -> None:
        from . import switch

        store = self.store
        store.ensure()
        internet = meta.get("internet") is True
        files = self.files(name)
        # The address plan is checked and extended by one command at a time: two networks
        # made at once (pytest-xdist workers, say) never get overlapping subnets.
        locks = [("network", name), ("subnets", "all")]
        if config is not None:
            locks.append(("network", upstream))
        async with store.alocked(*locks):
            if files.dir.exists():
                raise AlreadyExistsError("network", name)
            others = self.list()
            if subnet is None:
                subnet = free_subnet([o.subnet for o in others])
            net = ipaddress.IPv4Network(subnet)
            translated = config is not None and config.translate
            chain = self.chain(upstream) if config is not None else []
            for other in chain:  # its own upstreams: their addresses must stay reachable
                if ipaddress.IPv4Network(other.subnet).overlaps(net):
                    raise ConfigError("subnet", subnet, f"it overlaps {other.name!r} "
                                      f"({other.subnet}), which it sits behind; choose another")
            for other in others:
                # Networks behind NATs may share a subnet, as homes do; none other may.
                if ipaddress.IPv4Network(other.subnet).overlaps(net) and not (
                        translated and other.router is not None and other.router.nat.translate):
                    raise ConfigError("subnet", subnet, f"it overlaps network {other.name!r} "
                                      f"({other.subnet}); choose another")
            record: dict[str, Any] = {"name": name, "subnet": subnet, "created": time.time(),
                                      **meta}
            router = None
            if config is not None:
                up = self.get(upstream)
                wan = self.allocate(upstream, wan_ip, set()).split("/")[0]
                router = RouterSpec(config, preset_name or "custom", upstream, wan,
                                    up.subnet, up.gateway)
                record["router"] = router.to_dict()
            with store.staging_dir("network-") as stage:
                staged = NetworkFiles(stage)
                write_json(staged.meta, record)
                if ephemeral:
                    write_atomic(staged.owner, this_process() + "\n")
                try:
                    staged.ports_dir.mkdir()
                except OSError as exc:
                    raise store_error(exc, "making the network") from None
                first = str(net.network_address + 1)
                if router is not None:  # the router's inside port, on this network
                    switch.write_port(stage, "router", host_port(files, "lan", "router",
                                                                 mac_for(name, "lan"), first))
                if internet:
                    switch.write_port(stage, "core", host_port(
                        files, "core", INTERNET, mac_for(INTERNET, "core"), first))
                try:
                    store.put_in_place(stage, files.dir, "the network")
                except FileExistsError:
                    raise AlreadyExistsError("network", name) from None
            if router is not None:
                self._plug_router(name, router)
        if router is not None:
            await asyncio.to_thread(switch.ensure_running, files.dir)

    def _plug_router(self, name: str, router: RouterSpec) -> None:
        """Write (again: it is idempotent) the router's outside port on its upstream
        network, and have that switch bind it."""
        from . import switch

        files = self.files(name)
        up = self.files(router.upstream)
        routes = () if router.nat.translate else (self.get(name).subnet,)
        try:
            switch.write_port(up.dir, wan_port(name), host_port(
                files, "wan", name, mac_for(name, "wan"), router.wan_ip, routes))
        except FileNotFoundError:
            raise NotFoundError("network", router.upstream, f"network {name!r} sits behind "
                                "it; remove that and make it again") from None
        if not switch.notify(up.dir):
            switch.ensure_running(up.dir)

    def chain(self, name: str) -> builtins.list[Network]:
        """Network ``name`` and the networks its routers lead to, up to the internet."""
        out: builtins.list[Network] = []
        while len(out) < 16 and name not in [n.name for n in out]:
            try:
                net = self.get(name)
            except PinnaceError:
                break
            out.append(net)
            if net.router is None:
                break
            name = net.router.upstream
        return out

    def check_joins(self, name: str, others: builtins.list[str]) -> None:
        """ConfigError if a machine on networks ``others`` cannot also join ``name``:
        their subnets overlap (NAT'd networks may share one; a machine cannot be on two)."""
        net = ipaddress.IPv4Network(self.get(name).subnet)
        for other in others:
            if other != name and ipaddress.IPv4Network(self.get(other).subnet).overlaps(net):
                raise ConfigError("network", name, f"its subnet overlaps that of {other!r}, "
                                  "which the machine is on too; a machine's networks must "
                                  "not overlap")

    def depth(self, name: str) -> int:
        """How many routers lie between network ``name`` and the internet (0 for a
        network without one): networks behind others are removed first."""
        return sum(1 for n in self.chain(name) if n.router is not None)

    def stale_ports(self) -> builtins.list[tuple[str, str]]:
        """(network, port id) of router ports on a network whose router is gone (its
        network removed by hand, say): gc removes them."""
        out = []
        for net in self.list():
            for entry in sorted(net.path.joinpath("ports").glob("*.wan.json")):
                owner = entry.name.removesuffix(".wan.json")
                try:
                    router = self.get(owner).router
                except PinnaceError:
                    router = None
                if router is None or router.upstream != net.name:
                    out.append((net.name, wan_port(owner)))
        return out

    def remove_port(self, name: str, port: str) -> None:
        """Unplug port ``port`` from network ``name``'s switch."""
        from . import switch

        switch.remove_port(self.files(name).dir, port)
        switch.notify(self.files(name).dir)

    async def retire_internet(self, *, dry_run: bool = False) -> bool:
        """Remove the simulated internet if no machine is on it and no network behind it
        (the next that needs it makes it again); True if it went (or, in a dry run,
        would go)."""
        try:
            net = self.get(INTERNET)
        except PinnaceError:
            return False
        if not net.internet or self.members(INTERNET) or self.routers(INTERNET):
            return False
        if dry_run:
            return True
        try:
            await self.remove(INTERNET)
        except PinnaceError:
            return False  # (something joined it meanwhile)
        return True

    def routers(self, upstream: str) -> dict[str, str]:
        """Network -> its router's outside address, for the networks behind a router on
        ``upstream``."""
        return {n.name: n.router.wan_ip for n in self.list()
                if n.router is not None and n.router.upstream == upstream}

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
        used |= set(self.routers(name).values())
        # Kept: a router's or the internet core's own .1, and the internet's services.
        kept = INTERNET_RESERVED if network.internet else 2 if network.gateway else 0
        if want is not None:
            try:
                addr = ipaddress.IPv4Address(want.split("/")[0])
            except ValueError:
                raise ConfigError("network address", want, "give an IPv4 address") from None
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise ConfigError("network address", want, f"it is not a host address of "
                                  f"{name!r} ({network.subnet})")
            if int(addr) - int(net.network_address) < kept:
                raise ConfigError("network address", want, f"the first {kept - 1} addresses "
                                  f"of {name!r} are its router's or services'; choose another")
            if str(addr) in used:
                raise ConfigError("network address", want, f"another machine on {name!r} has "
                                  "it; choose another or leave it out")
            return f"{addr}/{net.prefixlen}"
        for addr in net.hosts():
            if int(addr) - int(net.network_address) >= max(kept, 2) and str(addr) not in used:
                return f"{addr}/{net.prefixlen}"
        raise ConfigError("network", name, f"its subnet {network.subnet} has no free address")

    def register(self, name: str, machine: str, files: MachineFiles, nic: int, mac: str,
                 ip: str = "") -> None:
        """Plug a machine's NIC into the network's switch (started if it is not running)."""
        from . import switch

        network = self.get(name)
        # QEMU, working in the machine's folder, binds its end relative to it (see
        # backends.qemu.command): that name is what its frames carry.
        sock = files.nic_sock(nic)
        switch.write_port(network.path, port_id(machine, nic), switch.PortSpec(
            peer=str(files.nic_peer(nic)), qemu=str(sock), machine=machine, mac=mac,
            sender=files.cwd_path(sock), ip=ip.split("/")[0]))
        for net in self.chain(name):  # each router on the way out, plugged in and running
            if net.router is not None:  # (a create killed half-way may have left it out)
                self._plug_router(net.name, net.router)
                if net.name != name:
                    switch.ensure_running(net.path)
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
    async def capture(self, name: str, path: str | os.PathLike[str], *,
                      side: str = "lan") -> AsyncIterator[Path]:
        """Write every frame that crosses network ``name`` into the pcap file ``path``
        (replaced, if it exists) while the block runs; tcpdump and Wireshark read it.
        Frames are caught as they arrive at the switch, before any impairment or
        partition. If this process dies first, the switch ends the capture itself.
        ``side="wan"``: what crosses the outside of the network's router instead (on its
        upstream network: the packets as translated)."""
        from . import switch

        only = ""
        if side == "wan":
            router = self.get(name).router
            if router is None:
                raise ConfigError("capture side", side, f"network {name!r} has no router; "
                                  "capture its own side (lan)")
            only, name = wan_port(name), router.upstream
        elif side != "lan":
            raise ConfigError("capture side", side, "give lan or wan")
        network = self.get(name)
        files = self.files(name)
        target = Path(path).absolute()
        if target.is_dir() or not target.parent.is_dir():
            raise ConfigError("capture file", str(path), "give a file in a folder that exists")
        cap_id = f"c{os.getpid()}-{secrets.token_hex(3)}"
        request = files.captures_dir / f"{cap_id}.json"
        try:
            files.captures_dir.mkdir(exist_ok=True)
            write_json(request, {"path": str(target), "owner": this_process(), "port": only})
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

    async def netcheck(self, machine: Any, *, timeout: float = 120.0) -> NetCheck:
        """What lies between ``machine`` (an AsyncMachine on some network) and the
        internet: RFC 5780's behaviour discovery against the internet's STUN server, run
        in the machine by :mod:`.natprobe` (copied into it; it needs python3)."""
        return NetCheck.from_probe(machine.name, await _probe(machine, "classify", STUN,
                                                              timeout=timeout))

    async def punch(self, a: Any, b: Any, *, port: int = 4000,
                    duration: float = 6.0) -> Punch:
        """Try UDP hole punching between machines ``a`` and ``b`` (AsyncMachines, each
        behind a NAT or on the internet), as peer-to-peer software does: each learns its
        public address for ``port`` from STUN, is told the other's, and both send to
        each other at once for ``duration`` seconds."""
        if not 1 <= port <= 65535 or not 0 < duration <= 600:
            raise ConfigError("hole punch", f"port {port}, {duration} s",
                              "give a port 1-65535 and 0-600 seconds")
        mine = [await _probe(m, "mapped", STUN, "--local-port", str(port)) for m in (a, b)]
        public = [_endpoint(m.name, r.get("mapped")) for m, r in zip((a, b), mine, strict=True)]
        got = await asyncio.gather(*(
            _probe(m, "punch", "--local-port", str(port), "--peer", peer, "--duration",
                   str(duration), timeout=duration + 60)
            for m, peer in ((a, public[1]), (b, public[0]))))
        return Punch(a.name, b.name, public[0], public[1], got[0].get("ok") is True,
                     got[1].get("ok") is True)

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
            behind = tuple(self.routers(name))
            if behind:
                raise NetworkInUse(name, behind, what="network", fix=f"remove "
                                   f"{'it' if len(behind) == 1 else 'them'} first")
            with contextlib.suppress(PinnaceError, OSError):
                router = self.get(name).router
                if router is not None:  # its outside port goes first: nothing binds it again
                    up = self.files(router.upstream).dir
                    switch.remove_port(up, wan_port(name))
                    switch.notify(up)
            await asyncio.to_thread(switch.stop, path)
            await asyncio.to_thread(self.store.remove_tree, path)


__all__ = ["AsyncNetworks", "Network", "check_subnet", "free_subnet"]
