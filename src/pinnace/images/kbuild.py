"""Pinnace's own guest kernel, built from Debian's ``linux-source`` package.

Debian's generic kernel spends most of a guest's boot on what a microVM never uses
(docs/boot.md): probing hardware, initcalls for hundreds of drivers, and an initramfs
to load the few modules a guest needs. This kernel has those built in and little else,
so it boots with no initramfs in a fraction of the time.

Its configuration is kept in ``kconfig/*.config``: fragments forced on top of
``make allnoconfig`` (every option off), in file-name order. Every symbol they set is
checked in the resulting .config, so a symbol the source does not know or cannot
enable fails the build by name rather than silently dropping a feature.

A built kernel is cached by a digest of what makes it (the source package's version,
the fragments, the compiler's version, this recipe's version) in a cache shared by
every store on the host (``store.KernelCache``): each host builds it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostError, ImageBuildError, store_error
from ..store import KernelCache, KernelFiles, put_in_place, write_json
from .steps import Reporter, Runner

# Bump when the recipe below changes what it builds.
KBUILD_VERSION = 1
SOURCE_PACKAGE = "linux-source-6.1"
KCONFIG_DIR = Path(__file__).resolve().parent / "kconfig"
# Host packages the build needs, by the tool that needs them.
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "bison": "bison", "flex": "flex", "bc": "bc",
               "xz": "xz-utils", "depmod": "kmod", "tar": "tar"}
BUILD_HEADERS = {"/usr/include/libelf.h": "libelf-dev"}  # objtool (the ORC unwinder)
# About how long a build takes, for the notice before it starts: minutes on one core
# (measured: see docs/boot.md), and about how many files it compiles (for progress).
CORE_MINUTES = 28
COMPILED_FILES = 1870
_CONFIG_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_COMPILE_RE = re.compile(r"^\s+(CC \[M\]|CC|AS \[M\]|AS)\s+(\S+)")


@dataclass(frozen=True)
class KernelSource:
    """Debian's packaged kernel source: the tarball and the package's version."""

    package: str
    version: str
    tarball: Path


def find_source(package: str = SOURCE_PACKAGE) -> KernelSource:
    """The installed ``linux-source`` package (HostError naming the fix if missing)."""
    tarball = Path("/usr/src") / f"{package}.tar.xz"
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", package],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        out = None
    if out is None or out.returncode != 0 or not out.stdout.startswith("install ok installed"):
        raise HostError(f"the kernel source package {package} is not installed",
                        f"install it with: apt-get install {package} (or run 'make deps'), "
                        "or build with --kernel debian")
    if not tarball.is_file():
        raise HostError(f"{tarball} is missing though {package} is installed",
                        f"reinstall it with: apt-get install --reinstall {package}")
    return KernelSource(package, out.stdout.split("\t", 1)[1].strip(), tarball)


def check_build_tools() -> None:
    missing = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None}
                     | {pkg for path, pkg in BUILD_HEADERS.items() if not Path(path).exists()})
    if missing:
        raise HostError(f"missing host packages for building the guest kernel: "
                        f"{', '.join(missing)}",
                        f"install them with: apt-get install {' '.join(missing)} "
                        "(or run 'make deps'), or build with --kernel debian")


def fragments() -> list[Path]:
    """The config fragments, base first, then the others by name."""
    frags = sorted(KCONFIG_DIR.glob("*.config"), key=lambda p: (p.name != "base.config", p.name))
    if not frags:
        raise ImageBuildError("kernel config", f"no *.config fragments in {KCONFIG_DIR}")
    return frags


def merged_config() -> str:
    return "".join(f"# --- {p.name}\n{p.read_text()}\n" for p in fragments())


def compiler_version() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HostError("cannot run gcc to build the guest kernel",
                        "install it with: apt-get install gcc") from exc
    return out.stdout.splitlines()[0].strip()


def kernel_key(source: KernelSource, config: str, compiler: str) -> str:
    """The digest naming a built kernel: source version, config, compiler, recipe."""
    data = {"recipe": KBUILD_VERSION, "package": source.package, "version": source.version,
            "config": config, "compiler": compiler, "arch": "x86_64"}
    return "k" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def parse_config(text: str) -> dict[str, str]:
    """A .config (or fragment) as {symbol: value}; '# X is not set' reads as 'n'."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _CONFIG_RE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET_RE.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def config_problems(wanted: dict[str, str], got: dict[str, str]) -> list[str]:
    """What the fragments ask for that the resulting .config does not have."""
    problems = []
    for sym, value in wanted.items():
        have = got.get(sym, "n")
        if value == "n":
            if have in ("y", "m"):
                problems.append(f"{sym} is {have}, the fragments turn it off (something "
                                "selects it)")
        elif have != value:
            problems.append(f"{sym}={value} was asked for, the config has "
                            f"{'it off' if have == 'n' else have} (unknown symbol or "
                            "unmet dependency)")
    return problems


@dataclass(frozen=True)
class BuiltKernel:
    """A kernel in the host-wide cache."""

    key: str
    files: KernelFiles
    release: str  # `uname -r` in the guest; the modules' folder name


class KernelBuilder:
    """Builds the guest kernel into the host-wide cache unless it is there."""

    def __init__(self, reporter: Reporter, cache: KernelCache | None = None) -> None:
        self.reporter = reporter
        self.cache = cache or KernelCache()
        self.source = find_source()
        self.config = merged_config()
        self.key = kernel_key(self.source, self.config, compiler_version())

    def cached(self) -> BuiltKernel | None:
        files = self.cache.kernel(self.key)
        try:
            meta = json.loads(files.manifest.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("release"), str):
            return None
        return BuiltKernel(self.key, files, meta["release"])

    def ensure(self) -> BuiltKernel:
        """The built kernel, building it first if no store on this host has yet."""
        found = self.cached()
        if found is not None:
            return found
        check_build_tools()
        # Another store (or CI job) may be building it: wait for that rather than twice.
        with self.cache.lock(self.key, timeout=3 * 3600):
            found = self.cached()
            if found is not None:
                return found
            self.cache.clean_tmp()
            damaged = self.cache.kernel(self.key).dir
            if damaged.exists():  # a folder without a readable kernel.json: build it anew
                shutil.rmtree(damaged, ignore_errors=True)
            cores = os.cpu_count() or 1
            low = max(2, round(CORE_MINUTES / cores))
            note = getattr(self.reporter, "note", None) or self.reporter.output
            note(
                f"Building pinnace's guest kernel from {self.source.package} "
                f"{self.source.version}: once per host, cached in {self.cache.root} for every "
                f"store; about {low}-{low * 2} minutes on {cores} core{'s' * (cores > 1)}.")
            try:
                with self.cache.staging_dir("kernel-") as stage:
                    try:
                        self._build(stage)
                    except ImageBuildError:
                        # the whole log outlives the staging folder, for the user to read
                        with contextlib.suppress(OSError):
                            shutil.copyfile(KernelFiles(stage).build_log, self.cache.failed_log)
                        raise
                    stage.chmod(0o755)  # every store on the host reads it
                    put_in_place(stage, self.cache.kernel(self.key).dir, "the kernel")
            except FileExistsError:
                pass
            except OSError as exc:
                raise store_error(exc, "building the guest kernel (nothing was cached)"
                                  ) from None
        found = self.cached()
        if found is None:
            raise ImageBuildError("kernel", "the built kernel is not in the cache")
        return found

    def _build(self, stage: Path) -> None:
        out = KernelFiles(stage)
        runner = Runner(out.build_log, self.reporter)
        started = time.monotonic()
        work = stage / "src"
        work.mkdir()
        src = self.source
        with self.reporter.step(f"Unpacking {src.package} {src.version}"):
            runner.run("kernel source", ["tar", "-xf", str(src.tarball), "-C", str(work),
                                         "--strip-components=1"])
        make = ["make", "-C", str(work), "ARCH=x86_64", f"-j{os.cpu_count() or 1}"]
        with self.reporter.step("Configuring the kernel (kconfig/*.config)"):
            (stage / "pinnace.config").write_text(self.config)
            runner.run("kernel config", [*make, "allnoconfig",
                                         f"KCONFIG_ALLCONFIG={stage / 'pinnace.config'}"])
            got = parse_config((work / ".config").read_text())
            problems = config_problems(parse_config(self.config), got)
            if problems:
                raise ImageBuildError("kernel config", "; ".join(problems[:5]) + (
                    f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        with self.reporter.step("Compiling the kernel and its modules"):
            runner.run("kernel compile", [*make, "vmlinux", "modules"],
                       progress=CompileProgress())
        with self.reporter.step("Installing the kernel and its modules"):
            runner.run("kernel", [*make, "modules_install", "INSTALL_MOD_STRIP=1",
                                  f"INSTALL_MOD_PATH={out.modules}", "DEPMOD=/bin/true"])
            asked = subprocess.run([*make, "-s", "kernelrelease"], capture_output=True,
                                   text=True, check=False)
            release = asked.stdout.strip()
            if asked.returncode != 0 or not release:
                raise ImageBuildError("kernel", "make kernelrelease failed: "
                                      f"{asked.stderr.strip()[-300:]}")
            moddir = out.modules / "lib/modules" / release
            for link in ("build", "source"):  # they point into the build tree, removed below
                if (moddir / link).is_symlink():
                    (moddir / link).unlink()
            shutil.copy2(work / "vmlinux", out.vmlinux)
            subprocess.run(["strip", "--strip-debug", str(out.vmlinux)], check=False)
            shutil.copy2(work / ".config", out.config)
            shutil.rmtree(work)
        write_json(out.manifest, {
            "key": self.key, "release": release, "package": src.package,
            "version": src.version, "compiler": compiler_version(),
            "recipe": KBUILD_VERSION, "fragments": [p.name for p in fragments()],
            "build_seconds": round(time.monotonic() - started, 1), "created": time.time(),
        })


class CompileProgress:
    """Turns kbuild's output into 'N of ~M files: path' lines (None for other lines)."""

    def __init__(self, expected: int = COMPILED_FILES) -> None:
        self.count = 0
        self.expected = expected

    def __call__(self, line: str) -> str | None:
        m = _COMPILE_RE.match(line)
        if not m:
            return None
        self.count += 1
        return f"{self.count} of ~{max(self.expected, self.count)} files: {m.group(2)}"


def current_kernel_key() -> str:
    """The key of the kernel this host would build now (what an image's digest names)."""
    return kernel_key(find_source(), merged_config(), compiler_version())
