"""QMP, QEMU's control protocol, through the ``qemu.qmp`` library."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, StateError

from ...errors import MigrationFailed

log = logging.getLogger(__name__)

__all__ = ["ExecuteError", "qmp_session", "quit_qemu"]


@contextlib.asynccontextmanager
async def qmp_session(sock: Path, name: str, timeout: float = 5.0, *,
                      starting: bool = False) -> AsyncIterator[QMPClient]:
    """A connected QMP client for one machine, disconnected on exit. With ``starting``,
    keep trying until ``timeout``: a QEMU just launched may not have made its socket yet."""
    client = QMPClient(name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while starting and not sock.exists() and loop.time() < deadline:
        await asyncio.sleep(0.002)  # not connect(): qemu.qmp logs each refused attempt
    while True:
        try:
            await asyncio.wait_for(client.connect(str(sock)), max(deadline - loop.time(), 0.01))
            break
        except (ConnectError, OSError, TimeoutError) as exc:
            if not starting or loop.time() >= deadline or isinstance(exc, TimeoutError):
                raise ConnectionError(f"cannot connect to QMP at {sock}: {exc}") from exc
            await asyncio.sleep(0.005)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def execute(client: QMPClient, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(client.execute(cmd, args), timeout)


async def query_status(sock: Path, name: str, timeout: float = 5.0) -> str:
    """QEMU's run state: running, paused, postmigrate, inmigrate, ..."""
    async with qmp_session(sock, name, timeout) as client:
        reply = await execute(client, "query-status", timeout=timeout)
        return str(reply.get("status", "unknown"))


async def quit_qemu(sock: Path, name: str, timeout: float = 5.0) -> bool:
    """Ask QEMU to quit; True if the request was delivered."""
    try:
        async with qmp_session(sock, name, timeout) as client:
            with contextlib.suppress(StateError, EOFError, ConnectionError):
                await execute(client, "quit", timeout=timeout)
            return True
    except (ConnectionError, TimeoutError):
        return False


__all__ += ["EventListener", "execute"]


# --- saving and loading a machine's state (QEMU migration to and from a file) -----------

MIGRATION_POLL = 0.003
MIGRATION_FD = "pinnace-state"


async def _set_caps(client: QMPClient, ignore_shared: bool) -> None:
    await execute(client, "migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": ignore_shared}]})


async def _await_migration(client: QMPClient, name: str, what: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        st = await execute(client, "query-migrate")
        status = st.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise MigrationFailed(name, f"{what} {status}: "
                                  f"{st.get('error-desc', 'no reason given')}")
        if loop.time() > deadline:
            raise MigrationFailed(name, f"{what} did not finish within {timeout:g} s")
        await asyncio.sleep(MIGRATION_POLL)


async def _migrate_fd(client: QMPClient, command: str, fd: int) -> None:
    """Start ``command`` (migrate or migrate-incoming) on ``fd``, handed to QEMU over the
    QMP socket: QEMU holds its own copy, so the caller may close ``fd`` once this returns."""
    client.send_fd_scm(fd)
    await execute(client, "getfd", {"fdname": MIGRATION_FD})
    try:
        await execute(client, command, {"uri": f"fd:{MIGRATION_FD}"})
    except BaseException:
        with contextlib.suppress(Exception):
            await execute(client, "closefd", {"fdname": MIGRATION_FD})
        raise


async def save_state(sock: Path, name: str, state: Path, *, ignore_shared: bool,
                     resume: bool = False, timeout: float = 300.0) -> float:
    """Pause the guest and write its device state (and RAM, unless it lives in a shared
    file and ``ignore_shared``) to ``state``; the guest stays paused unless ``resume``.
    Returns time.monotonic() when the guest had stopped."""
    async with qmp_session(sock, name) as client:
        await execute(client, "stop")
        stopped = time.monotonic()
        await _set_caps(client, ignore_shared)
        # The file goes to QEMU as a descriptor (SCM_RIGHTS): a sandboxed QEMU
        # (-sandbox spawn=deny) could not start the `cat` of an exec: migration.
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await _migrate_fd(client, "migrate", fd)
        finally:
            os.close(fd)
        await _await_migration(client, name, "saving the state", timeout)
        if resume:
            await execute(client, "cont")
    return stopped


async def load_state(sock: Path, name: str, state: Path, *, ignore_shared: bool,
                     run: bool = True, timeout: float = 300.0) -> None:
    """Load a saved state into a QEMU started with ``-incoming defer``; then run it."""
    async with qmp_session(sock, name, starting=True) as client:
        await _set_caps(client, ignore_shared)
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await _migrate_fd(client, "migrate-incoming", fd)
        finally:
            os.close(fd)
        await _await_migration(client, name, "loading the state", timeout)
        if run:
            await execute(client, "cont")


__all__ += ["load_state", "save_state"]
