"""The store on disk: paths, atomic writes and locks.

This is the only module that knows the layout. Every file name inside an
object's directory is a constant here, so no path string is spelled twice::

    $PINNACE_HOME/                   default ~/.local/share/pinnace
      machines/<name>/               one directory per machine (MachineFiles)
      images/<digest>/               vmlinux, initrd.img, rootfs.ext4, image.json
      refs/images/<name>             the digest an image name points at
      cache/                         build layers and host probes, safe to delete
      locks/                         one lock file per object, outside its directory
      tmp/                           staging for atomic creation of directories
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, LockTimeout

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME_HINT = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise ConfigError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(f"{kind} name", name, NAME_HINT)
    return name


def default_home() -> Path:
    """The store root: $PINNACE_HOME, else $XDG_DATA_HOME/pinnace, else ~/.local/share/pinnace."""
    env = os.environ.get("PINNACE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "pinnace"


@dataclass(frozen=True)
class MachineFiles:
    """The files in one machine's directory."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def qmp_sock(self) -> Path:
        return self.dir / "qmp.sock"

    def agent_sock(self, port: int) -> Path:
        return self.dir / f"agent{port}.sock"

    def agent_lock(self, port: int) -> Path:
        return self.dir / f"agent{port}.lock"

    @property
    def pid(self) -> Path:
        return self.dir / "pid"

    @property
    def exit_status(self) -> Path:
        """Written by the launcher shell when QEMU exits: QEMU's exit status."""
        return self.dir / "exit"

    @property
    def launch_token(self) -> Path:
        """The token of the last launch, which its exit status must carry."""
        return self.dir / "exit.token"

    @property
    def events(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def resume(self) -> Path:
        """Present when the next start restores a saved state instead of booting."""
        return self.dir / "resume.json"

    @property
    def saved_state(self) -> Path:
        return self.dir / "saved.state"

    def nic_sock(self, nic: int) -> Path:
        """Where QEMU's dgram netdev for NIC ``nic`` (on a virtual network) binds."""
        return self.dir / f"n{nic}.sock"

    def nic_peer(self, nic: int) -> Path:
        """Where that NIC sends: the network's switch binds it while the NIC is connected."""
        return self.dir / f"n{nic}.peer"

    def runtime_files(self) -> list[Path]:
        """Files that belong to one run of QEMU and are removed when it ends."""
        from .agent.protocol import AGENT_PORTS

        files = [self.qmp_sock, self.pid]
        for port in range(AGENT_PORTS):
            files += [self.agent_sock(port), self.agent_lock(port)]
        with contextlib.suppress(OSError):
            files += sorted(self.dir.glob("n[0-9]*.sock"))
        return files


@dataclass(frozen=True)
class ImageFiles:
    """The files of one built image."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"

    @property
    def manifest(self) -> Path:
        return self.dir / "image.json"


class Store:
    """A pinnace store rooted at one directory."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.home = self.home.absolute()
        # Socket paths must fit in sun_path (108 bytes): refuse a home that leaves no room.
        if not self.socket_paths_fit("x" * 16):
            raise ConfigError(
                "PINNACE_HOME", str(self.home),
                "the path is too long for unix sockets inside it; choose a shorter directory",
            )

    def socket_paths_fit(self, machine: str) -> bool:
        """True if the unix sockets of a machine with this name fit in sun_path."""
        from .agent.protocol import AGENT_PORTS

        longest = self.machine_files(machine).agent_sock(AGENT_PORTS - 1)
        return len(os.fsencode(longest)) <= 107

    # --- directories -----------------------------------------------------------------

    @property
    def machines_dir(self) -> Path:
        return self.home / "machines"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def image_refs_dir(self) -> Path:
        return self.home / "refs" / "images"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    def machine_files(self, name: str) -> MachineFiles:
        return MachineFiles(self.machines_dir / name)

    def image_files(self, digest: str) -> ImageFiles:
        return ImageFiles(self.images_dir / digest)

    def ensure(self) -> None:
        """Create the top-level directories (idempotent)."""
        for d in (self.machines_dir, self.images_dir, self.image_refs_dir, self.cache_dir,
                  self.locks_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    # --- locks -----------------------------------------------------------------------

    def lock(self, kind: str, name: str, timeout: float = 60.0) -> FileLock:
        """A lock on one object (``kind``/``name``); hold it while changing the object."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(self.locks_dir / f"{kind}-{name}.lock", timeout)

    # --- staging ---------------------------------------------------------------------

    @contextlib.contextmanager
    def staging_dir(self, prefix: str) -> Iterator[Path]:
        """A fresh directory under tmp/ that is removed unless the caller renamed it away."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=self.tmp_dir))
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def clean_tmp(self) -> None:
        """Remove staging directories left by pinnace processes that have died."""
        if not self.tmp_dir.is_dir():
            return
        for entry in self.tmp_dir.iterdir():
            m = re.match(r"^[a-z]+-(\d+)-", entry.name)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive ``flock`` on a file, acquired with a timeout; re-entrant per object."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        if self._fd is not None:
            self._depth += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(str(self.path), self.timeout) from None
                time.sleep(0.02)
        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth == 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(path: Path) -> int | None:
    """Take a non-blocking exclusive flock on ``path``; return the fd, or None if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


# --- atomic files --------------------------------------------------------------------


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a torn one."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tail(path: Path, lines: int = 40, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a text file (guest output: decoded leniently), or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    # Drop terminal control characters the guest may print; keep tabs and newlines.
    text = "".join(c for c in text if c in "\t\n" or (c.isprintable() and c != "\x1b"))
    return "\n".join(text.splitlines()[-lines:])
