"""testinfra's modules against a real pinnace guest, each answer checked against a fact
set up (or known) in the guest: the backend must not just run, it must give testinfra
what it needs to be right."""

from __future__ import annotations

import hashlib
import time

import pytest
import testinfra

import pinnace.testinfra as pt
from pinnace.errors import CommandFailed, NotFoundError, StateError

DEMO_INIT = r"""#!/bin/sh
# A SysV init script as testinfra's SysvService expects: LSB status codes.
PIDFILE=/run/demo.pid
case "$1" in
  start)
    sleep 1000 </dev/null >/dev/null 2>&1 &
    echo $! > "$PIDFILE"
    ;;
  status)
    if [ -f "$PIDFILE" ]; then
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null && exit 0
      exit 1
    fi
    exit 3
    ;;
  stop)
    [ -f "$PIDFILE" ] && kill "$(cat "$PIDFILE")"
    rm -f "$PIDFILE"
    ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
"""


@pytest.fixture
def machine(vm):
    """The plugin's per-test machine, which its vm_host fixture (used here) is a Host on."""
    return vm


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


def test_run_and_check_output(vm_host):
    out = vm_host.run("echo out; echo err >&2; exit 3")
    assert (out.rc, out.stdout, out.stderr) == (3, "out\n", "err\n")
    assert out.failed and out.command == b"echo out; echo err >&2; exit 3"
    assert vm_host.check_output("printf '%s\\n\\n' hi") == "hi"
    # arguments are quoted: no injection
    assert vm_host.check_output("printf %%s %s", "a b;$(id) `id`") == "a b;$(id) `id`"
    # the guest's bytes, as they are
    raw = vm_host.run(r"printf '\377\376\000x'")
    assert raw.stdout_bytes == b"\xff\xfe\x00x"
    big = vm_host.run("seq 1 200000")
    assert big.stdout_bytes == b"".join(b"%d\n" % i for i in range(1, 200001))
    with pytest.raises(AssertionError):
        vm_host.check_output("exit 1")
    assert vm_host.exists("python3") and not vm_host.exists("no-such-program")


def test_file(vm_host, machine):
    text = "hello\nworld é\n"
    machine.exec(["sh", "-c", "mkdir -p /srv/ti && cat > /srv/ti/f.txt && "
                  "chmod 0640 /srv/ti/f.txt && chown nobody:nogroup /srv/ti/f.txt && "
                  "ln -s /srv/ti/f.txt /srv/ti/link"], input=text.encode()).check()
    blob = bytes(range(256)) * 4
    machine.exec(["sh", "-c", "cat > /srv/ti/blob"], input=blob).check()

    f = vm_host.file("/srv/ti/f.txt")
    assert f.exists and f.is_file and not f.is_directory
    assert f.mode == 0o640
    assert (f.user, f.group, f.uid, f.gid) == ("nobody", "nogroup", 65534, 65534)
    assert f.content_string == text
    assert f.sha256sum == hashlib.sha256(text.encode()).hexdigest()
    assert f.md5sum == hashlib.md5(text.encode()).hexdigest()
    assert f.size == len(text.encode())
    assert f.contains("^world")
    d = vm_host.file("/srv/ti")
    assert d.exists and d.is_directory and d.user == "root" and d.mode == 0o755
    assert "f.txt" in d.listdir()
    link = vm_host.file("/srv/ti/link")
    assert link.is_symlink and link.linked_to == "/srv/ti/f.txt"
    b = vm_host.file("/srv/ti/blob")
    assert b.content == blob
    assert b.sha256sum == hashlib.sha256(blob).hexdigest()
    assert not vm_host.file("/srv/ti/missing").exists


def test_package(vm_host):
    py = vm_host.package("python3")
    assert py.is_installed
    assert py.version.startswith("3.11")
    dpkg = vm_host.check_output("dpkg-query -f '${Version}' -W python3")
    assert py.version == dpkg
    assert vm_host.package("sudo").is_installed
    assert not vm_host.package("nginx").is_installed


def test_service_sysv(vm_host):
    assert vm_host.exists("service"), "the image has no service(8)"
    vm_host.check_output(f"cat > /etc/init.d/demo <<'EOF'\n{DEMO_INIT}EOF\n"
                         "chmod 0755 /etc/init.d/demo")
    demo = vm_host.service("demo")
    assert type(demo).__name__ == "SysvService"  # no systemd, upstart or openrc here
    assert not demo.is_running
    vm_host.check_output("/etc/init.d/demo start")
    assert demo.is_running
    pid = int(vm_host.file("/run/demo.pid").content_string)
    procs = vm_host.process.filter(comm="sleep")
    assert pid in [p.pid for p in procs]
    assert vm_host.process.get(pid=pid).args == "sleep 1000"
    vm_host.check_output("/etc/init.d/demo stop")
    wait_for(lambda: not demo.is_running)
    assert pid not in [p.pid for p in vm_host.process.filter(comm="sleep")]
    assert not demo.is_enabled


def test_process(vm_host):
    init = vm_host.process.get(pid=1)
    assert init.comm == vm_host.file("/proc/1/comm").content_string.strip()
    assert init.user == "root"
    assert vm_host.process.filter(comm="sleep") == []


def test_socket(vm_host):
    vm_host.check_output("setsid nohup python3 -m http.server 8123 --bind 0.0.0.0 "
                         "</dev/null >/dev/null 2>&1 &")
    listening = vm_host.socket("tcp://0.0.0.0:8123")
    wait_for(lambda: listening.is_listening)
    # testinfra: without an address, "listening" means on all of IPv4 *and* IPv6
    assert not vm_host.socket("tcp://8123").is_listening
    assert not vm_host.socket("tcp://0.0.0.0:8124").is_listening
    assert not vm_host.socket("udp://0.0.0.0:8123").is_listening
    assert "tcp://0.0.0.0:8123" in vm_host.socket.get_listening_sockets()
    got = vm_host.check_output("python3 -c 'import urllib.request as u; "
                               "print(u.urlopen(\"http://127.0.0.1:8123/\").status)'")
    assert got == "200"


def test_users(vm_host):
    root = vm_host.user("root")
    assert root.exists
    assert (root.uid, root.gid, root.home, root.shell) == (0, 0, "/root", "/bin/bash")
    assert root.group == "root"
    assert vm_host.exists("useradd"), "the image has no useradd"
    vm_host.check_output("useradd -m -u 1234 -s /bin/sh -c 'Test User' alice")
    alice = vm_host.user("alice")
    assert alice.exists
    assert (alice.name, alice.uid, alice.home, alice.shell) == ("alice", 1234, "/home/alice",
                                                                "/bin/sh")
    assert alice.gecos == "Test User"
    assert alice.group == "alice" and "alice" in alice.groups
    assert alice.gid == vm_host.group("alice").gid
    assert vm_host.file("/home/alice").is_directory
    assert vm_host.file("/home/alice").user == "alice"
    assert not vm_host.user("ghost").exists


def test_interface(vm_host):
    lo = vm_host.interface("lo")
    assert lo.exists
    assert "127.0.0.1" in lo.addresses and "::1" in lo.addresses
    assert "lo" in vm_host.interface.names()
    assert not vm_host.interface("nope0").exists
    mac = vm_host.file("/sys/class/net/eth0/address").content_string.strip()
    assert vm_host.interface("eth0").exists
    assert vm_host.check_output("ip -br link show eth0").split()[2] == mac


def test_mount_points(vm_host):
    root = vm_host.mount_point("/")
    assert root.exists and root.filesystem == "ext4"
    assert root.device == "/dev/root"
    proc = vm_host.mount_point("/proc")
    assert proc.exists and proc.filesystem == "proc"
    assert "nosuid" in proc.options
    assert not vm_host.mount_point("/no/such/mount").exists


def test_sysctl(vm_host, machine):
    hostname = vm_host.check_output("hostname")
    assert hostname == machine.name
    assert vm_host.sysctl("kernel.hostname") == hostname
    forward = int(vm_host.file("/proc/sys/net/ipv4/ip_forward").content_string)
    assert vm_host.sysctl("net.ipv4.ip_forward") == forward


def test_sudo(vm_host):
    assert vm_host.check_output("whoami") == "root"
    with vm_host.sudo():
        assert vm_host.check_output("whoami") == "root"
        with vm_host.sudo("nobody"):
            assert vm_host.check_output("whoami") == "nobody"
            assert vm_host.check_output("id -u") == "65534"
        assert vm_host.check_output("whoami") == "root"
    with vm_host.sudo("nobody"):
        assert vm_host.check_output("whoami") == "nobody"
    assert vm_host.check_output("whoami") == "root"


def test_sudo_stderr_is_clean(vm_host):
    """The agent names the machine in /etc/hosts (else sudo warns 'unable to resolve host'
    on every call)."""
    with vm_host.sudo():
        assert vm_host.run("true").stderr == ""
    assert vm_host.file("/etc/hosts").contains(f"^127.0.1.1\t{vm_host.check_output('hostname')}$")


def test_specs_through_get_host(machine, pn, monkeypatch, pinnace_home):
    # testinfra's own path: get_host and its cache; the store from $PINNACE_HOME
    monkeypatch.setenv("PINNACE_HOME", pinnace_home)
    spec = f"pinnace://{machine.name}"
    host = testinfra.get_host(spec)
    assert host is testinfra.get_host(spec)
    assert host.check_output("hostname") == machine.name
    assert host.check_output("whoami") == "root"

    nobody = testinfra.get_host(f"pinnace://nobody@{machine.name}", pinnace=pn)
    assert nobody.check_output("whoami") == "nobody"
    assert nobody.check_output("id -u") == "65534"
    assert nobody.run("cat /etc/shadow").rc != 0
    sudo = testinfra.get_host(f"pinnace://{machine.name}?sudo=true&sudo_user=nobody",
                              pinnace=pn)
    assert sudo.check_output("whoami") == "nobody"

    short = testinfra.get_host(f"pinnace://{machine.name}?timeout=2", pinnace=pn)
    start = time.monotonic()
    with pytest.raises(CommandFailed, match="killed after 2 s"):
        short.run("sleep 30")
    assert time.monotonic() - start < 15
    assert short.check_output("echo still here") == "still here"


def test_user_spec_gets_the_users_groups(machine, pn):
    """A command run as a user gets that user's groups (not root's) and home."""
    nobody = pt.host_for(machine, pinnace=pn, user="nobody")
    assert nobody.check_output("id -g") == "65534"
    assert nobody.check_output("id -G") == "65534"
    assert nobody.check_output("echo $HOME $USER") == "/nonexistent nobody"
    machine.exec("useradd -m -G adm,sudo carol")
    carol = pt.host_for(machine, pinnace=pn, user="carol")
    assert set(carol.check_output("id -Gn").split()) == {"carol", "adm", "sudo"}
    assert carol.check_output("echo $HOME") == "/home/carol"


def test_stopped_and_deleted_machines(make_machine, pn):
    m = make_machine.restored()
    host = pt.host_for(m, pinnace=pn)
    assert host.check_output("true") == ""
    m.stop()
    with pytest.raises(StateError, match=f"it is stopped.*pinnace start {m.name}'"):
        host.run("true")
    m.delete(force=True)
    with pytest.raises(NotFoundError, match=f"no machine named '{m.name}'; see 'pinnace ls'"):
        host.run("true")
    ghost = testinfra.get_host("pinnace://no-such-machine", pinnace=pn)
    with pytest.raises(NotFoundError, match="no machine named 'no-such-machine'"):
        ghost.run("true")
