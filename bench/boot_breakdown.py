"""Where a cold boot goes: the guest's own clock at each step, the slowest kernel initcalls,
and the host's view, beside the raw-QEMU floor measured in the same run.

Each boot runs with ``initcall_debug``: the kernel times every initcall into its ring
buffer (not the console: the serial port is slow under TCG), read back with dmesg.

    python bench/boot_breakdown.py [-n 5] [--image debian-kernel]

An image of pinnace's kernel has no initramfs: its init is the agent itself.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from boot import floor_initramfs, raw_qemu_to_init

from pinnace import Pinnace
from pinnace.backends.qemu import host as qhost

# Guest-side marks, in the guest's clock (seconds since the kernel started).
MARKS = (
    ("kernel: init runs", r"\[\s*([\d.]+)\] Run \S+ as init process"),
    ("initramfs: start", r"pinnace-init: start at ([\d.]+) s"),
    ("initramfs: root mounted", r"pinnace-init: root mounted at ([\d.]+) s"),
    ("agent: python started, imports done", r"pinnace-agent: started at ([\d.]+) s"),
    ("agent: guest set up (mounts, hostname)", r"pinnace-agent: init done at ([\d.]+) s"),
    ("agent: listening on its ports", r"pinnace-agent: ready on \d+ ports at ([\d.]+) s"),
)
INITCALL = re.compile(r"initcall (\S+?)(?:\+0x\S+)? returned -?\d+ after (\d+) usecs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=5, help="boots")
    ap.add_argument("--cmdline", default="", help="more kernel arguments, to try one")
    ap.add_argument("--image", default="default", help="the image to boot")
    args = ap.parse_args()
    marks: dict[str, list[float]] = defaultdict(list)
    initcalls: dict[str, list[int]] = defaultdict(list)
    host_ready, accel = [], "?"
    with Pinnace() as pn:
        image = pn.images.get(args.image)
        for i in range(args.n):
            m = pn.machines.create(f"bench-bd-{os.getpid()}-{i}", image=args.image,
                                   cmdline=f"initcall_debug {args.cmdline}".strip(),
                                   net="none")
            t0 = time.monotonic()
            st = m.start()
            host_ready.append(time.monotonic() - t0)
            accel = st.accel or "?"
            text = m.exec(["dmesg"]).stdout_text + "\n" + m.serial_tail(400)
            for label, pattern in MARKS:
                found = re.search(pattern, text)
                if found:
                    marks[label].append(float(found.group(1)))
            total: dict[str, int] = defaultdict(int)
            for name, usecs in INITCALL.findall(text):
                total[name] += int(usecs)
            for name, usecs in total.items():
                initcalls[name].append(usecs)
            m.kill()
            m.delete()
        pn.store.tmp_dir.mkdir(parents=True, exist_ok=True)
        initrd = floor_initramfs(pn.store.tmp_dir / f"floor-{os.getpid()}-initrd.cpio")
        try:
            floor = [raw_qemu_to_init(image.files.kernel, initrd, accel,
                                      qhost.cached_tsc_khz(pn.store.cache))
                     for _ in range(args.n)]
        finally:
            initrd.unlink(missing_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"\ncold boot breakdown, {args.n} boots, accel={accel}, {os.cpu_count()} CPUs ({cpu}), "
          f"QEMU {qhost.qemu_version(qhost.qemu_binary())}, kernel args + initcall_debug "
          f"{args.cmdline}")
    print(f"{'step (guest clock, median)':44} {'at':>8} {'took':>8}")
    last = 0.0
    for label, _ in MARKS:
        if marks[label]:
            at = statistics.median(marks[label])
            print(f"{label:44} {at:7.2f}s {at - last:7.2f}s")
            last = at
    print(f"{'host: start -> agent ready (median)':44} {statistics.median(host_ready):7.2f}s")
    print(f"{'floor: raw QEMU start -> /init (median)':44} {statistics.median(floor):7.2f}s")
    print(f"\n{'slowest kernel initcalls (median)':44} {'took':>8}")
    ranked = sorted(initcalls.items(), key=lambda kv: -statistics.median(kv[1]))
    for name, xs in ranked[:12]:
        print(f"{name:44} {statistics.median(xs) / 1000:6.0f}ms")
    every = sum(statistics.median(xs) for xs in initcalls.values()) / 1e6
    print(f"{'all initcalls together':44} {every:7.2f}s")


if __name__ == "__main__":
    main()
