"""QMP, QEMU's control protocol, through the ``qemu.qmp`` library."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, StateError

log = logging.getLogger(__name__)

__all__ = ["ExecuteError", "qmp_session", "quit_qemu"]


@contextlib.asynccontextmanager
async def qmp_session(sock: Path, name: str, timeout: float = 5.0) -> AsyncIterator[QMPClient]:
    """A connected QMP client for one machine, disconnected on exit."""
    client = QMPClient(name)
    try:
        await asyncio.wait_for(client.connect(str(sock)), timeout)
    except (ConnectError, OSError, TimeoutError) as exc:
        raise ConnectionError(f"cannot connect to QMP at {sock}: {exc}") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def execute(client: QMPClient, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(client.execute(cmd, args), timeout)


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
