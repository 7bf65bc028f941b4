"""Networks: TCP throughput and round-trip latency between two machines on one
pinnace network, between a machine behind a NAT and one on the simulated internet, and
from the host to a guest through a port forward; the lab's
accuracy (delay added to a round trip, loss over 1000 pings); and frames per second
through the switch itself, on its plain and its lab path, and through a NAT router.

    python bench/net.py [--mb 50] [--rounds 200]

Traffic goes only between pinnace's own guests on pinnace's own switch, and from
loopback into a guest: both machines use --net restricted (no way off the host).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
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


def retransmitted(m: object) -> int:
    """TCP segments the guest has sent again (RetransSegs of /proc/net/snmp)."""
    text = m.exec(["cat", "/proc/net/snmp"]).stdout_text  # type: ignore[attr-defined]
    names, values = (ln.split()[1:] for ln in text.splitlines() if ln.startswith("Tcp:"))
    return int(values[names.index("RetransSegs")])


def switch_pps(frames: int, impair: dict[str, object] | None) -> float:
    """Frames per second through one network's switch process (no guests): a paced
    sender's unicast frames to a learned MAC, as a receiver counts them; with ``impair``
    set on the network (the lab's path), or none (the plain path)."""
    import json
    import shutil
    import tempfile
    import threading
    from pathlib import Path

    from pinnace.network.switch import PortSpec, ensure_running, stop, write_port

    root = Path(tempfile.mkdtemp(prefix="pbsw", dir="/tmp"))
    try:
        net = root / "net"
        net.mkdir()
        if impair:
            (net / "network.json").write_text(json.dumps({"impair": impair, "seed": 1}))
        ends = {}
        for i, name in enumerate("ab", start=1):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(root / f"{name}.q"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            ends[name] = (sock, bytes([2, 0, 0, 0, 0, i]))
            write_port(net, name, PortSpec(str(root / f"{name}.p"), str(root / f"{name}.q"),
                                           name, ""))
        ensure_running(net)  # its own process, as on a real network
        (a, amac), (b, bmac) = ends["a"], ends["b"]
        b.sendto(b"\xff" * 6 + bmac + b"\x88\xb5" + bytes(46), str(root / "b.p"))  # learn b
        a.settimeout(5)
        a.recv(2048)
        frame = bmac + amac + b"\x08\x00" + bytes(1000)
        got, last = [0], [0.0]

        def count() -> None:
            b.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                while True:
                    b.recv(2048)
                    got[0] += 1
                    last[0] = time.perf_counter()

        counter = threading.Thread(target=count)
        counter.start()
        t0 = time.perf_counter()
        for i in range(frames):
            a.sendto(frame, str(root / "a.p"))
            if i % 64 == 63:  # a paced sender, as a guest's NIC is: queues stay short
                waited = time.perf_counter()
                while got[0] < i - 128 and time.perf_counter() - waited < 0.05:
                    time.sleep(0.0002)
        counter.join()
        took = last[0] - t0
        stop(net)
        return got[0] / took
    finally:
        shutil.rmtree(root, ignore_errors=True)


def nat_pps(frames: int) -> float:
    """UDP packets per second through a NAT router (no guests): a paced sender on a
    network behind an easy NAT, a receiver on the simulated internet; each packet
    crosses the home network's switch, the router (translation, TTL, checksums) and the
    internet's switch: three processes' hops, as between guests."""
    import asyncio
    import ipaddress
    import shutil
    import struct
    import tempfile
    import threading
    from pathlib import Path

    from pinnace.network import switch
    from pinnace.network.networks import AsyncNetworks
    from pinnace.network.router import mac_for
    from pinnace.network.services import udp_packet
    from pinnace.store import Store

    root = Path(tempfile.mkdtemp(prefix="pbnat", dir="/tmp"))
    nets = AsyncNetworks(Store(root / "h"))
    try:
        home = asyncio.run(nets.create("home", "192.168.1.0/24", nat="easy"))
        inet = nets.get("internet")
        ends = {}
        for name, net, ip in (("a", home, "192.168.1.2"), ("b", inet, "203.0.113.50")):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(root / f"{name}.q"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            mac = bytes([2, 0, 0, 0, 1, len(ends)])
            ends[name] = (sock, mac, int(ipaddress.IPv4Address(ip)))
            switch.write_port(net.path, f"{name}.n0", switch.PortSpec(
                str(root / f"{name}.p"), str(root / f"{name}.q"), name, mac.hex(":"), ip=ip))
            switch.notify(net.path)
        (a, amac, aip), (b, bmac, bip) = ends["a"], ends["b"]
        router = mac_for("home", "lan")
        pkt = udp_packet(aip, 5000, bip, 9000, bytes(972))  # a 1014-byte frame
        frame = router + amac + b"\x08\x00" + pkt
        got, last = [0], [0.0]

        def count() -> None:
            b.settimeout(2.0)
            with contextlib.suppress(TimeoutError):
                while True:
                    data = b.recv(2048)
                    if data[12:14] == b"\x08\x06":  # the router asks for b: answer
                        spa, tpa = data[28:32], data[38:42]
                        b.sendto(data[6:12] + bmac + b"\x08\x06" + struct.pack(
                            "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, bmac, tpa, data[22:28], spa),
                            str(root / "b.p"))
                        continue
                    got[0] += 1
                    last[0] = time.perf_counter()

        counter = threading.Thread(target=count)
        counter.start()
        a.sendto(frame, str(root / "a.p"))  # (the router learns b's MAC first)
        time.sleep(0.5)
        got[0] = 0
        t0 = time.perf_counter()
        for i in range(frames):
            a.sendto(frame, str(root / "a.p"))
            if i % 64 == 63:  # paced, as a guest's NIC is
                waited = time.perf_counter()
                while got[0] < i - 128 and time.perf_counter() - waited < 0.05:
                    time.sleep(0.0002)
        counter.join()
        return got[0] / (last[0] - t0)
    finally:
        for d in sorted((root / "h" / "networks").glob("*")):
            switch.stop(d)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=50, help="MiB per throughput run")
    ap.add_argument("--rounds", type=int, default=200, help="round trips per latency run")
    ap.add_argument("--frames", type=int, default=100_000, help="frames through the switch")
    args = ap.parse_args()
    tag = os.getpid() % 10000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        fwd = s.getsockname()[1]
    with Pinnace() as pn:
        net, home = f"bench{tag}", f"benchnat{tag}"
        pn.networks.create(net, "10.99.77.0/24")
        pn.networks.create(home, "192.168.77.0/24", nat="easy")
        a = pn.machines.create(f"bn{tag}-a", networks=[net], net="restricted")
        b = pn.machines.create(f"bn{tag}-b", networks=[f"{net}:10.99.77.9", "internet"],
                               net="restricted", ports=[f"{fwd}:7001"])
        c = pn.machines.create(f"bn{tag}-c", networks=[home], net="restricted")
        try:
            a.start()
            b.start()
            c.start()
            b.start_process(["python3", "-c", SERVER, "7001"])
            execs = []
            for _ in range(10):  # the yardstick: a command on a running machine
                t = time.perf_counter()
                a.exec(["true"]).check()
                execs.append((time.perf_counter() - t) * 1000)
            before = retransmitted(a)
            r = a.exec(["python3", "-c", CLIENT, "10.99.77.9", "7001", str(args.mb),
                        str(args.rounds)], timeout=600).check()
            guest = json.loads(r.stdout_text)
            retrans = retransmitted(a) - before
            host = host_client(fwd, args.mb, args.rounds)
            before = retransmitted(c)
            r = c.exec(["python3", "-c", CLIENT, b.address("internet"), "7001", str(args.mb),
                        str(args.rounds)], timeout=600).check()
            natted = json.loads(r.stdout_text)
            nat_retrans = retransmitted(c) - before
            # The lab's accuracy: 50 ms on every link (a round trip crosses two), then
            # 10 % loss on b's link only (one crossing per ping), 1000 pings.
            pn.networks.set(net, {"delay": 0.05})
            r = a.exec(["python3", "-c", CLIENT, "10.99.77.9", "7001", "1",
                        str(args.rounds // 4)], timeout=600).check()
            delayed = json.loads(r.stdout_text)
            pn.networks.set(net, {"delay": 0.0})
            pn.networks.set(net, {"loss": 0.1}, machine=b.name, seed=1)
            out = a.exec(["ping", "-q", "-n", "-c", "1000", "-i", "0.01", "-W", "1",
                          "10.99.77.9"], timeout=600).stdout_text
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert m, out
            sent, received = int(m.group(1)), int(m.group(2))
        finally:
            for m in (a, b, c):
                m.delete(force=True)
            pn.networks.remove(net)
            pn.networks.remove(home)
    plain_pps = switch_pps(args.frames, None)
    lab_pps = switch_pps(args.frames, {"delay": 0.001, "loss": 0.001})
    routed_pps = nat_pps(args.frames // 2)
    print(f"\nnetworks, {os.cpu_count()} CPUs, TCG guests, {args.mb} MiB, {args.rounds} round trips")
    print(f"{'measure':52} {'value':>12}")
    print(f"{'yardstick: exec of true on a running machine, p50':52} "
          f"{statistics.median(execs):9.2f} ms")
    for label, res, again in (("guest -> guest (one network)", guest, retrans),
                              ("guest -> guest (through an easy NAT)", natted, nat_retrans),
                              ("host -> guest (port forward)", host, None)):
        rtts = [x * 1000 for x in res["rtts"]]  # type: ignore[union-attr]
        print(f"{label + ' TCP':52} {res['mbps']:9.1f} MB/s")
        if again is not None:
            print(f"{label + ' TCP segments sent again':52} {again:9d}")
        print(f"{label + ' RTT p50':52} {statistics.median(rtts):9.2f} ms")
        print(f"{label + ' RTT p95':52} {pct(rtts, 95):9.2f} ms")
    base = statistics.median(guest["rtts"]) * 1000  # type: ignore[arg-type]
    lagged = statistics.median(delayed["rtts"]) * 1000
    print(f"{'guest -> guest RTT p50, --delay 50ms (expect +100)':52} {lagged:9.2f} ms"
          f"  (+{lagged - base:.1f})")
    lost = (sent - received) / sent
    band = 4 * (0.1 * 0.9 / sent) ** 0.5
    print(f"{'pings lost, 10% loss on one link (expect 10%)':52} {lost:9.1%}"
          f"  (of {sent}; 4 sigma: {0.1 - band:.1%}-{0.1 + band:.1%})")
    print(f"{'switch process, 1014-byte frames delivered, plain':52} {plain_pps:9.0f} /s"
          f"  ({1e6 / plain_pps:.1f} us each)")
    print(f"{'switch process, same, lab path (1ms, 0.1% loss)':52} {lab_pps:9.0f} /s"
          f"  ({1e6 / lab_pps:.1f} us each)")
    print(f"{'through a NAT (switch, router, switch), 1014 bytes':52} {routed_pps:9.0f} /s"
          f"  ({1e6 / routed_pps:.1f} us each)")


if __name__ == "__main__":
    main()
