"""NAT in the behaviours of RFC 4787, on IPv4 packets: the translation a pinnace NAT
router applies between a network and the simulated internet.

A :class:`Nat` has a mapping behaviour (endpoint-independent, address-dependent or
address-and-port-dependent: which outbound flows share an external port), a filtering
behaviour (the same three: which inbound packets a mapping lets in), port preservation
(keep the internal port when it is free; else a random one), hairpinning (a packet
from inside to the NAT's own external address comes back in, translated both ways) and
a mapping timeout (refreshed by traffic either way). :data:`PRESETS` names the usual
kinds. TCP, UDP and ICMP echo (its identifier as the "port", so ping works) are
translated; checksums are updated incrementally (RFC 1624), never recomputed.

This module is the translation alone, on bytes, with a clock passed in: the router
(a later step) feeds it the packets it takes off each side's switch. The standard
library only.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError

TCP, UDP, ICMP = 6, 17, 1
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
MAPPINGS = ("eim", "adm", "apdm")  # endpoint-independent, address-, address-and-port-dependent
FILTERINGS = ("eif", "adf", "apdf")
DEFAULT_TIMEOUT = 300.0  # RFC 4787 REQ-5: at least 2 minutes; 5 recommended
TCP_TIMEOUT = 7440.0  # RFC 5382 REQ-5: an established TCP flow, at least 2 h 4 min
PEERS_MAX = 1024  # remote endpoints a mapping remembers for its filter (oldest forgotten)
FRAGMENTS_MAX = 1024  # fragmented datagrams followed at once
FRAGMENT_TIME = 30.0  # seconds a datagram's later fragments are waited for
ICMP_UNREACHABLE, ICMP_TIME_EXCEEDED = 3, 11
PORT_RANGE = (1024, 65535)


@dataclass(frozen=True)
class NatConfig:
    """How a NAT behaves (see the module's docstring); ``translate`` False: routed."""

    translate: bool = True
    mapping: str = "eim"
    filtering: str = "apdf"
    port_preserve: bool = True
    hairpin: bool = True
    timeout: float = DEFAULT_TIMEOUT  # UDP and ICMP echo; TCP: tcp_timeout
    tcp_timeout: float = TCP_TIMEOUT
    one2one: bool = False  # one inside host owns the external address, every port of it
    pmp: bool = False  # the router answers NAT-PMP (RFC 6886) requests for port mappings

    def check(self) -> NatConfig:
        if self.mapping not in MAPPINGS:
            raise ConfigError("NAT mapping", self.mapping, f"give one of {', '.join(MAPPINGS)}")
        if self.filtering not in FILTERINGS:
            raise ConfigError("NAT filtering", self.filtering,
                              f"give one of {', '.join(FILTERINGS)}")
        for name, value in (("timeout", self.timeout), ("TCP timeout", self.tcp_timeout)):
            if not 1 <= value <= 86400:
                raise ConfigError(f"NAT {name}", str(value), "give 1 to 86400 seconds")
        return self


PRESETS: dict[str, NatConfig] = {
    "none": NatConfig(translate=False),
    "one2one": NatConfig(mapping="eim", filtering="eif", one2one=True),
    "fullcone": NatConfig(mapping="eim", filtering="eif"),
    "easy": NatConfig(mapping="eim", filtering="apdf"),
    "restricted": NatConfig(mapping="eim", filtering="adf"),
    "hard": NatConfig(mapping="apdm", filtering="apdf", port_preserve=False),
}


def preset(name: str, **overrides: object) -> NatConfig:
    """A preset, with fields changed: ``preset("easy", timeout=30)``."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError("NAT", name, f"give one of {', '.join(PRESETS)}") from None
    return replace(base, **overrides).check()  # type: ignore[arg-type]


_KINDS = {"endpoint-independent": 0, "address-dependent": 1, "address-and-port-dependent": 2}
_TIMEOUT_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def options(*, mapping: str | None = None, filtering: str | None = None,
            hairpin: bool | None = None, timeout: str | float | None = None,
            tcp_timeout: str | float | None = None, port_preserve: bool | None = None,
            pmp: bool | None = None) -> dict[str, object]:
    """NatConfig fields from a user's words (those left None are not set): mapping and
    filtering as RFC 4787 names them ("endpoint-independent", "address-dependent",
    "address-and-port-dependent") or short (eim/adm/apdm, eif/adf/apdf); a timeout in
    seconds, or with a unit ("30s", "5m", "2h")."""
    out: dict[str, object] = {}
    for key, text, names in (("mapping", mapping, MAPPINGS), ("filtering", filtering,
                                                               FILTERINGS)):
        if text is None:
            continue
        word = text.strip().lower()
        if word in _KINDS:
            word = names[_KINDS[word]]
        if word not in names:
            raise ConfigError(f"NAT {key}", text, "give endpoint-independent, "
                              "address-dependent or address-and-port-dependent "
                              f"(or {', '.join(names)})")
        out[key] = word
    for key, given in (("timeout", timeout), ("tcp_timeout", tcp_timeout)):
        if given is None:
            continue
        if isinstance(given, (int, float)) and not isinstance(given, bool):
            out[key] = float(given)
            continue
        text = str(given).strip().lower()
        unit = text[-1] if text[-1:] in ("s", "m", "h") else ""
        try:
            out[key] = float(text.removesuffix(unit)) * _TIMEOUT_UNITS[unit]
        except ValueError:
            raise ConfigError(f"NAT {key.replace('_', ' ')}", str(given), "give seconds, "
                              "or a time such as 30s, 5m or 2h") from None
    if hairpin is not None:
        out["hairpin"] = bool(hairpin)
    if port_preserve is not None:
        out["port_preserve"] = bool(port_preserve)
    if pmp is not None:
        out["pmp"] = bool(pmp)
    return out


# --- packets -------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """What NAT needs of an IPv4 packet: protocol, addresses, ports (an ICMP echo's
    identifier as both), and where its transport header starts."""

    proto: int
    src: int
    dst: int
    sport: int
    dport: int
    l4: int  # offset of the TCP/UDP/ICMP header
    icmp_type: int = -1


def parse(pkt: bytes) -> Flow | None:
    """The flow of an IPv4 packet NAT can translate (TCP, UDP, ICMP echo, not a
    fragment past the first); None for anything else. Never trusts a length."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 15) * 4
    total = int.from_bytes(pkt[2:4], "big")
    if ihl < 20 or total < ihl or total > len(pkt):
        return None
    if int.from_bytes(pkt[6:8], "big") & 0x1FFF:  # a later fragment: no ports in it
        return None
    proto = pkt[9]
    src, dst = struct.unpack_from("!II", pkt, 12)
    if proto in (TCP, UDP):
        if total < ihl + (20 if proto == TCP else 8):
            return None
        sport, dport = struct.unpack_from("!HH", pkt, ihl)
        return Flow(proto, src, dst, sport, dport, ihl)
    if proto == ICMP and total >= ihl + 8 and pkt[ihl] in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
        ident = int.from_bytes(pkt[ihl + 4:ihl + 6], "big")
        return Flow(proto, src, dst, ident, ident, ihl, pkt[ihl])
    return None


def _u16(pkt: bytes | bytearray, at: int) -> int:
    return int.from_bytes(pkt[at:at + 2], "big")


def _u32(pkt: bytes | bytearray, at: int) -> int:
    return int.from_bytes(pkt[at:at + 4], "big")


def _more_fragments(pkt: bytes) -> bool:
    """True if ``pkt`` is the first fragment of a fragmented datagram."""
    return bool(pkt[6] & 0x20)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _adjust(csum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: a checksum after one 16-bit word went from ``old`` to ``new``."""
    total = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _adjust32(csum: int, old: int, new: int) -> int:
    csum = _adjust(csum, old >> 16, new >> 16)
    return _adjust(csum, old & 0xFFFF, new & 0xFFFF)


def rewrite(pkt: bytes, flow: Flow, *, src: int | None = None, sport: int | None = None,
            dst: int | None = None, dport: int | None = None) -> bytes:
    """``pkt`` with its source and/or destination (address, port) changed and every
    checksum it carries kept right. For an ICMP echo, the "port" is its identifier."""
    out = bytearray(pkt)
    ihl, l4 = flow.l4, flow.l4
    ip_csum = int.from_bytes(out[10:12], "big")
    new_src = flow.src if src is None else src
    new_dst = flow.dst if dst is None else dst
    ip_csum = _adjust32(_adjust32(ip_csum, flow.src, new_src), flow.dst, new_dst)
    struct.pack_into("!HII", out, 10, ip_csum, new_src, new_dst)
    if flow.proto in (TCP, UDP):
        at = l4 + (16 if flow.proto == TCP else 6)
        csum = int.from_bytes(out[at:at + 2], "big")
        new_sport = flow.sport if sport is None else sport
        new_dport = flow.dport if dport is None else dport
        if flow.proto == UDP and csum == 0:
            pass  # no checksum was sent: none to keep
        else:
            csum = _adjust32(_adjust32(csum, flow.src, new_src), flow.dst, new_dst)
            csum = _adjust(_adjust(csum, flow.sport, new_sport), flow.dport, new_dport)
            if flow.proto == UDP and csum == 0:
                csum = 0xFFFF
        struct.pack_into("!HH", out, l4, new_sport, new_dport)
        struct.pack_into("!H", out, at, csum)
    elif flow.proto == ICMP:
        ident = sport if sport is not None else dport
        if ident is not None and ident != flow.sport:
            csum = int.from_bytes(out[ihl + 2:ihl + 4], "big")
            struct.pack_into("!HH", out, ihl + 2, _adjust(csum, flow.sport, ident), ident)
    return bytes(out)


# --- the translation -----------------------------------------------------------------


@dataclass
class _Mapping:
    proto: int
    int_ip: int
    int_port: int
    ext_port: int
    last: float
    # Where it sent to, for its filter: (remote ip, port) and remote ip, each an
    # insertion-ordered set of at most PEERS_MAX (the oldest forgotten first).
    peers: dict[tuple[int, int], None] = field(default_factory=dict)
    addrs: dict[int, None] = field(default_factory=dict)
    until: float = 0.0  # asked for (NAT-PMP): open to anyone, kept until then

    def sent_to(self, ip: int, port: int) -> None:
        _remember(self.peers, (ip, port))
        _remember(self.addrs, ip)


def _remember(table: dict[Any, None], key: object) -> None:
    """Add ``key`` to an insertion-ordered set of at most PEERS_MAX, forgetting the oldest."""
    if key not in table:
        if len(table) >= PEERS_MAX:
            del table[next(iter(table))]
        table[key] = None


class Nat:
    """One NAT: inside addresses in ``lan`` (an IPv4 network), one ``wan_ip`` outside.
    :meth:`outbound` and :meth:`inbound` take a packet and the time, and return where
    it goes ("wan" or "lan") and the translated packet, or None if it is dropped."""

    def __init__(self, config: NatConfig, lan: str, wan_ip: str, *,
                 rng: random.Random | None = None) -> None:
        self.config = config.check()
        self.lan = ipaddress.IPv4Network(lan)
        self.wan = int(ipaddress.IPv4Address(wan_ip))
        self._rng = rng or random.Random()
        self._by_key: dict[tuple[int, ...], _Mapping] = {}
        self._by_ext: dict[tuple[int, int], _Mapping] = {}  # (proto, ext port)
        self._one2one_host: int | None = None
        self._one2one_seen = 0.0  # when the owner last sent
        # Fragmented datagrams: (src, dst, proto, IP id) of the first fragment, as it
        # arrived -> (the address that replaces src (out) or dst (in), when).
        self._frags: dict[tuple[int, int, int, int], tuple[int, float]] = {}
        self._net, self._mask = int(self.lan.network_address), int(self.lan.netmask)
        self._next_expiry = 0.0
        self.dropped = 0

    def _inside(self, ip: int) -> bool:
        return ip & self._mask == self._net

    def _key(self, f: Flow) -> tuple[int, ...]:
        m = self.config.mapping
        if m == "eim":
            return (f.proto, f.src, f.sport)
        if m == "adm":
            return (f.proto, f.src, f.sport, f.dst)
        return (f.proto, f.src, f.sport, f.dst, f.dport)

    def expire(self, now: float) -> int:
        """Forget mappings idle for longer than the timeout (looked at once a second at
        most: the packet path calls this); how many went."""
        if now < self._next_expiry:
            return 0
        self._next_expiry = now + 1.0
        udp, tcp = self.config.timeout, self.config.tcp_timeout
        old = [k for k, m in self._by_key.items()
               if (now > m.until if m.until else
                   now - m.last > (tcp if m.proto == TCP else udp))]
        for k in old:
            m = self._by_key.pop(k)
            self._by_ext.pop((m.proto, m.ext_port), None)
        for k in [k for k, (_, t) in self._frags.items() if now - t > FRAGMENT_TIME]:
            del self._frags[k]
        return len(old)

    def _mapping_for(self, f: Flow, now: float) -> _Mapping | None:
        key = self._key(f)
        m = self._by_key.get(key) or self._by_key.get((f.proto, f.src, f.sport, -1))
        if m is not None:  # (a port asked for: its traffic goes out through it, RFC 6886)
            return m
        ext = self._pick_port(f)
        if ext is None:
            return None
        m = _Mapping(f.proto, f.src, f.sport, ext, now)
        self._by_key[key] = m
        self._by_ext[(f.proto, ext)] = m
        return m

    def _pick_port(self, f: Flow) -> int | None:
        if self.config.one2one or (self.config.port_preserve
                                   and (f.proto, f.sport) not in self._by_ext):
            if (f.proto, f.sport) not in self._by_ext:
                return f.sport
        for _ in range(64):
            port = self._rng.randint(*PORT_RANGE)
            if (f.proto, port) not in self._by_ext:
                return port
        return None  # (the table is full: RFC 4787 says drop, never overload a port)

    def outbound(self, pkt: bytes, now: float) -> tuple[str, bytes] | None:
        """A packet from inside: translated to go out, or hairpinned back in."""
        self.expire(now)
        if not self.config.translate:  # routed: any IPv4 packet from inside goes
            ok = len(pkt) >= 20 and pkt[0] >> 4 == 4 and self._inside(_u32(pkt, 12))
            return ("wan", pkt) if ok else self._drop()
        f = parse(pkt)
        if f is None:  # a later fragment of a datagram whose first went out, or nothing
            return self._fragment(pkt, now, outbound=True)
        if not self._inside(f.src):
            return self._drop()
        if f.proto == ICMP and f.icmp_type != ICMP_ECHO_REQUEST:
            return self._drop()
        if self.config.one2one:
            # The first inside host to send owns the outside address, until it has been
            # quiet for the timeout (then the next machine on the network can have it).
            if self._one2one_host is None or (
                    f.src != self._one2one_host
                    and now - self._one2one_seen > self.config.timeout):
                self._one2one_host = f.src
            if f.src != self._one2one_host:
                return self._drop()
            self._one2one_seen = now
        m = self._mapping_for(f, now)
        if m is None:
            return self._drop()
        m.last = now
        m.sent_to(f.dst, f.dport)
        out = rewrite(pkt, f, src=self.wan, sport=m.ext_port)
        if _more_fragments(pkt):
            self._follow((f.src, f.dst, f.proto, _u16(pkt, 4)), self.wan, now)
        if f.dst == self.wan:  # to our own outside address: hairpin, or nothing
            if not self.config.hairpin:
                self.dropped += 1
                return None
            back = self.inbound(out, now)
            return ("lan", back[1]) if back is not None else None
        return ("wan", out)

    def inbound(self, pkt: bytes, now: float) -> tuple[str, bytes] | None:
        """A packet from outside to the NAT's address: let in to its mapping's inside
        end, as the filtering allows; else dropped."""
        self.expire(now)
        if not self.config.translate:  # routed: any IPv4 packet to an inside address
            ok = len(pkt) >= 20 and pkt[0] >> 4 == 4 and self._inside(_u32(pkt, 16))
            return ("lan", pkt) if ok else self._drop()
        f = parse(pkt)
        if f is None:
            return self._icmp_error(pkt) or self._fragment(pkt, now, outbound=False)
        if f.dst != self.wan or (f.proto == ICMP and f.icmp_type != ICMP_ECHO_REPLY):
            return self._drop()
        m = self._by_ext.get((f.proto, f.dport))
        if m is None and self.config.one2one and self._one2one_host is not None \
                and f.proto != ICMP:  # (the owner's port, made for it: it gets the packet)
            m = self._mapping_for(replace(f, src=self._one2one_host, sport=f.dport), now)
        if m is None or not self._allowed(m, f):
            return self._drop()
        m.last = now
        if _more_fragments(pkt):
            self._follow((f.src, f.dst, f.proto, _u16(pkt, 4)), m.int_ip, now)
        return ("lan", rewrite(pkt, f, dst=m.int_ip, dport=m.int_port))

    def _drop(self) -> tuple[str, bytes] | None:
        self.dropped += 1
        return None

    def _follow(self, key: tuple[int, int, int, int], addr: int, now: float) -> None:
        """Translate the later fragments of this datagram too (RFC 4787 REQ-14)."""
        if len(self._frags) >= FRAGMENTS_MAX:
            del self._frags[next(iter(self._frags))]
        self._frags[key] = (addr, now)

    def _fragment(self, pkt: bytes, now: float, *, outbound: bool) -> tuple[str, bytes] | None:
        """A later fragment of a datagram whose first fragment was translated: its
        address changed the same way (it carries no ports)."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4 or not _u16(pkt, 6) & 0x1FFF:
            return self._drop()
        src, dst = _u32(pkt, 12), _u32(pkt, 16)
        got = self._frags.get((src, dst, pkt[9], _u16(pkt, 4)))
        if got is None or (not outbound and dst != self.wan):
            return self._drop()
        addr = got[0]
        out = bytearray(pkt)
        at = 12 if outbound else 16
        csum = _adjust32(_u16(pkt, 10), src if outbound else dst, addr)
        struct.pack_into("!H", out, 10, csum)
        struct.pack_into("!I", out, at, addr)
        return ("wan" if outbound else "lan", bytes(out))

    def _icmp_error(self, pkt: bytes) -> tuple[str, bytes] | None:
        """An ICMP error (unreachable, time exceeded) about a packet one of our mappings
        sent: sent on to the inside host, its quoted packet translated back (RFC 5508)."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[9] != ICMP or _u16(pkt, 6) & 0x1FFF:
            return None
        ihl = (pkt[0] & 15) * 4
        end = min(len(pkt), _u16(pkt, 2))
        if ihl < 20 or end < ihl + 8 + 28 or pkt[ihl] not in (ICMP_UNREACHABLE,
                                                              ICMP_TIME_EXCEEDED):
            return None
        if _u32(pkt, 16) != self.wan:
            return None
        at = ihl + 8  # the quoted packet: its IP header and at least 8 bytes of it
        qihl = (pkt[at] & 15) * 4
        if pkt[at] >> 4 != 4 or qihl < 20 or end < at + qihl + 8 or _u32(pkt, at + 12) != self.wan:
            return None
        proto, rdst = pkt[at + 9], _u32(pkt, at + 16)
        if proto not in (TCP, UDP, ICMP):
            return None
        ext = _u16(pkt, at + qihl + (4 if proto == ICMP else 0))
        m = self._by_ext.get((proto, ext))
        if m is None or rdst not in m.addrs:  # (about a flow this mapping did not send)
            return None
        out = bytearray(pkt[:end])
        # The quoted packet: its source back to the inside host, with its checksums.
        struct.pack_into("!H", out, at + 10, _adjust32(_u16(out, at + 10), self.wan, m.int_ip))
        struct.pack_into("!I", out, at + 12, m.int_ip)
        l4 = at + qihl
        if proto == ICMP:
            struct.pack_into("!H", out, l4 + 2, _adjust(_u16(out, l4 + 2), ext, m.int_port))
            struct.pack_into("!H", out, l4 + 4, m.int_port)
        else:
            struct.pack_into("!H", out, l4, m.int_port)
            at_csum = l4 + (16 if proto == TCP else 6)
            if at_csum + 2 <= end and (proto == TCP or _u16(out, at_csum)):
                csum = _adjust32(_u16(out, at_csum), self.wan, m.int_ip)
                struct.pack_into("!H", out, at_csum, _adjust(csum, ext, m.int_port) or 0xFFFF)
        # The error itself: to the inside host, its ICMP checksum over the new bytes.
        struct.pack_into("!H", out, ihl + 2, 0)
        struct.pack_into("!H", out, ihl + 2, checksum(bytes(out[ihl:end])))
        struct.pack_into("!H", out, 10, _adjust32(_u16(out, 10), self.wan, m.int_ip))
        struct.pack_into("!I", out, 16, m.int_ip)
        return ("lan", bytes(out))

    def request(self, proto: int, int_ip: int, int_port: int, ext_port: int,
                lifetime: float, now: float) -> tuple[int, int, float]:
        """A mapping asked for (NAT-PMP's MAP request, RFC 6886 3.3): inside
        (``int_ip``, ``int_port``) reachable from anyone at an outside port (``ext_port``
        if free, else another) for ``lifetime`` seconds. Returns (NAT-PMP result code,
        outside port, lifetime): 0 done, 2 refused, 4 no room. A lifetime of 0 removes
        the mapping (with internal port 0: every mapping this host asked for)."""
        self.expire(now)
        if int_port == 0:
            if lifetime > 0:
                return (2, 0, 0.0)  # (a mapping for no port)
            for k in [k for k in self._by_key if k[:2] == (proto, int_ip) and k[-1] == -1]:
                self._by_ext.pop((proto, self._by_key.pop(k).ext_port), None)
            return (0, 0, 0.0)
        key = (proto, int_ip, int_port, -1)
        m = self._by_key.get(key)
        if lifetime <= 0:  # (only what was asked for goes: a flow's own mapping stays)
            if m is not None:
                del self._by_key[key]
                self._by_ext.pop((proto, m.ext_port), None)
            return (0, 0, 0.0)
        if m is None and self.config.mapping == "eim":  # the port's own mapping, kept open
            m = self._by_key.pop((proto, int_ip, int_port), None)
            if m is not None:
                self._by_key[key] = m
        lifetime = min(lifetime, 86400.0)
        if m is None:
            ext = ext_port if 0 < ext_port and (proto, ext_port) not in self._by_ext else None
            ext = ext or self._pick_port(Flow(proto, int_ip, 0, int_port, 0, 0))
            if ext is None:
                return (4, 0, 0.0)
            m = _Mapping(proto, int_ip, int_port, ext, now)
            self._by_key[key] = m
            self._by_ext[(proto, ext)] = m
        m.last, m.until = now, now + lifetime
        return (0, m.ext_port, lifetime)

    def _allowed(self, m: _Mapping, f: Flow) -> bool:
        if m.until:
            return True  # asked for: open to anyone while it lasts
        filtering = self.config.filtering
        if f.proto == ICMP:  # an echo reply answers a request sent to that address
            return f.src in m.addrs
        if filtering == "eif":
            return True
        if filtering == "adf":
            return f.src in m.addrs
        return (f.src, f.sport) in m.peers

    def mappings(self) -> list[tuple[str, str, int, int]]:
        """(protocol, inside address, inside port, outside port) of each mapping."""
        names = {TCP: "tcp", UDP: "udp", ICMP: "icmp"}
        return [(names[m.proto], str(ipaddress.IPv4Address(m.int_ip)), m.int_port, m.ext_port)
                for m in self._by_key.values()]


__all__ = ["PRESETS", "Flow", "Nat", "NatConfig", "checksum", "options", "parse", "preset",
           "rewrite"]
