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
    "ExecResult": "agent.client",
    "Process": "agent.client",
    "AsyncPinnace": "client",
    "Machine": "client",
    "Machines": "client",
    "Pinnace": "client",
    "SyncProcess": "client",
    "AsyncMachines": "machines",
    "MachineConfig": "config",
    "Image": "images",
    "AsyncMachine": "machine",
    "MachineState": "machine",
    "MachineStatus": "machine",
    "Snapshot": "snapshots.key",
    "Backend": "backends.base",
}
_ERRORS = (
    "AgentDisconnected",
    "AgentError",
    "AgentTimeout",
    "AlreadyExistsError",
    "BootTimeout",
    "CommandFailed",
    "ConfigError",
    "EnvFileError",
    "ExpressionError",
    "HostError",
    "ImageBuildError",
    "ImageInUse",
    "InUseError",
    "LaunchError",
    "LockTimeout",
    "MachineCrashed",
    "MachineError",
    "MigrationFailed",
    "NetworkInUse",
    "NotFoundError",
    "PinnaceError",
    "ProtocolError",
    "RemoteError",
    "SnapshotError",
    "StateError",
    "StoreError",
    "SwitchError",
    "ToolFailed",
    "TooLargeError",
    "UnsafeArchive",
    "VolumeError",
    "VolumeInUse",
    "WorkflowError",
)
_WHERE.update(dict.fromkeys(_ERRORS, "errors"))

if TYPE_CHECKING:
    from .agent.client import ExecResult, Process
    from .backends.base import Backend
    from .client import AsyncPinnace, Machine, Machines, Pinnace, SyncProcess
    from .config import MachineConfig
    from .errors import (
        AgentDisconnected,
        AgentError,
        AgentTimeout,
        AlreadyExistsError,
        BootTimeout,
        CommandFailed,
        ConfigError,
        EnvFileError,
        ExpressionError,
        HostError,
        ImageBuildError,
        ImageInUse,
        InUseError,
        LaunchError,
        LockTimeout,
        MachineCrashed,
        MachineError,
        MigrationFailed,
        NetworkInUse,
        NotFoundError,
        PinnaceError,
        ProtocolError,
        RemoteError,
        SnapshotError,
        StateError,
        StoreError,
        SwitchError,
        TooLargeError,
        ToolFailed,
        UnsafeArchive,
        VolumeError,
        VolumeInUse,
        WorkflowError,
    )
    from .images import Image
    from .machine import AsyncMachine, MachineState, MachineStatus
    from .machines import AsyncMachines
    from .snapshots.key import Snapshot


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
    "Backend",
    "BootTimeout",
    "CommandFailed",
    "ConfigError",
    "EnvFileError",
    "ExecResult",
    "ExpressionError",
    "HostError",
    "Image",
    "ImageBuildError",
    "ImageInUse",
    "InUseError",
    "LaunchError",
    "LockTimeout",
    "Machine",
    "MachineConfig",
    "MachineCrashed",
    "MachineError",
    "MachineState",
    "MachineStatus",
    "Machines",
    "MigrationFailed",
    "NetworkInUse",
    "NotFoundError",
    "Pinnace",
    "PinnaceError",
    "Process",
    "ProtocolError",
    "RemoteError",
    "Snapshot",
    "SnapshotError",
    "StateError",
    "StoreError",
    "SwitchError",
    "SyncProcess",
    "TooLargeError",
    "ToolFailed",
    "UnsafeArchive",
    "VolumeError",
    "VolumeInUse",
    "WorkflowError",
    "__version__",
]
