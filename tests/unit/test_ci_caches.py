"""CI caches on real volumes (mkfs.ext4 on sparse files): restore, save, restore-keys,
and what a killed or concurrent run leaves."""

import asyncio
import subprocess

import pytest

from pinnace.ci.caches import LABEL_KEY, LABEL_NAME, Caches, entry_name
from pinnace.store import Store, write_atomic
from pinnace.volumes import AsyncVolumes

MiB = 1 << 20


@pytest.fixture
def vols(tmp_path):
    return AsyncVolumes(Store(tmp_path / "home"))


@pytest.fixture
def caches(vols):
    return Caches(vols)


def attach(caches, key, **kw):
    kw.setdefault("size", "32M")
    return asyncio.run(caches.attach("pip", key, "/home/runner/.cache/pip", **kw))


def detach(caches, att, success=True):
    return asyncio.run(caches.detach(att, success=success))


def mark(vols, name, data):
    """Write ``data`` into a volume's file (where a job's files would be)."""
    with open(vols.get(name).image, "r+b") as f:
        f.seek(20 * MiB)
        f.write(data)


def read(vols, name, n):
    with open(vols.get(name).image, "rb") as f:
        f.seek(20 * MiB)
        return f.read(n)


def volumes(vols):
    return sorted(v.name for v in vols.list())


def test_entry_names_are_valid_volume_names_for_long_names_and_keys():
    name = entry_name("x" * 100, "k" * 1000)
    assert len(name) <= 63 and name.startswith("ci-cache-")
    assert entry_name("pip", "a") != entry_name("pip", "b") != entry_name("npm", "a")


def test_a_miss_starts_empty_and_success_saves_it_under_the_key(caches, vols):
    att = attach(caches, "pip-1")
    assert (att.hit, att.save, att.volume) == ("", True, entry_name("pip", "pip-1"))
    assert "no entry" in att.describe()
    mark(vols, att.volume, b"wheels")
    assert "saved under key pip-1" in detach(caches, att)
    saved = vols.get(att.volume)
    assert saved.labels == {LABEL_NAME: "pip", LABEL_KEY: "pip-1"}
    assert [v.name for v in caches.saved()] == [saved.name]


def test_an_exact_hit_gets_a_copy_and_the_entry_never_changes(caches, vols):
    first = attach(caches, "pip-1")
    mark(vols, first.volume, b"wheels")
    detach(caches, first)
    hit = attach(caches, "pip-1")
    assert (hit.hit, hit.save) == ("exact", False) and hit.volume != first.volume
    assert read(vols, hit.volume, 6) == b"wheels"  # the job sees what was saved
    mark(vols, hit.volume, b"CHANGE")
    assert "was restored" in detach(caches, hit)
    assert read(vols, first.volume, 6) == b"wheels"
    assert volumes(vols) == [first.volume]  # the copy is gone


def test_restore_keys_take_the_newest_entry_with_the_prefix_and_save_the_new_key(caches,
                                                                                   vols):
    for key, data in (("pip-a", b"AAAAAA"), ("pip-b", b"BBBBBB"), ("other", b"OOOOOO")):
        att = attach(caches, key)
        mark(vols, att.volume, data)
        detach(caches, att)
    att = attach(caches, "pip-c", restore_keys=("nope-", "pip-"))
    assert (att.hit, att.restored_key, att.save) == ("partial", "pip-b", True)
    assert read(vols, att.volume, 6) == b"BBBBBB"
    assert "restored from key pip-b" in att.describe()
    detach(caches, att)
    assert [v.labels[LABEL_KEY] for v in caches.saved()] == ["pip-a", "pip-b", "other",
                                                             "pip-c"]  # (oldest first)
    gone = asyncio.run(caches.remove("pip", "pip-a"))
    assert [v.labels[LABEL_KEY] for v in gone] == ["pip-a"]
    assert len(asyncio.run(caches.remove())) == 3 and volumes(vols) == []


def test_a_failed_job_saves_nothing(caches, vols):
    att = attach(caches, "pip-1")
    assert "not saved" in detach(caches, att, success=False)
    assert volumes(vols) == []


def test_a_killed_runs_half_filled_entry_is_never_restored(caches, vols, tmp_path):
    att = attach(caches, "pip-1")
    mark(vols, att.volume, b"half")
    # the run dies: its volume stays owned by a process that is gone
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout
    write_atomic(vols.files(att.volume).owner, f"{dead.strip()} 1\n")
    again = attach(caches, "pip-1")
    assert (again.hit, again.save, again.volume) == ("", True, att.volume)
    assert read(vols, again.volume, 4) != b"half"  # made anew, empty
    detach(caches, again)


def test_while_another_run_fills_a_key_a_job_gets_a_volume_that_is_not_saved(caches, vols):
    filling = attach(caches, "pip-1")  # (owned by this process: alive)
    other = attach(caches, "pip-1")
    assert (other.hit, other.save) == ("", False) and other.volume != filling.volume
    assert "another run" in detach(caches, other)
    detach(caches, filling)
    assert volumes(vols) == [filling.volume]


def test_the_cli_lists_and_removes_saved_entries(caches, vols, tmp_path):
    from click.testing import CliRunner

    from pinnace.cli import main

    att = attach(caches, "pip-1")
    detach(caches, att)
    cli = CliRunner(env={"PINNACE_HOME": str(tmp_path / "home")})
    r = cli.invoke(main, ["ci", "cache", "ls"])
    assert r.exit_code == 0 and "pip" in r.output and "pip-1" in r.output, r.output
    r = cli.invoke(main, ["ci", "cache", "rm"])
    assert r.exit_code == 2 and "give a cache's NAME, or --all" in r.output
    r = cli.invoke(main, ["ci", "cache", "rm", "pip"])
    assert r.exit_code == 0 and f"removed {att.volume}" in r.output, r.output
    assert volumes(vols) == []
