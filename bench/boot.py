"""Cold boot: from `start` to agent ready and to the first exec result, against raw QEMU.

The floor is raw QEMU booting the same kernel and initramfs, with the same
machine flags, until the initramfs's /init runs (it prints a marker and powers
off): what no amount of work in pinnace's own code can beat.

    python bench/boot.py [-n 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from pinnace import Pinnace
from pinnace.backends.qemu import command as qcmd
from pinnace.backends.qemu import host as qhost


def stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def raw_qemu_to_init(image, accel: str, tsc: int | None) -> float:
    spec = qcmd.LaunchSpec(name="floor", files=None, kernel=image.files.kernel,  # type: ignore[arg-type]
                           initrd=image.files.initrd, cpus=1, memory_mib=512, accel=accel,
                           tsc_khz=tsc)
    argv = [
        qhost.qemu_binary(), "-machine", f"microvm,accel={accel},rtc=on,x-option-roms=off",
        "-cpu", "host" if accel == "kvm" else "max", "-m", "512M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(image.files.kernel), "-initrd", str(image.files.initrd),
        "-append", qcmd.kernel_cmdline(spec) + " pinnace.probe=1",
    ]
    t0 = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"PINNACE-PROBE-OK" in line:
                took = time.monotonic() - t0
                break
        else:
            raise RuntimeError("raw QEMU never reached init")
        proc.kill()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10, help="boots per row")
    args = ap.parse_args()
    with Pinnace() as pn:
        image = pn.images.get("default") if pn.images.list() else pn.images.build()
        ready, first_exec, accel = [], [], "?"
        name = f"bench-boot-{os.getpid()}"
        for _ in range(args.n):
            m = pn.machines.create(name)
            t0 = time.monotonic()
            st = m.start()
            ready.append(time.monotonic() - t0)
            m.exec(["true"])
            first_exec.append(time.monotonic() - t0)
            accel = st.accel or "?"
            m.kill()
            m.delete()
        tsc = qhost.cached_tsc_khz(pn.store.cache)
        floor = [raw_qemu_to_init(image, accel, tsc) for _ in range(args.n)]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"\ncold boot, {args.n} runs each, accel={accel}, {os.cpu_count()} CPUs ({cpu}), "
          f"QEMU {qhost.qemu_version(qhost.qemu_binary())}, Python {sys.version.split()[0]}")
    print(f"{'measure':44} {'min':>7} {'median':>7} {'max':>7}")
    for label, xs in (("pinnace start -> agent ready", ready),
                      ("pinnace start -> first exec result", first_exec),
                      ("floor: raw QEMU start -> initramfs /init", floor)):
        lo, med, hi = stats(xs)
        print(f"{label:44} {lo:6.2f}s {med:6.2f}s {hi:6.2f}s")


if __name__ == "__main__":
    main()
