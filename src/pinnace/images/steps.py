"""What the image and kernel builds share: progress reporting, and running a build
command with its output in a log file and on the reporter."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from ..errors import ImageBuildError
from ..store import tail

log = logging.getLogger("pinnace.images.build")


class Reporter(Protocol):
    """Receives progress of a build; the CLI draws it, the API logs it."""

    def step(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def output(self, line: str) -> None: ...

    def note(self, text: str) -> None:
        """Something the user should read before a long wait (shown, not overwritten)."""


class LogReporter:
    """A Reporter that writes to the module logger."""

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        log.info("%s ...", name)
        yield
        log.info("%s done in %.1f s", name, time.monotonic() - start)

    def output(self, line: str) -> None:
        log.debug("%s", line)

    def note(self, text: str) -> None:
        log.warning("%s", text)


class Runner:
    """Runs build commands with their output in a log file and on the reporter."""

    def __init__(self, logfile: Path, reporter: Reporter) -> None:
        self.logfile = logfile
        self.reporter = reporter

    def run(self, step: str, argv: Sequence[str], *, cwd: Path | None = None,
            env: dict[str, str] | None = None,
            progress: Callable[[str], str | None] | None = None) -> None:
        """Run ``argv``; its output goes to the log, and each line (or what ``progress``
        makes of it, None to skip it) to the reporter."""
        with open(self.logfile, "a") as logf:
            logf.write(f"$ {' '.join(argv)}\n")
            logf.flush()
            with subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=cwd, env=env, text=True, errors="replace",
            ) as proc:
                assert proc.stdout is not None
                try:
                    for line in proc.stdout:
                        logf.write(line)
                        shown = progress(line) if progress else line.rstrip()
                        if shown is not None:
                            self.reporter.output(shown)
                    code = proc.wait()
                except BaseException:
                    proc.kill()
                    raise
        if code != 0:
            raise ImageBuildError(step, f"{argv[0]} exited with code {code}", command=argv,
                                  exit_code=code, log_tail=tail(self.logfile, 25))
