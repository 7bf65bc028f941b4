"""The seam between a machine's lifecycle and the program that runs it.

A :class:`Backend` launches a virtual machine from a :class:`LaunchSpec`, tells
whether it is alive, saves and loads its state, and takes it down. pinnace's
QEMU backend lives in :mod:`pinnace.backends.qemu`; :mod:`pinnace.backends.fake`
is an in-process stand-in that unit tests drive through every state without QEMU.

What is *not* behind this seam: the guest agent. Every backend exposes the agent's
channels as unix sockets at ``MachineFiles.agent_sock(port)``, and pinnace talks
to the guest the same way whatever runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..agent.protocol import AGENT_PORTS
from ..store import MachineFiles

# The run states a backend reports (QEMU's query-status words where they exist).
RUNNING = "running"  # the guest's CPUs run
PAUSED = "paused"  # stopped by pinnace (saving, say); cont resumes it
SAVED = "postmigrate"  # paused after its state was written out; cont resumes it
INCOMING = "inmigrate"  # waiting for a state to load; nothing runs until it has


@dataclass(frozen=True)
class Handle:
    """A running VMM process, named so that a reused pid is not mistaken for it."""

    pid: int
    start_time: int


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator a machine gets, and why."""

    accel: str  # "kvm" or "tcg"
    reason: str
    probed: bool  # the answer came from a probe run now, not from the cache


@dataclass(frozen=True)
class NatNic:
    """User-mode NAT; ``restrict`` cuts every way out except the port forwards."""

    mac: str
    restrict: bool
    forwards: tuple[tuple[str, str, int, int], ...] = ()  # (proto, host ip, host port, guest port)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one machine."""

    name: str
    files: MachineFiles
    kernel: Path
    initrd: Path | None  # None: the kernel boots without an initramfs
    cpus: int
    memory_mib: int
    accel: str  # kvm or tcg
    cmdline: str = ""  # the machine's own kernel arguments, last (they win)
    kernel_args: str = ""  # what the image needs to boot (root=, init=)
    tsc_khz: int | None = None
    # Confine the monitor's own system calls (QEMU: -sandbox with seccomp): no new
    # programs, no privileges, no obsolete calls. The backend sets it where supported.
    sandbox: bool = False
    agent_ports: int = AGENT_PORTS
    # Guest RAM: anonymous memory unless ``memory_file`` is given; that file is mapped
    # shared (writes go to the file: a snapshot template) or private (copy-on-write: a clone).
    memory_file: Path | None = None
    memory_shared: bool = False
    incoming: bool = False  # wait for a state to load instead of booting
    # Devices after the fixed ones, in this order (a saved state depends on it):
    nat: NatNic | None = None
    nics: tuple[str, ...] = ()  # MACs of NICs on virtual networks (dgram to the switch)
    volumes: tuple[tuple[Path, bool], ...] = ()  # (ext4 file, read-only)
    shares: tuple[tuple[Path, bool], ...] = ()  # (host folder, read-only)
    extra_args: tuple[str, ...] = field(default=())


def volume_serial(index: int) -> str:
    """The disk serial the agent finds volume ``index`` by."""
    return f"pinnace-vol{index}"


def share_tag(index: int) -> str:
    """The mount tag the agent finds shared folder ``index`` by."""
    return f"pinnace-share{index}"


class Backend(Protocol):
    """What pinnace needs from a virtual machine monitor.

    Launching returns at once: the machine runs detached from the command that
    started it, and a later command finds it again by its :class:`Handle` (kept in
    state.json) and its files. Every wait has a timeout.
    """

    name: str

    async def choose_accel(self, requested: str) -> AccelChoice:
        """Resolve auto|kvm|tcg to the accelerator this host can use."""
        ...

    def identity(self, accel: str) -> dict[str, str]:
        """What a saved state depends on besides the machine's shape: the VMM's version
        and the CPU model it shows the guest (``{"qemu": ..., "cpu_model": ...}``)."""
        ...

    def devices_key(self, nat: bool, nics: int, volumes: int, shares: int) -> str:
        """The device list a saved state depends on: it loads only where it is the same."""
        ...

    async def create_disk(self, base: Path, disk: Path, *, base_format: str = "raw",
                          size: int | None = None) -> None:
        """A copy-on-write overlay ``disk`` on ``base``: writes go to the overlay only."""
        ...

    async def disk_size(self, disk: Path) -> int:
        """The size of a disk as the guest sees it, in bytes."""
        ...

    async def launch(self, spec: LaunchSpec) -> Handle | int:
        """Start the machine detached; its Handle, or its exit status if it died at once.
        Raises LaunchError if it neither ran nor exited in time."""
        ...

    def alive(self, handle: Handle) -> bool:
        """True while that process runs (never for a reused pid or a zombie)."""
        ...

    def find(self, files: MachineFiles) -> Handle | None:
        """A VMM running for these files that no record names: a launch whose command
        died before it could write the handle down."""
        ...

    def exit_status(self, files: MachineFiles) -> int | None:
        """The last launch's exit status (shell style: 128+N for signal N), if it ended."""
        ...

    async def await_exit_status(self, files: MachineFiles, timeout: float = 1.0) -> int | None:
        """:meth:`exit_status`, waiting up to ``timeout`` for it to be known."""
        ...

    async def wait_exit(self, handle: Handle, timeout: float) -> bool:
        """Wait for the process to end; True if it did within ``timeout``."""
        ...

    async def kill(self, handle: Handle, files: MachineFiles) -> None:
        """Kill the process at once and wait until it and its exit status are gone/known."""
        ...

    async def quit(self, files: MachineFiles, timeout: float) -> bool:
        """Ask the VMM to exit (disk caches flushed); True if the request was delivered."""
        ...

    async def run_state(self, files: MachineFiles) -> str:
        """RUNNING, PAUSED, SAVED, INCOMING (or another word of the VMM's own)."""
        ...

    async def pause(self, files: MachineFiles) -> None:
        """Stop the guest's CPUs."""
        ...

    async def resume(self, files: MachineFiles) -> None:
        """Run the guest's CPUs again after :meth:`pause` or :meth:`save`."""
        ...

    async def save(self, files: MachineFiles, dest: Path, *, ignore_shared: bool) -> float:
        """Pause the guest and write its state to ``dest`` (without the RAM if it lives in
        a shared file and ``ignore_shared``). The guest stays paused. Returns
        time.monotonic() at the moment it stopped. Raises MigrationFailed."""
        ...

    async def load(self, files: MachineFiles, src: Path, *, ignore_shared: bool,
                   run: bool = True) -> None:
        """Load a saved state into a machine launched with ``incoming``, then run it
        unless ``run`` is false. Raises MigrationFailed."""
        ...

    async def set_link(self, files: MachineFiles, nic: int, up: bool) -> None:
        """Plug or unplug the cable of NIC ``nic`` (on a virtual network)."""
        ...


__all__ = ["INCOMING", "PAUSED", "RUNNING", "SAVED", "AccelChoice", "Backend", "Handle",
           "LaunchSpec", "NatNic", "share_tag", "volume_serial"]
