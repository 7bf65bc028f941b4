"""The CI runner's pieces that need no machine: cache paths in the guest, the lines that
give them to the runner user, and artifacts named by an untrusted guest."""

import asyncio
from dataclasses import dataclass
from pathlib import Path

from pinnace.ci.runner import JobResult, Options, Runner, _guest_path, _own, _Run
from pinnace.ci.workflow import Job
from pinnace.errors import ConfigError


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


@dataclass
class Result:
    stdout: bytes
    exit_code: int = 0


class FakeFiles:
    def __init__(self):
        self.got = []

    async def get(self, remote, local, *, limit=None):
        if remote.endswith("/big"):
            raise ConfigError("guest path", remote, "it is more than the most asked for")
        self.got.append((remote, Path(local)))
        Path(local).write_text("x")
        return 1


class FakeMachine:
    """A machine whose guest names ``names`` as what the artifact patterns matched."""

    def __init__(self, found: bytes):
        self.found = found
        self.files = FakeFiles()

    async def exec(self, argv, timeout=None):
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
    m, result, lines = artifacts(tmp_path, ["dist/", "*.log", "none/"],
                                 b"\1\0dist\0\1\0a.log\0b.log\0\1\0")
    out = tmp_path / "out" / "build"
    assert [(r, p) for r, p in m.files.got] == [
        ("/workspace/dist", out / "dist"), ("/workspace/a.log", out / "a.log"),
        ("/workspace/b.log", out / "b.log")]
    assert result.artifacts == [str(out / "dist"), str(out / "a.log"), str(out / "b.log")]
    assert "no artifact matched none/" in lines


def test_names_from_the_guest_that_leave_the_workspace_are_refused(tmp_path):
    m, _, lines = artifacts(tmp_path, ["*"],
                             b"\1\0/etc/passwd\0../../x\0a/../../y\0.\0ok\0big\0")
    assert [r for r, _ in m.files.got] == ["/workspace/ok"]
    assert sum("refused artifact" in ln for ln in lines) == 4
    assert any("big" in ln and "most asked for" in ln for ln in lines)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out" / "y").exists()
