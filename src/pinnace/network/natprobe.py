"""A NAT probe that runs inside a guest: ``python3 natprobe.py COMMAND ...``, printing
one JSON object on stdout.

- ``classify SERVER``: the NAT between this machine and a STUN server that does RFC 5780
  (two addresses, two ports: pinnace's internet host). Its mapping behaviour (RFC 5780
  4.3: tests I, II and III from one socket), its filtering behaviour (4.4: tests I, II
  and III from a second, fresh socket, so the mapping tests' traffic to the alternate
  address opens no filter for them), whether it preserves the port, and whether it
  hairpins (a second socket sends to the first one's mapped address). Exit status 1,
  with ``error`` set, when a test the classification needs got no answer.
- ``punch --local-port P --peer IP:PORT``: UDP hole punching with a peer doing the same:
  a probe to the peer every interval, and an answer to every packet that comes in
  (to its source: a peer behind an address-and-port-dependent NAT shows up from another
  port than the one it told us). ``ok``: something came from the peer's address.
- ``mapped SERVER``: test I alone: this socket's public address, to tell a peer.

It is copied into a guest alone, so it imports nothing of pinnace's: its STUN client is
its own, on the standard library (Python 3.11). Every length in a response is checked
against the datagram; what does not parse is ignored. Sockets come from a
:class:`Network`, which tests replace to run the probe through a NAT in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST, BINDING_SUCCESS, BINDING_ERROR = 0x0001, 0x0101, 0x0111
MAPPED_ADDRESS, CHANGE_REQUEST, CHANGED_ADDRESS = 0x0001, 0x0003, 0x0005
XOR_MAPPED_ADDRESS, RESPONSE_ORIGIN, OTHER_ADDRESS = 0x0020, 0x802B, 0x802C
CHANGE_IP, CHANGE_PORT = 0x04, 0x02
HAIRPIN = b"pinnace-hairpin "
PUNCH, PUNCH_ACK = b"pinnace-punch ", b"pinnace-punch-ack "
PUNCH_LINGER = 1.0  # seconds punch goes on after its first success (see punch)

Addr = tuple[str, int]
CLASSIFY_KEYS = ("local", "mapped", "nat", "mapping", "filtering", "preserves_port",
                 "hairpin", "error")
MAPPED_KEYS = ("local", "mapped", "error")


class Sock(Protocol):
    """What the probe uses of a UDP socket."""

    def sendto(self, data: bytes, address: Addr, /) -> int: ...
    def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]: ...
    def settimeout(self, value: float | None, /) -> None: ...
    def getsockname(self) -> Any: ...
    def close(self) -> None: ...


class Network:
    """Where the probe's sockets come from: this machine's own IPv4 stack."""

    def open(self, port: int = 0) -> Sock:
        """A UDP socket bound to ``port`` (0: any free one) on every address."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        return sock

    def source_ip(self, dest: str) -> str:
        """The address this machine sends from to ``dest`` (its route's source)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((dest, 9))  # UDP: nothing is sent
            return str(sock.getsockname()[0])


# --- STUN ----------------------------------------------------------------------------


def request(txid: bytes, change: int = 0) -> bytes:
    """A Binding Request, with a CHANGE-REQUEST attribute if ``change`` has flags."""
    body = attribute(CHANGE_REQUEST, change.to_bytes(4, "big")) if change else b""
    return (BINDING_REQUEST.to_bytes(2, "big") + len(body).to_bytes(2, "big")
            + MAGIC_COOKIE.to_bytes(4, "big") + txid + body)


def attribute(atype: int, value: bytes) -> bytes:
    return (atype.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
            + b"\0" * (-len(value) % 4))


def decode(data: bytes) -> tuple[int, bytes, dict[int, bytes]] | None:
    """(type, transaction id, attributes: the first value of each type) of a STUN
    message whose lengths all agree with the datagram; None for anything else."""
    if len(data) < 20:
        return None
    mtype = int.from_bytes(data[0:2], "big")
    length = int.from_bytes(data[2:4], "big")
    if mtype & 0xC000 or int.from_bytes(data[4:8], "big") != MAGIC_COOKIE \
            or length % 4 or 20 + length != len(data):
        return None
    attrs: dict[int, bytes] = {}
    at = 20
    while at < len(data):
        if at + 4 > len(data):
            return None
        atype = int.from_bytes(data[at:at + 2], "big")
        alen = int.from_bytes(data[at + 2:at + 4], "big")
        end = at + 4 + alen
        if end > len(data):
            return None
        attrs.setdefault(atype, data[at + 4:end])
        at = end + (-alen % 4)
    if at != len(data):
        return None
    return mtype, data[8:20], attrs


def address(value: bytes | None, xor: bool = False) -> Addr | None:
    """An IPv4 (MAPPED-, XOR-MAPPED-, OTHER-...) address attribute's value; None if
    absent, not IPv4 or the wrong size."""
    if value is None or len(value) != 8 or value[1] != 1:
        return None
    port = int.from_bytes(value[2:4], "big")
    ip = int.from_bytes(value[4:8], "big")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        ip ^= MAGIC_COOKIE
    return socket.inet_ntoa(ip.to_bytes(4, "big")), port


@dataclass(frozen=True)
class Response:
    """What a Binding Success Response said, and where it came from."""

    source: Addr
    mapped: Addr | None  # XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS
    other: Addr | None  # OTHER-ADDRESS, else (RFC 3489) CHANGED-ADDRESS
    origin: Addr | None  # RESPONSE-ORIGIN


def response(data: bytes, source: Addr, txid: bytes) -> Response | str | None:
    """The Binding response to transaction ``txid`` in ``data``: a Response for a
    success, an error's text for an error, None when it is not one of ours."""
    msg = decode(data)
    if msg is None or msg[1] != txid:
        return None
    mtype, _, attrs = msg
    if mtype == BINDING_ERROR:
        code = attrs.get(0x0009, b"")
        text = code[4:].decode("utf-8", "replace") if len(code) >= 4 else ""
        number = (code[2] & 7) * 100 + code[3] if len(code) >= 4 else "?"
        return f"error {number} {text}".strip()
    if mtype != BINDING_SUCCESS:
        return None
    mapped = address(attrs.get(XOR_MAPPED_ADDRESS), xor=True) \
        or address(attrs.get(MAPPED_ADDRESS))
    other = address(attrs.get(OTHER_ADDRESS)) or address(attrs.get(CHANGED_ADDRESS))
    return Response(source, mapped, other, address(attrs.get(RESPONSE_ORIGIN)))


def receive(sock: Sock, timeout: float) -> tuple[bytes, Addr] | None:
    """One datagram within ``timeout`` seconds, or None. An ICMP error the socket
    reports (a refused port) counts as nothing received."""
    sock.settimeout(max(timeout, 0.001))
    try:
        data, source = sock.recvfrom(65535)
    except OSError:  # TimeoutError among them
        return None
    return data, (str(source[0]), int(source[1]))


def send(sock: Sock, data: bytes, dest: Addr) -> bool:
    try:
        sock.sendto(data, dest)
    except OSError:  # e.g. a refused port reported by the previous send
        return False
    return True


def transact(sock: Sock, server: Addr, *, change: int = 0, timeout: float = 1.0,
             tries: int = 3, expect: Addr | None = None) -> Response | None:
    """Send a Binding Request to ``server`` up to ``tries`` times, ``timeout`` apart,
    and return the first success response to it (from ``expect``, when given: where a
    CHANGE-REQUEST should make it come from); None if none came or the server refused."""
    txid = os.urandom(12)
    data = request(txid, change)
    for _ in range(max(tries, 1)):
        send(sock, data, server)
        deadline = time.monotonic() + timeout
        while True:
            got = receive(sock, deadline - time.monotonic())
            if got is None:
                break
            answer = response(got[0], got[1], txid)
            if isinstance(answer, str):
                return None
            if answer is not None and answer.mapped is not None \
                    and (expect is None or answer.source == expect):
                return answer
            if time.monotonic() >= deadline:
                break
    return None


# --- the commands ----------------------------------------------------------------------


def fmt(addr: Addr | None) -> str | None:
    return None if addr is None else f"{addr[0]}:{addr[1]}"


def mapped(server: Addr, *, local_port: int = 0, timeout: float = 1.0, tries: int = 3,
           net: Network | None = None) -> tuple[dict[str, Any], int]:
    """Test I alone: {"local", "mapped", "error"} and the exit status."""
    net = net or Network()
    out: dict[str, Any] = dict.fromkeys(MAPPED_KEYS)
    try:
        sock = net.open(local_port)
    except OSError as e:
        out["error"] = f"cannot bind UDP port {local_port}: {e}"
        return out, 1
    try:
        out["local"] = fmt((net.source_ip(server[0]), int(sock.getsockname()[1])))
        r = transact(sock, server, timeout=timeout, tries=tries)
    except OSError as e:  # no route to the server
        out["error"] = f"{type(e).__name__}: {e}"
        return out, 1
    finally:
        sock.close()
    if r is None:
        out["error"] = f"no answer from {fmt(server)}"
        return out, 1
    out["mapped"] = fmt(r.mapped)
    return out, 0


def classify(server: Addr, *, local_port: int = 0, timeout: float = 1.0, tries: int = 3,
             net: Network | None = None) -> tuple[dict[str, Any], int]:
    """RFC 5780's mapping and filtering tests, port preservation and hairpinning: the
    JSON object classify prints, and the exit status."""
    net = net or Network()
    out: dict[str, Any] = dict.fromkeys(CLASSIFY_KEYS)
    opened: list[Sock] = []

    def open_socket(port: int) -> Sock:
        sock = net.open(port)
        opened.append(sock)
        return sock

    def ask(sock: Sock, dest: Addr, change: int = 0, expect: Addr | None = None
            ) -> Response | None:
        return transact(sock, dest, change=change, timeout=timeout, tries=tries,
                        expect=expect)

    try:
        sock = open_socket(local_port)
        local = (net.source_ip(server[0]), int(sock.getsockname()[1]))
        out["local"] = fmt(local)
        first = ask(sock, server)
        if first is None or first.mapped is None:
            out["error"] = f"no answer from {fmt(server)}"
            return out, 1
        m1 = first.mapped
        out.update(mapped=fmt(m1), nat=m1 != local, preserves_port=m1[1] == local[1])
        if first.other is None:
            out["error"] = f"{fmt(server)} gave no OTHER-ADDRESS: it does not do RFC 5780"
            return out, 1
        other_ip, other_port = first.other
        errors: list[str] = []

        # Mapping (4.3): II to the alternate address, III to the alternate address and
        # port, from the same socket; without a NAT, nothing depends on anything.
        if m1 == local:
            out["mapping"] = "eim"
        else:
            second = ask(sock, (other_ip, server[1]))
            if second is None:
                errors.append(f"mapping test II: no answer from {other_ip}:{server[1]}")
            elif second.mapped == m1:
                out["mapping"] = "eim"
            else:
                third = ask(sock, first.other)
                if third is None:
                    errors.append(f"mapping test III: no answer from {fmt(first.other)}")
                else:
                    out["mapping"] = "adm" if third.mapped == second.mapped else "apdm"

        # Filtering (4.4), from a fresh socket: II asks for the answer from the other
        # address and port, III from the other port only.
        fsock = open_socket(0)
        if ask(fsock, server) is None:
            errors.append(f"filtering test I: no answer from {fmt(server)}")
        elif ask(fsock, server, CHANGE_IP | CHANGE_PORT, expect=first.other) is not None:
            out["filtering"] = "eif"
        elif ask(fsock, server, CHANGE_PORT, expect=(server[0], other_port)) is not None:
            out["filtering"] = "adf"
        else:
            out["filtering"] = "apdf"

        out["hairpin"] = hairpin(sock, m1, open_socket(0), server, timeout, tries)
        if errors:
            out["error"] = "; ".join(errors)
            return out, 1
        return out, 0
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out, 1
    finally:
        for s in opened:
            s.close()


def hairpin(sock: Sock, mapped_addr: Addr, second: Sock, server: Addr, timeout: float,
            tries: int) -> bool:
    """Whether a packet from ``second`` to ``sock``'s mapped address reaches ``sock``.
    ``sock`` first sends to ``second``'s own mapped address, so that a NAT that filters
    by address (and port) lets the hairpinned packet in: what is measured is the
    hairpinning, not the filter."""
    back = transact(second, server, timeout=timeout, tries=tries)
    token = HAIRPIN + os.urandom(8).hex().encode()
    for _ in range(max(tries, 1)):
        if back is not None and back.mapped is not None:
            send(sock, token, back.mapped)
        send(second, token, mapped_addr)
        deadline = time.monotonic() + timeout
        while (got := receive(sock, deadline - time.monotonic())) is not None:
            if got[0] == token:
                return True
            if time.monotonic() >= deadline:
                break
    return False


def punch(local_port: int, peer: Addr, *, duration: float = 5.0, interval: float = 0.1,
          net: Network | None = None) -> tuple[dict[str, Any], int]:
    """Hole punching with ``peer``: a probe to it every ``interval`` seconds, an answer
    to every probe that arrives (answers are not answered: no ping-pong). Stops after
    ``duration``, or PUNCH_LINGER seconds after the first packet from the peer's address
    once one of its packets has been answered."""
    net = net or Network()
    out: dict[str, Any] = {"received_from": [], "received": 0, "sent": 0, "ok": False,
                           "error": None}
    try:
        sock = net.open(local_port)
    except OSError as e:
        out["error"] = f"cannot bind UDP port {local_port}: {e}"
        return out, 1
    seen: list[str] = out["received_from"]
    start = time.monotonic()
    end, next_probe, answered, n = start + duration, start, 0, 0
    first_ok: float | None = None
    try:
        while (now := time.monotonic()) < end:
            if first_ok is not None and answered and now >= first_ok + PUNCH_LINGER:
                break
            if now >= next_probe:
                n += 1
                if send(sock, PUNCH + str(n).encode(), peer):
                    out["sent"] += 1
                next_probe += interval
                if next_probe < now:  # (fell behind: no burst to catch up)
                    next_probe = now + interval
            got = receive(sock, min(next_probe, end) - time.monotonic())
            if got is None:
                continue
            data, source = got
            out["received"] += 1
            if (text := f"{source[0]}:{source[1]}") not in seen:
                seen.append(text)
            from_peer = source[0] == peer[0]
            if from_peer and first_ok is None:
                first_ok = time.monotonic()
            if not data.startswith(PUNCH_ACK):
                if send(sock, PUNCH_ACK + data[:64], source):
                    out["sent"] += 1
                    answered += 1 if from_peer else 0
    finally:
        sock.close()
    out["ok"] = first_ok is not None
    return out, 0


# --- the command line ----------------------------------------------------------------


def endpoint(text: str) -> Addr:
    """``IP:PORT`` (argparse type)."""
    host, sep, port = text.rpartition(":")
    try:
        number = int(port)
        socket.inet_aton(host)
    except (ValueError, OSError):
        number = -1
    if not sep or not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: give IPV4:PORT")
    return host, number


def port_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: give a UDP port (0-65535)")
    return number


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, more than 0")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="natprobe.py", description=__doc__.split("\n\n")[0]
                                if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("classify", "RFC 5780 mapping and filtering, port preservation, "
                        "hairpinning"), ("mapped", "this socket's public address")):
        c = sub.add_parser(name, help=text)
        c.add_argument("server", help="the STUN server's address or name")
        c.add_argument("--port", type=port_number, default=3478, help="its primary port")
        c.add_argument("--local-port", type=port_number, default=0,
                       help="the UDP port to send from (default: any free one)")
        c.add_argument("--timeout", type=positive, default=1.0,
                       help="seconds to wait for each answer")
        c.add_argument("--retries", type=int, default=3,
                       help="requests sent before a test counts as unanswered")
    c = sub.add_parser("punch", help="UDP hole punching with a peer")
    c.add_argument("--local-port", type=port_number, required=True)
    c.add_argument("--peer", type=endpoint, required=True, help="the peer's IP:PORT")
    c.add_argument("--duration", type=positive, default=5.0)
    c.add_argument("--interval", type=positive, default=0.1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "punch":
        out, status = punch(args.local_port, args.peer, duration=args.duration,
                            interval=args.interval)
    else:
        try:
            info = socket.getaddrinfo(args.server, args.port, socket.AF_INET,
                                      socket.SOCK_DGRAM)
            server: Addr = (str(info[0][4][0]), int(info[0][4][1]))
        except (OSError, IndexError) as e:
            keys = CLASSIFY_KEYS if args.command == "classify" else MAPPED_KEYS
            out, status = dict.fromkeys(keys), 1
            out["error"] = f"cannot resolve {args.server}: {e}"
        else:
            run = classify if args.command == "classify" else mapped
            out, status = run(server, local_port=args.local_port, timeout=args.timeout,
                              tries=args.retries)
    print(json.dumps(out), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
