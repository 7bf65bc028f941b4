"""The simulated internet's services (pinnace.network.services) on packets built from
scratch: the builders' checksums, STUN binding with RFC 5780's attributes and
CHANGE-REQUEST, UDP and ICMP echo, DNS; no exception and no answer on random or mutated
input (hypothesis). And natprobe.py, the guest's NAT probe, against them: in-process
through each NAT preset of pinnace.network.nat, and as a subprocess over real sockets on
loopback (127.0.0.1 and 127.0.0.2), classifying and hole punching."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pinnace.network import natprobe
from pinnace.network.nat import ICMP, TCP, UDP, Nat, checksum, parse, preset
from pinnace.network.services import (
    DNS_PORT,
    ECHO_PORT,
    STUN_ALT_PORT,
    STUN_PORT,
    Services,
    icmp_echo_reply,
    ipv4_packet,
    udp_packet,
)

NATPROBE = Path(natprobe.__file__)
PRIMARY, ALTERNATE = "203.0.113.1", "203.0.113.2"
CLIENT = "203.0.113.50"
NAMES = {"alpha": "203.0.113.20", "Beta.": "203.0.113.21"}


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def text(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def host(names: dict[str, str] | None = None, **kw: Any) -> Services:
    table = NAMES if names is None else names
    return Services(ip(PRIMARY), ip(ALTERNATE), lambda: {k: ip(v) for k, v in table.items()},
                    **kw)


def udp_ok(pkt: bytes) -> tuple[str, int, str, int, bytes]:
    """(source, port, destination, port, payload) of a UDP packet whose IPv4 and UDP
    checksums both verify."""
    assert checksum(pkt[:20]) == 0
    f = parse(pkt)
    assert f is not None and f.proto == UDP
    l4 = pkt[f.l4:]
    assert struct.unpack_from("!H", l4, 4)[0] == len(l4)
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, UDP, len(l4))
    assert l4[6:8] != b"\0\0" and checksum(pseudo + l4) == 0
    return text(f.src), f.sport, text(f.dst), f.dport, l4[8:]


def ask(svc: Services, payload: bytes, dst: str = PRIMARY, dport: int = STUN_PORT,
        src: str = CLIENT, sport: int = 40000) -> list[bytes]:
    return svc.handle(udp_packet(ip(src), sport, ip(dst), dport, payload))


def echo_request(src: str = CLIENT, dst: str = PRIMARY, ident: int = 0x1234, seq: int = 7,
                 data: bytes = b"ping!") -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4_packet(ip(src), ip(dst), ICMP, body, ident=99)


# --- the builders --------------------------------------------------------------------


@given(st.binary(max_size=300), st.integers(0, 65535), st.integers(0, 65535),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_udp_packets_carry_right_checksums_and_parse_back(payload, sport, dport, src, dst):
    pkt = udp_packet(src, sport, dst, dport, payload)
    assert len(pkt) == 28 + len(payload)
    f = parse(pkt)
    assert f is not None and (f.proto, f.src, f.dst, f.sport, f.dport) == (UDP, src, dst,
                                                                             sport, dport)
    assert checksum(pkt[:20]) == 0
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, UDP, 8 + len(payload))
    assert checksum(pseudo + pkt[20:]) == 0 and pkt[26:28] != b"\0\0"
    assert pkt[28:] == payload


def test_ipv4_packets_have_a_right_header():
    pkt = ipv4_packet(ip("10.0.0.1"), ip("10.0.0.2"), TCP, bytes(20), ttl=9, ident=513)
    assert checksum(pkt[:20]) == 0
    assert pkt[0] == 0x45 and pkt[8] == 9 and pkt[9] == TCP
    assert struct.unpack_from("!HH", pkt, 2) == (40, 513)
    f = parse(pkt)
    assert f is not None and (text(f.src), text(f.dst)) == ("10.0.0.1", "10.0.0.2")
    with pytest.raises(ValueError):
        ipv4_packet(1, 2, UDP, bytes(65516))


# --- ICMP and UDP echo ----------------------------------------------------------------


@pytest.mark.parametrize("dst", [PRIMARY, ALTERNATE])
def test_ping_gets_its_echo_back(dst):
    request = echo_request(dst=dst)
    [reply] = host().handle(request)
    assert reply == icmp_echo_reply(request)
    assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0
    f = parse(reply)
    assert f is not None and (text(f.src), text(f.dst)) == (dst, CLIENT)
    assert reply[20] == 0 and reply[24:] == request[24:]  # id, sequence, data kept


def test_what_is_not_a_good_echo_request_gets_no_reply():
    good = echo_request()
    bad_csum = good[:-1] + bytes([good[-1] ^ 1])
    reply_type = good[:20] + b"\0" + good[21:]  # an echo reply: its checksum is off too
    assert icmp_echo_reply(bad_csum) is None
    assert icmp_echo_reply(reply_type) is None
    assert icmp_echo_reply(good[:27]) is None
    assert icmp_echo_reply(udp_packet(1, 2, 3, 4, b"x")) is None
    assert host().handle(echo_request(dst="203.0.113.3")) == []  # not ours
    assert host().handle(echo_request(src="0.0.0.0")) == []
    assert host().handle(echo_request(src="224.0.0.1")) == []


@pytest.mark.parametrize("dst", [PRIMARY, ALTERNATE])
def test_udp_echo_sends_the_payload_back(dst):
    [reply] = ask(host(), b"hello echo", dst=dst, dport=ECHO_PORT, sport=5555)
    assert udp_ok(reply) == (dst, ECHO_PORT, CLIENT, 5555, b"hello echo")


def test_packets_a_stack_would_drop_get_nothing():
    svc = host()
    pkt = udp_packet(ip(CLIENT), 4000, ip(PRIMARY), ECHO_PORT, b"payload")
    assert svc.handle(pkt)
    no_csum = pkt[:26] + b"\0\0" + pkt[28:]  # UDP without a checksum is fine
    assert svc.handle(no_csum)
    assert svc.handle(pkt + b"ethernet padding")  # past the total length: ignored
    assert svc.handle(pkt[:-1] + b"X") == []  # the UDP checksum fails
    assert svc.handle(pkt[:8] + b"\x07" + pkt[9:]) == []  # the header checksum fails
    fragment = bytearray(pkt)
    fragment[6] |= 0x20  # more fragments
    fragment[10:12] = b"\0\0"
    fragment[10:12] = struct.pack("!H", checksum(bytes(fragment[:20])))
    assert svc.handle(bytes(fragment)) == []
    assert svc.handle(pkt[:-3]) == []  # shorter than its total length
    assert ask(svc, b"x", dport=9) == []  # no service there
    assert ask(svc, b"x", dport=ECHO_PORT, sport=0) == []
    assert ask(svc, b"x", dport=ECHO_PORT, src="255.255.255.255") == []
    assert ask(svc, b"x", dport=ECHO_PORT, dst="203.0.113.9") == []
    assert svc.handle(ipv4_packet(ip(CLIENT), ip(PRIMARY), TCP, bytes(20))) == []


# --- STUN ----------------------------------------------------------------------------


def stun_reply(pkt: bytes, txid: bytes) -> tuple[tuple[str, int], dict[int, bytes]]:
    """Where a STUN success response came from, and its attributes."""
    src, sport, _, _, payload = udp_ok(pkt)
    msg = natprobe.decode(payload)
    assert msg is not None
    mtype, got_txid, attrs = msg
    assert (mtype, got_txid) == (natprobe.BINDING_SUCCESS, txid)
    return (src, sport), attrs


@pytest.mark.parametrize("dst", [PRIMARY, ALTERNATE])
@pytest.mark.parametrize("dport", [STUN_PORT, STUN_ALT_PORT])
@pytest.mark.parametrize("change", [0, natprobe.CHANGE_IP, natprobe.CHANGE_PORT,
                                    natprobe.CHANGE_IP | natprobe.CHANGE_PORT])
def test_binding_response_says_where_the_request_came_from(dst, dport, change):
    txid = bytes(range(12))
    [pkt] = ask(host(), natprobe.request(txid, change), dst=dst, dport=dport, sport=41234)
    other_ip = ALTERNATE if dst == PRIMARY else PRIMARY
    other_port = STUN_ALT_PORT if dport == STUN_PORT else STUN_PORT
    source, attrs = stun_reply(pkt, txid)
    expected = (other_ip if change & natprobe.CHANGE_IP else dst,
                other_port if change & natprobe.CHANGE_PORT else dport)
    assert source == expected
    assert udp_ok(pkt)[2:4] == (CLIENT, 41234)
    assert natprobe.address(attrs[natprobe.XOR_MAPPED_ADDRESS], xor=True) == (CLIENT, 41234)
    assert natprobe.address(attrs[natprobe.MAPPED_ADDRESS]) == (CLIENT, 41234)
    assert attrs[natprobe.XOR_MAPPED_ADDRESS] != attrs[natprobe.MAPPED_ADDRESS]
    assert natprobe.address(attrs[natprobe.RESPONSE_ORIGIN]) == expected
    assert natprobe.address(attrs[natprobe.OTHER_ADDRESS]) == (other_ip, other_port)
    assert attrs[0x8022] == b"pinnace"


def test_stun_on_ports_of_ones_choosing():
    svc = host(ports=(10000, 10001))
    txid = b"t" * 12
    assert ask(svc, natprobe.request(txid), dport=STUN_PORT) == []
    [pkt] = ask(svc, natprobe.request(txid, natprobe.CHANGE_PORT), dport=10000)
    source, attrs = stun_reply(pkt, txid)
    assert source == (PRIMARY, 10001)
    assert natprobe.address(attrs[natprobe.OTHER_ADDRESS]) == (ALTERNATE, 10001)
    with pytest.raises(Exception, match="ports"):
        host(ports=(10000, 10000))


def with_attrs(txid: bytes, *attrs: tuple[int, bytes]) -> bytes:
    body = b"".join(natprobe.attribute(t, v) for t, v in attrs)
    return struct.pack("!HHI", 1, len(body), natprobe.MAGIC_COOKIE) + txid + body


def test_response_port_and_ignored_attributes():
    txid = b"r" * 12
    msg = with_attrs(txid, (0x0027, struct.pack("!H", 6000)), (0x0006, b"user"),
                     (0x0008, bytes(20)), (0x8055, b"optional, unknown"), (0x8028, bytes(4)))
    [pkt] = ask(host(), msg, sport=5000)
    assert udp_ok(pkt)[2:4] == (CLIENT, 6000)
    stun_reply(pkt, txid)


def test_unknown_required_attributes_get_a_420():
    txid = b"u" * 12
    msg = with_attrs(txid, (0x0042, b"?"), (0x0003, bytes([0, 0, 0, 6])), (0x0043, b""),
                     (0x0042, b"again"))
    [pkt] = ask(host(), msg)
    src, sport, _, _, payload = udp_ok(pkt)
    assert (src, sport) == (PRIMARY, STUN_PORT)  # from where it went, change or not
    decoded = natprobe.decode(payload)
    assert decoded is not None
    mtype, got, attrs = decoded
    assert (mtype, got) == (natprobe.BINDING_ERROR, txid)
    assert attrs[0x0009][2:4] == bytes([4, 20])
    assert attrs[0x000A] == struct.pack("!HH", 0x0042, 0x0043)


def bad_stun() -> dict[str, bytes]:
    txid = b"b" * 12
    good = natprobe.request(txid, natprobe.CHANGE_PORT)
    return {
        "empty": b"",
        "header only, truncated": good[:19],
        "wrong magic cookie": good[:4] + b"\x21\x12\xa4\x43" + good[8:],
        "length says more": good[:2] + struct.pack("!H", 12) + good[4:],
        "length says less": good[:2] + struct.pack("!H", 4) + good[4:],
        "length not a multiple of 4": good[:2] + struct.pack("!H", 11) + good[4:] + b"abc",
        "attribute runs past the end": good[:22] + struct.pack("!H", 8) + good[24:],
        "attribute value and padding past the end": struct.pack(
            "!HHI", 1, 8, natprobe.MAGIC_COOKIE) + txid + struct.pack("!HH", 0x8022, 5) + b"abcd",
        "trailing bytes": good + b"\0\0\0\0",
        "a success response": struct.pack("!H", 0x0101) + good[2:],
        "an indication": struct.pack("!H", 0x0011) + good[2:],
        "an error response": struct.pack("!H", 0x0111) + good[2:],
        "another method": struct.pack("!H", 0x0003) + good[2:],
        "top bits set": struct.pack("!H", 0x4001) + good[2:],
        "CHANGE-REQUEST of 2 bytes": with_attrs(txid, (0x0003, b"\0\6")),
        "RESPONSE-PORT 0": with_attrs(txid, (0x0027, b"\0\0")),
        "RFC 3489 request (no cookie)": struct.pack("!HH", 1, 0) + bytes(16),
    }


@pytest.mark.parametrize("name", list(bad_stun()))
def test_bad_stun_requests_get_no_answer(name):
    assert ask(host(), bad_stun()[name]) == []


# --- DNS -----------------------------------------------------------------------------


def qname(name: str) -> bytes:
    return b"".join(bytes([len(x)]) + x.encode() for x in name.rstrip(".").split(".")) + b"\0"


def query(name: str | bytes, qtype: int = 1, ident: int = 0xBEEF, flags: int = 0x0100,
          qdcount: int = 1) -> bytes:
    wire = qname(name) if isinstance(name, str) else name
    return struct.pack("!HHHHHH", ident, flags, qdcount, 0, 0, 0) + wire + struct.pack(
        "!HH", qtype, 1)


def resolve(payload: bytes, svc: Services | None = None) -> tuple[int, list[str], bytes]:
    """(rcode, the A records' addresses, the whole response) of a DNS query to the
    primary address."""
    [pkt] = ask(svc or host(), payload, dport=DNS_PORT, sport=33333)
    src, sport, dst, dport, answer = udp_ok(pkt)
    assert (src, sport, dst, dport) == (PRIMARY, DNS_PORT, CLIENT, 33333)
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", answer)
    assert ident == struct.unpack_from("!H", payload)[0]
    assert flags & 0x8000 and flags & 0x0400  # a response, authoritative
    assert flags & 0x0100 == struct.unpack_from("!H", payload, 2)[0] & 0x0100  # RD copied
    assert (ns, ar) == (0, 0)
    records, at = [], 12
    if qd:
        at = answer.index(b"\0", 12) + 5
    for _ in range(an):
        ptr, rtype, rclass, ttl, rdlen = struct.unpack_from("!HHHIH", answer, at)
        assert (ptr, rtype, rclass, ttl, rdlen) == (0xC00C, 1, 1, 5, 4)
        records.append(socket.inet_ntoa(answer[at + 12:at + 16]))
        at += 16
    assert at == len(answer)
    return flags & 15, records, answer


@pytest.mark.parametrize("name,addr", [
    ("alpha", "203.0.113.20"), ("ALPHA.", "203.0.113.20"), ("Alpha.Internet", "203.0.113.20"),
    ("beta", "203.0.113.21"), ("beta.internet.", "203.0.113.21")])
def test_dns_answers_known_names(name, addr):
    rcode, records, answer = resolve(query(name))
    assert (rcode, records) == (0, [addr])
    assert answer[12:12 + len(qname(name))].lower() == qname(name).lower()


def test_dns_unknown_names_other_types_and_fresh_names():
    assert resolve(query("gamma"))[:2] == (3, [])
    assert resolve(query("alpha.internet.internet"))[:2] == (3, [])
    assert resolve(query("internet"))[:2] == (3, [])
    assert resolve(query(b"\0"))[:2] == (3, [])  # the root
    assert resolve(query(b"\x05al\xffha\0"))[:2] == (3, [])  # not ASCII
    assert resolve(query("alpha", qtype=28))[:2] == (0, [])  # AAAA: no data
    assert resolve(query("alpha", qtype=255))[:2] == (0, ["203.0.113.20"])
    assert resolve(query("alpha", flags=0))[:2] == (0, ["203.0.113.20"])
    table = {"alpha": "203.0.113.20"}
    svc = host(table)
    assert resolve(query("delta"), svc)[0] == 3
    table["delta"] = "203.0.113.99"  # names() is read at every query
    assert resolve(query("delta"), svc)[:2] == (0, ["203.0.113.99"])
    # Only the first question is answered.
    two = query("alpha", qdcount=2) + qname("beta") + struct.pack("!HH", 1, 1)
    assert resolve(two)[:2] == (0, ["203.0.113.20"])


def test_dns_compression_pointers():
    # A pointer back to offset 11, the low byte of ARCOUNT: 0, the root.
    assert resolve(query(b"\x05alpha\xc0\x0b"))[:2] == (0, ["203.0.113.20"])
    assert resolve(query(b"\xc0\x0c"))[0] == 1  # points at itself
    assert resolve(query(b"\x05alpha\xc0\x0c"))[0] == 1  # a loop through a label
    assert resolve(query(b"\x05alpha\xc0\x20"))[0] == 1  # points forward
    assert resolve(query(b"\x05alpha\xc0"))[0] == 1  # half a pointer
    assert resolve(query(b"\x05alpha\x40"))[0] == 1  # a reserved label type


def test_dns_malformed_queries():
    good = query("alpha")
    assert resolve(good[:-1])[:2] == (1, [])  # no room for the class
    assert resolve(good[:15])[:2] == (1, [])  # the name cut short
    assert resolve(query("alpha", qdcount=0)[:12])[:2] == (1, [])
    assert resolve(query(b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63
                         + b"\x3f" + b"a" * 63 + b"\0"))[0] == 1  # 257 octets: too long
    notimp = query("alpha", flags=2 << 11)
    assert resolve(notimp)[0] == 4
    svc = host()
    assert ask(svc, good[:11], dport=DNS_PORT) == []  # no header
    assert ask(svc, query("alpha", flags=0x8000), dport=DNS_PORT) == []  # a response
    assert ask(svc, good, dst=ALTERNATE, dport=DNS_PORT) == []  # DNS is on the primary


# --- anything at all ------------------------------------------------------------------


def valid_requests() -> list[tuple[int, bytes]]:
    return [(STUN_PORT, natprobe.request(b"f" * 12, 6)),
            (STUN_ALT_PORT, with_attrs(b"g" * 12, (0x0027, b"\x17\x70\0\0"), (0x8022, b"x"))),
            (DNS_PORT, query("alpha")), (DNS_PORT, query(b"\x05alpha\xc0\x0b", qtype=28)),
            (ECHO_PORT, b"echo")]


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, at, value in edits:
        at = at % (len(out) + 1)
        if kind == 0 and at < len(out):
            out[at] = value
        elif kind == 1:
            out.insert(at, value)
        elif kind == 2 and at < len(out):
            del out[at]
        else:
            del out[at:]
    return bytes(out)


def check_answers(answers: list[bytes]) -> None:
    assert isinstance(answers, list)
    for pkt in answers:
        assert checksum(pkt[:20]) == 0
        assert parse(pkt) is not None


EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 400), st.integers(0, 255)),
                 min_size=1, max_size=6)
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=120), st.sampled_from([STUN_PORT, STUN_ALT_PORT, DNS_PORT,
                                                 ECHO_PORT, 9]),
       st.sampled_from([PRIMARY, ALTERNATE]))
def test_random_payloads_never_raise(payload, port, dst):
    check_answers(ask(host(), payload, dst=dst, dport=port))


@FUZZ
@given(st.binary(max_size=120))
def test_random_packets_never_raise(pkt):
    for raw in (pkt, b"\x45" + pkt, bytes([0x45, 0]) + struct.pack("!H", len(pkt) + 4) + pkt):
        check_answers(host().handle(raw))


@FUZZ
@given(st.sampled_from(valid_requests()), EDITS)
def test_mutated_requests_never_raise(request, edits):
    port, payload = request
    check_answers(ask(host(), mutate(payload, edits), dport=port))


@FUZZ
@given(st.sampled_from(["stun", "dns", "icmp"]), EDITS)
def test_mutated_packets_never_raise(kind, edits):
    pkt = {"stun": udp_packet(ip(CLIENT), 1, ip(PRIMARY), STUN_PORT, natprobe.request(
        b"h" * 12)), "dns": udp_packet(ip(CLIENT), 1, ip(PRIMARY), DNS_PORT, query("beta")),
        "icmp": echo_request()}[kind]
    check_answers(host().handle(mutate(pkt, edits)))


# --- natprobe through pinnace's NAT, in-process -----------------------------------------

INSIDE = "192.168.1.2"


class FakeSock:
    """A UDP socket of the inside host on a FakeNet: what it receives is queued at once,
    so a receive on an empty queue times out at once."""

    def __init__(self, net: FakeNet, port: int) -> None:
        self.net, self.port = net, port
        self.inbox: deque[tuple[bytes, tuple[str, int]]] = deque()

    def sendto(self, data: bytes, address: tuple[str, int], /) -> int:
        self.net.send(udp_packet(ip(INSIDE), self.port, ip(address[0]), address[1], data))
        return len(data)

    def recvfrom(self, bufsize: int, /) -> tuple[bytes, tuple[str, int]]:
        if not self.inbox:
            raise TimeoutError
        return self.inbox.popleft()

    def settimeout(self, value: float | None, /) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", self.port)

    def close(self) -> None:
        self.net.socks.pop(self.port, None)


class FakeNet(natprobe.Network):
    """One inside host behind a pinnace NAT, the internet host's services outside."""

    def __init__(self, config: str, **overrides: Any) -> None:
        self.nat = Nat(preset(config, **overrides), "192.168.1.0/24", "203.0.113.10",
                       rng=random.Random(7))
        self.services = host()
        self.socks: dict[int, FakeSock] = {}
        self.next_port = 40000

    def open(self, port: int = 0) -> FakeSock:
        if not port:
            port, self.next_port = self.next_port, self.next_port + 1
        self.socks[port] = sock = FakeSock(self, port)
        return sock

    def source_ip(self, dest: str) -> str:
        return INSIDE

    def send(self, pkt: bytes) -> None:
        if pkt[16:20] == socket.inet_aton(INSIDE):  # to itself: never leaves the host
            return self.deliver(pkt)
        got = self.nat.outbound(pkt, 0.0)
        if got is not None and got[0] == "lan":  # hairpinned
            self.deliver(got[1])
        elif got is not None:
            for reply in self.services.handle(got[1]):
                back = self.nat.inbound(reply, 0.0)
                if back is not None:
                    self.deliver(back[1])

    def deliver(self, pkt: bytes) -> None:
        src, sport, dst, dport, payload = udp_ok(pkt)
        if dst == INSIDE and dport in self.socks:
            self.socks[dport].inbox.append((payload, (src, sport)))


@pytest.mark.parametrize("config,overrides,expected", [
    ("none", {}, (False, "eim", "eif", True, True)),
    ("fullcone", {}, (True, "eim", "eif", True, True)),
    ("one2one", {}, (True, "eim", "eif", True, True)),
    ("easy", {}, (True, "eim", "apdf", True, True)),
    ("restricted", {}, (True, "eim", "adf", True, True)),
    ("fullcone", {"mapping": "adm"}, (True, "adm", "eif", True, True)),
    # A dependent mapping sends the first socket's opener from another port than the
    # one the second socket sends to: only a filter that lets all in lets that in.
    ("easy", {"mapping": "adm", "filtering": "adf"}, (True, "adm", "adf", True, False)),
    ("hard", {}, (True, "apdm", "apdf", False, False)),
    ("easy", {"hairpin": False}, (True, "eim", "apdf", True, False)),
])
def test_natprobe_classifies_each_nat(config, overrides, expected):
    out, status = natprobe.classify((PRIMARY, STUN_PORT), local_port=5000, timeout=0.01,
                                    tries=2, net=FakeNet(config, **overrides))
    assert status == 0 and out["error"] is None, out
    assert out["local"] == f"{INSIDE}:5000"
    got = (out["nat"], out["mapping"], out["filtering"], out["preserves_port"],
           out["hairpin"])
    assert got == expected, out
    if config != "none":
        assert out["mapped"].startswith("203.0.113.10:")


def test_natprobe_reports_a_server_without_answers():
    net = FakeNet("easy")
    net.services = Services(ip("203.0.113.7"), ip("203.0.113.8"), dict)  # other addresses
    out, status = natprobe.classify((PRIMARY, STUN_PORT), timeout=0.01, tries=1, net=net)
    assert status == 1 and out["error"].startswith("no answer") and out["mapping"] is None
    out, status = natprobe.mapped((PRIMARY, STUN_PORT), timeout=0.01, tries=1, net=net)
    assert status == 1 and out["mapped"] is None


# --- natprobe as a program, on loopback ------------------------------------------------


class LoopbackStun:
    """Services on real UDP sockets: 127.0.0.1 and 127.0.0.2, a pair of free ports on
    both; each datagram is wrapped into an IPv4 packet for Services.handle, and each
    answer's payload sent from the socket of its source address and port."""

    def __init__(self) -> None:
        for _ in range(50):
            socks: dict[tuple[str, int], socket.socket] = {}
            try:
                ports: list[int] = []
                for _ in range(2):
                    first = self.bind("127.0.0.1", 0)
                    port = first.getsockname()[1]
                    socks[("127.0.0.1", port)] = first
                    socks[("127.0.0.2", port)] = self.bind("127.0.0.2", port)
                    ports.append(port)
                break
            except OSError:
                for s in socks.values():
                    s.close()
        else:
            pytest.skip("no pair of free UDP ports on 127.0.0.1 and 127.0.0.2")
        self.socks, self.port = socks, ports[0]
        self.services = Services(ip("127.0.0.1"), ip("127.0.0.2"), dict,
                                 ports=(ports[0], ports[1]))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    @staticmethod
    def bind(addr: str, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((addr, port))
        except OSError:
            s.close()
            raise
        return s

    def serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            for key, s in self.socks.items():
                sel.register(s, selectors.EVENT_READ, key)
            while not self.stop.is_set():
                for event, _ in sel.select(0.05):
                    here = event.data
                    data, (src, sport) = event.fileobj.recvfrom(65535)  # type: ignore[union-attr]
                    pkt = udp_packet(ip(src), sport, ip(here[0]), here[1], data)
                    for reply in self.services.handle(pkt):
                        rsrc, rsport, rdst, rdport, payload = udp_ok(reply)
                        with contextlib.suppress(OSError):
                            self.socks[(rsrc, rsport)].sendto(payload, (rdst, rdport))

    def __enter__(self) -> LoopbackStun:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks.values():
            s.close()


def probe(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(NATPROBE), *args], stdout=subprocess.PIPE,
                            text=True)


def result(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], int]:
    stdout, _ = proc.communicate(timeout=20)
    return json.loads(stdout), proc.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_natprobe_classifies_no_nat_on_loopback():
    with LoopbackStun() as server:
        classify = probe("classify", "127.0.0.1", "--port", str(server.port),
                         "--timeout", "0.5", "--retries", "2")
        mapped = probe("mapped", "localhost", "--port", str(server.port), "--timeout", "0.5")
        out, status = result(classify)
        got, mapped_status = result(mapped)
    assert status == 0, out
    assert out["local"] == out["mapped"] and out["local"].startswith("127.0.0.1:")
    assert (out["nat"], out["mapping"], out["filtering"], out["preserves_port"],
            out["hairpin"], out["error"]) == (False, "eim", "eif", True, True, None)
    assert mapped_status == 0 and got["mapped"] == got["local"] and got["error"] is None


def test_natprobe_without_a_server_says_so():
    out, status = result(probe("classify", "127.0.0.1", "--port", str(free_port()),
                               "--timeout", "0.1", "--retries", "1"))
    assert status == 1 and out["error"].startswith("no answer from 127.0.0.1:")
    assert set(out) == {"local", "mapped", "nat", "mapping", "filtering", "preserves_port",
                        "hairpin", "error"}


def test_natprobe_punches_between_two_probes():
    a, b = free_port(), free_port()
    while b == a:
        b = free_port()
    left = probe("punch", "--local-port", str(a), "--peer", f"127.0.0.1:{b}",
                 "--duration", "4", "--interval", "0.05")
    right = probe("punch", "--local-port", str(b), "--peer", f"127.0.0.1:{a}",
                  "--duration", "4", "--interval", "0.05")
    (one, s1), (two, s2) = result(left), result(right)
    assert (s1, s2) == (0, 0)
    assert one["ok"] and two["ok"], (one, two)
    assert one["received_from"] == [f"127.0.0.1:{b}"]
    assert two["received_from"] == [f"127.0.0.1:{a}"]
    assert one["received"] > 0 and one["sent"] > 0


def test_natprobe_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        natprobe.main(["punch", "--local-port", "1", "--peer", "nonsense"])
    with pytest.raises(SystemExit):
        natprobe.main(["classify", "x", "--port", "70000"])
