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

from ..errors import ConfigError

TCP, UDP, ICMP = 6, 17, 1
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
MAPPINGS = ("eim", "adm", "apdm")  # endpoint-independent, address-, address-and-port-dependent
FILTERINGS = ("eif", "adf", "apdf")
DEFAULT_TIMEOUT = 300.0  # RFC 4787 REQ-5: at least 2 minutes; 5 recommended
PORT_RANGE = (1024, 65535)


@dataclass(frozen=True)
class NatConfig:
    """How a NAT behaves (see the module's docstring); ``translate`` False: routed."""

    translate: bool = True
    mapping: str = "eim"
    filtering: str = "apdf"
    port_preserve: bool = True
    hairpin: bool = True
    timeout: float = DEFAULT_TIMEOUT
    one2one: bool = False  # one inside host owns the external address, every port of it
    pmp: bool = False  # the router answers NAT-PMP (RFC 6886) requests for port mappings

    def check(self) -> NatConfig:
        if self.mapping not in MAPPINGS:
            raise ConfigError("NAT mapping", self.mapping, f"give one of {', '.join(MAPPINGS)}")
        if self.filtering not in FILTERINGS:
            raise ConfigError("NAT filtering", self.filtering,
                              f"give one of {', '.join(FILTERINGS)}")
        if not 1 <= self.timeout <= 86400:
            raise ConfigError("NAT timeout", str(self.timeout), "give 1 to 86400 seconds")
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
            port_preserve: bool | None = None, pmp: bool | None = None) -> dict[str, object]:
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
    if timeout is not None:
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            out["timeout"] = float(timeout)
        else:
            text = str(timeout).strip().lower()
            unit = text[-1] if text[-1:] in ("s", "m", "h") else ""
            try:
                out["timeout"] = float(text.removesuffix(unit)) * _TIMEOUT_UNITS[unit]
            except ValueError:
                raise ConfigError("NAT timeout", str(timeout), "give seconds, or a time "
                                  "such as 30s, 5m or 2h") from None
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
    contacted: set[tuple[int, int]] = field(default_factory=set)  # (remote ip, port)
    until: float = 0.0  # asked for (NAT-PMP): open to anyone, kept until then


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
        old = [k for k, m in self._by_key.items()
               if (now > m.until if m.until else now - m.last > self.config.timeout)]
        for k in old:
            m = self._by_key.pop(k)
            self._by_ext.pop((m.proto, m.ext_port), None)
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
        f = parse(pkt)
        if f is None or not self._inside(f.src):
            self.dropped += 1
            return None
        if not self.config.translate:
            return ("wan", pkt)
        if f.proto == ICMP and f.icmp_type != ICMP_ECHO_REQUEST:
            self.dropped += 1
            return None
        if self.config.one2one:
            # The first inside host to send owns the outside address, until its last
            # mapping expires (so the next machine on the network can have it then).
            if self._one2one_host is None or not any(
                    m.int_ip == self._one2one_host for m in self._by_key.values()):
                self._one2one_host = f.src
            if f.src != self._one2one_host:
                self.dropped += 1
                return None
        m = self._mapping_for(f, now)
        if m is None:
            self.dropped += 1
            return None
        m.last = now
        m.contacted.add((f.dst, f.dport))
        out = rewrite(pkt, f, src=self.wan, sport=m.ext_port)
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
        f = parse(pkt)
        if f is None:
            self.dropped += 1
            return None
        if not self.config.translate:
            return ("lan", pkt) if self._inside(f.dst) else None
        if f.dst != self.wan or (f.proto == ICMP and f.icmp_type != ICMP_ECHO_REPLY):
            self.dropped += 1
            return None
        m = self._by_ext.get((f.proto, f.dport))
        if m is None and self.config.one2one and self._one2one_host is not None \
                and f.proto != ICMP:
            m = self._mapping_for(replace(f, src=self._one2one_host, sport=f.dport), now)
        if m is None or not self._allowed(m, f):
            self.dropped += 1
            return None
        m.last = now
        return ("lan", rewrite(pkt, f, dst=m.int_ip, dport=m.int_port))

    def request(self, proto: int, int_ip: int, int_port: int, ext_port: int,
                lifetime: float, now: float) -> tuple[int, float] | None:
        """A mapping asked for (NAT-PMP's MAP request, RFC 6886 3.3): inside
        (``int_ip``, ``int_port``) reachable from anyone at an outside port (``ext_port``
        if free, else another) for ``lifetime`` seconds; (outside port, lifetime), or
        None if the table has no room. A lifetime of 0 removes the mapping."""
        self.expire(now)
        if int_port == 0 and lifetime <= 0:  # every mapping this host asked for goes
            for k in [k for k in self._by_key if k[:2] == (proto, int_ip) and k[-1] == -1]:
                self._by_ext.pop((proto, self._by_key.pop(k).ext_port), None)
            return (0, 0.0)
        key = (proto, int_ip, int_port, -1)
        m = self._by_key.get(key)
        if m is None and self.config.mapping == "eim":  # the port's own mapping, kept open
            m = self._by_key.pop((proto, int_ip, int_port), None)
            if m is not None:
                self._by_key[key] = m
        if lifetime <= 0:
            if m is not None:
                del self._by_key[key]
                self._by_ext.pop((proto, m.ext_port), None)
            return (0, 0.0)
        lifetime = min(lifetime, 86400.0)
        if m is None:
            ext = ext_port if 0 < ext_port and (proto, ext_port) not in self._by_ext else None
            ext = ext or self._pick_port(Flow(proto, int_ip, 0, int_port, 0, 0))
            if ext is None:
                return None
            m = _Mapping(proto, int_ip, int_port, ext, now)
            self._by_key[key] = m
            self._by_ext[(proto, ext)] = m
        m.last, m.until = now, now + lifetime
        return (m.ext_port, lifetime)

    def _allowed(self, m: _Mapping, f: Flow) -> bool:
        if m.until:
            return True  # asked for: open to anyone while it lasts
        filtering = self.config.filtering
        if f.proto == ICMP:  # an echo reply answers a request sent to that address
            return any(ip == f.src for ip, _ in m.contacted)
        if filtering == "eif":
            return True
        if filtering == "adf":
            return any(ip == f.src for ip, _ in m.contacted)
        return (f.src, f.sport) in m.contacted

    def mappings(self) -> list[tuple[str, str, int, int]]:
        """(protocol, inside address, inside port, outside port) of each mapping."""
        names = {TCP: "tcp", UDP: "udp", ICMP: "icmp"}
        return [(names[m.proto], str(ipaddress.IPv4Address(m.int_ip)), m.int_port, m.ext_port)
                for m in self._by_key.values()]


__all__ = ["PRESETS", "Flow", "Nat", "NatConfig", "checksum", "options", "parse", "preset",
           "rewrite"]
