"""The CI runner's overhead: per job (from asking for a machine to its first step, and
from its last step to the machine gone) and per step (a step that does nothing, beside
an exec of the same on a running machine), for a 10-step workflow and a matrix of 8.

    python bench/ci.py [--parallel 2]

The machines use pinnace's default NAT NIC setting (tests and benches set restricted:
no way off the host); nothing here sends a packet anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _stats import pct  # bench/ is on sys.path when a script here runs

from pinnace import Pinnace

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("PINNACE_DEFAULT_NET", "restricted")
    plat = {"ubuntu-latest": "default"}
    with Pinnace() as pn, tempfile.TemporaryDirectory() as tmp:
        ten, matrix = Path(tmp) / "ten.yml", Path(tmp) / "matrix.yml"
        ten.write_text(TEN_STEPS)
        matrix.write_text(MATRIX)
        pn.ci.run(ten, platforms=plat)  # (the ready snapshot exists after this)
        [m] = pn.machines.run(rm=True)  # the yardstick: an exec on a running machine
        try:
            execs = []
            for _ in range(20):
                t = time.perf_counter()
                m.exec(["true"])
                execs.append((time.perf_counter() - t) * 1000)
        finally:
            m.delete(force=True)
        t = time.perf_counter()
        r10 = pn.ci.run(ten, platforms=plat)
        ten_wall = time.perf_counter() - t
        t = time.perf_counter()
        r8 = pn.ci.run(matrix, platforms=plat, parallel=args.parallel)
        matrix_wall = time.perf_counter() - t
    [job] = r10.jobs
    steps = [s.seconds * 1000 for s in job.steps]
    starts = [j.start for j in r8.jobs]
    cleanups = [j.cleanup for j in r8.jobs]
    print(f"\nCI runner, {os.cpu_count()} CPUs, TCG guests, matrix --parallel {args.parallel}")
    print(f"{'measure':56} {'value':>10}")
    print(f"{'yardstick: exec of true on a running machine, p50':56} "
          f"{statistics.median(execs):7.1f} ms")
    print(f"{'10-step job: start (machine asked for -> first step)':56} {job.start:7.2f} s")
    print(f"{'10-step job: a step of true, p50':56} {statistics.median(steps):7.1f} ms")
    print(f"{'10-step job: a step of true, p95':56} {pct(steps, 95):7.1f} ms")
    print(f"{'10-step job: cleanup (last step -> machine gone)':56} {job.cleanup:7.2f} s")
    print(f"{'10-step job: whole run, wall':56} {ten_wall:7.2f} s")
    print(f"{'matrix of 8: start per job, p50 / max':56} "
          f"{statistics.median(starts):5.2f} / {max(starts):.2f} s")
    print(f"{'matrix of 8: cleanup per job, p50':56} {statistics.median(cleanups):7.2f} s")
    print(f"{'matrix of 8: whole run, wall':56} {matrix_wall:7.2f} s")
    print(f"{'all jobs succeeded':56} {r10.ok and r8.ok!s:>10}")


if __name__ == "__main__":
    main()
