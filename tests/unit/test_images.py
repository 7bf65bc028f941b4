"""Kernel extraction, module ordering, the initramfs archive, the image digest."""

import io
import lzma
import struct

import pytest

from pinnace.images import build as B
from pinnace.images import kbuild
from pinnace.images import kernel as K
from pinnace.images.cpio import CpioWriter


@pytest.fixture(autouse=True)
def _no_host_kernel_source(monkeypatch):
    """The own kernel's key needs linux-source and gcc on the host: unit tests must not."""
    monkeypatch.setattr(kbuild, "current_kernel_key", lambda: "k" + "0" * 24)


def elf_with_note(note_type):
    name = b"Xen\0"
    desc = b"\0" * 8
    note = struct.pack("<III", len(name), len(desc), note_type) + name + desc
    phoff, phentsize = 64, 56
    notes_off = phoff + phentsize
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4] = 2
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, phentsize, 1)
    ph = bytearray(phentsize)
    struct.pack_into("<IIQ", ph, 0, 4, 0, notes_off)
    struct.pack_into("<Q", ph, 0x20, len(note))
    return bytes(header + ph + note)


def test_pvh_note_detection():
    assert K.has_pvh_entry(elf_with_note(K.XEN_ELFNOTE_PHYS32_ENTRY))
    assert not K.has_pvh_entry(elf_with_note(5))
    assert not K.has_pvh_entry(b"MZ not an elf")


def test_extract_vmlinux_from_xz_bzimage():
    elf = elf_with_note(18) + b"body" * 1000
    bzimage = b"setup code \xfd7zXZ fake magic " + lzma.compress(elf) + b"trailing data"
    assert K.extract_vmlinux(bzimage) == elf


def test_load_order_puts_dependencies_first_once():
    deps = K.parse_modules_dep(
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko\n"
    )
    order = K.load_order(deps, ["virtio_blk", "ext4", "virtio_rng", "not_a_module"])
    names = [K.module_name(p) for p in order]
    assert names == ["virtio_ring", "virtio", "virtio_blk", "jbd2", "mbcache", "crc16", "ext4",
                     "virtio-rng"]


def parse_cpio(data):
    entries, pos = {}, 0
    while True:
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos: pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (fields[9], fields[10]))


def test_cpio_round_trip():
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("a/b/c.txt", b"hello", 0o600)
    w.symlink("bin/sh", "busybox")
    w.chardev("dev/console", 5, 1)
    w.close()
    entries = parse_cpio(buf.getvalue())
    assert entries["a/b/c.txt"][1] == b"hello"
    assert entries["a/b/c.txt"][0] & 0o777 == 0o600
    assert "a" in entries and "a/b" in entries
    assert entries["bin/sh"][1] == b"busybox"
    assert entries["dev/console"][2] == (5, 1)


def test_digest_follows_inputs():
    a = B.ImageSpec.create()
    assert a.digest == B.ImageSpec.create().digest
    assert B.ImageSpec.create(["curl"]).digest != a.digest
    assert B.ImageSpec.create(["curl"]).base_key != a.base_key
    assert B.ImageSpec.create(mirror="http://example.invalid/debian").digest != a.digest
    assert "agent" in a.inputs()
    debian = B.ImageSpec.create(kernel="debian")
    assert "init" in debian.inputs() and debian.digest != a.digest
    assert a.inputs()["kernel"] == a.kernel_key and a.kernel_key.startswith("k")


def test_unknown_kernel_is_refused():
    from pinnace.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kernel.*'pinnace'.*'debian'"):
        B.ImageSpec.create(kernel="linux")


def test_bad_package_names_are_refused():
    from pinnace.errors import ConfigError

    for bad in ("Curl", "a b", "x;rm", "-o"):
        with pytest.raises(ConfigError, match="package"):
            B.ImageSpec.create([bad])
