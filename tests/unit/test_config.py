import pytest
from hypothesis import given
from hypothesis import strategies as st

from pinnace.config import MachineConfig, format_size, parse_size
from pinnace.errors import ConfigError


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("64k", 64 << 10),
    ("256", 256 << 20), (" 1 g ", 1 << 30), (128, 128 << 20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "-1G", "0", "1X", "1.2.3M", True])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError) as exc:
        parse_size(bad, "memory")
    assert "memory" in str(exc.value)


@given(st.integers(min_value=1, max_value=1 << 50))
def test_format_size_round_trips_whole_units(n):
    text = format_size(n)
    if "." not in text and not text.endswith("B"):
        assert parse_size(text) == n


def test_defaults():
    cfg = MachineConfig.build(name="vm1")
    assert (cfg.cpus, cfg.memory_mib, cfg.image, cfg.accel) == (1, 512, "default", "auto")


@pytest.mark.parametrize(("values", "field"), [
    ({"name": "-bad"}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": "x" * 64}, "name"),
    ({"name": "ok", "cpus": 0}, "cpus"),
    ({"name": "ok", "cpus": 1000}, "cpus"),
    ({"name": "ok", "memory": "64M"}, "memory"),
    ({"name": "ok", "memory": "100T"}, "memory"),
    ({"name": "ok", "memory": "lots"}, "memory"),
    ({"name": "ok", "cmdline": "a\nb"}, "cmdline"),
    ({"name": "ok", "boot_timeout": -1}, "boot_timeout"),
    ({"name": "ok", "accel": "hvf"}, "accel"),
    ({"name": "ok", "colour": "red"}, "colour"),
])
def test_invalid_config_names_the_field(values, field):
    with pytest.raises(ConfigError) as exc:
        MachineConfig.build(**values)
    assert exc.value.field == field
    assert "\n" not in str(exc.value)


def test_with_changes_validates():
    cfg = MachineConfig.build(name="vm1", memory="1G")
    assert cfg.with_changes(cpus=2).cpus == 2
    assert cfg.with_changes(memory="2G").memory_mib == 2048
    assert cfg.with_changes(cpus=None).cpus == 1
    with pytest.raises(ConfigError):
        cfg.with_changes(memory="1M")
