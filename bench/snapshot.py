"""Snapshots: command to first exec result, cold boot against restore; restore time
against RAM size; memory (PSS) of live clones against cold-booted machines; and
`pinnace run --rm -- true` through the CLI, from process start to exit: plain, with a
shared folder, with a volume, and from the warm pool, beside `pinnace exec NAME -- true`
on a running machine (the yardstick of the pooled rows).

    python bench/snapshot.py [-n 20] [--clones 10]

Runs through the Python API, on whatever accelerator `auto` picks (TCG here). Machines
get the default NIC in its restricted form (no way off the host), or none where a row
says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _stats import pct  # bench/ is on sys.path when a script here runs

from pinnace import AsyncPinnace


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))


async def cold(pn: AsyncPinnace, memory: str) -> float:
    t0 = time.perf_counter()
    m = await pn.machines.create(f"bench-cold-{os.getpid()}", memory=memory)
    await m.start()
    await m.exec(["true"])
    took = time.perf_counter() - t0
    await m.delete(force=True)
    return took


async def restore(pn: AsyncPinnace, memory: str, net: str | None = None) -> float:
    t0 = time.perf_counter()
    [m] = await pn.machines.run(memory=memory, **({"net": net} if net else {}))
    await m.exec(["true"])
    took = time.perf_counter() - t0
    await m.delete(force=True)
    return took


CLI = str(Path(sys.executable).with_name("pinnace"))


def cli(*args: str, env: dict[str, str] | None = None) -> float:
    """A `pinnace` command as a user types it: a new process, start to exit."""
    t0 = time.perf_counter()
    subprocess.run([CLI, *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - t0


def cli_run(net: str | None = None) -> float:
    """`pinnace run --rm -- true`."""
    return cli("run", "--rm", *(["--net", net] if net else []), "--", "true")


async def pooled_run(pn: AsyncPinnace) -> float:
    """`pinnace run --rm -- true` with a member waiting in the pool (filled first: this
    is the claim's latency, not the refill's throughput, which is its own row)."""
    await pn.pool.fill(size=1)
    return await asyncio.to_thread(cli, "run", "--rm", "--", "true",
                                   env={"PINNACE_POOL_SIZE": "0"})


async def pooled_api(pn: AsyncPinnace) -> float:
    """Python API: run() (claiming a pool member) to the first exec result."""
    await pn.pool.fill(size=1)
    t0 = time.perf_counter()
    [m] = await pn.machines.run()
    await m.exec(["true"])
    took = time.perf_counter() - t0
    await m.delete(force=True)
    return took


async def api_exec(m: object) -> float:
    t0 = time.perf_counter()
    await m.exec(["true"])  # type: ignore[attr-defined]
    return time.perf_counter() - t0


async def refill(pn: AsyncPinnace) -> float:
    """One pool member made: restored from the ready snapshot and warmed up."""
    await pn.pool.drain()
    t0 = time.perf_counter()
    await pn.pool.fill(size=1)
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=20, help="runs of each kind")
    ap.add_argument("--clones", type=int, default=10, help="live machines for the memory test")
    args = ap.parse_args()
    os.environ.setdefault("PINNACE_DEFAULT_NET", "restricted")
    pn = AsyncPinnace()
    rows = []
    share = Path(tempfile.mkdtemp(prefix="bench-share-"))
    vol = f"bench-vol-{os.getpid()}"
    await pn.volumes.create(vol, "64M")
    os.environ["PINNACE_POOL_SIZE"] = "0"  # no background refills but the ones we ask for
    for shape in ({"memory": "512M"}, {"memory": "256M"}, {"memory": "2G"}, {"net": "none"},
                  {"shares": [f"{share}:/src"]}, {"volumes": [f"{vol}:/data"]}):
        for m in await pn.machines.run(notify=print, **shape):  # build the ready snapshots
            await m.delete(force=True)
    [running] = await pn.machines.run(name=f"bench-exec-{os.getpid()}")
    accel = (await running.status()).accel
    # Round robin, so that a host whose speed drifts (a shared VM) weighs on every row alike.
    kinds = {
        "cold boot -> first exec (512M)": lambda: cold(pn, "512M"),
        "restore -> first exec (512M)": lambda: restore(pn, "512M"),
        "restore -> first exec (256M)": lambda: restore(pn, "256M"),
        "restore -> first exec (2G)": lambda: restore(pn, "2G"),
        "restore -> first exec (512M, no NIC)": lambda: restore(pn, "512M", net="none"),
        "CLI run --rm -- true": lambda: asyncio.to_thread(cli_run),
        "CLI run --rm --net none -- true": lambda: asyncio.to_thread(cli_run, "none"),
        "CLI run --rm --share DIR:/src -- true": lambda: asyncio.to_thread(
            cli, "run", "--rm", "--share", f"{share}:/src", "--", "true"),
        "CLI run --rm --volume V:/data -- true": lambda: asyncio.to_thread(
            cli, "run", "--rm", "--volume", f"{vol}:/data", "--", "true"),
        "CLI exec NAME -- true (running)": lambda: asyncio.to_thread(
            cli, "exec", running.name, "--", "true"),
        "CLI run --rm -- true (pooled)": lambda: pooled_run(pn),
        "API exec round trip (running)": lambda: api_exec(running),
        "API run -> first exec (pooled)": lambda: pooled_api(pn),
        "pool refill: one member made": lambda: refill(pn),
    }
    times: dict[str, list[float]] = {label: [] for label in kinds}
    for _ in range(args.n):
        for label, measure in kinds.items():
            if "pool" not in label:
                await pn.pool.drain()  # a row without the pool must not take a member
            times[label].append(await measure())
    for label, xs in times.items():
        rows.append((label, f"{statistics.median(xs) * 1000:.0f} ms", f"{pct(xs, 95) * 1000:.0f} ms"))
    await running.delete(force=True)
    await pn.pool.drain()
    await pn.volumes.remove(vol)
    shutil.rmtree(share, ignore_errors=True)
    med = {label: statistics.median(xs) for label, xs in times.items()}
    plain = med["CLI run --rm -- true"]
    ratios = [
        ("run --share / plain run", med["CLI run --rm --share DIR:/src -- true"] / plain, 1.3),
        ("run --volume / plain run", med["CLI run --rm --volume V:/data -- true"] / plain, 1.3),
        ("pooled run / CLI exec", med["CLI run --rm -- true (pooled)"]
         / med["CLI exec NAME -- true (running)"], 1.3),
        ("pooled API run+exec / API exec", med["API run -> first exec (pooled)"]
         / med["API exec round trip (running)"], 3.0),
    ]
    colds, restores = times["cold boot -> first exec (512M)"], times["restore -> first exec (512M)"]
    r256, r2g = times["restore -> first exec (256M)"], times["restore -> first exec (2G)"]
    speedup = statistics.median(colds) / statistics.median(restores)
    ratio = statistics.median(r2g) / statistics.median(r256)

    clones = await pn.machines.run(memory="512M", count=args.clones, name=f"bench-clone-{os.getpid()}")
    await asyncio.gather(*(m.exec(["true"]) for m in clones))
    clone_pss = sum(pss_kib(st.pid or 0) for st in [await m.status() for m in clones])
    for m in clones:
        await m.delete(force=True)
    booted = []
    for i in range(args.clones):
        m = await pn.machines.create(f"bench-boot-{os.getpid()}-{i}", memory="512M")
        booted.append(m)
    await asyncio.gather(*(m.start() for m in booted))
    await asyncio.gather(*(m.exec(["true"]) for m in booted))
    boot_pss = sum(pss_kib(st.pid or 0) for st in [await m.status() for m in booted])
    for m in booted:
        await m.delete(force=True)

    from pinnace.backends.qemu import host as qhost

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"\nsnapshots, {args.n} runs each, accel={accel}, {os.cpu_count()} CPUs ({cpu}), "
          f"QEMU {qhost.qemu_version(qhost.qemu_binary())}")
    print(f"{'measure':40} {'p50':>9} {'p95':>9}")
    for label, p50, p95 in rows:
        print(f"{label:40} {p50:>9} {p95:>9}")
    for label, ratio_, target in ratios:
        print(f"{label:38} {ratio_:8.2f}x  (issue 12: at most {target}x)")
    print(f"{'restore speed-up over cold boot':38} {speedup:8.1f}x")
    print(f"{'restore 2G / 256M':38} {ratio:8.2f}x")
    print(f"{f'PSS of {args.clones} live clones (512M)':38} {clone_pss / 1024:7.0f} MB")
    print(f"{f'PSS of {args.clones} cold-booted (512M)':38} {boot_pss / 1024:7.0f} MB")


if __name__ == "__main__":
    asyncio.run(main())
