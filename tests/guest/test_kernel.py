"""What the guest kernel offers system-software tests (issue 12's list), each checked in a
real guest of the default image: filesystems, networking, firewalls, traffic control,
namespaces, cgroup v2, seccomp and BPF, the virtio devices, and loadable modules."""

import shutil
import subprocess
import textwrap

import pytest


def sh(machine, script, timeout=60):
    """Run a shell script in the guest; fail the test with its output if it fails."""
    r = machine.exec(["sh", "-euc", textwrap.dedent(script)], timeout=timeout)
    assert r.exit_code == 0, (f"exit {r.exit_code}\nstdout:\n{r.stdout.decode(errors='replace')}"
                              f"\nstderr:\n{r.stderr.decode(errors='replace')}")
    return r.stdout.decode()


def py(machine, code, timeout=60):
    r = machine.exec(["python3", "-c", textwrap.dedent(code)], timeout=timeout)
    assert r.exit_code == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode()


def test_the_default_image_boots_pinnaces_own_kernel_without_an_initramfs(pn, machine):
    image = pn.images.get("default")
    assert image.manifest["kernel"] == "pinnace"
    assert not image.files.initrd.exists()
    out = sh(machine, "uname -r; cat /proc/cmdline; head -c 2 /proc/config.gz | od -An -tx1")
    release, cmdline, magic = out.splitlines()
    assert release == image.manifest["kernel_version"]
    assert "root=/dev/vda" in cmdline and "init=/usr/lib/pinnace/agent" in cmdline
    assert magic.split() == ["1f", "8b"]  # /proc/config.gz: the config is readable in guests


def test_filesystems_ext4_tmpfs_overlayfs(machine):
    sh(machine, """
        grep -q ' / ext4 ' /proc/mounts
        mkdir -p /tmp/t /tmp/lo /tmp/up /tmp/wk /tmp/ov
        mount -t tmpfs -o size=8m tmpfs /tmp/t && echo hi > /tmp/t/f && umount /tmp/t
        echo lower > /tmp/lo/a
        mount -t overlay overlay -o lowerdir=/tmp/lo,upperdir=/tmp/up,workdir=/tmp/wk /tmp/ov
        echo upper > /tmp/ov/a
        [ "$(cat /tmp/lo/a)" = lower ] && [ "$(cat /tmp/up/a)" = upper ]
        umount /tmp/ov
    """)


@pytest.mark.skipif(shutil.which("mksquashfs") is None,
                    reason="mksquashfs is not on the host (apt-get install squashfs-tools)")
def test_squashfs_on_a_loop_device(machine, tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    (src / "hello").write_text("from squashfs\n")
    image = tmp_path / "t.sqfs"
    subprocess.run(["mksquashfs", str(src), str(image), "-quiet", "-comp", "xz"], stdout=subprocess.DEVNULL, check=True)
    machine.files.put(image, "/tmp/t.sqfs")
    out = sh(machine, """
        mkdir -p /tmp/sq
        mount -t squashfs -o loop,ro /tmp/t.sqfs /tmp/sq
        cat /tmp/sq/hello
        umount /tmp/sq
    """)
    assert out == "from squashfs\n"


@pytest.mark.skipif(shutil.which("mkfs.fat") is None,
                    reason="mkfs.fat is not on the host (apt-get install dosfstools)")
def test_vfat_mounts_with_its_default_code_pages(machine, tmp_path):
    image = tmp_path / "t.fat"
    subprocess.run(["mkfs.fat", "-C", "-n", "PINNACE", str(image), "2048"], check=True,
                   stdout=subprocess.DEVNULL)
    machine.files.put(image, "/tmp/t.fat")
    out = sh(machine, """
        mkdir -p /tmp/fat
        mount -t vfat -o loop /tmp/t.fat /tmp/fat
        echo hello > /tmp/fat/Hello.txt
        ls /tmp/fat
        umount /tmp/fat
    """)
    assert out.split() == ["Hello.txt"]


def test_nfs_client_modules_for_v3_and_v4(machine):
    out = sh(machine, """
        modprobe -a nfs nfsv3 nfsv4
        grep -wE 'nfs|nfs4' /proc/filesystems | awk '{print $NF}' | sort
    """)
    assert out.split() == ["nfs", "nfs4"]


def test_fuse_mounts_and_the_kernel_asks_the_server_to_init(machine):
    # No FUSE userland needed: mount with our own /dev/fuse descriptor and read the
    # kernel's first request, FUSE_INIT (opcode 26).
    out = py(machine, """
        import ctypes, os, struct
        libc = ctypes.CDLL(None, use_errno=True)
        os.makedirs("/tmp/fu", exist_ok=True)
        fd = os.open("/dev/fuse", os.O_RDWR)
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"test", b"/tmp/fu", b"fuse", 0, opts) != 0:
            raise OSError(ctypes.get_errno(), "mount fuse")
        req = os.read(fd, 1 << 20)
        length, opcode = struct.unpack_from("<II", req)
        print(opcode)
        libc.umount2(b"/tmp/fu", 2)
    """)
    assert out.strip() == "26"


def test_ipv4_and_ipv6(machine):
    sh(machine, """
        ip -4 addr show lo | grep -q 127.0.0.1
        ip link set lo up
        ip -6 addr add ::1/128 dev lo 2>/dev/null || true
        ping -c1 -W2 127.0.0.1 >/dev/null
        ping -6 -c1 -W2 ::1 >/dev/null
    """)


def test_nftables_with_conntrack_and_nat(machine):
    sh(machine, """
        nft add table inet t
        nft add chain inet t input '{ type filter hook input priority 0; }'
        nft add rule inet t input ct state established,related accept
        nft add table ip n
        nft add chain ip n post '{ type nat hook postrouting priority 100; }'
        nft add rule ip n post oifname lo masquerade
        nft list ruleset | grep -q masquerade
        nft delete table inet t && nft delete table ip n
    """)


def test_iptables_uses_the_nft_backend_with_conntrack_and_nat(machine):
    out = sh(machine, """
        iptables -V
        iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        iptables -t nat -A POSTROUTING -o lo -j MASQUERADE
        iptables -A INPUT -p tcp -m multiport --dports 22,80 -m comment --comment x -j ACCEPT
        ip6tables -A INPUT -m conntrack --ctstate INVALID -j DROP
        iptables -S | grep -q ctstate
        iptables -F && iptables -t nat -F && ip6tables -F
    """)
    assert "nf_tables" in out


def test_virtual_links_bridge_veth_tun_macvlan_vlan(machine):
    sh(machine, """
        ip link add br0 type bridge
        ip link add v0 type veth peer name v1
        ip link set v0 master br0
        ip tuntap add dev tap0 mode tap
        ip link add link v1 name mv0 type macvlan mode bridge
        ip link add link v1 name v1.10 type vlan id 10
        ip -br link | grep -q 'v1.10@v1'
        for l in v1.10 mv0 tap0 v0 br0; do ip link del "$l"; done
    """)


def test_traffic_control_with_netem(machine):
    sh(machine, """
        ip link add d0 type veth peer name d1
        tc qdisc add dev d0 root netem delay 50ms loss 1%
        tc qdisc show dev d0 | grep -q 'netem.*delay 50ms'
        tc qdisc replace dev d0 root tbf rate 1mbit burst 32kbit latency 400ms
        tc qdisc add dev d0 ingress
        ip link del d0
    """)


def test_namespaces_net_pid_mount_user_uts_ipc(machine):
    out = sh(machine, """
        unshare --net --pid --fork --mount --uts --ipc sh -c \
            'hostname inner && hostname && ip -br link | wc -l && echo $$'
        unshare --user --map-root-user id -u
    """)
    assert out.split() == ["inner", "1", "1", "0"]


def test_cgroup_v2_with_its_controllers(machine):
    out = sh(machine, """
        mkdir -p /tmp/cg
        mount -t cgroup2 none /tmp/cg
        cat /tmp/cg/cgroup.controllers
        echo '+cpu +memory +pids +cpuset' > /tmp/cg/cgroup.subtree_control
        mkdir /tmp/cg/t
        echo 10M > /tmp/cg/t/memory.max
        echo 5 > /tmp/cg/t/pids.max
        echo 1 > /tmp/cg/t/cgroup.freeze
        cat /tmp/cg/t/cgroup.events
        test -e /tmp/cg/t/cpu.pressure  # PSI
        grep -qw io /tmp/cg/cgroup.controllers && echo '+io' > /tmp/cg/cgroup.subtree_control
        test -e /tmp/cg/t/io.max
        rmdir /tmp/cg/t
        umount /tmp/cg
    """)
    controllers = out.splitlines()[0].split()
    assert {"cpu", "memory", "pids", "cpuset"} <= set(controllers), controllers
    assert "frozen 1" in out  # the freezer of cgroup v2


def test_seccomp_filters_and_bpf(machine):
    out = py(machine, """
        import ctypes, os, struct
        libc = ctypes.CDLL(None, use_errno=True)
        # bpf(BPF_MAP_CREATE) of a one-entry array map
        attr = struct.pack("<IIII", 2, 4, 4, 1) + bytes(112)
        buf = ctypes.create_string_buffer(attr, len(attr))
        fd = libc.syscall(321, 0, buf, len(attr))
        print("bpf", fd >= 0, ctypes.get_errno() if fd < 0 else 0)
        # seccomp: chdir (nr 80) fails with EPERM, everything else is allowed
        BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
        prog = [(BPF_LD_W_ABS, 0, 0, 0), (BPF_JEQ_K, 0, 1, 80),
                (BPF_RET_K, 0, 0, 0x00050000 | 1), (BPF_RET_K, 0, 0, 0x7FFF0000)]
        raw = b"".join(struct.pack("<HBBI", *ins) for ins in prog)
        filt = ctypes.create_string_buffer(raw, len(raw))
        fprog = struct.pack("<HxxxxxxQ", len(prog), ctypes.addressof(filt))
        fbuf = ctypes.create_string_buffer(fprog, len(fprog))
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, fbuf, 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
        try:
            os.chdir("/")
            print("chdir allowed")
        except PermissionError:
            print("chdir refused")
    """)
    assert out.split("\n")[:2] == ["bpf True 0", "chdir refused"]


def test_virtio_devices_rng_console_block_net(machine):
    out = sh(machine, """
        cat /sys/class/misc/hw_random/rng_current
        ls /sys/bus/virtio/drivers
        ls /dev/vport* | head -1
        readlink /sys/block/vda/device/driver
    """)
    assert out.splitlines()[0].startswith("virtio_rng")
    for drv in ("virtio_blk", "virtio_console", "virtio_net", "virtio_rng"):
        assert drv in out, drv
    assert "/dev/vport" in out


def test_modules_load_with_modprobe(machine):
    out = sh(machine, """
        ! grep -q '^dummy ' /proc/modules
        modprobe dummy
        grep -q '^dummy ' /proc/modules
        ip link add d9 type dummy && ip link del d9
        modprobe -r dummy
        modinfo -F filename wireguard
    """)
    assert out.strip().endswith("wireguard.ko")
