"""The guest kernel: an ELF vmlinux for direct PVH boot, and the modules it needs.

Debian ships a compressed bzImage (vmlinuz). QEMU's microvm can boot an
uncompressed ELF vmlinux straight through its PVH entry point, which skips the
real-mode setup and the in-guest decompression (measured under TCG: ~2.4 s to
init instead of ~6 s).
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

from ..errors import ImageBuildError

# Compression magics a bzImage payload may start with, tried in order.
_XZ = b"\xfd7zXZ\x00"
_GZIP = b"\x1f\x8b\x08"
_ZSTD = b"\x28\xb5\x2f\xfd"
XEN_ELFNOTE_PHYS32_ENTRY = 18

# What the initramfs loads so the root disk and the agent channel appear: the
# virtio-mmio transport, block, console, net, rng, and ext4 (with dependencies).
INITRAMFS_MODULES = (
    "virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng",
    "crc32c_generic", "ext4",
)
# Loaded only when the machine has a PCI bus (microvm has none).
INITRAMFS_PCI_MODULES = ("virtio_pci",)

# Module trees copied into the root filesystem for later use (modprobe in the guest).
ROOTFS_MODULE_DIRS = (
    "kernel/net", "kernel/fs", "kernel/lib", "kernel/crypto", "kernel/arch",
    "kernel/drivers/virtio", "kernel/drivers/block", "kernel/drivers/char",
    "kernel/drivers/net/wireguard", "kernel/drivers/net/bonding", "kernel/drivers/net/team",
    "kernel/drivers/net/ipvlan", "kernel/drivers/net/vxlan",
)
ROOTFS_MODULE_GLOBS = ("kernel/drivers/net/*.ko",)


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """Decompress the ELF kernel inside a bzImage, trying each compression it may use."""
    if vmlinuz[:4] == b"\x7fELF":
        return vmlinuz
    for magic, decompress in ((_XZ, _unxz), (_ZSTD, _unzstd), (_GZIP, _gunzip)):
        start = vmlinuz.find(magic)
        while start >= 0:
            try:
                out = decompress(vmlinuz[start:])
            except (lzma.LZMAError, OSError, EOFError, subprocess.CalledProcessError):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            start = vmlinuz.find(magic, start + 1)
    raise ImageBuildError("kernel", "no compressed ELF kernel found inside vmlinuz")


def _unxz(data: bytes) -> bytes:
    # The payload is followed by other data: a streaming decompressor stops at its end.
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return gzip.GzipFile(fileobj=__import__("io").BytesIO(data)).read()


def _unzstd(data: bytes) -> bytes:
    if shutil.which("zstd") is None:
        raise OSError("zstd is not installed")
    proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True)
    return proc.stdout  # trailing garbage makes zstd complain; the output is still whole


def has_pvh_entry(elf: bytes) -> bool:
    """True if the ELF carries a XEN_ELFNOTE_PHYS32_ENTRY note (PVH boot)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", elf, base)
        (p_filesz,) = struct.unpack_from("<Q", elf, base + 0x20)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + _align4(namesz) + _align4(descsz)
    return False


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep as {module path: [dependency paths, in the order modprobe lists them]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base


def load_order(deps: dict[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """Module paths to insmod, dependencies first, each once; missing modules are skipped.

    Built-in modules have no entry in modules.dep, which is fine: the kernel has them.
    """
    by_name: dict[str, str] = {}
    for path in deps:
        by_name.setdefault(module_name(path), path)
        by_name.setdefault(module_name(path).replace("-", "_"), path)
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        # modules.dep lists the deepest dependency last: load from the end.
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in wanted:
        found = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if found is not None:
            visit(found)
    return order


def copy_modules(src_root: Path, dst_root: Path, kver: str) -> int:
    """Copy the module trees the guest may want into a root filesystem; return bytes copied."""
    src = src_root / "lib/modules" / kver
    dst = dst_root / "lib/modules" / kver
    total = 0
    paths: list[Path] = []
    for rel in ROOTFS_MODULE_DIRS:
        if (src / rel).is_dir():
            paths += [p for p in (src / rel).rglob("*") if p.is_file()]
    for pattern in ROOTFS_MODULE_GLOBS:
        paths += [p for p in src.glob(pattern) if p.is_file()]
    for p in paths:
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
        total += p.stat().st_size
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / meta).exists():
            shutil.copy2(src / meta, dst / meta)
    return total
