from dataclasses import replace
from pathlib import Path

from pinnace.backends.base import NatNic
from pinnace.backends.qemu.command import LaunchSpec, build_argv, kernel_cmdline
from pinnace.store import MachineFiles


def spec(accel, tsc=2596124):
    return LaunchSpec(name="vm", files=MachineFiles(Path("/s/machines/vm")),
                      kernel=Path("/i/vmlinux"), initrd=Path("/i/initrd.img"), cpus=2,
                      memory_mib=768, accel=accel, cmdline="foo=1", tsc_khz=tsc)


def test_tcg_gets_the_host_tsc_frequency():
    line = kernel_cmdline(spec("tcg"))
    assert "tsc_early_khz=2596124 tsc=reliable" in line
    assert line.endswith("foo=1")
    assert "tsc_early_khz" not in kernel_cmdline(spec("kvm"))
    assert "tsc_early_khz" not in kernel_cmdline(spec("tcg", tsc=None))


def test_argv_shape():
    argv = build_argv("qemu", spec("kvm"))
    joined = " ".join(argv)
    assert "microvm,accel=kvm" in joined and argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-m") + 1] == "768M" and argv[argv.index("-smp") + 1] == "2"
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert joined.count("virtserialport") == 8
    assert "file=disk.qcow2,format=qcow2" in joined
    assert "unix:qmp.sock,server=on,wait=off" in joined
    assert build_argv("qemu", spec("tcg"))[build_argv("qemu", spec("tcg")).index("-cpu") + 1] == "max"


def test_paths_in_the_machine_folder_are_relative_to_it():
    """QEMU runs in the machine's folder: what lies inside it is named relative to it (so
    the folder can be renamed under a running QEMU), what lies elsewhere absolutely."""
    full = replace(
        spec("kvm"), memory_file=Path("/s/cache/ready/x/memory"), nat=NatNic("02:00:00:00:00:01", True),
        nics=("02:00:00:00:00:02", "02:00:00:00:00:03"),
        volumes=((Path("/s/volumes/v/volume.ext4"), False),), shares=((Path("/data,1"), True),))
    argv = build_argv("qemu", full)
    assert not [a for a in argv if "/s/machines" in a]
    opts = " ".join(argv)
    for form in ("path=serial.log,", "file=disk.qcow2,", "path=agent0.sock,", "path=agent7.sock,",
                 "local.path=n0.sock,", "remote.path=n0.peer", "local.path=n1.sock,",
                 "remote.path=n1.peer", "unix:qmp.sock,",
                 "mem-path=/s/cache/ready/x/memory,", "file=/s/volumes/v/volume.ext4,",
                 "path=/data,,1,"):  # (commas in an option list are doubled)
        assert form in opts, form
    assert argv[argv.index("-pidfile") + 1] == "pid"
    assert argv[argv.index("-kernel") + 1] == "/i/vmlinux"
    assert argv[argv.index("-initrd") + 1] == "/i/initrd.img"


def test_cwd_path_is_relative_inside_the_folder_and_absolute_elsewhere():
    f = MachineFiles(Path("/s/machines/vm"))
    assert f.cwd_path(f.disk) == "disk.qcow2"
    assert f.cwd_path(f.agent_sock(3)) == "agent3.sock"
    assert f.cwd_path(f.dir / "sub" / "x") == "sub/x"
    assert f.cwd_path(Path("/s/machines/vm2/disk.qcow2")) == "/s/machines/vm2/disk.qcow2"
    assert f.cwd_path(Path("/i/vmlinux")) == "/i/vmlinux"


def test_a_sandboxed_qemu_may_not_spawn_or_gain_privileges():
    assert "-sandbox" not in build_argv("qemu", spec("kvm"))
    argv = build_argv("qemu", replace(spec("kvm"), sandbox=True))
    opts = argv[argv.index("-sandbox") + 1].split(",")
    assert opts[0] == "on" and {"spawn=deny", "elevateprivileges=deny",
                                "obsolete=deny", "resourcecontrol=deny"} <= set(opts)


def test_whether_qemu_takes_the_sandbox_is_probed_once_per_binary(tmp_path):
    import shutil
    import subprocess

    from pinnace.backends.qemu import host
    from pinnace.store import CacheFiles

    cache = CacheFiles(tmp_path / "cache")
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    # (this host's QEMU is Debian's, built with seccomp)
    assert host.cached_sandbox(qemu, cache) is True
    assert host.cached_qemu_version(qemu, cache) == host.qemu_version(qemu)
    fake = tmp_path / "qemu"  # a QEMU without seccomp: the option is refused
    fake.write_text("#!/bin/sh\ncase \"$*\" in *-sandbox*) exit 1;; esac\n"
                    "echo 'QEMU emulator version 9.9.9'\n")
    fake.chmod(0o755)
    assert host.sandbox_supported(str(fake)) is False
    assert host.cached_sandbox(str(fake), cache) is False
    assert host.cached_qemu_version(str(fake), cache) == "9.9.9"
    fake.write_text("#!/bin/sh\nexit 0\n")  # changed: probed again (size, mtime)
    host.sandbox_supported.cache_clear()
    assert host.cached_sandbox(str(fake), cache) is True
    assert subprocess.run([str(fake)]).returncode == 0
