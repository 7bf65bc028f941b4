"""The CI runner with real machines: GitHub Actions workflow files run job by job in
fresh microVMs (needs, matrix, env and output files, conditions, timeouts, refusals)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# runs-on: ubuntu-* maps to an image named "ubuntu"; these tests run on the test image.
UBUNTU = {"ubuntu-latest": "default"}


def workflow(tmp_path: Path, text: str, name: str = "ci.yml") -> Path:
    wf = tmp_path / ".github" / "workflows" / name
    wf.parent.mkdir(parents=True, exist_ok=True)
    wf.write_text(textwrap.dedent(text))
    return wf


def test_needs_env_and_output_files_conditions_and_a_step_timeout(pn, tmp_path):
    """Two jobs: the second needs the first and reads its output; values pass between
    steps through $GITHUB_ENV and $GITHUB_OUTPUT (multi-line too); a step that times out
    fails its job, and only the if: failure() and always() steps run after it."""
    wf = workflow(tmp_path, """\
        name: ci
        on: [push]
        env:
          GREETING: hello
        jobs:
          build:
            runs-on: ubuntu-latest
            outputs:
              version: ${{ steps.ver.outputs.version }}
            steps:
              - id: ver
                run: |
                  echo "version=1.2.3" >> "$GITHUB_OUTPUT"
                  echo "FROM_ENV=$GREETING world" >> "$GITHUB_ENV"
                  { echo 'NOTES<<EOF'; echo line1; echo line2; echo EOF; } >> "$GITHUB_ENV"
              - name: uses the env
                run: |
                  test "$FROM_ENV" = "hello world"
                  test "$(printf '%s' "$NOTES" | wc -l)" = 1
                  test "$(whoami)" = runner && test "$PWD" = /workspace
                  sudo -n true
              - name: expression
                run: echo "v=${{ steps.ver.outputs.version }} os=${{ runner.os }}"
              - uses: actions/checkout@v4
              - name: checked out
                run: |
                  test -f README && test -d .git && test -f .github/workflows/ci.yml
                  grep -q uncommitted README
                  echo "token=${{ secrets.TOKEN }}"
          deploy:
            needs: build
            runs-on: ubuntu-latest
            timeout-minutes: 30
            steps:
              - run: test "${{ needs.build.outputs.version }}" = 1.2.3
              - name: too slow
                timeout-minutes: 0.05
                run: sleep 600
              - name: not run
                run: echo should not run
              - name: cleanup
                if: failure()
                run: echo cleaning up
              - name: always
                if: always()
                run: echo always ran
        """)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "README").write_text("committed\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                    "user.email=t@example.invalid", "commit", "-q", "-m", "x"], check=True)
    (tmp_path / "README").write_text("uncommitted\n")
    lines: list[str] = []
    result = pn.ci.run(wf, timeout_scale=2.0, platforms=UBUNTU, secrets={"TOKEN": "s3cret!"},
                       on_line=lambda job, step, text: lines.append(f"{job}/{step}: {text}"))
    jobs = {j.id: j for j in result.jobs}
    assert jobs["build"].status == "success", jobs["build"]
    assert jobs["build"].outputs == {"version": "1.2.3"}
    assert "build/expression: v=1.2.3 os=Linux" in lines, lines
    assert "build/checked out: token=***" in lines, lines  # secrets are masked
    deploy = jobs["deploy"]
    assert deploy.status == "failure"
    outcomes = [(s.name, s.outcome) for s in deploy.steps]
    assert outcomes[1] == ("too slow", "failure") and "timed out" in deploy.steps[1].reason
    assert outcomes[2:] == [("not run", "skipped"), ("cleanup", "success"),
                            ("always", "success")], outcomes
    assert "deploy/cleanup: cleaning up" in lines
    assert not result.ok
    assert not [m for m in pn.machines.list() if m.name.startswith("ci-")]


def test_a_matrix_of_three_and_an_unsupported_action(pn, tmp_path):
    wf = workflow(tmp_path, """\
        on: push
        jobs:
          test:
            runs-on: ubuntu-latest
            strategy:
              matrix:
                n: [1, 2, 3]
            steps:
              - run: echo "n=${{ matrix.n }}" && test "${{ matrix.n }}" -le 3
          node:
            runs-on: ubuntu-latest
            steps:
              - uses: actions/setup-node@v4
              - run: node --version
        """)
    result = pn.ci.run(wf, parallel=3, platforms=UBUNTU)
    assert sorted(j.variant for j in result.jobs) == ["test (1)", "test (2)", "test (3)"]
    assert all(j.status == "success" for j in result.jobs)
    assert len(result.skipped) == 1
    assert "ci.yml:13" in str(result.skipped[0]) and "actions/setup-node" in str(
        result.skipped[0])


def test_the_cli_runs_a_workflow_and_exits_with_its_result(pinnace_home, tmp_path):
    wf = workflow(tmp_path, """\
        on: push
        jobs:
          ok:
            runs-on: ubuntu-latest
            steps:
              - run: echo fine
          bad:
            runs-on: ubuntu-latest
            steps:
              - run: exit 3
        """)
    pinnace = Path(sys.executable).parent / "pinnace"
    r = subprocess.run([str(pinnace), "ci", "run", str(wf), "-P", "ubuntu-latest=default"],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PINNACE_HOME": str(pinnace_home)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[ok/Run echo fine] fine" in r.stdout, r.stdout
    assert "failure   bad" in r.stdout and "exit code 3" in r.stdout, r.stdout


def test_a_memory_hog_is_stopped_by_the_jobs_limit_and_reported(pn, tmp_path):
    """pinnace's own format: a job limited to 256 MiB; a step that allocates without end
    is killed, and the step says it ran out of memory (with the console's tail); the
    job's QEMU ran in a cgroup of its own, removed afterwards."""
    wf = tmp_path / "pinnace-ci.yml"
    wf.write_text(textwrap.dedent("""\
        limits: {memory: 256M, pids: 64}
        steps:
          - name: fine
            run: free -m && test "$(ulimit -u)" = 64
          - name: hog
            run: python3 -c 'b = [bytearray(16 << 20) for _ in range(100000)]'
        """))
    result = pn.ci.run(wf)
    [job] = result.jobs
    assert job.status == "failure"
    assert [s.name for s in job.steps] == ["checkout", "fine", "hog"]
    hog = job.steps[2]
    assert hog.outcome == "failure" and "out of memory inside the machine" in hog.reason, hog
    assert "Killed process" in hog.reason and hog.console, hog
    assert not list(Path("/sys/fs/cgroup/memory/pinnace-ci").glob("ci-*"))


def test_a_cache_is_restored_by_a_second_run_and_artifacts_are_copied_out(pn, tmp_path):
    """pinnace's format: a cache keyed by hashFiles() starts empty, is saved after the
    job succeeds, and the next run finds what the first left; a changed key restores
    from restore-keys' prefix and saves the new key; artifacts (a folder, a file, a
    glob) are copied out after each job."""
    for v in pn.volumes.list():  # (what a failed run of this test saved)
        if v.name.startswith("ci-cache-deps-"):
            pn.volumes.remove(v.name)
    (tmp_path / "requirements.txt").write_text("one\n")
    wf = tmp_path / "pinnace-ci.yml"
    wf.write_text(textwrap.dedent("""\
        caches:
          - name: deps
            path: ~/.cache/deps
            key: deps-${{ hashFiles('requirements.txt') }}
            restore-keys: [deps-]
            size: 64M
        artifacts: [dist/, report.txt, "logs/*.log", missing/]
        steps:
          - name: use the cache
            run: |
              test -O ~/.cache/deps && test -O ~ && test -f ~/.bashrc
              if [ -f ~/.cache/deps/made ]; then
                echo "found $(cat ~/.cache/deps/made)"
              else
                echo "empty"; echo "$RUN" > ~/.cache/deps/made
              fi
          - run: |
              mkdir -p dist logs && echo "built $RUN" > dist/app && echo ok > report.txt
              echo a > logs/x.log && echo b > logs/y.txt
        """))
    lines: list[str] = []

    def run(n: int, out: str) -> None:
        lines.clear()
        result = pn.ci.run(wf, env={"RUN": str(n)}, artifacts=tmp_path / out,
                           on_line=lambda job, step, text: lines.append(f"{step}: {text}"))
        assert result.ok, (result, lines)

    key = "deps-" + hashlib.sha256(hashlib.sha256(b"one\n").digest()).hexdigest()
    run(1, "a1")
    assert "use the cache: empty" in lines, lines
    assert f"cache: cache deps: saved under key {key}" in lines, lines
    got = tmp_path / "a1" / "ci"
    assert (got / "dist" / "app").read_text() == "built 1\n"
    assert (got / "report.txt").read_text() == "ok\n"
    assert [p.name for p in (got / "logs").iterdir()] == ["x.log"]
    assert not (got / "missing").exists()

    run(2, "a2")
    assert "use the cache: found 1" in lines, lines
    assert f"cache: cache deps: restored from key {key}" in lines, lines
    assert (tmp_path / "a2" / "ci" / "dist" / "app").read_text() == "built 2\n"

    (tmp_path / "requirements.txt").write_text("two\n")
    run(3, "a3")
    assert "use the cache: found 1" in lines, lines  # from restore-keys: deps-
    assert any(f"restored from key {key} (no entry" in ln for ln in lines), lines
    assert any("saved under key deps-" in ln and key not in ln for ln in lines), lines
    saved = [v for v in pn.volumes.list() if v.name.startswith("ci-cache-deps-")]
    assert len(saved) == 2
    assert not [v for v in pn.volumes.list() if v.name.startswith("ci-work-")]
    for v in saved:
        pn.volumes.remove(v.name)


def test_a_job_on_an_image_made_from_packages(pn, tmp_path):
    """image: {packages: [...]} builds (once) an image with those Debian packages."""
    wf = tmp_path / "pinnace-ci.yml"
    wf.write_text(textwrap.dedent("""\
        image: {packages: [jq]}
        steps:
          - name: jq
            run: echo '{"a":41}' | jq '.a + 1'
        """))
    lines: list[str] = []
    result = pn.ci.run(wf, on_line=lambda job, step, text: lines.append(f"{step}: {text}"))
    assert result.ok, (result, lines)
    assert "jq: 42" in lines, lines
    assert [i for i in pn.images.list() if any(n.startswith("ci-") for n in i.names)
            and "jq" in i.manifest["inputs"]["packages"]]


def test_bind_makes_the_jobs_workspace_the_folder_itself(pn, tmp_path):
    """--bind: the job works in the repository's folder (shared), so what it writes
    stays; without it the job works in a copy and the folder is untouched."""
    (tmp_path / "input.txt").write_text("from the host\n")
    wf = tmp_path / "pinnace-ci.yml"
    wf.write_text(textwrap.dedent("""\
        steps:
          - grep -q 'from the host' input.txt && echo "made in $RUNNER_NAME" > out.txt
        """))
    result = pn.ci.run(wf)
    assert result.ok, result
    assert not (tmp_path / "out.txt").exists()
    result = pn.ci.run(wf, bind=True)
    assert result.ok, result
    assert (tmp_path / "out.txt").read_text() == "made in pinnace\n"


def test_systemd_services_and_kernel_modules_work_in_a_job_on_ubuntu(pn, tmp_path):
    """runs-on: ubuntu-latest without -P: the job runs on pinnace's 'ubuntu' image
    (built on first use: systemd, build tools, apt ready) and does what a container
    cannot: starts a systemd service and loads a kernel module. Nothing leaves the host:
    apt is only asked what it knows."""
    wf = workflow(tmp_path, """\
        on: push
        jobs:
          system:
            runs-on: ubuntu-latest
            steps:
              - name: a service
                run: |
                  test "$(cat /proc/1/comm)" = systemd
                  sudo mkdir -p /srv && echo 'from a unit' | sudo tee /srv/index.html
                  printf '%s\\n' '[Service]' \\
                    'ExecStart=/usr/bin/python3 -m http.server 8080 --directory /srv' \\
                    | sudo tee /etc/systemd/system/hello.service
                  sudo systemctl daemon-reload && sudo systemctl start hello
                  systemctl is-active hello
                  for i in $(seq 100); do curl -fs localhost:8080/ && break; sleep 0.2; done
              - name: a kernel module
                run: |
                  sudo modprobe dummy
                  sudo ip link add d0 type dummy && sudo ip link set d0 up
                  lsmod | grep -q '^dummy' && ip -br link show d0
              - name: tools
                run: |
                  cc --version | head -1 && cmake --version | head -1 && clang --version | head -1
                  test "$(whoami)" = runner && git --version
              - name: apt ready
                run: |
                  apt-config dump | grep -i 'APT::Get::Assume-Yes "true"'
                  apt-cache policy hello | grep -v '(none)' | grep Candidate
        """)
    lines: list[str] = []
    result = pn.ci.run(wf, on_line=lambda job, step, text: lines.append(f"{step}: {text}"))
    assert result.ok, (result, lines)
    assert "a service: from a unit" in lines, lines
    assert any(ln.startswith("a kernel module: d0 ") for ln in lines), lines
    assert "ubuntu" in pn.images.get("ubuntu").names
