"""Agent speed: exec round trip of `true`, file copy in and out, stdout throughput.

Also measured inside the guest, with no agent involved: what starting `true` costs
there (posix_spawn + waitpid from Python), the floor under any exec round trip.

    python bench/agent.py [-n 200] [--mb 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from _stats import pct  # bench/ is on sys.path when a script here runs

from pinnace import AsyncPinnace

# Run in the guest: p50 of starting /bin/true and waiting for it, in ms.
SPAWN_FLOOR = """
import os, time
xs = []
for _ in range(N):
    t0 = time.perf_counter()
    os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0)
    xs.append(time.perf_counter() - t0)
print(sorted(xs)[len(xs) // 2] * 1000)
"""


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=200, help="exec round trips")
    ap.add_argument("--mb", type=int, default=100, help="MiB for copy and stdout")
    ap.add_argument("--repeat", type=int, default=3, help="transfers of each kind (median shown)")
    args = ap.parse_args()
    pn = AsyncPinnace()
    m = await pn.machines.create(f"bench-agent-{os.getpid()}")
    try:
        st = await m.start()
        await m.exec(["true"])
        rtt = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            await m.exec(["true"])
            rtt.append(time.perf_counter() - t0)
        floor = await m.exec(["python3", "-c", SPAWN_FLOOR.replace("N", str(args.n))])
        spawn_ms = float(floor.check().stdout)
        size = args.mb << 20
        put_s, get_s, out_s = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "in.bin"
            src.write_bytes(os.urandom(size))
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                await m.files.put(src, "/root/in.bin")
                put_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await m.files.get("/root/in.bin", Path(tmp) / "out.bin")
                get_s.append(time.perf_counter() - t0)
        for _ in range(args.repeat):
            proc = await m.start_process(f"head -c {size} /dev/zero")
            t0 = time.perf_counter()
            async for _ in proc:
                pass
            await proc.wait()
            out_s.append(time.perf_counter() - t0)
    finally:
        await m.delete(force=True)
    mb = size / 1e6
    print(f"\nagent, accel={st.accel}, {os.cpu_count()} CPUs, {args.n} round trips, "
          f"{args.mb} MiB transfers (median of {args.repeat})")
    print(f"{'measure':34} {'value':>12}")
    print(f"{'exec true round trip p50':34} {statistics.median(rtt) * 1000:9.1f} ms")
    print(f"{'exec true round trip p95':34} {pct(rtt, 95) * 1000:9.1f} ms")
    print(f"{'  floor: spawn true in guest p50':34} {spawn_ms:9.1f} ms")
    print(f"{'file copy in (put)':34} {mb / statistics.median(put_s):8.1f} MB/s")
    print(f"{'file copy out (get)':34} {mb / statistics.median(get_s):8.1f} MB/s")
    print(f"{'stdout throughput':34} {mb / statistics.median(out_s):8.1f} MB/s")


if __name__ == "__main__":
    asyncio.run(main())
