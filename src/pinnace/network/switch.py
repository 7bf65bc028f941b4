"""The learning Ethernet switch behind one pinnace virtual network.

Every NIC on a network is a QEMU ``dgram`` netdev over unix sockets: QEMU binds its
own path (``qemu``) and sends each Ethernet frame as one datagram to a path the
switch binds (``peer``). The switch learns behind which port each source MAC lives
and sends a frame to that one port, or floods it to every other port when the
destination is broadcast, multicast or unknown. It knows only the ports of its own
directory, so frames never cross from one network into another.

The switch runs as a small process of its own under a supervisor that restarts it
when it dies. Datagrams are connectionless: a new switch that binds the same peer
paths is all QEMU needs, nothing reconnects. pinnace adds and removes ports by
renaming files into ``ports/`` and sending SIGHUP; the switch also watches the
directory's mtime in case a signal is lost. One directory per network::

    DIR/ports/<port-id>.json   one per NIC, written by pinnace (see PortSpec)
    DIR/switch.pid             "pid starttime" of the switch, written by the switch
    DIR/switch.ports.json      what the switch bound and rejected, after every rescan
    DIR/supervisor.pid         "pid starttime" of the supervisor
    DIR/switch.log             stderr of supervisor and switch: one line per event
    DIR/switch.lock            held while the supervisor is started or stopped
    DIR/switch.stats.json      per-port counters, written on SIGUSR1
    DIR/hosts/                 sockets of the simulated hosts the switch runs (below)

It is also the network lab's data path: every frame it delivers to a machine passes
that machine's link impairment (delay, loss, rate: :mod:`.impair`) and the network's
partition, both read from ``network.json`` at every rescan. A network with neither
takes the plain path, as before.

It also runs the network's simulated hosts (:mod:`.router`), when ``network.json``
has them: a router to an upstream network, or on the internet its core. They are
ports like any other, through their own port files, so nothing above changes for them.

The switch process imports nothing beyond the standard library, pinnace's error
tree, its store module and the lab's modules (:mod:`.impair`, :mod:`.router`,
:mod:`.nat`, :mod:`.services`), so a restart takes a few tens of milliseconds. :func:`ensure_running`,
:func:`notify`, :func:`stop` and :func:`running` are what the rest of pinnace calls.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypedDict

from ..errors import ConfigError, SwitchError
from ..store import (
    FileLock,
    NetworkFiles,
    detached_env,
    owner_alive,
    proc_start_time,
    tail,
    write_atomic,
)
from .impair import Lab, Link
from .router import Core, Nic, Router, RouterSpec, bind_dgram, mac_for

log = logging.getLogger(__name__)

PORT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_PORTS = 1024
MAX_MACS = 4096
MAC_AGE = 300.0  # seconds a learned MAC is kept without a frame from it
MIN_FRAME = 14  # an Ethernet header
MAX_FRAME = 65550  # the largest frame QEMU's dgram netdev sends
SUN_PATH_MAX = 107  # bytes of a unix socket path, without the terminating NUL

_MODULE = "pinnace.network.switch"  # not __name__: that is "__main__" under -m
_POLL_INTERVAL = 0.5  # housekeeping: look at the ports directory, age the MAC table
_RACY_MTIME_NS = 2_000_000_000  # an mtime this recent may hide a second change: rescan anyway
_REFRESH = 1.0  # move a MAC to the young end of the table at most this often
_BATCH = 64  # datagrams taken from one socket before the others get a turn
_SNDBUF = 1 << 20  # frames queued at slow receivers are charged to our send buffer
_BACKLOG_BYTES = 4 << 20  # a port keeps this much while its QEMU's queue is full, then drops
_RECONNECT = 0.2  # seconds between tries to connect to a QEMU that is not there
_PORT_FILE_MAX = 65536
_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOBUFS})
_ZERO_MAC = bytes(6)
_STARTUP_SIGNALS = {signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
_FLAPPING = 1.0  # a switch that dies sooner than this after starting doubles the backoff
_HEALTHY = 10.0  # a switch that ran this long resets it
_LOCK_TIMEOUT = 30.0


# --- port files ------------------------------------------------------------------------


@dataclass(frozen=True)
class PortSpec:
    """One NIC on the network, as its port file ``ports/<port-id>.json`` describes it.

    ``peer`` is the path the switch binds and QEMU sends to; ``qemu`` is the path QEMU
    binds, where the switch sends. ``sender`` is the address frames from QEMU carry,
    which is the string QEMU bound ``qemu`` with: the only sender the port accepts
    frames from. It is ``qemu`` itself unless given; pinnace gives QEMU the path relative
    to its working directory (the machine's folder, which holds ``qemu`` and ``peer``),
    so that the folder can be renamed under a running QEMU. ``machine`` and ``mac`` are
    labels for humans and statistics.
    """

    peer: str
    qemu: str
    machine: str = ""
    mac: str = ""
    sender: str = ""
    ip: str = ""  # its IPv4 address, if it has one (the internet's DNS answers with it)
    routes: tuple[str, ...] = ()  # subnets behind it (a routed network's router)

    @property
    def accepted(self) -> str:
        """The sender address the port accepts frames from."""
        return self.sender or self.qemu

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"peer": self.peer, "qemu": self.qemu, "machine": self.machine, "mac": self.mac}
        if self.sender:
            out["sender"] = self.sender
        if self.ip:
            out["ip"] = self.ip
        if self.routes:
            out["routes"] = list(self.routes)
        return out


def parse_port(data: bytes) -> PortSpec:
    """The PortSpec in the bytes of a port file; ValueError says what is wrong with them."""
    try:
        obj = json.loads(data)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    paths = []
    for key in ("peer", "qemu"):
        path = obj.get(key)
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ValueError(f"{key!r} must be an absolute path")
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise ValueError(
                f"{key} path {path!r} is longer than {SUN_PATH_MAX} bytes, "
                "the limit for unix sockets"
            )
        paths.append(path)
    labels = []
    for key in ("machine", "mac"):
        label = obj.get(key, "")
        if not isinstance(label, str):
            raise ValueError(f"{key!r} must be a string")
        labels.append(label)
    if paths[0] == paths[1]:
        raise ValueError("'peer' and 'qemu' are the same path")
    sender = obj.get("sender", "")
    if not isinstance(sender, str) or "\0" in sender:
        raise ValueError("'sender' must be a path")
    if len(os.fsencode(sender)) > SUN_PATH_MAX:
        raise ValueError(f"sender {sender!r} is longer than {SUN_PATH_MAX} bytes, "
                         "the limit for unix sockets")
    ip = obj.get("ip", "")
    routes = obj.get("routes", [])
    try:
        if not isinstance(ip, str) or (ip and str(ipaddress.IPv4Address(ip)) != ip):
            raise ValueError
        if not isinstance(routes, list) or len(routes) > 16 or not all(
                isinstance(r, str) and ipaddress.IPv4Network(r) for r in routes):
            raise ValueError
    except ValueError:
        raise ValueError("'ip' must be an IPv4 address and 'routes' at most 16 IPv4 "
                         "networks") from None
    return PortSpec(paths[0], paths[1], labels[0], labels[1], sender, ip, tuple(routes))


def read_ports(files: NetworkFiles) -> tuple[dict[str, PortSpec], dict[str, str]]:
    """The port files in the directory: specs by port id, and problems by file name."""
    specs: dict[str, PortSpec] = {}
    problems: dict[str, str] = {}
    try:
        names = sorted(os.listdir(files.ports_dir))
    except FileNotFoundError:
        return specs, problems
    for name in names:
        if name.startswith("."):
            continue  # a port file being written
        port_id = name.removesuffix(".json")
        if port_id == name or not PORT_ID_RE.match(port_id):
            problems[name] = "not a port file: the name must be <port-id>.json"
            continue
        try:
            with open(files.ports_dir / name, "rb") as f:
                data = f.read(_PORT_FILE_MAX + 1)
            if len(data) > _PORT_FILE_MAX:
                raise ValueError(f"larger than {_PORT_FILE_MAX} bytes")
            specs[port_id] = parse_port(data)
        except FileNotFoundError:
            continue  # removed while we looked
        except OSError as exc:
            problems[name] = f"cannot read it: {exc.strerror}"
        except ValueError as exc:
            problems[name] = str(exc)
    return specs, problems


def write_port(dir: Path, port_id: str, spec: PortSpec) -> None:
    """Add or replace a port file atomically; call :func:`notify` to apply it at once."""
    if not PORT_ID_RE.match(port_id):
        raise ConfigError("port id", port_id, "use letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    text = json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n"
    try:
        parse_port(text.encode())
    except ValueError as exc:
        raise ConfigError("port", spec, str(exc)) from exc
    files = NetworkFiles(Path(dir))
    files.ports_dir.mkdir(exist_ok=True)  # (FileNotFoundError: the network is gone)
    write_atomic(files.port_file(port_id), text)


def remove_port(dir: Path, port_id: str) -> None:
    """Remove a port file if it exists; call :func:`notify` to apply it at once."""
    with contextlib.suppress(FileNotFoundError):
        NetworkFiles(Path(dir)).port_file(port_id).unlink()


# --- the switch ------------------------------------------------------------------------


class _Port:
    """A bound port: its socket, where its QEMU listens, and its counters."""

    __slots__ = ("backlog", "backlog_bytes", "closed", "errors", "id", "link", "node", "out",
                 "partitioned", "retry_at", "rx", "rx_dropped", "sock", "spec", "tx",
                 "tx_dropped", "waited")

    def __init__(self, port_id: str, spec: PortSpec) -> None:
        self.id = port_id
        self.spec = spec
        self.sock, self.node = bind_dgram(spec.peer, sndbuf=_SNDBUF)
        self.rx = self.tx = self.rx_dropped = self.tx_dropped = self.partitioned = 0
        self.waited = 0  # frames that had to wait in the backlog
        self.errors: set[int] = set()  # send errnos logged already
        self.link: Link | None = None  # its impairment, if the network has one for it
        self.closed = False
        # Frames go out through a second socket, connected to QEMU's: on a connected
        # socket the kernel says when the peer's queue has room (a unix datagram queue
        # holds net.unix.max_dgram_qlen frames: 10 by default), and frames wait in the
        # backlog for it rather than being dropped. (``sock`` itself stays unconnected:
        # a connected socket takes frames only from its peer, and QEMU's socket is new
        # each time it starts.)
        self.out: socket.socket | None = None
        self.retry_at = 0.0
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0

    def owns_peer(self) -> bool:
        """True if the file at the peer path is still the socket this port bound."""
        try:
            st = os.lstat(self.spec.peer)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.node


class Switch:
    """A learning switch over the ports of one network directory.

    Creating it binds the ports. Drive it with :meth:`run` until :meth:`stop`, or one
    :meth:`poll` at a time; :meth:`close` unbinds. :meth:`stop`, :meth:`request_rescan`
    and :meth:`request_stats` are safe from signal handlers and other threads.
    ``clock`` (monotonic seconds) is there so tests can age the MAC table.
    """

    def __init__(self, dir: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.files = NetworkFiles(Path(dir))
        self.rejected: dict[str, str] = {}  # port file name -> why it is not bound
        self._clock = clock
        self._ports: dict[str, _Port] = {}
        self._flood: tuple[_Port, ...] = ()
        self._macs: OrderedDict[bytes, tuple[_Port, float]] = OrderedDict()  # oldest first
        self._buf = bytearray(MAX_FRAME + 1)  # one byte more, to see a frame is too long
        self._view = memoryview(self._buf)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = self._rescan_wanted = self._stats_wanted = self._closed = False
        self._retry_binds = False
        self._scanned_mtime: int | None = None
        self._next_tick = 0.0
        self._state: dict[str, object] | None = None
        # The lab (network.json): impairments, per machine, and a partition.
        self._lab: Lab = Lab()
        self._groups: dict[str, int] = {}  # machine -> its side of the partition
        self._timers: list[tuple[float, int, _Port, bytes]] = []  # frames held back
        self._seq = 0
        self._captures: dict[str, Capture] = {}  # capture id -> its open pcap file
        # (not parents: a switch whose network's folder was removed must not make it anew)
        self.files.ports_dir.mkdir(exist_ok=True)
        # Simulated hosts this switch runs (network.json says which): the network's
        # router, or the internet's core; each is a port of some switch, like a QEMU.
        self._hosts: dict[str, Router | Core] = {}
        self._host_specs: dict[str, object] = {}
        self.rescan()

    # --- requests from signal handlers and other threads ---

    def stop(self) -> None:
        """Make :meth:`run` return."""
        self._stopping = True
        self._wake()

    def request_rescan(self) -> None:
        """Rescan the port files at the next step of the loop."""
        self._rescan_wanted = True
        self._wake()

    def request_stats(self) -> None:
        """Write ``switch.stats.json`` at the next step of the loop."""
        self._stats_wanted = True
        self._wake()

    def _wake(self) -> None:
        if self._closed:
            return  # the pipe's fd number may belong to another file by now
        with contextlib.suppress(BlockingIOError):  # a full pipe: a wakeup is pending
            os.write(self._wake_w, b"\0")

    # --- the loop ---

    def run(self) -> None:
        """Forward frames until :meth:`stop` is called."""
        while not self._stopping:
            self.poll()

    def poll(self, timeout: float | None = None) -> None:
        """Forward what arrives within ``timeout`` s (default: until the next housekeeping)."""
        now = self._clock()
        if timeout is None:
            timeout = max(0.0, self._next_tick - now)
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        events = self._selector.select(timeout)
        now = self._clock()
        self._send_due(now)
        for key, _ in events:
            port: _Port | Callable[[float], None] | None = key.data
            if port is None:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            elif not isinstance(port, _Port):
                port(now)  # a simulated host's socket: its handler
            elif key.fileobj is port.sock:
                self._receive(port, now)
            elif not port.closed:
                self._flush(port)  # its QEMU's queue has room again
        for cap in self._captures.values():
            cap.flush()
        if self._rescan_wanted:
            self.rescan()
        if self._stats_wanted:
            self._stats_wanted = False
            write_atomic(self.files.stats, json.dumps(self.stats(), indent=2) + "\n")
        if now >= self._next_tick:
            self._next_tick = now + _POLL_INTERVAL
            if not self.files.dir.is_dir():  # its network was removed under it: done
                log.info("the network's folder is gone; stopping")
                self._stopping = True
                return
            if self._retry_binds or self._ports_changed():
                self.rescan()
            elif self._captures:  # (a capture whose command died ends)
                self._read_captures()
                self._write_state()
            self._expire(now)
            for host in self._hosts.values():
                host.expire(now)

    def _receive(self, port: _Port, now: float) -> None:
        """Forward the datagrams waiting on ``port``, up to a batch of them."""
        buf, view, macs = self._buf, self._view, self._macs
        sock, qemu = port.sock, port.spec.accepted
        for _ in range(_BATCH):
            try:
                n, sender = sock.recvfrom_into(buf)
            except BlockingIOError:
                return
            port.rx += 1
            # Too short or long, not from this port's QEMU, or a multicast source: drop.
            if n < MIN_FRAME or n > MAX_FRAME or sender != qemu or buf[6] & 1:
                port.rx_dropped += 1
                continue
            src = bytes(view[6:12])
            if src == _ZERO_MAC:
                port.rx_dropped += 1
                continue
            learned = macs.get(src)
            if learned is None or learned[0] is not port or now - learned[1] > _REFRESH:
                self._learn(src, port, now)
            frame = view[:n]
            if self._captures:
                for cap_id, cap in list(self._captures.items()):
                    if cap.port and cap.port != port.id and not self._to_port(frame, cap.port):
                        continue
                    if not cap.write(frame):  # (a full disk, say: that capture ends)
                        log.warning("capture %s: %s; ended", cap_id, cap.error)
                        self._captures.pop(cap_id).close()
            if not buf[0] & 1:
                learned = macs.get(bytes(view[0:6]))
                if learned is not None and now - learned[1] <= MAC_AGE:
                    if learned[0] is port:
                        port.rx_dropped += 1  # the destination is on the port it came from
                    elif self._lab.plain:
                        self._send(learned[0], frame)
                    else:
                        self._deliver(port, learned[0], frame, now)
                    continue
            for other in self._flood:
                if other is not port:
                    if self._lab.plain:
                        self._send(other, frame)
                    else:
                        self._deliver(port, other, frame, now)

    def _to_port(self, frame: memoryview, port_id: str) -> bool:
        """True if ``frame`` is sent to the MAC of port ``port_id``."""
        port = self._ports.get(port_id)
        return port is not None and bytes(frame[0:6]).hex(":") == port.spec.mac

    def _deliver(self, src: _Port, dst: _Port, frame: memoryview, now: float) -> None:
        """Send ``frame`` from ``src`` to ``dst`` through the lab: dropped across a
        partition, else through ``dst``'s impaired link (now, later, twice or never)."""
        groups = self._groups
        if groups:
            a, b = groups.get(src.spec.machine), groups.get(dst.spec.machine)
            if a is not None and b is not None and a != b and (
                    not self._lab.oneway or (a, b) == (0, 1)):
                dst.partitioned += 1
                return
        link = dst.link
        if link is None:
            self._send(dst, frame)
            return
        for when, data in link.deliveries(bytes(frame), now):
            if when <= now:
                self._send(dst, memoryview(data))
            else:
                self._seq += 1
                heapq.heappush(self._timers, (when, self._seq, dst, data))

    def _send_due(self, now: float) -> None:
        """Send the held-back frames whose time has come (to ports still bound)."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, port, data = heapq.heappop(timers)
            if not port.closed:
                self._send(port, memoryview(data))

    def _learn(self, mac: bytes, port: _Port, now: float) -> None:
        # Every (re)learned MAC goes to the young end, so the table stays in age order
        # and both expiry and eviction take from the old end.
        macs = self._macs
        macs[mac] = (port, now)
        macs.move_to_end(mac)
        if len(macs) > MAX_MACS:
            macs.popitem(last=False)

    def _expire(self, now: float) -> None:
        macs = self._macs
        while macs and now - next(iter(macs.values()))[1] > MAC_AGE:
            macs.popitem(last=False)

    def _send(self, port: _Port, frame: memoryview) -> None:
        if port.backlog:  # (frames keep their order)
            self._wait(port, frame)
            return
        out = port.out or self._connect(port)
        if out is None:
            self._dropped(port, None)  # QEMU is not there (yet, or any more)
            return
        try:
            out.send(frame)
        except BlockingIOError:
            self._wait(port, frame)
        except OSError as exc:
            self._disconnect(port)  # QEMU went (or started again): connect anew
            self._dropped(port, exc)
        else:
            port.tx += 1

    def _connect(self, port: _Port) -> socket.socket | None:
        """A socket connected to the port's QEMU (tried again at most every _RECONNECT s
        while QEMU is not there)."""
        now = self._clock()
        if now < port.retry_at:
            return None
        out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            out.setblocking(False)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            out.connect(port.spec.qemu)
        except OSError:
            out.close()
            port.retry_at = now + _RECONNECT
            return None
        port.out = out
        return out

    def _disconnect(self, port: _Port) -> None:
        out, port.out = port.out, None
        if out is not None:
            if port.backlog:
                self._selector.unregister(out)
            for _ in port.backlog:
                self._dropped(port, None)
            port.backlog.clear()
            port.backlog_bytes = 0
            out.close()
        port.retry_at = 0.0

    def _wait(self, port: _Port, frame: memoryview) -> None:
        """Keep ``frame`` until QEMU's queue has room (the loop is told when)."""
        if port.backlog_bytes + len(frame) > _BACKLOG_BYTES or port.out is None:
            self._dropped(port, None)
            return
        if not port.backlog:
            self._selector.register(port.out, selectors.EVENT_WRITE, port)
        port.backlog.append(bytes(frame))
        port.backlog_bytes += len(frame)
        port.waited += 1

    def _flush(self, port: _Port) -> None:
        """Send what waits for QEMU's queue, as far as it has room."""
        backlog, out = port.backlog, port.out
        assert out is not None
        while backlog:
            try:
                out.send(backlog[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self._dropped(port, exc)
                self._disconnect(port)
                return
            port.backlog_bytes -= len(backlog.popleft())
            port.tx += 1
        self._selector.unregister(out)

    def _dropped(self, port: _Port, exc: OSError | None) -> None:
        # QEMU not running yet, or gone, or its queue full too long: a link that drops,
        # not an error (unusual errors are logged once per port).
        port.tx_dropped += 1
        if exc is not None and exc.errno not in _QUIET_ERRNOS and exc.errno not in port.errors:
            port.errors.add(exc.errno or 0)
            log.warning("port %s: cannot send to %s: %s", port.id, port.spec.qemu, exc)

    # --- ports ---

    def _ports_changed(self) -> bool:
        mtime = self._ports_mtime()
        # Two changes within one timestamp tick leave the same mtime: while the mtime is
        # recent, rescan every time to catch the second.
        return mtime != self._scanned_mtime or (
            mtime is not None and time.time_ns() - mtime < _RACY_MTIME_NS
        )

    def _ports_mtime(self) -> int | None:
        try:
            return os.stat(self.files.ports_dir).st_mtime_ns
        except FileNotFoundError:
            return None

    def rescan(self) -> None:
        """Bind, rebind and close ports so that they match the port files."""
        self._rescan_wanted = False
        self._scanned_mtime = self._ports_mtime()  # before reading: a later change rescans
        specs, rejected = read_ports(self.files)
        wanted: dict[str, PortSpec] = {}
        owners: dict[str, str] = {}
        for port_id, spec in specs.items():
            if len(wanted) >= MAX_PORTS:
                rejected[f"{port_id}.json"] = f"too many ports (at most {MAX_PORTS})"
            elif spec.peer in owners:
                rejected[f"{port_id}.json"] = f"port {owners[spec.peer]} has this peer path"
            else:
                wanted[port_id] = spec
                owners[spec.peer] = port_id
        for port_id, port in list(self._ports.items()):
            new = wanted.get(port_id)
            if new is not None and new.peer == port.spec.peer and port.owns_peer():
                if new.qemu != port.spec.qemu:
                    self._disconnect(port)  # (connect to the new path when it is there)
                port.spec = new  # the QEMU path or the labels may have changed
            else:
                self._close_port(port)
        self._retry_binds = False
        for port_id, spec in wanted.items():
            if port_id in self._ports:
                continue
            try:
                port = _Port(port_id, spec)
            except ValueError as exc:
                rejected[f"{port_id}.json"] = str(exc)
                self._retry_binds = True
            except OSError as exc:
                rejected[f"{port_id}.json"] = f"cannot bind {spec.peer}: {exc.strerror}"
                self._retry_binds = True
            else:
                self._ports[port_id] = port
                self._selector.register(port.sock, selectors.EVENT_READ, port)
                log.info("port %s: bound %s (machine %s)", port_id, spec.peer, spec.machine or "?")
        self._flood = tuple(self._ports.values())
        self._read_lab()
        self._read_captures()
        for name, reason in rejected.items():
            if self.rejected.get(name) != reason:
                log.warning("ignoring ports/%s: %s", name, reason)
        self.rejected = rejected
        self._write_state()

    def _read_lab(self) -> None:
        """Take the impairments and partition from network.json (read at every rescan:
        pinnace rewrites it and sends SIGHUP). A link whose impairment is unchanged keeps
        its state (its random stream, its queue); a damaged file changes nothing."""
        try:
            meta = json.loads(self.files.meta.read_bytes())
            lab = Lab.from_meta(meta)
        except FileNotFoundError:
            meta, lab = {}, Lab()
        except Exception as exc:  # whatever is in it, the switch runs on
            log.warning("network.json: %s; impairments unchanged", exc)
            return
        self._read_hosts(meta)
        seeds_changed = lab.seed != self._lab.seed
        self._lab = lab
        self._groups = {m: i for i, group in enumerate(lab.groups) for m in group}
        for port in self._ports.values():
            imp = lab.link(port.spec.machine)
            if imp.none:
                port.link = None
            elif port.link is None or port.link.imp != imp or seeds_changed:
                port.link = Link(imp, lab.rng(port.id))

    def _read_hosts(self, meta: dict[str, object]) -> None:
        """Start, rebuild or stop the simulated hosts to match network.json: a router
        (``"router"``: see :class:`.router.RouterSpec`) or the internet's core
        (``"internet": true``). A host whose description is unchanged keeps its state
        (its NAT mappings); one that cannot start is logged and left out."""
        wanted: dict[str, object] = {}
        try:
            subnet = str(ipaddress.IPv4Network(str(meta.get("subnet"))))
            if meta.get("router") is not None:  # (its seed is read when it starts)
                wanted["router"] = (RouterSpec.from_dict(meta["router"]), subnet)
            if meta.get("internet") is True:
                wanted["core"] = subnet
        except Exception as exc:  # (a damaged router description: the hosts stay)
            if meta:
                log.warning("network.json: %s; its router is unchanged", exc)
            return
        for key in list(self._hosts):
            if self._host_specs.get(key) != wanted.get(key):
                self._stop_host(key)
        for key, spec in wanted.items():
            if key not in self._hosts:
                try:
                    host = self._make_host(key, spec, meta.get("seed"))
                except (OSError, ValueError) as exc:
                    log.warning("%s: cannot start: %s", key, exc)
                    self._retry_binds = True
                    continue
                self._hosts[key], self._host_specs[key] = host, spec
                for sock, handler in host.sockets():
                    self._selector.register(sock, selectors.EVENT_READ, handler)
                log.info("%s: started", key)
        core = self._hosts.get("core")
        if isinstance(core, Core):
            specs = [p.spec for p in self._ports.values()]
            core.update({s.machine: int(ipaddress.IPv4Address(s.ip))
                         for s in specs if s.ip and s.machine},
                        [(r, s.ip) for s in specs if s.ip for r in s.routes])

    def _make_host(self, key: str, spec: object, seed: object) -> Router | Core:
        files = self.files
        if key == "router":
            assert isinstance(spec, tuple)
            rspec, subnet = spec
            net = ipaddress.IPv4Network(subnet)
            wan_net = ipaddress.IPv4Network(rspec.wan_subnet)
            name = files.dir.name
            lan = Nic(str(files.host_sock("lan")), str(files.host_peer("lan")),
                      mac_for(name, "lan"), int(net.network_address) + 1, net,
                      clock=self._clock, watch=self._watch)
            try:
                wan = Nic(str(files.host_sock("wan")), str(files.host_peer("wan")),
                          mac_for(name, "wan"), int(ipaddress.IPv4Address(rspec.wan_ip)),
                          wan_net, clock=self._clock, watch=self._watch,
                          gateway=int(ipaddress.IPv4Address(rspec.wan_gateway))
                          if rspec.wan_gateway else None)
            except BaseException:
                lan.close()
                raise
            return Router(rspec, lan, wan, lan_subnet=subnet,
                          seed=seed if isinstance(seed, int) else None, clock=self._clock)
        net = ipaddress.IPv4Network(str(spec))
        first = int(net.network_address) + 1
        return Core(Nic(str(files.host_sock("core")), str(files.host_peer("core")),
                        mac_for("internet", "core"), first, net, watch=self._watch,
                        answers=frozenset({first + 1}), clock=self._clock), first + 1)

    def _watch(self, sock: socket.socket, handler: Callable[[float], None] | None) -> None:
        """Call ``handler`` when ``sock`` (a simulated host's) can send; None: stop."""
        if handler is None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        else:
            self._selector.register(sock, selectors.EVENT_WRITE, handler)

    def _stop_host(self, key: str) -> None:
        host = self._hosts.pop(key)
        self._host_specs.pop(key, None)
        for sock, _ in host.sockets():
            self._selector.unregister(sock)
        host.close()
        log.info("%s: stopped", key)

    def _read_captures(self) -> None:
        """Open and close pcap files to match ``captures/`` (pinnace adds a request and
        sends SIGHUP; removing it ends the capture)."""
        wanted: dict[str, tuple[str, str]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in self.files.captures_dir.iterdir():
                if entry.suffix != ".json" or not PORT_ID_RE.match(entry.stem):
                    continue
                try:
                    request = json.loads(entry.read_bytes())
                    path, owner = request["path"], request["owner"]
                    only = request.get("port", "")
                    alive = isinstance(owner, str) and owner_alive(owner)
                except Exception:  # (a damaged request is not ours to act on)
                    continue
                if not alive:
                    with contextlib.suppress(OSError):  # its command died: it ends here
                        entry.unlink()
                    continue
                if isinstance(path, str) and os.path.isabs(path) and isinstance(only, str) \
                        and (not only or PORT_ID_RE.match(only)):
                    wanted[entry.stem] = (path, only)
        for cap_id in list(self._captures):
            cap = self._captures[cap_id]
            if (cap.path, cap.port) != wanted.get(cap_id):
                self._captures.pop(cap_id).close()
                log.info("capture %s: ended", cap_id)
        for cap_id, (path, only) in wanted.items():
            if cap_id not in self._captures:
                try:
                    self._captures[cap_id] = Capture(path, only)
                except (OSError, ValueError) as exc:
                    log.warning("capture %s: cannot write %s: %s", cap_id, path, exc)
                else:
                    log.info("capture %s: writing %s", cap_id, path)

    def _close_port(self, port: _Port) -> None:
        self._disconnect(port)
        port.closed = True
        self._selector.unregister(port.sock)
        port.sock.close()
        if port.owns_peer():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(port.spec.peer)
        del self._ports[port.id]
        self._macs = OrderedDict((m, e) for m, e in self._macs.items() if e[0] is not port)
        log.info("port %s: closed", port.id)

    def _write_state(self) -> None:
        state: dict[str, object] = {
            "pid": os.getpid(),
            "bound": {i: {"peer": p.spec.peer, "qemu": p.spec.qemu} for i, p in self._ports.items()},
            "rejected": self.rejected,
            "captures": sorted(self._captures),
        }
        if state != self._state:
            write_atomic(self.files.state, json.dumps(state, indent=2, sort_keys=True) + "\n")
            self._state = state

    def stats(self) -> dict[str, object]:
        """Frames in, out and dropped per port, and the size of the MAC table."""
        return {
            "pid": os.getpid(),
            "macs": len(self._macs),
            "ports": {
                port_id: {
                    "machine": p.spec.machine, "mac": p.spec.mac, "rx": p.rx, "tx": p.tx,
                    "rx_dropped": p.rx_dropped, "tx_dropped": p.tx_dropped,
                    "waited": p.waited, "backlog": len(p.backlog),
                    "impaired_dropped": p.link.dropped if p.link is not None else 0,
                    "partitioned": p.partitioned,
                }
                for port_id, p in self._ports.items()
            },
            "hosts": {key: host.stats() for key, host in self._hosts.items()},
        }

    def close(self) -> None:
        """Close every port, unlink the peer paths it bound and its state file; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._macs.clear()
        for cap in self._captures.values():
            cap.close()
        self._captures.clear()
        for key in list(self._hosts):
            self._stop_host(key)
        for port in list(self._ports.values()):
            self._close_port(port)
        self._flood = ()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads(self.files.state.read_bytes()).get("pid") == os.getpid():
                self.files.state.unlink()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


# --- captures ---------------------------------------------------------------------------

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
PCAP_LINKTYPE_ETHERNET = 1


def pcap_header(snaplen: int = MAX_FRAME) -> bytes:
    """The 24-byte global header of a pcap file of Ethernet frames (little-endian)."""
    return struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, snaplen, PCAP_LINKTYPE_ETHERNET)


class Capture:
    """A pcap file the switch writes every frame it receives to, as it arrives (before
    any loss, delay or partition; whole frames, with their time); replaced if it was
    there, as tcpdump -w does; readable by tcpdump and Wireshark while it grows."""

    def __init__(self, path: str, port: str = "") -> None:
        self.path = path
        self.port = port  # only frames from or to this port (a router's outside), if given
        self.error = ""
        # Never a link, never a FIFO or a device (which could block the switch).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            os.ftruncate(fd, 0)
            self._f = os.fdopen(fd, "wb", buffering=1 << 16)
        except BaseException:
            os.close(fd)
            raise
        self._f.write(pcap_header())

    def write(self, frame: memoryview) -> bool:
        """Add a frame; False (and ``error``) if the file cannot take it."""
        t = time.time()
        n = len(frame)
        try:
            self._f.write(struct.pack("<IIII", int(t), int(t % 1 * 1e6), n, n))
            self._f.write(frame)
        except OSError as exc:
            self.error = str(exc)
            return False
        return True

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._f.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


def read_pcap(data: bytes) -> list[tuple[float, bytes]]:
    """(time, frame) of each record of a pcap file's bytes (ours, or any little-endian
    microsecond one); ValueError if it is not one. A record cut short at the end (the
    file is still being written) is left out."""
    if len(data) < 24:
        raise ValueError("shorter than a pcap header")
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    if magic != PCAP_MAGIC or linktype != PCAP_LINKTYPE_ETHERNET:
        raise ValueError("not a little-endian pcap file of Ethernet frames")
    out, at = [], 24
    while at + 16 <= len(data):
        sec, usec, incl, _ = struct.unpack_from("<IIII", data, at)
        if at + 16 + incl > len(data):
            break
        out.append((sec + usec / 1e6, data[at + 16:at + 16 + incl]))
        at += 16 + incl
    return out


# --- processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    """A process named by pid and start time, so a reused pid is not mistaken for it."""

    pid: int
    start: int

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def _read_pid_file(path: Path) -> _Proc | None:
    try:
        words = path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) != 2 or not all(w.isdigit() for w in words):
        return None
    return _Proc(int(words[0]), int(words[1]))


def _live(path: Path) -> _Proc | None:
    proc = _read_pid_file(path)
    return proc if proc is not None and proc.alive() else None


def _write_pid_file(path: Path) -> None:
    pid = os.getpid()
    write_atomic(path, f"{pid} {proc_start_time(pid)}\n")


def _remove_pid_file(path: Path) -> None:
    """Remove ``path`` if it names this process (a successor may have written its own)."""
    proc = _read_pid_file(path)
    if proc is not None and proc.pid == os.getpid():
        path.unlink(missing_ok=True)


def serve(dir: Path) -> int:
    """Run the switch for ``dir`` in this process until SIGTERM or SIGINT; return 0."""
    files = NetworkFiles(dir)
    sw = Switch(dir)
    try:
        signal.signal(signal.SIGTERM, lambda _s, _f: sw.stop())
        signal.signal(signal.SIGINT, lambda _s, _f: sw.stop())
        signal.signal(signal.SIGHUP, lambda _s, _f: sw.request_rescan())
        signal.signal(signal.SIGUSR1, lambda _s, _f: sw.request_stats())
        # The supervisor starts us with these blocked, so that none of them can kill us
        # before the handlers are in place; whatever arrived meanwhile is handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_SIGNALS)
        _write_pid_file(files.switch_pid)  # only now: a SIGHUP to this pid is safe
        sw.run()
    finally:
        sw.close()
        _remove_pid_file(files.switch_pid)
    return 0


def supervise(dir: Path, *, detach: bool = False) -> int:
    """Run the switch for ``dir`` as a child and restart it whenever it dies; return 0.

    Returns after SIGTERM or SIGINT, once the switch has stopped. SIGHUP and SIGUSR1
    are passed on to the switch. Both write their stderr to ``switch.log``. With
    ``detach``, fork into a new session first; the parent exits once the supervisor
    has written its pid file.
    """
    files = NetworkFiles(dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    ready = _detach() if detach else None
    log_fd = os.open(files.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None:
            child.terminate()

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is not None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, forward)
    signal.signal(signal.SIGUSR1, forward)
    _write_pid_file(files.supervisor_pid)
    if ready is not None:
        os.write(ready, b"1")
        os.close(ready)
    log.info("supervisor started for %s", dir)
    backoff = _BACKOFF_MIN
    try:
        while not stopping:
            started = time.monotonic()
            # Blocked across the fork, these stay blocked in the child until its handlers
            # are installed; here they are delivered after the unblock, with child set.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_SIGNALS)
            try:
                child = subprocess.Popen(
                    [sys.executable, "-m", _MODULE, str(dir)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
                    process_group=0,  # a Ctrl-C on our terminal reaches us, and we stop it
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            log.info("switch started (pid %d)", child.pid)
            code = child.wait()
            ran = time.monotonic() - started
            if stopping:
                break
            if not Path(dir).is_dir():  # the network was removed (rm -rf, say): no restart
                log.info("the network's folder is gone; the supervisor stops")
                break
            if ran >= _HEALTHY:
                backoff = _BACKOFF_MIN
            delay = backoff
            if ran < _FLAPPING:
                backoff = min(backoff * 2, _BACKOFF_MAX)
            log.warning("switch (pid %d) exited after %.1f s (%s); restarting in %.2f s",
                        child.pid, ran, _describe_exit(code), delay)
            deadline = time.monotonic() + delay
            while not stopping and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=3)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        _remove_pid_file(files.supervisor_pid)
    log.info("supervisor stopped")
    return 0


def _detach() -> int:
    """Fork into a new session; the parent exits 0 when the child writes to the fd returned."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        os._exit(0 if os.read(r, 1) else 1)  # EOF: the child died before it was ready
    os.close(r)
    os.setsid()
    return w


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# --- what the rest of pinnace calls ----------------------------------------------------


class SwitchStatus(TypedDict):
    """What :func:`running` reports; a pid is None when its file is missing."""

    supervisor_pid: int | None
    supervisor_alive: bool
    switch_pid: int | None
    switch_alive: bool


def running(dir: Path) -> SwitchStatus:
    """The supervisor's and the switch's pids, and whether each is still that process."""
    files = NetworkFiles(Path(dir))
    sup = _read_pid_file(files.supervisor_pid)
    sw = _read_pid_file(files.switch_pid)
    return {
        "supervisor_pid": sup.pid if sup else None,
        "supervisor_alive": sup is not None and sup.alive(),
        "switch_pid": sw.pid if sw else None,
        "switch_alive": sw is not None and sw.alive(),
    }


def ensure_running(dir: Path, timeout: float = 5.0) -> int:
    """Start the network's supervisor and switch unless running; return the supervisor pid.

    Returns once the switch has taken up every port file (bound it, or rejected it with
    a reason in switch.log); raises SwitchError if that takes longer than ``timeout``.
    """
    files = NetworkFiles(Path(dir).absolute())
    try:
        files.ports_dir.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise _error(files, "its folder does not exist (the network was removed)") from None
    with FileLock(files.lock, _LOCK_TIMEOUT):
        sup = _live(files.supervisor_pid)
        if sup is None:
            # A switch that outlived its supervisor would fight a new one for the peer paths.
            orphan = _live(files.switch_pid)
            if orphan is not None:
                _end([orphan], timeout)
            sup = _start_supervisor(files, timeout)
        _await_in_sync(files, sup, timeout)
    return sup.pid


def notify(dir: Path, timeout: float = 2.0) -> bool:
    """Make the switch rescan its port files now, and wait until it has.

    Returns False if the network has no switch (nothing to tell); raises SwitchError if
    the switch has not caught up within ``timeout``.
    """
    files = NetworkFiles(Path(dir).absolute())
    sup = _live(files.supervisor_pid)
    sw = _live(files.switch_pid)
    if sup is None and sw is None:
        return False
    if sw is not None:
        sw.send(signal.SIGHUP)
    _await_in_sync(files, sup, timeout)
    return True


def stop(dir: Path, timeout: float = 5.0) -> bool:
    """Stop the network's supervisor and switch and remove their files and peer sockets.

    Returns True if they stopped on SIGTERM within ``timeout``, False if they had to be
    killed. Safe to call when nothing runs.
    """
    files = NetworkFiles(Path(dir).absolute())
    if not files.dir.is_dir():
        return True
    with FileLock(files.lock, _LOCK_TIMEOUT):
        procs = [p for p in (_live(files.supervisor_pid), _live(files.switch_pid)) if p]
        graceful = _end(procs, timeout)
        if not graceful:
            # The supervisor may have started a new switch before it was killed.
            _end([p for p in [_live(files.switch_pid)] if p], 0)
        peers = {spec.peer for spec in read_ports(files)[0].values()}
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            peers |= {b["peer"] for b in json.loads(files.state.read_bytes())["bound"].values()}
        for peer in peers:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(peer).st_mode):
                    os.unlink(peer)
        for path in (files.switch_pid, files.supervisor_pid, files.state, files.stats):
            path.unlink(missing_ok=True)
    return graceful


def _end(procs: Iterable[_Proc], timeout: float) -> bool:
    """SIGTERM ``procs``, then SIGKILL what is left after ``timeout``; True if none needed it."""
    procs = list(procs)
    for proc in procs:
        proc.send(signal.SIGTERM)
    if _await(lambda: not any(p.alive() for p in procs), timeout):
        return True
    for proc in procs:
        proc.send(signal.SIGKILL)
    _await(lambda: not any(p.alive() for p in procs), 2.0)
    return False


def _await(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _start_supervisor(files: NetworkFiles, timeout: float) -> _Proc:
    with open(files.log, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE, "--supervise", "--detach", str(files.dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
            close_fds=True, start_new_session=True, cwd="/", env=detached_env(),
        )
    try:
        code = proc.wait(timeout)  # the parent returns as soon as the supervisor is ready
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise _error(files, f"the supervisor did not start within {timeout:g} s") from None
    sup = _live(files.supervisor_pid)
    if code != 0 or sup is None:
        raise _error(files, f"the supervisor did not start ({_describe_exit(code)})")
    return sup


def _await_in_sync(files: NetworkFiles, sup: _Proc | None, timeout: float) -> None:
    """Wait until a live switch has taken up every port file as it is now."""

    def in_sync() -> bool:
        sw = _live(files.switch_pid)
        if sw is None:
            return False
        try:
            state = json.loads(files.state.read_bytes())
        except (OSError, ValueError):
            return False
        if not isinstance(state, dict) or state.get("pid") != sw.pid:
            return False
        bound, rejected = state.get("bound", {}), state.get("rejected", {})
        specs = read_ports(files)[0]
        return set(bound) <= set(specs) and all(
            bound.get(i) == {"peer": s.peer, "qemu": s.qemu} or f"{i}.json" in rejected
            for i, s in specs.items()
        )

    def settled() -> bool:
        if sup is not None and not sup.alive():
            raise _error(files, "the supervisor died")
        return in_sync()

    if not _await(settled, timeout):
        raise _error(files, f"the switch did not take up its ports within {timeout:g} s")


def await_capture(dir: Path, cap_id: str, running: bool, timeout: float = 5.0) -> None:
    """Wait until the network's switch has started (or ended) capture ``cap_id``."""
    files = NetworkFiles(Path(dir).absolute())

    def done() -> bool:
        try:
            state = json.loads(files.state.read_bytes())
        except (OSError, ValueError):
            return not running
        caps = state.get("captures", []) if isinstance(state, dict) else []
        return (cap_id in caps) == running

    if not _await(done, timeout):
        raise _error(files, f"the switch did not {'start' if running else 'end'} the "
                     f"capture within {timeout:g} s (see switch.log)")


def _error(files: NetworkFiles, problem: str) -> SwitchError:
    return SwitchError(str(files.dir), problem, log_tail=tail(files.log, lines=20))


def main(argv: list[str] | None = None) -> int:
    """``python -m pinnace.network.switch [--supervise [--detach]] DIR``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {_MODULE}",
        description="The learning Ethernet switch of one pinnace network directory.",
    )
    parser.add_argument("--supervise", action="store_true",
                        help="run the switch as a child process and restart it when it dies")
    parser.add_argument("--detach", action="store_true",
                        help="with --supervise: go to the background once ready")
    parser.add_argument("dir", type=Path, help="the network directory")
    args = parser.parse_args(argv)
    if args.detach and not args.supervise:
        parser.error("--detach needs --supervise")
    role = "supervisor" if args.supervise else "switch"
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {role}[%(process)d]: %(message)s"
    )
    directory: Path = args.dir.absolute()
    return supervise(directory, detach=args.detach) if args.supervise else serve(directory)


if __name__ == "__main__":
    sys.exit(main())
