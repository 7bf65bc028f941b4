"""The ``pinnace`` command: a thin layer over the Python API.

Start-up is kept lean: only click is imported here; each verb imports what it
needs when it runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from ..client import AsyncPinnace

T = TypeVar("T")


class _NoticeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "pinnace: notice: " if record.levelno == logging.WARNING else "pinnace: "
        if record.levelno >= logging.ERROR:
            prefix = "pinnace: error: "
        if record.levelno < logging.WARNING:
            prefix = f"pinnace: {record.name}: "
        return prefix + record.getMessage()


def setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoticeFormatter())
    root = logging.getLogger("pinnace")
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1
                  else logging.DEBUG)
    if verbose > 1:
        logging.getLogger("qemu").addHandler(handler)
        logging.getLogger("qemu").setLevel(logging.DEBUG)


def run(ctx: click.Context, fn: Callable[[AsyncPinnace], Coroutine[Any, Any, T]]) -> T:
    """Run ``fn(pinnace)`` on a fresh event loop; turn pinnace errors into one line and exit 1."""
    import asyncio

    from ..client import AsyncPinnace
    from ..errors import PinnaceError

    try:
        pn = AsyncPinnace(ctx.obj.get("home") if ctx.obj else None)
        return asyncio.run(fn(pn))
    except PinnaceError as exc:
        fail(exc)
    except KeyboardInterrupt:
        click.echo("pinnace: interrupted", err=True)
        sys.exit(130)


def echo_table(rows: Sequence[Sequence[str]]) -> None:
    """Print rows (the first is the header) as columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def fail(exc: BaseException) -> NoReturn:
    """Print an error as one line (plus the log tail it carries) and exit non-zero."""
    from ..errors import ImageBuildError, MachineError

    text = str(exc)
    first, _, rest = text.partition("\n")
    click.echo(f"pinnace: error: {first}", err=True)
    if rest and isinstance(exc, (MachineError, ImageBuildError)):
        click.echo(rest, err=True)
    sys.exit(1)


class Group(click.Group):
    """Lists verbs in the order they were added, which follows the lifecycle."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More output: -v for steps, -vv for debug.")
@click.version_option(package_name="pinnace")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Disposable Linux microVMs for testing networked and system software.

    \b
    The store lives in $PINNACE_HOME (default ~/.local/share/pinnace).
    A first session:
      pinnace image build
      pinnace create vm1 && pinnace start vm1
      pinnace exec vm1 -- uname -a
      pinnace delete --force vm1
    """
    setup_logging(verbose)
    ctx.ensure_object(dict)
    ctx.obj["home"] = os.environ.get("PINNACE_HOME") or None


from .image import image as _image_group  # noqa: E402
from .machine import register as _register_machine_verbs  # noqa: E402
from .network import network as _network_group  # noqa: E402
from .snapshot import snapshot as _snapshot_group  # noqa: E402
from .volume import volume as _volume_group  # noqa: E402

_register_machine_verbs(main)
main.add_command(_image_group)
main.add_command(_snapshot_group)
main.add_command(_volume_group)
main.add_command(_network_group)

__all__ = ["main"]
