"""Cold boot: from `start` to agent ready and to the first exec result, against raw QEMU.

The floors are raw QEMU booting a kernel, with the same machine flags and command line,
until an initramfs's /init runs (a busybox script that prints a marker): what no amount
of work in pinnace's own code can beat with that kernel. Two floors: Debian's generic
kernel (the yardstick of issue 12) and pinnace's own. The rows alternate, so that a
shared host whose speed drifts weighs on each alike.

    python bench/boot.py [-n 10]

Needs the default image (pinnace's kernel) and builds an image named `debian-kernel`
(`--kernel debian`, the same packages) for Debian's kernel if the store has none.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pinnace import Pinnace
from pinnace.backends.qemu import command as qcmd
from pinnace.backends.qemu import host as qhost
from pinnace.images.cpio import CpioWriter

MARKER = b"PINNACE-FLOOR"


def stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def floor_initramfs(path: Path) -> Path:
    """A busybox /init that prints the marker and powers off (busybox-static: make deps)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        sys.exit("bench/boot.py: busybox is not installed (apt-get install busybox-static)")
    buf = io.BytesIO()
    cw = CpioWriter(buf)
    cw.mkdir("dev")
    cw.mkdir("bin")
    cw.chardev("dev/console", 5, 1)
    cw.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    cw.file("init", b"#!/bin/busybox sh\n/bin/busybox echo " + MARKER
            + b"\n/bin/busybox poweroff -f\n", 0o755)
    cw.close()
    path.write_bytes(buf.getvalue())
    return path


def raw_qemu_to_init(kernel: Path, initrd: Path, accel: str, tsc: int | None) -> float:
    spec = qcmd.LaunchSpec(name="floor", files=None, kernel=kernel,  # type: ignore[arg-type]
                           initrd=initrd, cpus=1, memory_mib=512, accel=accel, tsc_khz=tsc)
    argv = [
        qhost.qemu_binary(), "-machine", f"microvm,accel={accel},rtc=on,x-option-roms=off",
        "-cpu", qcmd.CPU_MODEL[accel], "-m", "512M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", qcmd.kernel_cmdline(spec),
    ]
    t0 = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if MARKER in line:
                took = time.monotonic() - t0
                break
        else:
            raise RuntimeError(f"raw QEMU never reached init with {kernel}")
        proc.kill()
    return took


def cold_boot(pn: Pinnace, image: str, name: str) -> tuple[float, float, str]:
    m = pn.machines.create(name, image=image)
    try:
        t0 = time.monotonic()
        st = m.start()
        ready = time.monotonic() - t0
        m.exec(["true"])
        return ready, time.monotonic() - t0, st.accel or "?"
    finally:
        m.delete(force=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10, help="boots per row")
    args = ap.parse_args()
    os.environ.setdefault("PINNACE_DEFAULT_NET", "restricted")
    with Pinnace() as pn:
        own = pn.images.get("default") if pn.images.list() else pn.images.build()
        if own.manifest.get("kernel") != "pinnace":
            sys.exit("bench/boot.py: the default image does not boot pinnace's kernel; "
                     "rebuild it with 'pinnace image build'")
        names = {n for img in pn.images.list() for n in img.names}
        debian = (pn.images.get("debian-kernel") if "debian-kernel" in names
                  else pn.images.build("debian-kernel", kernel="debian"))
        pn.store.tmp_dir.mkdir(parents=True, exist_ok=True)  # gc removes it if we die
        initrd = floor_initramfs(pn.store.tmp_dir / f"floor-{os.getpid()}-initrd.cpio")
        rows: dict[str, list[float]] = {k: [] for k in (
            "pinnace start -> agent ready", "pinnace start -> first exec result",
            "  same, Debian's kernel + initramfs", "floor: Debian's kernel -> /init",
            "floor: pinnace's kernel -> /init")}
        accel = "?"
        try:
            for _ in range(args.n):
                ready, first, accel = cold_boot(pn, "default", f"bench-boot-{os.getpid()}")
                rows["pinnace start -> agent ready"].append(ready)
                rows["pinnace start -> first exec result"].append(first)
                _, first_deb, _ = cold_boot(pn, "debian-kernel", f"bench-bootd-{os.getpid()}")
                rows["  same, Debian's kernel + initramfs"].append(first_deb)
                tsc = qhost.cached_tsc_khz(pn.store.cache)
                rows["floor: Debian's kernel -> /init"].append(
                    raw_qemu_to_init(debian.files.kernel, initrd, accel, tsc))
                rows["floor: pinnace's kernel -> /init"].append(
                    raw_qemu_to_init(own.files.kernel, initrd, accel, tsc))
        finally:
            initrd.unlink(missing_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"\ncold boot, {args.n} runs each, accel={accel}, {os.cpu_count()} CPUs ({cpu}), "
          f"QEMU {qhost.qemu_version(qhost.qemu_binary())}, Python {sys.version.split()[0]}")
    print(f"kernels: pinnace {own.manifest.get('kernel_version')}, "
          f"Debian {debian.manifest.get('kernel_version')}")
    print(f"{'measure':44} {'min':>7} {'median':>7} {'max':>7}")
    for label, xs in rows.items():
        lo, med, hi = stats(xs)
        print(f"{label:44} {lo:6.2f}s {med:6.2f}s {hi:6.2f}s")
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["pinnace start -> first exec result"] / med["floor: Debian's kernel -> /init"]
    print(f"{'first exec / floor of Debian kernel':44} {ratio:6.2f}x   (issue 12: at most 0.6x)")


if __name__ == "__main__":
    main()
