"""Network verbs: create, ls, inspect, rm, connect, disconnect."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from .common import Group, call, each, echo_table

if TYPE_CHECKING:
    from ..client import AsyncPinnace


@click.group(cls=Group)
def network() -> None:
    """Virtual L2 networks between machines (one switch each, no way off the host)."""


@network.command()
@click.argument("name")
@click.option("--subnet", metavar="CIDR", help="IPv4 subnet, e.g. 10.77.0.0/24 (default: "
              "the first free /24 of 10.100.0.0/16).")
@click.pass_context
def create(ctx: click.Context, name: str, subnet: str | None) -> None:
    """Create network NAME; machines join it with --network NAME[:IP].

    \b
    Example:
      pinnace network create lan --subnet 10.77.0.0/24
      pinnace create a --network lan && pinnace create b --network lan:10.77.0.9
    """

    async def go(pn: AsyncPinnace) -> None:
        net = await pn.networks.create(name, subnet)
        click.echo(f"{net.name} {net.subnet}")

    call(ctx, go)


@network.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def ls(ctx: click.Context, fmt: str) -> None:
    """List networks, with their machines and whether their switch runs.

    \b
    Example:
      pinnace network ls --format json
    """
    from ..network import switch

    async def go(pn: AsyncPinnace) -> None:
        rows = []
        for net in pn.networks.list():
            members = pn.networks.members(net.name)
            alive = switch.running(net.path)["switch_alive"]
            rows.append({**net.to_dict(), "machines": sorted(members),
                         "switch": "running" if alive else "stopped"})
        if fmt == "json":
            click.echo(json.dumps(rows, indent=2))
            return
        table = [("NAME", "SUBNET", "SWITCH", "MACHINES")]
        table += [(r["name"], r["subnet"], r["switch"], ",".join(r["machines"]) or "-")
                  for r in rows]
        echo_table(table)

    call(ctx, go)


@network.command()
@click.argument("name")
@click.pass_context
def inspect(ctx: click.Context, name: str) -> None:
    """Show a network as JSON: subnet, machines and addresses, switch processes.

    \b
    Example:
      pinnace network inspect lan
    """
    from ..network import switch

    async def go(pn: AsyncPinnace) -> None:
        net = pn.networks.get(name)
        members = {m: [{"nic": i, "address": ip} for i, ip in nics]
                   for m, nics in pn.networks.members(name).items()}
        click.echo(json.dumps({**net.to_dict(), "machines": members,
                               "switch": switch.running(net.path)}, indent=2))

    call(ctx, go)


@network.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove networks (refused while machines are on them); their switches stop.

    \b
    Example:
      pinnace network rm lan
    """

    async def act(pn: AsyncPinnace, name: str) -> str:
        await pn.networks.remove(name)
        return "removed"

    each(ctx, names, act)


@network.command()
@click.argument("name")
@click.argument("machine")
@click.option("--ip", metavar="ADDRESS", help="Address on the network (default: next free).")
@click.pass_context
def connect(ctx: click.Context, name: str, machine: str, ip: str | None) -> None:
    """Plug MACHINE into network NAME; a running machine uses a spare NIC (--spare-nics).

    \b
    Example:
      pinnace create c --spare-nics 1 --start && pinnace network connect lan c
    """

    async def go(pn: AsyncPinnace) -> None:
        pn.networks.get(name)
        addr = await (await pn.machines.get(machine)).connect(name, ip)
        click.echo(addr)

    call(ctx, go)


@network.command()
@click.argument("name")
@click.argument("machine")
@click.pass_context
def disconnect(ctx: click.Context, name: str, machine: str) -> None:
    """Unplug MACHINE from network NAME (a running machine keeps the NIC, spare).

    \b
    Example:
      pinnace network disconnect lan c
    """

    async def go(pn: AsyncPinnace) -> None:
        await (await pn.machines.get(machine)).disconnect(name)

    call(ctx, go)
