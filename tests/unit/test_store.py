import os
import threading
import time

import pytest

from pinnace.errors import ConfigError, LockTimeout
from pinnace.store import FileLock, Store, tail, validate_name, write_atomic, write_json


def test_validate_name():
    assert validate_name("machine", "web-1.test_x") == "web-1.test_x"
    for bad in ("", ".", "..", "-x", "a b", "a/b", "é", "x" * 64):
        with pytest.raises(ConfigError):
            validate_name("machine", bad)


def test_write_atomic_replaces_whole(tmp_path):
    p = tmp_path / "f.json"
    write_json(p, {"a": 1})
    write_atomic(p, "new")
    assert p.read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_lock_times_out_while_held(tmp_path):
    a = FileLock(tmp_path / "l", timeout=5)
    b = FileLock(tmp_path / "l", timeout=0.2)
    with a:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as exc:
            b.acquire()
        assert time.monotonic() - t0 >= 0.2
        assert "busy" in str(exc.value)
    b.acquire()  # free now
    b.release()


def test_lock_waits_for_release(tmp_path):
    a = FileLock(tmp_path / "l", timeout=5)
    a.acquire()
    threading.Timer(0.3, a.release).start()
    t0 = time.monotonic()
    with FileLock(tmp_path / "l", timeout=5):
        waited = time.monotonic() - t0
        with pytest.raises(LockTimeout):  # held, exclusively
            FileLock(tmp_path / "l", timeout=0.05).acquire()
    assert 0.25 <= waited < 3


def test_tail_strips_control_characters(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"one\ntwo\x1b[31m\x00\nthree\xff\n")
    assert tail(p, 2) == "two[31m\nthree\ufffd"
    assert tail(tmp_path / "missing") == ""


def test_staging_dirs_of_dead_processes_are_cleaned(tmp_path):
    store = Store(tmp_path)
    store.ensure()
    dead = store.tmp_dir / "image-999999999-abc"
    dead.mkdir()
    with store.staging_dir("image-") as live:
        store.clean_tmp()
        assert live.exists()
        assert not dead.exists()
    assert not live.exists()


def test_store_refuses_home_too_long_for_sockets(tmp_path):
    with pytest.raises(ConfigError):
        Store(tmp_path / ("x" * 80))


def test_default_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PINNACE_HOME", str(tmp_path / "h"))
    assert Store().home == tmp_path / "h"
    monkeypatch.delenv("PINNACE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Store().home == tmp_path / "pinnace"
    assert os.path.isabs(Store("rel").home)
