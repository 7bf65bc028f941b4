"""NAT routers and the internet's core, through real switch processes: networks made by
the API in a temporary store, fake hosts (datagram sockets where a QEMU's would be)
speaking ARP and IPv4 to them. The guest tests (tests/guest/test_lab.py) do the same
with real machines; these run in a second and show each step on its own."""

import asyncio
import ipaddress
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest

from pinnace.errors import ConfigError, NetworkInUse
from pinnace.network import switch
from pinnace.network.nat import checksum, parse
from pinnace.network.networks import AsyncNetworks
from pinnace.network.router import forwarded
from pinnace.network.services import udp_packet
from pinnace.store import Store

BROADCAST = b"\xff" * 6


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


class Host:
    """A fake machine on a network: its own ARP, IPv4 frames in and out."""

    def __init__(self, root: Path, name: str, index: int, address: str, gateway: str | None):
        self.name, self.ip = name, ip(address)
        self.gw = ip(gateway) if gateway else None
        self.mac = bytes([0x52, 0x54, 0, 0, 1, index])
        self.qemu = str(root / f"{name}.q")
        self.peer = str(root / "peers" / f"{name}.p")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.qemu)
        self.neighbours: dict[int, bytes] = {}
        self.last_ttl = -1

    def attach(self, netdir: Path) -> None:
        switch.write_port(netdir, f"{self.name}.n0", switch.PortSpec(
            self.peer, self.qemu, self.name, self.mac.hex(":"),
            ip=str(ipaddress.IPv4Address(self.ip))))
        switch.notify(netdir)

    def frame(self, dst: bytes, kind: int, payload: bytes) -> None:
        self.sock.sendto(dst + self.mac + kind.to_bytes(2, "big") + payload, self.peer)

    def arp(self, target: int, timeout: float = 3.0) -> bytes | None:
        """Ask for ``target``'s MAC, as a kernel does (again every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.frame(BROADCAST, 0x0806, struct.pack(
                "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, self.mac, self.ip.to_bytes(4, "big"),
                bytes(6), target.to_bytes(4, "big")))
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                self.recv_ip(0.05)
                if target in self.neighbours:
                    return self.neighbours[target]
        return None

    def send(self, pkt: bytes) -> None:
        dst = int.from_bytes(pkt[16:20], "big")
        hop = dst if self.gw is None or (dst >> 8) == (self.ip >> 8) else self.gw
        mac = self.neighbours.get(hop) or self.arp(hop)
        assert mac is not None, f"no ARP answer for {ipaddress.IPv4Address(hop)}"
        self.frame(mac, 0x0800, pkt)

    def recv_ip(self, timeout: float = 2.0) -> bytes | None:
        """The next IPv4 packet for this host (answering ARP meanwhile), or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                frame = self.sock.recv(70000)
            except TimeoutError:
                return None
            kind = int.from_bytes(frame[12:14], "big")
            if kind == 0x0806:
                op, sha, spa, tpa = struct.unpack_from("!6xH6s4s6x4s", frame, 14)
                self.neighbours[int.from_bytes(spa, "big")] = sha
                if op == 1 and int.from_bytes(tpa, "big") == self.ip:
                    self.frame(sha, 0x0806, struct.pack(
                        "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, self.mac, tpa, sha, spa))
            elif kind == 0x0800 and frame[0:6] == self.mac:
                self.last_ttl = frame[22]
                return frame[14:]

    def udp(self, dst: str, dport: int, payload: bytes, sport: int = 5000) -> None:
        self.send(udp_packet(self.ip, sport, ip(dst), dport, payload))

    def recv_udp(self, timeout: float = 2.0) -> tuple[str, int, int, bytes] | None:
        """(source address, source port, destination port, payload) of the next UDP."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            pkt = self.recv_ip(left)
            if pkt is None:
                return None
            f = parse(pkt)
            if f is not None and f.proto == 17:
                assert checksum(pkt[:20]) == 0
                return (str(ipaddress.IPv4Address(f.src)), f.sport, f.dport, pkt[f.l4 + 8:])
        return None


def ping(host: Host, dst: str, ident: int = 77) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ping"
    body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
    hdr = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(body), 0, 0, 64, 1, 0, host.ip, ip(dst))
    hdr = hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:]
    host.send(hdr + body)
    return hdr + body


def stun_request() -> bytes:
    return struct.pack("!HHI12s", 1, 0, 0x2112A442, b"abcdefghijkl")


def mapped(payload: bytes) -> tuple[str, int]:
    """The XOR-MAPPED-ADDRESS of a STUN response."""
    at = 20
    while at + 4 <= len(payload):
        kind, size = struct.unpack_from("!HH", payload, at)
        if kind == 0x0020:
            port = struct.unpack_from("!H", payload, at + 6)[0] ^ 0x2112
            addr = struct.unpack_from("!I", payload, at + 8)[0] ^ 0x2112A442
            return str(ipaddress.IPv4Address(addr)), port
        at += 4 + (size + 3) // 4 * 4
    raise AssertionError("no XOR-MAPPED-ADDRESS")


@pytest.fixture
def lab():
    root = Path(tempfile.mkdtemp(prefix="prt", dir="/tmp"))
    nets = AsyncNetworks(Store(root / "h"))
    hosts: list[Host] = []

    def host(name, address, gateway=None):
        hosts.append(Host(root, name, len(hosts) + 1, address, gateway))
        return hosts[-1]

    try:
        yield nets, host
    finally:
        for h in hosts:
            h.sock.close()
        for d in sorted((root / "h" / "networks").glob("*")):
            switch.stop(d)
        shutil.rmtree(root, ignore_errors=True)


def run(coro):
    return asyncio.run(coro)


def test_a_machine_behind_an_easy_nat_reaches_the_internet_translated(lab):
    nets, host = lab
    home = run(nets.create("home", "192.168.1.0/24", nat="easy", wan_ip="203.0.113.10"))
    assert home.gateway == "192.168.1.1" and home.router.wan_ip == "203.0.113.10"
    inet = nets.get("internet")
    assert inet.internet and inet.subnet == "203.0.113.0/24"
    a = host("a", "192.168.1.2", "192.168.1.1")
    a.attach(home.path)
    pub = host("pub", "203.0.113.50", "203.0.113.1")
    pub.attach(inet.path)
    other = host("other", "203.0.113.51", "203.0.113.1")
    other.attach(inet.path)

    # The router answers ARP and ping on the inside.
    assert a.arp(ip("192.168.1.1")) is not None
    ping(a, "192.168.1.1")
    reply = a.recv_ip()
    assert reply is not None and reply[9] == 1 and reply[20] == 0

    # Out: translated to the router's address, the inside port kept (easy preserves).
    a.udp("203.0.113.50", 9000, b"hello")
    got = pub.recv_udp()
    assert got == ("203.0.113.10", 5000, 9000, b"hello")
    # Back: the reply reaches the inside machine; its TTL went down by one.
    pub.udp("203.0.113.10", 5000, b"welcome", sport=9000)
    assert a.recv_udp() == ("203.0.113.50", 9000, 5000, b"welcome")
    assert a.last_ttl == 63
    # A stranger (another address) is filtered out: address-and-port-dependent.
    other.udp("203.0.113.10", 5000, b"intruder", sport=9000)
    # ... and so is the same host from another port.
    pub.udp("203.0.113.10", 5000, b"other port", sport=9001)
    assert a.recv_udp(0.5) is None

    # STUN on the internet's core sees the outside address.
    a.udp("203.0.113.1", 3478, stun_request(), sport=5001)
    got = a.recv_udp()
    assert got is not None and mapped(got[3]) == ("203.0.113.10", 5001)

    # Ping across the NAT: the echo goes out and the reply comes back, translated back.
    ping(a, "203.0.113.50", ident=4242)
    seen = pub.recv_ip()
    assert seen is not None and seen[9] == 1 and seen[12:16] == ipaddress.IPv4Address(
        "203.0.113.10").packed
    reply = seen[:12] + seen[16:20] + seen[12:16] + b"\0" + seen[21:]  # (an echo reply)
    reply = reply[:10] + b"\0\0" + reply[12:]
    reply = reply[:10] + checksum(reply[:20]).to_bytes(2, "big") + reply[12:20] + \
        reply[20:22] + b"\0\0" + reply[24:]
    reply = reply[:22] + checksum(reply[20:]).to_bytes(2, "big") + reply[24:]
    pub.send(reply)
    back = a.recv_ip()
    assert back is not None and back[20] == 0 and back[16:20] == ipaddress.IPv4Address(
        "192.168.1.2").packed and struct.unpack_from("!H", back, 24)[0] == 4242
    assert checksum(back[:20]) == 0 and checksum(back[20:]) == 0

    # A packet whose TTL runs out at the router: time exceeded, from the router.
    a.send(udp_packet(a.ip, 5002, ip("203.0.113.50"), 33434, b"trace")[:8] + b"\x01"
           + udp_packet(a.ip, 5002, ip("203.0.113.50"), 33434, b"trace")[9:])
    err = a.recv_ip()
    assert err is not None and err[9] == 1 and err[20] == 11
    assert err[12:16] == ipaddress.IPv4Address("192.168.1.1").packed


def test_dns_names_the_hosts_with_public_addresses(lab):
    nets, host = lab
    home = run(nets.create("home", "192.168.1.0/24", nat="hard"))
    assert home.router.wan_ip == "203.0.113.10"  # the first address after the services'
    inet = nets.get("internet")
    pub = host("webserver", "203.0.113.77", "203.0.113.1")
    pub.attach(inet.path)
    a = host("a", "192.168.1.2", "192.168.1.1")
    a.attach(home.path)
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    query += b"\x09webserver\x00" + struct.pack("!HH", 1, 1)
    a.udp("203.0.113.1", 53, query, sport=5353)
    got = a.recv_udp()
    assert got is not None and got[3][:2] == b"\x12\x34"
    assert got[3].endswith(ipaddress.IPv4Address("203.0.113.77").packed)


def test_the_wan_side_capture_holds_the_translated_packets(lab, tmp_path):
    nets, host = lab
    home = run(nets.create("home", "192.168.1.0/24", nat="easy"))
    inet = nets.get("internet")
    a = host("a", "192.168.1.2", "192.168.1.1")
    a.attach(home.path)
    pub = host("pub", "203.0.113.50")
    pub.attach(inet.path)
    other = host("other", "203.0.113.51")
    other.attach(inet.path)
    path = tmp_path / "wan.pcap"

    async def capture():
        async with nets.capture("home", path, side="wan"):
            await asyncio.to_thread(a.udp, "203.0.113.50", 9000, b"out")
            assert await asyncio.to_thread(pub.recv_udp) is not None
            other.neighbours[pub.ip] = pub.mac  # (pub answers ARP only while it reads)
            await asyncio.to_thread(other.udp, "203.0.113.50", 1, b"not the router's")
            await asyncio.sleep(0.3)

    run(capture())
    frames = switch.read_pcap(path.read_bytes())
    udp = [parse(f[14:]) for _, f in frames if f[12:14] == b"\x08\x00"]
    assert [(str(ipaddress.IPv4Address(u.src)), u.sport) for u in udp if u] == [
        ("203.0.113.10", 5000)]


def test_removing_networks_keeps_the_internet_consistent(lab):
    nets, _ = lab
    run(nets.create("home", "192.168.1.0/24", nat="easy"))
    inet = nets.get("internet")
    assert (inet.path / "ports" / "home.wan.json").exists()
    with pytest.raises(NetworkInUse, match="network 'home'"):
        run(nets.remove("internet"))
    # Homes may share a subnet behind NATs; a second router takes the next address.
    other = run(nets.create("home2", "192.168.1.0/24", nat="fullcone"))
    assert other.router.wan_ip == "203.0.113.11"
    with pytest.raises(ConfigError, match="overlaps"):
        run(nets.create("flat", "192.168.1.0/24"))
    with pytest.raises(ConfigError, match="router's or services'"):
        run(nets.create("home3", "192.168.2.0/24", nat="easy", wan_ip="203.0.113.2"))
    with pytest.raises(ConfigError, match="another machine"):
        run(nets.create("home3", "192.168.2.0/24", nat="easy", wan_ip="203.0.113.11"))
    with pytest.raises(ConfigError, match="simulated internet"):
        run(nets.create("internet", "10.9.9.0/24"))
    run(nets.remove("home"))
    assert not (inet.path / "ports" / "home.wan.json").exists()
    run(nets.remove("home2"))
    run(nets.remove("internet"))


def test_forwarding_decrements_ttl_and_keeps_the_checksum():
    pkt = udp_packet(ip("10.0.0.1"), 1, ip("10.0.0.2"), 2, b"x")
    out = forwarded(pkt)
    assert out is not None and out[8] == pkt[8] - 1 and checksum(out[:20]) == 0
    last = pkt[:8] + b"\x01" + pkt[9:]
    assert forwarded(last) is None
    assert forwarded(b"\x45" * 10) is None


def test_a_routed_network_is_reachable_from_the_internet_untranslated(lab):
    """--nat none: the router forwards without translating, and the internet's core
    routes the network's subnet to it, so a public host reaches an inside one."""
    nets, host = lab
    net = run(nets.create("dmz", "10.200.0.0/24", nat="none"))
    inet = nets.get("internet")
    a = host("a", "10.200.0.2", "10.200.0.1")
    a.attach(net.path)
    pub = host("pub", "203.0.113.50", "203.0.113.1")
    pub.attach(inet.path)
    a.udp("203.0.113.50", 9000, b"from inside")
    assert pub.recv_udp() == ("10.200.0.2", 5000, 9000, b"from inside")
    pub.udp("10.200.0.2", 5000, b"from outside", sport=9000)  # (via the core, .1)
    assert a.recv_udp() == ("203.0.113.50", 9000, 5000, b"from outside")
    # The router answers ping on its inside address from outside too.
    ping(pub, "10.200.0.1")
    reply = pub.recv_ip()
    assert reply is not None and reply[20] == 0 and reply[12:16] == bytes([10, 200, 0, 1])
    # The core says when it has no route.
    pub.udp("198.51.100.1", 9, b"nowhere")
    err = pub.recv_ip()
    assert err is not None and err[9] == 1 and err[20] == 3
    with pytest.raises(ConfigError, match="overlaps"):  # routed subnets must be unique
        run(nets.create("dmz2", "10.200.0.0/24", nat="none"))


def test_a_carrier_grade_nat_chain(lab):
    """home (easy) behind carrier (hard) behind the internet: STUN sees the carrier's
    address, from a port the carrier chose."""
    nets, host = lab
    carrier = run(nets.create("carrier", "100.64.0.0/24", nat="hard", wan_ip="203.0.113.20"))
    home = run(nets.create("home", "192.168.1.0/24", nat="easy", upstream="carrier"))
    assert home.router.upstream == "carrier" and home.router.wan_ip == "100.64.0.2"
    assert home.router.wan_gateway == "100.64.0.1"
    a = host("a", "192.168.1.2", "192.168.1.1")
    a.attach(home.path)
    a.udp("203.0.113.1", 3478, stun_request(), sport=5001)
    got = a.recv_udp()
    assert got is not None and mapped(got[3])[0] == "203.0.113.20"
    with pytest.raises(NetworkInUse):
        run(nets.remove("carrier"))
    with pytest.raises(ConfigError, match="internet only"):
        run(nets.create("dmz", "10.200.0.0/24", nat="none", upstream="carrier"))
    with pytest.raises(ConfigError, match="which it sits behind"):
        run(nets.create("inner", "100.64.0.0/25", nat="easy", upstream="carrier"))
    # One machine cannot be on two networks that share a subnet (homes may share one).
    run(nets.create("home2", "192.168.1.0/24", nat="easy"))
    with pytest.raises(ConfigError, match="overlaps that of 'home'"):
        nets.check_joins("home2", ["home"])
    nets.check_joins("home2", ["carrier"])
    with pytest.raises(ConfigError, match="leads nowhere"):
        run(nets.create("x", "10.1.2.0/24"))
        run(nets.create("y", "192.168.9.0/24", nat="easy", upstream="x"))
    assert carrier.gateway == "100.64.0.1"


def test_gc_removes_a_router_port_left_behind_and_networks_behind_others_first(lab):
    from pinnace.client import AsyncPinnace

    nets, _ = lab
    pn = AsyncPinnace(nets.store.home)
    run(nets.create("carrier", "100.64.0.0/24", nat="hard", ephemeral=True))
    run(nets.create("home", "192.168.1.0/24", nat="easy", upstream="carrier",
                    ephemeral=True))
    assert nets.depth("home") == 2 and nets.depth("carrier") == 1 and nets.depth("internet") == 0
    removed = run(pn.release())  # (what a test session does at its end)
    assert [r.what.split()[0] for r in removed] == ["home", "carrier"]
    run(nets.create("kept", "192.168.5.0/24", nat="easy"))  # (the internet stays in use)
    inet = nets.get("internet")
    stray = inet.path / "ports" / "gone.wan.json"
    stray.write_text((inet.path / "ports" / "core.json").read_text())
    assert nets.stale_ports() == [("internet", "gone.wan")]
    assert "removed port gone.wan on network internet (its router is gone)" in [
        str(r) for r in run(pn.gc())]
    assert nets.stale_ports() == [] and not stray.exists()
    # Nothing on it or behind it: gc removes the internet (the next need makes it again).
    run(nets.remove("kept"))
    assert "removed network internet (made when first needed; nothing is on it or behind " \
        "it now)" in [str(r) for r in run(pn.gc())]
    assert "internet" not in [n.name for n in nets.list()]


def test_nat_pmp_gives_the_outside_address_and_opens_a_port(lab):
    nets, host = lab
    home = run(nets.create("home", "192.168.1.0/24", nat="hard",
                           nat_options={"pmp": True}))
    inet = nets.get("internet")
    a = host("a", "192.168.1.2", "192.168.1.1")
    a.attach(home.path)
    pub = host("pub", "203.0.113.50", "203.0.113.1")
    pub.attach(inet.path)
    a.udp("192.168.1.1", 5351, b"\x00\x00", sport=5350)
    _, sport, _, body = a.recv_udp()
    version, op, result, _epoch, addr = struct.unpack("!BBHII", body)
    assert (sport, version, op, result) == (5351, 0, 128, 0)
    assert addr == ip(home.router.wan_ip)
    a.udp("192.168.1.1", 5351, struct.pack("!BBHHHI", 0, 1, 0, 7000, 7000, 3600), sport=5350)
    _, _, _, body = a.recv_udp()
    _, op, result, _, int_port, ext_port, life = struct.unpack("!BBHIHHI", body)
    assert (op, result, int_port, life) == (129, 0, 7000, 3600)
    pub.udp(home.router.wan_ip, ext_port, b"unsolicited, but asked for", sport=4444)
    assert a.recv_udp() == ("203.0.113.50", 4444, 7000, b"unsolicited, but asked for")
    # Without --nat-pmp, the router does not answer.
    run(nets.create("plain", "192.168.1.0/24", nat="easy"))
    b = host("b", "192.168.1.2", "192.168.1.1")
    b.attach(nets.get("plain").path)
    b.udp("192.168.1.1", 5351, b"\x00\x00", sport=5350)
    assert b.recv_udp(0.5) is None
