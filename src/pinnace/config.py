"""Validated machine configuration: built-in defaults, then the caller's options.

The fully resolved config is written into the machine's directory as plain JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import ConfigError
from .store import NAME_HINT, NAME_RE

Accel = Literal["auto", "kvm", "tcg"]
ACCELS = ("auto", "kvm", "tcg")

MIN_MEMORY_MIB = 128
MAX_CPUS = 64
# Under TCG a cold boot takes a few seconds; on a busy CI host it can take much longer.
DEFAULT_BOOT_TIMEOUT = 90.0

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int, field: str = "size", *, default_unit: str = "m") -> int:
    """Parse '512M', '2G', '1.5GiB' or a bare number (in ``default_unit``) into bytes."""
    if isinstance(value, bool):
        raise ConfigError(field, value, "give a size such as 512M or 2G")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(field, value, "the size must be positive")
        return value * _UNITS[default_unit]
    m = _SIZE_RE.match(str(value)) if len(str(value)) <= 32 else None
    if not m:
        raise ConfigError(field, value, "give a size such as 512M or 2G (units K, M, G, T)")
    number, unit = float(m.group(1)), m.group(2).lower()
    scale = _UNITS[unit] if unit else _UNITS[default_unit]
    if number * scale >= 1 << 62:
        raise ConfigError(field, value, "that size is far too large")
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(field, value, "the size must be positive")
    return size


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_size(n: int) -> str:
    """1073741824 -> '1G', 454197248 -> '433.2M'."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n // scale}{unit}" if n % scale == 0 else f"{n / scale:.1f}{unit}"
    return f"{n}B"


# --- networking and storage options ------------------------------------------------------

NET_MODES = ("nat", "restricted", "none")
DEFAULT_NET_ENV = "PINNACE_DEFAULT_NET"
# Where QEMU's user-mode NAT puts the guest: its address, gateway and name server.
NAT_GUEST, NAT_GATEWAY, NAT_DNS = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"


def default_net() -> str:
    """The --net of a machine on no virtual network: nat, unless $PINNACE_DEFAULT_NET says
    otherwise (tests set it to restricted so that no guest has a way off the host)."""
    mode = os.environ.get(DEFAULT_NET_ENV) or "nat"
    if mode not in NET_MODES:
        raise ConfigError(DEFAULT_NET_ENV, mode, f"choose one of {', '.join(NET_MODES)}")
    return mode


def random_mac() -> str:
    """A MAC in QEMU's range (52:54:00), random in the last three bytes."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _mac(field: str, v: str) -> str:
    if not _MAC_RE.match(v) or int(v[:2], 16) & 1:
        raise ConfigError(field, v, "give a unicast MAC address such as 52:54:00:12:34:56")
    return v


def guest_path(field: str, v: str) -> str:
    """A normalised absolute guest path that is not part of the guest's system."""
    import posixpath

    if not v.startswith("/") or posixpath.normpath(v) != v or "\x00" in v or "\n" in v:
        raise ConfigError(field, v, "give a normalised absolute path in the guest, e.g. /data")
    from .agent.protocol import protected_path

    if protected_path(v):
        raise ConfigError(field, v, "that path belongs to the guest's system; choose another")
    return v


_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class PortForward:
    """A host port forwarded to a guest port through the machine's NAT NIC."""

    host_port: int
    guest_port: int
    proto: str = "tcp"
    host_ip: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("host_port", "guest_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise ConfigError("port", v, "ports are 1-65535")
        if self.proto not in ("tcp", "udp"):
            raise ConfigError("port", self.proto, "the protocol is tcp or udp")
        import ipaddress

        try:
            ipaddress.IPv4Address(self.host_ip)
        except ValueError:
            raise ConfigError("port", self.host_ip, "give an IPv4 address of this host "
                              "(default 127.0.0.1)") from None

    @classmethod
    def parse(cls, spec: str) -> PortForward:
        """``[HOST_IP:]HOST_PORT:GUEST_PORT[/udp]``."""
        text, _, proto = spec.partition("/")
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(_PORT_RE.fullmatch(p) for p in parts[-2:]):
            raise ConfigError("port", spec, "give [HOST_IP:]HOST_PORT:GUEST_PORT[/udp], "
                              "e.g. 8080:80")
        host_ip = parts[0] if len(parts) == 3 else "127.0.0.1"
        return cls(int(parts[-2]), int(parts[-1]), proto or "tcp", host_ip)

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.proto}"


@dataclass(frozen=True)
class Mount:
    """A volume (``source`` is its name) or a shared host folder (``source`` is its
    absolute path) at ``path`` in the guest."""

    source: str
    path: str
    ro: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError("mount", self.source, "name a volume or a host folder")
        guest_path("mount", self.path)
        if not isinstance(self.ro, bool):
            raise ConfigError("mount", self.ro, "ro is true or false")

    @classmethod
    def parse(cls, spec: str, kind: str) -> Mount:
        """``SOURCE:/guest/path[:ro]``; a share's SOURCE is a host folder, resolved once."""
        text, ro = spec, False
        if text.endswith((":ro", ":rw")):
            text, ro = text[:-3], text.endswith(":ro")
        source, sep, path = text.rpartition(":")
        if not sep or not source:
            raise ConfigError(kind, spec, f"give {'HOST_DIR' if kind == 'share' else 'NAME'}:"
                              "/guest/path[:ro]")
        if kind == "share":
            from pathlib import Path

            try:
                host = Path(source).expanduser()
                if not host.is_dir():
                    raise ConfigError("share", source, "the host folder does not exist (or is "
                                      "not a folder); create it first")
                source = str(host.resolve())
            except (OSError, RuntimeError) as exc:  # a name too long, an unknown ~user
                raise ConfigError("share", source, f"the host folder cannot be used ({exc})"
                                  ) from None
        else:
            if not NAME_RE.match(source):
                raise ConfigError("volume", source, NAME_HINT)
        return cls(source, path, ro)

    def __str__(self) -> str:
        return f"{self.source}:{self.path}{':ro' if self.ro else ''}"


@dataclass(frozen=True)
class Nic:
    """A NIC on a pinnace virtual network; ``network`` empty means a spare NIC,
    disconnected until 'pinnace network connect'."""

    mac: str
    network: str = ""
    ip: str = ""  # with its prefix: 10.77.0.5/24

    def __post_init__(self) -> None:
        _mac("nic", self.mac)
        if self.network and not NAME_RE.match(self.network):
            raise ConfigError("network", self.network, NAME_HINT)
        if self.ip:
            import ipaddress

            try:
                ipaddress.IPv4Interface(self.ip)
            except ValueError:
                raise ConfigError("network address", self.ip, "give an IPv4 address with its "
                                  "prefix, e.g. 10.77.0.5/24") from None


@dataclass(frozen=True)
class MachineConfig:
    """Everything needed to run one machine; saved as config.json in its directory.

    Immutable, and checked when made: every field is validated in ``__post_init__``,
    and a bad one raises one ConfigError naming it. Plain dataclasses on purpose: the
    CLI reads a config on every command, and a schema library costs ~100 ms to import.
    """

    name: str
    image: str = "default"
    image_digest: str = ""
    cpus: int = 1
    memory_mib: int = 512
    cmdline: str = ""
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    accel: Accel = "auto"
    snapshot: str = ""  # the snapshot its disk and RAM come from (a path under the store)
    # Networking: the NAT NIC (none, or user-mode NAT with or without a way out), its
    # port forwards, and NICs on pinnace's virtual networks (the first NIC is the NAT one).
    net: str = "none"
    nat_mac: str = ""
    ports: tuple[PortForward, ...] = ()
    nics: tuple[Nic, ...] = ()
    volumes: tuple[Mount, ...] = ()
    shares: tuple[Mount, ...] = ()
    # Made by `run --rm`: deleted when that command ends, or by `pinnace gc` if it died.
    ephemeral: bool = False
    # A warm-pool member waiting to be claimed (the pool's key), hidden from `ls`; a
    # claimed one is an ordinary machine (see pinnace.pool).
    pool: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name)))
        if self.ports and self.net == "none":
            raise ConfigError("port", str(self.ports[0]), "port forwards need a NAT NIC: "
                              "add --net restricted or --net nat")
        seen: set[tuple[str, int, str]] = set()
        for p in self.ports:
            if (p.host_ip, p.host_port, p.proto) in seen:
                raise ConfigError("port", str(p), "that host port is forwarded twice")
            seen.add((p.host_ip, p.host_port, p.proto))
        paths = [m.path for m in (*self.volumes, *self.shares)]
        for path in paths:
            if paths.count(path) > 1 or any(o != path and o.startswith(path + "/") for o in paths):
                raise ConfigError("mount", path, "two volumes or shares at (or inside) one "
                                  "path; give each its own")
        nets = [n.network for n in self.nics if n.network]
        for net in nets:
            if nets.count(net) > 1:
                raise ConfigError("network", net, "a machine joins a network once")

    @classmethod
    def build(cls, **values: Any) -> MachineConfig:
        """A config from options; ``memory`` may be a size ("1G"); None means the default."""
        if "memory" in values:
            memory = values.pop("memory")
            if memory is not None:
                values["memory_mib"] = parse_size(memory, "memory") >> 20
        values = {k: v for k, v in values.items() if v is not None}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(unknown[0], values[unknown[0]], "unknown option")
        if "name" not in values:
            raise ConfigError("name", None, "a machine needs a name")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> MachineConfig:
        """A config from its JSON (config.json); ValueError if that is not a JSON object."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("config.json does not hold a JSON object")
        return cls.build(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_changes(self, **values: Any) -> MachineConfig:
        """A copy with ``values`` changed, validated like a new config."""
        merged = self.to_dict()
        if values.get("memory") is not None:
            merged.pop("memory_mib")
        merged.update({k: v for k, v in values.items() if v is not None})
        return MachineConfig.build(**merged)


def _check(field: str, value: Any) -> Any:
    """``value`` if it is valid for ``field``, else ConfigError."""
    shown = "memory" if field == "memory_mib" else field
    if field in _LISTS:
        return _items(field, value, _LISTS[field])
    spec = _FIELDS[field]
    kind = spec[0]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        shown_value = f"{value}M" if field == "memory_mib" and isinstance(value, int) else value
        raise ConfigError(shown, shown_value, f"must be {spec[1]}")
    problem = spec[2](value)
    if problem:
        raise ConfigError(shown, f"{value}M" if field == "memory_mib" else value, problem)
    return value


def _items(field: str, value: Any, kind: type[Any]) -> tuple[Any, ...]:
    """A tuple of ``kind`` from a list of them or of their JSON objects."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(field, value, "must be a list")
    out = []
    for item in value:
        if isinstance(item, dict):
            try:
                item = kind(**item)
            except TypeError as exc:
                raise ConfigError(field, item, f"is not a valid entry ({exc})") from None
        if not isinstance(item, kind):
            raise ConfigError(field, item, f"must be a list of {kind.__name__} entries")
        out.append(item)
    return tuple(out)


def _name(v: str) -> str:
    return "" if NAME_RE.match(v) else NAME_HINT


def _cpus(v: int) -> str:
    return "" if 1 <= v <= MAX_CPUS else f"give between 1 and {MAX_CPUS} CPUs"


def _memory(v: int) -> str:
    host_mib = host_memory_bytes() >> 20
    if v < MIN_MEMORY_MIB:
        return f"a guest needs at least {MIN_MEMORY_MIB}M"
    if v > host_mib:
        return f"the host has only {host_mib}M of memory"
    return ""


def _cmdline(v: str) -> str:
    if "\n" in v or "\x00" in v:
        return "the kernel command line must be one line"
    if len(v) > 1024:
        return "the extra kernel command line is limited to 1024 characters"
    return ""


def _timeout(v: float) -> str:
    return "" if 0 < v <= 3600 else "give a boot timeout between 0 and 3600 seconds"


def _accel(v: str) -> str:
    return "" if v in ACCELS else f"choose one of {', '.join(ACCELS)}"


def _any(v: object) -> str:
    return ""


# field -> (type, what the type is called in an error, check returning a problem or "")
_FIELDS: dict[str, tuple[type, str, Callable[[Any], str]]] = {
    "name": (str, "a string", _name),
    "image": (str, "a string", _any),
    "image_digest": (str, "a string", _any),
    "cpus": (int, "a whole number", _cpus),
    "memory_mib": (int, "a whole number of MiB", _memory),
    "cmdline": (str, "a string", _cmdline),
    "boot_timeout": (float, "a number of seconds", _timeout),
    "accel": (str, "a string", _accel),
    "snapshot": (str, "a string", _any),
    "ephemeral": (bool, "true or false", _any),
    "pool": (str, "a string", _any),
    "net": (str, "a string", lambda v: "" if v in NET_MODES else
            f"choose one of {', '.join(NET_MODES)}"),
    "nat_mac": (str, "a string", lambda v: "" if not v or (_MAC_RE.match(v) and
                                                          not int(v[:2], 16) & 1)
                else "give a unicast MAC address"),
}
_LISTS: dict[str, type[Any]] = {"ports": PortForward, "nics": Nic, "volumes": Mount,
                                "shares": Mount}
