"""Machine verbs that make, change and show machines: create, clone, configure, ls, status, logs."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from .common import call, echo_table

if TYPE_CHECKING:
    from ..client import AsyncPinnace
    from ..machine import MachineStatus

def size_option(fn: Any) -> Any:
    return click.option("--memory", "-m", metavar="SIZE",
                        help="Guest memory, e.g. 512M or 2G (default 512M).")(fn)


def shape_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--cpus", "-c", type=int, help="Virtual CPUs (default 1)."),
        click.option("--cmdline", metavar="ARGS", help="Extra kernel command line arguments."),
        click.option("--boot-timeout", type=float, metavar="SECONDS",
                     help="How long start waits for the guest agent (default 90)."),
        click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]),
                     help="Accelerator; auto uses KVM only where a probe guest boots on it."),
    ]):
        fn = opt(fn)
    return size_option(fn)


def device_options(fn: Any) -> Any:
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


def devices(net: str | None, ports: tuple[str, ...], networks: tuple[str, ...],
             spare_nics: int, volumes: tuple[str, ...], shares: tuple[str, ...]) -> dict[str, Any]:
    return {"net": net, "ports": list(ports), "networks": list(networks),
            "spare_nics": spare_nics, "volumes": list(volumes), "shares": list(shares)}


@click.command()
@click.argument("name")
@click.option("--image", "-i", default="default", show_default=True, help="Image name or digest.")
@shape_options
@device_options
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
    devs = devices(net, ports, networks, spare_nics, volumes, shares)

    async def go(pn: AsyncPinnace) -> None:
        m = await pn.machines.create(name, image=image, cpus=cpus, memory=memory,
                                     cmdline=cmdline, boot_timeout=boot_timeout, accel=accel,
                                     snapshot=snapshot, **devs)
        if start_now:
            await m.start()
        click.echo(name)

    call(ctx, go)


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

    call(ctx, go)


@click.command()
@click.argument("name")
@shape_options
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

    call(ctx, go)


@click.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="Only names.")
@click.option("--all", "-a", "show_all", is_flag=True,
              help="Warm-pool members too (see 'pinnace pool').")
@click.pass_context
def ls(ctx: click.Context, fmt: str, quiet: bool, show_all: bool) -> None:
    """List machines; a machine whose QEMU died shows as stopped or failed.

    \b
    Examples:
      pinnace ls
      pinnace ls --format json
      pinnace ls -q | xargs pinnace delete --force
    """

    async def go(pn: AsyncPinnace) -> list[tuple[MachineStatus, dict[str, Any]]]:
        rows = []
        for st in await pn.machines.list(pool=show_all):
            try:
                cfg = (await pn.machines.get(st.name)).config.to_dict()
            except Exception:
                cfg = {}
            rows.append((st, cfg))
        return rows

    rows = call(ctx, go)
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
            str(cfg.get("image", "-")), str(st.pid or "-"), uptime(st), st.reason[:60],
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

    st = call(ctx, go)
    if fmt == "json":
        click.echo(json.dumps(st.to_dict(), indent=2))
        return
    click.echo(f"{st.name}: {st.state}" + (f" ({st.reason})" if st.reason else ""))
    if st.pid:
        click.echo(f"  pid {st.pid}, accel {st.accel}, up {uptime(st)}")


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the guest writes.")
@click.option("--tail", "-n", "lines", type=click.IntRange(min=0), default=None,
              help="Only the last N lines.")
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

    m = call(ctx, go)
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


def uptime(st: MachineStatus) -> str:
    """How long a live machine has run, shortly ("42s", "7m", "3h"); "-" if it does not run."""
    if st.started_at is None or st.pid is None:
        return "-"
    secs = int(time.time() - st.started_at)
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


COMMANDS: tuple[click.Command, ...] = (create, clone, configure, ls, status, logs)

__all__ = ["COMMANDS", "device_options", "devices", "size_option"]
