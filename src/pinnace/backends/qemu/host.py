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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import HostError, StoreError
from ...store import CacheFiles, write_json
from ..base import AccelChoice
from .command import CPU_MODEL, SANDBOX

PROBE_TIMED_OUT = "no output within"

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
# The whole accelerator probe, QEMU's start included. Its answer is kept in kvm-probe.json
# until the host reboots or QEMU changes.
KVM_PROBE_TIMEOUT = 2.0
PROBE_POLL_INTERVAL = 0.005
PROBE_BYTE = b"K"  # what the probe firmware writes to its serial port
PROBE_FIRMWARE_SIZE = 0x10000  # -bios maps it below 4 GiB and at 0xF0000
RESET_VECTOR = 0xFFF0  # the image offset of F000:FFF0, where the CPU starts


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


def cached_qemu_version(binary: str, cache: CacheFiles) -> str:
    """``qemu_version`` remembered per binary (path, size, mtime): it is part of every
    snapshot key, and running ``qemu --version`` costs a process start each time."""
    return str(_cached_fact(binary, cache, "version", lambda: qemu_version(binary)))


def _cached_fact(binary: str, cache: CacheFiles, name: str, probe: Callable[[], Any]) -> Any:
    """A fact about the QEMU binary (its version, its -sandbox), kept in the store's
    cache until the binary changes (path, size, mtime)."""
    st = os.stat(binary)
    key = f"{binary}:{st.st_size}:{st.st_mtime_ns}"
    path = cache.qemu_version
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict) and loaded.get("key") == key:
            data = loaded
    if name in data:
        return data[name]
    value = probe()
    with contextlib.suppress(OSError, StoreError):
        cache.dir.mkdir(parents=True, exist_ok=True)
        write_json(path, {**data, "key": key, name: value})
    return value


@functools.cache
def sandbox_supported(binary: str) -> bool:
    """True if QEMU takes pinnace's -sandbox (built with seccomp): it checks the option
    before it prints its version."""
    try:
        return subprocess.run([binary, "-sandbox", SANDBOX, "-version"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def cached_sandbox(binary: str, cache: CacheFiles) -> bool:
    """``sandbox_supported``, remembered per binary as its version is."""
    return bool(_cached_fact(binary, cache, "sandbox", lambda: sandbox_supported(binary)))


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def cached_tsc_khz(cache_files: CacheFiles) -> int | None:
    """host_tsc_khz(), remembered in the store until the host reboots (reading it costs ~0.1 s)."""
    cache = cache_files.host_facts
    bid = boot_id()
    try:
        data = json.loads(cache.read_text())
        if data.get("boot_id") == bid:
            value = data.get("tsc_khz")
            return value if isinstance(value, int) else None
    except (OSError, ValueError):
        pass
    value = host_tsc_khz()
    cache.parent.mkdir(parents=True, exist_ok=True)
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


def _probe_key(binary: str) -> dict[str, str]:
    st = os.stat(binary)
    return {"qemu": binary, "qemu_mtime": str(st.st_mtime_ns), "host": os.uname().release,
            "boot_id": boot_id()}


def choose_accel(requested: str, cache_files: CacheFiles) -> AccelChoice:
    """Resolve auto|kvm|tcg to kvm or tcg; 'auto' uses KVM only if a probe VM ran on it
    (a firmware of a few bytes, see ``probe_kvm``: the answer takes at most 2 s)."""
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
        return choose_accel(forced, cache_files)
    ok, why = kvm_device_usable()
    if not ok:
        return AccelChoice("tcg", why, False)
    cache = cache_files.kvm_probe
    key = _probe_key(binary)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return AccelChoice("kvm" if cached["ok"] else "tcg", cached["reason"], False)
    except (OSError, ValueError, KeyError):
        pass
    ok, reason = probe_kvm(binary)
    if ok or PROBE_TIMED_OUT not in reason:
        # A probe that only ran out of time (a very busy host) is not remembered: the
        # next start asks again rather than staying on TCG until the host reboots.
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"key": key, "ok": ok, "reason": reason, "time": time.time()})
    return AccelChoice("kvm" if ok else "tcg", reason, True)


def kvm_device_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    return True, ""


def probe_firmware() -> bytes:
    """A 64 KiB firmware image (for ``-bios``) that prints PROBE_BYTE on COM1 and halts.

    The CPU starts at F000:FFF0, the image's last 16 bytes, in real mode:
    ``mov al, PROBE_BYTE; mov dx, 0x3f8; out dx, al; 1: hlt; jmp 1b``.
    """
    code = bytes([0xB0, PROBE_BYTE[0],        # mov al, 'K'
                  0xBA, 0xF8, 0x03,           # mov dx, 0x3f8
                  0xEE,                       # out dx, al
                  0xF4,                       # 1: hlt
                  0xEB, 0xFD])                # jmp 1b
    image = bytearray(PROBE_FIRMWARE_SIZE)
    image[RESET_VECTOR:RESET_VECTOR + len(code)] = code
    return bytes(image)


def probe_kvm(binary: str, *, accel: str = "kvm",
              timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Whether QEMU can run a guest under ``accel``: (answer, reason), within ``timeout`` s.

    Starts a VM shaped like pinnace's (microvm, the same CPU model) whose firmware
    (``probe_firmware``) writes one byte to its serial port, and watches for that byte.
    QEMU is killed as soon as the byte is there, it exits, or the time is up.
    """
    cpu = CPU_MODEL.get(accel)
    if cpu is None:
        raise ValueError(f"unknown accelerator {accel!r}")
    name = accel.upper()
    with tempfile.TemporaryDirectory(prefix=f"pinnace-{accel}-probe-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        firmware.write_bytes(probe_firmware())
        serial = Path(tmp) / "serial.log"
        errors = Path(tmp) / "stderr.log"
        argv = [
            binary, "-machine", f"microvm,accel={accel},rtc=on,isa-serial=on,x-option-roms=off",
            "-cpu", cpu, "-smp", "1", "-m", "16",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-bios", str(firmware),
            "-chardev", f"file,id=ser,path={_qemu_opt(str(serial))}", "-serial", "chardev:ser",
        ]
        start = time.monotonic()
        deadline = start + timeout
        with open(errors, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
        try:
            while True:
                exited = proc.poll() is not None
                printed = _has_probe_byte(serial)
                if printed or exited or time.monotonic() >= deadline:
                    break
                time.sleep(PROBE_POLL_INTERVAL)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        stderr = errors.read_bytes().decode("utf-8", "replace")
    if printed:
        return True, f"a probe VM ran under {name} in {took:.2f} s"
    prefix = f"{os.path.basename(binary)}: "
    lines = [line.strip().removeprefix(prefix) for line in stderr.splitlines()
             if line.strip() and "warning:" not in line]
    if exited:
        why = "; ".join(lines) or f"QEMU exited with status {proc.returncode}"
    else:
        why = f"{PROBE_TIMED_OUT} {timeout:g} s"
    return False, f"a probe VM did not run under {name} ({why[:200]})"


def _has_probe_byte(serial: Path) -> bool:
    try:
        return PROBE_BYTE in serial.read_bytes()
    except OSError:  # not created yet
        return False


def _qemu_opt(value: str) -> str:
    """``value`` quoted for a QEMU option list, where a comma is written as two."""
    return value.replace(",", ",,")
