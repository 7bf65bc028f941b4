"""pinnace: disposable Linux microVMs for testing networked and system software.

>>> from pinnace import Pinnace
>>> pn = Pinnace()
>>> pn.images.build()
>>> vm = pn.machines.create("demo")
>>> vm.start()
>>> vm.exec(["uname", "-a"]).stdout
"""

import logging

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
    StateError,
    UnsafeArchive,
)
from .images import Image, ImageInUse
from .machine import AsyncMachine, MachineState, MachineStatus

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
    "StateError",
    "SyncProcess",
    "UnsafeArchive",
    "__version__",
]
