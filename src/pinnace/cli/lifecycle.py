"""Verbs that move machines through their lifecycle: start, stop, halt, kill, pause,
resume, delete. Each takes several names and acts on each in turn."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from .common import each

if TYPE_CHECKING:
    from ..client import AsyncPinnace
    from ..machine import MachineStatus


def said(st: MachineStatus) -> str:
    """A machine's state as the verbs report it: "ready", "failed (why)"."""
    return f"{st.state}" + (f" ({st.reason})" if st.reason else "")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--no-wait", is_flag=True,
              help="Return once QEMU runs, without waiting for the agent (a machine that "
                   "restores a snapshot or a saved state is always restored first).")
@click.option("--timeout", type=float, metavar="SECONDS", help="Boot timeout for this start.")
@click.pass_context
def start(ctx: click.Context, names: tuple[str, ...], no_wait: bool,
          timeout: float | None) -> None:
    """Boot machines and wait until their agents answer.

    \b
    Example:
      pinnace start web db
    """

    async def act(pn: AsyncPinnace, name: str) -> str:
        t0 = time.monotonic()
        st = await (await pn.machines.get(name)).start(wait=not no_wait, timeout=timeout)
        return f"{said(st)} in {time.monotonic() - t0:.2f} s"

    each(ctx, names, act)


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--save", is_flag=True,
              help="Save the running state instead; the next start resumes it.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds for the guest to power off before QEMU is told to quit.")
@click.pass_context
def stop(ctx: click.Context, names: tuple[str, ...], save: bool, timeout: float) -> None:
    """Power machines off through their agents (then quit, then kill).

    \b
    Examples:
      pinnace stop web
      pinnace stop --save web     # start resumes it where it was
    """

    async def act(pn: AsyncPinnace, name: str) -> str:
        return said(await (await pn.machines.get(name)).stop(timeout=timeout, save=save))

    each(ctx, names, act)


def _simple(verb: str, doc: str, example: str) -> click.Command:
    @click.command(name=verb, help=f"{doc}\n\n\b\nExample:\n  {example}")
    @click.argument("names", nargs=-1, required=True)
    @click.pass_context
    def cmd(ctx: click.Context, names: tuple[str, ...]) -> None:
        async def act(pn: AsyncPinnace, name: str) -> str:
            m = await pn.machines.get(name)
            verbs = {"halt": m.halt, "kill": m.kill, "pause": m.pause, "resume": m.resume}
            return said(await verbs[verb]())

        each(ctx, names, act)

    return cmd


halt = _simple("halt", "Stop machines at once without asking the guest; nothing is saved "
               "(a saved machine's saved state is discarded).", "pinnace halt web")
kill = _simple("kill", "SIGKILL machines' QEMU processes.", "pinnace kill web")
pause = _simple("pause", "Stop machines' CPUs; they keep their memory.", "pinnace pause web")
resume = _simple("resume", "Run paused machines again.", "pinnace resume web")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True, help="Kill running machines first.")
@click.pass_context
def delete(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Delete machines and their disks.

    \b
    Example:
      pinnace delete --force web db
    """

    async def act(pn: AsyncPinnace, name: str) -> str:
        await pn.machines.delete(name, force=force)
        return "deleted"

    each(ctx, names, act)


COMMANDS: tuple[click.Command, ...] = (start, stop, halt, kill, pause, resume, delete)

__all__ = ["COMMANDS"]
