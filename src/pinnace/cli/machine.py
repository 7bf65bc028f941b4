"""Machine verbs: create, clone, configure, ls, status, start, stop, halt, kill, delete, logs, exec."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from . import echo_table, fail, run

if TYPE_CHECKING:
    from ..client import AsyncPinnace
    from ..machine import AsyncMachine, MachineStatus

PASSTHROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _size_option(fn: Any) -> Any:
    return click.option("--memory", "-m", metavar="SIZE",
                        help="Guest memory, e.g. 512M or 2G (default 512M).")(fn)


def _shape_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--cpus", "-c", type=int, help="Virtual CPUs (default 1)."),
        click.option("--cmdline", metavar="ARGS", help="Extra kernel command line arguments."),
        click.option("--boot-timeout", type=float, metavar="SECONDS",
                     help="How long start waits for the guest agent (default 90)."),
        click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]),
                     help="Accelerator; auto uses KVM only where a probe guest boots on it."),
    ]):
        fn = opt(fn)
    return _size_option(fn)


def _device_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--net", type=click.Choice(["nat", "restricted", "none"]),
                     help="NAT NIC: nat (a way out; the default off virtual networks), "
                          "restricted (no way out but port forwards), none (no NAT NIC). "
                          "$PINNACE_DEFAULT_NET changes the default."),
        click.option("--publish", "-p", "ports", multiple=True,
                     metavar="[HOST_IP:]HOST_PORT:GUEST_PORT[/udp]",
                     help="Forward a host port (on 127.0.0.1 unless HOST_IP) to the guest."),
        click.option("--network", "networks", multiple=True, metavar="NAME[:IP]",
                     help="Join a virtual network (address assigned unless IP)."),
        click.option("--spare-nics", type=int, default=0,
                     help="Disconnected NICs, for 'pinnace network connect' while running."),
        click.option("--volume", "-v", "volumes", multiple=True, metavar="NAME:/PATH[:ro]",
                     help="Mount a volume (see 'pinnace volume create')."),
        click.option("--share", "shares", multiple=True, metavar="HOST_DIR:/PATH[:ro]",
                     help="Share a host folder (virtio-9p)."),
    ]):
        fn = opt(fn)
    return fn


def _devices(net: str | None, ports: tuple[str, ...], networks: tuple[str, ...],
             spare_nics: int, volumes: tuple[str, ...], shares: tuple[str, ...]) -> dict[str, Any]:
    return {"net": net, "ports": list(ports), "networks": list(networks),
            "spare_nics": spare_nics, "volumes": list(volumes), "shares": list(shares)}


@click.command()
@click.argument("name")
@click.option("--image", "-i", default="default", show_default=True, help="Image name or digest.")
@_shape_options
@_device_options
@click.option("--snapshot", "-s", metavar="SNAPSHOT",
              help="Start from this snapshot instead of booting (see 'pinnace snapshot ls').")
@click.option("--start", "start_now", is_flag=True, help="Start the machine right away.")
@click.pass_context
def create(ctx: click.Context, name: str, image: str, cpus: int | None, memory: str | None,
           cmdline: str | None, boot_timeout: float | None, accel: str | None,
           snapshot: str | None, start_now: bool, net: str | None, ports: tuple[str, ...],
           networks: tuple[str, ...], spare_nics: int, volumes: tuple[str, ...],
           shares: tuple[str, ...]) -> None:
    """Create a stopped machine from an image, or from a snapshot.

    \b
    Examples:
      pinnace create web --cpus 2 --memory 1G -p 8080:80
      pinnace create db --network lan --volume pgdata:/var/lib/postgresql
      pinnace create dev --share ./src:/src:ro --net restricted
      pinnace create web2 --snapshot web-ready --start
    """
    devices = _devices(net, ports, networks, spare_nics, volumes, shares)

    async def go(pn: AsyncPinnace) -> None:
        m = await pn.machines.create(name, image=image, cpus=cpus, memory=memory,
                                     cmdline=cmdline, boot_timeout=boot_timeout, accel=accel,
                                     snapshot=snapshot, **devices)
        if start_now:
            await m.start()
        click.echo(name)

    run(ctx, go)


@click.command()
@click.argument("source")
@click.argument("name")
@click.pass_context
def clone(ctx: click.Context, source: str, name: str) -> None:
    """Create NAME as a copy of the stopped machine SOURCE (config and disk).

    \b
    Example:
      pinnace clone web web2
    """

    async def go(pn: AsyncPinnace) -> None:
        await pn.machines.clone(source, name)
        click.echo(name)

    run(ctx, go)


@click.command()
@click.argument("name")
@_shape_options
@click.pass_context
def configure(ctx: click.Context, name: str, cpus: int | None, memory: str | None,
              cmdline: str | None, boot_timeout: float | None, accel: str | None) -> None:
    """Change a stopped machine's shape.

    \b
    Example:
      pinnace configure web --memory 2G --cpus 2
    """

    async def go(pn: AsyncPinnace) -> None:
        m = await pn.machines.get(name)
        cfg = await m.configure(cpus=cpus, memory=memory, cmdline=cmdline,
                                boot_timeout=boot_timeout, accel=accel)
        click.echo(json.dumps(cfg.to_dict(), indent=2))

    run(ctx, go)


def _uptime(st: MachineStatus) -> str:
    if st.started_at is None or st.pid is None:
        return "-"
    secs = int(time.time() - st.started_at)
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


@click.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="Only names.")
@click.pass_context
def ls(ctx: click.Context, fmt: str, quiet: bool) -> None:
    """List machines; a machine whose QEMU died shows as stopped or failed.

    \b
    Examples:
      pinnace ls
      pinnace ls --format json
      pinnace ls -q | xargs pinnace delete --force
    """

    async def go(pn: AsyncPinnace) -> list[tuple[MachineStatus, dict[str, Any]]]:
        rows = []
        for st in await pn.machines.list():
            try:
                cfg = (await pn.machines.get(st.name)).config.to_dict()
            except Exception:
                cfg = {}
            rows.append((st, cfg))
        return rows

    rows = run(ctx, go)
    if quiet:
        for st, _ in rows:
            click.echo(st.name)
        return
    if fmt == "json":
        click.echo(json.dumps([{**st.to_dict(), "config": cfg} for st, cfg in rows], indent=2))
        return
    from ..config import format_size

    table = [("NAME", "STATE", "CPUS", "MEMORY", "IMAGE", "PID", "UP", "REASON")]
    for st, cfg in rows:
        table.append((
            st.name, str(st.state), str(cfg.get("cpus", "-")),
            format_size(cfg["memory_mib"] << 20) if "memory_mib" in cfg else "-",
            str(cfg.get("image", "-")), str(st.pid or "-"), _uptime(st), st.reason[:60],
        ))
    echo_table(table)


@click.command()
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def status(ctx: click.Context, name: str, fmt: str) -> None:
    """Show one machine's state, reconciled with its process.

    \b
    Example:
      pinnace status web
    """

    async def go(pn: AsyncPinnace) -> MachineStatus:
        return await (await pn.machines.get(name)).status()

    st = run(ctx, go)
    if fmt == "json":
        click.echo(json.dumps(st.to_dict(), indent=2))
        return
    click.echo(f"{st.name}: {st.state}" + (f" ({st.reason})" if st.reason else ""))
    if st.pid:
        click.echo(f"  pid {st.pid}, accel {st.accel}, up {_uptime(st)}")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--no-wait", is_flag=True, help="Return once QEMU runs, without waiting for the agent.")
@click.option("--timeout", type=float, metavar="SECONDS", help="Boot timeout for this start.")
@click.pass_context
def start(ctx: click.Context, names: tuple[str, ...], no_wait: bool,
          timeout: float | None) -> None:
    """Boot machines and wait until their agents answer.

    \b
    Example:
      pinnace start web
    """

    async def go(pn: AsyncPinnace) -> None:
        for name in names:
            t0 = time.monotonic()
            m = await pn.machines.get(name)
            st = await m.start(wait=not no_wait, timeout=timeout)
            click.echo(f"{name}: {st.state} in {time.monotonic() - t0:.2f} s", err=True)

    run(ctx, go)


def _lifecycle(verb: str, doc: str, example: str) -> click.Command:
    @click.command(name=verb, help=f"{doc}\n\n\b\nExample:\n  {example}")
    @click.argument("names", nargs=-1, required=True)
    @click.pass_context
    def cmd(ctx: click.Context, /, names: tuple[str, ...], **kw: Any) -> None:
        async def go(pn: AsyncPinnace) -> None:
            for name in names:
                m = await pn.machines.get(name)
                if verb == "stop":
                    st = await m.stop(timeout=kw["timeout"], save=kw["save"])
                else:
                    st = await getattr(m, verb)()
                click.echo(f"{name}: {st.state}" + (f" ({st.reason})" if st.reason else ""),
                           err=True)

        run(ctx, go)

    if verb == "stop":
        cmd = click.option("--save", is_flag=True,
                           help="Save the running state instead; the next start resumes it.")(cmd)
        cmd = click.option("--timeout", type=float, default=10.0, show_default=True,
                           help="Seconds for the guest to power off before QEMU is told to quit.")(cmd)
    return cmd


stop = _lifecycle("stop", "Power machines off through their agents (then quit, then kill).",
                  "pinnace stop web")
halt = _lifecycle("halt", "Stop machines at once without asking the guest; nothing is saved.",
                  "pinnace halt web")
kill = _lifecycle("kill", "SIGKILL machines' QEMU processes.", "pinnace kill web")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True, help="Kill running machines first.")
@click.pass_context
def delete(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Delete machines and their disks.

    \b
    Example:
      pinnace delete --force web
    """

    async def go(pn: AsyncPinnace) -> None:
        for name in names:
            await pn.machines.delete(name, force=force)
            click.echo(f"{name}: deleted", err=True)

    run(ctx, go)


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the guest writes.")
@click.option("--tail", "-n", "lines", type=int, default=None, help="Only the last N lines.")
@click.pass_context
def logs(ctx: click.Context, name: str, follow: bool, lines: int | None) -> None:
    """Print a machine's serial console log.

    \b
    Examples:
      pinnace logs web
      pinnace logs -f web
    """

    async def go(pn: AsyncPinnace) -> Any:
        return await pn.machines.get(name)

    m = run(ctx, go)
    path = m.paths.serial_log
    out = sys.stdout.buffer
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if not follow:
            return
        while not path.exists():
            time.sleep(0.2)
        f = open(path, "rb")
    with f:
        if lines is not None:
            from ..store import tail

            out.write((tail(path, lines) + "\n").encode())
            f.seek(0, 2)
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow:
                break
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:
                break


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
        return await _exit_code_of(stream_exec(
            await pn.machines.get(name), list(command), interactive=interactive,
            env=env or None, cwd=workdir, user=user, timeout=timeout))

    code = run(ctx, go)
    sys.exit(code)


async def _exit_code_of(coro: Any) -> int:
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

    run(ctx, go)


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
    code = run(ctx, lambda pn: pty_shell(pn, name, user))
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


@click.command(name="run", context_settings=PASSTHROUGH)
@click.option("--name", "-n", help="Machine name (with --count: NAME-1..NAME-N); default random.")
@click.option("--image", "-i", default="default", show_default=True, help="Image name or digest.")
@click.option("--cpus", "-c", type=int, help="Virtual CPUs (default 1).")
@_size_option
@click.option("--count", type=int, default=1, show_default=True, help="Machines to start at once.")
@click.option("--rm", "remove", is_flag=True, help="Delete the machines when the command ends.")
@click.option("--timeout", "-t", type=float, metavar="SECONDS", help="Kill the command after this.")
@click.option("--interactive", is_flag=True, help="Send this terminal's stdin to the command.")
@_device_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_(ctx: click.Context, name: str | None, image: str, cpus: int | None, memory: str | None,
         count: int, remove: bool, timeout: float | None, interactive: bool,
         net: str | None, ports: tuple[str, ...], networks: tuple[str, ...], spare_nics: int,
         volumes: tuple[str, ...], shares: tuple[str, ...], command: tuple[str, ...]) -> None:
    """Start machines from the image's ready snapshot, and run COMMAND in them.

    The first run of an image and shape boots it once and saves a ready snapshot;
    later runs restore that in a fraction of a second. With COMMAND, the exit code
    is the command's (with --count, the first non-zero one).

    \b
    Examples:
      pinnace run --rm -- uname -a
      pinnace run --name web --memory 1G
      pinnace run --count 4 --rm -- sh -c 'hostname; nproc'
    """
    argv = list(command[1:] if command[:1] == ("--",) else command)

    async def go(pn: AsyncPinnace) -> int:
        import asyncio

        machines = await pn.machines.run(
            image=image, name=name, count=count, cpus=cpus, memory=memory,
            notify=lambda m: click.echo(f"pinnace: {m}", err=True),
            **_devices(net, ports, networks, spare_nics, volumes, shares))
        try:
            if not argv:
                for m in machines:
                    click.echo(m.name)
                return 0
            if len(machines) == 1:
                return await _exit_code_of(stream_exec(
                    machines[0], argv, interactive=interactive, env=None,
                    cwd=None, user=None, timeout=timeout))
            results = await asyncio.gather(*(m.exec(argv, timeout=timeout) for m in machines))
            for m, r in zip(machines, results, strict=True):
                for line in r.stdout_text.splitlines():
                    click.echo(f"{m.name}: {line}")
                for line in r.stderr_text.splitlines():
                    click.echo(f"{m.name}: {line}", err=True)
            return next((r.exit_code for r in results if r.exit_code != 0), 0)
        finally:
            if remove:  # disposable: nothing to save, so kill rather than shut down
                await asyncio.gather(*(m.delete(force=True) for m in machines),
                                     return_exceptions=True)

    sys.exit(run(ctx, go))


def register(group: click.Group) -> None:
    for cmd in (create, clone, run_, configure, start, stop, halt, kill, delete, ls, status, logs,
                exec_, shell, cp):
        group.add_command(cmd)


__all__ = ["fail", "register"]
