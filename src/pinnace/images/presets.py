"""Images that pinnace itself names and keeps up to date: the one CI jobs run on.

A preset is an image's inputs under a name. ``Images.ensure_preset(name)`` builds it
when the name is missing or points at an image of other inputs (a new pinnace, a new
kernel), so a caller never runs on a stale one.
"""

from __future__ import annotations

from dataclasses import dataclass

# What GitHub's Ubuntu runners have that workflows rely on without installing it:
# compilers and build tools, git, Python with venv and pip, and the usual command-line
# tools. Debian's names (bookworm).
RUNNER_PACKAGES = (
    "build-essential", "cmake", "clang", "autoconf", "automake", "libtool", "pkg-config",
    "git", "python3", "python3-venv", "python3-pip", "sudo", "curl", "ca-certificates",
    "make", "unzip", "xz-utils", "jq", "file", "iproute2", "kmod",
)


@dataclass(frozen=True)
class Preset:
    """An image's inputs under a name (those of Images.build)."""

    packages: tuple[str, ...]
    init: str = "agent"
    apt_ready: bool = False
    about: str = ""


# The image CI jobs get for runs-on: ubuntu-* (ci/workflow.py's DEFAULT_PLATFORMS name it).
RUNNER = Preset(RUNNER_PACKAGES, init="systemd", apt_ready=True,
                about="shaped like GitHub's Ubuntu runners: systemd, build tools, apt ready")

PRESETS: dict[str, Preset] = {"ubuntu": RUNNER}
