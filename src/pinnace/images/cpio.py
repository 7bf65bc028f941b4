"""A minimal writer for the newc cpio format the kernel unpacks as an initramfs.

Written here rather than calling cpio(1) so the archive is reproducible: fixed
owners, modes and mtimes, entries in the order given.
"""

from __future__ import annotations

import stat
from typing import BinaryIO


class CpioWriter:
    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self.out = out
        self.mtime = mtime
        self.ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        raw_name = name.encode() + b"\0"
        header = (
            b"070701"
            + b"".join(
                f"{v:08X}".encode()
                for v in (self.ino, mode, 0, 0, nlink, self.mtime, len(data), 0, 0, *rdev,
                          len(raw_name), 0)
            )
        )
        self.ino += 1
        self.out.write(header + raw_name)
        self._pad(len(header) + len(raw_name))
        self.out.write(data)
        self._pad(len(data))

    def _pad(self, n: int) -> None:
        self.out.write(b"\0" * ((4 - n % 4) % 4))

    def mkdir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
