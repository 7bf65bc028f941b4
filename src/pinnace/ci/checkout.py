"""``actions/checkout``, built in: the working tree laid out as a checkout lays it out.

A shallow clone of the repository at HEAD (so ``.git`` works, at depth 1, and files
are checked out as ``.gitattributes`` says: line endings converted, and files marked
``export-ignore`` still there, as a checkout leaves them), then the uncommitted changes
applied over it (modified, added and deleted tracked files, and untracked files that
are not ignored): what the job sees is what the user has. A folder that is not a git
repository is copied as it is.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError


def _git(repo: Path, *args: str, input: bytes | None = None) -> bytes:
    r = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True,
                       timeout=600)
    if r.returncode != 0:
        raise ConfigError("checkout", str(repo), f"git {args[0]} failed: "
                          f"{r.stderr.decode(errors='replace').strip()[-200:]}")
    return r.stdout


@contextlib.contextmanager
def prepare(repo: Path) -> Iterator[Path]:
    """A temporary folder holding what a checkout of ``repo`` gives, with the working
    tree's changes; removed after the block."""
    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise ConfigError("checkout", str(repo), "give the repository's folder")
    tmp = Path(tempfile.mkdtemp(prefix="pinnace-checkout-"))
    tree = tmp / "tree"
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True)
        has_head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "HEAD"],
                                  capture_output=True).returncode == 0
        if top.returncode != 0 or not has_head:
            shutil.copytree(repo, tree, symlinks=True)
        else:
            root = Path(top.stdout.strip())
            subprocess.run(["git", "clone", "--quiet", "--no-local", "--depth", "1",
                            f"file://{root}", str(tree)], check=True, capture_output=True,
                           timeout=600)
            diff = _git(root, "diff", "--binary", "HEAD")
            if diff.strip():
                _git(tree, "apply", "--binary", "--whitespace=nowarn", "-", input=diff)
            for name in _git(root, "ls-files", "-z", "--others", "--exclude-standard"
                             ).split(b"\0"):
                if name:
                    rel = name.decode(errors="surrogateescape")
                    dst = tree / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    src = root / rel
                    if src.is_symlink() or src.is_file():
                        shutil.copy2(src, dst, follow_symlinks=False)
        yield tree
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["prepare"]
