"""NAT routers with real guests: each preset classified from behind it by an RFC 5780
probe against the internet's STUN server; UDP hole punching between two machines
behind NATs, which works or fails as each pair of presets should; ping, TCP and DNS
across a NAT, and a capture of both sides of a router."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import pinnace.network.natprobe as natprobe_module
from pinnace.network.nat import parse
from pinnace.network.switch import read_pcap

PROBE = Path(natprobe_module.__file__)
STUN = "203.0.113.1"
HOME = "192.168.1.0/24"  # every home the same subnet, as homes are


def behind(pn, network, make_machine, preset, **options):
    """A machine on a new network behind a ``preset`` NAT, with the probe in it."""
    net = network(HOME, nat=preset, **options)
    m = make_machine.restored(networks=[net])
    m.files.put(PROBE, "/tmp/natprobe.py")
    return net, m


def probe(m, *args, timeout=120):
    r = m.exec(["python3", "/tmp/natprobe.py", *args], timeout=timeout)
    assert r.stdout_text.strip(), f"natprobe {shlex.join(args)}: {r.stderr_text}"
    return json.loads(r.stdout_text)


EXPECTED = {  # preset: (mapping, filtering, preserves the port, hairpins)
    "fullcone": ("eim", "eif", True, True),
    "restricted": ("eim", "adf", True, True),
    "easy": ("eim", "apdf", True, True),
    "hard": ("apdm", "apdf", False, False),
    "one2one": ("eim", "eif", True, True),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_a_probe_behind_each_preset_classifies_it(pn, network, make_machine, preset):
    """RFC 5780's behaviour discovery, from inside, finds what the preset says. (A NAT
    that hairpins still maps and filters the hairpinned packet: behind an address-
    and-port-dependent mapping, the probe's way back goes through another mapping, and
    its filter drops it, as in real NATs.)"""
    net, m = behind(pn, network, make_machine, preset)
    got = probe(m, "classify", STUN)
    mapping, filtering, preserves, hairpin = EXPECTED[preset]
    wan = pn.networks.get(net).router.wan_ip
    assert got["error"] is None, got
    assert got["nat"] is True and got["mapped"].split(":")[0] == wan, got
    assert (got["mapping"], got["filtering"]) == (mapping, filtering), got
    assert got["preserves_port"] is preserves, got
    assert got["hairpin"] is hairpin, got


def test_the_fields_of_a_preset_can_be_overridden(pn, network, make_machine):
    """fullcone with address-dependent mapping and no hairpinning: the probe sees both."""
    _, m = behind(pn, network, make_machine, "fullcone",
                  nat_options={"mapping": "adm", "hairpin": False})
    got = pn.networks.netcheck(m)  # (the API's own run of the probe)
    assert (got.mapping, got.filtering, got.hairpin) == ("adm", "eif", False), got


def test_no_nat_is_seen_as_none(pn, network, make_machine):
    """A machine on the internet itself: no NAT between it and the STUN server."""
    m = make_machine.restored(networks=["internet"])
    m.files.put(PROBE, "/tmp/natprobe.py")
    got = probe(m, "classify", STUN)
    assert got["nat"] is False and got["filtering"] == "eif", got


PUNCH = [  # (one side, the other, does the hole punch work?)
    ("easy", "easy", True),
    ("easy", "fullcone", True),
    ("one2one", "hard", True),
    ("easy", "hard", False),
    ("hard", "hard", False),
]


@pytest.mark.parametrize(("left", "right", "works"), PUNCH, ids=[f"{a}-{b}" for a, b, _ in PUNCH])
def test_udp_hole_punching_between_two_nats(pn, network, make_machine, left, right, works):
    """Each side learns its public address from STUN (from the port it will punch
    from), is told the other's, and both send to each other at once: across
    endpoint-independent mappings this opens a path; against an address-and-port-
    dependent mapping with an address-and-port-dependent filter on the other side, it
    cannot (neither side hears the other)."""
    (net_a, a), (_, b) = (behind(pn, network, make_machine, preset) for preset in (left, right))
    result = pn.networks.punch(a, b)
    assert (result.a_heard, result.b_heard) == (works, works), result.describe()
    assert result.a_public.split(":")[0] == pn.networks.get(net_a).router.wan_ip


def test_ping_tcp_and_dns_across_a_nat_and_both_sides_captured(pn, network, make_machine,
                                                                tmp_path):
    net, inside = behind(pn, network, make_machine, "easy")
    server = make_machine.restored(networks=["internet"])
    wan = pn.networks.get(net).router.wan_ip
    server_ip = server.address("internet")
    # DNS: the internet's server knows the names of machines with public addresses.
    r = inside.exec(["getent", "hosts", server.name])
    assert r.exit_code == 0 and r.stdout_text.split()[0] == server_ip, r.stdout_text
    # ping through the NAT (ICMP echo translated), and to the router itself.
    for target in (server_ip, wan, "192.168.1.1"):
        r = inside.exec(["ping", "-c", "2", "-W", "5", target])
        assert r.exit_code == 0, (target, r.stdout_text)
    # TCP through the NAT; the server sees the router's address.
    server.exec(["sh", "-c", "cd /tmp && nohup python3 -c 'import http.server as h, socket\n"
                 "class H(h.BaseHTTPRequestHandler):\n"
                 " def do_GET(s):\n"
                 "  b = s.client_address[0].encode(); s.send_response(200)\n"
                 "  s.send_header(\"Content-Length\", str(len(b))); s.end_headers();"
                 " s.wfile.write(b)\n"
                 "h.HTTPServer((\"\", 8080), H).serve_forever()' >/dev/null 2>&1 &"])
    inside_pcap, outside_pcap = tmp_path / "in.pcap", tmp_path / "out.pcap"
    with pn.networks.capture(net, inside_pcap), \
            pn.networks.capture(net, outside_pcap, side="wan"):
        r = inside.exec(["python3", "-c", "import time, urllib.request as u\n"
                         "for _ in range(50):\n"
                         " try: print(u.urlopen('http://%s:8080/' % __import__('sys').argv[1],"
                         " timeout=5).read().decode()); break\n"
                         " except OSError: time.sleep(0.2)\n", server.name], timeout=120)
    assert r.stdout_text.strip() == wan, r.stderr_text
    inside_ip = inside.address(net)

    def tcp_sources(path):
        out = set()
        for _, frame in read_pcap(path.read_bytes()):
            f = parse(frame[14:]) if frame[12:14] == b"\x08\x00" else None
            if f is not None and f.proto == 6 and f.dport == 8080:
                out.add(str(ipaddress.IPv4Address(f.src)))
        return out

    assert tcp_sources(inside_pcap) == {inside_ip}
    assert tcp_sources(outside_pcap) == {wan}


EXAMPLE_NAMES = (["alice", "bob", "carol", "web"], ["home", "office", "cafe"])


def test_the_docs_nat_example_runs_as_written(pn, pinnace_home, tmp_path):
    """The NAT-traversal example of docs/networks.md, run line by line with bash -e
    (after removing what a killed run of it left), says what its comments say."""
    docs = (Path(__file__).parents[2] / "docs" / "networks.md").read_text()
    script = re.search(r"<!-- example: nat -->\n```sh\n(.*?)```", docs, flags=re.S)
    assert script, "docs/networks.md has its NAT example"
    machines, nets = EXAMPLE_NAMES
    for name in machines:
        if name in {m.name for m in pn.machines.list()}:
            pn.machines.get(name).delete(force=True)
    for name in nets:
        if name in {n.name for n in pn.networks.list()}:
            pn.networks.remove(name)
    env = {**os.environ, "PINNACE_HOME": str(pinnace_home),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-e", "-c", script.group(1)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "mapping:        address-and-port-dependent" in out, out
    assert "filtering:      address-and-port-dependent" in out, out
    assert re.search(r"alice .*<-> carol .*: a direct UDP path opened, both ways", out), out
    assert re.search(r"alice .*<-> bob .*: no direct path", out), out
    assert "192.168.1.2 > 203.0.113.80: ICMP echo request" in out, out
    assert "203.0.113.10 > 203.0.113.80: ICMP echo request" in out, out
    assert not {m.name for m in pn.machines.list()} & set(machines)


def test_connect_and_disconnect_move_the_default_route(pn, network, make_machine):
    """A running machine plugged into a NAT'd network gets its default route and name
    server, as a boot would give them; unplugged, the route goes with the NIC."""
    net = network(HOME, nat="easy")
    m = make_machine.restored(spare_nics=1)
    assert "default via 192.168.1.1" not in m.exec(["ip", "route"]).stdout_text
    m.connect(net)
    assert "default via 192.168.1.1" in m.exec(["ip", "route"]).stdout_text
    assert m.exec(["cat", "/etc/resolv.conf"]).stdout_text.strip() == f"nameserver {STUN}"
    assert m.exec(["ping", "-c", "1", "-W", "5", STUN]).exit_code == 0
    m.disconnect(net)
    assert "192.168.1.1" not in m.exec(["ip", "route"]).stdout_text
