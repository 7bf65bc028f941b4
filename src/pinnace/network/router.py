"""Simulated hosts on pinnace's networks: NAT routers, and the internet's core.

A simulated host plugs into a network's switch exactly as a QEMU NIC does: it binds a
datagram socket at its own path, a port file in the network's ``ports/`` names that path
and the peer path the switch binds, and frames travel as one datagram each. So the
switch needs nothing new for them, captures see them, and impairments and partitions
apply to them as to any machine (a router's port is labelled ``router`` on its network;
its outside port carries the network's name on the upstream one).

The hosts run inside a switch process, their sockets in its selector: a network's
router in that network's switch, the internet's core in the internet's switch. Each
speaks just enough Ethernet and ARP (RFC 826) to be a neighbour: it answers ARP for its
addresses, learns its neighbours', and holds a few packets while it asks.

- :class:`Router`: a network's gateway (the subnet's ``.1``) with a NAT (:mod:`.nat`)
  between it and its upstream network (the internet, or another NAT'd network for a
  carrier-grade NAT). It decrements TTLs, answers ping on both of its addresses, and
  translates TCP, UDP and ICMP echo.
- :class:`Core`: the simulated internet's ``.1`` and ``.2``: the gateway of machines on
  the internet (it routes a routed network's subnet to its router) and the services
  of :mod:`.services` (STUN, echo, DNS for the names of hosts with public addresses).

The standard library only, and nothing of a packet is trusted: whatever arrives, the
switch process runs on.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import random
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .nat import (
    ICMP,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_TIME_EXCEEDED,
    ICMP_UNREACHABLE,
    TCP,
    UDP,
    Nat,
    NatConfig,
    checksum,
    parse,
)
from .services import Services, icmp_echo_reply, ipv4_packet, udp_packet

log = logging.getLogger(__name__)

ETH_IPV4, ETH_ARP = 0x0800, 0x0806
BROADCAST = b"\xff" * 6
_ARP_FMT = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa
_ARP_REQUEST, _ARP_REPLY = 1, 2
_ARP_FRESH = 60.0  # seconds a neighbour's MAC is used without asking again
_ARP_FORGET = 600.0
_ARP_RETRY = 1.0
_ARP_GIVE_UP = 3.0  # packets held for a neighbour that does not answer are dropped
_PENDING_MAX = 16  # packets held per neighbour being asked for
_ASKING_MAX = 256  # neighbours asked for at once
_HELD_BYTES = 1 << 20  # bytes held for all of them
_ERRORS_PER_S = 100  # ICMP errors a host sends (time exceeded, unreachable), at most
_NEIGHBOURS_MAX = 4096
_BATCH = 64
_MAX_FRAME = 65550
_SNDBUF = 1 << 20
_BACKLOG_BYTES = 4 << 20
NAT_PMP_PORT = 5351


def mac_for(*parts: str) -> bytes:
    """A stable, locally administered unicast MAC for a simulated host's interface."""
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return bytes([0x02 | (digest[0] & 0xFC)]) + digest[1:6]


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


# --- one interface -------------------------------------------------------------------


Watch = Callable[[socket.socket, Callable[[float], None] | None], None]


def out_path(path: str) -> str:
    """Where a simulated host's NIC bound at ``path`` sends from (its port's sender)."""
    return path + ".out"


class Nic:
    """One interface of a simulated host on a switch: a datagram socket bound at
    ``path`` that takes the switch's frames, and one bound at :func:`out_path` and
    connected to ``peer`` (the switch's end) that sends its own. Connected, it learns
    when the switch's queue is full (a unix datagram queue holds a handful of frames)
    and keeps frames, up to 4 MiB, until there is room: ``watch(sock, handler)`` asks
    the loop to call ``handler`` when ``sock`` can send (None: no longer).

    :meth:`receive` handles ARP itself and returns the IPv4 packets sent to this MAC;
    :meth:`send` frames a packet for its next hop (on the subnet, else ``gateway``),
    asking ARP for it first if need be."""

    def __init__(self, path: str, peer: str, mac: bytes, ip: int,
                 net: ipaddress.IPv4Network, *, gateway: int | None = None,
                 answers: frozenset[int] = frozenset(), watch: Watch | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.peer, self.mac, self.ip = path, peer, mac, ip
        self.answers = answers | {ip}  # the addresses it answers ARP for
        self.gateway = gateway
        self._net, self._mask = int(net.network_address), int(net.netmask)
        self._clock = clock
        self._neighbours: dict[int, tuple[bytes, float]] = {}  # ip -> (mac, when learned)
        self._asking: dict[int, tuple[float, float, list[bytes]]] = {}  # first, last, held
        self.rx = self.tx = self.dropped = self.waited = 0
        self._held_bytes = 0
        self._watch = watch
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._retry_at = 0.0
        self._connected = False
        self.sock = bind_dgram(path)[0]
        try:
            self.out = bind_dgram(out_path(path))[0]
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self._disconnect()
        for sock, path in ((self.sock, self.path), (self.out, out_path(self.path))):
            sock.close()
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)

    def on_link(self, ip: int) -> bool:
        return ip & self._mask == self._net

    # --- in ---

    def receive(self) -> list[bytes]:
        """The IPv4 packets waiting, sent to this interface's MAC (ARP is answered)."""
        out: list[bytes] = []
        for _ in range(_BATCH):
            try:
                frame = self.sock.recv(_MAX_FRAME + 1)
            except BlockingIOError:
                break
            except OSError:
                break
            self.rx += 1
            if len(frame) < 14 or len(frame) > _MAX_FRAME:
                continue
            kind = int.from_bytes(frame[12:14], "big")
            if kind == ETH_ARP:
                self._arp(frame)
            elif kind == ETH_IPV4 and frame[0:6] == self.mac and len(frame) >= 34:
                out.append(frame[14:])
        return out

    def _arp(self, frame: bytes) -> None:
        if len(frame) < 14 + _ARP_FMT.size:
            return
        htype, ptype, hlen, plen, op, sha, spa_b, _tha, tpa_b = _ARP_FMT.unpack_from(frame, 14)
        if (htype, ptype, hlen, plen) != (1, ETH_IPV4, 6, 4) or sha[0] & 1:
            return
        spa, tpa = int.from_bytes(spa_b, "big"), int.from_bytes(tpa_b, "big")
        if self.on_link(spa) and spa not in self.answers and (
                tpa in self.answers or spa in self._neighbours or spa in self._asking):
            self._learn(spa, sha)
        if op == _ARP_REQUEST and tpa in self.answers:
            self._frame(sha, ETH_ARP, _ARP_FMT.pack(1, ETH_IPV4, 6, 4, _ARP_REPLY, self.mac,
                                                     tpa_b, sha, spa_b))

    def _learn(self, ip: int, mac: bytes) -> None:
        if len(self._neighbours) >= _NEIGHBOURS_MAX and ip not in self._neighbours:
            self._neighbours.clear()  # (a flood of made-up neighbours: start again)
        self._neighbours[ip] = (mac, self._clock())
        for pkt in self._release(ip):
            self._frame(mac, ETH_IPV4, pkt)

    def _release(self, ip: int) -> list[bytes]:
        """Stop asking for ``ip``; the packets held for it."""
        held = self._asking.pop(ip, None)
        if held is None:
            return []
        self._held_bytes -= sum(len(p) for p in held[2])
        return held[2]

    # --- out ---

    def next_hop(self, dst: int) -> int | None:
        return dst if self.on_link(dst) else self.gateway

    def send(self, pkt: bytes, via: int | None = None) -> None:
        """Send IPv4 ``pkt`` to ``via`` (default: its destination's next hop)."""
        hop = self.next_hop(int.from_bytes(pkt[16:20], "big")) if via is None else via
        if hop is None:
            self.dropped += 1  # no route
            return
        now = self._clock()
        known = self._neighbours.get(hop)
        if known is not None and now - known[1] < _ARP_FORGET:
            if now - known[1] > _ARP_FRESH:
                self._ask(hop, now)  # (still used meanwhile)
            self._frame(known[0], ETH_IPV4, pkt)
            return
        first, last, held = self._asking.get(hop, (now, 0.0, []))
        if now - first > _ARP_GIVE_UP:
            self.dropped += len(self._release(hop)) + 1
            return
        if hop not in self._asking and len(self._asking) >= _ASKING_MAX:
            self.dropped += 1  # (asking for too many at once: a scan, say)
            return
        if len(held) < _PENDING_MAX and self._held_bytes + len(pkt) <= _HELD_BYTES:
            held.append(pkt)
            self._held_bytes += len(pkt)
        else:
            self.dropped += 1
        self._asking[hop] = (first, last, held)
        self._ask(hop, now)

    def _ask(self, ip: int, now: float) -> None:
        first, last, held = self._asking.get(ip, (now, 0.0, []))
        if now - last < _ARP_RETRY:
            return
        self._asking[ip] = (first, now, held)
        self._frame(BROADCAST, ETH_ARP, _ARP_FMT.pack(
            1, ETH_IPV4, 6, 4, _ARP_REQUEST, self.mac, self.ip.to_bytes(4, "big"),
            bytes(6), ip.to_bytes(4, "big")))

    def expire(self, now: float) -> None:
        for ip in [ip for ip, (first, _, _) in self._asking.items() if now - first > _ARP_GIVE_UP]:
            self.dropped += len(self._release(ip))

    def _frame(self, dst: bytes, kind: int, payload: bytes) -> None:
        data = dst + self.mac + kind.to_bytes(2, "big") + payload
        if self._backlog:  # (frames keep their order)
            self._wait(data)
            return
        if not self._connected and not self._connect():
            self.dropped += 1  # the switch is not there (yet)
            return
        try:
            self.out.send(data)
        except BlockingIOError:
            self._wait(data)
        except OSError:
            self._disconnect()  # the switch went (or started again): connect anew
            self.dropped += 1
        else:
            self.tx += 1

    def _connect(self) -> bool:
        now = self._clock()
        if now < self._retry_at:
            return False
        try:
            self.out.connect(self.peer)
        except OSError:
            self._retry_at = now + 0.2
            return False
        self._connected = True
        return True

    def _disconnect(self) -> None:
        if self._backlog and self._watch is not None:
            self._watch(self.out, None)
        self.dropped += len(self._backlog)
        self._backlog.clear()
        self._backlog_bytes = 0
        self._connected = False  # (the next connect replaces the association)
        self._retry_at = 0.0

    def _wait(self, data: bytes) -> None:
        if self._watch is None or self._backlog_bytes + len(data) > _BACKLOG_BYTES:
            self.dropped += 1
            return
        if not self._backlog:
            self._watch(self.out, self._flush)
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        self.waited += 1

    def _flush(self, _now: float) -> None:
        """Send what waits, as far as the switch's queue has room."""
        backlog = self._backlog
        while backlog:
            try:
                self.out.send(backlog[0])
            except BlockingIOError:
                return
            except OSError:
                self._disconnect()
                return
            self._backlog_bytes -= len(backlog.popleft())
            self.tx += 1
        if self._watch is not None:
            self._watch(self.out, None)


def bind_dgram(path: str, *, sndbuf: int = _SNDBUF) -> tuple[socket.socket, tuple[int, int]]:
    """A non-blocking datagram socket bound at ``path``, and the (device, inode) of its
    file (which tells our socket file from one put at the same path later).

    A stale socket at ``path`` is replaced; anything else there (a symlink, a file) is
    left alone: ValueError. bind() itself never follows a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{path} exists and is not a socket; leaving it alone")
        os.unlink(path)  # left behind by a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind(path)
        st = os.lstat(path)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def forwarded(pkt: bytes) -> bytes | None:
    """``pkt`` with its TTL one less (and its header checksum kept right), or None if
    its time is up or it is not a whole IPv4 header."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[8] <= 1:
        return None
    out = bytearray(pkt)
    out[8] -= 1
    # RFC 1624: the 16-bit word holding TTL and protocol went down by 0x0100.
    old = int.from_bytes(pkt[10:12], "big")
    total = (~old & 0xFFFF) + (~((pkt[8] << 8) | pkt[9]) & 0xFFFF) + ((out[8] << 8) | out[9])
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    out[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def is_echo_request(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4 if pkt else 0
    return len(pkt) > ihl >= 20 and pkt[9] == ICMP and pkt[ihl] == ICMP_ECHO_REQUEST


class Errors:
    """The ICMP errors a simulated host sends (RFC 792), at most _ERRORS_PER_S a second;
    never about an ICMP error, a later fragment, or a packet from no one."""

    def __init__(self) -> None:
        self._second = -1
        self._sent = 0
        self.sent = 0

    def time_exceeded(self, nic: Nic, pkt: bytes, now: float) -> None:
        """A packet whose TTL ran out at ``nic``'s host (traceroute's hops)."""
        if len(pkt) >= 20 and pkt[0] >> 4 == 4 and pkt[8] <= 1:
            self._send(nic, ICMP_TIME_EXCEEDED, 0, pkt, now)

    def unreachable(self, nic: Nic, pkt: bytes, now: float) -> None:
        """A packet with no route from ``nic``'s host (network unreachable)."""
        self._send(nic, ICMP_UNREACHABLE, 0, pkt, now)

    def _send(self, nic: Nic, kind: int, code: int, pkt: bytes, now: float) -> None:
        if len(pkt) < 28 or pkt[0] >> 4 != 4 or int.from_bytes(pkt[6:8], "big") & 0x1FFF:
            return
        ihl = (pkt[0] & 15) * 4
        src = int.from_bytes(pkt[12:16], "big")
        if ihl < 20 or len(pkt) < ihl + 8 or src == 0 or src >> 28 >= 14 or (
                pkt[9] == ICMP and pkt[ihl] not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)):
            return
        if int(now) != self._second:
            self._second, self._sent = int(now), 0
        if self._sent >= _ERRORS_PER_S:
            return
        self._sent += 1
        self.sent += 1
        body = struct.pack("!BBHI", kind, code, 0, 0) + pkt[:ihl + 8]
        body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
        nic.send(ipv4_packet(nic.ip, src, ICMP, body))


# --- what network.json says ----------------------------------------------------------


@dataclass(frozen=True)
class RouterSpec:
    """A network's router, as its ``network.json`` has it under ``"router"``: the NAT,
    and where its outside is (``upstream`` network, ``wan_ip`` on it, that network's
    subnet and gateway). The paths are filled in by whoever runs it."""

    nat: NatConfig
    preset: str
    upstream: str
    wan_ip: str
    wan_subnet: str
    wan_gateway: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"nat": {"translate": self.nat.translate, "mapping": self.nat.mapping,
                        "filtering": self.nat.filtering, "hairpin": self.nat.hairpin,
                        "port_preserve": self.nat.port_preserve, "timeout": self.nat.timeout,
                        "tcp_timeout": self.nat.tcp_timeout,
                        "one2one": self.nat.one2one, "pmp": self.nat.pmp},
                "preset": self.preset, "upstream": self.upstream, "wan_ip": self.wan_ip,
                "wan_subnet": self.wan_subnet, "wan_gateway": self.wan_gateway}

    @classmethod
    def from_dict(cls, data: object) -> RouterSpec:
        """ValueError or ConfigError if ``data`` is not a router's description."""
        if not isinstance(data, dict) or not isinstance(data.get("nat"), dict):
            raise ValueError("the router must be an object with a 'nat' object")
        n = data["nat"]
        fields: dict[str, Any] = {}
        for key, kind in (("translate", bool), ("hairpin", bool), ("port_preserve", bool),
                          ("one2one", bool), ("pmp", bool), ("mapping", str),
                          ("filtering", str)):
            if key in n:
                if not isinstance(n[key], kind):
                    raise ValueError(f"router nat.{key} must be a {kind.__name__}")
                fields[key] = n[key]
        for key in ("timeout", "tcp_timeout"):
            if key in n:
                if isinstance(n[key], bool) or not isinstance(n[key], (int, float)):
                    raise ValueError(f"router nat.{key} must be a number")
                fields[key] = float(n[key])
        nat = NatConfig(**fields).check()
        strings = []
        for key in ("preset", "upstream", "wan_ip", "wan_subnet"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"router {key} must be a string")
            strings.append(data[key])
        gateway = data.get("wan_gateway")
        if gateway is not None and not isinstance(gateway, str):
            raise ValueError("router wan_gateway must be a string or null")
        spec = cls(nat, strings[0], strings[1], strings[2], strings[3], gateway)
        wan = ipaddress.IPv4Network(spec.wan_subnet)
        if ipaddress.IPv4Address(spec.wan_ip) not in wan or (
                gateway is not None and ipaddress.IPv4Address(gateway) not in wan):
            raise ValueError("router wan_ip and wan_gateway must be in wan_subnet")
        return spec


# --- the hosts -----------------------------------------------------------------------


class Router:
    """A network's router: ``lan`` (its ``.1`` on the network) and ``wan`` (its address
    on the upstream network), with a :class:`Nat` between them."""

    def __init__(self, spec: RouterSpec, lan: Nic, wan: Nic, *, lan_subnet: str,
                 seed: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.lan, self.wan, self._clock = spec, lan, wan, clock
        rng = random.Random(f"{seed}:router") if seed is not None else None
        self.nat = Nat(spec.nat, lan_subnet, spec.wan_ip, rng=rng)
        self.forwarded = self.dropped = 0
        self._started = clock()  # NAT-PMP's epoch
        self._errors = Errors()

    def sockets(self) -> list[tuple[socket.socket, Callable[[float], None]]]:
        return [(self.lan.sock, self.from_lan), (self.wan.sock, self.from_wan)]

    def close(self) -> None:
        self.lan.close()
        self.wan.close()

    def from_lan(self, now: float) -> None:
        for pkt in self.lan.receive():
            dst = int.from_bytes(pkt[16:20], "big")
            if dst == self.lan.ip or (dst == self.wan.ip and (
                    pkt[9] == ICMP or not self.spec.nat.translate)):
                self._answer(self.lan, pkt, now)  # a ping (or NAT-PMP) to the router
                continue
            fwd = forwarded(pkt)
            if fwd is None:
                self._errors.time_exceeded(self.lan, pkt, now)
                continue
            out = self.nat.outbound(fwd, now)
            if out is None:
                self.dropped += 1
                continue
            self.forwarded += 1
            (self.wan if out[0] == "wan" else self.lan).send(out[1])

    def from_wan(self, now: float) -> None:
        for pkt in self.wan.receive():
            dst = int.from_bytes(pkt[16:20], "big")
            if dst in (self.wan.ip, self.lan.ip) and is_echo_request(pkt):
                self._answer(self.wan, pkt, None)  # a ping to the router itself
                continue
            fwd = forwarded(pkt)
            if fwd is None:
                self._errors.time_exceeded(self.wan, pkt, now)
                continue
            out = self.nat.inbound(fwd, now)
            if out is None:
                self.dropped += 1
                continue
            self.forwarded += 1
            self.lan.send(out[1])

    def _answer(self, nic: Nic, pkt: bytes, now: float | None) -> None:
        """Answer a ping to the router; from inside (``now`` given), NAT-PMP too."""
        reply = None
        if len(pkt) > 9 and pkt[9] == ICMP:
            reply = icmp_echo_reply(pkt)
        elif now is not None and self.spec.nat.pmp and self.spec.nat.translate:
            reply = self._pmp(pkt, now)
        if reply is not None:
            nic.send(reply)

    def _pmp(self, pkt: bytes, now: float) -> bytes | None:
        """The answer to a NAT-PMP request (RFC 6886) on the router's port 5351: the
        outside address (opcode 0), or a UDP (1) or TCP (2) port mapping."""
        f = parse(pkt)
        if f is None or f.proto != UDP or f.dport != NAT_PMP_PORT:
            return None
        end = min(len(pkt), int.from_bytes(pkt[2:4], "big"))
        data = pkt[f.l4 + 8:end]
        if len(data) < 2 or data[1] >= 128:
            return None  # (too short to answer, or a response)
        version, op = data[0], data[1]
        epoch = int(now - self._started) & 0xFFFFFFFF
        body: bytes
        if version != 0:
            body = struct.pack("!BBHI", 0, 128 + op, 1, epoch)  # unsupported version
        elif op == 0:
            body = struct.pack("!BBHII", 0, 128, 0, epoch, self.wan.ip)
        elif op in (1, 2) and len(data) >= 12:
            int_port, ext_port, lifetime = struct.unpack_from("!HHI", data, 4)
            result, ext, life = self.nat.request(UDP if op == 1 else TCP, f.src, int_port,
                                                 ext_port, float(lifetime), now)
            body = struct.pack("!BBHIHHI", 0, 128 + op, result, epoch, int_port, ext,
                               int(life))
        else:
            body = struct.pack("!BBHI", 0, 128 + op, 5, epoch)  # unsupported opcode
        return udp_packet(self.lan.ip, NAT_PMP_PORT, f.src, f.sport, body)

    def expire(self, now: float) -> None:
        self.nat.expire(now)
        self.lan.expire(now)
        self.wan.expire(now)

    def stats(self) -> dict[str, object]:
        return {"preset": self.spec.preset, "wan_ip": self.spec.wan_ip,
                "forwarded": self.forwarded, "dropped": self.dropped,
                "nat_dropped": self.nat.dropped, "mappings": len(self.nat.mappings()),
                "lan": {"rx": self.lan.rx, "tx": self.lan.tx, "dropped": self.lan.dropped},
                "wan": {"rx": self.wan.rx, "tx": self.wan.tx, "dropped": self.wan.dropped}}


class Core:
    """The simulated internet's own host: its gateway (``.1``) and a second address
    (``.2``) for the services that need two (STUN's change requests). It routes a routed
    (untranslated) network's subnet to that network's router, and serves STUN, echo and
    DNS (:class:`.services.Services`) for the names of the hosts on it."""

    def __init__(self, nic: Nic, alternate: int) -> None:
        self.nic = nic
        self.names: dict[str, int] = {}
        self.routes: list[tuple[int, int, int]] = []  # (network, mask, next hop)
        self.services = Services(nic.ip, alternate, lambda: self.names)
        self.forwarded = self.dropped = 0
        self._errors = Errors()

    def update(self, names: dict[str, int], routes: list[tuple[str, str]]) -> None:
        """Names for DNS; routes as (subnet, next hop) pairs (bad ones are skipped)."""
        self.names = dict(names)
        table = []
        for subnet, hop in routes:
            with contextlib.suppress(ValueError):
                net = ipaddress.IPv4Network(subnet)
                table.append((int(net.network_address), int(net.netmask), _ip(hop)))
        self.routes = table

    def sockets(self) -> list[tuple[socket.socket, Callable[[float], None]]]:
        return [(self.nic.sock, self.readable)]

    def close(self) -> None:
        self.nic.close()

    def readable(self, now: float) -> None:
        nic = self.nic
        for pkt in nic.receive():
            dst = int.from_bytes(pkt[16:20], "big")
            if dst in nic.answers:
                for reply in self.services.handle(pkt):
                    nic.send(reply)
                continue
            fwd = forwarded(pkt)
            if fwd is None:
                self._errors.time_exceeded(nic, pkt, now)
                continue
            hop = self._route(dst)
            if hop is None:
                self._errors.unreachable(nic, pkt, now)
                continue
            self.forwarded += 1
            nic.send(fwd, via=hop)

    def _route(self, dst: int) -> int | None:
        for net, mask, hop in self.routes:
            if dst & mask == net:
                return hop
        return dst if self.nic.on_link(dst) else None

    def expire(self, now: float) -> None:
        self.nic.expire(now)

    def stats(self) -> dict[str, object]:
        return {"forwarded": self.forwarded, "dropped": self.dropped,
                "rx": self.nic.rx, "tx": self.nic.tx, "names": len(self.names)}


__all__ = ["Core", "Nic", "Router", "RouterSpec", "bind_dgram", "forwarded", "mac_for",
           "out_path"]
