"""Kernel extraction, module ordering, the initramfs archive, the image digest."""

import io
import lzma
import struct
from pathlib import Path

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


def _inputs_before_init_and_apt_ready(spec):
    """An image's inputs as pinnace computed them before init= and apt_ready existed."""
    base = {"builder": B.BUILDER_VERSION, "suite": spec.suite, "mirror": spec.mirror,
            "security_mirror": spec.security_mirror,
            "packages": sorted(set(B.BASE_PACKAGES) | set(spec.packages)),
            "kernel_package": spec.kernel_package}
    common = {**base, "agent": B.source_digest(B.agent_sources()),
              "rootfs_layout": B.ROOTFS_LAYOUT}
    if spec.kernel == "pinnace":
        return base, {**common, "kernel": spec.kernel_key,
                      "boot": "root=/dev/vda rw rootfstype=ext4 init=/usr/lib/pinnace/agent"}
    return base, {**common, "init": B.source_digest([B.init_script()]),
                  "initramfs_modules": [*K.INITRAMFS_MODULES, *K.INITRAMFS_PCI_MODULES]}


@pytest.mark.parametrize("kernel", ["pinnace", "debian"])
@pytest.mark.parametrize("packages", [(), ("curl", "jq")])
def test_default_init_and_apt_keep_the_digests_of_existing_images(kernel, packages):
    spec = B.ImageSpec.create(packages, kernel=kernel)
    explicit = B.ImageSpec.create(packages, kernel=kernel, init="agent", apt_ready=False)
    base, inputs = _inputs_before_init_and_apt_ready(spec)
    assert spec.base_inputs() == base and spec.inputs() == inputs
    assert spec.base_key == B._digest(base) and spec.digest == B._digest(inputs)
    assert (explicit.digest, explicit.base_key) == (spec.digest, spec.base_key)
    assert "init_system" not in spec.inputs() and "apt_ready" not in spec.inputs()
    assert "apt_lists" not in spec.base_inputs()
    assert spec.boot_args == ("" if kernel == "debian" else B.OWN_KERNEL_ARGS)


def test_systemd_changes_packages_boot_and_digest():
    from pinnace.images import systemd

    default = B.ImageSpec.create()
    sd = B.ImageSpec.create(init="systemd")
    assert sd.digest != default.digest and sd.base_key != default.base_key
    assert set(B.SYSTEMD_PACKAGES) <= set(sd.all_packages)
    assert not set(B.SYSTEMD_PACKAGES) & set(default.all_packages)
    assert sd.inputs()["init_system"] == {"name": "systemd",
                                          "setup": B.source_digest([systemd.source()])}
    assert sd.inputs()["boot"] == sd.boot_args
    assert sd.boot_args.startswith(B.OWN_KERNEL_ROOT + " init=/lib/systemd/systemd")
    assert "/usr/lib/pinnace/agent" not in sd.boot_args
    debian = B.ImageSpec.create(init="systemd", kernel="debian")
    assert debian.boot_args == systemd.KERNEL_ARGS
    assert debian.digest != B.ImageSpec.create(kernel="debian").digest
    # the same packages asked for by name are not the same image
    assert B.ImageSpec.create(list(B.SYSTEMD_PACKAGES)).digest != sd.digest


def test_apt_ready_changes_base_layer_and_digest():
    default = B.ImageSpec.create()
    apt = B.ImageSpec.create(apt_ready=True)
    assert apt.base_inputs()["apt_lists"] is True and apt.base_key != default.base_key
    assert apt.inputs()["apt_ready"] == B.APT_ASSUME_YES and apt.digest != default.digest
    assert "Assume-Yes" in B.APT_ASSUME_YES and B.APT_ASSUME_YES_FILE.startswith(
        "etc/apt/apt.conf.d/")
    both = B.ImageSpec.create(init="systemd", apt_ready=True)
    assert len({both.digest, apt.digest, default.digest,
                B.ImageSpec.create(init="systemd").digest}) == 4


def test_mmdebstrap_keeps_apt_lists_only_when_apt_ready(tmp_path):
    def argv(**kw):
        return B.mmdebstrap_argv(B.ImageSpec.create(**kw), tmp_path / "root.tar",
                                 tmp_path / "debs", tmp_path)

    plain, ready = argv(), argv(apt_ready=True)
    assert not any(a.startswith("--skip") for a in plain)
    assert "--skip=cleanup/apt/lists" in ready
    assert [a for a in ready if a != "--skip=cleanup/apt/lists"] == plain
    assert plain[-5:-3] == ["bookworm", str(tmp_path / "root.tar")]
    include = next(a for a in argv(init="systemd") if a.startswith("--include="))
    assert {"systemd", "systemd-sysv", "dbus", "python3"} <= set(include[10:].split(","))


def test_bad_init_and_apt_ready_are_refused():
    from pinnace.errors import ConfigError

    with pytest.raises(ConfigError, match=r"invalid init 'upstart'.*'agent'.*'systemd'"):
        B.ImageSpec.create(init="upstart")
    with pytest.raises(ConfigError, match="apt_ready"):
        B.ImageSpec.create(apt_ready="yes")  # type: ignore[arg-type]


def test_systemd_setup_is_laid_into_the_root(tmp_path):
    from pinnace.images import systemd

    root = tmp_path / "root"
    for d in ("etc/systemd/system", "usr", "var"):
        (root / d).mkdir(parents=True)
    (root / "etc/systemd/system/getty.target").write_text("an old file\n")
    systemd.install(root, "ab" * 16)
    unit = root / "etc/systemd/system/pinnace-agent.service"
    assert "ExecStart=/usr/lib/pinnace/agent" in unit.read_text()
    assert "DefaultDependencies=no" in unit.read_text()
    wants = root / "etc/systemd/system/sysinit.target.wants/pinnace-agent.service"
    assert wants.readlink() == Path("/etc/systemd/system/pinnace-agent.service")
    for name in ("getty.target", "systemd-timesyncd.service", "systemd-networkd.service",
                 "apt-daily.timer", "systemd-networkd-wait-online.service"):
        assert (root / "etc/systemd/system" / name).readlink() == Path("/dev/null"), name
    assert not (root / "etc/systemd/system/systemd-journald.service").exists()
    generator = root / "etc/systemd/system-generators/systemd-getty-generator"
    assert generator.readlink() == Path("/dev/null")
    usr = (root / "usr").stat().st_mtime_ns
    for mark in (root / "etc/.updated", root / "var/.updated"):  # ConditionNeedsUpdate: no
        assert mark.stat().st_mtime_ns > usr and f"TIMESTAMP_NSEC={usr}" in mark.read_text()
    machine_id = (root / "etc/machine-id").read_text().strip()
    assert len(machine_id) == 32 and int(machine_id, 16)
    assert machine_id == systemd.machine_id("ab" * 16) != systemd.machine_id("cd" * 16)
    systemd.install(root, "ab" * 16)  # again: links replaced, not refused


def test_presets_name_real_inputs():
    from pinnace.images import presets

    runner = presets.PRESETS["ubuntu"]
    assert runner.init == "systemd" and runner.apt_ready
    assert runner.packages == presets.RUNNER_PACKAGES
    spec = B.ImageSpec.create(runner.packages, init=runner.init, apt_ready=runner.apt_ready)
    assert {"build-essential", "cmake", "clang", "git", "python3-venv"} <= set(spec.packages)


@pytest.fixture
def fake_images(tmp_path, monkeypatch):
    """Images on a store whose builds only lay down a manifest (ImageBuilder.build's
    result, without mmdebstrap); the specs built are in ``.built``."""
    from pinnace.images import Images
    from pinnace.store import Store, write_json

    store = Store(str(tmp_path / "home"))
    store.ensure()
    images = Images(store)
    images.built = []

    def fake_build(self):  # what ImageBuilder.build leaves: the image's folder
        images.built.append(self.spec)
        files = store.image_files(self.spec.digest)
        files.dir.mkdir(parents=True, exist_ok=True)
        write_json(files.manifest, {"digest": self.spec.digest, "inputs": self.spec.inputs()})
        return files.dir

    monkeypatch.setattr(B.ImageBuilder, "build", fake_build)
    monkeypatch.setattr(B, "check_host_tools", lambda: None)
    return images


def test_ensure_preset_builds_only_when_missing_or_stale(fake_images):
    from pinnace.errors import ConfigError
    from pinnace.images import presets

    images, built, store = fake_images, fake_images.built, fake_images.store
    preset = presets.PRESETS["ubuntu"]
    spec = B.ImageSpec.create(preset.packages, init=preset.init, apt_ready=preset.apt_ready)
    image = images.ensure_preset("ubuntu")
    assert image.digest == spec.digest and image.names == ("ubuntu",) and built == [spec]
    assert images.ensure_preset("ubuntu").digest == spec.digest and len(built) == 1
    store.image_ref("ubuntu").write_text("0" * 32 + "\n")  # an image of other inputs
    assert images.ensure_preset("ubuntu").digest == spec.digest and len(built) == 2
    assert image.manifest["inputs"]["init_system"]["name"] == "systemd"
    with pytest.raises(ConfigError, match=r"invalid preset 'debian'.*ubuntu"):
        images.ensure_preset("debian")


def test_ensure_preset_leaves_a_users_own_image_and_needs_no_toolchain_to_use_one(
        fake_images, monkeypatch):
    from pinnace.errors import HostError
    from pinnace.images import presets

    images, built = fake_images, fake_images.built
    mine = images.build("ubuntu", ["curl"])  # the user's own image, named ubuntu
    assert images.ensure_preset("ubuntu").digest == mine.digest and len(built) == 1
    images.remove("ubuntu")
    preset = images.ensure_preset("ubuntu")
    assert preset.digest != mine.digest and len(built) == 2
    monkeypatch.setattr(kbuild, "current_kernel_key", lambda: "k" + "1" * 24)  # new kernel
    assert images.ensure_preset("ubuntu").digest != preset.digest and len(built) == 3

    def no_source():
        raise HostError("the kernel source package linux-source-6.1 is not installed", "")

    monkeypatch.setattr(kbuild, "current_kernel_key", no_source)
    assert images.ensure_preset("ubuntu").names == ("ubuntu",) and len(built) == 3
    with pytest.raises(HostError, match="linux-source"):  # (building again needs it)
        images.ensure_preset("ubuntu", refresh=True)
    assert presets.PRESETS["ubuntu"].init == "systemd"
