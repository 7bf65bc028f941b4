"""Reading CI workflow files into the model the runner executes.

Two formats are read, told apart by their keys (:func:`load`):

**GitHub Actions workflows** (``.github/workflows/*.yml``): the ``run:`` subset. A job
that pinnace cannot run is not an error but a :class:`Skipped` entry, reported before
anything starts, with the file, the line and a fix: a step that ``uses:`` an action other
than ``actions/checkout``, a reusable workflow (``jobs.<id>.uses``), ``container:`` or
``services:``, a macOS or Windows ``runs-on`` (or self-hosted labels that name no image),
a PowerShell or cmd ``shell:``, and any job that ``needs`` a skipped job.

**pinnace's own format** (``.pinnace/ci.yml`` or ``pinnace-ci.yml``), one job::

    name: ci                   # optional
    image: default             # an image in pinnace's store (the default: "default"), or
                               # image: {packages: [gcc, make]} to build one from Debian packages
    env: {A: b}
    timeout: 30m               # durations: 90s, 30m, 1h, 1h30m
    checkout: true             # the repository in /workspace first (the default)
    limits: {memory: 2G, cpus: 2, pids: 4096}
    caches:                    # kept between runs, as actions/cache keeps them
      - name: pip
        path: ~/.cache/pip     # ~ is the runner user's home
        key: "pip-${{ hashFiles('requirements.txt') }}"
        restore-keys: [pip-]   # on a miss, the newest entry whose key starts so
        size: 4G               # what the cache's volume can hold (default 8G, sparse)
    artifacts: [dist/, build/log.txt]   # copied out of the machine after the job
    steps:
      - make                   # a string is a step that runs it
      - name: build
        run: make
        env: {X: y}
        shell: bash            # the default: bash --noprofile --norc -eo pipefail {0}
        timeout: 10m
        working-directory: src

or several, each with the keys above (except ``name`` at the top) plus ``needs``::

    env: {A: b}                # for every job
    jobs:
      build: {image: default, steps: [make], artifacts: [out/]}
      test: {needs: build, steps: [make check]}

The single-job form's job is called ``ci``. A cache's ``key`` defaults to its name.

Expressions (``${{ ... }}``) are never evaluated here: they stay strings in the model,
for the runner to evaluate. A matrix that holds one is kept unexpanded
(``Strategy.deferred``); :func:`expand` expands it once the runner has evaluated it.

Inputs are not trusted: a file is at most 1 MiB, nested at most 64 levels, and at most a
million values once YAML aliases are followed; YAML 1.2 (``on:`` is the string "on", not
true; ``yes`` is a string); a bad file raises one :class:`~pinnace.errors.WorkflowError`
that says ``FILE:LINE: what; how to fix it``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.scalarbool import ScalarBoolean
from ruamel.yaml.scanner import RoundTripScanner, ScannerError

from ..config import MAX_CPUS, parse_size
from ..errors import ConfigError, WorkflowError
from ..store import NAME_HINT, NAME_RE

__all__ = [
    "DEFAULT_PLATFORMS",
    "Cache",
    "DefaultsRun",
    "ImageSpec",
    "Job",
    "Limits",
    "Skipped",
    "Step",
    "Strategy",
    "Workflow",
    "WorkflowError",
    "discover",
    "expand",
    "expand_matrix",
    "load",
    "parse_duration",
    "platform",
    "runs_on_problem",
    "select",
    "shell_command",
    "stages",
    "triggered",
]

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_FLOW_DEPTH = 16  # [ and { inside each other: ruamel's scanner is quadratic in it
# ruamel's round-trip loader takes some 70 us a token (a 1 MiB workflow has ~150k): this
# bounds the time a file of tiny tokens takes to about 7 s
MAX_TOKENS = 100_000
MAX_VALUES = 1_000_000  # values in the document, counting each use of a YAML alias
MAX_COMBINATIONS = 256  # GitHub's limit of jobs one matrix makes
MAX_PRODUCT = 1 << 16  # combinations looked at before exclude: bounds the time spent
MAX_TIMEOUT_MINUTES = 7 * 24 * 60.0
_TOO_DEEP = f"it is nested more than {MAX_DEPTH} levels deep"
_TOO_DEEP_FLOW = f"it nests [ and {{ more than {MAX_FLOW_DEPTH} levels deep"
_TOO_MANY = "it has more than"

# runs-on labels and the pinnace image each runs on; `-P LABEL=IMAGE` adds and overrides.
DEFAULT_PLATFORMS: Mapping[str, str] = {
    "ubuntu-latest": "ubuntu",
    "ubuntu-24.04": "ubuntu",
    "ubuntu-22.04": "ubuntu",
    "ubuntu-20.04": "ubuntu",
}

Kind = Literal["github", "pinnace"]

_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_CACHE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DURATION_RE = re.compile(
    r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_NOT_LINUX = ("pwsh", "powershell", "cmd")
_CHECKOUT = "actions/checkout@"

# The fix to suggest for actions pinnace does not run, by "owner/name" (lower case).
_ACTION_FIXES = {
    "actions/setup-python": "install it in a run: step, e.g. apt-get install -y python3",
    "actions/setup-node": "install it in a run: step, e.g. apt-get install -y nodejs npm",
    "actions/setup-go": "install it in a run: step, e.g. apt-get install -y golang",
    "actions/setup-java": "install it in a run: step, e.g. apt-get install -y default-jdk",
    "actions/cache": "remove the step, or use caches: in pinnace's own format (.pinnace/ci.yml)",
    "actions/upload-artifact": "remove the step, or use artifacts: in pinnace's own format "
                               "(.pinnace/ci.yml)",
    "actions/download-artifact": "remove the step, or use artifacts: in pinnace's own format "
                                 "(.pinnace/ci.yml)",
}
_ACTION_FIX = ("replace it with run: steps that do the same; pinnace runs run: steps and "
               "actions/checkout only")

_GITHUB_TOP = ("name", "run-name", "on", "permissions", "env", "defaults", "concurrency", "jobs")
_GITHUB_JOB = ("name", "permissions", "needs", "if", "runs-on", "snapshot", "environment",
               "concurrency", "outputs", "env", "defaults", "steps", "timeout-minutes",
               "strategy", "continue-on-error", "container", "services", "uses", "with",
               "secrets")
_GITHUB_STEP = ("id", "if", "name", "uses", "run", "working-directory", "shell", "with", "env",
                "continue-on-error", "timeout-minutes")
_PINNACE_JOB = ("name", "image", "env", "timeout", "limits", "caches", "artifacts", "checkout",
                "steps")
_PINNACE_STEP = ("name", "run", "env", "shell", "timeout", "working-directory")


# ---------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DefaultsRun:
    """``defaults.run``: the shell and working directory of run steps that name none."""

    shell: str | None = None
    working_directory: str | None = None


@dataclass(frozen=True)
class ImageSpec:
    """An image to build for a job of pinnace's format: Debian packages on the base image."""

    packages: tuple[str, ...]


@dataclass(frozen=True)
class Cache:
    """A directory kept between runs (pinnace's format): restored before the steps when
    ``key`` (which may hold an expression) matches a saved one, or else from the newest
    entry whose key starts with one of ``restore_keys``; saved after the job succeeds
    when its key had no entry (see :mod:`.caches`)."""

    name: str
    path: str
    key: str
    restore_keys: tuple[str, ...] = ()
    size: int | None = None  # bytes the volume can hold (None: caches.DEFAULT_SIZE)


@dataclass(frozen=True)
class Limits:
    """Resource limits of a job's machine (pinnace's format); None: pinnace's default.
    ``memory`` in bytes."""

    memory: int | None = None
    cpus: int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class Strategy:
    """A job's ``strategy``.

    ``matrix``: the matrix as written (plain data; a string when it is an expression), None
    without one. ``combinations``: the matrix expanded (include and exclude applied), empty
    without a matrix or while ``deferred``: the matrix holds an expression, and the runner
    expands it with :func:`expand` once it has evaluated it.
    """

    matrix: Any = None
    combinations: tuple[dict[str, Any], ...] = ()
    deferred: bool = False
    fail_fast: bool = True
    max_parallel: int | None = None


@dataclass(frozen=True)
class Step:
    """One step of a job.

    ``index``: its position in the job (from 0); ``line``: where it starts (1-based);
    ``kind``: "run" (a script in ``run``) or "checkout" (``uses: actions/checkout@...``, the
    only action kept; ``uses`` and ``with_`` hold it). ``shell`` and ``working_directory``
    are the step's own (None: the job's ``defaults_run``). ``if_``,
    ``continue_on_error`` and ``timeout_minutes`` may be expression strings.
    """

    index: int
    name: str
    line: int
    run: str = ""
    kind: Literal["run", "checkout"] = "run"
    id: str | None = None
    shell: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    working_directory: str | None = None
    if_: str | None = None
    continue_on_error: bool | str = False
    timeout_minutes: float | str | None = None
    uses: str | None = None
    with_: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """A job the runner can run, or one combination of a matrix job.

    ``id``: the key under ``jobs`` (the same for every combination); ``variant``: the label
    that tells combinations apart, as GitHub shows it ("build (3.11, ubuntu-latest)"; the id
    or name alone without a matrix); ``matrix``: this combination's values (empty without a
    matrix, and in :attr:`Workflow.jobs`, which holds each job once).
    ``file`` and ``line``: where the job is (``needs_line``: its ``needs``).
    ``runs_on``: a label, a tuple of labels, or an expression the runner evaluates
    ("" in pinnace's format); ``image``: what to boot: set in pinnace's format, None for
    GitHub's, where the runner resolves ``runs_on`` with :func:`platform`.
    ``defaults_run``: the workflow's merged with the job's (in pinnace's format, shell bash).
    ``timeout_minutes`` (None: the runner's default), ``if_`` and ``continue_on_error`` may
    be expression strings. ``caches``, ``artifacts`` and ``limits``: pinnace's format only.
    """

    id: str
    name: str
    file: str
    line: int
    runs_on: str | tuple[str, ...]
    steps: tuple[Step, ...]
    variant: str = ""
    image: str | ImageSpec | None = None
    needs: tuple[str, ...] = ()
    needs_line: int = 0
    if_: str | None = None
    timeout_minutes: float | str | None = None
    continue_on_error: bool | str = False
    env: dict[str, str] = field(default_factory=dict)
    defaults_run: DefaultsRun = DefaultsRun()
    strategy: Strategy = Strategy()
    outputs: dict[str, str] = field(default_factory=dict)
    matrix: dict[str, Any] = field(default_factory=dict)
    caches: tuple[Cache, ...] = ()
    artifacts: tuple[str, ...] = ()
    limits: Limits = Limits()

    def command(self, step: Step) -> tuple[list[str], str]:
        """The argv template and script extension that run ``step`` (see
        :func:`shell_command`), with the job's default shell when the step names none."""
        shell = step.shell or self.defaults_run.shell
        return shell_command(shell, explicit=shell is not None)

    def working_directory(self, step: Step) -> str | None:
        """Where ``step`` runs, relative to the workspace (None: the workspace)."""
        return step.working_directory or self.defaults_run.working_directory


@dataclass(frozen=True)
class Skipped:
    """A job that cannot run here, and how to make it run: reported before anything starts.
    A job can have several entries (one per problem)."""

    job_id: str
    file: str
    line: int
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: job '{self.job_id}' cannot run: {self.reason}; {self.fix}"


@dataclass(frozen=True)
class Workflow:
    """A workflow file read by :func:`load`.

    ``jobs``: the jobs that can run, by id, in file order, each once (matrix combinations
    come from :func:`select`); ``skipped``: the ones that cannot, with why.
    ``on``: the triggers, each event with its filters (None when it has none; empty in
    pinnace's format, which runs whenever asked). ``event``: the event it is loaded for.
    """

    path: Path
    name: str
    kind: Kind
    jobs: dict[str, Job]
    skipped: list[Skipped]
    env: dict[str, str] = field(default_factory=dict)
    defaults_run: DefaultsRun = DefaultsRun()
    on: dict[str, Any] = field(default_factory=dict)
    event: str = "push"

    @property
    def file(self) -> str:
        return str(self.path)


# ---------------------------------------------------------------------------- functions


def discover(root: str | Path) -> list[Path]:
    """The workflow files of the project at ``root``: ``.github/workflows/*.yml`` and
    ``*.yaml`` (by name), then ``.pinnace/ci.yml`` and ``pinnace-ci.yml``."""
    root = Path(root)
    found: list[Path] = []
    gh = root / ".github" / "workflows"
    if gh.is_dir():
        found += sorted(p for p in gh.iterdir()
                        if p.suffix in (".yml", ".yaml") and p.is_file())
    for rel in (".pinnace/ci.yml", ".pinnace/ci.yaml", "pinnace-ci.yml", "pinnace-ci.yaml"):
        if (root / rel).is_file():
            found.append(root / rel)
    return found


def load(path: str | Path, *, event: str = "push",
         platforms: Mapping[str, str] | None = None) -> Workflow:
    """Read the workflow at ``path``; raises WorkflowError for a file that is not one.

    ``platforms``: ``-P`` runs-on label -> image entries (added to DEFAULT_PLATFORMS); they
    decide whether self-hosted labels name something pinnace can run.
    """
    path = Path(path)
    reader = _Reader(str(path), {**DEFAULT_PLATFORMS, **(platforms or {})})
    doc = reader.parse(path)
    kind = _detect(reader, doc, path)
    if kind == "github":
        return reader.github(doc, path, event)
    return reader.pinnace(doc, path, event)


def triggered(workflow: Workflow, event: str) -> bool:
    """Whether the workflow runs on ``event`` (its ``on:`` names it; branch and path
    filters are not looked at). pinnace's format runs on any event."""
    if workflow.kind == "pinnace":
        return True
    return event in workflow.on


def select(workflow: Workflow, job: str | None = None,
           matrix_filters: Mapping[str, str] | None = None) -> list[Job]:
    """The jobs to run, one per matrix combination, in file order.

    ``job``: only that job and the jobs it needs (as act does); a skipped or unknown id is
    a WorkflowError. ``matrix_filters`` (``--matrix KEY=VALUE``): keep the combinations whose
    KEY is VALUE (compared as strings, as GitHub shows values); combinations without KEY are
    kept. A key no selected job has, or a value that leaves a job no combination, is a
    WorkflowError. A matrix the runner must evaluate first (``strategy.deferred``) is left
    unexpanded: its job appears once, and :func:`expand` applies the filters later.
    """
    filters = dict(matrix_filters or {})
    if job is None:
        wanted = set(workflow.jobs)
    else:
        for s in workflow.skipped:
            if s.job_id == job:
                raise WorkflowError(s.file, s.line, f"job '{job}' cannot run: {s.reason}", s.fix,
                                    field="job", value=job)
        if job not in workflow.jobs:
            known = list(workflow.jobs)
            raise WorkflowError(workflow.file, None, f"no job '{job}' in this workflow",
                                _suggest(job, known, "jobs"), field="job", value=job)
        wanted = set()
        todo = [job]
        while todo:
            jid = todo.pop()
            if jid not in wanted and jid in workflow.jobs:
                wanted.add(jid)
                todo.extend(workflow.jobs[jid].needs)
    chosen = [j for jid, j in workflow.jobs.items() if jid in wanted]
    for key in filters:
        if not any(key in c for j in chosen for c in j.strategy.combinations) and not any(
                j.strategy.deferred for j in chosen):
            raise WorkflowError(workflow.file, None, f"no selected job has a matrix key '{key}'",
                                "give KEY=VALUE with a key of the job's matrix",
                                field="matrix", value=key)
    out: list[Job] = []
    for j in chosen:
        variants = expand(j, filters=filters)
        if not variants:
            keys = [k for k in filters if any(k in c for c in j.strategy.combinations)]
            have = {k: sorted({matrix_text(c[k]) for c in j.strategy.combinations if k in c})
                    for k in keys}
            said = "; ".join(f"its {k} values: {', '.join(v)}" for k, v in have.items())
            asked = ", ".join(f"{k}={filters[k]}" for k in keys)
            raise WorkflowError(j.file, j.line, f"job '{j.id}': no matrix combination has "
                                f"{asked}", said, field="matrix", value=asked)
        out += variants
    return out


def expand(job: Job, *, matrix: Any = None,
           filters: Mapping[str, str] | None = None) -> list[Job]:
    """One Job per matrix combination of ``job`` that ``filters`` keep.

    ``matrix``: the job's matrix after the runner evaluated its expressions (for a
    ``deferred`` one); without it, the combinations found by :func:`load`. A job without a
    matrix, or a deferred one given no ``matrix``, comes back alone and unchanged.
    """
    strategy = job.strategy
    if matrix is not None:
        combos = expand_matrix(matrix, file=job.file, line=job.line)
        strategy = replace(strategy, matrix=matrix, combinations=tuple(combos), deferred=False)
    elif strategy.deferred or not strategy.combinations:
        return [job]
    wanted = dict(filters or {})
    out = []
    for combo in strategy.combinations:
        if all(matrix_text(combo[k]) == str(v) for k, v in wanted.items() if k in combo):
            out.append(replace(job, matrix=dict(combo), variant=_variant(job, combo),
                               strategy=strategy))
    return out


def stages(jobs: Sequence[Job]) -> list[list[Job]]:
    """``jobs`` (with their matrix variants) in the order ``needs`` allows: each stage
    needs only jobs of earlier stages. A job that needs one not in ``jobs``, or needs
    that form a cycle, are a WorkflowError at the ``needs`` line."""
    order: list[str] = []
    first: dict[str, Job] = {}
    for j in jobs:
        if j.id not in first:
            first[j.id] = j
            order.append(j.id)
    for jid in order:
        j = first[jid]
        for need in j.needs:
            if need not in first:
                raise WorkflowError(j.file, j.needs_line or j.line,
                                    f"job '{jid}' needs '{need}', which is not selected",
                                    "select it too (--job runs a job with what it needs)",
                                    field="needs", value=need)
    levels = _levels(order, {jid: first[jid].needs for jid in order},
                     lambda jid: (first[jid].file, first[jid].needs_line or first[jid].line))
    return [[j for j in jobs if j.id in set(level)] for level in levels]


def platform(runs_on: str | Sequence[str],
             mapping: Mapping[str, str] | None = None) -> str | None:
    """The pinnace image a ``runs-on`` runs on: the first of its labels that ``mapping``
    (``-P LABEL=IMAGE``, added to DEFAULT_PLATFORMS; labels compared ignoring case)
    names. None when none does, and for an expression, which the runner evaluates first."""
    table = {k.lower(): v for k, v in {**DEFAULT_PLATFORMS, **(mapping or {})}.items()}
    labels = [runs_on] if isinstance(runs_on, str) else list(runs_on)
    if any("${{" in label for label in labels):
        return None
    for label in labels:
        if label.lower() in table:
            return table[label.lower()]
    return None


def runs_on_problem(runs_on: str | Sequence[str],
                    mapping: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Why a ``runs-on`` cannot run here, and the fix, or None: macOS and Windows labels,
    and self-hosted labels of which none is mapped (``-P``) or ubuntu-*. Labels the runner
    may still resolve (an image name, an expression) are not a problem here."""
    labels = [runs_on] if isinstance(runs_on, str) else list(runs_on)
    if any("${{" in label for label in labels):
        return None
    for label in labels:
        if label.lower().startswith(("macos", "windows")):
            return (f"runs-on {label}: pinnace runs Linux machines only",
                    "run it on GitHub, or use runs-on: ubuntu-latest if the job runs on Linux")
    if platform(labels, mapping) is not None:
        return None
    if any(label.lower() == "self-hosted" for label in labels):
        if not any(label.lower().startswith("ubuntu-") for label in labels):
            shown = ", ".join(labels)
            return (f"runs-on a self-hosted runner [{shown}] that names no pinnace image",
                    "map one of its labels to an image: -P LABEL=IMAGE")
    return None


def shell_command(shell: str | None, *, explicit: bool) -> tuple[list[str], str]:
    """The argv template (each ``{0}`` is replaced by the script's path) and the script file
    extension for a run step's ``shell``, as GitHub's runner does: none given
    (``explicit`` false) is ``bash -e {0}``; ``bash`` is ``bash --noprofile --norc -eo
    pipefail {0}``; ``sh`` is ``sh -e {0}``; ``python`` is ``python {0}``; anything else is a
    command line that must contain ``{0}`` (its extension from its first word: ``bash -x
    {0}`` gives .sh). PowerShell and cmd are a ConfigError."""
    if shell is None or not explicit:
        return ["bash", "-e", "{0}"], ".sh"
    builtin = {
        "bash": (["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"], ".sh"),
        "sh": (["sh", "-e", "{0}"], ".sh"),
        "python": (["python", "{0}"], ".py"),
    }
    word = shell.strip().split(" ", 1)[0].lower()
    if word in _NOT_LINUX:
        raise ConfigError("shell", shell, "PowerShell and cmd do not run in pinnace's Linux "
                          "machines; use bash")
    if shell.strip().lower() in builtin:
        argv, ext = builtin[shell.strip().lower()]
        return list(argv), ext
    try:
        argv = shlex.split(shell)
    except ValueError as exc:
        raise ConfigError("shell", shell, f"it is not a command line ({exc})") from None
    if not any("{0}" in a for a in argv):
        raise ConfigError("shell", shell, "give bash, sh or python, or a command line with {0} "
                          "where the script's path goes, e.g. 'bash -x {0}'")
    return argv, {"bash": ".sh", "sh": ".sh", "python": ".py"}.get(word, "")


def parse_duration(value: object, field: str = "timeout") -> float:
    """'90s', '30m', '1h', '1h30m' -> minutes. A bare number is refused (seconds or minutes?)."""
    hint = "give a duration with a unit, such as 90s, 30m or 1h30m"
    if not isinstance(value, str) or len(value) > 32:
        raise ConfigError(field, value, hint)
    m = _DURATION_RE.match(value.strip().lower())
    if not m or not any(m.groups()):
        raise ConfigError(field, value, hint)
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    minutes = h * 60 + mi + s / 60
    if minutes <= 0:
        raise ConfigError(field, value, "the duration must be longer than 0")
    if minutes > MAX_TIMEOUT_MINUTES:
        raise ConfigError(field, value, "give at most 7 days (168h)")
    return minutes


def matrix_text(value: Any) -> str:
    """A matrix value as GitHub turns it into a string (3.10 read as a number is "3.1",
    true is "true", null is ""), for names and ``--matrix`` comparisons."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=False)
    return str(value)


def expand_matrix(matrix: Mapping[str, Any], *, file: str = "matrix",
                  line: int | None = None) -> list[dict[str, Any]]:
    """Expand a ``strategy.matrix`` (plain data, no expressions) as GitHub does: the
    cartesian product of its vectors in order; then ``exclude`` (an entry removes the
    combinations that have all its key: values; its keys must be vectors); then each
    ``include`` entry: it is added to every combination of the product whose values for
    the entry's vector keys match (it adds its other keys, overwriting ones added by
    earlier includes, never a vector's value); one that matches none becomes a combination
    of its own. At most 256 combinations."""

    def fail(problem: str, hint: str) -> WorkflowError:
        return WorkflowError(file, line, f"matrix: {problem}", hint, field="matrix",
                             value=None)

    if not isinstance(matrix, Mapping) or not matrix:
        raise fail("it must be a mapping of vectors", "e.g. matrix: {python: ['3.11', '3.12']}")
    axes: list[tuple[str, list[Any]]] = []
    for key, values in matrix.items():
        if not isinstance(key, str):
            raise fail(f"key {key!r} is not a string", "quote it")
        if key in ("include", "exclude"):
            continue
        if not isinstance(values, list):
            raise fail(f"'{key}' must be a list of values", f"e.g. {key}: [a, b]")
        if not values:
            raise fail(f"'{key}' has no values", f"give at least one, or remove '{key}'")
        axes.append((key, values))
    extra: dict[str, list[dict[str, Any]]] = {}
    for key in ("include", "exclude"):
        entries = matrix.get(key, [])
        if entries is None:
            entries = []
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(k, str) for k in e) for e in entries):
            raise fail(f"'{key}' must be a list of mappings", f"e.g. {key}: [{{os: ubuntu-22.04}}]")
        extra[key] = entries
    names = [k for k, _ in axes]
    for entry in extra["exclude"]:
        for k in entry:
            if k not in names:
                raise fail(f"exclude key '{k}' is not a vector of the matrix",
                           f"exclude by {', '.join(names) or 'a vector'}")
    if not axes and not extra["include"]:
        raise fail("it has no vectors and no include", "e.g. matrix: {python: ['3.11', '3.12']}")
    total = math.prod(len(v) for _, v in axes) if axes else 0
    if total > MAX_PRODUCT:
        raise fail(f"{total} combinations before exclude", f"make at most {MAX_COMBINATIONS}")
    combos: list[dict[str, Any]] = []
    if axes:
        for values in itertools.product(*(v for _, v in axes)):
            combo = dict(zip(names, values, strict=True))
            if any(all(_same(combo[k], v) for k, v in ex.items()) for ex in extra["exclude"]):
                continue
            combos.append(combo)
    added: list[dict[str, Any]] = []
    for inc in extra["include"]:
        matched = False
        for combo in combos:
            if all(_same(combo[k], v) for k, v in inc.items() if k in names):
                matched = True
                combo.update((k, v) for k, v in inc.items() if k not in names)
        if not matched:
            added.append(dict(inc))
    combos += added
    if not combos:
        raise fail("exclude leaves no combination", "exclude fewer")
    if len(combos) > MAX_COMBINATIONS:
        raise fail(f"{len(combos)} combinations", f"GitHub allows at most {MAX_COMBINATIONS}; "
                   "exclude some or split the job")
    return combos


# ---------------------------------------------------------------------------- internals


def _same(a: Any, b: Any) -> bool:
    """Equal as matrix values: true is not 1."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


def _variant(job: Job, combo: Mapping[str, Any]) -> str:
    base = job.name if "${{" not in job.name else job.id
    return f"{base} ({', '.join(matrix_text(v) for v in combo.values())})"


def _suggest(word: str, known: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(word, list(known), 1)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"{what}: {', '.join(known)}" if known else f"there are no {what}"


def _has_expr(value: Any) -> bool:
    if isinstance(value, str):
        return "${{" in value
    if isinstance(value, dict):
        return any(_has_expr(k) or _has_expr(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_expr(v) for v in value)
    return False


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool | ScalarBoolean):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _node_line(node: Any) -> int | None:
    try:
        return int(node.lc.line) + 1
    except (AttributeError, TypeError):
        return None


def _key_line(m: Any, key: Any) -> int | None:
    try:
        return int(m.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return _node_line(m)


def _at(m: Any, key: Any) -> int | None:
    """The line of ``m[key]``: the value's for a scalar, the key's for a container."""
    if isinstance(m.get(key), dict | list):
        return _key_line(m, key)
    try:
        return int(m.lc.value(key)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return _key_line(m, key)


def _item_line(seq: Any, i: int) -> int | None:
    try:
        return int(seq.lc.item(i)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return _node_line(seq)


def _levels(order: Sequence[str], needs: Mapping[str, Sequence[str]],
            where: Callable[[str], tuple[str, int | None]]) -> list[list[str]]:
    """Kahn's levels of ``order`` by ``needs`` (all known); a cycle is a WorkflowError."""
    done: set[str] = set()
    left = list(order)
    levels: list[list[str]] = []
    while left:
        level = [j for j in left if all(n in done for n in needs[j])]
        if not level:
            cycle = _cycle(left, needs)
            file, line = where(cycle[0])
            raise WorkflowError(file, line, "needs form a cycle: " + " -> ".join(cycle),
                                "remove one of these needs", field="needs", value=cycle[0])
        levels.append(level)
        done.update(level)
        left = [j for j in left if j not in done]
    return levels


def _cycle(left: Sequence[str], needs: Mapping[str, Sequence[str]]) -> list[str]:
    """A cycle among ``left`` (each of which needs one of ``left``), as a -> b -> a."""
    pending = set(left)
    node = left[0]
    path: list[str] = []
    while node not in path:
        path.append(node)
        node = next(n for n in needs[node] if n in pending)
    return [*path[path.index(node):], node]


class _Scanner(RoundTripScanner):
    """Round-trip scanner that counts tokens, and refuses deep flow nesting (``[[[[...``)
    as it meets it: ruamel's scanner slows down with the square of that depth."""

    tokens_seen = 0

    def fetch_more_tokens(self) -> None:
        self.tokens_seen += 1
        if self.tokens_seen > MAX_TOKENS:
            raise ScannerError(problem=f"{_TOO_MANY} {MAX_TOKENS} YAML tokens",
                               problem_mark=self.reader.get_mark())
        super().fetch_more_tokens()

    def fetch_flow_collection_start(self, TokenClass: Any, to_push: str) -> None:
        if len(self.flow_context) >= MAX_FLOW_DEPTH:
            raise ScannerError(problem=_TOO_DEEP_FLOW, problem_mark=self.reader.get_mark())
        super().fetch_flow_collection_start(TokenClass, to_push)


class _Constructor(RoundTripConstructor):
    """Round-trip constructor (line numbers) that leaves timestamps strings, as GitHub does."""


_Constructor.add_constructor("tag:yaml.org,2002:timestamp", _Constructor.construct_yaml_str)


def _measure(node: Any, memo: dict[int, tuple[int, int]], active: set[int],
             fail: Callable[[str], WorkflowError]) -> tuple[int, int]:
    """(height, values) of a YAML tree, each alias counted each time it is used; too deep
    or too many is ``fail(problem)``. Memoised, so an alias bomb costs no more than its text."""
    if not isinstance(node, dict | list):
        return 0, 1
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise fail("a YAML alias refers to a value that contains it")
    active.add(key)
    height, count = 0, 1
    children: Iterable[Any] = (itertools.chain.from_iterable(node.items())
                               if isinstance(node, dict) else node)
    for child in children:
        h, n = _measure(child, memo, active, fail)
        height, count = max(height, h), count + n
        if count > MAX_VALUES:
            raise fail(f"it holds more than {MAX_VALUES} values once YAML aliases are followed")
        if height + 1 > MAX_DEPTH:
            raise fail(_TOO_DEEP)
    active.discard(key)
    memo[key] = (height + 1, count)
    return memo[key]


def _detect(reader: _Reader, doc: Any, path: Path) -> Kind:
    if "on" not in doc and any(isinstance(k, bool) and k for k in doc):
        raise reader.fail(_key_line(doc, True), "the key 'on' was read as true (YAML 1.1)",
                          "remove the %YAML 1.1 line, or write \"on\":")
    if "steps" in doc:
        if "jobs" in doc:
            raise reader.fail(_key_line(doc, "steps"), "the file has both steps: and jobs:",
                              "put the steps under a job, or drop jobs:")
        return "pinnace"
    jobs = doc.get("jobs")
    if "on" in doc:
        return "github"
    if isinstance(jobs, dict):
        values = [v for v in jobs.values() if isinstance(v, dict)]
        if any("runs-on" in v or "uses" in v for v in values):
            return "github"
        if any("image" in v for v in values):
            return "pinnace"
        if path.parent.name == "workflows" and path.parent.parent.name == ".github":
            return "github"
        return "pinnace"
    raise reader.fail(_node_line(doc), "the file has no jobs: and no steps:",
                      "a GitHub workflow has on: and jobs:; pinnace's format has steps: "
                      "(see pinnace ci --help)")


class _Reader:
    """Reads one file: keeps its name for errors, and the -P mapping for skips."""

    def __init__(self, file: str, platforms: Mapping[str, str]) -> None:
        self.file = file
        self.platforms = platforms

    def fail(self, line: int | None, problem: str, hint: str = "") -> WorkflowError:
        return WorkflowError(self.file, line, " ".join(problem.split()), hint)

    # -- reading the YAML

    def parse(self, path: Path) -> Any:
        try:
            if not path.is_file():
                raise self.fail(None, "no such file" if not path.exists() else
                                "it is not a regular file", "give the path of a workflow file")
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise self.fail(None, f"cannot read it: {exc.strerror or exc}",
                            "check the path and its permissions") from None
        if len(data) > MAX_FILE_BYTES:
            raise self.fail(None, f"the file is larger than {MAX_FILE_BYTES >> 20} MiB",
                            "a workflow file is a few KiB; is this the right file?")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise self.fail(line, "the file is not UTF-8 text", "save it as UTF-8") from None
        yaml = YAML(typ="rt")
        yaml.Constructor = _Constructor
        yaml.Scanner = _Scanner
        try:
            doc = yaml.load(text)
        except RecursionError:
            raise self.fail(None, "it is nested too deeply to read",
                            f"nest at most {MAX_DEPTH} levels") from None
        except Exception as exc:  # any parser failure is a bad file, never a crash
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            at = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or (str(exc) or type(exc).__name__)
            problem = problem.strip().splitlines()[0]
            context = getattr(exc, "context", None)
            what = f"{context}: {problem}" if context and "duplicate" not in problem else problem
            if problem == _TOO_DEEP_FLOW:
                raise self.fail(at, problem, "write deep values in block style") from None
            if problem.startswith(_TOO_MANY):
                raise self.fail(None, problem, "a workflow file is a few KiB; is this the right "
                                "file?") from None
            raise self.fail(at, f"not valid YAML: {what}", "fix the YAML at that line") from None
        if doc is None:
            raise self.fail(None, "the file is empty", "see pinnace ci --help for the format")
        _measure(doc, {}, set(), lambda problem: self.fail(None, problem, "simplify the file"))
        if not isinstance(doc, dict):
            raise self.fail(_node_line(doc), f"the file is {_kind(doc)}, not a mapping",
                            "a workflow is a mapping with jobs: (GitHub) or steps: (pinnace)")
        return doc

    def plain(self, value: Any, line: int | None) -> Any:
        """``value`` as plain Python data (dict, list, str, int, float, bool, None)."""
        if value is None or isinstance(value, str):
            return None if value is None else str(value)
        if isinstance(value, bool | ScalarBoolean):
            return bool(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, dict):
            return {self.plain(k, _key_line(value, k)): self.plain(v, _at(value, k))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self.plain(v, _item_line(value, i)) for i, v in enumerate(value)]
        raise self.fail(line, f"a value of type {type(value).__name__} (a YAML tag?) where "
                        "plain data belongs", "remove the tag")

    # -- small typed readers of m[key]

    def mapping(self, m: Any, key: str, what: str) -> Any:
        value = m.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(_at(m, key), f"{what}: '{key}' must be a mapping, not {_kind(value)}",
                            f"write {key}: {{NAME: value}} or one NAME: value per line")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(_key_line(value, k), f"{what}: key {k!r} in '{key}' is not a "
                                "string", "quote it")
        return value

    def known(self, m: Any, allowed: Sequence[str], what: str) -> None:
        for k in m:
            if not isinstance(k, str):
                raise self.fail(_key_line(m, k), f"{what}: key {k!r} is not a string",
                                "quote it")
            if k not in allowed:
                raise self.fail(_key_line(m, k), f"{what}: unknown key '{k}'",
                                _suggest(k, sorted(allowed), "known keys"))

    def scalar(self, m: Any, key: str, what: str, *, default: str | None = None) -> str | None:
        """A scalar as GitHub reads it into a string (true -> "true"); None when absent."""
        if key not in m or m[key] is None:
            return default
        value = m[key]
        if isinstance(value, dict | list):
            raise self.fail(_at(m, key), f"{what}: '{key}' must be a string, not {_kind(value)}",
                            f"write {key}: VALUE")
        return matrix_text(self.plain(value, _at(m, key)))

    def string(self, m: Any, key: str, what: str) -> str | None:
        """A string (or number: 'working-directory: 2' is fine), not true/false."""
        if key in m and isinstance(m[key], bool | ScalarBoolean):
            raise self.fail(_at(m, key), f"{what}: '{key}' must be a string, not true/false",
                            "quote it")
        return self.scalar(m, key, what)

    def env(self, m: Any, key: str, what: str) -> dict[str, str]:
        env = self.mapping(m, key, what)
        out: dict[str, str] = {}
        for name, value in env.items():
            if not name or "=" in name or "\0" in name:
                raise self.fail(_key_line(env, name), f"{what}: '{name}' is not a variable name",
                                "use letters, digits and '_'")
            if isinstance(value, dict | list):
                raise self.fail(_at(env, name), f"{what}: {key}.{name} must be a string, not "
                                f"{_kind(value)}", "quote it, or use toJSON in an expression")
            out[name] = matrix_text(self.plain(value, _at(env, name)))
        return out

    def timeout_minutes(self, m: Any, key: str, what: str) -> float | str | None:
        if key not in m or m[key] is None:
            return None
        value = m[key]
        if isinstance(value, str) and "${{" in value:
            return str(value)
        if isinstance(value, int | float) and not isinstance(value, bool | ScalarBoolean):
            if 0 < value <= MAX_TIMEOUT_MINUTES:
                return float(value)
        raise self.fail(_at(m, key), f"{what}: '{key}' must be a number of minutes, not "
                        f"{value!r}", f"e.g. {key}: 30")

    def flag(self, m: Any, key: str, what: str) -> bool | str:
        if key not in m or m[key] is None:
            return False
        value = m[key]
        if isinstance(value, bool | ScalarBoolean):
            return bool(value)
        if isinstance(value, str) and "${{" in value:
            return str(value)
        raise self.fail(_at(m, key), f"{what}: '{key}' must be true or false, not {value!r}",
                        "or an expression ${{ ... }}")

    def condition(self, m: Any, key: str, what: str) -> str | None:
        if key not in m or m[key] is None:
            return None
        return self.scalar(m, key, what)

    def duration(self, m: Any, key: str, what: str) -> float | None:
        if key not in m or m[key] is None:
            return None
        try:
            return parse_duration(self.plain(m[key], _at(m, key)), key)
        except ConfigError as exc:
            raise self.fail(_at(m, key), f"{what}: '{key}' is {m[key]!r}", exc.hint) from None

    def names(self, m: Any, key: str, what: str) -> tuple[str, ...]:
        """A string or a list of strings (needs, runs-on labels, artifacts)."""
        value = m.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (str(value),)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(str(v) for v in value)
        raise self.fail(_at(m, key), f"{what}: '{key}' must be a string or a list of strings",
                        f"e.g. {key}: [a, b]")

    def defaults(self, m: Any, what: str) -> tuple[DefaultsRun, int | None]:
        """``defaults.run`` of ``m``, and the line of its shell."""
        defaults = self.mapping(m, "defaults", what)
        self.known(defaults, ("run",), f"{what}: defaults")
        run = self.mapping(defaults, "run", what)
        self.known(run, ("shell", "working-directory"), f"{what}: defaults.run")
        return (DefaultsRun(self.string(run, "shell", what),
                            self.string(run, "working-directory", what)),
                _at(run, "shell") if "shell" in run else None)

    # -- GitHub workflows

    def github(self, doc: Any, path: Path, event: str) -> Workflow:
        self.known(doc, _GITHUB_TOP, "workflow")
        on = self.triggers(doc)
        name = self.scalar(doc, "name", "workflow") or path.name
        env = self.env(doc, "env", "workflow")
        defaults, shell_line = self.defaults(doc, "workflow")
        jobs_node = doc.get("jobs")
        if not isinstance(jobs_node, dict) or not jobs_node:
            raise self.fail(_key_line(doc, "jobs") if "jobs" in doc else _node_line(doc),
                            "the workflow has no jobs", "add jobs: with at least one job")
        ids: list[str] = []
        for jid in jobs_node:
            if not isinstance(jid, str) or not _ID_RE.match(jid):
                raise self.fail(_key_line(jobs_node, jid), f"job id {jid!r} is not valid",
                                "start with a letter or '_'; use letters, digits, '-', '_'")
            if not isinstance(jobs_node[jid], dict):
                raise self.fail(_key_line(jobs_node, jid), f"job '{jid}' must be a mapping, not "
                                f"{_kind(jobs_node[jid])}", "give it runs-on: and steps:")
            ids.append(jid)
        needs: dict[str, tuple[str, ...]] = {}
        for jid in ids:
            node = jobs_node[jid]
            needs[jid] = self.names(node, "needs", f"job '{jid}'")
            for need in needs[jid]:
                if need not in jobs_node:
                    raise self.fail(_at(node, "needs"), f"job '{jid}' needs '{need}', which is "
                                    "not a job of this workflow", _suggest(need, ids, "jobs"))
        _levels(ids, needs, lambda jid: (self.file, _key_line(jobs_node[jid], "needs")))
        built: dict[str, Job] = {}
        problems: dict[str, list[Skipped]] = {}
        for jid in ids:
            job, skips = self.github_job(jid, jobs_node, env, defaults, shell_line)
            problems[jid] = skips
            if job is not None:
                built[jid] = job
        for level in _levels(ids, needs, lambda jid: (self.file, None)):
            for jid in level:
                if problems[jid]:
                    continue
                bad = next((n for n in needs[jid] if problems[n]), None)
                if bad is not None:
                    problems[jid] = [Skipped(jid, self.file, _key_line(jobs_node[jid], "needs")
                                             or 1, f"needs '{bad}', which cannot run",
                                             f"make '{bad}' runnable, or remove it from needs")]
        skipped = [s for jid in ids for s in problems[jid]]
        jobs = {jid: built[jid] for jid in ids if not problems[jid]}
        return Workflow(path=path, name=name, kind="github", jobs=jobs, skipped=skipped,
                        env=env, defaults_run=defaults, on=on, event=event)

    def triggers(self, doc: Any) -> dict[str, Any]:
        if "on" not in doc:
            raise self.fail(_node_line(doc), "the workflow has no on:",
                            "add the events it runs on, e.g. on: [push, pull_request]")
        value = doc["on"]
        line = _at(doc, "on")
        hint = "give an event, a list of events, or a mapping of events to their filters"
        if isinstance(value, str):
            return {str(value): None}
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return {str(v): None for v in value}
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            return {str(k): self.plain(v, _at(value, k)) for k, v in value.items()}
        raise self.fail(line, f"on: must name events, not {_kind(value)}", hint)

    def github_job(self, jid: str, jobs_node: Any, wf_env: dict[str, str],
                   wf_defaults: DefaultsRun,
                   wf_shell_line: int | None) -> tuple[Job | None, list[Skipped]]:
        node = jobs_node[jid]
        what = f"job '{jid}'"
        line = _key_line(jobs_node, jid) or 0
        self.known(node, _GITHUB_JOB, what)
        skips: list[Skipped] = []

        def skip(at: int | None, reason: str, fix: str) -> None:
            skips.append(Skipped(jid, self.file, at or line, reason, fix))

        name = self.scalar(node, "name", what) or jid
        if "uses" in node:
            uses = self.scalar(node, "uses", what) or ""
            if uses.startswith("./"):
                fix = f"run that file's jobs with pinnace ci run {uses[2:].split('@')[0]}"
            else:
                fix = "copy its jobs into this workflow"
            skip(_at(node, "uses"), f"it calls the reusable workflow {uses}", fix)
            return None, skips
        if "runs-on" not in node or node["runs-on"] is None:
            raise self.fail(line, f"{what}: 'runs-on' is missing",
                            "give a label such as ubuntu-latest")
        runs_on = self.runs_on(node, what)
        if runs_on is None:
            skip(_at(node, "runs-on"), "it runs on a runner group",
                 "give it runs-on: ubuntu-latest")
            runs_on = ""
        else:
            problem = runs_on_problem(runs_on, self.platforms)
            if problem:
                skip(_at(node, "runs-on"), *problem)
        if "container" in node:
            image = node["container"]
            shown = image.get("image") if isinstance(image, dict) else image
            skip(_key_line(node, "container"), f"it runs in a container ({shown})",
                 "remove container: and install what the job needs in a run: step; the job "
                 "runs in a Debian machine")
        if "services" in node:
            services = node["services"]
            shown = ", ".join(str(k) for k in services) if isinstance(services, dict) else ""
            skip(_key_line(node, "services"), f"it needs service containers ({shown})",
                 "install and start the services in a run: step, e.g. apt-get install -y "
                 "postgresql && service postgresql start")
        job_defaults, job_shell_line = self.defaults(node, what)
        defaults = DefaultsRun(job_defaults.shell or wf_defaults.shell,
                               job_defaults.working_directory or wf_defaults.working_directory)
        shell_line = job_shell_line if job_defaults.shell else wf_shell_line
        steps = self.github_steps(node, what, defaults, shell_line, skip)
        strategy = self.strategy(node, what)
        outputs = self.mapping(node, "outputs", what)
        job = Job(
            id=jid, name=name, file=self.file, line=line, runs_on=runs_on, steps=steps,
            variant=name if "${{" not in name else jid,
            needs=self.names(node, "needs", what),
            needs_line=(_at(node, "needs") or 0) if "needs" in node else 0,
            if_=self.condition(node, "if", what),
            timeout_minutes=self.timeout_minutes(node, "timeout-minutes", what),
            continue_on_error=self.flag(node, "continue-on-error", what),
            env={**wf_env, **self.env(node, "env", what)}, defaults_run=defaults,
            strategy=strategy,
            outputs={k: self.scalar(outputs, k, f"{what}: outputs") or "" for k in outputs},
        )
        return job, skips

    def runs_on(self, node: Any, what: str) -> str | tuple[str, ...] | None:
        value = node["runs-on"]
        if isinstance(value, dict):
            self.known(value, ("group", "labels"), f"{what}: runs-on")
            labels = self.names(value, "labels", f"{what}: runs-on")
            return labels or None
        if isinstance(value, str):
            return str(value)
        return self.names(node, "runs-on", what)

    def github_steps(self, node: Any, what: str, defaults: DefaultsRun,
                     shell_line: int | None,
                     skip: Callable[[int | None, str, str], None]) -> tuple[Step, ...]:
        seq = node.get("steps")
        if not isinstance(seq, list) or not seq:
            raise self.fail(_key_line(node, "steps") if "steps" in node else
                            _node_line(node), f"{what}: 'steps' is missing or empty",
                            "give a list of steps, e.g. steps: [{run: make}]")
        steps: list[Step] = []
        seen: set[str] = set()
        shell_reported = False
        for i, s in enumerate(seq):
            line = _item_line(seq, i) or 0
            where = f"{what}: step {i + 1}"
            if not isinstance(s, dict):
                raise self.fail(line, f"{where} must be a mapping, not {_kind(s)}",
                                "give it run: or uses:")
            self.known(s, _GITHUB_STEP, where)
            if ("run" in s) == ("uses" in s):
                raise self.fail(line, f"{where} needs one of run: and uses:",
                                "give a run: script or a uses: action")
            sid = self.scalar(s, "id", where)
            if sid is not None:
                if not _ID_RE.match(sid) and "${{" not in sid:
                    raise self.fail(_at(s, "id"), f"{where}: id '{sid}' is not valid",
                                    "start with a letter or '_'; use letters, digits, '-', '_'")
                if sid in seen:
                    raise self.fail(_at(s, "id"), f"{where}: id '{sid}' is used twice",
                                    "give each step its own id")
                seen.add(sid)
            common: dict[str, Any] = dict(
                index=i, line=line, id=sid, env=self.env(s, "env", where),
                working_directory=self.string(s, "working-directory", where),
                if_=self.condition(s, "if", where),
                continue_on_error=self.flag(s, "continue-on-error", where),
                timeout_minutes=self.timeout_minutes(s, "timeout-minutes", where))
            if "uses" in s:
                uses = self.scalar(s, "uses", where) or ""
                action = self.action(uses, _at(s, "uses"), where)
                if action != "actions/checkout":
                    skip(_at(s, "uses"), f"step {i + 1} uses {uses}",
                         _ACTION_FIXES.get(action, _ACTION_FIX))
                    continue
                with_ = self.env(s, "with", where)
                name = self.scalar(s, "name", where) or f"Run {uses}"
                steps.append(Step(name=name, kind="checkout", uses=uses, with_=with_, **common))
                continue
            run = self.scalar(s, "run", where)
            if not run or not run.strip():
                raise self.fail(_at(s, "run"), f"{where}: 'run' is empty", "give a script")
            shell = self.string(s, "shell", where)
            source = _at(s, "shell") if shell is not None else shell_line
            effective = shell if shell is not None else defaults.shell
            if effective is not None and "${{" not in effective:
                word = effective.strip().split(" ", 1)[0].lower()
                if word in _NOT_LINUX:
                    if shell is not None or not shell_reported:
                        skip(source, f"{'step ' + str(i + 1) if shell else 'its run steps'} "
                             f"use{'s' if shell else ''} shell {effective}",
                             "rewrite the script for bash; pinnace's machines run Linux")
                        shell_reported = shell_reported or shell is None
                elif shell is not None:
                    try:
                        shell_command(shell, explicit=True)
                    except ConfigError as exc:
                        raise self.fail(source, f"{where}: shell '{shell}' is not valid",
                                        exc.hint) from None
            first = next((ln.strip() for ln in run.splitlines() if ln.strip()), "")
            name = self.scalar(s, "name", where) or f"Run {first}"
            steps.append(Step(name=name, run=run, shell=shell, **common))
        return tuple(steps)

    def action(self, uses: str, line: int | None, where: str) -> str:
        """The "owner/name" of a ``uses:`` (lower case), "./..." or "docker://..."."""
        if uses.startswith("./") or uses.startswith("docker://"):
            return uses
        if "@" not in uses or uses.startswith("@") or uses.endswith("@"):
            raise self.fail(line, f"{where}: uses '{uses}' has no version",
                            "write OWNER/REPO@REF, e.g. actions/checkout@v4")
        return "/".join(uses.split("@", 1)[0].lower().split("/")[:2])

    def strategy(self, node: Any, what: str) -> Strategy:
        if node.get("strategy") is None:
            return Strategy()
        st = self.mapping(node, "strategy", what)
        self.known(st, ("matrix", "fail-fast", "max-parallel"), f"{what}: strategy")
        fail_fast = True
        if st.get("fail-fast") is not None:
            if not isinstance(st["fail-fast"], bool | ScalarBoolean):
                raise self.fail(_at(st, "fail-fast"), f"{what}: fail-fast must be true or false",
                                "pinnace does not evaluate expressions there")
            fail_fast = bool(st["fail-fast"])
        max_parallel = None
        if st.get("max-parallel") is not None:
            value = st["max-parallel"]
            if isinstance(value, bool | ScalarBoolean) or not isinstance(value, int) or value < 1:
                raise self.fail(_at(st, "max-parallel"), f"{what}: max-parallel must be a "
                                f"number of jobs, not {value!r}", "e.g. max-parallel: 2")
            max_parallel = int(value)
        if st.get("matrix") is None:
            return Strategy(fail_fast=fail_fast, max_parallel=max_parallel)
        line = _key_line(st, "matrix")
        matrix = self.plain(st["matrix"], line)
        if _has_expr(matrix):
            return Strategy(matrix=matrix, deferred=True, fail_fast=fail_fast,
                            max_parallel=max_parallel)
        combos = expand_matrix(matrix, file=self.file, line=line)
        return Strategy(matrix=matrix, combinations=tuple(combos), fail_fast=fail_fast,
                        max_parallel=max_parallel)

    # -- pinnace's own format

    def pinnace(self, doc: Any, path: Path, event: str) -> Workflow:
        name = self.scalar(doc, "name", "workflow") or path.name
        if "steps" in doc:
            self.known(doc, _PINNACE_JOB, "workflow")
            job = self.pinnace_job("ci", doc, _node_line(doc) or 1, {}, "workflow")
            jobs = {"ci": job}
            env: dict[str, str] = {}
        else:
            self.known(doc, ("name", "env", "jobs"), "workflow")
            env = self.env(doc, "env", "workflow")
            node = doc.get("jobs")
            if not isinstance(node, dict) or not node:
                raise self.fail(_key_line(doc, "jobs"), "jobs: must map job ids to jobs",
                                "e.g. jobs: {build: {steps: [make]}}")
            jobs = {}
            for jid, body in node.items():
                if not isinstance(jid, str) or not _ID_RE.match(jid):
                    raise self.fail(_key_line(node, jid), f"job id {jid!r} is not valid",
                                    "start with a letter or '_'; use letters, digits, '-', '_'")
                if not isinstance(body, dict):
                    raise self.fail(_key_line(node, jid), f"job '{jid}' must be a mapping, "
                                    f"not {_kind(body)}", "give it steps:")
                self.known(body, (*_PINNACE_JOB, "needs"), f"job '{jid}'")
                jobs[jid] = self.pinnace_job(jid, body, _key_line(node, jid) or 1, env,
                                             f"job '{jid}'")
            for job in jobs.values():
                for need in job.needs:
                    if need not in jobs:
                        raise self.fail(job.needs_line or job.line, f"job '{job.id}' needs '{need}', which "
                                        "is not a job of this workflow",
                                        _suggest(need, list(jobs), "jobs"))
            _levels(list(jobs), {j.id: j.needs for j in jobs.values()},
                    lambda jid: (self.file, jobs[jid].needs_line or jobs[jid].line))
        return Workflow(path=path, name=name, kind="pinnace", jobs=jobs, skipped=[], env=env,
                        defaults_run=DefaultsRun(shell="bash"), on={}, event=event)

    def pinnace_job(self, jid: str, node: Any, line: int, wf_env: dict[str, str],
                    what: str) -> Job:
        seq = node.get("steps")
        if not isinstance(seq, list) or not seq:
            raise self.fail(_key_line(node, "steps") if "steps" in node else line,
                            f"{what}: 'steps' is missing or empty",
                            "give a list of steps, e.g. steps: [make, make check]")
        checkout = node.get("checkout", True)
        if not isinstance(checkout, bool | ScalarBoolean):
            raise self.fail(_at(node, "checkout"), f"{what}: checkout must be true or false",
                            "checkout: false starts with an empty /workspace")
        steps = []
        if checkout:  # (the repository in /workspace before the first step, as a checkout)
            steps.append(Step(index=0, name="checkout", line=line, kind="checkout",
                              uses=_CHECKOUT + "builtin"))
        for n, s in enumerate(seq):
            i = len(steps)
            sline = _item_line(seq, n) or line
            where = f"{what}: step {n + 1}"
            if isinstance(s, str):
                s_map: Any = {"run": s}
            elif isinstance(s, dict):
                s_map = s
                self.known(s, _PINNACE_STEP, where)
            else:
                raise self.fail(sline, f"{where} must be a command or a mapping, not {_kind(s)}",
                                "e.g. - make, or - {name: build, run: make}")
            run = self.scalar(s_map, "run", where) if isinstance(s, dict) else str(s)
            if not run or not run.strip():
                raise self.fail(sline, f"{where}: 'run' is missing or empty", "give a script")
            shell = self.string(s_map, "shell", where) if isinstance(s, dict) else None
            if shell is not None:
                try:
                    shell_command(shell, explicit=True)
                except ConfigError as exc:
                    raise self.fail(_at(s_map, "shell"), f"{where}: shell '{shell}' is not "
                                    "valid", exc.hint) from None
            first = next((ln.strip() for ln in run.splitlines() if ln.strip()), "")
            if isinstance(s, dict):
                steps.append(Step(
                    index=i, line=sline, name=self.scalar(s, "name", where) or first, run=run,
                    shell=shell, env=self.env(s, "env", where),
                    working_directory=self.string(s, "working-directory", where),
                    timeout_minutes=self.duration(s, "timeout", where)))
            else:
                steps.append(Step(index=i, line=sline, name=first, run=run))
        name = None if what == "workflow" else self.scalar(node, "name", what)
        return Job(
            id=jid, name=name or jid, file=self.file, line=line, runs_on="",
            steps=tuple(steps), variant=name or jid, image=self.image(node, what),
            needs=self.names(node, "needs", what),
            needs_line=(_at(node, "needs") or line) if "needs" in node else 0,
            timeout_minutes=self.duration(node, "timeout", what),
            env={**wf_env, **self.env(node, "env", what)},
            defaults_run=DefaultsRun(shell="bash"), caches=self.caches(node, what),
            artifacts=self.artifacts(node, what), limits=self.limits(node, what))

    def image(self, node: Any, what: str) -> str | ImageSpec:
        value = node.get("image")
        if value is None:
            return "default"
        if isinstance(value, str):
            if not NAME_RE.match(value):
                raise self.fail(_at(node, "image"), f"{what}: image '{value}' is not an image "
                                "name", NAME_HINT)
            return str(value)
        if isinstance(value, dict):
            self.known(value, ("packages",), f"{what}: image")
            packages = value.get("packages")
            if (not isinstance(packages, list) or not packages
                    or not all(isinstance(p, str) and _PACKAGE_RE.match(p) for p in packages)):
                raise self.fail(_key_line(value, "packages") if "packages" in value else
                                _at(node, "image"), f"{what}: image.packages must be a list "
                                "of Debian package names", "e.g. image: {packages: [gcc, make]}")
            return ImageSpec(tuple(str(p) for p in packages))
        raise self.fail(_at(node, "image"), f"{what}: image must be a name or "
                        "{packages: [...]}", "e.g. image: default")

    def caches(self, node: Any, what: str) -> tuple[Cache, ...]:
        seq = node.get("caches")
        if seq is None:
            return ()
        if not isinstance(seq, list):
            raise self.fail(_at(node, "caches"), f"{what}: caches must be a list",
                            "e.g. caches: [{name: pip, path: ~/.cache/pip}]")
        out: list[Cache] = []
        for i, c in enumerate(seq):
            line = _item_line(seq, i)
            where = f"{what}: cache {i + 1}"
            if not isinstance(c, dict):
                raise self.fail(line, f"{where} must be a mapping", "give it name: and path:")
            self.known(c, ("name", "path", "key", "restore-keys", "size"), where)
            name = self.scalar(c, "name", where)
            path = self.scalar(c, "path", where)
            if not name or not _CACHE_NAME_RE.match(name):
                raise self.fail(line, f"{where}: name {name!r} is not valid",
                                "use letters, digits, '.', '_' or '-'")
            if name in {x.name for x in out}:
                raise self.fail(line, f"{where}: the name '{name}' is used twice",
                                "give each cache its own name")
            if not path:
                raise self.fail(line, f"{where}: 'path' is missing", "give the directory to keep")
            size = None
            if c.get("size") is not None:
                try:
                    size = parse_size(self.plain(c["size"], None), "cache size")
                except ConfigError as exc:
                    raise self.fail(_at(c, "size"), f"{where}: size is {c['size']!r}",
                                    exc.hint) from None
            out.append(Cache(name, path, self.scalar(c, "key", where) or name,
                             tuple(k.strip() for ks in self.names(c, "restore-keys", where)
                                   for k in ks.splitlines() if k.strip()), size))
        return tuple(out)

    def artifacts(self, node: Any, what: str) -> tuple[str, ...]:
        paths = self.names(node, "artifacts", what)
        for p in paths:
            if not p.strip() or "\0" in p or "\n" in p:
                raise self.fail(_at(node, "artifacts"), f"{what}: artifact path {p!r} is not "
                                "valid", "give paths relative to the workspace, e.g. dist/")
        return paths

    def limits(self, node: Any, what: str) -> Limits:
        lim = self.mapping(node, "limits", what)
        self.known(lim, ("memory", "cpus", "pids"), f"{what}: limits")
        memory = None
        if lim.get("memory") is not None:
            try:
                memory = parse_size(self.plain(lim["memory"], None), "memory")
            except ConfigError as exc:
                raise self.fail(_at(lim, "memory"), f"{what}: limits.memory is "
                                f"{lim['memory']!r}", exc.hint) from None
        counts: dict[str, int | None] = {}
        for key, top in (("cpus", MAX_CPUS), ("pids", 1 << 22)):
            value = lim.get(key)
            if value is None:
                counts[key] = None
            elif (isinstance(value, int) and not isinstance(value, bool | ScalarBoolean)
                  and 1 <= value <= top):
                counts[key] = int(value)
            else:
                raise self.fail(_at(lim, key), f"{what}: limits.{key} is {value!r}",
                                f"give a whole number from 1 to {top}")
        return Limits(memory=memory, cpus=counts["cpus"], pids=counts["pids"])
