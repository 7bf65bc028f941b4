"""A reaper: removes what a process made ephemeral as soon as that process ends, however
it ends (SIGKILL included), rather than at the next session or ``pinnace gc``.

The process (a pytest session: see :mod:`pinnace.pytest_plugin`) starts one with
:func:`spawn`, keeping the write end of a pipe whose read end is the reaper's stdin. The
kernel closes that end when the process dies, so the reaper reads end-of-file then and
only then; it waits for the process to be gone and releases what it owned (its
machines, networks and volumes: :meth:`pinnace.client.AsyncPinnace.release`); unless
the process, having cleaned up itself, wrote ``done`` first (:func:`disarm`). It logs
to ``reaper.log`` in the store's cache. If the reaper itself is killed, nothing is lost:
the next session (and ``pinnace gc``) remove what dead owners left.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from .store import Store, detached_env, owner_alive, this_process

_held: list[tuple[int, subprocess.Popen[bytes]]] = []  # pipes' write ends, and reapers
OWNER_GONE_WAIT = 30.0  # seconds to wait for an owner that closed its pipe to exit
OWNER_POLL = 2.0  # seconds between looks at the owner while its pipe is open
DONE = b"done\n"  # what an owner that cleaned up after itself writes before it closes


def spawn(store: Store) -> int:
    """Start a reaper for this process on ``store``; returns its pid."""
    store.ensure()
    read, write = os.pipe()  # (not inherited by anything else this process starts)
    try:
        with open(store.cache_dir / "reaper.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pinnace.reaper", this_process(), str(store.home)],
                stdin=read, stdout=log, stderr=log, start_new_session=True, close_fds=True,
                cwd="/", env=detached_env())
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    _held.append((write, proc))
    return proc.pid


def disarm() -> None:
    """This process has removed what it owned itself: its reapers may just exit."""
    while _held:
        fd, proc = _held.pop()
        try:
            os.write(fd, DONE)
        except OSError:
            pass  # the reaper is gone: nothing to tell
        finally:
            os.close(fd)
        proc.poll()  # (reaped if it is done; Popen need not be waited for otherwise)
        proc.returncode = 0  # it runs on, detached, and exits by itself


def wait_and_release(owner: str, home: Path) -> int:
    """Block until ``owner`` closes its pipe and exits; then remove what it owned
    (unless it said it had, by :func:`disarm`)."""
    said = b""
    while True:
        # The pipe; and every few seconds the owner itself: a child it forked (and did
        # not exec) holds the write end too, and may outlive it.
        ready, _, _ = select.select([0], [], [], OWNER_POLL)
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            said = (said + chunk)[-len(DONE):]
        elif not owner_alive(owner):
            break  # (nothing unread: what it wrote before it died has been read)
    if said == DONE:
        return 0
    deadline = time.monotonic() + OWNER_GONE_WAIT
    while owner_alive(owner):  # the pipe closes a moment before the process is gone
        if time.monotonic() > deadline:
            return 0  # it closed the pipe and lives on: not ours to judge
        time.sleep(0.05)
    from .client import Pinnace

    with Pinnace(home) as pn:
        removed = pn.release(owner)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in removed:
        print(f"{stamp} reaper of {owner}: {r}", flush=True)
    return 0


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: python -m pinnace.reaper 'PID STARTTIME' HOME", file=sys.stderr)
        return 2
    return wait_and_release(sys.argv[1], Path(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
