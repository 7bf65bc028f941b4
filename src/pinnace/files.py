"""Copying files and directories between the host and a guest, streamed both ways.

A directory travels as a tar stream. What comes from the guest is untrusted: an
archive is unpacked on the host only after every member has been checked to
stay inside the target (no absolute paths, no '..', no links out, no devices).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath

from .agent import protocol as P
from .agent.client import AgentClient, Process
from .errors import ConfigError, RemoteError, TooLargeError, UnsafeArchive

CHUNK = 1 << 20


def _remote(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError("guest path", path, "give an absolute path inside the guest")
    return path


def _failure(what: str, stderr: bytes) -> RemoteError:
    """The error for a failed copy, with the last line the guest's tool printed."""
    detail = stderr.decode("utf-8", "replace").strip().splitlines()
    return RemoteError("copy-failed", f"{what}: {detail[-1] if detail else 'failed'}")


class AsyncFiles:
    """``machine.files``: put and get files and directories. ``agent`` opens (or
    returns) the machine's agent connection."""

    def __init__(self, agent: Callable[[], Awaitable[AgentClient]]) -> None:
        self._agent = agent

    async def put(self, local: str | os.PathLike[str], remote: str) -> int:
        """Copy a host file or directory to ``remote`` in the guest; return the bytes sent."""
        src = Path(local)
        remote = _remote(remote)
        if not src.exists():
            raise ConfigError("host path", str(src), "no such file or directory")
        agent = await self._agent()
        if src.is_dir():
            proc = agent.start_transfer("put", path=remote, archive=True)
            sent = 0
            with subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as tar:
                assert tar.stdout is not None
                while data := tar.stdout.read(CHUNK):
                    await proc.write(data)
                    sent += len(data)
            await proc.close_stdin()
            await self._drain_errors(proc, f"unpacking into {remote}")
            return sent
        st = src.stat()
        proc = agent.start_transfer("put", path=remote, mode=st.st_mode & 0o7777,
                                    mtime=st.st_mtime)
        sent = 0
        with open(src, "rb") as f:
            while data := f.read(CHUNK):
                await proc.write(data)
                sent += len(data)
        await proc.close_stdin()
        await self._drain_errors(proc, f"writing {remote}")
        return sent

    async def _drain_errors(self, proc: Process, what: str) -> None:
        err = bytearray()
        try:
            async for stream, data in proc:
                if stream == P.STDERR and len(err) < 4096:
                    err += data[: 4096 - len(err)]
            result = await proc.wait()
        finally:
            proc.abandon()
        if not result.ok:
            raise _failure(what, bytes(err))

    async def get(self, remote: str, local: str | os.PathLike[str], *,
                  limit: int | None = None) -> int:
        """Copy ``remote`` (a file or a directory) from the guest to the host; return bytes.
        ``limit``: refuse (and keep nothing of) more than this many bytes from the guest."""
        remote = _remote(remote)
        dst = Path(local)
        agent = await self._agent()
        proc = agent.start_transfer("get", path=remote, archive=True)
        if dst.is_dir():
            dst = dst / PurePosixPath(remote).name
        parent = dst.parent if dst.parent != Path("") else Path(".")
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.pinnace-", dir=parent)
        except OSError as exc:
            proc.abandon()
            raise ConfigError("host path", str(local), f"cannot write there "
                              f"({exc.strerror})") from None
        tmp = Path(tmp_name)
        received = 0
        err = bytearray()
        try:
            with os.fdopen(fd, "wb") as out:
                async for stream, data in proc:
                    if stream == P.STDOUT:
                        out.write(data)
                        received += len(data)
                        if limit is not None and received > limit:
                            raise TooLargeError(f"{remote}: more than {limit} bytes, the most "
                                           "allowed here; nothing was kept")
                    elif len(err) < 4096:
                        err += data[: 4096 - len(err)]
            result = await proc.wait()
            if not result.ok:
                raise _failure(f"reading {remote}", bytes(err))
            stat = proc.stat or {}
            if stat.get("dir"):
                dst.mkdir(exist_ok=True)
                extract_safely(tmp, dst)
                tmp.unlink()
            else:
                mode = int(stat.get("mode", 0o644)) & 0o777
                os.chmod(tmp, mode)
                mtime = float(stat.get("mtime", 0)) or None
                if mtime:
                    os.utime(tmp, (mtime, mtime))
                os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        finally:
            proc.abandon()
        return received


def extract_safely(archive: Path, target: Path) -> None:
    """Unpack a tar from the guest into ``target``, refusing anything that would leave it."""
    root = target.resolve()
    links: set[PurePosixPath] = set()
    with tarfile.open(archive, "r:") as tar:
        members = []
        for m in tar.getmembers():
            name = PurePosixPath(m.name)
            if name.is_absolute() or ".." in name.parts:
                raise UnsafeArchive(f"archive member {m.name!r} points outside the target")
            norm = PurePosixPath(*[p for p in name.parts if p != "."]) if name.parts else name
            if any(norm.is_relative_to(link) and norm != link for link in links):
                raise UnsafeArchive(f"archive member {m.name!r} goes through a link")
            if m.issym() or m.islnk():
                dest = PurePosixPath(m.linkname)
                resolved = (root / norm.parent / dest).resolve() if m.issym() else root / dest
                if dest.is_absolute() or not str(resolved).startswith(str(root)):
                    raise UnsafeArchive(f"archive link {m.name!r} -> {m.linkname!r} leaves the target")
                links.add(norm)
            elif not (m.isfile() or m.isdir()):
                continue  # devices and fifos are not copied
            m.uid = m.gid = os.getuid()
            m.uname = m.gname = ""
            members.append(m)
        extra = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=members, numeric_owner=True, **extra)  # type: ignore[arg-type]


__all__ = ["AsyncFiles", "extract_safely"]
