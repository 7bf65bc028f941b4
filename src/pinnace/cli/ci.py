"""CI verbs: run, cache ls, cache rm."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from .common import Group, call, echo_table

if TYPE_CHECKING:
    from ..client import AsyncPinnace


@click.group(cls=Group)
def ci() -> None:
    """Run CI workflows (pinnace's own, and GitHub Actions' run: steps) in fresh machines."""


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise click.UsageError(f"{what} {v!r}: give KEY=VALUE")
        out[key] = value
    return out


@ci.command()
@click.argument("files", nargs=-1)
@click.option("--job", "-j", metavar="ID", help="Run this job (and the jobs it needs).")
@click.option("--matrix", multiple=True, metavar="KEY=VALUE",
              help="Run only the matrix combinations with this value (repeatable).")
@click.option("--event", default="push", show_default=True, help="The triggering event.")
@click.option("--env-file", type=click.Path(dir_okay=False), help="KEY=VALUE lines: env.")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="KEY=VALUE lines: the secrets context.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="Jobs at once at most [default: as many as the host's free memory and "
                   "CPUs hold].")
@click.option("--keep", type=click.Choice(["never", "failed", "always"]), default="never",
              show_default=True, help="Keep a job's machine afterwards.")
@click.option("--timeout-scale", type=click.FloatRange(1, 100), default=5.0,
              show_default=True, help="Multiply timeouts by this without KVM.")
@click.option("-P", "--platform", "platforms", multiple=True, metavar="LABEL=IMAGE",
              help="Run jobs with this runs-on label on this image (like act).")
@click.option("--logs", type=click.Path(file_okay=False), help="Save each step's log here.")
@click.option("--bind", is_flag=True, help="Jobs work in this folder itself (shared into "
              "their machines; what they change stays), not in a checkout's copy.")
@click.option("--artifacts", type=click.Path(file_okay=False), default="ci-artifacts",
              show_default=True, help="Copy jobs' artifacts here (a folder per job).")
@click.option("--no-cgroup", "cgroups", flag_value=False, default=True,
              help="Do not confine jobs' QEMUs in cgroups (no memory, CPU, pids limits).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def run(ctx: click.Context, files: tuple[str, ...], job: str | None, matrix: tuple[str, ...],
        event: str, env_file: str | None, secret_file: str | None, parallel: int | None,
        keep: str, timeout_scale: float, platforms: tuple[str, ...], logs: str | None,
        bind: bool, artifacts: str, cgroups: bool, fmt: str) -> None:
    """Run workflow FILES (default: this repository's .github/workflows and
    .pinnace/ci.yml), each job in a fresh machine; steps stream with job/step prefixes.

    \b
    Example:
      pinnace ci run .github/workflows/ci.yml --job test --matrix python=3.11
      pinnace ci run ci.yml --keep failed
    """
    from ..ci.api import read_env_file
    from ..ci.workflow import discover

    wanted = _pairs(matrix, "--matrix")
    plat = _pairs(platforms, "-P")

    def line(label: str, step: str, text: str) -> None:
        if fmt == "text":
            click.echo(f"[{label}/{step}] {text}")

    async def go(pn: AsyncPinnace) -> int:
        paths = list(files) or [str(p) for p in discover(".")]
        if not paths:
            raise click.UsageError("no workflow files here; give FILES")
        env = read_env_file(env_file) if env_file else {}
        secrets = read_env_file(secret_file, "secret file") if secret_file else {}
        code = 0
        out: list[dict[str, Any]] = []
        for path in paths:
            result = await pn.ci.run(path, job=job, matrix=wanted, event=event, env=env,
                                     secrets=secrets, parallel=parallel, keep=keep,
                                     timeout_scale=timeout_scale, platforms=plat, logs=logs,
                                     artifacts=artifacts, bind=bind, cgroups=cgroups,
                                     on_line=line)
            out.append(result.to_dict())
            if not result.ok:
                code = 1
            if fmt == "text":
                for note in result.notes:
                    click.echo(f"note: {note}", err=True)
                for s in result.skipped:
                    click.echo(f"skipped: {s}", err=True)
                for j in result.jobs:
                    took = f"{j.start:.1f}s start, {j.steps_seconds:.1f}s steps"
                    why = f": {j.reason}" if j.reason else ""
                    click.echo(f"{j.status:9} {j.variant} ({took}){why}")
                    for step in j.steps:
                        if step.console:
                            click.echo(f"          console of {j.variant}, as "
                                       f"'{step.name}' failed:")
                            for ln in step.console.splitlines():
                                click.echo(f"          | {ln}")
                    if j.machine:
                        click.echo(f"          kept machine {j.machine}: pinnace shell "
                                   f"{j.machine}")
        if fmt == "json":
            click.echo(json.dumps(out, indent=2))
        return code

    sys.exit(call(ctx, go))


@ci.group(cls=Group)
def cache() -> None:
    """The caches jobs saved (pinnace's format: caches:), kept as volumes.

    \b
    Example:
      pinnace ci cache ls
      pinnace ci cache rm pip
    """


@cache.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
@click.pass_context
def cache_ls(ctx: click.Context, as_json: bool) -> None:
    """List saved cache entries: cache, key, space used, when saved.

    \b
    Example:
      pinnace ci cache ls --json
    """
    import time

    from ..config import format_size

    async def go(pn: AsyncPinnace) -> list[dict[str, Any]]:
        return pn.ci.caches()

    rows = call(ctx, go)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("CACHE", "KEY", "USED", "SAVED")]
    for r in rows:
        table.append((r["cache"], r["key"], format_size(r["used"]),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["saved"]))))
    echo_table(table)


@cache.command(name="rm")
@click.argument("name", required=False)
@click.option("--key", help="Only the entry of this key.")
@click.option("--all", "all_", is_flag=True, help="Every cache's entries.")
@click.pass_context
def cache_rm(ctx: click.Context, name: str | None, key: str | None, all_: bool) -> None:
    """Remove the saved entries of cache NAME (or of every cache, with --all).

    \b
    Example:
      pinnace ci cache rm pip --key pip-3f2a...
    """
    if (name is None) == (not all_):
        raise click.UsageError("give a cache's NAME, or --all")

    async def go(pn: AsyncPinnace) -> list[str]:
        return await pn.ci.remove_caches(name, key)

    gone = call(ctx, go)
    for v in gone:
        click.echo(f"removed {v}")
    if not gone:
        click.echo("no saved entry matched", err=True)
