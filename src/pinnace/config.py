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
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(field, value, "give a size such as 512M or 2G (units K, M, G, T)")
    number, unit = float(m.group(1)), m.group(2).lower()
    scale = _UNITS[unit] if unit else _UNITS[default_unit]
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

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name)))

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
    spec = _FIELDS[field]
    kind = spec[0]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        shown_value = f"{value}M" if field == "memory_mib" and isinstance(value, int) else value
        raise ConfigError(shown, shown_value, f"must be {spec[1]}")
    problem = spec[2](value)
    if problem:
        raise ConfigError(shown, f"{value}M" if field == "memory_mib" else value, problem)
    return value


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
}
