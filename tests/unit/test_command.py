from pathlib import Path

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
    assert "file=/s/machines/vm/disk.qcow2,format=qcow2" in joined
    assert "unix:/s/machines/vm/qmp.sock,server=on,wait=off" in joined
    assert build_argv("qemu", spec("tcg"))[build_argv("qemu", spec("tcg")).index("-cpu") + 1] == "max"
