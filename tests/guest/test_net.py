"""Volumes, shared folders, port forwards and virtual networks, on real guests.

Every guest here runs with --net restricted or none (tests/conftest.py sets the
default), so no packet leaves the host: traffic goes to loopback and between
pinnace's own guests on pinnace's own switches.
"""

import asyncio
import json
import os
import socket
import time

import pytest

from pinnace.errors import ConfigError, MachineError, PinnaceError


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(pn, coro):
    return pn._loop.run(coro)


def test_default_net_in_tests_is_restricted(make_machine):
    m = make_machine()
    assert m.config.net == "restricted"


def test_machines_on_one_network_talk_and_other_networks_cannot(network, make_machine):
    lan, other = network("10.77.50.0/24"), network("10.77.60.0/24")
    a = make_machine(networks=[lan])
    b = make_machine(networks=[f"{lan}:10.77.50.9"])
    c = make_machine(networks=[other])
    for m in (a, b, c):
        m.start()
    assert a.config.net == "none" and a.config.nics[0].ip == "10.77.50.2/24"
    assert b.config.nics[0].ip == "10.77.50.9/24"
    a.exec(["ping", "-c", "2", "-W", "5", "10.77.50.9"]).check()
    server = b.start_process(["python3", "-c",
                              "import socket; s=socket.create_server(('0.0.0.0', 7000)); "
                              "c,_=s.accept(); c.sendall(c.recv(100).upper())"])
    got = a.exec(["python3", "-c",
                  "import socket, time\n"
                  "for _ in range(50):\n"
                  "    try: c = socket.create_connection(('10.77.50.9', 7000), 2); break\n"
                  "    except OSError: time.sleep(0.1)\n"
                  "c.sendall(b'hello'); print(c.recv(100).decode())"]).check()
    assert got.stdout_text.strip() == "HELLO"
    assert server.wait().exit_code == 0
    # c is on another network: b's address does not exist there
    r = c.exec(["ping", "-c", "1", "-W", "2", "10.77.50.9"])
    assert r.exit_code != 0
    # and a frame for b never reaches c's segment even when c takes an address in lan's subnet
    c.set_network("eth0", ["10.77.50.77/24"])
    assert c.exec(["ping", "-c", "2", "-W", "2", "10.77.50.9"]).exit_code != 0


def test_switch_restarts_and_traffic_resumes(pn, network, make_machine):
    from pinnace.network import switch

    lan = network("10.77.51.0/24")
    a, b = make_machine(networks=[lan]), make_machine(networks=[lan])
    a.start()
    b.start()
    a.exec(["ping", "-c", "1", "-W", "5", b.config.nics[0].ip.split("/")[0]]).check()
    path = pn.aio.networks.get(lan).path
    before = switch.running(path)["switch_pid"]
    os.kill(before, 9)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = switch.running(path)
        if st["switch_alive"] and st["switch_pid"] != before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the supervisor did not restart the switch")
    a.exec(["ping", "-c", "2", "-W", "5", b.config.nics[0].ip.split("/")[0]]).check()


def test_hot_attach_and_detach(network, make_machine):
    lan = network("10.77.52.0/24")
    a = make_machine(networks=[lan])
    c = make_machine(spare_nics=1, net="none")
    a.start()
    c.start()
    with pytest.raises(ConfigError):
        c.connect(lan, "10.77.52.2")  # a has it
    addr = c.connect(lan)
    c.exec(["ping", "-c", "2", "-W", "5", "10.77.52.2"]).check()
    c.disconnect(lan)
    assert c.exec(["ping", "-c", "1", "-W", "2", "10.77.52.2"]).exit_code != 0
    assert addr.startswith("10.77.52.")


def test_port_forward_answers_from_the_host(make_machine):
    port = _free_port()
    m = make_machine(ports=[f"{port}:8000"])
    m.start()
    m.start_process(["python3", "-c", "import socket; s=socket.create_server(('0.0.0.0', 8000)); "
                     "c,_=s.accept(); c.sendall(b'pong'); c.close()"])
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 2) as s:
                data = s.recv(10)
                if data == b"pong":
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the forward never answered"
        time.sleep(0.2)
    # a second machine asking for the same host port is refused, naming the problem
    other = make_machine(ports=[f"{port}:80"])
    with pytest.raises(ConfigError) as exc:
        other.start()
    assert str(port) in str(exc.value) and "in use" in str(exc.value)


def test_volume_keeps_data_moves_and_ro_refuses_writes(pn, volume, make_machine):
    vol = volume()
    a = make_machine(volumes=[f"{vol}:/data"])
    a.start()
    a.exec("echo kept > /data/f && sync").check()
    a.stop()
    a.start()
    assert a.exec(["cat", "/data/f"]).check().stdout == b"kept\n"
    with pytest.raises(PinnaceError) as exc:
        pn.volumes.remove(vol)
    assert a.name in str(exc.value)
    a.stop()
    b = make_machine(volumes=[f"{vol}:/mnt/v:ro"])
    b.start()
    assert b.exec(["cat", "/mnt/v/f"]).check().stdout == b"kept\n"
    r = b.exec("echo x > /mnt/v/g")
    assert r.exit_code != 0 and "Read-only" in r.stderr_text


def test_share_both_ways_and_ro(make_machine, tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "from-host").write_text("host\n")
    m = make_machine(shares=[f"{d}:/mnt/share"])
    ro = make_machine(shares=[f"{d}:/mnt/ro:ro"])
    m.start()
    ro.start()
    assert m.exec(["cat", "/mnt/share/from-host"]).check().stdout == b"host\n"
    m.exec("echo guest > /mnt/share/from-guest").check()
    assert (d / "from-guest").read_text() == "guest\n"
    (d / "later").write_text("later\n")
    assert ro.exec(["cat", "/mnt/ro/later"]).check().stdout == b"later\n"
    r = ro.exec("echo x > /mnt/ro/nope")
    assert r.exit_code != 0 and "Read-only" in r.stderr_text
    assert not (d / "nope").exists()


def _restored(m):
    """Assert that ``m`` was restored from a snapshot, not booted."""
    assert json.loads((m.path / "state.json").read_text()).get("restored") is True
    assert "Linux version" not in m.serial_tail(400)  # no kernel started in this QEMU


def _disk(m, index=0):
    """The guest's name for volume ``index``'s disk, its size in bytes, and its ro flag."""
    r = m.exec(f"for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = pinnace-vol{index} ] "
               "&& echo ${d##*/} $(blockdev --getsize64 /dev/${d##*/}) $(cat $d/ro); done; true")
    name, size, ro = r.check().stdout_text.split()
    return name, int(size), ro == "1"


def test_a_restored_clones_volume_keeps_its_data(pn, volume, make_machine):
    """run() restores a machine with a volume (the ready snapshot has an empty slot for
    it); what it writes is on the volume for the next machine, restored too."""
    vol = volume("96M")
    a = make_machine.restored(volumes=[f"{vol}:/data"])
    _restored(a)
    assert _disk(a)[1:] == (pn.volumes.get(vol).size, False)
    a.exec("echo kept > /data/f && sync").check()
    a.stop(save=True)  # its own saved state resumes with the volume still mounted
    a.start()
    assert a.exec(["cat", "/data/f"]).check().stdout == b"kept\n"
    a.delete(force=True)
    b = make_machine.restored(volumes=[f"{vol}:/mnt/v"])
    _restored(b)
    assert b.exec(["cat", "/mnt/v/f"]).check().stdout == b"kept\n"
    assert b.exec(["findmnt", "-n", "-o", "SOURCE", "/mnt/v"]).check().stdout_text.strip() \
        == f"/dev/{_disk(b)[0]}"


def test_a_killed_machine_leaves_its_volume_written_and_clean(pn, volume, make_machine):
    """delete --force (what 'run --rm' does) unmounts writable volumes before the kill:
    what the guest wrote, unsynced, is on the volume, and its journal needs no recovery."""
    import subprocess

    vol = volume("64M")
    m = make_machine.restored(volumes=[f"{vol}:/data"])
    m.exec("echo unsynced > /data/f").check()
    m.delete(force=True)
    image = str(pn.volumes.get(vol).image)
    header = subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True).stdout
    assert "needs_recovery" not in header, header
    out = subprocess.run(["debugfs", "-R", "cat /f", image], capture_output=True, text=True)
    assert out.stdout == "unsynced\n", out.stderr


def test_a_restored_clones_shares_both_ways_and_ro(make_machine, tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "from-host").write_text("host\n")
    m = make_machine.restored(shares=[f"{d}:/mnt/share"])
    ro = make_machine.restored(shares=[f"{d}:/mnt/ro:ro"])
    for x in (m, ro):
        _restored(x)
    assert m.exec(["cat", "/mnt/share/from-host"]).check().stdout == b"host\n"
    m.exec("echo guest > /mnt/share/from-guest").check()
    assert (d / "from-guest").read_text() == "guest\n"
    assert ro.exec(["cat", "/mnt/ro/from-guest"]).check().stdout == b"guest\n"
    r = ro.exec("echo x > /mnt/ro/nope")
    assert r.exit_code != 0 and "Read-only" in r.stderr_text
    assert not (d / "nope").exists()


def test_clones_restored_at_once_see_their_own_volumes(pn, volume, make_machine):
    """Two clones of one ready snapshot restored together, each with another volume:
    each guest sees its own disk, at its real size (the template's slot was empty)."""
    vols = [volume("64M"), volume("112M")]
    names = [f"{v}-m" for v in vols]

    async def both():
        return await asyncio.gather(*(pn.aio.machines.run(name=n, volumes=[f"{v}:/data"])
                                      for n, v in zip(names, vols, strict=True)))

    pn._loop.run(both())
    ms = [make_machine.track(pn.machines.get(n)) for n in names]
    for m, v in zip(ms, vols, strict=True):
        _restored(m)
        name, size, ro = _disk(m)
        assert (size, ro) == (pn.volumes.get(v).size, False)
        label = m.exec(["python3", "-c", f"f = open('/dev/{name}', 'rb'); f.seek(1144); "
                        "print(f.read(16).rstrip(b'\\0').decode())"]).check().stdout_text
        assert label.strip() == pn.volumes.get(v).label
        m.exec(f"echo {m.name} > /data/who").check()
    for m in ms:
        assert m.exec(["cat", "/data/who"]).check().stdout_text.strip() == m.name


def test_a_read_only_volume_is_read_only_in_a_restored_clone(pn, volume, make_machine):
    vol = volume()
    w = make_machine.restored(volumes=[f"{vol}:/data"])
    w.exec("echo kept > /data/f && sync").check()
    w.stop()
    m = make_machine.restored(volumes=[f"{vol}:/data:ro"])
    _restored(m)
    assert _disk(m)[1:] == (pn.volumes.get(vol).size, True)  # the guest's disk is read-only
    assert m.exec(["cat", "/data/f"]).check().stdout == b"kept\n"
    r = m.exec("echo x > /data/g")
    assert r.exit_code != 0 and "Read-only" in r.stderr_text
    name = _disk(m)[0]
    r = m.exec(["dd", "if=/dev/zero", f"of=/dev/{name}", "bs=4096", "count=1", "oflag=direct"])
    assert r.exit_code != 0  # nor can the disk itself be written


def test_bad_device_options_are_clear(make_machine, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_machine(shares=[f"{tmp_path}/missing:/x"])
    with pytest.raises(PinnaceError, match="volume"):
        make_machine(volumes=["no-such-volume:/data"])
    with pytest.raises(ConfigError, match="guest's system"):
        make_machine(shares=[f"{tmp_path}:/etc"])
    with pytest.raises(ConfigError, match="NAT NIC"):
        make_machine(net="none", ports=["8080:80"])


def test_clones_on_a_network_get_their_own_mac_and_address(pn, network):
    lan = network("10.77.53.0/24")
    ms = pn.machines.run(count=2, networks=[lan])
    try:
        for m in ms:
            link = m.exec(["ip", "-br", "link"]).check().stdout_text
            assert m.config.nics[0].mac in link
            assert m.config.nat_mac in link  # the NAT NIC got its own MAC too
        ip_b = ms[1].config.nics[0].ip.split("/")[0]
        r = ms[0].exec(["ping", "-c", "2", "-W", "5", ip_b])
        assert r.exit_code == 0, r.stderr_text
    finally:
        for m in ms:
            m.delete(force=True)


def test_attached_machine_error_is_clear(volume, make_machine):
    vol = volume()
    a = make_machine(volumes=[f"{vol}:/data"])
    b = make_machine(volumes=[f"{vol}:/data"])
    a.start()
    with pytest.raises((ConfigError, MachineError)) as exc:
        b.start()
    assert a.name in str(exc.value)
