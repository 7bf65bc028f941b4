"""pinnace: disposable Linux microVMs for testing networked and system software.

>>> from pinnace import Pinnace
>>> pn = Pinnace()
>>> pn.images.build()
>>> vm = pn.machines.create("demo")
>>> vm.start()
>>> vm.exec(["uname", "-a"]).stdout
"""

import logging
from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562), so `pinnace --help` and other CLI verbs
# load only the modules they need.
_WHERE = {
    "ExecResult": "agent.client", "Process": "agent.client",
    "AsyncMachines": "client", "AsyncPinnace": "client", "Machine": "client",
    "Machines": "client", "Pinnace": "client", "SyncProcess": "client",
    "MachineConfig": "config",
    "Image": "images", "ImageInUse": "images",
    "AsyncMachine": "machine", "MachineState": "machine", "MachineStatus": "machine",
    "Snapshot": "snapshots",
}
_ERRORS = (
    "AgentDisconnected", "AgentError", "AgentTimeout", "AlreadyExistsError", "BootTimeout",
    "CommandFailed", "ConfigError", "HostError", "ImageBuildError", "LaunchError", "LockTimeout",
    "MachineCrashed", "MachineError", "NotFoundError", "PinnaceError", "ProtocolError",
    "RemoteError", "SnapshotError", "StateError", "UnsafeArchive",
)
_WHERE.update(dict.fromkeys(_ERRORS, "errors"))

if TYPE_CHECKING:
    from .agent.client import ExecResult, Process
    from .client import AsyncMachines, AsyncPinnace, Machine, Machines, Pinnace, SyncProcess
    from .config import MachineConfig
    from .errors import (
        AgentDisconnected,
        AgentError,
        AgentTimeout,
        AlreadyExistsError,
        BootTimeout,
        CommandFailed,
        ConfigError,
        HostError,
        ImageBuildError,
        LaunchError,
        LockTimeout,
        MachineCrashed,
        MachineError,
        NotFoundError,
        PinnaceError,
        ProtocolError,
        RemoteError,
        SnapshotError,
        StateError,
        UnsafeArchive,
    )
    from .images import Image, ImageInUse
    from .machine import AsyncMachine, MachineState, MachineStatus
    from .snapshots import Snapshot


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'pinnace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AgentDisconnected",
    "AgentError",
    "AgentTimeout",
    "AlreadyExistsError",
    "AsyncMachine",
    "AsyncMachines",
    "AsyncPinnace",
    "BootTimeout",
    "CommandFailed",
    "ConfigError",
    "ExecResult",
    "HostError",
    "Image",
    "ImageBuildError",
    "ImageInUse",
    "LaunchError",
    "LockTimeout",
    "Machine",
    "MachineConfig",
    "MachineCrashed",
    "MachineError",
    "MachineState",
    "MachineStatus",
    "Machines",
    "NotFoundError",
    "Pinnace",
    "PinnaceError",
    "Process",
    "ProtocolError",
    "RemoteError",
    "Snapshot",
    "SnapshotError",
    "StateError",
    "SyncProcess",
    "UnsafeArchive",
    "__version__",
]
