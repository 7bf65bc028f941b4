"""The network lab with real guests: delay in the round trip, loss within a binomial
band, partitions and healing, a rate limit on TCP; each beside the same network
unimpaired, measured in the same test."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time

import pytest

PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) received")
RTT = re.compile(r"= [\d.]+/([\d.]+)/")  # rtt min/avg/max/mdev = a/b/c/d ms: the avg


@pytest.fixture
def lan(pn, network, make_machine):
    """A network and two machines on it: (name, a, b, b's address)."""
    name = network("10.91.0.0/24")
    a = make_machine.restored(networks=[f"{name}:10.91.0.2"])
    b = make_machine.restored(networks=[f"{name}:10.91.0.3"])
    assert a.exec(["ping", "-c", "1", "-W", "5", "10.91.0.3"]).exit_code == 0  # ARP warm
    return name, a, b, "10.91.0.3"


def ping(m, ip, count, interval="0.2", wait="2"):
    """(sent, received, average RTT in ms or None) of ``count`` pings."""
    out = m.exec(["ping", "-q", "-n", "-c", str(count), "-i", interval, "-W", wait, ip],
                 timeout=count * float(interval) + 60).stdout_text
    sent, got = map(int, PING_STATS.search(out).groups())
    rtt = RTT.search(out)
    return sent, got, float(rtt.group(1)) if rtt else None


def test_delay_shows_in_the_round_trip(pn, lan):
    """--delay 50ms on a network: each delivery is delayed, so a round trip takes about
    100 ms more than on the same network without it."""
    name, a, _b, ip = lan
    *_, plain = ping(a, ip, 10)
    pn.networks.set(name, {"delay": 0.05})
    *_, delayed = ping(a, ip, 20)
    assert 90 <= delayed - plain <= 125, (plain, delayed)
    pn.networks.set(name, {"delay": 0.0})
    *_, back = ping(a, ip, 10)
    assert back < plain + 20


def test_loss_within_a_binomial_band(pn, lan):
    """10 % loss on b's link only (frames to b): 10 % of 1,000 pings lost, within four
    standard deviations; none lost without it."""
    name, a, b, ip = lan
    sent, got, _ = ping(a, ip, 200, interval="0.01", wait="1")
    assert got == sent
    pn.networks.set(name, {"loss": 0.1}, machine=b.name, seed=13)
    sent, got, _ = ping(a, ip, 1000, interval="0.01", wait="1")
    lost, p = sent - got, 0.1
    band = 4 * math.sqrt(sent * p * (1 - p))
    assert abs(lost - sent * p) <= band, f"{lost} of {sent} lost"


def test_partition_stops_traffic_and_heal_restores_it(pn, network, make_machine):
    name = network("10.92.0.0/24")
    a, b, _c = (make_machine.restored(networks=[f"{name}:10.92.0.{i}"]) for i in (2, 3, 4))
    for m, ip in ((a, "10.92.0.3"), (a, "10.92.0.4"), (b, "10.92.0.4")):
        assert ping(m, ip, 2)[1] == 2
    pn.networks.partition(name, [[a.name], [b.name]])  # c in no group: reaches both
    assert ping(a, "10.92.0.3", 3, wait="1")[1] == 0
    assert ping(a, "10.92.0.4", 2)[1] == 2 and ping(b, "10.92.0.4", 2)[1] == 2
    pn.networks.heal(name)
    assert ping(a, "10.92.0.3", 3)[1] == 3


SINK = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); total = 0; first = None
while True:
    data = c.recv(1 << 16)
    if not data:
        break
    if first is None:
        first = time.monotonic()
    total += len(data)
print(total, time.monotonic() - first, flush=True)
"""
SOURCE = r"""
import socket, sys, time
n = int(sys.argv[2]); c = socket.create_connection((sys.argv[1], 5001), timeout=60)
block = b"x" * 65536
while n > 0:
    c.sendall(block[:n]); n -= len(block)
c.shutdown(socket.SHUT_WR); c.recv(1)
"""


def tcp_mbit(a, b, ip, nbytes):
    sink = b.start_process(["python3", "-c", SINK])
    out = b""
    for _stream, data in sink:
        out += data
        if b"ready" in out:
            break
    assert a.exec(["python3", "-c", SOURCE, ip, str(nbytes)], timeout=120).exit_code == 0
    for _stream, data in sink:
        out += data
    sink.wait()
    total, seconds = out.split(b"ready", 1)[1].split()
    assert int(total) == nbytes
    return nbytes * 8 / float(seconds) / 1e6


def test_a_rate_limit_caps_tcp_throughput(pn, lan):
    """A 10 Mbit/s limit on b's link: TCP from a to b runs within 15 % of it (what the
    unimpaired network does is measured first: it must be well above)."""
    name, a, b, ip = lan
    plain = tcp_mbit(a, b, ip, 4 << 20)
    pn.networks.set(name, {"rate": 10e6}, machine=b.name)
    limited = tcp_mbit(a, b, ip, 4 << 20)
    assert plain > 15, f"the network itself runs at {plain:.1f} Mbit/s"
    assert 8.5 <= limited <= 11.5, f"{limited:.2f} Mbit/s (unlimited: {plain:.1f})"


def test_a_capture_is_read_by_tcpdump(pn, lan, tmp_path):
    """What crosses the network, in a pcap file that tcpdump reads: the pings between
    a and b, each way."""
    name, a, _b, ip = lan
    pcap = tmp_path / "lan.pcap"
    with pn.networks.capture(name, pcap):
        assert ping(a, ip, 3)[1] == 3
    out = subprocess.run(["tcpdump", "-nn", "-r", str(pcap), "icmp"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert len(re.findall(r"10\.91\.0\.2 > 10\.91\.0\.3: ICMP echo request", out)) == 3, out
    assert len(re.findall(r"10\.91\.0\.3 > 10\.91\.0\.2: ICMP echo reply", out)) == 3, out
    size = pcap.stat().st_size
    ping(a, ip, 1)
    assert pcap.stat().st_size == size  # the capture ended with the block


def test_capture_from_the_cli(pn, lan, tmp_path):
    name, a, _b, ip = lan
    pcap = tmp_path / "cli.pcap"
    proc = subprocess.Popen([sys.executable, "-m", "pinnace.cli", "network", "capture", name,
                             "-w", str(pcap), "--count", "4"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pcap.exists() or pcap.stat().st_size < 24:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    ping(a, ip, 3)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert re.search(r"^\d+ frames written to ", err, re.M), err
    assert int(err.strip().splitlines()[-1].split()[0]) >= 4
