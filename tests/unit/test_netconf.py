"""The agent's interface configuration (ioctls and rtnetlink), against the host's real
kernel inside a throwaway network namespace with a veth pair, checked with ``ip``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "src" / "pinnace" / "agent"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
    reason="needs root, unshare and ip for a private network namespace")


def in_netns(script: str) -> dict:
    """Run ``script`` (which has ``netconf`` and ``ip()`` at hand) in a new network
    namespace holding a veth interface d0 (its peer d1); return what it prints as JSON."""
    prelude = textwrap.dedent(f"""
        import json, subprocess, sys, ipaddress
        sys.path.insert(0, {str(AGENT)!r})
        import netconf
        def ip(*args):
            return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout

        ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    """)
    run = subprocess.run(["unshare", "--net", sys.executable, "-c", prelude + textwrap.dedent(script)],
                         capture_output=True, text=True, timeout=30)
    if run.returncode != 0 and "Operation not permitted" in run.stderr:
        pytest.skip("no permission to make a network namespace here")
    if run.returncode != 0 and "'link', 'add'" in run.stderr:
        pytest.skip("this kernel cannot make a veth pair")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_addresses_mac_mtu_link_and_route():
    out = in_netns("""
        netconf.set_mac("d0", "02:11:22:33:44:55")
        want = [ipaddress.ip_interface("10.77.0.5/24"), ipaddress.ip_interface("fd00::5/64")]
        now = netconf.set_addresses("d0", want)
        netconf.set_mtu("d0", 1400)
        netconf.set_up("d0")
        netconf.set_default_route("d0", ipaddress.ip_address("10.77.0.1"))
        netconf.set_default_route("d0", ipaddress.ip_address("10.77.0.2"))  # replaces
        link = json.loads(ip("-j", "link", "show", "d0"))[0]
        addrs = json.loads(ip("-j", "addr", "show", "d0"))[0]["addr_info"]
        routes = json.loads(ip("-j", "route", "show", "default"))
        print(json.dumps({"mac": link["address"], "mtu": link["mtu"], "flags": link["flags"],
                          "addrs": sorted(f"{a['local']}/{a['prefixlen']}" for a in addrs
                                          if a.get("scope") == "global"),
                          "routes": [(r["gateway"], r["dev"]) for r in routes],
                          "listed": netconf.addresses("d0"), "now": now,
                          "by_mac": netconf.by_mac("02:11:22:33:44:55"),
                          "by_other_mac": netconf.by_mac("02:00:00:00:00:99")}))
    """)
    assert out["mac"] == "02:11:22:33:44:55"
    assert out["mtu"] == 1400
    assert "UP" in out["flags"]
    assert out["addrs"] == ["10.77.0.5/24", "fd00::5/64"]
    assert out["routes"] == [["10.77.0.2", "d0"]]
    listed = {(a["family"], a["address"], a["prefixlen"]) for a in out["listed"]}
    assert {("inet", "10.77.0.5", 24), ("inet6", "fd00::5", 64)} <= listed
    assert all(a["ifname"] == "d0" for a in out["listed"])
    assert [(a["address"], a["prefixlen"]) for a in out["now"]] == [("10.77.0.5", 24),
                                                                    ("fd00::5", 64)]
    assert out["by_mac"] == "d0"
    assert out["by_other_mac"] is None


def test_set_addresses_replaces_and_is_idempotent():
    out = in_netns("""
        netconf.set_up("d0")
        ip("addr", "add", "192.168.200.9/24", "dev", "d0")
        ip("addr", "add", "192.168.200.10/24", "dev", "d0")  # a secondary: goes with the first
        want = [ipaddress.ip_interface("10.77.0.5/24")]
        netconf.set_addresses("d0", want)
        netconf.set_addresses("d0", want)  # again: nothing to do, no EEXIST
        first = sorted(a["address"] for a in netconf.addresses("d0"))
        netconf.set_addresses("d0", [])
        netconf.set_up("d0", False)
        link = json.loads(ip("-j", "link", "show", "d0"))[0]
        print(json.dumps({"first": first, "after": netconf.addresses("d0"),
                          "flags": link["flags"]}))
    """)
    assert out["first"] == ["10.77.0.5"]  # the old address and the link-local are gone
    assert out["after"] == []
    assert "UP" not in out["flags"]


def test_errors_are_oserrors_with_the_kernels_reason():
    out = in_netns("""
        res = {}
        try:
            netconf.set_default_route("d0", ipaddress.ip_address("10.9.9.1"))  # d0 is down
        except OSError as exc:
            res["route"] = exc.errno
        try:
            netconf.set_up("nosuch0")
        except OSError as exc:
            res["missing"] = exc.errno
        print(json.dumps(res))
    """)
    import errno
    assert out["route"] in (errno.ENETUNREACH, errno.ENETDOWN)
    assert out["missing"] == errno.ENODEV
