"""The accelerator probe: a tiny firmware under QEMU that answers within KVM_PROBE_TIMEOUT."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from pinnace.backends.qemu import host
from pinnace.store import CacheFiles

QEMU = shutil.which(host.QEMU_BINARY)
needs_qemu = pytest.mark.skipif(QEMU is None, reason=f"{host.QEMU_BINARY} is not installed")
# The probe ends within its timeout; past that, only killing and reaping QEMU.
TEARDOWN = 0.5


def test_firmware_prints_at_the_reset_vector() -> None:
    image = host.probe_firmware()
    assert len(image) == 0x10000
    code = image[0xFFF0:]
    assert code.startswith(b"\xb0K\xba\xf8\x03\xee\xf4")  # mov al,'K'; mov dx,0x3f8; out; hlt
    assert image[:0xFFF0] == bytes(0xFFF0)


@needs_qemu
def test_probe_says_yes_under_tcg() -> None:
    """The only accelerator sure to work here: proves the firmware prints its byte."""
    assert QEMU is not None
    start = time.monotonic()
    ok, reason = host.probe_kvm(QEMU, accel="tcg")
    took = time.monotonic() - start
    assert ok, reason
    assert "TCG" in reason
    assert took < host.KVM_PROBE_TIMEOUT + TEARDOWN


@needs_qemu
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="/dev/kvm does not exist")
def test_probe_under_kvm_answers_in_time() -> None:
    assert QEMU is not None
    start = time.monotonic()
    ok, reason = host.probe_kvm(QEMU)
    took = time.monotonic() - start
    assert isinstance(ok, bool)
    assert "KVM" in reason
    assert took < host.KVM_PROBE_TIMEOUT + TEARDOWN, reason


@needs_qemu
def test_probe_gives_up_at_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that never prints: QEMU is killed at the deadline and the answer is no."""
    assert QEMU is not None
    silent = bytearray(0x10000)
    silent[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"  # 1: hlt; jmp 1b
    monkeypatch.setattr(host, "probe_firmware", lambda: bytes(silent))
    timeout = 0.5
    start = time.monotonic()
    ok, reason = host.probe_kvm(QEMU, accel="tcg", timeout=timeout)
    took = time.monotonic() - start
    assert not ok
    assert "no output within 0.5 s" in reason
    assert timeout <= took < timeout + TEARDOWN


def test_probe_rejects_an_unknown_accelerator() -> None:
    with pytest.raises(ValueError):
        host.probe_kvm("qemu", accel="hvf")


@needs_qemu
def test_choose_accel_caches_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PINNACE_ACCEL", raising=False)
    monkeypatch.delenv("PINNACE_QEMU", raising=False)
    usable, why = host.kvm_device_usable()
    start = time.monotonic()
    first = host.choose_accel("auto", CacheFiles(tmp_path))
    took = time.monotonic() - start
    second = host.choose_accel("auto", CacheFiles(tmp_path))
    cache = CacheFiles(tmp_path).kvm_probe
    if not usable:  # no probe at all: the device check alone says TCG
        assert first == second == host.AccelChoice("tcg", why, False)
        assert not cache.exists()
        return
    assert first.probed and not second.probed
    assert first.accel in ("kvm", "tcg")
    assert (second.accel, second.reason) == (first.accel, first.reason)
    assert took < host.KVM_PROBE_TIMEOUT + TEARDOWN, first.reason
    saved = json.loads(cache.read_text())
    assert saved["ok"] == (first.accel == "kvm")
    assert saved["reason"] == first.reason
