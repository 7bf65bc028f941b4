"""``pinnace pool``: the warm pool of restored clones that ``run`` claims."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .common import call, echo_table

if TYPE_CHECKING:
    from ..client import AsyncPinnace
    from ..pool import Member


@click.group()
def pool() -> None:
    """The warm pool: restored, warmed-up clones that 'pinnace run' claims.

    \b
    A claimed clone answers its first exec in a few tens of ms where a restore takes
    a few hundred. When its size is set, each 'run' it could serve refills it in the
    background (a detached 'pinnace pool fill' that exits when the pool is full); 0,
    the default, turns it off.
    \b
    Examples:
      pinnace pool size 2      # keep two per image and shape
      pinnace pool fill        # fill the default shape now
      pinnace pool ls
      pinnace pool drain
    """


def _shape_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed((
        click.option("--image", default="default", show_default=True, help="Image."),
        click.option("--cpus", type=int, help="Virtual CPUs (default 1)."),
        click.option("--memory", "-m", metavar="SIZE", help="RAM, e.g. 512M (default 512M)."),
        click.option("--net", type=click.Choice(["nat", "restricted"]),
                     help="The NAT NIC's mode (default $PINNACE_DEFAULT_NET, else nat)."),
        click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
                     show_default=True, help="The accelerator its machines run on."),
    )):
        f = opt(f)
    return f


@pool.command()
@click.argument("size", required=False, type=int)
@click.pass_context
def size(ctx: click.Context, size: int | None) -> None:
    """Show or set how many clones the pool keeps per image and shape (0: off, and the
    clones waiting now are removed).

    \b
    Examples:
      pinnace pool size        # show it ($PINNACE_POOL_SIZE overrides the setting)
      pinnace pool size 3
    """

    async def go(pn: AsyncPinnace) -> int:
        if size is not None:
            pn.pool.set_size(size)
            if size == 0:
                for name in await pn.pool.drain():
                    click.echo(f"removed {name}", err=True)
        return pn.pool.size()

    click.echo(call(ctx, go))


@pool.command()
@_shape_options
@click.option("--size", "count", type=int, metavar="N",
              help="Fill to N clones (default: the pool's size setting).")
@click.pass_context
def fill(ctx: click.Context, image: str, cpus: int | None, memory: str | None,
         net: str | None, accel: str, count: int | None) -> None:
    """Start clones until the pool of a shape is full (stale and dead ones go first).

    \b
    Examples:
      pinnace pool fill --size 2
      pinnace pool fill --image web --cpus 2 --memory 1G --net restricted
    """

    async def go(pn: AsyncPinnace) -> list[str]:
        if count is None and pn.pool.size() == 0:
            click.echo("pinnace: the pool's size is 0: nothing to fill (set it with "
                       "'pinnace pool size N', or give --size N)", err=True)
        return await pn.pool.fill(image=image, cpus=cpus, memory=memory, net=net,
                                  accel=accel, size=count,
                                  notify=lambda msg: click.echo(msg, err=True))

    started = call(ctx, go)
    for name in started:
        click.echo(f"started {name}")


@pool.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def ls(ctx: click.Context, fmt: str) -> None:
    """List the pool's clones.

    \b
    Example:
      pinnace pool ls --format json
    """

    async def go(pn: AsyncPinnace) -> list[Member]:
        return await pn.pool.list()

    members = call(ctx, go)
    if fmt == "json":
        click.echo(json.dumps([m.to_dict() for m in members], indent=2))
        return
    rows = [("NAME", "SHAPE", "STATE", "AGE")]
    for m in members:
        slot, _, net = m.key.partition("/")
        shape = "-".join(slot.split("-")[1:4]) + f" {net}"
        state = f"{m.state} (stale)" if m.stale else m.state
        rows.append((m.name, shape, state, f"{time.time() - m.created:.0f}s"))
    echo_table(rows)


@pool.command()
@click.pass_context
def drain(ctx: click.Context) -> None:
    """Remove every clone in the pool (the size setting stays: runs refill it; 'pinnace
    pool size 0' turns it off and drains it). Fillers at work are waited for first.

    \b
    Example:
      pinnace pool drain
    """

    async def go(pn: AsyncPinnace) -> list[str]:
        return await pn.pool.drain()

    for name in call(ctx, go):
        click.echo(f"removed {name}")


__all__ = ["pool"]
