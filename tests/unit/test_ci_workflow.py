"""pinnace.ci.workflow: reading GitHub workflows and pinnace's own format into the model."""

import textwrap
from pathlib import Path

import pytest

from pinnace.ci.workflow import (
    Cache,
    DefaultsRun,
    ImageSpec,
    Job,
    Limits,
    Skipped,
    Step,
    Workflow,
    WorkflowError,
    discover,
    expand,
    expand_matrix,
    load,
    matrix_text,
    parse_duration,
    platform,
    runs_on_problem,
    select,
    shell_command,
    stages,
    triggered,
)
from pinnace.errors import ConfigError


def write(root: Path, text: str, name: str = ".github/workflows/ci.yml") -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error(path: Path, **kw: object) -> WorkflowError:
    with pytest.raises(WorkflowError) as info:
        load(path, **kw)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------- a typical Python CI

PYTHON_CI = """
name: Python CI
on:
  push:
    branches: [main]
  pull_request:
env:
  PYTHONUNBUFFERED: 1
  FORCE_COLOR: true
jobs:
  test:
    name: tests
    runs-on: ${{ matrix.os }}
    timeout-minutes: 20
    strategy:
      fail-fast: false
      max-parallel: 4
      matrix:
        python-version: ["3.11", "3.12", 3.10]
        os: [ubuntu-latest, ubuntu-22.04]
    env:
      PIP_DISABLE_PIP_VERSION_CHECK: "1"
    steps:
      - uses: actions/checkout@v4
        with:
          fetch-depth: 0
      - name: Install
        run: |
          python -m pip install -e .[dev]
          pip list
      - run: pytest -q
        shell: bash
        id: tests
        env:
          PY: ${{ matrix.python-version }}
        continue-on-error: ${{ matrix.python-version == '3.12' }}
        timeout-minutes: 5.5
        working-directory: src
"""


def test_a_python_ci_with_a_matrix(tmp_path):
    wf = load(write(tmp_path, PYTHON_CI))
    assert (wf.kind, wf.name, wf.skipped) == ("github", "Python CI", [])
    assert wf.on == {"push": {"branches": ["main"]}, "pull_request": None}
    assert wf.env == {"PYTHONUNBUFFERED": "1", "FORCE_COLOR": "true"}
    job = wf.jobs["test"]
    assert (job.id, job.name, job.line, job.runs_on) == ("test", "tests", 10, "${{ matrix.os }}")
    assert (job.timeout_minutes, job.image, job.matrix, job.variant) == (20.0, None, {}, "tests")
    assert job.env == {"PYTHONUNBUFFERED": "1", "FORCE_COLOR": "true",
                       "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    assert (job.strategy.fail_fast, job.strategy.max_parallel) == (False, 4)
    checkout, install, pytest_ = job.steps
    assert checkout == Step(index=0, name="Run actions/checkout@v4", line=23, kind="checkout",
                            uses="actions/checkout@v4", with_={"fetch-depth": "0"})
    assert install == Step(index=1, name="Install", line=26,
                           run="python -m pip install -e .[dev]\npip list\n")
    assert pytest_ == Step(index=2, name="Run pytest -q", line=30, run="pytest -q", id="tests",
                           shell="bash", env={"PY": "${{ matrix.python-version }}"},
                           working_directory="src",
                           continue_on_error="${{ matrix.python-version == '3.12' }}",
                           timeout_minutes=5.5)
    assert job.command(install) == (["bash", "-e", "{0}"], ".sh")
    assert job.command(pytest_) == (["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"],
                                    ".sh")
    # 3.10 unquoted is the number 3.1, as on GitHub; names show values as GitHub does.
    variants = select(wf)
    assert [(j.variant, j.matrix) for j in variants] == [
        ("tests (3.11, ubuntu-latest)", {"python-version": "3.11", "os": "ubuntu-latest"}),
        ("tests (3.11, ubuntu-22.04)", {"python-version": "3.11", "os": "ubuntu-22.04"}),
        ("tests (3.12, ubuntu-latest)", {"python-version": "3.12", "os": "ubuntu-latest"}),
        ("tests (3.12, ubuntu-22.04)", {"python-version": "3.12", "os": "ubuntu-22.04"}),
        ("tests (3.1, ubuntu-latest)", {"python-version": 3.1, "os": "ubuntu-latest"}),
        ("tests (3.1, ubuntu-22.04)", {"python-version": 3.1, "os": "ubuntu-22.04"}),
    ]
    assert {j.id for j in variants} == {"test"}
    assert stages(variants) == [variants]
    picked = select(wf, matrix_filters={"python-version": "3.12", "os": "ubuntu-22.04"})
    assert [j.variant for j in picked] == ["tests (3.12, ubuntu-22.04)"]
    assert [j.variant for j in select(wf, "test", {"python-version": "3.1"})] == [
        "tests (3.1, ubuntu-latest)", "tests (3.1, ubuntu-22.04)"]
    assert triggered(wf, "push") and triggered(wf, "pull_request")
    assert not triggered(wf, "workflow_dispatch")


def test_matrix_filters_that_match_nothing_are_errors(tmp_path):
    wf = load(write(tmp_path, PYTHON_CI))
    with pytest.raises(WorkflowError) as info:
        select(wf, matrix_filters={"python-version": "3.10"})
    assert str(info.value) == (
        f"{wf.path}:10: job 'test': no matrix combination has python-version=3.10; "
        "its python-version values: 3.1, 3.11, 3.12")
    with pytest.raises(WorkflowError) as info:
        select(wf, matrix_filters={"python": "3.11"})
    assert info.value.problem == "no selected job has a matrix key 'python'"


# ------------------------------------------------------------- a C project with needs

C_PROJECT = """
name: C
on: [push, pull_request]
defaults:
  run:
    shell: bash
    working-directory: code
jobs:
  build:
    runs-on: ubuntu-22.04
    outputs:
      version: ${{ steps.v.outputs.version }}
    steps:
      - uses: actions/checkout@v4
      - run: sudo apt-get install -y gcc make
      - id: v
        run: echo "version=$(cat VERSION)" >> "$GITHUB_OUTPUT"
      - run: make -j4
  lint:
    runs-on: ubuntu-latest
    defaults:
      run:
        working-directory: .
    steps:
      - run: make lint
        shell: sh
  test:
    needs: build
    runs-on: [self-hosted, ubuntu-22.04]
    if: github.event_name == 'push'
    continue-on-error: true
    steps:
      - uses: actions/checkout@v4
      - run: make check
        timeout-minutes: 10
  package:
    needs: [build, test]
    runs-on: ubuntu-latest
    steps:
      - run: make dist VERSION=${{ needs.build.outputs.version }}
        shell: python3 -u {0}
"""


def test_a_c_project_with_needs(tmp_path):
    wf = load(write(tmp_path, C_PROJECT))
    assert list(wf.jobs) == ["build", "lint", "test", "package"] and wf.skipped == []
    assert wf.on == {"push": None, "pull_request": None}
    assert wf.defaults_run == DefaultsRun("bash", "code")
    build, lint, test, package = wf.jobs.values()
    assert build.outputs == {"version": "${{ steps.v.outputs.version }}"}
    assert build.defaults_run == DefaultsRun("bash", "code")
    assert lint.defaults_run == DefaultsRun("bash", ".")
    assert lint.command(lint.steps[0]) == (["sh", "-e", "{0}"], ".sh")
    assert lint.working_directory(lint.steps[0]) == "."
    assert build.command(build.steps[1])[0][:3] == ["bash", "--noprofile", "--norc"]
    assert package.command(package.steps[0]) == (["python3", "-u", "{0}"], "")
    assert (test.needs, test.needs_line, test.if_, test.continue_on_error) == (
        ("build",), 27, "github.event_name == 'push'", True)
    assert test.runs_on == ("self-hosted", "ubuntu-22.04")
    assert test.steps[1].timeout_minutes == 10.0
    assert (package.needs, build.needs, build.needs_line) == (("build", "test"), (), 0)
    assert [[j.id for j in s] for s in stages(select(wf))] == [
        ["build", "lint"], ["test"], ["package"]]
    # --job runs the job and what it needs, as act does
    assert [j.id for j in select(wf, "test")] == ["build", "test"]
    assert [[j.id for j in s] for s in stages(select(wf, "package"))] == [
        ["build"], ["test"], ["package"]]
    assert [j.id for j in select(wf, "lint")] == ["lint"]
    with pytest.raises(WorkflowError) as info:
        select(wf, "tset")
    assert str(info.value) == f"{wf.path}: no job 'tset' in this workflow; did you mean 'test'?"
    with pytest.raises(WorkflowError) as info:
        stages([test])
    assert str(info.value) == (f"{wf.path}:27: job 'test' needs 'build', which is not "
                               "selected; select it too (--job runs a job with what it needs)")


# ------------------------------------------------------------------- skipped jobs

SKIPS = """
on: push
jobs:
  web:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-node@v4
        with:
          node-version: 20
      - run: npm ci && npm test
  call:
    uses: octo-org/shared/.github/workflows/ci.yml@v1
    with:
      level: 2
  local-call:
    uses: ./.github/workflows/build.yml
  in-container:
    runs-on: ubuntu-latest
    container: node:20
    steps:
      - run: npm test
  with-db:
    runs-on: ubuntu-latest
    services:
      postgres:
        image: postgres:16
    steps:
      - run: psql -c 'select 1'
  mac:
    runs-on: macos-14
    steps:
      - run: xcodebuild
  win:
    runs-on: [self-hosted, Windows, x64]
    steps:
      - run: dir
        shell: cmd
  gpu:
    runs-on: [self-hosted, linux, gpu]
    steps:
      - run: nvidia-smi
  deploy:
    needs: [web, ok]
    runs-on: ubuntu-latest
    steps:
      - run: ./deploy
  notify:
    needs: deploy
    runs-on: ubuntu-latest
    steps:
      - run: ./notify
  ok:
    runs-on: ubuntu-latest
    steps:
      - uses: Actions/Checkout@8e5e7e5ab8b370d6c329ec480221332ada57f0ab
      - run: make
"""


def test_jobs_that_cannot_run_are_skipped_with_where_and_how_to_fix(tmp_path):
    path = write(tmp_path, SKIPS)
    wf = load(path)
    f = str(path)
    assert list(wf.jobs) == ["ok"]
    assert wf.skipped == [
        Skipped("web", f, 7, "step 2 uses actions/setup-node@v4",
                "install it in a run: step, e.g. apt-get install -y nodejs npm"),
        Skipped("call", f, 12, "it calls the reusable workflow "
                "octo-org/shared/.github/workflows/ci.yml@v1",
                "copy its jobs into this workflow"),
        Skipped("local-call", f, 16, "it calls the reusable workflow ./.github/workflows/build.yml",
                "run that file's jobs with pinnace ci run .github/workflows/build.yml"),
        Skipped("in-container", f, 19, "it runs in a container (node:20)",
                "remove container: and install what the job needs in a run: step; the job runs "
                "in a Debian machine"),
        Skipped("with-db", f, 24, "it needs service containers (postgres)",
                "install and start the services in a run: step, e.g. apt-get install -y "
                "postgresql && service postgresql start"),
        Skipped("mac", f, 30, "runs-on macos-14: pinnace runs Linux machines only",
                "run it on GitHub, or use runs-on: ubuntu-latest if the job runs on Linux"),
        Skipped("win", f, 34, "runs-on Windows: pinnace runs Linux machines only",
                "run it on GitHub, or use runs-on: ubuntu-latest if the job runs on Linux"),
        Skipped("win", f, 37, "step 1 uses shell cmd",
                "rewrite the script for bash; pinnace's machines run Linux"),
        Skipped("gpu", f, 39, "runs-on a self-hosted runner [self-hosted, linux, gpu] that "
                "names no pinnace image", "map one of its labels to an image: -P LABEL=IMAGE"),
        Skipped("deploy", f, 43, "needs 'web', which cannot run",
                "make 'web' runnable, or remove it from needs"),
        Skipped("notify", f, 48, "needs 'deploy', which cannot run",
                "make 'deploy' runnable, or remove it from needs"),
    ]
    assert str(wf.skipped[0]) == (
        f"{f}:7: job 'web' cannot run: step 2 uses actions/setup-node@v4; install it in a run: "
        "step, e.g. apt-get install -y nodejs npm")
    assert wf.jobs["ok"].steps[0].kind == "checkout"
    with pytest.raises(WorkflowError) as info:
        select(wf, "notify")
    assert (info.value.file, info.value.line) == (f, 48)
    assert str(info.value) == (f"{f}:48: job 'notify' cannot run: needs 'deploy', which cannot "
                               "run; make 'deploy' runnable, or remove it from needs")
    # -P gpu=cuda maps the self-hosted label to an image: that job (and only it) runs
    wf = load(path, platforms={"gpu": "cuda"})
    assert list(wf.jobs) == ["gpu", "ok"]
    assert platform(wf.jobs["gpu"].runs_on, {"gpu": "cuda"}) == "cuda"


def test_setup_python_and_powershell_defaults(tmp_path):
    path = write(tmp_path, """
        on: push
        defaults:
          run:
            shell: pwsh
        jobs:
          py:
            runs-on: ubuntu-latest
            steps:
              - uses: actions/setup-python@v5
                with: {python-version: "3.12"}
              - run: python -V
                shell: python
              - run: Get-ChildItem
              - run: Write-Host hi
          bash-only:
            runs-on: ubuntu-latest
            defaults:
              run:
                shell: bash
            steps:
              - run: ls
    """)
    wf = load(path)
    assert list(wf.jobs) == ["bash-only"]
    assert wf.skipped == [
        Skipped("py", str(path), 9, "step 1 uses actions/setup-python@v5",
                "install it in a run: step, e.g. apt-get install -y python3"),
        Skipped("py", str(path), 4, "its run steps use shell pwsh",
                "rewrite the script for bash; pinnace's machines run Linux"),
    ]


# ------------------------------------------------------------------------------ on:


@pytest.mark.parametrize(("on", "expected"), [
    ("push", {"push": None}),
    ("[push, workflow_dispatch]", {"push": None, "workflow_dispatch": None}),
    ("\n  schedule:\n    - cron: '0 3 * * *'\n  workflow_dispatch:",
     {"schedule": [{"cron": "0 3 * * *"}], "workflow_dispatch": None}),
])
def test_on_as_a_string_a_list_or_a_mapping(tmp_path, on, expected):
    wf = load(write(tmp_path, f"on: {on}\njobs:\n  a:\n    runs-on: ubuntu-latest\n"
                              "    steps: [{run: make}]\n"))
    assert wf.on == expected
    assert triggered(wf, "push") == ("push" in expected)
    assert triggered(wf, "workflow_dispatch") is ("workflow_dispatch" in expected)


def test_on_stays_the_string_on_and_yes_stays_a_string(tmp_path):
    # PyYAML (YAML 1.1) reads `on:` as True and `yes` as True; GitHub and YAML 1.2 do not.
    wf = load(write(tmp_path, """
        on: push
        env: {ANSWER: yes, OFF: off, WHEN: 2024-01-02}
        jobs:
          a: {runs-on: ubuntu-latest, steps: [{run: make}]}
    """))
    assert wf.on == {"push": None}
    assert wf.env == {"ANSWER": "yes", "OFF": "off", "WHEN": "2024-01-02"}
    err = error(write(tmp_path, "%YAML 1.1\n---\non: push\njobs: {}\n", "old.yml"))
    assert str(err) == (f"{tmp_path / 'old.yml'}:3: the key 'on' was read as true (YAML 1.1); "
                        "remove the %YAML 1.1 line, or write \"on\":")


# ---------------------------------------------------------------- matrix expansion

FRUIT = {
    "fruit": ["apple", "pear"],
    "animal": ["cat", "dog"],
    "include": [
        {"color": "green"},
        {"color": "pink", "animal": "cat"},
        {"fruit": "apple", "shape": "circle"},
        {"fruit": "banana"},
        {"fruit": "banana", "animal": "cat"},
    ],
}


def test_matrix_include_as_githubs_docs_fruit_example():
    assert expand_matrix(FRUIT) == [
        {"fruit": "apple", "animal": "cat", "color": "pink", "shape": "circle"},
        {"fruit": "apple", "animal": "dog", "color": "green", "shape": "circle"},
        {"fruit": "pear", "animal": "cat", "color": "pink"},
        {"fruit": "pear", "animal": "dog", "color": "green"},
        {"fruit": "banana"},
        {"fruit": "banana", "animal": "cat"},
    ]


def test_matrix_include_extends_one_combination_and_adds_new_ones():
    # GitHub's docs: include can add a key to one combination, or make a new one.
    assert expand_matrix({
        "os": ["windows-latest", "ubuntu-latest"], "node": [14, 16],
        "include": [{"os": "windows-latest", "node": 16, "npm": 6}],
    }) == [{"os": "windows-latest", "node": 14},
           {"os": "windows-latest", "node": 16, "npm": 6},
           {"os": "ubuntu-latest", "node": 14},
           {"os": "ubuntu-latest", "node": 16}]
    assert expand_matrix({
        "os": ["macos-latest", "ubuntu-latest"], "version": [12, 14],
        "include": [{"os": "windows-latest", "version": 17}],
    })[-1] == {"os": "windows-latest", "version": 17}
    # an include cannot overwrite an original value: node 18 matches nothing, so it is new
    assert expand_matrix({"node": [14, 16], "include": [{"node": 18, "npm": 9}]}) == [
        {"node": 14}, {"node": 16}, {"node": 18, "npm": 9}]


def test_matrix_exclude_then_include_as_githubs_docs():
    assert expand_matrix({
        "os": ["windows-latest", "ubuntu-latest"], "node": [18, 20, 22],
        "include": [{"os": "windows-latest", "node": 22, "npm": 10}],
        "exclude": [{"os": "ubuntu-latest", "node": 22}],
    }) == [{"os": "windows-latest", "node": 18}, {"os": "windows-latest", "node": 20},
           {"os": "windows-latest", "node": 22, "npm": 10},
           {"os": "ubuntu-latest", "node": 18}, {"os": "ubuntu-latest", "node": 20}]
    # include can add back what exclude removed
    assert expand_matrix({"a": [1, 2], "exclude": [{"a": 2}], "include": [{"a": 2}]}) == [
        {"a": 1}, {"a": 2}]


def test_matrix_exclude_partial_match():
    combos = expand_matrix({
        "os": ["macos-latest", "windows-latest"], "version": [12, 14, 16],
        "environment": ["staging", "production"],
        "exclude": [{"os": "macos-latest", "version": 12, "environment": "production"},
                    {"os": "windows-latest", "version": 16}],
    })
    assert len(combos) == 9
    assert {"os": "macos-latest", "version": 12, "environment": "production"} not in combos
    assert not [c for c in combos if c["os"] == "windows-latest" and c["version"] == 16]
    assert {"os": "macos-latest", "version": 12, "environment": "staging"} in combos


def test_include_only_matrix():
    assert expand_matrix({"include": [{"site": "production", "datacenter": "site-a"},
                                      {"site": "staging", "datacenter": "site-b"}]}) == [
        {"site": "production", "datacenter": "site-a"},
        {"site": "staging", "datacenter": "site-b"}]


def test_matrix_values_compare_by_type():
    assert expand_matrix({"x": [True, 1], "include": [{"x": 1, "y": "one"}]}) == [
        {"x": True}, {"x": 1, "y": "one"}]
    assert [matrix_text(v) for v in (3.1, 3.0, 1, True, None, "a", {"v": 1})] == [
        "3.1", "3", "1", "true", "", "a", '{"v":1}']


@pytest.mark.parametrize(("matrix", "problem"), [
    ({"os": []}, "matrix: 'os' has no values"),
    ({"os": "ubuntu"}, "matrix: 'os' must be a list of values"),
    ({"os": ["a"], "exclude": [{"arch": "x"}]},
     "matrix: exclude key 'arch' is not a vector of the matrix"),
    ({"os": ["a"], "include": ["x"]}, "matrix: 'include' must be a list of mappings"),
    ({"a": list(range(16)), "b": list(range(17))}, "matrix: 272 combinations"),
    ({"a": [1], "exclude": [{"a": 1}]}, "matrix: exclude leaves no combination"),
    ({}, "matrix: it must be a mapping of vectors"),
])
def test_bad_matrices(matrix, problem):
    with pytest.raises(WorkflowError) as info:
        expand_matrix(matrix, file="ci.yml", line=7)
    assert (info.value.problem, info.value.line) == (problem, 7)


def test_a_matrix_of_256_is_allowed_and_a_huge_product_is_refused_quickly():
    assert len(expand_matrix({"a": list(range(16)), "b": list(range(16))})) == 256
    with pytest.raises(WorkflowError) as info:
        expand_matrix({k: list(range(100)) for k in "abcde"})
    assert info.value.problem == "matrix: 10000000000 combinations before exclude"


def test_a_matrix_with_expressions_is_kept_for_the_runner(tmp_path):
    wf = load(write(tmp_path, """
        on: push
        jobs:
          plan:
            runs-on: ubuntu-latest
            outputs: {targets: "${{ steps.p.outputs.targets }}"}
            steps:
              - id: p
                run: echo 'targets=[1,2]' >> "$GITHUB_OUTPUT"
          whole:
            needs: plan
            runs-on: ubuntu-latest
            strategy:
              matrix: ${{ fromJSON(needs.plan.outputs.targets) }}
            steps: [{run: make}]
          vector:
            runs-on: ubuntu-latest
            strategy:
              matrix:
                os: ${{ fromJSON(vars.OSES) }}
                py: ["3.12"]
            steps: [{run: make}]
          include:
            runs-on: ubuntu-latest
            strategy:
              matrix:
                include: ${{ fromJSON(vars.INCLUDE) }}
            steps: [{run: make}]
    """))
    whole, vector, include = (wf.jobs[k].strategy for k in ("whole", "vector", "include"))
    assert (whole.deferred, whole.combinations) == (True, ())
    assert whole.matrix == "${{ fromJSON(needs.plan.outputs.targets) }}"
    assert vector.matrix == {"os": "${{ fromJSON(vars.OSES) }}", "py": ["3.12"]}
    assert vector.deferred and include.deferred
    jobs = select(wf, matrix_filters={"os": "b"})
    assert [j.variant for j in jobs] == ["plan", "whole", "vector", "include"]
    # the runner evaluates the matrix, then expands it
    out = expand(wf.jobs["vector"], matrix={"os": ["a", "b"], "py": ["3.12"]},
                 filters={"os": "b"})
    assert [(j.variant, j.matrix) for j in out] == [("vector (b, 3.12)", {"os": "b", "py": "3.12"})]
    assert out[0].strategy.combinations == ({"os": "a", "py": "3.12"}, {"os": "b", "py": "3.12"})
    assert not out[0].strategy.deferred


def test_a_bad_matrix_in_a_file_says_where(tmp_path):
    path = write(tmp_path, """
        on: push
        jobs:
          a:
            runs-on: ubuntu-latest
            strategy:
              matrix:
                os: []
            steps: [{run: make}]
    """)
    assert str(error(path)) == f"{path}:6: matrix: 'os' has no values; give at least one, or remove 'os'"


# ------------------------------------------------------------------------ needs


def test_a_cycle_in_needs(tmp_path):
    path = write(tmp_path, """
        on: push
        jobs:
          a: {runs-on: ubuntu-latest, needs: c, steps: [{run: make}]}
          b: {runs-on: ubuntu-latest, needs: a, steps: [{run: make}]}
          c: {runs-on: ubuntu-latest, needs: [b], steps: [{run: make}]}
          d: {runs-on: ubuntu-latest, steps: [{run: make}]}
    """)
    err = error(path)
    assert str(err) == f"{path}:3: needs form a cycle: a -> c -> b -> a; remove one of these needs"
    assert (err.file, err.line, err.field, err.value) == (str(path), 3, "needs", "a")


def test_an_unknown_need(tmp_path):
    path = write(tmp_path, """
        on: push
        jobs:
          build: {runs-on: ubuntu-latest, steps: [{run: make}]}
          test:
            runs-on: ubuntu-latest
            needs: [biuld]
            steps: [{run: make check}]
    """)
    assert str(error(path)) == (f"{path}:6: job 'test' needs 'biuld', which is not a job of "
                                "this workflow; did you mean 'build'?")


def test_stages_refuses_a_cycle_among_given_jobs():
    def job(jid: str, needs: tuple[str, ...]) -> Job:
        return Job(id=jid, name=jid, file="x.yml", line=1, runs_on="ubuntu-latest", steps=(),
                   needs=needs, needs_line=9)

    with pytest.raises(WorkflowError) as info:
        stages([job("a", ("b",)), job("b", ("a",))])
    assert str(info.value) == "x.yml:9: needs form a cycle: a -> b -> a; remove one of these needs"
    assert stages([]) == []


# -------------------------------------------------------------------- bad files


def test_a_file_too_large_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yml"
    path.write_bytes(b"on: push\n" + b"#" * (1 << 20))
    assert str(error(path)) == (f"{path}: the file is larger than 1 MiB; a workflow file is a "
                                "few KiB; is this the right file?")


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("- a\n- b\n", 1, "the file is a list, not a mapping"),
    ("just text\n", None, "the file is a string, not a mapping"),
    ("", None, "the file is empty"),
    ("# only a comment\n", None, "the file is empty"),
    ("on: push\njobs: [a\n", 3, "not valid YAML: while parsing a flow sequence: expected ',' "
     "or ']', but got '<stream end>'"),
    ("on: push\non: pull_request\n", 2,
     'not valid YAML: found duplicate key "on" with value "pull_request" (original value: '
     '"push")'),
    ("a: 1\n---\nb: 2\n", 2, "not valid YAML: expected a single document in the stream: but "
     "found another document"),
    ("on: push\njobs: {}\n", 2, "the workflow has no jobs"),
    ("name: x\n", 1, "the file has no jobs: and no steps:"),
    ("on: push\njob:\n  a: {}\n", 2, "workflow: unknown key 'job'"),
    ("jobs:\n  a: {runs-on: ubuntu-latest, steps: [{run: make}]}\n", 1,
     "the workflow has no on:"),
    ("on: push\njobs:\n  build:\n    steps: [{run: make}]\n", 3,
     "job 'build': 'runs-on' is missing"),
    ("on: push\njobs:\n  2fast: {runs-on: x, steps: [{run: make}]}\n", 3,
     "job id '2fast' is not valid"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - name: empty\n", 6,
     "job 'a': step 1 needs one of run: and uses:"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: make\n        uses: a/b@v1\n",
     6, "job 'a': step 1 needs one of run: and uses:"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: make\n        shel: sh\n",
     7, "job 'a': step 1: unknown key 'shel'"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    steps: [{uses: actions/checkout}]\n", 5,
     "job 'a': step 1: uses 'actions/checkout' has no version"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    timeout-minutes: soon\n    steps: [{run: m}]\n",
     5, "job 'a': 'timeout-minutes' must be a number of minutes, not 'soon'"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    continue-on-error: maybe\n    steps: [{run: m}]\n",
     5, "job 'a': 'continue-on-error' must be true or false, not 'maybe'"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    steps: [{run: m, shell: bash -x}]\n", 5,
     "job 'a': step 1: shell 'bash -x' is not valid"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    env: {A: [1]}\n    steps: [{run: m}]\n", 5,
     "job 'a': env.A must be a string, not a list"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    steps: [{run: m, id: s}, {run: n, id: s}]\n",
     5, "job 'a': step 2: id 's' is used twice"),
    ("on: 3\njobs: {}\n", 1, "on: must name events, not a number"),
    ("on: push\njobs:\n  a:\n    runs-on: x\n    strategy:\n      fail-fast: ${{ x }}\n"
     "    steps: [{run: m}]\n", 6, "job 'a': fail-fast must be true or false"),
    ("on: push\nname: !!binary aGVsbG8=\njobs: {}\n", 2,
     "a value of type bytes (a YAML tag?) where plain data belongs"),
])
def test_bad_files_give_one_line_with_file_and_line(tmp_path, text, line, problem):
    path = tmp_path / "ci.yml"
    path.write_text(text)
    err = error(path)
    assert (err.problem, err.line) == (problem, line)
    assert str(err).startswith(f"{path}:{line}: " if line else f"{path}: ")
    assert "\n" not in str(err) and isinstance(err, ConfigError)


def test_the_missing_runs_on_message(tmp_path):
    path = tmp_path / "ci.yml"
    path.write_text("on: push\njobs:\n  build:\n    steps: [{run: make}]\n")
    assert str(error(path)).endswith("ci.yml:3: job 'build': 'runs-on' is missing; give a "
                                     "label such as ubuntu-latest")


def test_hostile_yaml_is_bounded(tmp_path, monkeypatch):
    # ruamel's scanner is quadratic in [ nesting: refused as it is met
    flow = tmp_path / "flow.yml"
    flow.write_text("on: push\nx: " + "[" * 500_000 + "]" * 500_000 + "\n")
    assert (error(flow).problem, error(flow).line) == (
        "it nests [ and { more than 16 levels deep", 2)
    deep = tmp_path / "deep.yml"
    deep.write_text("".join(" " * i + f"k{i}:\n" for i in range(70)))
    assert error(deep).problem == "it is nested more than 64 levels deep"
    deeper = tmp_path / "deeper.yml"
    deeper.write_text("".join(" " * i + f"k{i}:\n" for i in range(400)))
    assert error(deeper).problem == "it is nested too deeply to read"
    monkeypatch.setattr("pinnace.ci.workflow.MAX_TOKENS", 50)
    many = tmp_path / "many.yml"
    many.write_text("x: [" + "a, " * 100 + "]\n")
    assert error(many).problem == "it has more than 50 YAML tokens"
    monkeypatch.undo()
    bomb = tmp_path / "bomb.yml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    assert error(bomb).problem == ("it holds more than 1000000 values once YAML aliases are "
                                   "followed")
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"on: push\njobs: \xff\n")
    assert (error(binary).problem, error(binary).line) == ("the file is not UTF-8 text", 2)
    assert error(tmp_path / "nope.yml").problem == "no such file"
    assert error(tmp_path).problem == "it is not a regular file"


# ---------------------------------------------------------------- pinnace's format


def test_pinnace_format_with_one_job(tmp_path):
    path = write(tmp_path, """
        image: {packages: [gcc, make, libssl-dev]}
        env: {A: b, N: 1}
        timeout: 30m
        limits: {memory: 2G, cpus: 2, pids: 4096}
        caches:
          - {name: pip, path: ~/.cache/pip, key: "pip-${{ hashFiles('requirements.txt') }}"}
          - name: ccache
            path: ~/.ccache
            restore-keys: |
              ccache-
              cc
            size: 2G
        artifacts: [dist/, build/log.txt]
        steps:
          - make
          - name: test
            run: |
              make check
            env: {X: y}
            shell: sh
            timeout: 90s
            working-directory: src
    """, ".pinnace/ci.yml")
    wf = load(path)
    assert (wf.kind, wf.name, wf.skipped, wf.on) == ("pinnace", "ci.yml", [], {})
    assert triggered(wf, "push") and triggered(wf, "anything")
    job = wf.jobs["ci"]
    assert job == Job(
        id="ci", name="ci", file=str(path), line=1, runs_on="", variant="ci",
        image=ImageSpec(("gcc", "make", "libssl-dev")), env={"A": "b", "N": "1"},
        timeout_minutes=30.0, limits=Limits(memory=2 << 30, cpus=2, pids=4096),
        defaults_run=DefaultsRun(shell="bash"),
        caches=(Cache("pip", "~/.cache/pip", "pip-${{ hashFiles('requirements.txt') }}"),
                Cache("ccache", "~/.ccache", "ccache", ("ccache-", "cc"), 2 << 30)),
        artifacts=("dist/", "build/log.txt"),
        steps=(Step(index=0, name="checkout", line=1, kind="checkout",
                    uses="actions/checkout@builtin"),
               Step(index=1, name="make", line=15, run="make"),
               Step(index=2, name="test", line=16, run="make check\n", env={"X": "y"},
                    shell="sh", timeout_minutes=1.5, working_directory="src")),
    )
    assert job.command(job.steps[1]) == (
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"], ".sh")
    assert job.command(job.steps[2]) == (["sh", "-e", "{0}"], ".sh")
    assert select(wf) == [job] and stages([job]) == [[job]]


def test_pinnace_format_with_several_jobs(tmp_path):
    path = write(tmp_path, """
        name: nightly
        env: {CI: "true"}
        jobs:
          build:
            image: default
            steps: [make]
            artifacts: out/
          test:
            name: Tests
            needs: build
            image: builder-2
            env: {CI: "false"}
            steps: [make check]
          docs:
            steps: [make docs]
    """, "pinnace-ci.yml")
    wf = load(path)
    assert (wf.kind, wf.name, list(wf.jobs)) == ("pinnace", "nightly", ["build", "test", "docs"])
    build, test, docs = wf.jobs.values()
    assert (build.image, test.image, docs.image) == ("default", "builder-2", "default")
    assert (test.name, test.needs, test.needs_line, test.env) == (
        "Tests", ("build",), 10, {"CI": "false"})
    assert build.artifacts == ("out/",) and docs.env == {"CI": "true"}
    assert [[j.id for j in s] for s in stages(select(wf))] == [["build", "docs"], ["test"]]
    assert [j.id for j in select(wf, "test")] == ["build", "test"]


def test_pinnace_jobs_without_image_in_a_github_folder_are_github(tmp_path):
    # no on:, runs-on or image: the folder decides (here: GitHub, which needs on:)
    path = write(tmp_path, "jobs:\n  a:\n    steps: [{run: make}]\n")
    assert error(path).problem == "the workflow has no on:"
    wf = load(write(tmp_path, "jobs:\n  a:\n    steps: [make]\n", "pinnace-ci.yml"))
    assert wf.kind == "pinnace" and wf.jobs["a"].image == "default"
    assert [s.kind for s in wf.jobs["a"].steps] == ["checkout", "run"]
    wf = load(write(tmp_path, "checkout: false\nsteps: [make]\n", "pinnace-ci.yml"))
    assert [(s.index, s.kind) for s in wf.jobs["ci"].steps] == [(0, "run")]


@pytest.mark.parametrize(("text", "line", "problem", "hint"), [
    ("timeout: 30\nsteps: [make]\n", 1, "workflow: 'timeout' is 30",
     "give a duration with a unit, such as 90s, 30m or 1h30m"),
    ("steps: [make]\nlimits: {memory: lots}\n", 2, "workflow: limits.memory is 'lots'",
     "give a size such as 512M or 2G (units K, M, G, T)"),
    ("steps: [make]\nlimits: {cpus: 0}\n", 2, "workflow: limits.cpus is 0",
     "give a whole number from 1 to 64"),
    ("steps: [make]\nimage: {packages: [Bad_Name]}\n", 2,
     "workflow: image.packages must be a list of Debian package names",
     "e.g. image: {packages: [gcc, make]}"),
    ("steps: [make]\nimage: ../x\n", 2, "workflow: image '../x' is not an image name",
     "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    ("step: [make]\n", 1, "the file has no jobs: and no steps:",
     "a GitHub workflow has on: and jobs:; pinnace's format has steps: (see pinnace ci --help)"),
    ("steps: [make]\nenvs: {}\n", 2, "workflow: unknown key 'envs'", "did you mean 'env'?"),
    ("steps: [{name: x}]\n", 1, "workflow: step 1: 'run' is missing or empty", "give a script"),
    ("steps: [[make]]\n", 1, "workflow: step 1 must be a command or a mapping, not a list",
     "e.g. - make, or - {name: build, run: make}"),
    ("steps: [make]\ncaches: [{name: a, path: x}, {name: a, path: y}]\n", 2,
     "workflow: cache 2: the name 'a' is used twice", "give each cache its own name"),
    ("jobs:\n  a: {image: x, steps: [make], needs: b}\n", 2,
     "job 'a' needs 'b', which is not a job of this workflow", "jobs: a"),
    ("jobs:\n  a: {image: x, steps: [make], needs: b}\n  b: {image: x, needs: a, steps: [m]}\n",
     2, "needs form a cycle: a -> b -> a", "remove one of these needs"),
    ("steps: [make]\ncheckout: no\n", 2, "workflow: checkout must be true or false",
     "checkout: false starts with an empty /workspace"),
    ("steps: [make]\ncaches: [{name: a, path: x, size: huge}]\n", 2,
     "workflow: cache 1: size is 'huge'", "give a size such as 512M or 2G (units K, M, G, T)"),
    ("steps: [make]\njobs: {}\n", 1, "the file has both steps: and jobs:",
     "put the steps under a job, or drop jobs:"),
])
def test_pinnace_format_bad_values(tmp_path, text, line, problem, hint):
    path = tmp_path / "pinnace-ci.yml"
    path.write_text(text)
    err = error(path)
    assert (err.line, err.problem, err.hint) == (line, problem, hint)


@pytest.mark.parametrize(("text", "minutes"), [
    ("90s", 1.5), ("30m", 30.0), ("1h", 60.0), ("1h30m", 90.0), ("2.5m", 2.5), ("1H", 60.0)])
def test_durations(text, minutes):
    assert parse_duration(text) == minutes


@pytest.mark.parametrize("bad", ["30", 30, "", "m", "0s", "-1m", "1d", "30m1h", "169h", None,
                                 "1" * 40 + "s"])
def test_bad_durations(bad):
    with pytest.raises(ConfigError):
        parse_duration(bad)


# ------------------------------------------------------------ shells and platforms


@pytest.mark.parametrize(("shell", "explicit", "argv", "ext"), [
    (None, False, ["bash", "-e", "{0}"], ".sh"),
    ("bash", False, ["bash", "-e", "{0}"], ".sh"),
    ("bash", True, ["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"], ".sh"),
    ("Bash", True, ["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"], ".sh"),
    ("sh", True, ["sh", "-e", "{0}"], ".sh"),
    ("python", True, ["python", "{0}"], ".py"),
    ("bash -x {0}", True, ["bash", "-x", "{0}"], ".sh"),
    ("perl -w '{0}'", True, ["perl", "-w", "{0}"], ""),
    ("bash -c 'source {0}'", True, ["bash", "-c", "source {0}"], ".sh"),
])
def test_shell_command(shell, explicit, argv, ext):
    assert shell_command(shell, explicit=explicit) == (argv, ext)


@pytest.mark.parametrize("shell", ["pwsh", "powershell", "cmd", "perl", "bash -x", "sh 'x"])
def test_shells_pinnace_cannot_run(shell):
    with pytest.raises(ConfigError):
        shell_command(shell, explicit=True)


def test_platform_mapping():
    assert platform("ubuntu-latest") == "ubuntu"
    assert platform("Ubuntu-22.04") == "ubuntu"
    assert platform("ubuntu-18.04") is None
    assert platform("${{ matrix.os }}") is None
    assert platform(["self-hosted", "big"], {"big": "fat-image"}) == "fat-image"
    assert platform("ubuntu-latest", {"ubuntu-latest": "mine"}) == "mine"
    assert runs_on_problem("ubuntu-latest") is None
    assert runs_on_problem("my-image") is None  # the runner may find such an image
    assert runs_on_problem(["self-hosted", "ubuntu-24.04-arm"]) is None
    assert runs_on_problem("windows-2022") == (
        "runs-on windows-2022: pinnace runs Linux machines only",
        "run it on GitHub, or use runs-on: ubuntu-latest if the job runs on Linux")
    assert runs_on_problem("${{ matrix.os }}") is None


def test_runs_on_group(tmp_path):
    wf = load(write(tmp_path, """
        on: push
        jobs:
          labelled:
            runs-on: {group: big, labels: [ubuntu-latest]}
            steps: [{run: make}]
          group:
            runs-on: {group: big}
            steps: [{run: make}]
    """))
    assert wf.jobs["labelled"].runs_on == ("ubuntu-latest",)
    assert [(s.job_id, s.line, s.reason) for s in wf.skipped] == [
        ("group", 7, "it runs on a runner group")]


def test_discover(tmp_path):
    assert discover(tmp_path) == []
    for name in (".github/workflows/b.yaml", ".github/workflows/a.yml",
                 ".github/workflows/notes.md", ".github/workflows/sub/c.yml",
                 ".pinnace/ci.yml", "pinnace-ci.yml"):
        write(tmp_path, "x: 1\n", name)
    assert discover(tmp_path) == [tmp_path / ".github/workflows/a.yml",
                                  tmp_path / ".github/workflows/b.yaml",
                                  tmp_path / ".pinnace/ci.yml", tmp_path / "pinnace-ci.yml"]


def test_workflow_is_a_frozen_dataclass(tmp_path):
    wf = load(write(tmp_path, PYTHON_CI))
    assert isinstance(wf, Workflow)
    with pytest.raises(AttributeError):
        wf.name = "x"  # type: ignore[misc]


def test_pinnaces_own_ci_is_a_workflow_pinnace_runs():
    """.github/workflows/ci.yml (what .ci/run does, as jobs) loads with nothing skipped."""
    root = Path(__file__).resolve().parents[2]
    wf = load(root / ".github" / "workflows" / "ci.yml")
    assert wf.skipped == [] and list(wf.jobs) == ["lint", "unit", "test"]
    assert [[j.id for j in stage] for stage in stages(select(wf))] == [["lint", "unit"],
                                                                       ["test"]]
    assert any(".ci/run" in s.run for s in wf.jobs["test"].steps)
    assert platform(wf.jobs["test"].runs_on, {}) == "ubuntu"
    own = load(root / ".pinnace" / "ci.yml")
    assert own.kind == "pinnace" and list(own.jobs) == ["lint", "unit"]
    assert [s.kind for s in own.jobs["unit"].steps] == ["checkout", "run", "run"]
    assert "qemu-system-x86" in own.jobs["unit"].image.packages
