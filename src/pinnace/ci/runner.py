"""Running a workflow's jobs, each in a fresh machine restored from its image's ready
snapshot, in the order their ``needs`` allow and as many at once as ``parallel`` lets.

A job's machine gets a ``runner`` user with passwordless sudo and ``/workspace``; each
step's script is written into the machine and run as that user by its shell (GitHub's
argv, :func:`.workflow.shell_command`), with the job's environment, while its output
streams to :attr:`Options.on_line` and to a log file per step. After each step the
runner reads what the step wrote to ``$GITHUB_ENV``, ``$GITHUB_OUTPUT``,
``$GITHUB_PATH`` and ``$GITHUB_STEP_SUMMARY`` (:mod:`.envfile`). ``${{ }}`` expressions
are evaluated on the host (:mod:`.expressions`) with GitHub's contexts. The machine is
deleted at the end of the job, or kept (``keep``) for a look inside.

Timeouts: a step's ``timeout-minutes`` and the job's (which counts from its first step,
not from the machine's start), both multiplied by ``timeout_scale`` when guests run
without KVM (software emulation is several times slower), and the run says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import MachineConfig
from ..errors import ConfigError, PinnaceError, TooLargeError
from ..images.presets import PRESETS
from . import envfile
from .budget import Budget
from .caches import Attached, Caches
from .expressions import condition, evaluate, interpolate
from .workflow import (
    ImageSpec,
    Job,
    Skipped,
    Step,
    Workflow,
    expand,
    platform,
    select,
    stages,
)

DEFAULT_JOB_MINUTES = 360.0  # GitHub's default timeout-minutes
QEMU_OVERHEAD = 512 << 20  # what a job's QEMU may use beyond its guest's memory
QEMU_PIDS = 1024  # threads of a job's QEMU (the guest's own processes are not the host's)
MAX_ARTIFACTS = 4 << 30  # bytes of artifacts one job may copy out
ARTIFACT_SECONDS = 1800  # and how long copying them may take
WORKSPACE = "/workspace"
RUNNER_DIR = "/tmp/_runner"
USER = "runner"
_SETUP = f"""set -e
id {USER} >/dev/null 2>&1 || useradd -m -u 1001 -s /bin/bash {USER}
echo '{USER} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/{USER}
chmod 0440 /etc/sudoers.d/{USER}
command -v python >/dev/null || ln -sf "$(command -v python3)" /usr/local/bin/python
mkdir -p {WORKSPACE} {RUNNER_DIR}/temp
chown -R {USER}: {RUNNER_DIR}
chown {USER}: {WORKSPACE} 2>/dev/null || :
"""
# --bind: /workspace is the host's folder (9p, owners kept in xattrs): the runner user
# is given it where the host's filesystem keeps them; where it cannot, files stay as
# the host has them, and the run says so.
_BIND = (f"chown -R {USER}: {WORKSPACE} 2>/dev/null || echo 'pinnace: cannot give "
         f"{WORKSPACE} to {USER} (--bind): does the host folder take extended attributes?' "
         ">&2\n")
# Read back what a step wrote for the runner: per file "SIZE\n" then its first
# envfile.MAX_BYTES bytes (sh, not python: a python start costs ~0.5 s without KVM).
_READ_FILES = (f'for f do if [ -s "$f" ]; then wc -c < "$f"; head -c {envfile.MAX_BYTES} "$f"; '
               'else echo 0; fi; done')


@dataclass
class StepResult:
    """One step: ``outcome`` is how it ended (success, failure, skipped, cancelled);
    ``conclusion`` is what counts after ``continue-on-error``."""

    index: int
    name: str
    id: str | None
    outcome: str = "skipped"
    conclusion: str = "skipped"
    exit_code: int | None = None
    seconds: float = 0.0
    reason: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    console: str = ""  # the machine's serial console, when the step ran out of memory


@dataclass
class JobResult:
    """One job (one matrix combination): its status (success, failure, skipped,
    cancelled), steps, outputs, and where its time went: ``start`` (from asking for a
    machine to the first step), ``steps_seconds``, ``cleanup`` (after the last step)."""

    id: str
    variant: str
    status: str = "skipped"
    reason: str = ""
    steps: list[StepResult] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    start: float = 0.0
    steps_seconds: float = 0.0
    cleanup: float = 0.0
    machine: str | None = None  # kept for a look inside
    summary: str = ""
    artifacts: list[str] = field(default_factory=list)  # files and folders copied out

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["steps"] = [{**s.__dict__, "log": str(s.log) if s.log else None} for s in self.steps]
        return out


@dataclass
class RunResult:
    """A workflow's run: each job's result, and the jobs that could not run."""

    workflow: str
    jobs: list[JobResult]
    skipped: list[Skipped]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(j.status in ("success", "skipped") for j in self.jobs)

    def to_dict(self) -> dict[str, Any]:
        return {"workflow": self.workflow, "ok": self.ok, "notes": self.notes,
                "jobs": [j.to_dict() for j in self.jobs],
                "skipped": [str(s) for s in self.skipped]}


Line = Callable[[str, str, str], None]  # (job label, step name, a line of output)


@dataclass
class Options:
    """How to run: ``job`` and ``matrix`` select (see :func:`.workflow.select`);
    ``event`` the triggering event's name; ``env`` and ``secrets`` (from --env-file and
    --secret-file); ``parallel`` jobs at once at most (None: as many as the host's free
    memory and CPUs hold, see :mod:`.budget`); ``keep`` "never", "failed" or "always";
    ``timeout_scale`` multiplies timeouts without KVM; ``platforms`` maps runs-on labels
    to images (-P); ``logs`` is where step logs go; ``workdir`` the repository
    (checkout's source, and what hashFiles hashes); ``bind``: jobs work in ``workdir``
    itself (shared into the machine as /workspace, so what they change stays) instead
    of a checkout's copy; ``artifacts`` the folder jobs' artifacts are copied to (a
    folder per job); ``net`` the machines' NAT NIC (None: pinnace's default)."""

    job: str | None = None
    matrix: Mapping[str, str] = field(default_factory=dict)
    event: str = "push"
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict)
    parallel: int | None = None
    keep: str = "never"
    timeout_scale: float = 5.0
    platforms: Mapping[str, str] = field(default_factory=dict)
    logs: Path | None = None
    workdir: Path | None = None
    artifacts: Path = Path("ci-artifacts")
    bind: bool = False  # /workspace is ``workdir`` itself, shared, not a checkout's copy
    net: str | None = None
    cgroups: bool = True  # each job's QEMU in a cgroup with memory, CPU and pids limits
    on_line: Line | None = None


class Runner:
    """Runs workflows with ``machines`` (an AsyncMachines), ``images`` (an Images: jobs'
    images are built when missing), ``volumes`` (an AsyncVolumes: caches) and
    ``accelerated`` (True when guests run with KVM: timeouts are not scaled)."""

    def __init__(self, machines: Any, *, images: Any, volumes: Any, accelerated: bool,
                 budget: Budget | None = None) -> None:
        self.machines = machines
        self.images = images
        self.caches = Caches(volumes)
        self.accelerated = accelerated
        self.budget = budget
        self._building: dict[str, asyncio.Task[str]] = {}

    async def build(self, name: str, line: Callable[[str], None], *,
                    packages: tuple[str, ...] = (), preset: bool = False) -> str:
        """Image ``name`` (from ``packages``, or the preset of that name), built unless
        the store has it as it should be; once however many jobs ask at once (its
        progress goes to the first one's ``line``)."""
        task = self._building.get(name)
        if task is None:
            reporter = _LineReporter(line)

            def build() -> str:
                if preset:
                    self.images.ensure_preset(name, reporter=reporter)
                else:
                    self.images.ensure(name, packages, reporter=reporter)
                return name

            task = self._building[name] = asyncio.ensure_future(asyncio.to_thread(build))
        return await asyncio.shield(task)

    async def run(self, workflow: Workflow, options: Options) -> RunResult:
        jobs = select(workflow, options.job, options.matrix)
        plan = stages(jobs)  # (checks needs: unknown ones and cycles)
        if not jobs:
            raise ConfigError("workflow", str(workflow.path), "no job in it can run here: "
                              + "; ".join(str(s) for s in workflow.skipped[:3]))
        scale = 1.0 if self.accelerated else options.timeout_scale
        notes = [] if scale == 1.0 else [
            f"no KVM: guests run in software emulation, so timeouts are {scale:g}x "
            "(--timeout-scale)"]
        budget = self.budget or Budget.for_host(options.parallel or 64)
        run = _Run(self, workflow, options, scale, budget)
        tasks = []
        for j in (j for stage in plan for j in stage):  # (each waits for what it needs)
            tasks.append(asyncio.ensure_future(run.job(j)))
            run.by_id.setdefault(j.id, []).append(tasks[-1])
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        return RunResult(str(workflow.path), results, workflow.skipped, notes)


class _Run:
    """The state of one workflow run: finished jobs by id (for ``needs``)."""

    def __init__(self, runner: Runner, wf: Workflow, options: Options, scale: float,
                 budget: Budget) -> None:
        self.runner, self.wf, self.options, self.scale = runner, wf, options, scale
        self.budget = budget
        self.by_id: dict[str, list[asyncio.Future[list[JobResult]]]] = {}
        self.failed_ids: set[str] = set()  # matrix jobs with a failed combination
        self.per_job: dict[str, asyncio.Semaphore] = {}
        self.run_id = str(int(time.time()))
        self.functions = {"hashFiles": self.hash_files}
        self.hashes: dict[tuple[str, ...], str] = {}
        self.masks = sorted((v for v in options.secrets.values() if len(v) >= 3),
                            key=len, reverse=True)

    async def needs(self, job: Job) -> dict[str, dict[str, Any]]:
        """Wait for the jobs ``job`` needs; GitHub's ``needs`` context (a matrix job's
        result is failure if any combination failed; its outputs are the last one's)."""
        await asyncio.sleep(0)  # (every task registered first)
        out: dict[str, dict[str, Any]] = {}
        for need in job.needs:
            results = [r for t in self.by_id.get(need, []) for r in await t]
            status = ("failure" if any(r.status == "failure" for r in results)
                      else "cancelled" if any(r.status == "cancelled" for r in results)
                      else "skipped" if results and all(r.status == "skipped" for r in results)
                      else "success")
            outputs: dict[str, str] = {}
            for r in results:
                outputs.update(r.outputs)
            out[need] = {"result": status, "outputs": outputs}
        return out

    # --- a job ---

    async def job(self, job: Job) -> list[JobResult]:
        """Run ``job`` once what it needs is done: one result, or one per combination of
        a matrix written as an expression (evaluated now, with ``needs`` known)."""
        needs = await self.needs(job)
        if not job.strategy.deferred:
            return [await self._one(job, needs)]
        try:
            variants = expand(job, matrix=_resolve(job.strategy.matrix,
                                                   self.contexts(job, needs)),
                              filters=self.options.matrix)
        except PinnaceError as exc:
            return [JobResult(job.id, job.name or job.id, "failure", f"its matrix: {exc}")]
        return list(await asyncio.gather(*(self._one(v, needs) for v in variants)))

    async def _one(self, job: Job, needs: dict[str, dict[str, Any]]) -> JobResult:
        result = JobResult(job.id, job.variant or job.name or job.id)
        contexts = self.contexts(job, needs)
        needs_ok = all(n["result"] == "success" for n in needs.values())

        def job_status(name: str) -> bool:
            return {"success": needs_ok, "failure": not needs_ok, "always": True,
                    "cancelled": False}.get(name, False)

        try:
            go = condition(job.if_, contexts, status=job_status)
        except PinnaceError as exc:
            result.status, result.reason = "failure", f"its if: {exc}"
            return result
        if not go:
            result.reason = "its if: is false" if job.if_ else "a job it needs did not succeed"
            return result
        if job.strategy.fail_fast and job.id in self.failed_ids:
            result.status, result.reason = "cancelled", "another combination failed (fail-fast)"
            return result
        most = job.strategy.max_parallel  # (strategy.max-parallel: of this job's combinations)
        own = self.per_job.setdefault(job.id, asyncio.Semaphore(most or 64))
        try:
            image = await self.image(job, contexts)
            memory, cpus = self.shape(job)
            async with own, self.budget.take(memory, cpus):
                if job.strategy.fail_fast and job.id in self.failed_ids:
                    result.status, result.reason = "cancelled", "another combination failed"
                    return result
                await self._in_machine(job, image, contexts, result)
        except PinnaceError as exc:
            result.status, result.reason = "failure", f"its machine did not start: {exc}"
        except OSError as exc:  # (the host's: a folder for logs or artifacts, say)
            result.status, result.reason = "failure", f"on the host: {exc}"
        if result.status == "failure":
            self.failed_ids.add(job.id)
        return result

    async def image(self, job: Job, contexts: dict[str, Any]) -> str:
        """The name of the image ``job`` runs on, built first if it is missing: an image
        from packages (pinnace's format), or a preset such as ``ubuntu`` (runs-on)."""
        if isinstance(job.image, ImageSpec):
            digest = hashlib.sha256(" ".join(sorted(job.image.packages)).encode())
            name = f"ci-{digest.hexdigest()[:12]}"
            return await self.runner.build(name, self.image_line(job),
                                           packages=job.image.packages)
        if isinstance(job.image, str):
            name = job.image
        else:
            runs_on: Any = job.runs_on
            if isinstance(runs_on, str) and "${{" in runs_on:
                runs_on = interpolate(runs_on, contexts)
            found = platform(runs_on, self.options.platforms)
            if found is None:
                raise ConfigError("runs-on", str(runs_on), "map it to an image: -P LABEL=IMAGE")
            name = found
        if name in PRESETS:  # (pinnace's own: "ubuntu", what runs-on: ubuntu-* maps to)
            return await self.runner.build(name, self.image_line(job), preset=True)
        return name

    def image_line(self, job: Job) -> Callable[[str], None]:
        """Where the progress of building ``job``'s image goes: the job's lines."""
        return lambda text: self.say(job.variant or job.name or job.id, "image", text)

    @staticmethod
    def shape(job: Job) -> tuple[int, int]:
        """Memory (with its QEMU's share) and CPUs a job's machine takes."""
        memory = job.limits.memory
        cpus = job.limits.cpus
        if memory is None or cpus is None:
            default = MachineConfig.build(name="x")
            memory = memory if memory is not None else default.memory_mib << 20
            cpus = cpus if cpus is not None else default.cpus
        return memory + QEMU_OVERHEAD, cpus

    async def _in_machine(self, job: Job, image: str, contexts: dict[str, Any],
                          result: JobResult) -> None:
        opts = self.options
        t0 = time.monotonic()
        label = result.variant
        name = f"ci-{_slug(job.id)}-{secrets.token_hex(3)}"
        devices: dict[str, Any] = {}
        if opts.net is not None:
            devices["net"] = opts.net
        memory = job.limits.memory
        caches: list[Attached] = []
        # A cache is saved only when the steps ran to their end, the job succeeded and
        # its machine is gone: never what a cancelled, crashed or still running job left.
        done = {"steps": False, "deleted": False}
        try:
            try:
                for cache in job.caches:
                    if opts.bind and PurePosixPath(_guest_path(cache.path)).is_relative_to(
                            WORKSPACE):
                        raise ConfigError("cache", cache.name, f"its path is in {WORKSPACE}, "
                                          "which --bind shares from the host; run without "
                                          "--bind, or keep the cache elsewhere (~/...)")
                    key = interpolate(cache.key, contexts, functions=self.functions)
                    restore = tuple(interpolate(k, contexts, functions=self.functions)
                                    for k in cache.restore_keys)
                    caches.append(await self.runner.caches.attach(
                        cache.name, key, _guest_path(cache.path), restore_keys=restore,
                        size=f"{-(-cache.size // (1 << 20))}M" if cache.size else None))
                    self.say(label, "cache", caches[-1].describe())
                if caches:
                    devices["volumes"] = [f"{a.volume}:{a.path}" for a in caches]
                if opts.bind and opts.workdir is not None:
                    devices["shares"] = [f"{opts.workdir}:{WORKSPACE}"]
                [m] = await self.runner.machines.run(
                    image=image, name=name, rm=True, cpus=job.limits.cpus,
                    memory=f"{memory // (1 << 20)}M" if memory else None, **devices)
            except PinnaceError as exc:
                result.status, result.reason = "failure", f"its machine did not start: {exc}"
                return
            await self._use(m, job, contexts, result, t0, caches, done)
        finally:
            if not caches:
                pass
            elif result.machine is not None:
                self.say(label, "cache", "nothing saved: the caches' volumes stay with the "
                         f"kept machine {result.machine}")
            else:
                await self._close_caches(caches, label, success=done["steps"] and done[
                    "deleted"] and result.status == "success")

    async def _use(self, m: Any, job: Job, contexts: dict[str, Any], result: JobResult,
                   t0: float, caches: list[Attached], done: dict[str, bool]) -> None:
        """The job in its machine ``m``: limits, setup, steps, artifacts; then the machine
        kept or deleted (``done`` says how far it got)."""
        opts = self.options
        label = result.variant
        group = None
        try:
            logs = _folder(opts.logs / _slug(label), "--logs") if opts.logs else None
            if opts.cgroups:
                group = await self._confine(m, job)
            r = await m.exec(["sh", "-c", _SETUP + _own([a.path for a in caches])
                              + (_BIND if opts.bind else "")], timeout=120)
            if r.exit_code != 0:
                result.status = "failure"
                result.reason = f"setting up the machine failed: {r.stderr_text.strip()[-200:]}"
                return
            for line in r.stderr_text.splitlines()[:5]:
                if line.startswith("pinnace: "):
                    self.say(label, "setup", line.removeprefix("pinnace: "))
            result.start = time.monotonic() - t0
            t1 = time.monotonic()
            job_minutes = _minutes(job.timeout_minutes, contexts) or DEFAULT_JOB_MINUTES
            try:
                await asyncio.wait_for(self._steps(m, job, contexts, result, label, logs),
                                       job_minutes * 60 * self.scale)
            except TimeoutError:
                result.status = "failure"
                result.reason = (f"the job timed out after {job_minutes:g} min"
                                 + (f" (x{self.scale:g})" if self.scale != 1 else ""))
                for s in result.steps:
                    if s.outcome == "running":
                        s.outcome = s.conclusion = "cancelled"
            result.steps_seconds = time.monotonic() - t1
            done["steps"] = True
            if job.artifacts:
                await self._artifacts(m, job, result)
        except PinnaceError as exc:  # (its limits could not be set, say)
            result.status, result.reason = "failure", str(exc)
        except OSError as exc:  # (the host's: a log or an artifact it cannot write)
            result.status, result.reason = "failure", f"on the host: {exc}"
        except asyncio.CancelledError:
            result.status, result.reason = "cancelled", "the run was interrupted"
            raise
        finally:
            t2 = time.monotonic()
            if group is not None:
                self._oom_report(group, result)
            keep = opts.keep == "always" or (opts.keep == "failed" and result.status == "failure")
            if keep:
                with contextlib.suppress(PinnaceError):
                    await m.keep()
                    result.machine = m.name
            else:
                with contextlib.suppress(PinnaceError):
                    await m.delete(force=True)
                    done["deleted"] = True
            if group is not None and result.machine is None:
                with contextlib.suppress(PinnaceError):
                    await asyncio.to_thread(group.remove)
            result.cleanup = time.monotonic() - t2

    async def _close_caches(self, caches: list[Attached], label: str, *, success: bool) -> None:
        for att in caches:
            try:
                self.say(label, "cache", await self.runner.caches.detach(att, success=success))
            except PinnaceError as exc:
                self.say(label, "cache", f"cache {att.name}: {exc}")

    async def _artifacts(self, m: Any, job: Job, result: JobResult) -> None:
        """Copy the job's artifacts (paths or globs in the workspace) to the host: into
        ``artifacts/<job>/`` with their paths, replacing what an earlier run left there.
        The guest names what matched: a name that is absolute, climbs out or is a link is
        refused; at most MAX_ARTIFACTS bytes come, in ARTIFACT_SECONDS."""
        label = result.variant
        # (a \1 before each pattern's matches, a NUL after each; the shell expands globs)
        r = await m.exec(["sh", "-c", 'cd "$1" || exit; shift; for pat do printf "\\1\\0"; '
                          'for p in $pat; do [ -e "$p" ] && [ ! -L "$p" ] && '
                          'printf "%s\\0" "$p"; done; done', "sh", WORKSPACE, *job.artifacts],
                         timeout=60)
        found: list[list[str]] = []
        for n in r.stdout[:1 << 20].split(b"\0"):
            if n == b"\1":
                found.append([])
            elif n and found:
                found[-1].append(n.decode("utf-8", "replace"))
        for pattern, matched in zip(job.artifacts, found, strict=False):
            if not matched:
                self.say(label, "artifacts", f"no artifact matched {pattern}")
        names = [n for matched in found for n in matched]
        if not names:
            return
        wanted: list[tuple[str, list[str]]] = []
        for raw in dict.fromkeys(names):
            rel = PurePosixPath(raw.rstrip("/"))
            parts = [part for part in rel.parts if part != "."]
            if rel.is_absolute() or ".." in parts or not parts:
                self.say(label, "artifacts", f"refused artifact {raw!r}: not inside the "
                         "workspace")
            else:
                wanted.append((raw, parts))
        root = _folder(self.options.artifacts.resolve(), "--artifacts")
        dest = root / _slug(label)
        for left_over in root.glob(".*-artifacts"):  # (a run killed while copying)
            with contextlib.suppress(OSError):
                if time.time() - left_over.stat().st_mtime > ARTIFACT_SECONDS:
                    shutil.rmtree(left_over)
        stage = Path(tempfile.mkdtemp(prefix=f".{_slug(label)}-", suffix="-artifacts", dir=root))
        copied: list[Path] = []
        left = MAX_ARTIFACTS
        try:
            try:
                async with asyncio.timeout(ARTIFACT_SECONDS):
                    taken: list[PurePosixPath] = []
                    # (folders before what is in them, which comes with them)
                    for raw, parts in sorted(wanted, key=lambda w: len(w[1])):
                        if any(PurePosixPath(*parts).is_relative_to(t) for t in taken):
                            continue
                        taken.append(PurePosixPath(*parts))
                        target = stage.joinpath(*parts)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        try:
                            left -= await m.files.get(f"{WORKSPACE}/{'/'.join(parts)}", target,
                                                      limit=left)
                        except TooLargeError:
                            self.say(label, "artifacts", f"artifact {raw}: over the "
                                     f"{MAX_ARTIFACTS >> 30} GiB all of a job's may take; the "
                                     "rest are not copied")
                            break
                        except PinnaceError as exc:
                            self.say(label, "artifacts", f"artifact {raw}: {exc}")
                            continue
                        copied.append(dest.joinpath(*parts))
            except TimeoutError:
                self.say(label, "artifacts", f"copying took over {ARTIFACT_SECONDS} s; the "
                         "rest are not copied")
            if dest.exists():
                shutil.rmtree(dest)
            stage.rename(dest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # (gone once renamed)
        result.artifacts.extend(str(c) for c in copied)
        if copied:
            self.say(label, "artifacts", f"copied {len(copied)} artifact(s) to {dest}")

    def say(self, label: str, what: str, text: str) -> None:
        if self.options.on_line is not None:
            self.options.on_line(label, what, text)

    def hash_files(self, *patterns: Any) -> str:
        """``hashFiles()``: over the files the checkout lays out (see checkout.hash_files)."""
        if self.options.workdir is None:
            return ""
        from .checkout import hash_files

        key = tuple(str(p) for p in patterns)
        try:
            if key not in self.hashes:  # (once per run: the files do not change meanwhile)
                self.hashes[key] = hash_files(self.options.workdir, list(key), WORKSPACE)
            return self.hashes[key]
        except OSError as exc:
            raise ConfigError("hashFiles", ", ".join(map(str, patterns)),
                              f"cannot read the files: {exc.strerror}") from None

    async def _confine(self, m: Any, job: Job) -> Any:
        """Put the job's QEMU in a cgroup of its own: memory (its guest's and
        QEMU_OVERHEAD), CPU (its guest's CPUs) and pids limits. A HostError says why
        when the host has no cgroups to give (see --no-cgroup)."""
        from ..backends.qemu import cgroup

        st = await m.status()
        cfg = m.config
        limits = cgroup.Limits(memory_bytes=cfg.memory_mib * (1 << 20) + QEMU_OVERHEAD,
                               cpus=float(cfg.cpus), pids=QEMU_PIDS)
        group = await asyncio.to_thread(cgroup.Cgroup.create, m.name, limits, parent="pinnace-ci")
        if st.pid is not None:
            await asyncio.to_thread(group.add, st.pid)
        return group

    def _oom_report(self, group: Any, result: JobResult) -> None:
        """If the kernel killed the job's QEMU for its memory limit, the failing step
        says so."""
        with contextlib.suppress(PinnaceError, OSError):
            if group.oom_killed():
                failing = [s for s in result.steps if s.outcome == "failure"]
                why = ("out of memory: the job's QEMU reached its memory limit and the host "
                       "killed it")
                if failing:
                    failing[-1].reason = why
                result.status, result.reason = "failure", why

    async def _steps(self, m: Any, job: Job, contexts: dict[str, Any], result: JobResult,
                     label: str, logs: Path | None) -> None:
        env: dict[str, str] = {}  # what steps added with $GITHUB_ENV
        path: list[str] = []  # what they added with $GITHUB_PATH
        failed = False
        steps_ctx: dict[str, Any] = {}
        contexts["steps"] = steps_ctx
        result.status = "success"
        for step in job.steps:
            sr = StepResult(step.index, step.name, step.id)
            result.steps.append(sr)
            contexts["job"] = {"status": "failure" if failed else "success"}
            contexts["env"] = {**contexts["env"], **env}

            def status(name: str, failed: bool = failed) -> bool:
                return {"success": not failed, "failure": failed, "always": True,
                        "cancelled": False}.get(name, False)

            try:
                go = condition(step.if_, contexts, status=status, functions=self.functions)
            except PinnaceError as exc:
                sr.outcome = sr.conclusion = "failure"
                sr.reason = f"its if: {exc}"
                failed = True
                continue
            if not go:
                if step.id:
                    steps_ctx[step.id] = {"outputs": {}, "outcome": "skipped",
                                          "conclusion": "skipped"}
                continue
            sr.outcome = "running"
            t = time.monotonic()
            try:
                ok = await self._step(m, job, step, contexts, env, path, sr, label, logs)
            except PinnaceError as exc:
                ok, sr.reason = False, str(exc)
            sr.seconds = time.monotonic() - t
            sr.outcome = "success" if ok else "failure"
            keep_going = not ok and _flag(step.continue_on_error, contexts)
            sr.conclusion = "success" if ok or keep_going else "failure"
            if step.id:
                steps_ctx[step.id] = {"outputs": sr.outputs, "outcome": sr.outcome,
                                      "conclusion": sr.conclusion}
            if sr.conclusion == "failure":
                failed = True
        contexts["job"] = {"status": "failure" if failed else "success"}
        if failed and not _flag(job.continue_on_error, contexts):
            result.status = "failure"
            bad = next(s for s in result.steps if s.conclusion == "failure")
            result.reason = f"step '{bad.name}' failed" + (f": {bad.reason}" if bad.reason else "")
        for key, expr in job.outputs.items():
            with contextlib.suppress(PinnaceError):
                result.outputs[key] = interpolate(expr, contexts)
        result.summary = contexts.get("_summary", "")

    async def _step(self, m: Any, job: Job, step: Step, contexts: dict[str, Any],
                    env: dict[str, str], path: list[str], sr: StepResult, label: str,
                    logs: Path | None) -> bool:
        files = {k: f"{RUNNER_DIR}/{step.index}.{k.lower()}" for k in
                 ("GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_PATH", "GITHUB_STEP_SUMMARY")}
        step_env = {**contexts["env"], **env,
                    **{k: interpolate(v, contexts, functions=self.functions)
                       for k, v in step.env.items()}}
        contexts_here = {**contexts, "env": step_env}
        full_env = {**self.base_env(job), **step_env, **files}
        if path:
            full_env["PATH"] = ":".join([*reversed(path), _GUEST_PATH])
        if step.kind == "checkout":
            return await self._checkout(m, sr, label)
        script = interpolate(step.run, contexts_here, functions=self.functions)
        argv, ext = job.command(step)
        remote = f"{RUNNER_DIR}/{step.index}{ext}"
        # One command writes the script (from stdin; the step's own stdin is then at its
        # end, as on GitHub), empties the step's files, and becomes the step's shell.
        # limits.pids: processes of the runner user at once (RLIMIT_NPROC; not root's).
        # (dash's name for it is -p, bash's and busybox's -u; refused only above the hard
        # limit, which then already holds the user to fewer)
        n = job.limits.pids
        nproc = f"{{ ulimit -p {n} || ulimit -u {n} || :; }} 2>/dev/null; " if n else ""
        argv = ["sh", "-c", nproc + 'cat > "$1" && : > "$2" && : > "$3" && : > "$4" && '
                ': > "$5" && shift 5 && exec "$@"', "sh", remote, *files.values(),
                *(a.replace("{0}", remote) for a in argv)]
        workdir = job.working_directory(step)
        cwd = WORKSPACE if not workdir else (
            workdir if workdir.startswith("/") else f"{WORKSPACE}/{workdir}")
        minutes = _minutes(step.timeout_minutes, contexts_here)
        timeout = minutes * 60 * self.scale if minutes else None
        log = (logs / f"{step.index + 1:02d}-{_slug(step.name)}.log") if logs else None
        sr.log = log
        on_line = self.options.on_line
        proc = await m.start_process(argv, env=full_env, cwd=cwd, user=USER, timeout=timeout,
                                     stdin=True, collect=list(files.values()))
        await proc.write(script.encode())
        await proc.close_stdin()
        pending: dict[object, bytes] = {}  # (a line cut across chunks, per stream)
        with (open(log, "w", encoding="utf-8") if log else contextlib.nullcontext()) as out:

            def emit(raw: bytes) -> None:
                text = self.mask(raw.decode("utf-8", "replace"))
                if out is not None:
                    out.write(text + "\n")
                if on_line is not None:
                    on_line(label, step.name, text)

            async for stream, data in proc:
                *lines, pending[stream] = (pending.get(stream, b"") + data).split(b"\n")
                for ln in lines:
                    emit(ln)
                for key, rest in list(pending.items()):
                    if len(rest) > 65536:  # (a line that never ends: shown in pieces)
                        emit(rest)
                        pending[key] = b""
            for rest in pending.values():
                if rest:
                    emit(rest)
        res = await proc.wait()
        sr.exit_code = res.exit_code
        written = _collected(files, res.collected)
        if written is None:  # (an agent that does not collect, or a file too large for it)
            written = await self._read_files(m, files)
        try:
            env.update(envfile.parse(written[files["GITHUB_ENV"]], "GITHUB_ENV"))
            sr.outputs = envfile.parse(written[files["GITHUB_OUTPUT"]], "GITHUB_OUTPUT")
        except PinnaceError as exc:
            sr.reason = str(exc)
            return False
        path.extend(envfile.paths(written[files["GITHUB_PATH"]]))
        summary = written[files["GITHUB_STEP_SUMMARY"]]
        if summary:
            contexts["_summary"] = contexts.get("_summary", "") + summary
        if res.timed_out:
            sr.reason = f"timed out after {minutes:g} min" + (
                f" (x{self.scale:g})" if self.scale != 1 else "")
            return False
        if res.exit_code != 0:
            sr.reason = f"exit code {res.exit_code}"
            if res.exit_code in (137, -9) or res.signal == 9:
                await self._oom_in_guest(m, sr)
            return False
        return True

    async def _oom_in_guest(self, m: Any, sr: StepResult) -> None:
        """A step killed by SIGKILL: if the guest's kernel killed it for memory, say so,
        with the tail of the machine's console."""
        r = await m.exec(["sh", "-c", "dmesg | grep -iE 'out of memory|oom-kill' | tail -n 3"],
                         timeout=30)
        found = r.stdout[-2000:].decode("utf-8", "replace").strip().splitlines()
        if found:
            killed = next((ln for ln in reversed(found) if "Killed process" in ln), found[-1])
            what = killed.split("] ", 1)[-1][:160]
            sr.reason = f"out of memory inside the machine: {what}"
            with contextlib.suppress(PinnaceError, OSError):
                sr.console = m.serial_tail(20)

    async def _read_files(self, m: Any, files: dict[str, str]) -> dict[str, str]:
        """What the step wrote into ``files`` (from the guest: sizes are checked)."""
        r = await m.exec(["sh", "-c", _READ_FILES, "sh", *files.values()], timeout=60)
        data, at, out = r.stdout, 0, {}
        for path in files.values():
            end = data.find(b"\n", at)
            try:
                size = min(int(data[at:end]), envfile.MAX_BYTES) if end > at else 0
            except ValueError:
                size = 0
            at = end + 1 if end >= 0 else len(data)
            out[path] = data[at:at + size].decode("utf-8", "replace")
            at += size
        return out

    async def _checkout(self, m: Any, sr: StepResult, label: str) -> bool:
        src = self.options.workdir
        if src is None:
            sr.reason = "no working tree to check out (give the repository's folder)"
            return False
        if self.options.bind:
            self.say(label, sr.name, f"{WORKSPACE} is {src} itself (--bind)")
            return True
        from .checkout import prepare

        with prepare(src) as tree:
            await m.files.put(str(tree), WORKSPACE)
        r = await m.exec(["chown", "-R", f"{USER}:", WORKSPACE])
        if self.options.on_line is not None:
            self.options.on_line(label, sr.name, f"checked out {src} into {WORKSPACE}")
        return bool(r.exit_code == 0)

    def mask(self, text: str) -> str:
        """``text`` with every secret's value shown as ***, as GitHub's logs do."""
        for value in self.masks:
            text = text.replace(value, "***")
        return text

    def base_env(self, job: Job) -> dict[str, str]:
        """The variables every step sees, as on GitHub's runners."""
        return {
            "CI": "true", "GITHUB_ACTIONS": "true", "HOME": f"/home/{USER}", "USER": USER,
            "GITHUB_WORKSPACE": WORKSPACE, "GITHUB_JOB": job.id,
            "GITHUB_EVENT_NAME": self.options.event, "GITHUB_RUN_ID": self.run_id,
            "GITHUB_RUN_NUMBER": "1", "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_REF": "refs/heads/main", "GITHUB_REF_NAME": "main",
            "GITHUB_SHA": "0" * 40, "GITHUB_REPOSITORY": "local/repository",
            "GITHUB_ACTOR": "pinnace", "RUNNER_OS": "Linux", "RUNNER_ARCH": "X64",
            "RUNNER_NAME": "pinnace", "RUNNER_TEMP": f"{RUNNER_DIR}/temp",
            "PATH": _GUEST_PATH,
        }

    def contexts(self, job: Job, needs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        opts = self.options
        env = {**self.wf.env, **dict(opts.env)}
        base = {"github": {
            "event_name": opts.event, "event": {}, "ref": "refs/heads/main",
            "ref_name": "main", "sha": "0" * 40, "repository": "local/repository",
            "workspace": WORKSPACE, "job": job.id, "run_id": self.run_id, "run_number": "1",
            "actor": "pinnace", "server_url": "https://github.com", "action": "", "token": "",
            "workflow": self.wf.name},
            "runner": {"os": "Linux", "arch": "X64", "name": "pinnace",
                       "temp": f"{RUNNER_DIR}/temp"},
            "secrets": dict(opts.secrets), "inputs": {}, "vars": {},
            "matrix": dict(job.matrix), "needs": needs,
            "strategy": {"fail-fast": job.strategy.fail_fast,
                         "max-parallel": job.strategy.max_parallel},
            "job": {"status": "success"}, "steps": {}}
        ctx: dict[str, Any] = {**base, "env": {}}
        resolved = {k: interpolate(v, {**ctx, "env": env}) for k, v in env.items()}
        resolved.update({k: interpolate(v, {**ctx, "env": resolved}) for k, v in job.env.items()})
        ctx["env"] = resolved
        return ctx


class _LineReporter:
    """An image build's progress as lines of the run's output."""

    def __init__(self, line: Callable[[str], None]) -> None:
        self.line = line

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        self.line(f"{name} ...")
        yield
        self.line(f"{name}: done in {time.monotonic() - start:.1f} s")

    def output(self, line: str) -> None:
        pass  # (in the build's log)

    def note(self, text: str) -> None:
        self.line(text)


_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _minutes(value: float | str | None, contexts: dict[str, Any]) -> float | None:
    """A timeout-minutes (a number, or an expression giving one); None if not given."""
    if value is None:
        return None
    if isinstance(value, str):
        value = evaluate(value.strip().removeprefix("${{").removesuffix("}}"), contexts)
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        raise ConfigError("timeout-minutes", str(value), "give a number of minutes") from None
    if not 0 < minutes <= 10080:
        raise ConfigError("timeout-minutes", str(value), "give 0 to 10080 minutes")
    return minutes


def _flag(value: bool | str, contexts: dict[str, Any]) -> bool:
    if isinstance(value, bool):
        return value
    got = evaluate(value.strip().removeprefix("${{").removesuffix("}}"), contexts)
    return bool(got) and got != "false"


def _resolve(matrix: Any, contexts: dict[str, Any]) -> Any:
    """A matrix written as (or holding) expressions, evaluated."""
    if isinstance(matrix, str):
        text = matrix.strip()
        if text.startswith("${{") and text.endswith("}}"):
            return evaluate(text[3:-2], contexts)
        return interpolate(text, contexts)
    if isinstance(matrix, dict):
        return {k: _resolve(v, contexts) for k, v in matrix.items()}
    if isinstance(matrix, list):
        return [_resolve(v, contexts) for v in matrix]
    return matrix


def _collected(files: dict[str, str], got: list[tuple[int, bytes]] | None
               ) -> dict[str, str] | None:
    """What the agent read back of a step's ``files`` as it ended, by path; None if it
    did not, or cut one short of what envfile reads (then they are read with an exec)."""
    if got is None or len(got) != len(files):
        return None
    out = {}
    for path, (size, data) in zip(files.values(), got, strict=True):
        if size > len(data) and len(data) < envfile.MAX_BYTES:
            return None
        out[path] = data[:envfile.MAX_BYTES].decode("utf-8", "replace")
    return out


def _folder(path: Path, option: str) -> Path:
    """``path`` made as a folder (for ``option``), or a ConfigError saying why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(option, str(path), f"cannot make a folder there "
                          f"({exc.strerror})") from None
    return path


def _guest_path(path: str) -> str:
    """A cache's path in the guest: ``~`` is the runner user's home; a relative path is
    in the workspace (as actions/cache reads it)."""
    if path == "~" or path.startswith("~/"):
        return f"/home/{USER}" + path[1:]
    path = path if path.startswith("/") else f"{WORKSPACE}/{path}"
    return str(PurePosixPath(path))


def _own(paths: list[str]) -> str:
    """Shell lines that give the runner user the caches' folders (volumes mount as
    root's) and the folders above them in its home."""
    lines = []
    home = PurePosixPath(f"/home/{USER}")
    for path in paths:
        p = PurePosixPath(path)
        chain = [p, *[q for q in p.parents if q.is_relative_to(home)]]
        lines.append("chown " + USER + ": " + " ".join(shlex.quote(str(q)) for q in chain))
    if paths:  # (its home was made by the mounts, before useradd could fill it)
        lines.insert(0, f"cp -rn /etc/skel/. /home/{USER}/; for f in /etc/skel/.[!.]* "
                     f'/etc/skel/*; do [ ! -e "$f" ] || chown -R {USER}: '
                     f'"/home/{USER}/${{f##*/}}"; done')
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "x"


__all__ = ["JobResult", "Options", "RunResult", "Runner", "StepResult"]
