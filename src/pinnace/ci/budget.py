"""How many jobs run at once: as many as a memory and CPU budget hold, and never more
than ``--parallel``.

Each job takes its machine's memory plus what its QEMU may use beyond it (the limit
its cgroup gets) and its machine's CPUs; the budget is the host's available memory
when the run starts (less a reserve for the host) and its CPUs, and a job starts beside
others only while the host still has its memory free (what another run took since). A
job waits until its share is free; jobs start in the order they asked. Memory is never oversubscribed: a
job that needs more than the whole budget fails at once with what to change. CPUs
may be: a job that asks more CPUs than the host has still runs, alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..config import format_size
from ..errors import ConfigError

HOST_RESERVE = 1 << 30  # memory left to the host and pinnace itself


def available_memory(meminfo: str = "/proc/meminfo") -> int:
    """The host's MemAvailable, in bytes (its total memory if the kernel does not say)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Budget:
    """``memory`` bytes and ``cpus`` for jobs, at most ``jobs`` of them at once."""

    memory: int
    cpus: int
    jobs: int

    free: Callable[[], int] = field(default=lambda: available_memory(), repr=False)

    def __post_init__(self) -> None:
        self.used_memory = 0
        self.used_cpus = 0
        self.running = 0
        self._cond = asyncio.Condition()
        self._queue: list[object] = []  # waiting jobs, first come first served

    @classmethod
    def for_host(cls, jobs: int, *, memory: int | None = None,
                 cpus: int | None = None) -> Budget:
        mem = memory if memory is not None else max(0, available_memory() - HOST_RESERVE)
        return cls(memory=mem, cpus=cpus or os.cpu_count() or 1, jobs=jobs)

    def _fits(self, memory: int, cpus: int) -> bool:
        if self.running == 0:
            return True  # (checked against the whole budget before waiting)
        return (self.running < self.jobs and self.used_memory + memory <= self.memory
                and self.used_cpus + cpus <= self.cpus
                # what others (another run) took since the budget was set
                and self.free() - HOST_RESERVE >= memory)

    @contextlib.asynccontextmanager
    async def take(self, memory: int, cpus: int) -> AsyncIterator[None]:
        """Hold ``memory`` bytes and ``cpus`` while the block runs."""
        if memory > self.memory:
            raise ConfigError("job memory", format_size(memory),
                              f"it needs more than this host can give CI jobs "
                              f"({format_size(self.memory)} free, less "
                              f"{format_size(HOST_RESERVE)} kept for the host); give the "
                              "job less memory (limits.memory) or free some")
        me = object()
        async with self._cond:
            self._queue.append(me)
            try:
                await self._cond.wait_for(
                    lambda: self._queue[0] is me and self._fits(memory, cpus))
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
            self.used_memory += memory
            self.used_cpus += cpus
            self.running += 1
        try:
            yield
        finally:
            async with self._cond:
                self.used_memory -= memory
                self.used_cpus -= cpus
                self.running -= 1
                self._cond.notify_all()


__all__ = ["Budget", "available_memory"]
