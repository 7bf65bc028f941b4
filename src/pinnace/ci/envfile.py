"""The files a step writes to talk to the runner, as GitHub Actions defines them:
``$GITHUB_ENV`` and ``$GITHUB_OUTPUT`` (``NAME=value`` lines, or ``NAME<<DELIMITER``
followed by lines up to one that is the delimiter alone), ``$GITHUB_PATH`` (one
directory per line, put in front of ``PATH`` for the steps after) and
``$GITHUB_STEP_SUMMARY`` (Markdown, appended to the job's summary).

They come from the guest, so nothing in them is trusted: each is read up to
:data:`MAX_BYTES`, names are checked, and a malformed file is a one-line
:class:`EnvFileError` that fails the step that wrote it (as it does on GitHub).
"""

from __future__ import annotations

import re

from ..errors import EnvFileError

MAX_BYTES = 1 << 20  # of each file a step writes (GitHub's limit for outputs is 1 MiB)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse(text: str, which: str = "GITHUB_ENV") -> dict[str, str]:
    """The NAME -> value pairs of an env or output file, in order (a later one wins)."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    i = 0
    while i < len(lines):
        line = lines[i].removesuffix("\r")
        i += 1
        if not line.strip():
            continue
        eq, heredoc = line.find("="), line.find("<<")
        if eq > 0 and (heredoc < 0 or eq < heredoc):
            name, value = line[:eq], line[eq + 1:]
        elif heredoc > 0:
            name, delimiter = line[:heredoc], line[heredoc + 2:]
            if not delimiter:
                raise EnvFileError(which, f"{name!r} has '<<' but no delimiter")
            body = []
            while True:
                if i >= len(lines):
                    raise EnvFileError(which, f"{name!r}: no line {delimiter[:40]!r} ends it")
                nxt = lines[i].removesuffix("\r")
                i += 1
                if nxt == delimiter:
                    break
                body.append(nxt)
            value = "\n".join(body)
        else:
            raise EnvFileError(which, f"line {line[:60]!r} is neither NAME=value nor "
                               "NAME<<DELIMITER")
        if not _NAME.match(name):
            raise EnvFileError(which, f"{name[:60]!r} is not a name")
        out[name] = value
    return out


def paths(text: str) -> list[str]:
    """The directories of a ``$GITHUB_PATH`` file, in the order written."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and "\0" not in ln]


__all__ = ["MAX_BYTES", "EnvFileError", "parse", "paths"]
