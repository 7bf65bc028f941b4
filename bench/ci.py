"""The CI runner's overhead: per job (from asking for a machine to its first step, and
from its last step to the machine gone) and per step (a step that does nothing, beside
an exec of the same on a running machine), for a 10-step workflow and a matrix of 8;
what a cache adds to a job (a miss that saves, a hit that restores); and a job on the
systemd 'ubuntu' image. Yardsticks from the same run: an exec on a running machine, and
the floor of booting Debian's kernel to a trivial /init with plain QEMU.

    python bench/ci.py [--parallel N] [--no-ubuntu]

Machines get no way off the host (PINNACE_DEFAULT_NET=restricted); nothing here sends
a packet anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _stats import pct  # bench/ is on sys.path when a script here runs
from boot import floor_initramfs, raw_qemu_to_init

from pinnace import Pinnace
from pinnace.backends.qemu import host as qhost

TEN_STEPS = "on: push\njobs:\n  ten:\n    runs-on: ubuntu-latest\n    steps:\n" + "".join(
    "      - run: 'true'\n" for _ in range(10))
MATRIX = """on: push
jobs:
  m:
    runs-on: ubuntu-latest
    strategy:
      matrix:
        n: [1, 2, 3, 4, 5, 6, 7, 8]
    steps:
      - run: 'true'
"""
# A cache of 64 MiB of files (what a pip or ccache cache may hold, small).
CACHED = """checkout: false
caches: [{name: bench, path: ~/.cache/bench, key: "KEY"}]
steps:
  - test -f ~/.cache/bench/blob || head -c 67108864 /dev/urandom > ~/.cache/bench/blob
"""
PLAIN = "checkout: false\nsteps: ['true']\n"


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parallel", type=int, default=None,
                    help="jobs at once (default: the host's free memory and CPUs decide)")
    ap.add_argument("--no-ubuntu", action="store_true",
                    help="skip the job on the 'ubuntu' image (built first if missing)")
    args = ap.parse_args()
    os.environ.setdefault("PINNACE_DEFAULT_NET", "restricted")
    plat = {"ubuntu-latest": "default"}
    rows: list[tuple[str, str]] = []
    with Pinnace() as pn, tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ten, matrix = d / "ten.yml", d / "matrix.yml"
        ten.write_text(TEN_STEPS)
        matrix.write_text(MATRIX)
        pn.ci.run(ten, platforms=plat)  # (the ready snapshot exists after this)
        [m] = pn.machines.run(rm=True)  # the yardstick: an exec on a running machine
        try:
            accel = m.status().accel or "tcg"
            execs = []
            for _ in range(20):
                t = time.perf_counter()
                m.exec(["true"])
                execs.append((time.perf_counter() - t) * 1000)
        finally:
            m.delete(force=True)
        names = {n for img in pn.images.list() for n in img.names}
        debian = (pn.images.get("debian-kernel") if "debian-kernel" in names
                  else pn.images.build("debian-kernel", kernel="debian"))
        pn.store.tmp_dir.mkdir(parents=True, exist_ok=True)
        initrd = floor_initramfs(pn.store.tmp_dir / f"floor-{os.getpid()}-initrd.cpio")
        try:
            floors = [raw_qemu_to_init(debian.files.kernel, initrd, accel,
                                       qhost.cached_tsc_khz(pn.store.cache))
                      for _ in range(3)]
        finally:
            initrd.unlink(missing_ok=True)
        rows += [("yardstick: exec of true on a running machine, p50",
                  f"{statistics.median(execs):.1f} ms"),
                 ("yardstick: floor, Debian's kernel -> /init (plain QEMU), p50",
                  f"{statistics.median(floors):.2f} s")]

        r10, ten_wall = timed(lambda: pn.ci.run(ten, platforms=plat))
        [job] = r10.jobs
        steps = [s.seconds * 1000 for s in job.steps]
        rows += [("10-step job: start (machine asked for -> first step)", f"{job.start:.2f} s"),
                 ("10-step job: a step of true, p50", f"{statistics.median(steps):.1f} ms"),
                 ("10-step job: a step of true, p95", f"{pct(steps, 95):.1f} ms"),
                 ("10-step job: cleanup (last step -> machine gone)", f"{job.cleanup:.2f} s"),
                 ("10-step job: whole run, wall", f"{ten_wall:.2f} s")]

        r8, matrix_wall = timed(lambda: pn.ci.run(matrix, platforms=plat,
                                                  parallel=args.parallel))
        starts = [j.start for j in r8.jobs]
        rows += [("matrix of 8: start per job, p50 / max",
                  f"{statistics.median(starts):.2f} / {max(starts):.2f} s"),
                 ("matrix of 8: cleanup per job, p50",
                  f"{statistics.median([j.cleanup for j in r8.jobs]):.2f} s"),
                 ("matrix of 8: whole run, wall", f"{matrix_wall:.2f} s")]

        plain, cached = d / "plain.yml", d / "cached.yml"
        plain.write_text(PLAIN)
        cached.write_text(CACHED.replace("KEY", f"bench-{os.getpid()}-{time.time()}"))
        ok = r10.ok and r8.ok
        try:
            rp, plain_wall = timed(lambda: pn.ci.run(plain))
            miss, miss_wall = timed(lambda: pn.ci.run(cached))
            hit, hit_wall = timed(lambda: pn.ci.run(cached))
            ok = ok and rp.ok and miss.ok and hit.ok
        finally:
            pn.ci.remove_caches("bench")
        rows += [("job without a cache, wall", f"{plain_wall:.2f} s"),
                 ("  with a cache, miss (empty volume, 64 MiB saved), wall",
                  f"{miss_wall:.2f} s"),
                 ("  with a cache, hit (64 MiB volume copied in), wall", f"{hit_wall:.2f} s"),
                 ("  hit: start / cleanup",
                  f"{hit.jobs[0].start:.2f} / {hit.jobs[0].cleanup:.2f} s")]

        if not args.no_ubuntu:
            pn.images.ensure_preset("ubuntu")
            one = d / "one.yml"
            one.write_text("on: push\njobs:\n  u:\n    runs-on: ubuntu-latest\n    steps:\n"
                           "      - run: systemctl is-system-running\n"
                           + "".join("      - run: 'true'\n" for _ in range(5)))
            pn.ci.run(one)  # (its ready snapshot)
            ru, ubuntu_wall = timed(lambda: pn.ci.run(one))
            [u] = ru.jobs
            ok = ok and ru.ok
            rows += [("ubuntu (systemd) job: start", f"{u.start:.2f} s"),
                     ("ubuntu (systemd) job: a step of true, p50",
                      f"{statistics.median(s.seconds for s in u.steps[1:]) * 1000:.1f} ms"),
                     ("ubuntu (systemd) job: cleanup", f"{u.cleanup:.2f} s"),
                     ("ubuntu (systemd) job: whole run, wall", f"{ubuntu_wall:.2f} s")]
    rows.append(("all jobs succeeded", str(ok)))
    print(f"\nCI runner, {os.cpu_count()} CPUs, {accel} guests, matrix --parallel "
          f"{args.parallel or 'budget'}")
    print(f"| {'measure':62} | {'value':>14} |\n|{'-' * 64}|{'-' * 16}|")
    for k, v in rows:
        print(f"| {k:62} | {v:>14} |")


if __name__ == "__main__":
    main()
