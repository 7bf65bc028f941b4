"""The ``pinnace`` command: a thin layer over the Python API.

Start-up is kept lean: only click is imported here; each verb imports what it
needs when it runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from .common import Group, setup_logging


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
from .ci import ci as _ci_group  # noqa: E402
from .gc import gc as _gc  # noqa: E402
from .image import image as _image_group  # noqa: E402
from .network import network as _network_group  # noqa: E402
from .pool import pool as _pool_group  # noqa: E402
from .run import run_ as _run  # noqa: E402
from .snapshot import snapshot as _snapshot_group  # noqa: E402
from .volume import volume as _volume_group  # noqa: E402

# In the order of a machine's life; then the other nouns.
for _cmd in (*_machine.COMMANDS[:2], _run, *_machine.COMMANDS[2:3], *_lifecycle.COMMANDS,
             *_machine.COMMANDS[3:], *_guest.COMMANDS, _image_group, _snapshot_group,
             _volume_group, _network_group, _pool_group, _ci_group, _gc):
    main.add_command(_cmd)

__all__ = ["main"]
