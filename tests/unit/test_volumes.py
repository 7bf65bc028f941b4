import asyncio
import hashlib
import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from pinnace import volumes as volmod
from pinnace.cli import main
from pinnace.cli.volume import volume
from pinnace.errors import AlreadyExistsError, ConfigError, HostError, NotFoundError
from pinnace.store import Store, write_json
from pinnace.volumes import AsyncVolumes, VolumeError, VolumeInUse, volume_size

MiB = 1 << 20


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def vols(home):
    return AsyncVolumes(Store(home))


def create(vols, name, size, **kw):
    return asyncio.run(vols.create(name, size, **kw))


def remove(vols, name):
    asyncio.run(vols.remove(name))


def superblock(image):
    """`dumpe2fs -h` of an image as {field: value}."""
    tool = shutil.which("dumpe2fs") or "/sbin/dumpe2fs"
    out = subprocess.run([tool, "-h", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in out.splitlines() if ":" in line)}


def fingerprint(path):
    st = path.stat()
    return st.st_mtime_ns, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def attach(home, machine, volume_name):
    """A machine config that lists the volume, as the machine code writes it."""
    d = home / "machines" / machine
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "config.json", {"name": machine, "volumes": [
        {"source": volume_name, "path": "/data", "ro": False}]})
    return d / "config.json"


def leftovers(home):
    tmp = home / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


# --- create ----------------------------------------------------------------------------


@pytest.mark.parametrize("journal", [True, False])
def test_create_makes_a_sparse_ext4_file(vols, home, journal):
    vol = create(vols, "data", "1G", journal=journal)
    assert vol.path == home / "volumes" / "data"
    assert vol.image == vol.path / "volume.ext4"
    assert (vol.size, vol.journal, vol.label) == (1 << 30, journal, "data")
    assert vol.image.stat().st_size == 1 << 30
    assert vols.usage(vol) == vol.image.stat().st_blocks * 512
    assert vols.usage(vol) < 16 * MiB  # sparse: metadata only, journal included
    sb = superblock(vol.image)
    assert sb["Filesystem magic number"] == "0xEF53"
    assert sb["Filesystem volume name"] == "data"
    assert sb["Block size"] == "4096"
    features = sb["Filesystem features"].split()
    assert "extent" in features  # ext4, not ext2/3
    assert ("has_journal" in features) is journal
    meta = json.loads((vol.path / "volume.json").read_text())
    assert meta == {"name": "data", "size": 1 << 30, "journal": journal,
                    "created": vol.created, "label": "data"}
    assert vols.get("data") == vol
    assert leftovers(home) == []


def test_label_is_the_name_cut_to_16_bytes(vols):
    vol = create(vols, "a-rather-long-volume-name", "16M")
    assert vol.label == "a-rather-long-vo"
    assert superblock(vol.image)["Filesystem volume name"] == "a-rather-long-vo"


@pytest.mark.parametrize(("given", "size"), [
    ("16M", 16 * MiB), (32, 32 * MiB), ("32", 32 * MiB), ("1.5G", 1536 * MiB),
    ("16385K", 16 * MiB + 4096), ("16T", 16 << 40),
])
def test_volume_size_parses_bare_numbers_as_mib_and_rounds_to_blocks(given, size):
    assert volume_size(given) == size


@pytest.mark.parametrize(("given", "words"), [
    ("15M", "at least 16M"), (8, "at least 16M"), (0, "positive"), ("0", "positive"),
    ("ten gigs", "such as 512M"), ("17T", "at most 16T"), ("-1G", "such as 512M"),
    (True, "such as 512M"),
])
def test_bad_sizes_are_config_errors_that_say_why(vols, home, given, words):
    with pytest.raises(ConfigError) as exc:
        create(vols, "data", given)
    assert exc.value.field == "volume size"
    assert words in str(exc.value)
    assert not (home / "volumes" / "data").exists()
    assert leftovers(home) == []


def test_bad_name_is_a_config_error(vols):
    with pytest.raises(ConfigError, match="invalid volume name"):
        create(vols, "../escape", "16M")


def test_creating_an_existing_name_leaves_it_untouched(vols):
    vol = create(vols, "data", "64M")
    before = fingerprint(vol.image), fingerprint(vol.path / "volume.json")
    for size, journal in (("64M", True), ("128M", False)):
        with pytest.raises(AlreadyExistsError) as exc:
            create(vols, "data", size, journal=journal)
        assert (exc.value.kind, exc.value.name) == ("volume", "data")
    assert (fingerprint(vol.image), fingerprint(vol.path / "volume.json")) == before


def test_concurrent_creates_of_one_name_make_one_volume(vols, home):
    async def both():
        return await asyncio.gather(*(vols.create("data", "32M") for _ in range(4)),
                                    return_exceptions=True)

    results = asyncio.run(both())
    made = [r for r in results if not isinstance(r, BaseException)]
    assert len(made) == 1
    assert all(isinstance(r, AlreadyExistsError) for r in results if r not in made)
    assert vols.get("data") == made[0]
    assert leftovers(home) == []


def test_missing_mkfs_names_the_package(vols, home, monkeypatch):
    monkeypatch.setattr(volmod.shutil, "which", lambda _: None)
    monkeypatch.setattr(volmod, "_SBIN_DIRS", ())
    with pytest.raises(HostError, match="apt-get install e2fsprogs"):
        create(vols, "data", "16M")
    assert not (home / "volumes" / "data").exists()


def test_mkfs_failure_carries_its_stderr_and_leaves_nothing(vols, home, tmp_path, monkeypatch):
    fake = tmp_path / "mkfs.ext4"
    fake.write_text("#!/bin/sh\necho 'mkfs.ext4: Device size reported to be zero' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(volmod, "mkfs_binary", lambda: str(fake))
    with pytest.raises(VolumeError) as exc:
        create(vols, "data", "16M")
    assert "exit code 1" in str(exc.value) and "Device size reported" in str(exc.value)
    assert not (home / "volumes" / "data").exists()
    assert leftovers(home) == []


# --- get / list / users ----------------------------------------------------------------


def test_get_of_a_missing_volume_points_at_ls(vols):
    with pytest.raises(NotFoundError, match="pinnace volume ls"):
        vols.get("ghost")


def test_damaged_volumes_are_named_and_skipped_by_list(vols, home):
    good = create(vols, "good", "16M")
    d = home / "volumes"
    (d / "badjson").mkdir()
    (d / "badjson" / "volume.json").write_text("{not json")
    (d / "nojson").mkdir()
    (d / "wrongtype").mkdir()
    write_json(d / "wrongtype" / "volume.json", {"size": "big", "journal": True, "created": 1})
    (d / "noimage").mkdir()
    write_json(d / "noimage" / "volume.json",
               {"name": "noimage", "size": 16 * MiB, "journal": True, "created": 1.0})
    (d / "stray-file").write_text("")
    (d / ".hidden").mkdir()
    assert vols.list() == [good]
    for name, words in (("badjson", "cannot be read"), ("nojson", "is missing"),
                        ("wrongtype", "bad size"), ("noimage", "volume.ext4 is missing")):
        with pytest.raises(VolumeError) as exc:
            vols.get(name)
        assert words in str(exc.value)
        assert f"pinnace volume rm {name}" in str(exc.value)
    remove(vols, "badjson")  # a damaged volume can still be removed
    assert not (d / "badjson").exists()


def test_list_of_an_empty_store(vols):
    assert vols.list() == []
    assert vols.users("data") == ()


def test_users_reads_machine_configs_and_tolerates_damaged_ones(vols, home):
    attach(home, "web", "data")
    attach(home, "db", "other")
    machines = home / "machines"
    for name, text in (("broken", "{"), ("listy", "[1, 2]"), ("odd", '{"volumes": "data"}'),
                       ("odder", '{"volumes": ["data", 3, null]}')):
        (machines / name).mkdir()
        (machines / name / "config.json").write_text(text)
    (machines / "empty").mkdir()
    assert vols.users("data") == ("web",)
    assert vols.users("other") == ("db",)
    assert vols.users("none") == ()


# --- remove ----------------------------------------------------------------------------


def test_remove_is_refused_while_a_machine_uses_it(vols, home):
    vol = create(vols, "data", "16M")
    before = fingerprint(vol.image)
    config = attach(home, "web", "data")
    with pytest.raises(VolumeInUse) as exc:
        remove(vols, "data")
    assert exc.value.machines == ("web",)
    assert "'web'" in str(exc.value)
    assert "delete the machine or recreate it without the volume" in str(exc.value)
    assert fingerprint(vol.image) == before

    attach(home, "db", "data")
    with pytest.raises(VolumeInUse, match="machines 'db', 'web' use it"):
        remove(vols, "data")

    config.unlink()
    (home / "machines" / "db" / "config.json").unlink()
    remove(vols, "data")
    assert not vol.path.exists()
    assert leftovers(home) == []
    with pytest.raises(NotFoundError):
        vols.get("data")


def test_remove_of_a_missing_volume(vols):
    with pytest.raises(NotFoundError, match="no volume named 'ghost'"):
        remove(vols, "ghost")


# --- CLI -------------------------------------------------------------------------------


@pytest.fixture
def cli(home):
    """Run `pinnace volume ARGS...` on the store at ``home``."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, ["volume", *args], env={"PINNACE_HOME": str(home)})

    return invoke


def test_cli_create_ls_inspect_rm(cli, home):
    r = cli("create", "data", "--size", "1G")
    assert r.exit_code == 0, r.output
    assert r.stdout == "data\n"
    r = cli("create", "scratch", "--size", "64", "--no-journal")
    assert r.exit_code == 0, r.output
    attach(home, "web", "data")

    r = cli("ls")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "USED", "JOURNAL", "ATTACHED-TO"]
    assert lines[1].split()[:2] == ["data", "1G"] and lines[1].split()[3:] == ["yes", "web"]
    assert lines[2].split()[:2] == ["scratch", "64M"] and lines[2].split()[3:] == ["no", "-"]

    r = cli("ls", "--json")
    rows = json.loads(r.stdout)
    assert [(v["name"], v["size"], v["journal"], v["attached_to"]) for v in rows] == [
        ("data", 1 << 30, True, ["web"]), ("scratch", 64 * MiB, False, [])]
    assert all(0 < v["used"] < v["size"] for v in rows)
    assert json.loads(cli("ls", "--format", "json").stdout) == rows
    assert cli("ls", "-q").stdout == "data\nscratch\n"

    r = cli("inspect", "data")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    meta = json.loads((home / "volumes" / "data" / "volume.json").read_text())
    assert info.items() >= meta.items()
    assert info["path"] == str(home / "volumes" / "data")
    assert info["image"] == str(home / "volumes" / "data" / "volume.ext4")
    assert info["used"] == os.stat(info["image"]).st_blocks * 512
    assert info["attached_to"] == ["web"]

    r = cli("rm", "data", "scratch", "ghost")
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("pinnace: error:")]
    assert len(errors) == 2
    assert "'web'" in errors[0] and "recreate it without the volume" in errors[0]
    assert "no volume named 'ghost'" in errors[1]
    assert "scratch: removed" in r.stderr
    assert cli("ls", "-q").stdout == "data\n"

    (home / "machines" / "web" / "config.json").unlink()
    r = cli("rm", "data")
    assert r.exit_code == 0, r.output
    assert cli("ls", "--json").stdout.strip() == "[]"


def test_cli_errors_are_one_line(cli):
    for args, words in ((("create", "data", "--size", "ten gigs"), "invalid volume size"),
                        (("create", "data", "--size", "1M"), "at least 16M"),
                        (("inspect", "ghost"), "no volume named 'ghost'")):
        r = cli(*args)
        assert r.exit_code == 1
        assert r.output.count("\n") == 1 and words in r.output
    r = cli("create", "data")
    assert r.exit_code == 2 and "--size" in r.output


def test_cli_help_has_examples():
    for name in volume.commands:
        r = CliRunner().invoke(volume, [name, "--help"])
        assert r.exit_code == 0 and "Example" in r.output, name


# --- labels and copies ----------------------------------------------------------------


def test_labels_are_kept_and_a_copy_has_the_sources_size_and_data(vols, home):
    src = create(vols, "src", "64M", labels={"pinnace.ci.cache": "pip", "k": "v"})
    assert src.labels == {"pinnace.ci.cache": "pip", "k": "v"}
    with open(src.image, "r+b") as f:  # some data past the filesystem's first blocks
        f.seek(40 * MiB)
        f.write(b"cached bytes")
    copy = create(vols, "copy", 0, source="src", ephemeral=True)
    assert (copy.size, copy.journal, copy.labels) == (src.size, src.journal, {})
    assert copy.image.read_bytes() == src.image.read_bytes()
    assert copy.image.stat().st_blocks <= src.image.stat().st_blocks + 64  # holes kept
    assert (home / "volumes" / "copy" / "owner").exists()
    assert vols.get("src").labels == src.labels  # the source is untouched
    assert leftovers(home) == []


def test_copying_a_missing_volume_is_not_found_and_makes_nothing(vols, home):
    with pytest.raises(NotFoundError):
        create(vols, "copy", 0, source="nope")
    assert not (home / "volumes" / "copy").exists()


@pytest.mark.parametrize("labels", [[1, 2], {"a": 1}, "x"])
def test_bad_labels_in_volume_json_are_damage(vols, home, labels):
    create(vols, "v", "16M")
    meta = home / "volumes" / "v" / "volume.json"
    data = json.loads(meta.read_text())
    write_json(meta, {**data, "labels": labels})
    with pytest.raises(VolumeError, match="bad labels"):
        vols.get("v")


def test_removing_only_if_its_owner_is_still_the_one_seen(vols, home):
    create(vols, "v", "16M", ephemeral=True)
    seen = (home / "volumes" / "v" / "owner").read_text().strip()
    with pytest.raises(NotFoundError):
        asyncio.run(vols.remove("v", owner="1 2"))  # another process took it meanwhile
    assert vols.get("v")
    asyncio.run(vols.remove("v", owner=seen))
    assert vols.list() == []
