"""Interface configuration for the guest agent, with no program run: ioctls for the link
(MAC, MTU, up/down) and rtnetlink for addresses and the default route.

Spawning ``ip`` costs a fork and an exec, which under TCG emulation is a fresh
translation of a whole program in every restored clone (~0.2 s); these calls cost
milliseconds. Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

try:  # the C module: socket.py builds enums at import (~60 ms of a cold boot, TCG)
    import _socket as socket
except ImportError:  # not CPython
    import socket  # type: ignore[no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

# ioctls (linux/sockios.h) on a struct ifreq: 16-byte name and a 24-byte union.
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU = 0x8913, 0x8914, 0x8922
SIOCGIFHWADDR, SIOCSIFHWADDR = 0x8927, 0x8924
IFF_UP, ARPHRD_ETHER = 0x1, 1

# rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR, RTM_NEWROUTE = 20, 21, 22, 24
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")  # length, type

class NetconfError(OSError):
    pass


def _ifreq(ifname: str, data: bytes = b"") -> bytes:
    return struct.pack("16s24s", ifname.encode(), data)


def _ioctl(request: int, ifname: str, data: bytes = b"") -> bytes:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        return fcntl.ioctl(s.fileno(), request, _ifreq(ifname, data))
    finally:
        s.close()


def set_up(ifname: str, up: bool = True) -> None:
    flags = struct.unpack_from("h", _ioctl(SIOCGIFFLAGS, ifname), 16)[0]
    want = flags | IFF_UP if up else flags & ~IFF_UP
    if want != flags:
        _ioctl(SIOCSIFFLAGS, ifname, struct.pack("h", want))


def set_mtu(ifname: str, mtu: int) -> None:
    _ioctl(SIOCSIFMTU, ifname, struct.pack("i", mtu))


def set_mac(ifname: str, mac: str) -> None:
    """Change the MAC; virtio-net takes this while the link is up (IFF_LIVE_ADDR_CHANGE),
    so routes through the interface stay."""
    _ioctl(SIOCSIFHWADDR, ifname, struct.pack("H6s", ARPHRD_ETHER, bytes.fromhex(mac.replace(":", ""))))


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size:
            return
        yield kind, data[off + _RTATTR.size:off + length]
        off += (length + 3) & ~3


class _Rtnl:
    """One NETLINK_ROUTE socket: requests that want an ACK, and dumps."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> _Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST,
                                      self.seq, 0) + body)
        return self.seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    raise NetconfError(errno.EPROTO, "bad netlink message from the kernel")
                body = data[off + _NLMSGHDR.size:off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("i", body)[0]
                    if code:
                        raise NetconfError(code, os.strerror(code))
                    return  # an ACK
                yield kind, body

    def request(self, kind: int, flags: int, body: bytes) -> None:
        for _ in self._replies(self._send(kind, flags | NLM_F_ACK, body)):
            pass

    def dump(self, kind: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        return self._replies(self._send(kind, NLM_F_DUMP, body))


def _family(ip: Any) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def _dump_addresses(index: int = 0) -> list[tuple[int, int, bytes, int]]:
    """(interface index, family, address bytes, prefix length) of every address, or of
    interface ``index``'s."""
    out = []
    with _Rtnl() as nl:
        for kind, body in nl.dump(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            if kind != RTM_NEWADDR or len(body) < _IFADDRMSG.size:
                continue
            family, prefixlen, _flags, _scope, idx = _IFADDRMSG.unpack_from(body)
            if (index and idx != index) or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            attrs = dict(_attrs(body[_IFADDRMSG.size:]))
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is not None:
                out.append((idx, family, raw, prefixlen))
    return out


def describe(ifname: str, family: int, raw: bytes, prefixlen: int) -> dict[str, Any]:
    return {"ifname": ifname, "family": "inet" if family == socket.AF_INET else "inet6",
            "address": socket.inet_ntop(family, raw), "prefixlen": prefixlen}


def addresses(ifname: str | None = None) -> list[dict[str, Any]]:
    """The interfaces' addresses, as ``ip -j addr`` would list them."""
    out = []
    for idx, family, raw, prefixlen in _dump_addresses(socket.if_nametoindex(ifname) if ifname else 0):
        try:
            out.append(describe(ifname or socket.if_indextoname(idx), family, raw, prefixlen))
        except OSError:
            continue  # gone since the dump
    return out


def _addr_body(index: int, family: int, raw: bytes, prefixlen: int) -> bytes:
    return (_IFADDRMSG.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
            + _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw))


def set_addresses(ifname: str, wanted: list[Any]) -> list[dict[str, Any]]:
    """Make ``wanted`` (ip_interface objects) the interface's addresses: remove the others
    (link-local ones too, as ``ip address flush`` does) and add the missing; an address
    already there is left alone, so doing it twice changes nothing. Returns them."""
    index = socket.if_nametoindex(ifname)
    want = [(_family(i.ip), i.ip.packed, i.network.prefixlen) for i in wanted]
    have = [a[1:] for a in _dump_addresses(index)]
    with _Rtnl() as nl:
        for a in have:
            if a not in want:
                try:
                    nl.request(RTM_DELADDR, 0, _addr_body(index, *a))
                except NetconfError as exc:
                    # Removing a primary IPv4 address takes its secondaries with it.
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
        for a in want:
            if a not in have:
                nl.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, _addr_body(index, *a))
    return [describe(ifname, *a) for a in want]


def by_mac(mac: str) -> str | None:
    """The name of the interface with this MAC (lower case, colons), if any."""
    for _index, name in socket.if_nameindex():
        try:
            got = _ioctl(SIOCGIFHWADDR, name)[18:24]
        except OSError:
            continue
        if got.hex(":") == mac:
            return name
    return None


def set_default_route(ifname: str, gateway: Any) -> None:
    """``ip route replace default via GATEWAY dev IFNAME``."""
    family = _family(gateway)
    body = (_RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE,
                        RTN_UNICAST, 0)
            + _attr(RTA_GATEWAY, gateway.packed)
            + _attr(RTA_OIF, struct.pack("I", socket.if_nametoindex(ifname))))
    with _Rtnl() as nl:
        nl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
