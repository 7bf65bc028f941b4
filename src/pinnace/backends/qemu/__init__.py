"""The QEMU backend: QEMU's microvm machine, run detached, controlled over QMP.

The parts: :mod:`.command` (the command line, a pure function of a LaunchSpec),
:mod:`.process` (the detached process and its exit status), :mod:`.qmp` (QMP
through ``qemu.qmp``: save, load, quit), :mod:`.host` (the binary, KVM, the TSC).
Every failure of QEMU, QMP or qemu-img leaves here as an error of pinnace's tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

from ...errors import LaunchError, MachineError, ToolFailed
from ...store import CacheFiles, MachineFiles, proc_start_time, tail
from ..base import AccelChoice, Handle, LaunchSpec
from . import command as qcmd
from . import host as qhost
from . import process as qproc

log = logging.getLogger(__name__)

QMP_TIMEOUT = 10.0
# query-migrate statuses of a migration that is still going on.
MIGRATING = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug",
                       "cancelling", "postcopy-active", "postcopy-paused",
                       "postcopy-recover"})


@contextlib.asynccontextmanager
async def _qmp(files: MachineFiles, doing: str) -> AsyncIterator[None]:
    """Turn QMP's connection and protocol failures into a MachineError naming the step."""
    from qemu.qmp import ExecuteError, QMPError

    try:
        yield
    except (ConnectionError, EOFError, TimeoutError, QMPError, ExecuteError) as exc:
        raise MachineError(files.dir.name, f"QEMU did not answer while {doing}: "
                           f"{exc or type(exc).__name__}",
                           log_tail=tail(files.qemu_log, 5)) from exc


class QemuBackend:
    """QEMU (qemu-system-x86_64, microvm). ``cache`` keeps host probes between calls."""

    name = "qemu"

    def __init__(self, cache: CacheFiles) -> None:
        self.cache = cache

    @property
    def binary(self) -> str:
        return qhost.qemu_binary()

    async def choose_accel(self, requested: str) -> AccelChoice:
        choice = await asyncio.to_thread(qhost.choose_accel, requested, self.cache)
        return AccelChoice(choice.accel, choice.reason, choice.probed)

    def identity(self, accel: str) -> dict[str, str]:
        return {"qemu": qhost.cached_qemu_version(self.binary, self.cache),
                "cpu_model": qcmd.CPU_MODEL[accel]}

    def devices_key(self, nat: bool, nics: int, volumes: int, shares: int) -> str:
        return qcmd.devices_key(nat, nics, volumes, shares)

    async def _qemu_img(self, args: Sequence[str], hint: str) -> str:
        argv = [qhost.qemu_img(), *args]
        try:
            r = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                        errors="replace", stdin=subprocess.DEVNULL,
                                        timeout=120)
        except subprocess.TimeoutExpired:
            raise ToolFailed(argv, None, "did not finish within 120 s", hint) from None
        if r.returncode != 0:
            raise ToolFailed(argv, r.returncode, r.stderr or r.stdout, hint)
        return r.stdout

    async def create_disk(self, base: Path, disk: Path, *, base_format: str = "raw",
                          size: int | None = None) -> None:
        args = ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format]
        if size is not None:
            args.append("-u")  # the base need not exist yet (a snapshot still in staging)
        args.append(str(disk))
        if size is not None:
            args.append(str(size))
        await self._qemu_img(args, f"could not make the disk overlay {disk.name}; check free "
                             "space under PINNACE_HOME")

    async def disk_size(self, disk: Path) -> int:
        out = await self._qemu_img(["info", "--output=json", "-U", str(disk)],
                                   f"could not read the disk {disk}")
        try:
            return int(json.loads(out)["virtual-size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ToolFailed(["qemu-img", "info"], 0, f"unexpected output: {exc}") from None

    async def launch(self, spec: LaunchSpec) -> Handle | int:
        if spec.accel == "tcg" and spec.tsc_khz is None:
            spec = replace(spec, tsc_khz=await asyncio.to_thread(qhost.cached_tsc_khz,
                                                                 self.cache))
        if not spec.sandbox and os.environ.get("PINNACE_SANDBOX", "on") != "off":
            spec = replace(spec, sandbox=await asyncio.to_thread(qhost.cached_sandbox,
                                                                 self.binary, self.cache))
        argv = qcmd.build_argv(self.binary, spec)
        log.debug("launching: %s", qcmd.render(argv))
        try:
            return await asyncio.to_thread(qproc.launch, argv, spec.files)
        except TimeoutError as exc:
            raise LaunchError(spec.name, f"QEMU did not start: {exc}", command=argv,
                              exit_code=None, log_tail=tail(spec.files.qemu_log)) from exc
        except (OSError, subprocess.CalledProcessError) as exc:
            raise LaunchError(spec.name, f"QEMU could not be launched: {exc}", command=argv,
                              exit_code=None) from exc

    def alive(self, handle: Handle) -> bool:
        return qproc.alive(handle)

    def find(self, files: MachineFiles) -> Handle | None:
        pid = qproc.read_pid(files)
        start = proc_start_time(pid) if pid is not None else None
        if pid is None or start is None:
            return None
        # The pid file may be stale: the process must be a QEMU working in this folder.
        return Handle(pid, start) if qproc.is_vmm_of(pid, files) else None

    def exit_status(self, files: MachineFiles) -> int | None:
        return qproc.read_exit_status(files)

    async def await_exit_status(self, files: MachineFiles, timeout: float = 1.0) -> int | None:
        code = qproc.read_exit_status(files)
        if code is not None or timeout <= 0:
            return code
        return await asyncio.to_thread(qproc.await_exit_status, files, timeout)

    async def wait_exit(self, handle: Handle, timeout: float) -> bool:
        if not qproc.alive(handle):
            return True
        return await asyncio.to_thread(qproc.wait_exit, handle, timeout)

    async def kill(self, handle: Handle, files: MachineFiles) -> None:
        await asyncio.to_thread(qproc.kill, handle, files)

    async def quit(self, files: MachineFiles, timeout: float) -> bool:
        from .qmp import quit_qemu

        return await quit_qemu(files.qmp_sock, files.dir.name, timeout)

    async def run_state(self, files: MachineFiles) -> str:
        from .qmp import query_status

        async with _qmp(files, "asking for its run state"):
            return await query_status(files.qmp_sock, files.dir.name)

    async def pause(self, files: MachineFiles) -> None:
        await self._execute(files, "stop", "pausing the guest")

    async def resume(self, files: MachineFiles) -> None:
        """``cont``; first, a save still going on (its command died mid-way) is cancelled,
        since QEMU refuses to run a guest whose state is being written out."""
        from .qmp import execute, qmp_session

        async with _qmp(files, "resuming the guest"), \
                qmp_session(files.qmp_sock, files.dir.name) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + QMP_TIMEOUT
            while True:
                status = (await execute(client, "query-migrate")).get("status", "none")
                if status not in MIGRATING:
                    break
                if status != "cancelling":
                    await execute(client, "migrate_cancel")
                if loop.time() > deadline:
                    raise TimeoutError(f"a save ({status}) would not stop")
                await asyncio.sleep(0.02)
            await execute(client, "cont", timeout=QMP_TIMEOUT)

    async def _execute(self, files: MachineFiles, cmd: str, doing: str,
                       args: dict[str, object] | None = None) -> None:
        from .qmp import execute, qmp_session

        async with _qmp(files, doing), qmp_session(files.qmp_sock, files.dir.name) as client:
            await execute(client, cmd, args, timeout=QMP_TIMEOUT)

    async def save(self, files: MachineFiles, dest: Path, *, ignore_shared: bool) -> float:
        from .qmp import save_state

        async with _qmp(files, "saving its state"):
            return await save_state(files.qmp_sock, files.dir.name, dest,
                                    ignore_shared=ignore_shared)

    async def load(self, files: MachineFiles, src: Path, *, ignore_shared: bool,
                   run: bool = True) -> None:
        from .qmp import load_state

        async with _qmp(files, "loading its state"):
            await load_state(files.qmp_sock, files.dir.name, src, ignore_shared=ignore_shared,
                             run=run)

    async def set_link(self, files: MachineFiles, nic: int, up: bool) -> None:
        await self._execute(files, "set_link", f"setting the link of NIC {nic}",
                            {"name": qcmd.nic_id(nic), "up": up})


__all__ = ["QemuBackend"]
