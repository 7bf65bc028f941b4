"""Volume verbs: create, ls, inspect, rm."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from .common import Group, call, each, echo_table

if TYPE_CHECKING:
    from ..client import AsyncPinnace
    from ..volumes import Volume


@click.group(cls=Group)
def volume() -> None:
    """Volumes: sparse ext4 disks that outlive machines."""


@volume.command()
@click.argument("name")
@click.option("--size", required=True,
              help="Size of the disk the guest sees: 10G, 512M, or a bare number of MiB "
                   "(16M to 16T). The file takes only the space written to it.")
@click.option("--journal/--no-journal", default=True, show_default=True,
              help="Format ext4 with a journal (off: a little faster, but a crash can need fsck).")
@click.pass_context
def create(ctx: click.Context, name: str, size: str, journal: bool) -> None:
    """Make volume NAME: a sparse file of --size, formatted ext4; prints its name.

    \b
    Example:
      pinnace volume create data --size 10G
    """

    async def go(pn: AsyncPinnace) -> None:
        vol = await pn.volumes.create(name, size, journal=journal)
        click.echo(vol.name)

    call(ctx, go)


def _row(pn: AsyncPinnace, vol: Volume) -> dict[str, Any]:
    """What ls and inspect show about one volume."""
    return {**vol.to_dict(), "used": pn.volumes.usage(vol),
            "attached_to": list(pn.volumes.users(vol.name))}


@volume.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--quiet", "-q", is_flag=True, help="Only names.")
@click.pass_context
def ls(ctx: click.Context, fmt: str, as_json: bool, quiet: bool) -> None:
    """List volumes: size the guest sees, space used on the host, machines attached.

    \b
    Examples:
      pinnace volume ls
      pinnace volume ls --json
    """
    from ..config import format_size

    async def go(pn: AsyncPinnace) -> list[dict[str, Any]]:
        return [_row(pn, v) for v in pn.volumes.list()]

    rows = call(ctx, go)
    if quiet:
        for r in rows:
            click.echo(r["name"])
        return
    if as_json or fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("NAME", "SIZE", "USED", "JOURNAL", "ATTACHED-TO")]
    for r in rows:
        table.append((r["name"], format_size(r["size"]), format_size(r["used"]),
                      "yes" if r["journal"] else "no", ",".join(r["attached_to"]) or "-"))
    echo_table(table)


@volume.command()
@click.argument("name")
@click.pass_context
def inspect(ctx: click.Context, name: str) -> None:
    """Show a volume as JSON: its volume.json, path, bytes used and machines attached.

    \b
    Example:
      pinnace volume inspect data
    """

    async def go(pn: AsyncPinnace) -> None:
        click.echo(json.dumps(_row(pn, pn.volumes.get(name)), indent=2))

    call(ctx, go)


@volume.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove volumes and their data (refused while a machine uses one).

    Each NAME is tried in turn; the command fails if any of them could not be removed.

    \b
    Example:
      pinnace volume rm data scratch
    """

    async def act(pn: AsyncPinnace, name: str) -> str:
        await pn.volumes.remove(name)
        return "removed"

    each(ctx, names, act)


__all__ = ["volume"]
