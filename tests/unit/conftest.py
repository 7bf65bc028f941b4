"""Fixtures of the switch's tests (test_switch.py, test_impair.py): fake QEMU ends of
a network, unix datagram sockets in a short temporary folder."""

import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from pinnace.network.switch import PortSpec, stop, write_port

BROADCAST = b"\xff" * 6
UNKNOWN = bytes.fromhex("525400ffffff")


class FakeQemu:
    """The QEMU end of a dgram netdev: bound at ``qemu``, sending to the switch at ``peer``."""

    def __init__(self, root: Path, name: str, index: int) -> None:
        self.name = name
        self.mac = bytes([0x52, 0x54, 0, 0, 0, index])
        self.qemu = str(root / f"{name}.q")
        self.peer = str(root / "peers" / f"{name}.p")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.qemu)

    def attach(self, netdir: Path) -> None:
        mac = ":".join(f"{b:02x}" for b in self.mac)
        write_port(netdir, self.name, PortSpec(self.peer, self.qemu, f"vm-{self.name}", mac))

    def send(self, dst: bytes, payload: bytes, src: bytes | None = None) -> bytes:
        frame = dst + (src or self.mac) + b"\x88\xb5" + payload.ljust(46, b".")
        self.sock.sendto(frame, self.peer)
        return frame

    def recv(self, timeout: float = 2.0) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(70000)
        except TimeoutError:
            return None

    def drain(self) -> None:
        while self.recv(0.1) is not None:
            pass


@pytest.fixture
def root():
    # tmp_path can be longer than the 107 bytes a unix socket path may have.
    path = Path(tempfile.mkdtemp(prefix="psw", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_net(root):
    """Make network directories; any switch started in one is stopped at teardown."""
    made = []

    def make(name="net"):
        path = root / name
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in made:
        stop(path)


@pytest.fixture
def make_qemu(root):
    fakes = []

    def make(name, index):
        fakes.append(FakeQemu(root, name, index))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.sock.close()


@pytest.fixture
def lan(make_net, make_qemu):
    """A network directory with three ports attached: a, b, c."""
    net = make_net()
    fakes = [make_qemu(name, i) for i, name in enumerate("abc", start=1)]
    for fake in fakes:
        fake.attach(net)
    return net, *fakes


