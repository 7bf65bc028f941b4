"""The own kernel's recipe: its config fragments, the config check, the cache key."""

import re

import pytest

from pinnace.errors import HostError
from pinnace.images import kbuild as KB

LINE = re.compile(r"^(#.*|CONFIG_[A-Z0-9_]+=(y|m|n|\d+|\"[^\"]*\")|)$")


def test_fragments_are_commented_and_well_formed():
    frags = KB.fragments()
    assert frags[0].name == "base.config"
    seen: dict[str, tuple[str, str]] = {}
    for frag in frags:
        lines = frag.read_text().splitlines()
        assert lines[0].startswith("# "), f"{frag.name} must open with a comment saying what it is for"
        for n, line in enumerate(lines, 1):
            assert LINE.match(line), f"{frag.name}:{n}: {line!r}"
            if line.startswith("CONFIG_"):
                sym, value = line.split("=", 1)
                # one place per symbol: a later fragment silently winning hides a mistake
                assert sym not in seen, f"{sym} in {frag.name} and {seen[sym][0]}"
                seen[sym] = (frag.name, value)
    # what system-software tests need (issue 12), built in or as modules
    for sym in ("EXT4_FS", "9P_FS", "TMPFS", "OVERLAY_FS", "FUSE_FS", "SQUASHFS", "IPV6",
                "NF_TABLES", "NFT_COMPAT", "NF_CONNTRACK", "NFT_NAT", "BRIDGE", "VETH", "TUN",
                "MACVLAN", "VLAN_8021Q", "NET_SCH_NETEM", "NET_NS", "PID_NS", "USER_NS",
                "UTS_NS", "IPC_NS", "MEMCG", "CGROUP_PIDS", "CPUSETS", "CGROUP_FREEZER",
                "SECCOMP_FILTER", "BPF_SYSCALL", "HW_RANDOM_VIRTIO", "VIRTIO_CONSOLE",
                "VIRTIO_BLK", "VIRTIO_NET", "MODULES", "PVH"):
        assert seen.get(f"CONFIG_{sym}", ("", "n"))[1] in ("y", "m"), sym
    assert seen["CONFIG_DUMMY"][1] == "m"  # the module the guest test loads with modprobe


def test_parse_config_reads_values_and_unset_lines():
    text = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\nCONFIG_D=\"x y\"\n# a comment\n"
    assert KB.parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "m",
                                     "CONFIG_D": '"x y"'}


def test_config_problems_name_each_symbol_that_did_not_stick():
    wanted = {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": "n", "CONFIG_D": "y"}
    got = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "y"}
    problems = KB.config_problems(wanted, got)
    assert len(problems) == 3
    assert any("CONFIG_B=m" in p and "has y" in p for p in problems)
    assert any("CONFIG_C is y" in p for p in problems)
    assert any("CONFIG_D=y" in p and "off" in p for p in problems)
    assert KB.config_problems(wanted, {**got, "CONFIG_B": "m", "CONFIG_C": "n",
                                       "CONFIG_D": "y"}) == []


def test_key_follows_source_config_and_compiler():
    src = KB.KernelSource("linux-source-6.1", "6.1.1-1", KB.Path("/x"))
    key = KB.kernel_key(src, "CONFIG_A=y\n", "gcc 12")
    assert key == KB.kernel_key(src, "CONFIG_A=y\n", "gcc 12")
    assert key != KB.kernel_key(src, "CONFIG_A=m\n", "gcc 12")
    assert key != KB.kernel_key(src, "CONFIG_A=y\n", "gcc 13")
    newer = KB.KernelSource("linux-source-6.1", "6.1.2-1", KB.Path("/x"))
    assert key != KB.kernel_key(newer, "CONFIG_A=y\n", "gcc 12")


def test_missing_source_package_says_how_to_install_it():
    with pytest.raises(HostError) as info:
        KB.find_source("linux-source-0.0-no-such")
    assert "apt-get install linux-source-0.0-no-such" in str(info.value)
    assert "--kernel debian" in str(info.value)


def test_compile_progress_counts_compiled_files_only():
    progress = KB.CompileProgress(expected=3)
    lines = ["  CC      kernel/fork.o", "  LD      vmlinux.o", "  CC [M]  net/x.o",
             "  AS      arch/x86/entry.o", "  CC      a.o"]
    shown = [progress(line) for line in lines]
    assert shown == ["1 of ~3 files: kernel/fork.o", None, "2 of ~3 files: net/x.o",
                     "3 of ~3 files: arch/x86/entry.o", "4 of ~4 files: a.o"]


def test_gc_removes_a_kernel_build_whose_command_died(tmp_path, monkeypatch):
    """A killed kernel build leaves GBs of source in the host-wide cache's tmp/: gc goes."""
    import subprocess

    from .fakes import arun, fake_store

    cache = tmp_path / "kernels"
    monkeypatch.setenv("PINNACE_KERNEL_CACHE", str(cache))
    proc = subprocess.Popen(["true"])  # its pid: a process that has ended
    proc.wait()
    left = cache / "tmp" / f"kernel-{proc.pid}-abc"
    (left / "src").mkdir(parents=True)
    live = cache / "tmp" / f"kernel-{KB.os.getpid()}-def"
    live.mkdir()
    pn = fake_store(tmp_path)
    removed = [str(r) for r in arun(pn, pn.gc())]
    assert any("kernel build whose command died" in r and str(left) in r for r in removed)
    assert not left.exists() and live.exists()  # a build still running is left alone
