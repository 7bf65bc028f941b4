"""Facts about the host that QEMU needs: its binary, the TSC frequency, whether KVM works."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import HostError
from ...store import write_json

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
KVM_PROBE_TIMEOUT = 15.0
PROBE_MARKER = b"PINNACE-PROBE-OK"


def qemu_binary() -> str:
    path = os.environ.get("PINNACE_QEMU") or shutil.which(QEMU_BINARY)
    if not path:
        raise HostError(f"{QEMU_BINARY} was not found",
                        "install it with: apt-get install qemu-system-x86 (or run 'make deps')")
    return path


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if not path:
        raise HostError("qemu-img was not found",
                        "install it with: apt-get install qemu-utils (or run 'make deps')")
    return path


@functools.cache
def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "unknown"


def cached_qemu_version(binary: str, cache_dir: Path) -> str:
    """``qemu_version`` remembered per binary (path, size, mtime): it is part of every
    snapshot key, and running ``qemu --version`` costs a process start each time."""
    st = os.stat(binary)
    key = f"{binary}:{st.st_size}:{st.st_mtime_ns}"
    path = cache_dir / "qemu-version.json"
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return str(data["version"])
    except (OSError, ValueError, KeyError):
        pass
    version = qemu_version(binary)
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "version": version})
    return version


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def cached_tsc_khz(cache_dir: Path) -> int | None:
    """host_tsc_khz(), remembered in the store until the host reboots (reading it costs ~0.1 s)."""
    cache = cache_dir / "host.json"
    bid = boot_id()
    try:
        data = json.loads(cache.read_text())
        if data.get("boot_id") == bid:
            value = data.get("tsc_khz")
            return value if isinstance(value, int) else None
    except (OSError, ValueError):
        pass
    value = host_tsc_khz()
    from ...store import write_json

    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json(cache, {"boot_id": bid, "tsc_khz": value})
    return value


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, from the most exact source available.

    Under TCG the guest's TSC runs at the host's rate, so a guest told this value
    (tsc_early_khz) skips the calibration that hangs on a busy host, and keeps time.
    """
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    text = _kernel_log()
    for pattern in (r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d+) MHz",
                    r"tsc: Detected (\d+)\.(\d+) MHz processor"):
        found = re.findall(pattern, text)
        if found:
            mhz, frac = found[-1]
            return int(mhz) * 1000 + int(frac.ljust(3, "0")[:3])
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if flags and mhz and "constant_tsc" in flags.group(1).split():
        return int(float(mhz.group(1)) * 1000)
    return None


def _kernel_log() -> str:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        fd = -1
    if fd >= 0:
        chunks = []
        try:
            while True:
                try:
                    chunks.append(os.read(fd, 8192).decode("utf-8", "replace"))
                except BlockingIOError:
                    break
                except OSError:  # EPIPE: records overwritten while reading; skip on
                    continue
        finally:
            os.close(fd)
        return "".join(chunks)
    try:
        return subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str
    probed: bool  # the answer came from a probe run now, not the cache


def _probe_key(binary: str) -> dict[str, str]:
    st = os.stat(binary)
    return {"qemu": binary, "qemu_mtime": str(st.st_mtime_ns), "host": os.uname().release,
            "boot_id": boot_id()}


def choose_accel(requested: str, cache_dir: Path, kernel: Path, initrd: Path) -> AccelChoice:
    """Resolve auto|kvm|tcg to kvm or tcg; 'auto' uses KVM only if a probe guest booted on it."""
    if requested == "tcg":
        return AccelChoice("tcg", "requested", False)
    binary = qemu_binary()
    if requested == "kvm":
        ok, why = kvm_device_usable()
        if not ok:
            raise HostError(f"KVM was requested but {why}",
                            "use --accel tcg or --accel auto, or fix access to /dev/kvm")
        return AccelChoice("kvm", "requested", False)
    forced = os.environ.get("PINNACE_ACCEL")
    if forced in ("kvm", "tcg"):
        return choose_accel(forced, cache_dir, kernel, initrd)
    ok, why = kvm_device_usable()
    if not ok:
        return AccelChoice("tcg", why, False)
    cache = cache_dir / "kvm-probe.json"
    key = _probe_key(binary)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return AccelChoice("kvm" if cached["ok"] else "tcg", cached["reason"], False)
    except (OSError, ValueError, KeyError):
        pass
    ok, reason = probe_kvm(binary, kernel, initrd)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from ...store import write_json

    write_json(cache, {"key": key, "ok": ok, "reason": reason, "time": time.time()})
    return AccelChoice("kvm" if ok else "tcg", reason, True)


def kvm_device_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    return True, ""


def probe_kvm(binary: str, kernel: Path, initrd: Path) -> tuple[bool, str]:
    """Boot the real guest kernel under KVM until its initramfs prints a marker."""
    with tempfile.TemporaryDirectory(prefix="pinnace-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            binary, "-machine", "microvm,accel=kvm", "-cpu", "host", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=ser,path={serial}", "-serial", "chardev:ser",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 pinnace.probe=1",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=KVM_PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        took = time.monotonic() - start
        booted = serial.exists() and PROBE_MARKER in serial.read_bytes()
    if booted:
        return True, f"a probe guest booted under KVM in {took:.1f} s"
    detail = out.decode("utf-8", "replace").strip().splitlines()
    why = detail[-1] if detail else f"no output within {KVM_PROBE_TIMEOUT:g} s"
    return False, f"a probe guest did not boot under KVM ({why[:160]})"
