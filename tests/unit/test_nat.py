"""NAT translation (pinnace.network.nat) on real IPv4 packets with a fake clock: each
preset's mapping and filtering as RFC 4787 defines them, expiry, hairpinning, ICMP echo,
and checksums that a full recomputation agrees with."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinnace.errors import ConfigError
from pinnace.network.nat import ICMP, TCP, UDP, Nat, checksum, parse, preset, rewrite

LAN = "192.168.1.0/24"
WAN = "203.0.113.10"
A, B = "192.168.1.2", "192.168.1.3"
S1, S2 = "198.51.100.1", "198.51.100.2"  # two servers outside


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def packet(proto: int, src: str, sport: int, dst: str, dport: int,
           payload: bytes = b"hello", icmp_type: int = 8) -> bytes:
    """An IPv4 packet with correct checksums, built from scratch."""
    if proto == UDP:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    elif proto == TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + payload
    else:
        l4 = struct.pack("!BBHHH", icmp_type, 0, 0, sport, 1) + payload
    header = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                         ip(src), ip(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + fill_l4(proto, header, l4)


def fill_l4(proto: int, header: bytes, l4: bytes) -> bytes:
    if proto == ICMP:
        return l4[:2] + struct.pack("!H", checksum(l4)) + l4[4:]
    pseudo = header[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    at = 16 if proto == TCP else 6
    csum = checksum(pseudo + l4)
    return l4[:at] + struct.pack("!H", csum or 0xFFFF) + l4[at + 2:]


def checksums_ok(pkt: bytes) -> bool:
    """Every checksum in ``pkt`` verifies (a recomputation over it gives 0)."""
    header, l4 = pkt[:20], pkt[20:]
    if checksum(header) != 0:
        return False
    if pkt[9] == ICMP:
        return checksum(l4) == 0
    if pkt[9] == UDP and l4[6:8] == b"\0\0":
        return True
    pseudo = header[12:20] + struct.pack("!BBH", 0, pkt[9], len(l4))
    return checksum(pseudo + l4) == 0


def endpoint(pkt: bytes, which: str) -> tuple[str, int]:
    f = parse(pkt)
    assert f is not None
    addr, port = (f.src, f.sport) if which == "src" else (f.dst, f.dport)
    return str(ipaddress.IPv4Address(addr)), port


def nat(name: str, seed: int = 1, **overrides) -> Nat:
    return Nat(preset(name, **overrides), LAN, WAN, rng=random.Random(seed))


def out(n: Nat, src=A, sport=5000, dst=S1, dport=3478, proto=UDP, now=0.0):
    got = n.outbound(packet(proto, src, sport, dst, dport), now)
    assert got is not None and got[0] == "wan"
    assert checksums_ok(got[1])
    return endpoint(got[1], "src")


def back(n: Nat, ext_port: int, src=S1, sport=3478, proto=UDP, now=0.0):
    got = n.inbound(packet(proto, src, sport, WAN, ext_port), now)
    if got is None:
        return None
    assert got[0] == "lan" and checksums_ok(got[1])
    return endpoint(got[1], "dst")


# --- mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fullcone", "easy", "restricted", "one2one"])
def test_endpoint_independent_mapping_keeps_one_port_for_every_destination(name):
    n = nat(name)
    first = out(n, dst=S1, dport=3478)
    assert first == (WAN, 5000)  # the port is preserved
    assert out(n, dst=S2, dport=80) == first
    assert out(n, dst=S1, dport=3479) == first


def test_hard_gives_each_destination_its_own_random_port():
    n = nat("hard")
    ports = {out(n, dst=d, dport=p)[1] for d in (S1, S2) for p in (3478, 3479)}
    assert len(ports) == 4 and 5000 not in ports
    assert out(n, dst=S1, dport=3478)[1] in ports  # the same flow keeps its mapping


def test_address_dependent_mapping():
    n = nat("easy", mapping="adm")
    assert out(n, dst=S1, dport=1) == out(n, dst=S1, dport=2)
    assert out(n, dst=S2, dport=1) != out(n, dst=S1, dport=1)


def test_two_inside_hosts_never_share_an_outside_port():
    n = nat("easy")
    a = out(n, src=A, sport=5000)
    b = out(n, src=B, sport=5000)  # the same inside port: one of them moves
    assert a != b and a[1] == 5000


# --- filtering -------------------------------------------------------------------------


def test_fullcone_lets_anyone_in_once_mapped():
    n = nat("fullcone")
    port = out(n)[1]
    assert back(n, port, src=S2, sport=9999) == (A, 5000)


def test_restricted_lets_in_only_addresses_it_sent_to():
    n = nat("restricted")
    port = out(n, dst=S1, dport=3478)[1]
    assert back(n, port, src=S1, sport=9999) == (A, 5000)  # another port of S1: yes
    assert back(n, port, src=S2, sport=3478) is None


@pytest.mark.parametrize("name", ["easy", "hard"])
def test_port_dependent_filtering_lets_in_only_endpoints_it_sent_to(name):
    n = nat(name)
    port = out(n, dst=S1, dport=3478)[1]
    assert back(n, port, src=S1, sport=3478) == (A, 5000)
    assert back(n, port, src=S1, sport=3479) is None
    assert back(n, port, src=S2, sport=3478) is None


def test_nothing_comes_in_without_a_mapping():
    n = nat("fullcone")
    assert back(n, 5000) is None
    assert n.dropped == 1


def test_one2one_lets_anything_in_to_its_host():
    n = nat("one2one")
    out(n, src=A, sport=5000)
    assert back(n, 7777, src=S2, sport=1) == (A, 7777)  # any port, never sent from
    assert n.outbound(packet(UDP, B, 1, S1, 2), 0.0) is None  # one host only


def test_none_routes_without_translating():
    n = nat("none")
    pkt = packet(UDP, A, 5000, S1, 53)
    assert n.outbound(pkt, 0.0) == ("wan", pkt)
    reply = packet(UDP, S1, 53, A, 5000)
    assert n.inbound(reply, 0.0) == ("lan", reply)


# --- expiry, ICMP, TCP, hairpin --------------------------------------------------------


def test_mappings_expire_and_traffic_refreshes_them():
    n = nat("easy", timeout=30)
    port = out(n, now=0.0)[1]
    assert back(n, port, now=25.0) == (A, 5000)  # inbound refreshes too
    assert back(n, port, now=50.0) == (A, 5000)
    assert back(n, port, now=85.0) is None  # 35 s idle: gone
    assert n.mappings() == []
    assert out(n, now=86.0) == (WAN, 5000)  # a new one


def test_ping_across_the_nat():
    n = nat("hard")
    got = n.outbound(packet(ICMP, A, 77, S1, 77), 0.0)
    assert got is not None and checksums_ok(got[1])
    ext_id = parse(got[1]).sport
    reply = n.inbound(packet(ICMP, S1, ext_id, WAN, ext_id, icmp_type=0), 0.0)
    assert reply is not None and checksums_ok(reply[1])
    assert endpoint(reply[1], "dst") == (A, 77)
    assert n.inbound(packet(ICMP, S2, ext_id, WAN, ext_id, icmp_type=0), 0.0) is None
    assert n.inbound(packet(ICMP, S1, 1, WAN, 1, icmp_type=8), 0.0) is None  # no request in


def test_tcp_is_translated_with_its_checksum():
    n = nat("easy")
    assert out(n, proto=TCP, sport=40000, dport=443) == (WAN, 40000)
    assert back(n, 40000, sport=443, proto=TCP) == (A, 40000)


def test_hairpinning_reaches_an_inside_host_through_the_outside_address():
    n = nat("fullcone")
    b_port = out(n, src=B, sport=6000)[1]
    got = n.outbound(packet(UDP, A, 5000, WAN, b_port), 0.0)
    assert got is not None and got[0] == "lan" and checksums_ok(got[1])
    assert endpoint(got[1], "dst") == (B, 6000)
    assert endpoint(got[1], "src") == (WAN, 5000)  # as B would see A from outside
    off = nat("fullcone", hairpin=False)
    b_port = out(off, src=B, sport=6000)[1]
    assert off.outbound(packet(UDP, A, 5000, WAN, b_port), 0.0) is None


def test_what_it_cannot_translate_is_dropped():
    n = nat("easy")
    assert n.outbound(b"\x45" + bytes(10), 0.0) is None  # cut short
    assert n.outbound(packet(UDP, "10.9.9.9", 1, S1, 2), 0.0) is None  # not from inside
    frag = bytearray(packet(UDP, A, 1, S1, 2))
    frag[6:8] = (100).to_bytes(2, "big")  # a later fragment
    assert n.outbound(bytes(frag), 0.0) is None


def test_presets_and_overrides_are_checked():
    assert preset("easy", timeout=30).timeout == 30
    with pytest.raises(ConfigError, match="give one of none, one2one"):
        preset("symmetric")
    with pytest.raises(ConfigError, match="NAT mapping"):
        preset("easy", mapping="full")


@settings(max_examples=200, deadline=None)
@given(proto=st.sampled_from([UDP, TCP]), sport=st.integers(1, 65535),
       dport=st.integers(1, 65535), payload=st.binary(max_size=64),
       new_port=st.integers(1, 65535), new_ip=st.integers(0, 2**32 - 1))
def test_incremental_checksums_match_a_full_recomputation(proto, sport, dport, payload,
                                                          new_port, new_ip):
    pkt = packet(proto, A, sport, S1, dport, payload)
    f = parse(pkt)
    changed = rewrite(pkt, f, src=new_ip, sport=new_port)
    assert checksums_ok(changed)
    assert endpoint(changed, "src") == (str(ipaddress.IPv4Address(new_ip)), new_port)


# --- NAT-PMP -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["easy", "hard"])
def test_a_port_asked_for_is_open_to_anyone_until_its_lifetime_ends(name):
    n = nat(name, pmp=True)
    assert back(n, 7000) is None
    assert n.request(UDP, ip(A), 7000, 7000, 60, now=0.0) == (0, 7000, 60.0)
    assert back(n, 7000, src=S2, sport=1234, now=10.0) == (A, 7000)  # anyone, any port
    # The port's own traffic leaves through it, even behind an APDM NAT.
    assert out(n, sport=7000, dst=S2, dport=9, now=20.0) == (WAN, 7000)
    # Idle for longer than the timeout means nothing: the lifetime does.
    assert back(n, 7000, now=59.0) == (A, 7000)
    assert back(n, 7000, now=61.5) is None
    # A taken port gets another; lifetime 0 removes the mapping.
    n.request(UDP, ip(A), 7000, 7000, 60, now=100.0)
    _, other, _ = n.request(UDP, ip(B), 7000, 7000, 60, now=100.0)
    assert other != 7000
    assert n.request(UDP, ip(B), 7000, other, 0, now=101.0) == (0, 0, 0.0)
    assert back(n, other, now=102.0) is None
    # Internal port 0 and lifetime 0: every mapping this host asked for.
    n.request(UDP, ip(A), 0, 0, 0, now=103.0)
    assert back(n, 7000, now=104.0) is None


def test_an_existing_mapping_is_the_one_kept_open():
    n = nat("easy", pmp=True)
    assert out(n, sport=5000) == (WAN, 5000)
    assert n.request(UDP, ip(A), 5000, 9999, 30, now=1.0) == (0, 5000, 30.0)
    assert back(n, 5000, src=S2, sport=1, now=2.0) == (A, 5000)


def test_a_delete_leaves_a_flows_own_mapping_and_port_zero_is_refused():
    n = nat("easy", pmp=True)
    assert out(n, sport=5000) == (WAN, 5000)
    assert n.request(UDP, ip(A), 5000, 0, 0, now=1.0) == (0, 0, 0.0)  # nothing asked for
    assert back(n, 5000, now=2.0) == (A, 5000)  # the flow goes on
    assert n.request(UDP, ip(A), 0, 0, 60, now=3.0) == (2, 0, 0.0)


# --- what RFC 4787 and 5508 ask of the rest --------------------------------------------


def fragments(src: str, dst: str, payload: bytes, ident: int = 0x4242, sport: int = 5000,
              dport: int = 3478) -> list[bytes]:
    """A UDP datagram in two IPv4 fragments (the first with the UDP header)."""
    whole = packet(UDP, src, sport, dst, dport, payload)
    body = whole[20:]
    first, rest = body[:len(body) // 16 * 8], body[len(body) // 16 * 8:]
    out = []
    for offset, more, part in ((0, 0x2000, first), (len(first) // 8, 0, rest)):
        hdr = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(part), ident, more | offset, 64,
                          UDP, 0, ip(src), ip(dst))
        out.append(hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + part)
    return out


def test_later_fragments_follow_their_first_both_ways():
    n = nat("easy")
    one, two = fragments(A, S1, bytes(3000))
    got1, got2 = n.outbound(one, 0.0), n.outbound(two, 0.0)
    assert got1 is not None and got2 is not None
    for _, frag in (got1, got2):
        assert frag[12:16] == ipaddress.IPv4Address(WAN).packed and checksum(frag[:20]) == 0
    # Inbound: the reply's fragments, to the mapped port, reach A.
    reply = fragments(S1, WAN, bytes(3000), ident=7, sport=3478, dport=5000)
    first_in, later_in = n.inbound(reply[0], 1.0), n.inbound(reply[1], 1.0)
    assert first_in is not None and later_in is not None
    assert first_in[1][16:20] == later_in[1][16:20] == ipaddress.IPv4Address(A).packed
    assert checksum(later_in[1][:20]) == 0
    # A later fragment nobody's first fragment announced is dropped.
    assert n.inbound(fragments(S2, WAN, bytes(3000), ident=99)[1], 1.0) is None


def icmp_error(kind: int, src: str, quoted: bytes) -> bytes:
    body = struct.pack("!BBHI", kind, 3 if kind == 3 else 0, 0, 0) + quoted[:28]
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    hdr = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(body), 0, 0, 64, ICMP, 0, ip(src),
                      ip(WAN))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + body


@pytest.mark.parametrize("name", ["easy", "hard"])
def test_icmp_errors_about_a_mapping_reach_its_inside_host(name):
    n = nat(name)
    got = n.outbound(packet(UDP, A, 5000, S1, 3478), 0.0)
    assert got is not None
    sent = got[1]
    ext = parse(sent).sport
    err = n.inbound(icmp_error(3, S1, sent), 1.0)  # port unreachable, from S1
    assert err is not None and err[0] == "lan"
    pkt = err[1]
    assert pkt[16:20] == ipaddress.IPv4Address(A).packed
    assert checksum(pkt[:20]) == 0 and checksum(pkt[20:]) == 0  # outer IP and ICMP
    quoted = pkt[28:]
    assert quoted[12:16] == ipaddress.IPv4Address(A).packed and checksum(quoted[:20]) == 0
    assert struct.unpack_from("!H", quoted, 20)[0] == 5000  # the inside port again
    # Time exceeded from a router on the way (not a peer) about the same flow: in too.
    assert n.inbound(icmp_error(11, "198.51.100.254", sent), 1.0) is not None
    # About a flow to somewhere the mapping never sent: dropped.
    other = sent[:16] + ipaddress.IPv4Address(S2).packed + sent[20:]
    assert n.inbound(icmp_error(3, S2, other), 1.0) is None
    assert ext


def test_tcp_mappings_outlive_udp_ones():
    n = nat("easy")
    out(n, proto=TCP, sport=6000, now=0.0)
    out(n, proto=UDP, sport=6001, now=0.0)
    assert back(n, 6001, now=400.0) is None  # UDP: 5 minutes
    assert back(n, 6000, proto=TCP, now=400.0) == (A, 6000)  # TCP: 2 h 4 min
    assert back(n, 6000, proto=TCP, now=401.0 + 7440) is None


def test_a_mapping_remembers_a_bounded_number_of_peers():
    n = nat("restricted")
    for i in range(3000):
        n.outbound(packet(UDP, A, 5000, str(ipaddress.IPv4Address(ip(S1) + i)), 9), 0.0)
    [m] = n._by_key.values()
    assert len(m.addrs) == len(m.peers) == 1024
    assert back(n, 5000, src=str(ipaddress.IPv4Address(ip(S1) + 2999)), now=1.0) == (A, 5000)
    assert back(n, 5000, src=S1, now=1.0) is None  # the oldest, forgotten
