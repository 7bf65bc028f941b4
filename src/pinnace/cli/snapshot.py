"""Snapshot verbs: create, ls, inspect, rm."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import click

from .common import Group, call, each, echo_table

if TYPE_CHECKING:
    from ..client import AsyncPinnace


@click.group(cls=Group)
def snapshot() -> None:
    """Saved machines that new machines start from in a fraction of a second."""


@snapshot.command()
@click.argument("machine")
@click.argument("name")
@click.pass_context
def create(ctx: click.Context, machine: str, name: str) -> None:
    """Save a running MACHINE as snapshot NAME; the machine keeps running.

    \b
    Example:
      pinnace snapshot create web web-ready && pinnace create web2 --snapshot web-ready
    """

    async def go(pn: AsyncPinnace) -> None:
        t0 = time.monotonic()
        snap = await pn.snapshots.create(await pn.machines.get(machine), name)
        click.echo(f"{snap.name}: saved from {machine} in {time.monotonic() - t0:.1f} s", err=True)

    call(ctx, go)


@snapshot.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def ls(ctx: click.Context, fmt: str) -> None:
    """List snapshots.

    \b
    Example:
      pinnace snapshot ls --format json
    """
    from ..config import format_size

    async def go(pn: AsyncPinnace) -> None:
        snaps = pn.snapshots.list()
        if fmt == "json":
            click.echo(json.dumps([s.to_dict() for s in snaps], indent=2))
            return
        rows = [("NAME", "IMAGE", "SHAPE", "SOURCE", "SIZE", "CREATED")]
        for s in snaps:
            rows.append((s.name, s.image, s.shape, s.source or "-", format_size(s.size),
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created))))
        echo_table(rows)

    call(ctx, go)


@snapshot.command()
@click.argument("name")
@click.option("--verify", is_flag=True, help="Check every file's checksum (reads all of them).")
@click.pass_context
def inspect(ctx: click.Context, name: str, verify: bool) -> None:
    """Show what a snapshot was made from, as JSON.

    \b
    Example:
      pinnace snapshot inspect web-ready --verify
    """
    from ..snapshots import verify as check

    async def go(pn: AsyncPinnace) -> None:
        snap = pn.snapshots.get(name)
        if verify:
            check(snap, full=True)
        click.echo(json.dumps({**snap.to_dict(), "used_by": list(pn.snapshots.users(snap.ref))},
                              indent=2))

    call(ctx, go)


@snapshot.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove snapshots (refused while machines are made from them).

    \b
    Example:
      pinnace snapshot rm web-ready
    """

    async def act(pn: AsyncPinnace, name: str) -> str:
        await pn.snapshots.remove(name)
        return "removed"

    each(ctx, names, act)


__all__ = ["snapshot"]
