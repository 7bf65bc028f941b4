"""``pinnace run``: machines from the ready snapshot, and a command in them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from .common import call
from .guest import PASSTHROUGH, exit_code_of, stream_exec
from .machine import device_options, devices, size_option

if TYPE_CHECKING:
    from ..client import AsyncPinnace


@click.command(name="run", context_settings=PASSTHROUGH)
@click.option("--name", "-n", help="Machine name (with --count: NAME-1..NAME-N); default random.")
@click.option("--image", "-i", default="default", show_default=True, help="Image name or digest.")
@click.option("--cpus", "-c", type=int, help="Virtual CPUs (default 1).")
@size_option
@click.option("--count", type=int, default=1, show_default=True, help="Machines to start at once.")
@click.option("--rm", "remove", is_flag=True, help="Delete the machines when the command ends.")
@click.option("--timeout", "-t", type=float, metavar="SECONDS", help="Kill the command after this.")
@click.option("--interactive", is_flag=True, help="Send this terminal's stdin to the command.")
@device_options
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
            image=image, name=name, count=count, cpus=cpus, memory=memory, rm=remove,
            notify=lambda m: click.echo(f"pinnace: {m}", err=True),
            **devices(net, ports, networks, spare_nics, volumes, shares))
        try:
            if not argv:
                for m in machines:
                    click.echo(m.name)
                return 0
            if len(machines) == 1:
                return await exit_code_of(stream_exec(
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

    sys.exit(call(ctx, go))



__all__ = ["run_"]
