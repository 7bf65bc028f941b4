"""The services of the simulated internet's host, on IPv4 packets: what a guest reaches
at the internet's service addresses (a primary and an alternate one, both in
203.0.113.0/24).

- ICMP echo (ping) on both addresses.
- STUN (RFC 5389 Binding) on two UDP ports of both addresses, with RFC 5780's
  behaviour discovery: OTHER-ADDRESS, RESPONSE-ORIGIN and CHANGE-REQUEST (the answer
  comes from the other address and/or port), so a guest behind a pinnace NAT can
  classify its mapping and filtering (natprobe.py) and learn its public address for
  hole punching. RESPONSE-PORT is honoured too; other comprehension-required
  attributes get a 420 error. Authentication is not: MESSAGE-INTEGRITY, USERNAME and
  FINGERPRINT in a request are accepted and ignored.
- UDP echo (RFC 862) on port 7 of both addresses.
- DNS on UDP port 53 of the primary address: A records for the names of the machines on
  the internet (``NAME`` or ``NAME.internet``), TTL 5 s, as a resolver guests can use.

The internet's switch process feeds :meth:`Services.handle` the whole IPv4 packets sent
to those addresses and sends what it returns. Like a host's stack, it drops what it
cannot make sense of: bad checksums, fragments, truncated or inconsistent lengths,
requests to other ports, sources no answer can go to. Every length comes from the
packet, so none is trusted; no input raises. The packet builders
(:func:`ipv4_packet`, :func:`udp_packet`, :func:`icmp_echo_reply`) are public: the
router and the tests build packets with them. The standard library only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from ..errors import ConfigError
from .nat import ICMP, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, UDP, checksum

STUN_PORT, STUN_ALT_PORT = 3478, 3479
ECHO_PORT, DNS_PORT = 7, 53
SOFTWARE_NAME = b"pinnace"

# STUN (RFC 5389, RFC 5780)
MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST, BINDING_SUCCESS, BINDING_ERROR = 0x0001, 0x0101, 0x0111
MAPPED_ADDRESS, CHANGE_REQUEST, USERNAME, MESSAGE_INTEGRITY = 0x0001, 0x0003, 0x0006, 0x0008
ERROR_CODE, UNKNOWN_ATTRIBUTES, XOR_MAPPED_ADDRESS, RESPONSE_PORT = 0x0009, 0x000A, 0x0020, 0x0027
SOFTWARE, FINGERPRINT, RESPONSE_ORIGIN, OTHER_ADDRESS = 0x8022, 0x8028, 0x802B, 0x802C
CHANGE_IP, CHANGE_PORT = 0x04, 0x02
# Comprehension-required attributes a request may carry that this server understands
# (or knowingly ignores); any other below 0x8000 gets a 420 error.
KNOWN_REQUIRED = frozenset({CHANGE_REQUEST, USERNAME, MESSAGE_INTEGRITY, RESPONSE_PORT})

# DNS (RFC 1035)
DNS_TTL = 5
DNS_SUFFIX = ".internet"
QTYPE_A, QTYPE_ANY, QCLASS_IN, QCLASS_ANY = 1, 255, 1, 255
NOERROR, FORMERR, NXDOMAIN, NOTIMP = 0, 1, 3, 4
MAX_NAME = 255  # octets of a name in wire form, the root's zero included
MAX_JUMPS = 32  # compression pointers followed in one name

MAX_PAYLOAD = 65535 - 20


# --- packets -------------------------------------------------------------------------


def ipv4_packet(src: int, dst: int, proto: int, payload: bytes, *, ttl: int = 64,
                ident: int = 0) -> bytes:
    """An IPv4 packet (a 20-byte header, no options, not fragmented) around ``payload``,
    its header checksum computed."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"an IPv4 payload of {len(payload)} bytes: at most {MAX_PAYLOAD}")
    header = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(payload), ident & 0xFFFF, 0,
                         ttl & 0xFF, proto & 0xFF, 0, src, dst)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def udp_packet(src: int, sport: int, dst: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 packet of one UDP datagram, with its checksum (pseudo-header included)."""
    length = 8 + len(payload)
    if length > MAX_PAYLOAD:
        raise ValueError(f"a UDP payload of {len(payload)} bytes: at most {MAX_PAYLOAD - 8}")
    datagram = struct.pack("!HHHH", sport, dport, length, 0) + payload
    pseudo = struct.pack("!IIBBH", src, dst, 0, UDP, length)
    csum = checksum(pseudo + datagram) or 0xFFFF  # 0 means "no checksum" in UDP
    return ipv4_packet(src, dst, UDP, datagram[:6] + struct.pack("!H", csum) + datagram[8:])


class _Ip(NamedTuple):
    src: int
    dst: int
    proto: int
    l4: bytes  # the transport header and payload, cut at the packet's total length


def _ipv4(pkt: bytes) -> _Ip | None:
    """The addresses, protocol and transport bytes of a whole, unfragmented IPv4 packet
    whose header checksum verifies; None for anything else."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 15) * 4
    total = int.from_bytes(pkt[2:4], "big")
    if ihl < 20 or total < ihl or total > len(pkt) or checksum(pkt[:ihl]) != 0:
        return None
    if int.from_bytes(pkt[6:8], "big") & 0x3FFF:  # more fragments, or a later one
        return None
    src, dst = struct.unpack_from("!II", pkt, 12)
    return _Ip(src, dst, pkt[9], pkt[ihl:total])


class _Udp(NamedTuple):
    src: int
    sport: int
    dst: int
    dport: int
    payload: bytes


def _udp(ip: _Ip) -> _Udp | None:
    """The UDP datagram in ``ip``, if its lengths agree and its checksum (when it has
    one) verifies."""
    if ip.proto != UDP or len(ip.l4) < 8:
        return None
    sport, dport, length, csum = struct.unpack_from("!HHHH", ip.l4)
    if length < 8 or length > len(ip.l4):
        return None
    datagram = ip.l4[:length]
    if csum:
        pseudo = struct.pack("!IIBBH", ip.src, ip.dst, 0, UDP, length)
        if checksum(pseudo + datagram) != 0:
            return None
    return _Udp(ip.src, sport, ip.dst, dport, datagram[8:])


def _icmp_echo_reply(ip: _Ip) -> bytes | None:
    l4 = ip.l4
    if ip.proto != ICMP or len(l4) < 8 or l4[0] != ICMP_ECHO_REQUEST or l4[1] != 0:
        return None
    if checksum(l4) != 0:
        return None
    body = bytes([ICMP_ECHO_REPLY, 0]) + b"\0\0" + l4[4:]
    reply = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4_packet(ip.dst, ip.src, ICMP, reply)


def icmp_echo_reply(pkt: bytes) -> bytes | None:
    """The echo reply to an ICMP echo request packet (identifier, sequence number and
    data kept; from its destination to its source); None if ``pkt`` is not a whole,
    well-formed echo request."""
    ip = _ipv4(pkt)
    return None if ip is None else _icmp_echo_reply(ip)


def _unicast(addr: int) -> bool:
    """Whether an answer can go to ``addr``: not 0.0.0.0/8, multicast, reserved or the
    limited broadcast."""
    first = addr >> 24
    return 0 < first < 224


# --- STUN ----------------------------------------------------------------------------


def _stun_message(data: bytes) -> tuple[int, bytes, list[tuple[int, bytes]]] | None:
    """(type, transaction id, attributes) of a STUN message whose header and attribute
    lengths all add up to the datagram's length; None for anything else."""
    if len(data) < 20:
        return None
    mtype, length, cookie = struct.unpack_from("!HHI", data)
    if mtype & 0xC000 or cookie != MAGIC_COOKIE or length % 4 or 20 + length != len(data):
        return None
    attrs: list[tuple[int, bytes]] = []
    at = 20
    while at < len(data):
        if at + 4 > len(data):
            return None
        atype, alen = struct.unpack_from("!HH", data, at)
        end = at + 4 + alen
        if end > len(data):
            return None
        attrs.append((atype, data[at + 4:end]))
        at = end + (-alen % 4)  # values are padded to 4 bytes
    if at != len(data):  # the last value's padding ran past the end
        return None
    return mtype, data[8:20], attrs


def _attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + b"\0" * (-len(value) % 4)


def _address(atype: int, ip: int, port: int) -> bytes:
    return _attr(atype, struct.pack("!BBHI", 0, 1, port, ip))  # family 1: IPv4


def _xor_address(ip: int, port: int) -> bytes:
    return _address(XOR_MAPPED_ADDRESS, ip ^ MAGIC_COOKIE, port ^ (MAGIC_COOKIE >> 16))


def _stun(mtype: int, txid: bytes, attrs: list[bytes]) -> bytes:
    body = b"".join(attrs)
    return struct.pack("!HHI", mtype, len(body), MAGIC_COOKIE) + txid + body


# --- DNS -----------------------------------------------------------------------------


def _dns_name(msg: bytes, at: int) -> tuple[list[bytes], int] | None:
    """The labels of the name at ``at`` and the offset just past it (past its first
    compression pointer, if it has one); None if it runs off the end, uses a reserved
    label type, points forward or at itself, jumps too often or is too long."""
    labels: list[bytes] = []
    size, jumps, end, pos = 1, 0, -1, at
    while True:
        if pos >= len(msg):
            return None
        n = msg[pos]
        if n >= 0xC0:  # a compression pointer: only ever backwards, so pointers alone
            if pos + 1 >= len(msg):  # cannot loop, and labels between are counted
                return None
            target = (n & 0x3F) << 8 | msg[pos + 1]
            jumps += 1
            if target >= pos or jumps > MAX_JUMPS:
                return None
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:  # 0x40 and 0x80: extended and reserved label types
            return None
        if n == 0:
            return labels, (pos + 1 if end < 0 else end)
        label = msg[pos + 1:pos + 1 + n]
        size += 1 + n
        if len(label) < n or size > MAX_NAME:
            return None
        labels.append(label)
        pos += 1 + n


def _dns_response(query: bytes, names: dict[str, int]) -> bytes | None:
    """The answer to a DNS query (its first question only) from ``names``; None if the
    query is not one (too short for a header, or a response)."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack_from("!HHH", query)
    if flags & 0x8000:  # a response: never answer one
        return None
    opcode = flags >> 11 & 0xF

    def reply(rcode: int, question: bytes = b"", answer: bytes = b"") -> bytes:
        out = 0x8000 | opcode << 11 | 0x0400 | flags & 0x0100 | 0x0080 | rcode  # QR AA RD RA
        return struct.pack("!HHHHHH", ident, out, 1 if question else 0, 1 if answer else 0,
                           0, 0) + question + answer

    if opcode != 0:
        return reply(NOTIMP)
    if qdcount == 0:
        return reply(FORMERR)
    parsed = _dns_name(query, 12)
    if parsed is None or parsed[1] + 4 > len(query):
        return reply(FORMERR)
    labels, end = parsed
    qtype, qclass = struct.unpack_from("!HH", query, end)
    question = b"".join(bytes([len(x)]) + x for x in labels) + b"\0" + query[end:end + 4]
    addr = _lookup(labels, names)
    if addr is None:
        return reply(NXDOMAIN, question)
    if qtype not in (QTYPE_A, QTYPE_ANY) or qclass not in (QCLASS_IN, QCLASS_ANY):
        return reply(NOERROR, question)  # the name exists, without records of that type
    answer = struct.pack("!HHHIHI", 0xC00C, QTYPE_A, QCLASS_IN, DNS_TTL, 4, addr)
    return reply(NOERROR, question, answer)


def _lookup(labels: list[bytes], names: dict[str, int]) -> int | None:
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    if not name:
        return None
    table = {k.lower().rstrip("."): v for k, v in names.items()}
    if name in table:
        return table[name]
    if name.endswith(DNS_SUFFIX):
        return table.get(name[:-len(DNS_SUFFIX)])
    return None


# --- the host ------------------------------------------------------------------------


class Services:
    """The internet host's services at ``primary`` and ``alternate`` (IPv4 addresses as
    ints): STUN on ``ports`` (a primary and an alternate port) of both, echo on both, DNS
    on the primary answering from ``names()`` (name -> address, read at each query)."""

    def __init__(self, primary: int, alternate: int, names: Callable[[], dict[str, int]],
                 *, ports: tuple[int, int] = (STUN_PORT, STUN_ALT_PORT)) -> None:
        if primary == alternate:
            raise ConfigError("STUN addresses", str(primary), "give two different addresses")
        if len(set(ports)) != 2 or set(ports) & {0, ECHO_PORT, DNS_PORT} \
                or not all(0 < p < 65536 for p in ports):
            raise ConfigError("STUN ports", str(ports),
                              f"give two different UDP ports, not {ECHO_PORT} or {DNS_PORT}")
        self.primary, self.alternate = primary, alternate
        self.ports = ports
        self.names = names

    def handle(self, pkt: bytes) -> list[bytes]:
        """The IPv4 packets that answer ``pkt`` (sent to one of our addresses): none for
        anything that is not a well-formed request to a service."""
        ip = _ipv4(pkt)
        if ip is None or ip.dst not in (self.primary, self.alternate) or not _unicast(ip.src):
            return []
        if ip.proto == ICMP:
            reply = _icmp_echo_reply(ip)
            return [reply] if reply is not None else []
        udp = _udp(ip)
        if udp is None or udp.sport == 0:
            return []
        if udp.dport in self.ports:
            return self._stun(udp)
        if udp.dport == ECHO_PORT:
            return [udp_packet(udp.dst, udp.dport, udp.src, udp.sport, udp.payload)]
        if udp.dport == DNS_PORT and udp.dst == self.primary:
            answer = _dns_response(udp.payload, self.names())
            return [udp_packet(udp.dst, udp.dport, udp.src, udp.sport, answer)] if answer else []
        return []

    def _other(self, addr: int) -> int:
        return self.alternate if addr == self.primary else self.primary

    def _other_port(self, port: int) -> int:
        return self.ports[1] if port == self.ports[0] else self.ports[0]

    def _stun(self, udp: _Udp) -> list[bytes]:
        msg = _stun_message(udp.payload)
        if msg is None or msg[0] != BINDING_REQUEST:
            return []
        _, txid, attrs = msg
        change, reply_port, unknown = 0, udp.sport, []
        for atype, value in attrs:
            if atype == CHANGE_REQUEST:
                if len(value) != 4:
                    return []
                change = int.from_bytes(value, "big")
            elif atype == RESPONSE_PORT:  # a port, then 16 bits of padding (RFC 5780)
                if len(value) not in (2, 4) or not int.from_bytes(value[:2], "big"):
                    return []
                reply_port = int.from_bytes(value[:2], "big")
            elif atype < 0x8000 and atype not in KNOWN_REQUIRED and atype not in unknown:
                unknown.append(atype)
        if unknown:  # RFC 5389 7.3.1: 420, listing them, from where the request went
            listed = b"".join(struct.pack("!H", a) for a in unknown)
            error = _attr(ERROR_CODE, struct.pack("!HBB", 0, 4, 20) + b"Unknown Attribute")
            body = _stun(BINDING_ERROR, txid, [error, _attr(UNKNOWN_ATTRIBUTES, listed)])
            return [udp_packet(udp.dst, udp.dport, udp.src, udp.sport, body)]
        src = self._other(udp.dst) if change & CHANGE_IP else udp.dst
        sport = self._other_port(udp.dport) if change & CHANGE_PORT else udp.dport
        body = _stun(BINDING_SUCCESS, txid, [
            _xor_address(udp.src, udp.sport),
            _address(MAPPED_ADDRESS, udp.src, udp.sport),
            _address(RESPONSE_ORIGIN, src, sport),
            _address(OTHER_ADDRESS, self._other(udp.dst), self._other_port(udp.dport)),
            _attr(SOFTWARE, SOFTWARE_NAME),
        ])
        return [udp_packet(src, sport, udp.src, reply_port, body)]


__all__ = ["DNS_PORT", "ECHO_PORT", "STUN_ALT_PORT", "STUN_PORT", "Services",
           "icmp_echo_reply", "ipv4_packet", "udp_packet"]
