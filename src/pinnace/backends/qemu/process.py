"""QEMU as a detached process that outlives the command that started it.

QEMU runs under a small ``sh`` in a session of its own, so Ctrl-C in the CLI
does not reach it; the shell writes QEMU's exit status to a file when it ends,
which is how a later command tells a clean poweroff from a crash or a kill -9.

Both run in the machine's folder and name the files in it relative to it (see
:meth:`MachineFiles.cwd_path`), so the folder may be renamed while they run: the exit
status is still written into it, wherever it is then.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from ...store import MachineFiles, proc_argv, proc_cwd, proc_start_time, write_atomic
from ..base import Handle

# "$1" is the exit file, "$2" the log (both relative to the machine's folder, the shell's
# working directory), "$3" a token naming this launch; QEMU's argv follows.
# The exit file holds "STATUS TOKEN": a launcher shell of an earlier QEMU that writes its
# status late can then never be taken for this launch's QEMU dying at once.
_WRAPPER = (
    'exit_file=$1; log=$2; token=$3; shift 3; '
    '( "$@"; echo "$? $token" > "$exit_file.tmp.$token"; '
    'mv -f "$exit_file.tmp.$token" "$exit_file" ) </dev/null >>"$log" 2>&1 &'
)


def alive(handle: Handle) -> bool:
    """True while the process runs: the same pid and start time, not a zombie."""
    st = proc_start_time(handle.pid)
    return st is not None and st == handle.start_time


def launch(argv: list[str], files: MachineFiles, timeout: float = 10.0) -> Handle | int:
    """Start QEMU detached; return its Handle, or its exit status if it died at once."""
    for p in (files.pid, files.exit_status):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    token = f"{os.getpid()}.{time.monotonic_ns()}"
    write_atomic(files.launch_token, token)
    launcher = subprocess.Popen(
        ["sh", "-c", _WRAPPER, "sh", files.cwd_path(files.exit_status),
         files.cwd_path(files.qemu_log), token, *argv],
        stdin=subprocess.DEVNULL, start_new_session=True, cwd=files.dir,
    )
    launcher.wait()  # at once: the shell leaves QEMU running in the background
    deadline = time.monotonic() + timeout
    while True:
        code = read_exit_status(files, token)
        if code is not None:
            return code
        pid = read_pid(files)
        if pid is not None:
            st = proc_start_time(pid)
            if st is not None:
                return Handle(pid, st)
        if time.monotonic() > deadline:
            # Nothing would know of a QEMU that comes up after this: end its session (the
            # launcher's, which QEMU and its waiting shell share) now.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(launcher.pid, signal.SIGKILL)
            raise TimeoutError("QEMU neither wrote its pid file nor exited")
        time.sleep(0.002)


def read_pid(files: MachineFiles) -> int | None:
    try:
        text = files.pid.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def is_vmm_of(pid: int, files: MachineFiles) -> bool:
    """True if process ``pid`` is a QEMU launched for ``files``: one of ours (its argv has
    ``-pidfile``) whose working directory is ``files.dir`` where that folder is now (the
    kernel follows renames). A process that merely reuses a stale pid file's pid is not."""
    argv = proc_argv(pid)
    if argv is None or "-pidfile" not in argv[:-1]:
        return False
    where = proc_cwd(pid)
    if where is None or where[1]:  # gone, or its folder was removed
        return False
    try:
        return where[0] == files.dir.resolve(strict=True)
    except OSError:  # the folder is gone
        return False


def await_exit_status(files: MachineFiles, timeout: float = 1.0) -> int | None:
    """QEMU's exit status once its launcher shell has written it (just after QEMU ends)."""
    deadline = time.monotonic() + timeout
    while (code := read_exit_status(files)) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return code


def read_exit_status(files: MachineFiles, token: str | None = None) -> int | None:
    """The last launch's QEMU's exit status (``token`` names the launch; by default the
    one launch() recorded), never an earlier launcher's that came late."""
    try:
        status, _, written_by = files.exit_status.read_text().strip().partition(" ")
    except FileNotFoundError:
        return None
    if token is None:
        with contextlib.suppress(FileNotFoundError):
            token = files.launch_token.read_text().strip()
    if token is not None and written_by != token:
        return None
    return int(status) if status.lstrip("-").isdigit() else None


def signal_process(info: Handle, sig: int) -> bool:
    """Send ``sig`` if the process is still the one we started; True if sent."""
    if not alive(info):
        return False
    try:
        os.kill(info.pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_exit(info: Handle, timeout: float) -> bool:
    """Wait for the process to end; True if it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    while alive(info):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def kill(info: Handle, files: MachineFiles, timeout: float = 5.0) -> None:
    """SIGKILL QEMU and wait until it and its exit status are gone/written."""
    signal_process(info, signal.SIGKILL)
    wait_exit(info, timeout)
    await_exit_status(files, 2.0)
