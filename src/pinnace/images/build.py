"""Building a bootable guest image from Debian's packages.

An image is three files and a manifest, built in a staging directory and renamed
into ``images/<digest>/`` only when whole, so a failed or interrupted build never
leaves half an image in the store. The digest covers every input (packages,
suite, mirror, the agent's and the init script's code, the builder's version),
so an image is rebuilt exactly when one of them changes.

The slow part, mmdebstrap, is its own cached layer (``cache/base/<key>/``): it
depends only on the package list (and whether apt's lists are kept), so changing the
agent rebuilds in seconds.

An image's init is the agent itself (the default: PID 1, nothing else runs) or systemd
(``init="systemd"``), which then runs the agent as an early service (images/systemd.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, HostError, ImageBuildError, store_error
from ..store import BaseLayerFiles, ImageFiles, Store, write_json
from . import kernel as K
from . import systemd
from .cpio import CpioWriter
from .steps import LogReporter, Reporter, Runner

log = logging.getLogger(__name__)

# Bump when the build recipe changes in a way that changes the output.
BUILDER_VERSION = 1
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
KERNEL_PACKAGE = "linux-image-amd64"
# Which kernel an image boots: pinnace's own (images/kbuild.py; no initramfs), or
# Debian's packaged one with its modules (through pinnace's busybox initramfs).
KERNELS = ("pinnace", "debian")
DEFAULT_KERNEL = "pinnace"
# How the own kernel boots: it mounts the root disk itself and runs the agent as init
# (the agent's file starts with '#!/usr/bin/python3 -IS'). A later init= on a machine's
# own --cmdline wins.
OWN_KERNEL_ROOT = "root=/dev/vda rw rootfstype=ext4"
OWN_KERNEL_ARGS = f"{OWN_KERNEL_ROOT} init=/usr/lib/pinnace/agent"
AGENT_SCRIPT = ("#!/usr/bin/python3 -IS\n"
                "import sys\nsys.path.insert(0, '/usr/lib/pinnace')\nimport guest\n"
                "guest.run_main()\n")
# nftables and iptables (its nft backend): firewalls and NAT inside guests, for network
# tests; mount: loop devices and the usual mount options; sudo: commands as another user
# (testinfra's host.sudo(), non-root test users).
BASE_PACKAGES = ("python3", "iproute2", "iputils-ping", "procps", "ca-certificates", "kmod",
                 "nftables", "iptables", "mount", "sudo")
# What runs as PID 1: the agent (the default), or systemd with the agent as its service.
INITS = ("agent", "systemd")
DEFAULT_INIT = "agent"
# dbus: systemctl as a user, hostnamectl, timedatectl and busctl reach systemd over it.
SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus")
ROOTFS_MIN_SIZE = 2 << 30
AGENT_DIR = "usr/lib/pinnace"
# Bump when what this module writes into the root filesystem changes (images rebuild).
# 2: /etc/hostname is a link to the kernel's hostname; 3: resolv.conf to /run;
# 4: the agent's file is executable (init= of the own kernel)
ROOTFS_LAYOUT = 4
# apt_ready (GitHub's runners do the same): 'apt-get install foo' without -y and
# without 'apt-get update' first.
APT_ASSUME_YES_FILE = "etc/apt/apt.conf.d/90pinnace-assume-yes"
APT_ASSUME_YES = 'APT::Get::Assume-Yes "true";\n'
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$")
HOST_TOOLS = {
    "mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "dpkg-deb": "dpkg", "depmod": "kmod",
    "tar": "tar",
}


@dataclass(frozen=True)
class ImageSpec:
    """The declared inputs of an image; its digest names the image."""

    packages: tuple[str, ...] = ()
    suite: str = DEFAULT_SUITE
    mirror: str = DEFAULT_MIRROR
    security_mirror: str = DEFAULT_SECURITY_MIRROR
    kernel_package: str = KERNEL_PACKAGE
    kernel: str = DEFAULT_KERNEL
    kernel_key: str = ""  # the own kernel's cache key (kbuild.kernel_key)
    init: str = DEFAULT_INIT
    apt_ready: bool = False  # apt assumes yes, and its package lists stay in the image

    @classmethod
    def create(cls, packages: Sequence[str] = (), *, suite: str | None = None,
               mirror: str | None = None, kernel: str | None = None,
               init: str | None = None, apt_ready: bool = False) -> ImageSpec:
        for pkg in packages:
            if not _PKG_RE.match(pkg):
                raise ConfigError("package", pkg, "give a Debian package name such as 'curl' "
                                  "or 'curl=7.88.1-10'")
        mirror = mirror or os.environ.get("PINNACE_DEBIAN_MIRROR") or DEFAULT_MIRROR
        if not re.match(r"^(https?|file)://\S+$", mirror):
            raise ConfigError("mirror", mirror, "give an http(s):// or file:// URL")
        suite = suite or DEFAULT_SUITE
        if not re.match(r"^[a-z][a-z0-9-]*$", suite):
            raise ConfigError("suite", suite, "give a Debian suite name such as 'bookworm'")
        security = os.environ.get("PINNACE_DEBIAN_SECURITY_MIRROR") or DEFAULT_SECURITY_MIRROR
        kernel = kernel or os.environ.get("PINNACE_KERNEL") or DEFAULT_KERNEL
        if kernel not in KERNELS:
            raise ConfigError("kernel", kernel, "give 'pinnace' (pinnace's own, the default) "
                              "or 'debian' (Debian's packaged kernel)")
        init = init or DEFAULT_INIT
        if init not in INITS:
            raise ConfigError("init", init, "give 'agent' (the agent is PID 1, the default) "
                              "or 'systemd' (systemd is, and runs the agent as a service)")
        if not isinstance(apt_ready, bool):
            raise ConfigError("apt_ready", repr(apt_ready), "give True or False")
        kernel_key = ""
        if kernel == "pinnace":
            from .kbuild import current_kernel_key

            kernel_key = current_kernel_key()
        return cls(packages=tuple(sorted(set(packages))), suite=suite, mirror=mirror.rstrip("/"),
                   security_mirror=security.rstrip("/"), kernel=kernel, kernel_key=kernel_key,
                   init=init, apt_ready=apt_ready)

    @property
    def all_packages(self) -> tuple[str, ...]:
        extra = SYSTEMD_PACKAGES if self.init == "systemd" else ()
        return tuple(sorted(set(BASE_PACKAGES) | set(self.packages) | set(extra)))

    def base_inputs(self) -> dict[str, object]:
        # What is not the default is added only when set: existing images keep their digests.
        extra: dict[str, object] = {"apt_lists": True} if self.apt_ready else {}
        return {
            "builder": BUILDER_VERSION, "suite": self.suite, "mirror": self.mirror,
            "security_mirror": self.security_mirror, "packages": list(self.all_packages),
            "kernel_package": self.kernel_package, **extra,
        }

    def inputs(self) -> dict[str, object]:
        common = {**self.base_inputs(), "agent": source_digest(agent_sources()),
                  "rootfs_layout": ROOTFS_LAYOUT}
        if self.apt_ready:
            common["apt_ready"] = APT_ASSUME_YES
        if self.init == "systemd":
            common["init_system"] = {"name": "systemd",
                                     "setup": source_digest([systemd.source()])}
        if self.kernel == "pinnace":
            return {**common, "kernel": self.kernel_key, "boot": self.boot_args}
        return {
            **common,
            "init": source_digest([init_script()]),
            "initramfs_modules": [*K.INITRAMFS_MODULES, *K.INITRAMFS_PCI_MODULES],
        }

    @property
    def boot_args(self) -> str:
        """The kernel arguments the image boots with (the manifest's boot_args)."""
        if self.init == "systemd":
            args = systemd.KERNEL_ARGS
            return f"{OWN_KERNEL_ROOT} {args}" if self.kernel == "pinnace" else args
        return OWN_KERNEL_ARGS if self.kernel == "pinnace" else ""

    @property
    def base_key(self) -> str:
        return _digest(self.base_inputs())

    @property
    def digest(self) -> str:
        return _digest(self.inputs())


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def agent_sources() -> list[Path]:
    here = Path(__file__).resolve().parent.parent / "agent"
    return [here / "protocol.py", here / "netconf.py", here / "guest.py"]


def init_script() -> Path:
    return Path(__file__).resolve().parent / "init.sh"


def source_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def mmdebstrap_argv(spec: ImageSpec, rootfs_tar: Path, debs: Path, out_dir: Path) -> list[str]:
    """mmdebstrap's command line for the base layer of ``spec``: the root filesystem as
    a tarball, the kernel and busybox packages copied out to ``debs`` and the list of
    installed packages to ``out_dir``."""
    hook = (
        'set -e; mkdir -p "$1/var/cache/pinnace-debs"; '
        f'kpkg=$(chroot "$1" apt-cache depends {spec.kernel_package} '
        "| sed -n 's/^ *Depends: \\(linux-image-[^ ]*\\).*/\\1/p' | head -n1); "
        f'[ -n "$kpkg" ] || kpkg={spec.kernel_package}; '
        'chroot "$1" sh -c "cd /var/cache/pinnace-debs && '
        'apt-get download -q $kpkg busybox-static"'
    )
    sources = [
        f"deb {spec.mirror} {spec.suite} main",
        f"deb {spec.mirror} {spec.suite}-updates main",
        f"deb {spec.security_mirror} {spec.suite}-security main",
    ]
    # apt_ready: apt's package lists stay (mmdebstrap removes them at its cleanup).
    keep = ["--skip=cleanup/apt/lists"] if spec.apt_ready else []
    return [
        "mmdebstrap", "--variant=apt", "--mode=root", "--format=tar", *keep,
        f"--include={','.join(spec.all_packages)}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        f"--customize-hook={hook}",
        f'--customize-hook=copy-out /var/cache/pinnace-debs {debs}',
        '--customize-hook=rm -rf "$1/var/cache/pinnace-debs"',
        # (single quotes: the hook is a shell's, which would expand ${Package} to nothing)
        "--customize-hook=chroot \"$1\" dpkg-query -W -f '${Package}=${Version}\\n' "
        '> "$1/.pinnace-packages"',
        '--customize-hook=copy-out /.pinnace-packages ' + str(out_dir),
        '--customize-hook=rm -f "$1/.pinnace-packages"',
        spec.suite, str(rootfs_tar), *sources,
    ]


def check_host_tools() -> None:
    missing = [(tool, pkg) for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        names = ", ".join(t for t, _ in missing)
        pkgs = " ".join(sorted({p for _, p in missing}))
        raise HostError(f"missing host tools for building images: {names}",
                        f"install them with: apt-get install {pkgs} (or run 'make deps')")
    if os.geteuid() != 0:
        raise HostError("building an image needs root (mmdebstrap chroot and file ownership)",
                        "run the build as root, e.g. with sudo")


class ImageBuilder:
    """Builds one ImageSpec into the store."""

    def __init__(self, store: Store, spec: ImageSpec, reporter: Reporter | None = None) -> None:
        self.store = store
        self.spec = spec
        self.reporter: Reporter = reporter or LogReporter()

    # -- the base layer: mmdebstrap ------------------------------------------------------

    def base_dir(self) -> Path:
        return self.store.cache.base_layer(self.spec.base_key).dir

    def ensure_base(self) -> Path:
        """The cached root filesystem tarball and kernel/busybox packages for this spec."""
        final = self.base_dir()
        if BaseLayerFiles(final).manifest.exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with self.store.staging_dir("base-") as stage_dir:
            stage = BaseLayerFiles(stage_dir)
            runner = Runner(stage.build_log, self.reporter)
            debs = stage.debs
            debs.mkdir()
            argv = mmdebstrap_argv(self.spec, stage.rootfs_tar, debs, stage_dir)
            with self.reporter.step("Installing Debian packages (mmdebstrap)"):
                runner.run("mmdebstrap", argv)
            got = sorted(p.name for p in (debs / "pinnace-debs").glob("*.deb"))
            if not any(n.startswith("linux-image-") for n in got) or not any(
                    n.startswith("busybox-static") for n in got):
                raise ImageBuildError("mmdebstrap", f"kernel or busybox package missing: {got}")
            for p in (debs / "pinnace-debs").glob("*.deb"):
                p.rename(debs / p.name)
            (debs / "pinnace-debs").rmdir()
            packages = (stage_dir / ".pinnace-packages").read_text().split()
            (stage_dir / ".pinnace-packages").unlink()
            write_json(stage.manifest, {
                "inputs": self.spec.base_inputs(), "packages": packages, "debs": got,
                "created": time.time(),
            })
            try:
                self.store.put_in_place(stage_dir, final, "the base layer")
            except FileExistsError:  # another build raced us and won; theirs is as good
                return final
        return final

    # -- the image -----------------------------------------------------------------------

    def build(self) -> Path:
        """Build the image unless the store has it; return its directory."""
        check_host_tools()
        digest = self.spec.digest
        files = self.store.image_files(digest)
        final = files.dir
        if files.manifest.exists():
            return final
        self.store.ensure()
        self.store.clean_tmp()
        with self.store.locked(("image", digest), timeout=3600):
            if files.manifest.exists():
                return final
            try:
                base = self.ensure_base()
                with self.store.staging_dir("image-") as stage:
                    self._build_into(stage, base)
                    self.store.put_in_place(stage, final, "the image")
            except OSError as exc:
                raise store_error(exc, "building the image (nothing was added to the store)"
                                  ) from None
        return final

    def _build_into(self, stage: Path, base: Path) -> None:
        out = ImageFiles(stage)
        layer = BaseLayerFiles(base)
        runner = Runner(out.build_log, self.reporter)
        work = stage / "work"  # scratch, removed before the image is renamed into place
        work.mkdir()
        base_manifest = json.loads(layer.manifest.read_text())
        root = work / "root"
        root.mkdir()
        with self.reporter.step("Unpacking the root filesystem"):
            runner.run("rootfs", ["tar", "--numeric-owner", "-xpf", str(layer.rootfs_tar),
                                  "-C", str(root)])
        if self.spec.kernel == "pinnace":
            kernel = self._own_kernel(out, root)
        else:
            kernel = self._debian_kernel(out, root, layer, runner, work)

        with self.reporter.step("Making the root filesystem (ext4)"):
            agent_dir = root / AGENT_DIR
            agent_dir.mkdir(parents=True, exist_ok=True)
            for src in agent_sources():
                shutil.copy2(src, agent_dir / src.name)
            (agent_dir / "agent").write_text(AGENT_SCRIPT)
            (agent_dir / "agent").chmod(0o755)
            # Compile the agent with the guest's own Python so first boots skip that.
            subprocess.run(["chroot", str(root), "python3", "-m", "compileall", "-q",
                            "/" + AGENT_DIR], check=False, capture_output=True)
            runner.run("depmod", ["depmod", "-b", str(root), str(kernel["kernel_version"])])
            # The live hostname, so that setting it (a clone, on restore) writes no file.
            with contextlib.suppress(FileNotFoundError):
                (root / "etc/hostname").unlink()
            (root / "etc/hostname").symlink_to("/proc/sys/kernel/hostname")
            (root / "etc/hosts").write_text(
                "127.0.0.1\tlocalhost\n127.0.1.1\tpinnace\n::1\tlocalhost ip6-localhost\n")
            (root / "etc/fstab").write_text("# the pinnace agent mounts what the guest needs\n")
            # Name servers are the agent's to set, per boot and per clone: on tmpfs, where
            # writing them costs no journal and a cold boot starts with none.
            with contextlib.suppress(FileNotFoundError):
                (root / "etc/resolv.conf").unlink()
            (root / "etc/resolv.conf").symlink_to("/run/resolv.conf")
            if self.spec.apt_ready:
                (root / APT_ASSUME_YES_FILE).write_text(APT_ASSUME_YES)
                # apt's caches of the lists made now, not by each machine's first apt-get
                # (seconds under TCG)
                runner.run("apt", ["chroot", str(root), "apt-cache", "gencaches"])
            if self.spec.init == "systemd":
                systemd.install(root, self.spec.digest)
            used = sum(p.lstat().st_size for p in root.rglob("*"))
            size = max(ROOTFS_MIN_SIZE, int(used * 1.5) + (512 << 20))
            size = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
            rootfs = out.rootfs
            runner.run("rootfs", [
                "mkfs.ext4", "-q", "-F", "-L", "pinnace-root", "-d", str(root),
                "-E", "lazy_itable_init=0,lazy_journal_init=0",
                str(rootfs), f"{size >> 20}M",
            ])
            shutil.rmtree(work)

        files = {p.name: p.stat().st_size for p in (out.kernel, out.initrd, out.rootfs)
                 if p.exists()}
        write_json(out.manifest, {
            "digest": self.spec.digest,
            "inputs": self.spec.inputs(),
            **kernel,
            "packages": base_manifest["packages"],
            "agent_version": _agent_version(),
            "files": files,
            "created": time.time(),
        })

    def _own_kernel(self, out: ImageFiles, root: Path) -> dict[str, object]:
        """Pinnace's kernel (built once per host) and its modules into the image."""
        from .kbuild import KernelBuilder

        builder = KernelBuilder(self.reporter)
        if builder.key != self.spec.kernel_key:
            raise ImageBuildError("kernel", "the kernel's inputs changed while building "
                                  "(linux-source or gcc upgraded?); run the build again")
        built = builder.ensure()
        with self.reporter.step(f"Adding pinnace's kernel {built.release}"):
            shutil.copyfile(built.files.vmlinux, out.kernel)
            if not K.has_pvh_entry(out.kernel.read_bytes()):
                raise ImageBuildError("kernel", f"{built.release} has no PVH entry note")
            shutil.copytree(built.files.modules / "lib/modules" / built.release,
                            root / "lib/modules" / built.release, symlinks=True)
        return {"kernel": "pinnace", "kernel_version": built.release,
                "kernel_key": built.key, "boot_args": self.spec.boot_args}

    def _debian_kernel(self, out: ImageFiles, root: Path, layer: BaseLayerFiles,
                       runner: Runner, work: Path) -> dict[str, object]:
        """Debian's kernel (vmlinux for PVH boot), its modules, and the initramfs that
        loads the virtio and ext4 ones."""
        debs = layer.debs
        kdeb = next(debs.glob("linux-image-*.deb"))
        bdeb = next(debs.glob("busybox-static_*.deb"))

        with self.reporter.step("Extracting the kernel (vmlinux for PVH boot)"):
            kroot = work / "kernel"
            runner.run("kernel", ["dpkg-deb", "-x", str(kdeb), str(kroot)])
            vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
            if not vmlinuz:
                raise ImageBuildError("kernel", f"{kdeb.name} has no /boot/vmlinuz-*")
            kver = vmlinuz[0].name.removeprefix("vmlinuz-")
            elf = K.extract_vmlinux(vmlinuz[0].read_bytes())
            if not K.has_pvh_entry(elf):
                raise ImageBuildError("kernel", f"{kver} has no PVH entry note (CONFIG_PVH)")
            out.kernel.write_bytes(elf)
            del elf
            runner.run("depmod", ["depmod", "-b", str(kroot), kver])
            mdir = kroot / "lib/modules" / kver
            deps = K.parse_modules_dep((mdir / "modules.dep").read_text())
            order = K.load_order(deps, K.INITRAMFS_MODULES)

        with self.reporter.step("Building the initramfs (busybox and virtio modules)"):
            broot = work / "busybox"
            runner.run("busybox", ["dpkg-deb", "-x", str(bdeb), str(broot)])
            pci_order = [m for m in K.load_order(deps, K.INITRAMFS_PCI_MODULES) if m not in order]
            out.initrd.write_bytes(
                initramfs(broot / "bin/busybox", mdir, kver, order + pci_order, deps))
            names = [K.module_name(m) for m in order + pci_order]
        K.copy_modules(kroot, root, kver)
        return {"kernel": "debian", "kernel_version": kver, "kernel_package": kdeb.name,
                "busybox_package": bdeb.name, "initramfs_modules": names,
                "boot_args": self.spec.boot_args}


FSTAB_EARLY = """\
sysfs /sys sysfs nosuid,nodev,noexec 0 0
devtmpfs /dev devtmpfs nosuid,mode=0755 0 0
"""
# The new root's mounts, made before switch_root so the agent starts with them.
FSTAB_NEWROOT = """\
proc /newroot/proc proc nosuid,nodev,noexec 0 0
sysfs /newroot/sys sysfs nosuid,nodev,noexec 0 0
devtmpfs /newroot/dev devtmpfs nosuid,mode=0755 0 0
devpts /newroot/dev/pts devpts nosuid,noexec,gid=5,mode=620,ptmxmode=666 0 0
tmpfs /newroot/dev/shm tmpfs nosuid,nodev,mode=1777 0 0
tmpfs /newroot/run tmpfs nosuid,nodev,mode=0755 0 0
tmpfs /newroot/tmp tmpfs nosuid,nodev,mode=1777 0 0
"""


def initramfs(busybox: Path, moddir: Path, kver: str, modules: Sequence[str],
              deps: dict[str, list[str]]) -> bytes:
    """The initramfs: busybox, /init, and the listed modules laid out for busybox modprobe."""
    buf = io.BytesIO()
    cw = CpioWriter(buf)
    for d in ("bin", "dev", "proc", "sys", "newroot", "etc"):
        cw.mkdir(d)
    cw.chardev("dev/console", 5, 1)
    cw.chardev("dev/null", 1, 3, 0o666)
    cw.file("bin/busybox", busybox.read_bytes(), 0o755)
    cw.symlink("bin/sh", "busybox")
    cw.file("init", init_script().read_bytes(), 0o755)
    base = f"lib/modules/{kver}"
    for path in modules:
        cw.file(f"{base}/{path}", (moddir / path).read_bytes())
    dep_lines = [f"{m}: {' '.join(deps.get(m, []))}".rstrip() for m in modules]
    cw.file(f"{base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    wanted = {n.replace("-", "_") for n in K.INITRAMFS_MODULES}
    boot = [K.module_name(m) for m in modules if K.module_name(m).replace("-", "_") in wanted]
    cw.file("etc/modules.boot", (" ".join(boot) + "\n").encode())
    cw.file("etc/modules.pci", (" ".join(K.INITRAMFS_PCI_MODULES) + "\n").encode())
    cw.file("etc/fstab.early", FSTAB_EARLY.encode())
    cw.file("etc/fstab.newroot", FSTAB_NEWROOT.encode())
    cw.close()
    return buf.getvalue()


def _agent_version() -> str:
    from ..agent.protocol import AGENT_VERSION

    return AGENT_VERSION
