"""The pytest plugin: wall time per test of 20 tests that each use `vm` (a fresh machine,
restored from the ready snapshot, deleted after), run serially and with `-n 2`
(pytest-xdist), against the same 20 test bodies run on one long-lived machine (a
module-scoped fixture), and against the same session with the pinnace plugin doing
nothing (20 tests that boot nothing: pytest's own cost). Also the exec yardstick: one
`exec` on a running machine, through the API, in the same run.

    python bench/pytest.py [--tests 20] [--repeat 3] [--pool 0]

Each row is the median of ``--repeat`` whole sessions (each a fresh `pytest`
process); the ready snapshot is built before the first timed run. Machines get the
restricted NAT NIC (no way off the host). ``--pool N`` adds rows with a warm pool of N.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pinnace import Pinnace

BODY = '''
def body(m):
    assert m.exec(["uname", "-r"]).exit_code == 0
    m.exec("echo $RANDOM > /tmp/x")
    assert m.exec(["cat", "/tmp/x"]).exit_code == 0
'''

FRESH = BODY + '''
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_fresh(vm, i):
    body(vm)
'''

SHARED = BODY + '''
import pytest

@pytest.fixture(scope="module")
def machine(pinnace):
    [m] = pinnace.machines.run(rm=True)
    yield m
    m.delete(force=True)

@pytest.mark.parametrize("i", range({n}))
def test_shared(machine, i):
    body(machine)
'''

EMPTY = '''
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_nothing(i):
    pass
'''


def session(folder: Path, source: str, n: int, *args: str) -> float:
    """Wall seconds of one whole pytest session over ``source``."""
    test = folder / "test_bench.py"
    test.write_text(source.format(n=n))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(test), *args], cwd=folder, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench: a pytest session failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return took


def exec_yardstick(pn: Pinnace, repeat: int = 20) -> float:
    [m] = pn.machines.run(rm=True)
    try:
        m.exec(["true"])
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            m.exec(["true"])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        m.delete(force=True)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pool", type=int, default=0, help="also measure with a warm pool of N")
    args = ap.parse_args()
    os.environ.setdefault("PINNACE_DEFAULT_NET", "restricted")
    n = args.tests
    pn = Pinnace()
    pn.images.build()
    os.environ["PINNACE_POOL_SIZE"] = "0"  # (the store's own setting is left as it is)
    pn.pool.drain()
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="pinnace-bench-pytest-") as tmp:
        folder = Path(tmp)
        session(folder, FRESH, 1)  # the ready snapshot, built before anything is timed
        plan = [
            ("pytest alone: 20 tests that boot nothing", EMPTY, ()),
            ("one long-lived machine (module fixture), serial", SHARED, ()),
            ("`vm` per test, serial", FRESH, ()),
            ("`vm` per test, -n 2", FRESH, ("-n", "2")),
        ]
        if args.pool:
            plan += [(f"`vm` per test, serial, warm pool of {args.pool}", FRESH, ("pool",)),
                     (f"`vm` per test, -n 2, warm pool of {args.pool}", FRESH,
                      ("pool", "-n", "2"))]
        for label, source, extra in plan:
            pooled = "pool" in extra
            extra = tuple(a for a in extra if a != "pool")
            os.environ["PINNACE_POOL_SIZE"] = str(args.pool if pooled else 0)
            if pooled:
                pn.pool.fill(size=args.pool)
            times = [session(folder, source, n, *extra) for _ in range(args.repeat)]
            if pooled:
                pn.pool.drain()
            rows.append((label.replace("20", str(n)), times))
    os.environ["PINNACE_POOL_SIZE"] = "0"
    yard = exec_yardstick(pn)
    pn.close()

    base = statistics.median(rows[1][1]) / n
    print(f"\n{n} tests per session, median of {args.repeat} sessions; {os.cpu_count()} "
          f"CPUs ({cpu_model()}), accelerator as pinnace chose (TCG unless KVM works)\n")
    print(f"| {'session':<52} | {'wall (s)':>8} | {'per test (s)':>12} | "
          f"{'vs long-lived':>13} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 14}|{'-' * 15}|")
    for label, times in rows:
        wall = statistics.median(times)
        per = wall / n
        print(f"| {label:<52} | {wall:8.2f} | {per:12.3f} | {per / base:12.2f}x |")
    print(f"\nyardstick: one exec on a running machine, through the API: {yard * 1000:.1f} ms "
          "(median of 20)")


if __name__ == "__main__":
    main()
