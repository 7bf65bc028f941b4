"""``pinnace gc``: remove what crashed commands left behind."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .common import call

if TYPE_CHECKING:
    from ..client import AsyncPinnace
    from ..gc import Removed


@click.command()
@click.option("--dry-run", "-n", is_flag=True, help="Only say what would be removed.")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool) -> None:
    """Remove what commands that died left behind: staging folders, machines of a
    'run --rm' whose command died, machines, networks and volumes of pytest sessions
    that died, warm-pool members that are dead or stale, QEMU and
    switch processes no machine or network owns, unused ready snapshots, and kernel
    builds killed half-way in the host's kernel cache. Prints one line per thing removed.

    \b
    Example:
      pinnace gc --dry-run
    """

    async def go(pn: AsyncPinnace) -> list[Removed]:
        return await pn.gc(dry_run=dry_run)

    removed = call(ctx, go)
    for r in removed:
        click.echo(f"would have {r}" if dry_run else str(r))
    if not removed:
        click.echo("nothing to remove", err=True)


__all__ = ["gc"]
