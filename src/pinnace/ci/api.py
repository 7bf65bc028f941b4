"""``pn.ci``: running workflow files (see :mod:`.runner`), from Python and the CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # (YAML and the runner load when a workflow runs, not with pinnace)
    from .runner import Line, RunResult

_MAX_ENV_FILE = 1 << 20


def read_env_file(path: str | os.PathLike[str], what: str = "env file") -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines and ``export `` allowed; a value
    in matching quotes loses them), as act's --env-file and --secret-file read them."""
    p = Path(path)
    try:
        data = p.read_bytes()[:_MAX_ENV_FILE + 1]
    except OSError as exc:
        raise ConfigError(what, str(p), f"cannot read it: {exc.strerror}") from None
    if len(data) > _MAX_ENV_FILE:
        raise ConfigError(what, str(p), "it is larger than 1 MiB")
    out: dict[str, str] = {}
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not eq or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ConfigError(what, f"{p}:{n}", "write KEY=VALUE lines")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


class AsyncCI:
    """Workflows run in fresh machines: ``machines`` (AsyncMachines) make them from
    ``images`` (Images: jobs' images are built when missing); ``volumes`` (AsyncVolumes)
    hold caches; ``backend`` says whether guests get KVM (timeouts are scaled without it)."""

    def __init__(self, machines: Any, backend: Any, *, images: Any, volumes: Any) -> None:
        self.machines = machines
        self.backend = backend
        self.images = images
        self.volumes = volumes

    def caches(self) -> list[dict[str, Any]]:
        """The saved cache entries: cache name, key, volume, bytes used, when saved."""
        from .caches import LABEL_KEY, LABEL_NAME, Caches

        return [{"cache": v.labels[LABEL_NAME], "key": v.labels.get(LABEL_KEY, ""),
                 "volume": v.name, "used": self.volumes.usage(v), "saved": v.created}
                for v in Caches(self.volumes).saved()]

    async def remove_caches(self, name: str | None = None,
                            key: str | None = None) -> list[str]:
        """Remove saved cache entries (of cache ``name``; only ``key``'s if given); the
        volumes removed."""
        from .caches import Caches

        return [v.name for v in await Caches(self.volumes).remove(name, key)]

    def workflows(self, root: str | os.PathLike[str] = ".") -> list[Path]:
        """The workflow files of a repository: .github/workflows/*.yml, .pinnace/ci.yml."""
        from .workflow import discover

        return discover(Path(root))

    async def run(self, path: str | os.PathLike[str], *, job: str | None = None,
                  matrix: Mapping[str, str] | None = None, event: str = "push",
                  env: Mapping[str, str] | None = None,
                  secrets: Mapping[str, str] | None = None, parallel: int | None = None,
                  keep: str = "never", timeout_scale: float = 5.0,
                  platforms: Mapping[str, str] | None = None,
                  logs: str | os.PathLike[str] | None = None,
                  workdir: str | os.PathLike[str] | None = None,
                  artifacts: str | os.PathLike[str] = "ci-artifacts", bind: bool = False,
                  net: str | None = None,
                  cgroups: bool = True, on_line: Line | None = None) -> RunResult:
        """Run workflow file ``path``: every job that can run (``job``: that one and what
        it needs; ``matrix``: only the combinations with these values), in fresh
        machines, as many at once as the host's free memory and CPUs hold (``parallel``:
        at most that many). ``workdir`` is what actions/checkout checks out and hashFiles
        hashes (default: the repository the file is in); ``bind``: jobs work in
        ``workdir`` itself, shared into their machines, not in a copy; ``artifacts`` the
        folder jobs' artifacts are copied to. Returns each job's result with its steps."""
        from .runner import Options, Runner
        from .workflow import load, triggered

        if keep not in ("never", "failed", "always"):
            raise ConfigError("keep", keep, "give never, failed or always")
        if parallel is not None and (not isinstance(parallel, int) or not 1 <= parallel <= 64):
            raise ConfigError("parallel", parallel, "give 1 to 64 jobs at once")
        if not 1 <= timeout_scale <= 100:
            raise ConfigError("timeout scale", timeout_scale, "give 1 to 100")
        wf = load(Path(path), event=event)
        if wf.kind == "github" and not triggered(wf, event):
            raise ConfigError("event", event, f"{wf.path.name} does not run on it; give "
                              "--event with one of its triggers")
        choice = await self.backend.choose_accel("auto")
        if workdir is None:
            workdir = _repository(Path(path))
        options = Options(job=job, matrix=dict(matrix or {}), event=event, env=dict(env or {}),
                          secrets=dict(secrets or {}), parallel=parallel, keep=keep,
                          timeout_scale=timeout_scale, platforms=dict(platforms or {}),
                          logs=Path(logs) if logs else None,
                          workdir=Path(workdir) if workdir else None,
                          artifacts=Path(artifacts), bind=bind, net=net, cgroups=cgroups,
                          on_line=on_line)
        runner = Runner(self.machines, images=self.images, volumes=self.volumes,
                        accelerated=choice.accel == "kvm")
        return await runner.run(wf, options)


def _repository(path: Path) -> Path:
    """The folder a workflow file belongs to: above .github/workflows, else its own."""
    path = path.resolve()
    for parent in path.parents:
        if (parent / ".git").exists() or (parent / ".github").is_dir():
            return parent
    return path.parent


__all__ = ["AsyncCI", "read_env_file"]
