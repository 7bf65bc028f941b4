"""The CI runner's pieces that need no machine: cache paths in the guest, the lines that
give them to the runner user, and artifacts named by an untrusted guest."""

import asyncio
import contextlib
from pathlib import Path

from pinnace.agent.client import ExecResult
from pinnace.ci.runner import JobResult, Options, Runner, _guest_path, _own, _Run
from pinnace.ci.workflow import Job
from pinnace.errors import ConfigError, TooLargeError


def test_cache_paths_in_the_guest():
    assert _guest_path("~/.cache/pip") == "/home/runner/.cache/pip"
    assert _guest_path("~") == "/home/runner"
    assert _guest_path("node_modules") == "/workspace/node_modules"
    assert _guest_path("/var/cache/x/") == "/var/cache/x"


def test_the_runner_user_gets_its_caches_and_the_folders_above_them_in_its_home():
    text = _own(["/home/runner/.cache/pip", "/var/cache/x"])
    assert "chown runner: /home/runner/.cache/pip /home/runner/.cache /home/runner\n" in text
    assert "chown runner: /var/cache/x\n" in text
    assert text.startswith("cp -rn /etc/skel/. /home/runner/")
    assert _own([]) == "\n"


def Result(stdout: bytes, exit_code: int = 0) -> ExecResult:
    return ExecResult(argv=[], exit_code=exit_code, stdout=stdout)


class FakeFiles:
    def __init__(self):
        self.got = []

    async def get(self, remote, local, *, limit=None):
        if remote.endswith("/big"):
            raise TooLargeError(f"{remote}: more than {limit} bytes")
        if remote.endswith("/bad"):
            raise ConfigError("guest path", remote, "no such file")
        self.got.append(remote)
        local = Path(local)
        if remote.endswith("dist"):
            local.mkdir()
            (local / "app").write_text("x")
        else:
            local.write_text("x")
        return 1


class FakeMachine:
    """A machine whose guest names ``found`` as what the artifact patterns matched."""

    def __init__(self, found: bytes):
        self.found = found
        self.files = FakeFiles()
        self.argv = None

    async def exec(self, argv, timeout=None):
        self.argv = argv
        return Result(self.found)


def artifacts(tmp_path, patterns, found):
    lines = []
    options = Options(artifacts=tmp_path / "out",
                      on_line=lambda job, step, text: lines.append(text))
    runner = Runner(None, images=None, volumes=None, accelerated=True)
    job = Job(id="build", name="build", file="f", line=1, runs_on="", steps=(),
              artifacts=tuple(patterns))
    run = _Run(runner, None, options, 1.0, None)
    m = FakeMachine(found)
    result = JobResult("build", "build")
    asyncio.run(run._artifacts(m, job, result))
    return m, result, lines


def test_artifacts_are_copied_under_the_jobs_folder_with_their_paths(tmp_path):
    out = tmp_path / "out" / "build"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("from an earlier run")
    m, result, lines = artifacts(tmp_path, ["dist/", "*.log", "none/", "dist/app"],
                                 b"\1\0dist\0\1\0a.log\0logs/../b.log\0./c.log\0\1\0\1\0dist/app\0")
    assert m.files.got == ["/workspace/dist", "/workspace/a.log", "/workspace/c.log"]
    assert "[ ! -L" in m.argv[2]  # (links the guest names are not followed)
    assert result.artifacts == [str(out / "dist"), str(out / "a.log"), str(out / "c.log")]
    assert (out / "dist" / "app").read_text() == "x"  # not dist/dist: a fresh folder
    assert not (out / "old.txt").exists()  # what an earlier run left is replaced
    assert "no artifact matched none/" in lines
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["build"]  # no staging left


def test_names_from_the_guest_that_leave_the_workspace_are_refused(tmp_path):
    m, _, lines = artifacts(tmp_path, ["*"],
                            b"\1\0/etc/passwd\0../../x\0a/../../y\0.\0bad\0ok\0big\0z\0")
    assert m.files.got == ["/workspace/ok"]  # (z: after the cap, nothing more)
    assert sum("refused artifact" in ln for ln in lines) == 4
    assert any("bad" in ln and "no such file" in ln for ln in lines)
    assert any("big" in ln and "the rest are not copied" in ln for ln in lines)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out" / "y").exists()


def test_files_a_step_wrote_come_back_with_its_exit_status_or_are_read_after():
    from pinnace.ci import envfile
    from pinnace.ci.runner import _collected

    files = {"GITHUB_ENV": "/r/0.env", "GITHUB_OUTPUT": "/r/0.out"}
    assert _collected(files, [(4, b"A=1\n"), (-1, b"")]) == {"/r/0.env": "A=1\n",
                                                             "/r/0.out": ""}
    assert _collected(files, None) is None  # an agent that does not collect
    assert _collected(files, [(4, b"A=1\n")]) is None
    assert _collected(files, [(100_000, b"A" * 65536), (0, b"")]) is None  # cut: read it
    whole = b"B" * envfile.MAX_BYTES
    assert _collected(files, [(envfile.MAX_BYTES * 2, whole), (0, b"")])["/r/0.env"] == (
        whole.decode())


class StepProc:
    """A step's process in a fake machine: no output; it ends when ``release`` is set."""

    def __init__(self, release):
        self.release = release

    async def write(self, data):
        pass

    async def close_stdin(self):
        pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise StopAsyncIteration

    async def wait(self):
        await self.release.wait()
        return Result(b"", 0)


class JobMachine(FakeMachine):
    name = "ci-x"

    def __init__(self, release):
        super().__init__(b"")
        self.release = release
        self.deleted = False

    async def start_process(self, argv, **kw):
        return StepProc(self.release)

    async def delete(self, force=False):
        self.deleted = True


class FakeCaches:
    def __init__(self):
        self.detached = []

    async def attach(self, name, key, path, **kw):
        from pinnace.ci.caches import Attached

        return Attached(name, key, path, "vol", "", "", True)

    async def detach(self, att, *, success):
        self.detached.append(success)
        return "done"


def run_job(release, *, cancel_after=None):
    """One job with a cache in a fake machine; cancelled after ``cancel_after`` seconds."""
    from pinnace.ci.workflow import Cache, Step

    m = JobMachine(release)

    class Machines:
        async def run(self, **kw):
            return [m]

    runner = Runner(Machines(), images=None, volumes=None, accelerated=True)
    runner.caches = FakeCaches()
    job = Job(id="build", name="build", file="f", line=1, runs_on="", image="default",
              steps=(Step(index=0, name="s", line=1, run="true"),),
              caches=(Cache("deps", "~/.deps", "k"),))
    run = _Run(runner, None, Options(cgroups=False), 1.0, None)
    result = JobResult("build", "build")

    async def main():
        task = asyncio.ensure_future(run._in_machine(job, "default", run.contexts(job, {}),
                                                     result))
        if cancel_after is None:
            await task
            return
        await asyncio.sleep(cancel_after)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run.wf = type("WF", (), {"env": {}, "name": "wf"})()
    asyncio.run(main())
    return m, runner.caches, result


def test_a_job_that_ends_saves_its_cache_and_one_cancelled_midway_does_not():
    done = asyncio.Event()
    done.set()
    m, caches, result = run_job(done)
    assert result.status == "success" and m.deleted and caches.detached == [True]
    m, caches, result = run_job(asyncio.Event(), cancel_after=0.2)  # (a step never ends)
    assert result.status == "cancelled" and m.deleted and caches.detached == [False]
