"""The QEMU command line for a machine: a pure function of its launch spec."""

from __future__ import annotations

import shlex
from pathlib import Path

from ...agent.protocol import AGENT_PORTS, PORT_NAME
from ..base import LaunchSpec, NatNic, share_tag, volume_serial

# Kernel arguments every guest gets. pci=off: microvm has no PCI bus, so do not
# probe one; i8042.*: there is no PS/2 controller either; panic=-1 with
# -no-reboot turns a guest panic into QEMU exiting, which the host notices;
# cryptomgr.notests: the kernel's self-tests of its crypto algorithms took 0.8 s of a
# 2.3 s kernel boot under TCG (docs/boot.md), on every boot, to check what Debian
# has already tested.
BASE_CMDLINE = (
    "console=ttyS0 loglevel=4 pci=off panic=-1 reboot=t "
    "i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp cryptomgr.notests"
)


def nic_id(index: int) -> str:
    """The QEMU device id of NIC ``index`` on a virtual network (for QMP set_link)."""
    return f"nic{index}"


CPU_MODEL = {"kvm": "host", "tcg": "max"}
# What a saved device state depends on besides CPUs and memory: change the device
# list below and this string, and old snapshots are rebuilt rather than mis-loaded.
DEVICES = f"microvm:virtio-blk,virtio-rng,virtio-serial*{AGENT_PORTS},isa-serial"


def kernel_cmdline(spec: LaunchSpec) -> str:
    words = [BASE_CMDLINE, f"pinnace.hostname={spec.name}"]
    if spec.kernel_args:
        words.append(spec.kernel_args)
    if spec.accel == "tcg":
        # TCG does not emulate speculative execution, so the guest's mitigations
        # for it only cost time.
        words.append("mitigations=off")
        if spec.tsc_khz:
            # Without these, a TCG guest on a busy host hangs calibrating its TSC.
            words.append(f"tsc_early_khz={spec.tsc_khz} tsc=reliable")
    if spec.cmdline:
        words.append(spec.cmdline)
    return " ".join(words)


# seccomp: QEMU may not start programs (its state goes to and from files as descriptors,
# not through exec:), gain privileges, call obsolete syscalls or change its scheduling.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def build_argv(binary: str, spec: LaunchSpec) -> list[str]:
    """QEMU's argv. QEMU runs in the machine's folder (its working directory), and every
    path inside that folder is given relative to it (:func:`here`): the folder can then
    be renamed while QEMU runs, and QEMU still finds its files and sockets there."""
    f = spec.files

    def here(path: Path) -> str:
        """A path as QEMU's argv names it, inside an option list (commas doubled)."""
        return _comma(f.cwd_path(path))

    if spec.memory_file is not None:
        share = "on" if spec.memory_shared else "off"
        backend = (f"memory-backend-file,id=mem,size={spec.memory_mib}M,"
                   f"mem-path={here(spec.memory_file)},share={share}")
    else:
        backend = f"memory-backend-ram,id=mem,size={spec.memory_mib}M"
    argv = [
        binary,
        "-name", f"pinnace-{spec.name},debug-threads=on",
        "-machine", f"microvm,accel={spec.accel},rtc=on,isa-serial=on,x-option-roms=off,"
                    "memory-backend=mem",
        "-cpu", CPU_MODEL[spec.accel],
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-object", backend,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *(["-sandbox", SANDBOX] if spec.sandbox else []),
        "-kernel", f.cwd_path(spec.kernel),
        *(["-initrd", f.cwd_path(spec.initrd)] if spec.initrd is not None else []),
        "-append", kernel_cmdline(spec),
        "-chardev", f"file,id=serial0,path={here(f.serial_log)},append=on",
        "-serial", "chardev:serial0",
        "-drive", f"id=root,file={here(f.disk)},format=qcow2,if=none,discard=unmap,cache=writeback",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        "-device", f"virtio-serial-device,max_ports={spec.agent_ports + 1}",
    ]
    for port in range(spec.agent_ports):
        argv += [
            "-chardev", f"socket,id=agent{port},path={here(f.agent_sock(port))},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent{port},name={PORT_NAME.format(port)},nr={port + 1}",
        ]
    if spec.nat is not None:
        fwd = "".join(f",hostfwd={proto}:{ip}:{hport}-:{gport}"
                      for proto, ip, hport, gport in spec.nat.forwards)
        argv += ["-netdev", f"user,id=nat,restrict={'on' if spec.nat.restrict else 'off'}{fwd}",
                 "-device", f"virtio-net-device,netdev=nat,mac={spec.nat.mac},id=nic-nat"]
    for i, mac in enumerate(spec.nics):
        argv += ["-netdev", f"dgram,id=net{i},local.type=unix,local.path={here(f.nic_sock(i))},"
                            f"remote.type=unix,remote.path={here(f.nic_peer(i))}",
                 "-device", f"virtio-net-device,netdev=net{i},mac={mac},id={nic_id(i)}"]
    for i, (path, ro) in enumerate(spec.volumes):
        argv += ["-drive", f"id=vol{i},file={here(path)},format=raw,if=none,"
                           f"readonly={'on' if ro else 'off'},cache=writeback,discard=unmap",
                 "-device", f"virtio-blk-device,drive=vol{i},serial={volume_serial(i)}"]
    for i, (path, ro) in enumerate(spec.shares):
        # mapped-xattr: the guest's owners and modes live in xattrs; on the host, files
        # belong to the user running QEMU, so a guest cannot plant setuid files there.
        argv += ["-fsdev", f"local,id=fs{i},path={here(path)},security_model=mapped-xattr"
                           f"{',readonly=on' if ro else ''}",
                 "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={share_tag(i)}"]
    argv += [
        "-qmp", f"unix:{here(f.qmp_sock)},server=on,wait=off",
        "-pidfile", f.cwd_path(f.pid),  # not an option list: no commas doubled
    ]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    argv += list(spec.extra_args)
    return argv


def _comma(path: str) -> str:
    """A path inside a QEMU option list: commas are doubled."""
    return str(path).replace(",", ",,")


def devices_key(nat: bool, nics: int, volumes: int, shares: int) -> str:
    """The device list a saved state depends on: it loads only into a QEMU with the same."""
    return f"{DEVICES},nat*{int(nat)},dgram*{nics},blk*{volumes},9p*{shares}"


def render(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


__all__ = ["CPU_MODEL", "LaunchSpec", "NatNic", "build_argv", "devices_key", "kernel_cmdline",
           "nic_id", "render"]
