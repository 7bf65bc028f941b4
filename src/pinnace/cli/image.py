"""Image verbs: build, ls, inspect, rm."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from ..images.presets import PRESETS
from .common import each, echo_table, fail, verbosity

if TYPE_CHECKING:
    from ..client import AsyncPinnace


def _images(ctx: click.Context) -> Any:
    from ..images import Images
    from ..store import Store

    try:
        return Images(Store(ctx.obj.get("home")))
    except Exception as exc:
        fail(exc, verbosity(ctx))



class RichReporter:
    """Draws build steps with a spinner, the latest output line, and each step's time."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._status: Any = None
        self._name = ""

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        self._name = name
        with self.console.status(name) as status:
            self._status = status
            try:
                yield
            except BaseException:
                self.console.print(f"[red]x[/red] {name} (failed after {time.monotonic() - start:.1f} s)")
                raise
            finally:
                self._status = None
        self.console.print(f"[green]\u2713[/green] {name} [dim]{time.monotonic() - start:.1f} s[/dim]")

    def output(self, line: str) -> None:
        if self._status is not None and line.strip():
            from rich.markup import escape

            self._status.update(f"{self._name} [dim]{escape(line.strip()[:80])}[/dim]")

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]![/yellow] {text}")


@click.group()
def image() -> None:
    """Build, list, inspect and remove images."""


@image.command()
@click.argument("name", default="default")
@click.option("--package", "-p", "packages", multiple=True, metavar="PKG",
              help="Add a Debian package to the root filesystem (repeatable).")
@click.option("--suite", metavar="SUITE", help="Debian suite (default bookworm).")
@click.option("--mirror", metavar="URL", help="Debian mirror (default deb.debian.org; "
              "or $PINNACE_DEBIAN_MIRROR).")
@click.option("--refresh", is_flag=True, help="Rebuild even if cached (fetch newer packages).")
@click.option("--kernel", type=click.Choice(["pinnace", "debian"]), default=None,
              help="pinnace: pinnace's own kernel, built from linux-source once per host "
              "(the default, or $PINNACE_KERNEL); debian: Debian's packaged kernel, its "
              "modules and an initramfs.")
@click.option("--init", "init", type=click.Choice(["agent", "systemd"]), default="agent",
              show_default=True,
              help="agent: pinnace's agent is PID 1 and nothing else runs; systemd: systemd "
              "is PID 1 (services, journald, systemctl) and runs the agent early.")
@click.option("--apt-ready", is_flag=True,
              help="apt assumes yes and its package lists are fetched, as on GitHub's "
              "runners.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Build one of pinnace's own images under its name: ubuntu is what CI "
              "jobs with runs-on: ubuntu-* run on (built on their first use otherwise).")
@click.pass_context
def build(ctx: click.Context, name: str, packages: tuple[str, ...], suite: str | None,
          mirror: str | None, refresh: bool, kernel: str | None, init: str,
          apt_ready: bool, preset: str | None) -> None:
    """Build an image from Debian's packages; cached by a digest of its inputs.

    The first build on a host also builds pinnace's guest kernel (several minutes; every
    store on the host shares it).

    \b
    Examples:
      pinnace image build
      pinnace image build web --package nginx --package curl
      pinnace image build stock --kernel debian
      pinnace image build services --init systemd --apt-ready -p build-essential
      pinnace image build --preset ubuntu
    """
    start = time.monotonic()
    if preset is not None:
        if packages or suite or mirror or kernel or init != "agent" or apt_ready \
                or ctx.get_parameter_source("name") != click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--preset builds the preset as pinnace defines it, under "
                                   "its own name; give it alone (or with --refresh)")
        name = preset
    try:
        if preset is not None:
            img = _images(ctx).ensure_preset(preset, refresh=refresh, reporter=RichReporter())
        else:
            img = _images(ctx).build(name, packages, suite=suite, mirror=mirror,
                                     refresh=refresh, kernel=kernel, init=init,
                                     apt_ready=apt_ready, reporter=RichReporter())
    except KeyboardInterrupt:
        click.echo("pinnace: build interrupted; nothing was added to the store", err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        fail(exc, verbosity(ctx))
    click.echo(f"{name}: {img.short} ({time.monotonic() - start:.1f} s)", err=True)
    click.echo(img.digest)


@image.command(name="ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--quiet", "-q", is_flag=True, help="Only digests.")
@click.pass_context
def ls(ctx: click.Context, fmt: str, quiet: bool) -> None:
    """List built images.

    \b
    Example:
      pinnace image ls
    """
    from ..config import format_size

    try:
        images = _images(ctx).list()
    except Exception as exc:
        fail(exc, verbosity(ctx))
    if quiet:
        for img in images:
            click.echo(img.digest)
        return
    if fmt == "json":
        click.echo(json.dumps([img.to_dict() for img in images], indent=2))
        return
    rows = [("NAME", "DIGEST", "KERNEL", "SIZE", "CREATED")]
    for img in images:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(img.manifest.get("created", 0)))
        rows.append((",".join(img.names) or "<none>", img.short,
                     f"{img.manifest.get('kernel_version', '?')} "
                     f"({img.manifest.get('kernel', 'debian')})", format_size(img.size), created))
    echo_table(rows)


@image.command()
@click.argument("ref", default="default")
@click.pass_context
def inspect(ctx: click.Context, ref: str) -> None:
    """Print an image's manifest: inputs, packages, kernel, files.

    \b
    Example:
      pinnace image inspect default
    """
    try:
        img = _images(ctx).get(ref)
    except Exception as exc:
        fail(exc, verbosity(ctx))
    click.echo(json.dumps(img.to_dict(), indent=2))


@image.command()
@click.argument("refs", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Remove image names; an image's files go with its last name, unless machines use it.

    \b
    Example:
      pinnace image rm web
    """

    async def act(pn: AsyncPinnace, ref: str) -> str:
        return f"removed ({(await pn.images.remove(ref)).short})"

    each(ctx, refs, act)
