"""Validated machine configuration: built-in defaults, then the caller's options.

The fully resolved config is written into the machine's directory as plain JSON.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import ConfigError
from .store import NAME_HINT, NAME_RE

Accel = Literal["auto", "kvm", "tcg"]

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


class MachineConfig(BaseModel):
    """Everything needed to run one machine; saved as config.json in its directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    image: str = "default"
    image_digest: str = ""
    cpus: int = 1
    memory_mib: int = 512
    cmdline: str = ""
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    accel: Accel = "auto"
    snapshot: str = ""  # the snapshot its disk and RAM come from (a path under the store)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(NAME_HINT)
        return v

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: int) -> int:
        if not 1 <= v <= MAX_CPUS:
            raise ValueError(f"give between 1 and {MAX_CPUS} CPUs")
        return v

    @field_validator("memory_mib")
    @classmethod
    def _memory(cls, v: int) -> int:
        host_mib = host_memory_bytes() >> 20
        if v < MIN_MEMORY_MIB:
            raise ValueError(f"a guest needs at least {MIN_MEMORY_MIB}M")
        if v > host_mib:
            raise ValueError(f"the host has only {host_mib}M of memory")
        return v

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        if "\n" in v or "\x00" in v:
            raise ValueError("the kernel command line must be one line")
        if len(v) > 1024:
            raise ValueError("the extra kernel command line is limited to 1024 characters")
        return v

    @field_validator("boot_timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if not 0 < v <= 3600:
            raise ValueError("give a boot timeout between 0 and 3600 seconds")
        return v

    @classmethod
    def build(cls, **values: Any) -> MachineConfig:
        """Validate ``values`` into a config, turning pydantic's errors into one ConfigError."""
        if "memory" in values:
            memory = values.pop("memory")
            if memory is not None:
                values["memory_mib"] = parse_size(memory, "memory") >> 20
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise _config_error(exc, values) from None

    def with_changes(self, **values: Any) -> MachineConfig:
        """A copy with ``values`` changed, validated like a new config."""
        merged = self.model_dump()
        merged.update({k: v for k, v in values.items() if v is not None})
        return MachineConfig.build(**merged)


def _config_error(exc: ValidationError, values: dict[str, Any]) -> ConfigError:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown option"
    shown = "memory" if field == "memory_mib" else field
    value = values.get(field, err.get("input"))
    if field == "memory_mib" and "memory" not in values and isinstance(value, int):
        value = f"{value}M"
    return ConfigError(shown, value, msg)
