"""Networks: TCP throughput and round-trip latency between two machines on one
pinnace network, and from the host to a guest through a port forward.

    python bench/net.py [--mb 50] [--rounds 200]

Traffic goes only between pinnace's own guests on pinnace's own switch, and from
loopback into a guest: both machines use --net restricted (no way off the host).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from _stats import pct  # bench/ is on sys.path when a script here runs

from pinnace import Pinnace

SERVER = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    c, _ = s.accept()
    mode = c.recv(1)
    if mode == b"s":            # sink: read until EOF, then say how much
        n = 0
        while True:
            d = c.recv(1 << 16)
            if not d:
                break
            n += len(d)
        c.sendall(str(n).encode())
    else:                       # echo, one byte at a time for round trips
        while True:
            d = c.recv(64)
            if not d:
                break
            c.sendall(d)
    c.close()
"""

CLIENT = """
import socket, sys, time, json
host, port, mb, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for _ in range(100):
    try:
        c = socket.create_connection((host, port), 2); break
    except OSError:
        time.sleep(0.1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.sendall(b"e"); rtts = []
for _ in range(rounds):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(64); rtts.append(time.perf_counter() - t)
c.close()
c = socket.create_connection((host, port), 5); c.sendall(b"s")
buf = b"\\0" * (1 << 16); t = time.perf_counter(); left = mb << 20
while left > 0:
    c.sendall(buf[:min(left, len(buf))]); left -= min(left, len(buf))
c.shutdown(socket.SHUT_WR); got = int(c.recv(64)); took = time.perf_counter() - t
print(json.dumps({"rtts": rtts, "mbps": got / took / 1e6}))
"""


def host_client(port: int, mb: int, rounds: int) -> dict[str, object]:
    for _ in range(100):
        try:
            c = socket.create_connection(("127.0.0.1", port), 2)
            c.sendall(b"e")
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sendall(b"x")
            if c.recv(64):
                break
        except OSError:
            time.sleep(0.2)
    rtts = []
    for _ in range(rounds):
        t = time.perf_counter()
        c.sendall(b"x")
        c.recv(64)
        rtts.append(time.perf_counter() - t)
    c.close()
    c = socket.create_connection(("127.0.0.1", port), 5)
    c.sendall(b"s")
    buf, left = b"\0" * (1 << 16), mb << 20
    t = time.perf_counter()
    while left > 0:
        c.sendall(buf[:min(left, len(buf))])
        left -= min(left, len(buf))
    c.shutdown(socket.SHUT_WR)
    got = int(c.recv(64))
    return {"rtts": rtts, "mbps": got / (time.perf_counter() - t) / 1e6}


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=50, help="MiB per throughput run")
    ap.add_argument("--rounds", type=int, default=200, help="round trips per latency run")
    args = ap.parse_args()
    tag = os.getpid() % 10000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        fwd = s.getsockname()[1]
    with Pinnace() as pn:
        net = f"bench{tag}"
        pn.networks.create(net, "10.99.77.0/24")
        a = pn.machines.create(f"bn{tag}-a", networks=[net], net="restricted")
        b = pn.machines.create(f"bn{tag}-b", networks=[f"{net}:10.99.77.9"], net="restricted",
                               ports=[f"{fwd}:7001"])
        try:
            a.start()
            b.start()
            b.start_process(["python3", "-c", SERVER, "7001"])
            r = a.exec(["python3", "-c", CLIENT, "10.99.77.9", "7001", str(args.mb),
                        str(args.rounds)], timeout=600).check()
            guest = json.loads(r.stdout_text)
            host = host_client(fwd, args.mb, args.rounds)
        finally:
            for m in (a, b):
                m.delete(force=True)
            pn.networks.remove(net)
    print(f"\nnetworks, {os.cpu_count()} CPUs, TCG guests, {args.mb} MiB, {args.rounds} round trips")
    print(f"{'measure':40} {'value':>12}")
    for label, res in (("guest -> guest (one network)", guest), ("host -> guest (port forward)", host)):
        rtts = [x * 1000 for x in res["rtts"]]  # type: ignore[union-attr]
        print(f"{label + ' TCP':40} {res['mbps']:9.1f} MB/s")
        print(f"{label + ' RTT p50':40} {statistics.median(rtts):9.2f} ms")
        print(f"{label + ' RTT p95':40} {pct(rtts, 95):9.2f} ms")


if __name__ == "__main__":
    main()
