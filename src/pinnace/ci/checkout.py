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
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

# What a repository's own config could make git run here (a job given the folder with
# --bind could have written it): no fsmonitor, hooks, external diff or text conversion.
_SAFE = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null")


def _git(repo: Path, *args: str, input: bytes | None = None) -> bytes:
    r = subprocess.run(["git", *_SAFE, "-C", str(repo), *args], input=input,
                       capture_output=True, timeout=600)
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
            diff = _git(root, "diff", "--binary", "--no-ext-diff", "--no-textconv", "HEAD")
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


def checked_out_files(repo: Path) -> list[str]:
    """The files (relative paths, sorted) a checkout of ``repo`` with its working tree's
    changes holds: tracked and untracked files that git does not ignore; every file of a
    folder that is not a git repository."""
    repo = Path(repo).resolve()
    top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-prefix"],
                         capture_output=True, text=True)
    if top.returncode == 0:
        names = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                     "--full-name", ".").split(b"\0")
        prefix = top.stdout.strip()
        rels = [n.decode(errors="surrogateescape").removeprefix(prefix) for n in names if n]
        return sorted(r for r in set(rels) if (repo / r).is_file())
    out = []
    for folder, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if d != ".git"]
        out += [os.path.relpath(os.path.join(folder, f), repo) for f in files]
    return sorted(out)


def _glob_re(pattern: str) -> re.Pattern[str]:
    """A glob as @actions/glob reads it: ``**`` any folders (none too), ``*`` and ``?``
    within one name, ``[...]`` a class."""
    out, i = [], 0
    pattern = pattern.rstrip("/")  # (a folder: what is in it)
    while i < len(pattern):
        whole = i == 0 or pattern[i - 1] == "/"  # ** is "any folders" only as a whole name
        if whole and pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif whole and pattern.startswith("**", i) and i + 2 == len(pattern):
            out.append(".*")
            i += 2
        elif pattern.startswith("**", i):  # (within a name: as *)
            out.append("[^/]*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + "(?:/.*)?")  # (a folder matches what is in it)


def hash_files(repo: Path, patterns: list[str], workspace: str) -> str:
    """GitHub's ``hashFiles(patterns...)`` over the files a checkout of ``repo`` holds
    (the workspace's files before any step changes them): the SHA-256 of the matched
    files' SHA-256s, in path order; "" when none match. A pattern may start with ``!``
    (the last pattern that matches a file decides), with ``./`` or with the workspace's
    path; several may be given in one string, a line each."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for arg in patterns:
        for line in str(arg).splitlines():
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            negate = text.startswith("!")
            text = text.lstrip("!").strip()
            text = text.removeprefix(workspace.rstrip("/") + "/").removeprefix("./")
            rules.append((negate, _glob_re(text)))
    total = hashlib.sha256()
    found = False
    for rel in checked_out_files(repo):
        keep = False
        for negate, rx in rules:
            if rx.fullmatch(rel):
                keep = not negate
        if keep:
            found = True
            h = hashlib.sha256()
            with open(Path(repo) / rel, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            total.update(h.digest())
    return total.hexdigest() if found else ""


__all__ = ["checked_out_files", "hash_files", "prepare"]
