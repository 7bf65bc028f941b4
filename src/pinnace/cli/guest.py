"""Verbs that work inside a running machine: exec, cp, shell."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import click

from .common import call

if TYPE_CHECKING:
    from ..client import AsyncPinnace
    from ..machine import AsyncMachine

PASSTHROUGH: dict[str, bool] = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.command(name="exec", context_settings=PASSTHROUGH)
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--interactive", "-i", is_flag=True, help="Send this terminal's stdin to the command.")
@click.option("--env", "-e", "envs", multiple=True, metavar="KEY=VALUE", help="Set a variable.")
@click.option("--workdir", "-w", metavar="DIR", help="Working directory in the guest.")
@click.option("--user", "-u", metavar="USER", help="Run as this guest user.")
@click.option("--timeout", "-t", type=float, metavar="SECONDS",
              help="Kill the command after this long (exit status 124).")
@click.pass_context
def exec_(ctx: click.Context, name: str, command: tuple[str, ...], interactive: bool,
          envs: tuple[str, ...], workdir: str | None, user: str | None,
          timeout: float | None) -> None:
    """Run a command in a machine; its output streams live and its exit code is ours.

    \b
    Examples:
      pinnace exec web -- uname -a
      pinnace exec web -- sh -c 'exit 7'; echo $?     # prints 7
      tar c src | pinnace exec -i web -- tar x -C /tmp
    """
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError("give the command to run after the machine name, e.g. -- uname -a")
    env = {}
    for item in envs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--env")
        env[key] = value
    async def go(pn: AsyncPinnace) -> int:
        return await exit_code_of(stream_exec(
            await pn.machines.get(name), list(command), interactive=interactive,
            env=env or None, cwd=workdir, user=user, timeout=timeout))

    code = call(ctx, go)
    sys.exit(code)


async def exit_code_of(coro: Any) -> int:
    """Like a shell: 127 when the command is missing, 126 when it cannot be run."""
    from ..errors import RemoteError

    try:
        return int(await coro)
    except RemoteError as exc:
        if exc.code in ("not-found", "permission"):
            click.echo(f"pinnace: {exc.message}", err=True)
            return 127 if exc.code == "not-found" else 126
        raise


async def stream_exec(m: AsyncMachine, argv: list[str], *, interactive: bool,
                      env: dict[str, str] | None, cwd: str | None, user: str | None,
                      timeout: float | None) -> int:
    """Run argv in the guest, copying its output to ours as it comes; return its exit code.
    ``m`` is a handle whose agent connection is reused if it has one."""
    import asyncio
    import signal

    proc = await m.start_process(argv, stdin=interactive, timeout=timeout, env=env, cwd=cwd,
                                 user=user)
    loop = asyncio.get_running_loop()
    interrupts = 0
    tasks: set[asyncio.Task[None]] = set()

    def on_sigint() -> None:
        # The first Ctrl-C interrupts the guest command, the second kills it.
        nonlocal interrupts
        interrupts += 1
        task = loop.create_task(proc.signal(signal.SIGINT if interrupts == 1 else signal.SIGKILL))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    pump = None
    if interactive:
        async def pump_stdin() -> None:
            await copy_stdin(proc)

        pump = loop.create_task(pump_stdin())
    outs = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
    try:
        async for stream, data in proc:
            out = outs.get(stream, sys.stdout.buffer)
            out.write(data)
            out.flush()
        result = await proc.wait()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if pump is not None:
            pump.cancel()
        proc.abandon()
        await m.close()
    if result.timed_out:
        click.echo(f"pinnace: command timed out after {timeout:g} s and was killed", err=True)
        return 124
    return result.exit_code


async def copy_stdin(proc: Any) -> None:
    """Copy our stdin to the guest command, then close its stdin."""
    import asyncio
    import os

    fd = sys.stdin.fileno()
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    try:
        loop.add_reader(fd, ready.set)
    except (PermissionError, OSError, ValueError):
        # A regular file cannot be polled, and never blocks: just read it.
        while data := os.read(fd, 1 << 20):
            await proc.write(data)
        await proc.close_stdin()
        return
    os.set_blocking(fd, False)
    try:
        while True:
            await ready.wait()
            ready.clear()
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                break
            await proc.write(data)
    finally:
        loop.remove_reader(fd)
        os.set_blocking(fd, True)
    await proc.close_stdin()


def _split_remote(arg: str) -> tuple[str | None, str]:
    """'vm:/path' -> ('vm', '/path'); a host path -> (None, path)."""
    head, sep, rest = arg.partition(":")
    if sep and head and "/" not in head:
        return head, rest
    return None, arg


@click.command()
@click.argument("src")
@click.argument("dst")
@click.pass_context
def cp(ctx: click.Context, src: str, dst: str) -> None:
    """Copy a file or directory between the host and a machine (VM:/path on one side).

    \b
    Examples:
      pinnace cp ./app.tar web:/tmp/app.tar
      pinnace cp web:/var/log ./guest-logs
    """
    (src_vm, src_path), (dst_vm, dst_path) = _split_remote(src), _split_remote(dst)
    if (src_vm is None) == (dst_vm is None):
        raise click.UsageError("exactly one of SRC and DST must be VM:/path")

    async def go(pn: AsyncPinnace) -> None:
        t0 = time.monotonic()
        if src_vm is not None:
            m = await pn.machines.get(src_vm)
            n = await m.files.get(src_path, dst_path)
        else:
            assert dst_vm is not None
            m = await pn.machines.get(dst_vm)
            n = await m.files.put(src_path, dst_path)
        await m.close()
        took = time.monotonic() - t0
        click.echo(f"{n} bytes in {took:.2f} s ({n / took / 1e6:.1f} MB/s)", err=True)

    call(ctx, go)


@click.command()
@click.argument("name")
@click.option("--user", "-u", metavar="USER", help="Log in as this guest user.")
@click.pass_context
def shell(ctx: click.Context, name: str, user: str | None) -> None:
    """Open an interactive shell (a PTY) in a machine.

    \b
    Example:
      pinnace shell web
    """
    code = call(ctx, lambda pn: pty_shell(pn, name, user))
    sys.exit(code)


async def pty_shell(pn: AsyncPinnace, name: str, user: str | None) -> int:
    """Run a login shell on a guest PTY, with this terminal in raw mode."""
    import asyncio
    import os
    import shutil
    import signal
    import termios
    import tty

    m = await pn.machines.get(name)
    size = shutil.get_terminal_size()
    proc = await m.start_process(["/bin/bash", "-l"], stdin=True, user=user, pty={
        "rows": size.lines, "cols": size.columns, "term": os.environ.get("TERM", "xterm")})
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd)

    tasks: set[asyncio.Task[None]] = set()

    def on_winch() -> None:
        s = shutil.get_terminal_size()
        task = loop.create_task(proc.resize(s.lines, s.columns))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGWINCH, on_winch)
    pump = loop.create_task(copy_stdin(proc))
    try:
        async for _, data in proc:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        result = await proc.wait()
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        pump.cancel()
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        proc.abandon()
        await m.close()
    return result.exit_code


COMMANDS: tuple[click.Command, ...] = (exec_, cp, shell)

__all__ = ["COMMANDS", "exit_code_of", "stream_exec"]
