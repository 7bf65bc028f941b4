"""What every CLI verb shares: running an API call, one-line errors, tables, groups."""

from __future__ import annotations

import logging
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
        fail(exc, verbose=verbosity(ctx))


def verbosity(ctx: click.Context) -> int:
    """How many -v the user gave (-vv adds tracebacks to errors)."""
    return int(ctx.obj.get("verbose", 0)) if ctx.obj else 0


def each(ctx: click.Context, names: Sequence[str],
         act: Callable[[AsyncPinnace, str], Coroutine[Any, Any, str]]) -> None:
    """Do ``act(pinnace, name)`` for every name, in turn: print what each did ("NAME:
    WHAT") or its error (one line), go on after a failure, and exit 1 if any failed."""
    verbose = verbosity(ctx)

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
    from ..errors import ImageBuildError, MachineError, PinnaceError, SwitchError

    if verbose > 1:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, OSError) and not isinstance(exc, PinnaceError):
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
    elif isinstance(exc, PinnaceError):
        text = str(exc)
    else:  # a bug: still one line, and how to learn more
        text = (f"internal error: {type(exc).__name__}: {exc} (run with -vv for the "
                "traceback, and please report it)")
    first, _, rest = text.partition("\n")
    # What the user typed (or a guest said) may hold control characters: shown escaped.
    first = "".join(c if c.isprintable() else repr(c)[1:-1] for c in first)
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


__all__ = ["Group", "call", "each", "echo_table", "fail", "report", "setup_logging",
           "verbosity"]
