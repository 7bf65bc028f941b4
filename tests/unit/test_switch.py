"""The network switch: forwarding, learning, port files, and the supervised process.

The "QEMU" ends are unix datagram sockets bound where QEMU would bind its own; no
QEMU and no root. A frame that must not arrive is checked with a marker: a frame
sent after it that must arrive. Datagram queues are FIFO and the switch is one loop,
so if the marker is the next thing a socket receives, the frame before it never came.
"""

import contextlib
import json
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from pinnace.errors import ConfigError
from pinnace.network.switch import (
    MAC_AGE,
    MAX_MACS,
    PortSpec,
    Switch,
    ensure_running,
    notify,
    remove_port,
    running,
    stop,
    write_port,
)
from pinnace.store import NetworkFiles, this_process
from tests.unit.conftest import BROADCAST, UNKNOWN


@contextlib.contextmanager
def in_thread(netdir, **kwargs):
    sw = Switch(netdir, **kwargs)
    thread = threading.Thread(target=sw.run, name="switch")
    thread.start()
    try:
        yield sw
    finally:
        sw.stop()
        thread.join(5)
        sw.close()
    assert not thread.is_alive()


def wait_for(condition, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def is_socket(path):
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def gone(pid):
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return data[data.rindex(b")") + 2:].startswith(b"Z")


# --- forwarding, in this process ---------------------------------------------------------


def test_broadcast_floods_and_learned_unicast_goes_to_one_port(lan):
    net, a, b, c = lan
    with in_thread(net):
        hello = a.send(BROADCAST, b"hello")
        assert b.recv() == hello
        assert c.recv() == hello
        marker = b.send(BROADCAST, b"marker 1")
        assert a.recv() == marker  # a's own broadcast did not come back to it
        assert c.recv() == marker

        reply = b.send(a.mac, b"reply")  # a's MAC was learned from its broadcast
        assert a.recv() == reply
        unicast = a.send(b.mac, b"unicast")  # b's MAC was learned from its reply
        assert b.recv() == unicast
        marker = a.send(BROADCAST, b"marker 2")
        assert c.recv() == marker  # neither the reply nor the unicast reached c
        assert b.recv() == marker


def test_unknown_unicast_and_multicast_flood(lan):
    net, a, b, c = lan
    with in_thread(net):
        for dst in (UNKNOWN, bytes.fromhex("01005e000001")):
            frame = a.send(dst, b"flood")
            assert b.recv() == frame
            assert c.recv() == frame


def test_invalid_frames_are_dropped(lan, root):
    net, a, b, c = lan
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rogue.bind(str(root / "rogue"))
    with contextlib.closing(rogue), in_thread(net) as sw:
        header = BROADCAST + a.mac + b"\x88\xb5"
        a.sock.sendto(header[:13], a.peer)  # shorter than an Ethernet header
        a.sock.sendto(header.ljust(65551, b"."), a.peer)  # longer than any frame QEMU sends
        a.send(BROADCAST, b"multicast source", src=bytes.fromhex("010000000001"))
        a.send(BROADCAST, b"zero source", src=bytes(6))
        rogue.sendto(header.ljust(60, b"."), a.peer)  # not from a's QEMU
        largest = a.send(BROADCAST, b"x" * (65550 - 14))
        assert b.recv() == largest  # the first frame through: everything before was dropped
        assert c.recv() == largest
        assert sw.stats()["ports"]["a"]["rx_dropped"] == 5


def test_frames_for_their_own_port_are_dropped_and_macs_move(lan):
    net, a, b, c = lan
    with in_thread(net):
        for fake in (a, b):
            fake.send(BROADCAST, b"learn me")
        for fake in (a, b, c):
            fake.drain()
        b.send(b.mac, b"to myself")
        marker = c.send(BROADCAST, b"marker 1")
        assert a.recv() == marker
        assert b.recv() == marker  # not "to myself"

        moved = c.send(BROADCAST, b"a moved", src=a.mac)  # a's MAC now lives behind c
        assert a.recv() == moved
        assert b.recv() == moved
        frame = b.send(a.mac, b"for a")
        assert c.recv() == frame
        marker = b.send(BROADCAST, b"marker 2")
        assert a.recv() == marker


def test_learned_macs_age_out(lan):
    net, a, b, c = lan
    now = [1000.0]
    # One poll at a time in this thread: the switch reads the clock once per poll, so
    # a frame must not share a poll with one sent before the clock moved.
    sw = Switch(net, clock=lambda: now[0])
    try:
        learn = b.send(BROADCAST, b"learn b")
        sw.poll(1.0)
        assert a.recv() == learn
        assert c.recv() == learn
        frame = a.send(b.mac, b"known")
        marker = a.send(BROADCAST, b"marker")
        sw.poll(1.0)
        assert b.recv() == frame
        assert c.recv() == marker  # "known" went to b only

        now[0] += MAC_AGE + 1
        frame = a.send(b.mac, b"forgotten")
        sw.poll(1.0)
        assert c.recv() == frame  # flooded: b's MAC is no longer known
    finally:
        sw.close()


def test_mac_table_is_capped_oldest_out(lan):
    net, a, b, c = lan
    macs = [bytes.fromhex("0200") + n.to_bytes(4, "big") for n in range(MAX_MACS + 1)]
    with in_thread(net) as sw:
        for mac in macs:
            b.send(BROADCAST, b"many", src=mac)
        a.drain()  # most of these broadcasts were dropped: a's and c's queues overflowed
        c.drain()
        frame = a.send(macs[0], b"to the oldest")  # evicted: flooded
        assert c.recv() == frame
        assert b.recv() == frame
        frame = a.send(macs[-1], b"to the newest")  # still known: to b only
        assert b.recv() == frame
        marker = a.send(BROADCAST, b"marker")
        assert c.recv() == marker
        assert sw.stats()["macs"] == MAX_MACS


# --- port files ----------------------------------------------------------------------------


def test_port_files_come_and_go(lan, make_qemu):
    net, a, b, c = lan
    with in_thread(net) as sw:
        assert is_socket(c.peer)
        learn = c.send(BROADCAST, b"learn c")
        assert a.recv() == learn
        b.drain()

        remove_port(net, "c")
        sw.request_rescan()
        wait_for(lambda: not os.path.lexists(c.peer))
        frame = a.send(c.mac, b"for c")
        assert b.recv() == frame  # c's MAC was forgotten with its port: flooded
        assert c.recv(0.2) is None

        d = make_qemu("d", 4)
        d.attach(net)  # no signal: the switch sees the directory change by itself
        wait_for(lambda: is_socket(d.peer))
        frame = a.send(BROADCAST, b"hello d")
        assert d.recv() == frame


def test_bad_port_files_are_skipped_and_reported_once(lan, root, caplog):
    net, a, b, c = lan
    ports = NetworkFiles(net).ports_dir
    (ports / "bad.json").write_text("{not json")
    (ports / "bad name.json").write_text("{}")
    (ports / ".e.json.123").write_text("being written")
    long_peer = "/tmp/" + "x" * 110
    (ports / "long.json").write_text(json.dumps({"peer": long_peer, "qemu": c.qemu}))
    with pytest.raises(ConfigError):
        write_port(net, "long", PortSpec(long_peer, c.qemu))
    target = root / "target"
    target.write_text("keep me")
    link = root / "peers" / "link.p"
    link.parent.mkdir()
    link.symlink_to(target)
    (ports / "link.json").write_text(json.dumps({"peer": str(link), "qemu": c.qemu}))
    (ports / "same.json").write_text(json.dumps({"peer": a.peer, "qemu": c.qemu}))

    sw = Switch(net)
    try:
        sw.rescan()
        sw.rescan()
        assert set(sw.rejected) == {"bad.json", "bad name.json", "long.json", "link.json",
                                    "same.json"}
        assert "not a socket" in sw.rejected["link.json"]
        warned = [r.getMessage() for r in caplog.records if "bad.json" in r.getMessage()]
        assert len(warned) == 1
        assert link.is_symlink() and target.read_text() == "keep me"
        frame = a.send(BROADCAST, b"still works")
        sw.poll(1.0)
        assert b.recv() == frame
        assert c.recv() == frame
    finally:
        sw.close()
    assert not os.path.lexists(a.peer)  # close() unbinds what it bound
    assert link.is_symlink()  # and nothing else


# --- the supervised process ------------------------------------------------------------------


def test_supervised_switch_survives_sigkill_and_stops_clean(lan):
    net, a, b, c = lan
    sup = ensure_running(net)
    status = running(net)
    assert status["supervisor_pid"] == sup and status["supervisor_alive"]
    assert status["switch_alive"] and status["switch_pid"] != sup
    frame = a.send(BROADCAST, b"before")
    assert b.recv() == frame
    assert c.recv() == frame

    old = status["switch_pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: gone(old))
    assert ensure_running(net) == sup  # the same supervisor, a new switch on the same paths
    new = running(net)["switch_pid"]
    assert new != old and running(net)["switch_alive"]
    assert "killed by SIGKILL" in NetworkFiles(net).log.read_text()
    frame = a.send(BROADCAST, b"after")  # nothing changed on the QEMU side
    assert b.recv() == frame
    assert c.recv() == frame

    os.kill(new, signal.SIGUSR1)
    wait_for(lambda: NetworkFiles(net).stats.exists())
    counters = json.loads(NetworkFiles(net).stats.read_text())["ports"]
    assert counters["a"]["rx"] == 1 and counters["b"]["tx"] == counters["c"]["tx"] == 1

    assert stop(net) is True
    assert gone(sup) and gone(new)
    assert not any(os.path.lexists(q.peer) for q in (a, b, c))
    assert running(net) == {"supervisor_pid": None, "supervisor_alive": False,
                            "switch_pid": None, "switch_alive": False}
    assert stop(net) is True  # nothing left to stop


def test_notify_applies_port_changes_before_returning(lan, make_qemu):
    net, a, *_ = lan
    assert notify(net) is False  # no switch yet
    # An old, unchanged mtime on ports/ hides changes from the switch's own polling,
    # so only notify's SIGHUP can make it see port d.
    ports = NetworkFiles(net).ports_dir
    old = time.time() - 3600
    os.utime(ports, (old, old))
    ensure_running(net)
    d = make_qemu("d", 4)
    d.attach(net)
    os.utime(ports, (old, old))
    assert notify(net) is True
    assert is_socket(d.peer)
    frame = a.send(BROADCAST, b"hello d")
    assert d.recv() == frame
    remove_port(net, "d")
    assert notify(net) is True
    assert not os.path.lexists(d.peer)


def test_concurrent_ensure_running_starts_one_supervisor(lan):
    net = lan[0]
    pids = []
    threads = [threading.Thread(target=lambda: pids.append(ensure_running(net)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pids) == 3 and len(set(pids)) == 1


def test_networks_never_exchange_frames(make_net, make_qemu):
    net1, net2 = make_net("n1"), make_net("n2")
    a1, b1 = make_qemu("a1", 1), make_qemu("b1", 2)
    a2, b2 = make_qemu("a2", 1), make_qemu("b2", 2)  # the same MACs on purpose
    for fake, net in ((a1, net1), (b1, net1), (a2, net2), (b2, net2)):
        fake.attach(net)
    ensure_running(net1)
    ensure_running(net2)
    frame = a1.send(BROADCAST, b"net 1")
    assert b1.recv() == frame
    frame = a2.send(BROADCAST, b"net 2")
    assert b2.recv() == frame
    frame = a1.send(b2.mac, b"unicast to a MAC that lives on net 2")
    assert b1.recv() == frame  # unknown on net 1: flooded there
    assert a2.recv(0.2) is None
    assert b2.recv(0.2) is None
    assert a1.recv(0.05) is None


def test_a_qemu_end_bound_relative_to_its_folder_survives_the_folder_renamed(
        lan, root, monkeypatch):
    """pinnace's QEMU works in its machine's folder and binds its end there relative to
    it: frames carry that name ("n0.sock"), which the port file gives as ``sender``.
    When the folder is renamed, the port is written again with the new paths and the
    same socket goes on working, both ways."""
    net, a, b, c = lan
    folder = root / "vm"
    folder.mkdir()
    monkeypatch.chdir(folder)
    mac = bytes.fromhex("525400000009")
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    qemu.bind("n0.sock")
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rogue.bind(str(root / "rogue"))

    def attach(where, port_id):
        write_port(net, port_id, PortSpec(str(where / "n0.peer"), str(where / "n0.sock"), "vm",
                                          "52:54:00:00:00:09", sender="n0.sock"))

    def frame(payload):
        return BROADCAST + mac + b"\x88\xb5" + payload.ljust(46, b".")

    attach(folder, "vm.n0")
    with contextlib.closing(qemu), contextlib.closing(rogue), in_thread(net) as sw:
        sent = frame(b"from the relative end")
        qemu.sendto(sent, "n0.peer")
        assert a.recv() == sent
        rogue.sendto(frame(b"rogue"), str(folder / "n0.peer"))  # not its QEMU: dropped
        back = a.send(BROADCAST, b"to the relative end")
        qemu.settimeout(2)
        assert qemu.recv(70000) == back
        assert b.recv() == sent and c.recv() == sent  # (the rogue frame came nowhere)
        assert b.recv() == back and c.recv() == back
        assert sw.stats()["ports"]["vm.n0"]["rx_dropped"] == 1

        moved = root / "vm2"
        remove_port(net, "vm.n0")  # as a rename does: unplugged, moved, plugged again
        sw.request_rescan()
        wait_for(lambda: "vm.n0" not in sw.stats()["ports"])
        os.rename(folder, moved)  # this process's working directory moves with it
        attach(moved, "vm2.n0")
        sw.request_rescan()
        wait_for(lambda: "vm2.n0" in sw.stats()["ports"])
        assert not folder.exists()
        sent = frame(b"after the rename")
        qemu.sendto(sent, "n0.peer")
        assert a.recv() == sent
        back = a.send(BROADCAST, b"back after the rename")
        assert qemu.recv(70000) == back


def test_the_supervisor_imports_the_same_pinnace_from_its_own_working_directory(
        tmp_path, monkeypatch):
    """It runs in /: a relative PYTHONPATH (PYTHONPATH=src in a checkout) is made absolute
    against the caller's, or it would import whichever pinnace is installed."""
    from pinnace.store import detached_env as _supervisor_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["src", "/abs/lib", ""]))
    assert _supervisor_env()["PYTHONPATH"] == os.pathsep.join(
        [str(tmp_path / "src"), "/abs/lib", ""])
    monkeypatch.delenv("PYTHONPATH")
    assert "PYTHONPATH" not in _supervisor_env()


def test_frames_wait_for_a_full_qemu_queue_instead_of_being_dropped(lan):
    """A QEMU's socket queue holds net.unix.max_dgram_qlen frames (10 by default): a
    burst beyond it waits in the port's backlog, in order, and nothing is lost."""
    net, a, b, c = lan
    sw = Switch(net)
    try:
        learn = b.send(BROADCAST, b"learn b")
        sw.poll(0.5)
        assert a.recv() == learn and c.recv() == learn
        burst = []
        for i in range(60):  # b reads nothing meanwhile: its queue fills after 10
            burst.append(a.send(b.mac, f"frame {i}".encode()))
            if i % 5 == 4:
                sw.poll(0.05)  # (the switch's own queue is a socket's too)
        deadline = time.monotonic() + 5
        got = []
        while len(got) < 60 and time.monotonic() < deadline:
            sw.poll(0.05)
            frame = b.recv(0.01)
            if frame is not None:
                got.append(frame)
        assert got == burst
        stats = sw.stats()["ports"]["b"]
        assert stats["tx_dropped"] == 0 and stats["waited"] > 0 and stats["backlog"] == 0
    finally:
        sw.close()


def test_a_restarted_qemu_is_heard_and_reached(lan, root):
    """QEMU binds a new socket at the same path when its machine starts again: the
    switch takes its frames and reaches it, without a rescan."""
    net, a, b, c = lan
    sw = Switch(net)
    try:
        first = b.send(BROADCAST, b"before")
        sw.poll(0.5)
        assert a.recv() == first and c.recv() == first
        reply = a.send(b.mac, b"to the old b")
        sw.poll(0.5)
        assert b.recv() == reply
        b.sock.close()  # QEMU stops; a new one binds the same path
        os.unlink(b.qemu)
        b.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        b.sock.bind(b.qemu)
        again = b.send(BROADCAST, b"after")
        sw.poll(0.5)
        assert a.recv() == again
        for _ in range(3):  # the first send may find the old socket gone: it reconnects
            to_b = a.send(b.mac, b"to the new b")
            sw.poll(0.2)
            got = b.recv(0.2)
            if got is not None:
                break
        assert got == to_b
    finally:
        sw.close()


@pytest.mark.parametrize("meta", [
    '{"links": {"a": null}}', '{"impair": {"ge": 5}}', '[' * 100000 + ']' * 100000,
    '{"partition": {"groups": "a,b"}}', '{"impair": {"loss": "all"}}', '"x"',
])
def test_a_hostile_network_json_does_not_stop_the_switch(lan, meta, caplog):
    net, a, b, _c = lan
    (net / "network.json").write_text(meta)
    sw = Switch(net)
    try:
        frame = a.send(BROADCAST, b"still forwarding")
        sw.poll(0.5)
        assert b.recv() == frame
        assert "impairments unchanged" in caplog.text
    finally:
        sw.close()


def test_a_capture_into_a_fifo_is_refused_and_the_switch_runs_on(lan, root, caplog):
    net, a, b, _c = lan
    fifo = root / "fifo"
    os.mkfifo(fifo)
    (net / "captures").mkdir()
    (net / "captures" / "c1.json").write_text(json.dumps(
        {"path": str(fifo), "owner": this_process()}))
    sw = Switch(net)
    try:
        frame = a.send(BROADCAST, b"x")
        sw.poll(0.5)
        assert b.recv() == frame
        assert f"capture c1: cannot write {fifo}" in caplog.text
    finally:
        sw.close()


def test_a_switch_whose_network_folder_is_removed_stops_and_does_not_make_it_again(make_net):
    """rm -rf of a network's folder (a store thrown away, a checkout cloned again into the
    same path) ends its switch and supervisor; neither makes the folder anew."""
    import shutil
    import time

    from pinnace.network.switch import ensure_running, running

    net = make_net("gone")
    ensure_running(net)
    before = running(net)
    assert before["switch_alive"] and before["supervisor_alive"]
    pids = [before["switch_pid"], before["supervisor_pid"]]
    shutil.rmtree(net)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    assert not net.exists()


def _alive(pid):
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
