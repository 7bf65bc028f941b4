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


def call(ctx: click.Context, fn: Callable[[AsyncPinnace], Coroutine[Any, Any, T]]) -> T:
    """Run ``fn(pinnace)`` on a fresh event loop; turn any error into one line and exit 1
    (a traceback only with -vv)."""
    import asyncio

    from ..client import AsyncPinnace

    try:
        pn = AsyncPinnace(ctx.obj.get("home") if ctx.obj else None)
        return asyncio.run(fn(pn))
    except KeyboardInterrupt:
        click.echo("pinnace: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        fail(exc, verbose=ctx.obj.get("verbose", 0) if ctx.obj else 0)


def each(ctx: click.Context, names: Sequence[str],
         act: Callable[[AsyncPinnace, str], Coroutine[Any, Any, str]]) -> None:
    """Do ``act(pinnace, name)`` for every name, in turn: print what each did ("NAME:
    WHAT") or its error (one line), go on after a failure, and exit 1 if any failed."""
    verbose = ctx.obj.get("verbose", 0) if ctx.obj else 0

    async def go(pn: AsyncPinnace) -> int:
        failed = 0
        for name in names:
            try:
                click.echo(f"{name}: {await act(pn, name)}", err=True)
            except Exception as exc:
                report(exc, verbose)
                failed += 1
        return failed

    if call(ctx, go):
        sys.exit(1)


def echo_table(rows: Sequence[Sequence[str]]) -> None:
    """Print rows (the first is the header) as columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def report(exc: BaseException, verbose: int = 0) -> None:
    """Print an error as one line (plus the log tail a machine or build error carries)."""
    from ..errors import ImageBuildError, MachineError, PinnaceError, SwitchError, store_error

    if verbose > 1:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, OSError) and not isinstance(exc, PinnaceError):
        exc = store_error(exc, "working in the store")
    if isinstance(exc, PinnaceError):
        text = str(exc)
    else:  # a bug: still one line, and how to learn more
        text = (f"internal error: {type(exc).__name__}: {exc} (run with -vv for the "
                "traceback, and please report it)")
    first, _, rest = text.partition("\n")
    click.echo(f"pinnace: error: {first}", err=True)
    if rest and isinstance(exc, (MachineError, ImageBuildError, SwitchError)):
        click.echo(rest, err=True)


def fail(exc: BaseException, verbose: int = 0) -> NoReturn:
    """:func:`report` the error and exit 1."""
    report(exc, verbose)
    sys.exit(1)


class Group(click.Group):
    """Lists verbs in the order they were added, which follows the lifecycle."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class Main(Group):
    """The top-level group: a usage error is one line too, like every other error."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = f"'{exc.ctx.command_path} --help'" if exc.ctx else "'pinnace --help'"
            click.echo(f"pinnace: error: {exc.format_message()} (see {where})", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"pinnace: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("pinnace: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
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
    ctx.obj["verbose"] = verbose


from . import guest as _guest  # noqa: E402
from . import lifecycle as _lifecycle  # noqa: E402
from . import machine as _machine  # noqa: E402
from .gc import gc as _gc  # noqa: E402
from .image import image as _image_group  # noqa: E402
from .network import network as _network_group  # noqa: E402
from .run import run_ as _run  # noqa: E402
from .snapshot import snapshot as _snapshot_group  # noqa: E402
from .volume import volume as _volume_group  # noqa: E402

# In the order of a machine's life; then the other nouns.
for _cmd in (*_machine.COMMANDS[:2], _run, *_machine.COMMANDS[2:3], *_lifecycle.COMMANDS,
             *_machine.COMMANDS[3:], *_guest.COMMANDS, _image_group, _snapshot_group,
             _volume_group, _network_group, _gc):
    main.add_command(_cmd)

__all__ = ["call", "each", "fail", "main", "report"]
