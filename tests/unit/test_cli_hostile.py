"""Hostile input for the CLI: every verb, fed names, sizes, paths, ports, subnets, image
references and counts that a careless or malicious caller might give.

Each example runs ``pinnace ...`` in-process (CliRunner) on a store of its own under a
fresh PINNACE_HOME that holds a few objects (a fake image, machines at rest, a volume, a
network, a snapshot), so hostile names meet real ones. Nothing boots: the functions that
would start QEMU (or probe KVM with it) are replaced for the whole module by ones that
raise ``WouldBoot``; an example that gets that far had valid input and is discarded.
(mkfs is replaced by /bin/true too: volumes that are made need not be formatted.)

Every verb is checked for four properties, each its own test so a failure reads alone:

* ``no_traceback``   no exception other than SystemExit escapes; no 'Traceback' printed.
* ``one_line_error`` a pinnace error (exit 1) prints one line; exit 0 prints no error;
                     a non-zero exit prints something.
* ``one_line_usage`` a click usage error (exit 2) prints one line as well.
* ``store_unchanged`` a failed command (exit != 0) leaves the tree under PINNACE_HOME as it
                     was (relative paths, sizes, and contents of files up to 1 MiB; the
                     contents of locks/ and cache/ are not compared).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, note, reject, settings
from hypothesis import given as _given
from hypothesis import strategies as st

from pinnace.backends.qemu import command as qcmd
from pinnace.cli import main
from pinnace.config import MachineConfig, Mount, Nic
from pinnace.store import Store

# --- no QEMU, ever ----------------------------------------------------------------------


class WouldBoot(BaseException):
    """Raised where pinnace would start QEMU (the input was valid: not a failure); a
    BaseException so that nothing on the way swallows it."""


def _would_boot(*args: object, **kwargs: object) -> None:
    raise WouldBoot(args[:1])


@pytest.fixture(scope="module", autouse=True)
def no_qemu() -> Iterator[None]:
    from pinnace import volumes
    from pinnace.backends.qemu import host, process

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host, "choose_accel", _would_boot)
        mp.setattr(host, "probe_kvm", _would_boot)
        mp.setattr(process, "launch", _would_boot)
        # A snapshot key holds QEMU's version; do not run `qemu --version` for it.
        mp.setattr(host, "cached_qemu_version", lambda *a, **k: "QEMU emulator version 0-fake")
        # A volume that is made is not formatted (a valid 16T one would take a while).
        mp.setattr(volumes, "mkfs_binary", lambda: "/bin/true")
        mp.setenv("PINNACE_DEFAULT_NET", "restricted")
        yield


# --- the store every example starts from --------------------------------------------------

DIGEST = "ab12" * 16
MACHINES = ("vm1", "vm2", "vm3")  # vm1 created; vm2 stopped on net1 with vol1; vm3 from snap1


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def _json(path: Path, obj: object) -> None:
    _write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _machine(home: Path, cfg: MachineConfig, state: str, **extra: object) -> None:
    d = home / "machines" / cfg.name
    _json(d / "config.json", cfg.to_dict())
    _json(d / "state.json", {"state": state, "reason": "", **extra})
    _write(d / "disk.qcow2", b"")
    _write(d / "events.jsonl", json.dumps({"time": 0, "event": "created"}) + "\n")


def build_store(home: Path) -> None:
    Store(home).ensure()
    # An image (not bootable: nothing boots here), named img.
    _write(home / "refs" / "images" / "img", DIGEST + "\n")
    img = home / "images" / DIGEST
    _json(img / "image.json", {"digest": DIGEST, "created": 0, "kernel_version": "6.1.0",
                               "packages": []})
    for f in ("vmlinux", "initrd.img"):
        _write(img / f, b"\0" * 512)
    with open(img / "rootfs.ext4", "wb") as f:
        f.truncate(1 << 20)
    # A volume (an unformatted sparse file is enough: nothing mounts it).
    vol = home / "volumes" / "vol1"
    _json(vol / "volume.json", {"name": "vol1", "size": 16 << 20, "journal": True,
                                "created": 0, "label": "vol1"})
    with open(vol / "volume.ext4", "wb") as f:
        f.truncate(16 << 20)
    # A network.
    _json(home / "networks" / "net1" / "network.json",
          {"name": "net1", "subnet": "10.77.0.0/24", "created": 0})
    (home / "networks" / "net1" / "ports").mkdir()
    # A snapshot whose files match its checksums.
    snap = home / "snapshots" / "snap1"
    files = {}
    for fname in ("memory", "state", "disk.qcow2", "clone.qcow2"):
        data = f"{fname}\n".encode()
        _write(snap / fname, data)
        files[fname] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    key = {"image_digest": DIGEST, "cpus": 1, "memory_mib": 512,
           "devices": qcmd.devices_key(True, 0, 0, 0), "nics": 1,
           "qemu": "QEMU emulator version 0-fake", "accel": "tcg",
           "cpu_model": qcmd.CPU_MODEL["tcg"], "format": 4}
    _json(snap / "snapshot.json", {"image": "img", "key": key, "source": "vm1", "created": 0,
                                   "files": files, "macs": {"nat": "", "nics": []}})
    # Machines at rest.
    _machine(home, MachineConfig.build(name="vm1", image="img", image_digest=DIGEST,
                                       net="restricted", nat_mac="52:54:00:00:00:01"),
             "created")
    _machine(home, MachineConfig.build(
        name="vm2", image="img", image_digest=DIGEST, net="none",
        nics=[Nic("52:54:00:00:00:02", "net1", "10.77.0.2/24")],
        volumes=[Mount("vol1", "/data")]), "stopped")
    _write(home / "machines" / "vm2" / "serial.log", "line 1\nline 2\nline 3\n")
    _machine(home, MachineConfig.build(name="vm3", image="img", image_digest=DIGEST,
                                       net="restricted", nat_mac="52:54:00:00:00:03",
                                       snapshot="snapshots/snap1"), "created")


def build_cwd(cwd: Path) -> None:
    """The working directory commands run in: host folders for --share and cp."""
    for d in ("shared", "with,comma", "with:colon", "sp ace", "-dash", "\u00fcn\u00ef"):
        (cwd / d).mkdir(parents=True)
    _write(cwd / "file.txt", "hello\n")


def tree(home: Path) -> dict[str, tuple[str, int, str]]:
    """Relative path -> (kind, size, digest of contents up to 1 MiB) for everything under
    home; what is inside locks/ and cache/ is left out."""
    out: dict[str, tuple[str, int, str]] = {}
    if not home.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(home):
        rel = Path(dirpath).relative_to(home)
        if rel.parts and rel.parts[0] in ("locks", "cache"):
            dirnames[:] = []
            continue
        for d in dirnames:
            out[str(rel / d)] = ("dir", 0, "")
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_symlink():
                out[str(rel / f)] = ("link", 0, os.readlink(p))
                continue
            size = p.stat().st_size
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if size <= 1 << 20 else ""
            out[str(rel / f)] = ("file", size, digest)
    return out


def tree_diff(before: dict[str, tuple[str, int, str]],
              after: dict[str, tuple[str, int, str]]) -> list[str]:
    lines = [f"+ {p}" for p in sorted(set(after) - set(before))]
    lines += [f"- {p}" for p in sorted(set(before) - set(after))]
    lines += [f"~ {p} {before[p][:2]} -> {after[p][:2]}" for p in sorted(set(before) & set(after))
              if before[p] != after[p]]
    return lines


# --- running one command ------------------------------------------------------------------

_CLICK = tuple(int(x) for x in importlib.metadata.version("click").split(".")[:2])
# Click 8.2 dropped mix_stderr: stdout and stderr are always kept apart, and
# result.output is both, interleaved as a terminal would show them.
RUNNER_ARGS: dict[str, object] = {} if _CLICK >= (8, 2) else {"mix_stderr": False}

# About 40 examples a test keeps the module under a minute; raise it to hunt for more.
EXAMPLES = int(os.environ.get("PINNACE_HOSTILE_EXAMPLES", "20"))
PROPERTIES = ("no_traceback", "one_line_error", "one_line_usage", "store_unchanged")


def sh_quote(arg: str) -> str:
    """``arg`` quoted for bash; with control characters or surrogate escapes (bytes that
    are not UTF-8), as $'...' so that the command line can be pasted."""
    if all(c.isprintable() and not 0xDC80 <= ord(c) <= 0xDCFF for c in arg):
        return shlex.quote(arg)
    out = []
    for c in arg:
        if 0xDC80 <= ord(c) <= 0xDCFF:
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}")
    return "$'" + "".join(out) + "'"


def controls(text: str) -> list[str]:
    """The control characters in output (a tab or a newline is fine): a \r or an escape
    sequence lets input rewrite what the terminal shows."""
    return sorted({repr(c) for c in text if not c.isprintable() and c not in "\t\n"})


class Outcome:
    def __init__(self, args: list[str], result: object, before: dict[str, tuple[str, int, str]],
                 after: dict[str, tuple[str, int, str]]) -> None:
        self.args = args
        self.result = result
        self.exit_code: int = result.exit_code  # type: ignore[attr-defined]
        self.exception: BaseException | None = result.exception  # type: ignore[attr-defined]
        self.stdout: str = result.stdout  # type: ignore[attr-defined]
        self.stderr: str = result.stderr  # type: ignore[attr-defined]
        self.output = (result.output  # type: ignore[attr-defined]
                       if _CLICK >= (8, 2) else self.stdout + self.stderr)
        self.before, self.after = before, after

    @property
    def command(self) -> str:
        return "pinnace " + " ".join(sh_quote(a) for a in self.args)

    def describe(self) -> str:
        text = f"$ {self.command}\nexit {self.exit_code}"
        if self.exception is not None and not isinstance(self.exception, SystemExit):
            import traceback

            # The innermost frames say where; click's and asyncio's only how it got there.
            tb = "".join(traceback.format_exception(self.exception, limit=-6))
            text += f", raised {type(self.exception).__name__}: {self.exception}\n{tb}"
        output = self.output if self.output.endswith("\n") or not self.output else \
            self.output + "\n"
        return text + "\n--- output ---\n" + output + "--------------"

    @property
    def crashed(self) -> bool:
        return self.exception is not None and not isinstance(self.exception, SystemExit)


# Stores are many small files: build them in memory where the host has a tmpfs.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def invoke(args: list[str]) -> Outcome:
    """Run ``pinnace ARGS`` on a fresh store, in a fresh working directory."""
    with tempfile.TemporaryDirectory(prefix="pn-hostile-", dir=SCRATCH) as tmp:
        home, cwd = Path(tmp) / "home", Path(tmp) / "cwd"
        build_store(home)
        build_cwd(cwd)
        return invoke_in(home, cwd, args)


def invoke_in(home: Path, cwd: Path, args: list[str]) -> Outcome:
    before = tree(home)
    # Each invocation adds a handler to the 'pinnace' logger (the real CLI runs once per
    # process); drop the last run's, which writes to a stream that is gone.
    for name in ("pinnace", "qemu"):
        logging.getLogger(name).handlers.clear()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        runner = CliRunner(**RUNNER_ARGS)  # type: ignore[arg-type]
        result = runner.invoke(main, args, env={"PINNACE_HOME": str(home)},
                               prog_name="pinnace")
    except WouldBoot:  # CliRunner catches Exception only
        reject()  # valid input: it got as far as starting QEMU, which we never do
    finally:
        os.chdir(old)
    if isinstance(result.exception, WouldBoot):
        reject()
    out = Outcome(args, result, before, tree(home))
    note(out.describe())
    return out


def check(prop: str, o: Outcome) -> None:
    """Assert property ``prop`` of one outcome, with the command line in the message."""
    # Lines as a terminal shows them: a stray \r or escape sequence in a line is reported
    # as such rather than counted.
    lines = [ln for ln in o.output.split("\n") if ln.strip()]
    if prop == "no_traceback":
        assert not o.crashed, f"uncaught {type(o.exception).__name__}:\n{o.describe()}"
        assert "Traceback" not in o.output, f"a traceback was printed:\n{o.describe()}"
        return
    if o.crashed:
        return  # no_traceback reports it
    if prop == "one_line_error":
        if o.exit_code == 0:
            assert "error:" not in o.stderr, f"an error, but exit 0:\n{o.describe()}"
        elif o.exit_code != 2:
            assert lines, f"exit {o.exit_code} but nothing printed:\n{o.describe()}"
            assert len(lines) == 1, f"error takes {len(lines)} lines:\n{o.describe()}"
            assert not controls(o.output.rstrip("\n")), (
                f"error has control characters {controls(o.output.rstrip())}:\n{o.describe()}")
    elif prop == "one_line_usage":
        if o.exit_code == 2:
            assert len(lines) == 1, f"usage error takes {len(lines)} lines:\n{o.describe()}"
            assert not controls(o.output.rstrip("\n")), (
                f"usage error has control characters {controls(o.output.rstrip())}:\n"
                f"{o.describe()}")
    elif prop == "store_unchanged":
        if o.exit_code != 0:
            diff = tree_diff(o.before, o.after)
            assert not diff, ("failed command changed the store:\n" + "\n".join(diff)
                              + "\n" + o.describe())
    else:
        raise AssertionError(prop)


def given(*args: object, examples: tuple[list[str], ...] = (),  # type: ignore[no-untyped-def]
          **kwargs: object):
    """hypothesis.given with this module's settings, parametrised over the properties;
    ``examples`` are command lines always tried (inputs known to have found a problem)."""

    def wrap(fn):  # type: ignore[no-untyped-def]
        for known in examples:
            fn = example(args=known)(fn)
        fn = settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                             HealthCheck.data_too_large])(
            _given(*args, **kwargs)(fn))
        return pytest.mark.parametrize("prop", PROPERTIES)(fn)

    return wrap


# --- hostile values -----------------------------------------------------------------------

_NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
_CONTROL = st.characters(min_codepoint=1, max_codepoint=31) | st.sampled_from(
    ["\x7f", "\x85", "\u2028", "\u2029", "\x1b"])


def hostile(table: list[str], *more: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """The hand-picked values in ``table`` (drawn about as often as all of ``more``
    together), or values from ``more``."""
    return st.one_of(*[st.sampled_from(table)] * max(1, len(more)), *more)


# Non-ASCII values are spelled as escapes: fullwidth, Arabic-Indic and superscript digits,
# mathematical bold digits, zero-width and bidi characters, CJK, emoji.
HOSTILE_NAMES = [
    "", ".", "..", "...", "/", "//", "../vm1", "vm1/..", "a/b", "/etc/passwd", "../../etc",
    "-", "--", "-x", "-f", "-h", "--help", "--force", "--size=1G",
    " ", " vm1", "vm1 ", "a b", "\t", "a\nb", "\n", "\r", "\x1b[2J", "\x7f", "\x01",
    "$(touch pwned)", "`id`", "a;id", "a|b", "a&b", "a>b", "*", "?", "[a]", "~", "~/x", "'",
    '"', "\\", "%s%n", "{}", "{0}",
    "\u00e9", "vm1\u00e9", "\u540d\u524d", "\U0001f600", "\uff41\uff42\uff43", "\u216b",
    "\u200b", "a\u200bb", "\u202evm1", "\ufeffvm1",
    "\udcff", "vm\udce9",  # bytes that are not UTF-8 reach argv as surrogate escapes
    "a" * 63, "a" * 64, "a" * 255, "a" * 256, "a" * 5000, "0", "-1", "9" * 30,
    "vm1", "VM1", "vm2", "vm3", "img", "vol1", "net1", "snap1", "default", "x", "ghost",
    ".hidden", "_x", "x.", "x-", "x..y", "locks", "tmp", "cache", "machines", "con", "nul",
]
names = hostile(
    HOSTILE_NAMES,
    st.text(_NO_NUL, max_size=40),
    st.text(_CONTROL, min_size=1, max_size=5),
    st.tuples(st.sampled_from(HOSTILE_NAMES), st.sampled_from(HOSTILE_NAMES)).map("".join),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True),
)

SIZES = [
    "", " ", "0", "00", "-0", "-1", "-512M", "+512M", "1e9", "1E3G", "1e400", "abcG", "G", "M",
    "0.0001M", "0.5", "0.9K", "1K", "127", "128", "128M", "127.9M", "1.5G", "   2G  ", "2G\n",
    "512 M", "512MB", "512MiB", "512mib", "512Mi", "1P", "1Z", "16T", "16T1", "16.0001T",
    "99999999T", "9" * 30, "9" * 400, "1" * 5000 + "T", "inf", "nan", "Infinity", "-inf",
    "1_000", "0x10", "0b1", "\u0661\u0662\u0668M", "\uff15\uff11\uff12M", "\u00b2",
    "\U0001d7d3\U0001d7cf\U0001d7d0M", "1G;id", "--memory", "-m", "1.G",
    ".5G", "1..5G", "1,5G", "1 000M", "\t1G", "\n",
]
sizes = hostile(
    SIZES,
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.from_regex(r"[-+]?[0-9]{0,25}(\.[0-9]{0,8})?[kKmMgGtTpP]?(i?[bB])?", fullmatch=True),
    st.text(_NO_NUL, max_size=12),
)

PORTS = [
    "", "0:80", "80:0", "65536:80", "80:65536", "65535:65535", "-1:80", "80:-1", "a:b", "1:2:3:4",
    "80", "80:80/sctp", "80:80/", "80:80/udp", "80:80/UDP", "80:80/tcp/udp", "/udp", ":", "::",
    ":80", "80:", "1.2.3.4:80:80", "999.1.1.1:80:80", "::1:80:80", "[::1]:80:80",
    "localhost:80:80", "0.0.0.0:80:80", "127.0.0.1:80:80", ":80:80", "\u00b2:80", "80:\u00b2",
    "\u0668\u0660:80", "\uff18\uff10:80", "9" * 5000 + ":80", "80:" + "9" * 5000,
    "9" * 30 + ":80", "08080:80", "+80:80",
    " 80:80", "80 :80", "80:80 ", "8080:80,8081:81", "1e3:80", "0x50:80", "80:80\n",
]
ports = hostile(
    PORTS,
    st.builds(lambda h, g, p: f"{h}:{g}{p}", st.integers(-10, 70000), st.integers(-10, 70000),
              st.sampled_from(["", "/tcp", "/udp", "/sctp", "/", "/TCP"])),
    st.text(st.sampled_from("0123456789:/.-audpt"), max_size=15),
    st.text(_NO_NUL, max_size=15),
)

GUEST_PATHS = [
    "/data", "data", "", "/", "/proc", "/proc/x", "/sys", "/sys/x", "/dev", "/dev/x", "/etc",
    "/bin", "/usr", "/home/u", "/tmp", "/run", "/data/", "/data/..", "/data/../etc", "//data",
    "/./data", "/a,b", "/a:b", "/a b", "/a\nb", "/\u00e9", "/" + "a" * 5000, "~/x", "./x", "../x",
]
_SHARE_HOSTS = ["shared", "./shared", "shared/", "missing", "/nonexistent", "/", "/proc", ".",
                "..", "with,comma", "with:colon", "sp ace", "-dash", "\u00fcn\u00ef", "~",
                "~nobody", "~missinguser", "", "file.txt", "shared/../shared", "/dev/null",
                "a" * 5000]
_SUFFIXES = ["", ":ro", ":rw", ":RO", ":x", "::ro"]
shares = st.one_of(
    st.builds(lambda h, g, s: f"{h}:{g}{s}", st.sampled_from(_SHARE_HOSTS),
              st.sampled_from(GUEST_PATHS), st.sampled_from(_SUFFIXES)),
    st.sampled_from(_SHARE_HOSTS),
    st.text(_NO_NUL, max_size=20),
)
volume_specs = st.one_of(
    st.builds(lambda n, g, s: f"{n}:{g}{s}", st.sampled_from(["vol1", "ghost", "", "..", "a/b",
                                                              "VOL1", "vol1 ", "-v"]),
              st.sampled_from(GUEST_PATHS), st.sampled_from(_SUFFIXES)),
    st.builds(lambda n, g: f"{n}:{g}", names, st.sampled_from(GUEST_PATHS)),
    st.text(_NO_NUL, max_size=20),
)
_IPS = ["", "10.77.0.5", "10.77.0.0", "10.77.0.1", "10.77.0.2", "10.77.0.255", "10.78.0.1",
        "abc", "::1", "10.77.0.5/8", "10.77.0.5/99", "10.77.0.5/", "999.0.0.1", "10.77.0.05",
        "10.77.0.5 ", "\u0661\u0660.77.0.5", "0", "-1", "10.77.0.5:1"]
network_specs = st.one_of(
    st.builds(lambda n, ip: f"{n}:{ip}" if ip else n,
              st.sampled_from(["net1", "ghost", "", "..", "NET1", "net1 "]),
              st.sampled_from(_IPS)),
    names,
)

SUBNETS = [
    "", "garbage", "10.77.0.0", "10.78.0.0/24", "10.78.0.1/24", "10.0.0.0/0", "0.0.0.0/0",
    "10.78.0.0/32", "10.78.0.0/31", "10.78.0.0/30", "10.78.0.0/29", "11.0.0.0/7", "11.0.0.0/8",
    "10.78.0.0/33", "10.78.0.0/-1", "10.78.0.0/", "/24", "::/0", "fd00::/64", "::1/128",
    "10.78.0.0/255.255.255.0", "10.78.0.0/0.0.0.255", "256.0.0.0/8", "10.078.0.0/24",
    "1.2.3/24", "10.78.0.0/24 ", " 10.78.0.0/24", "10.78.0.0/24\n", "10.78.0.0/\u0662\u0664",
    "10.77.128.0/25", "10.0.0.0/8", "127.0.0.0/8", "224.0.0.0/8", "169.254.0.0/16",
    "10.0.2.0/24", "10.78.0.0/24/24", "10.78.0.0/" + "9" * 30, "10.78.0.0/" + "9" * 5000,
    "\u0661\u0660.78.0.0/24", "10.78.0.0/+24", "10.78.0.0/ 24", "10.78.0.0%eth0/24",
]
subnets = hostile(
    SUBNETS,
    st.builds(lambda ip, p: f"{ip}/{p}", st.ip_addresses(v=4).map(str), st.integers(-5, 40)),
    st.ip_addresses(v=6).map(str).map(lambda a: a + "/64"),
    st.text(st.sampled_from("0123456789./:abcdef"), max_size=20),
    st.text(_NO_NUL, max_size=20),
)

IMAGE_REFS = ["", "default", "img", "ghost", "nonexistent", DIGEST, DIGEST[:6], DIGEST[:5],
              DIGEST[:12], "ab", "ab12", "ab12ab", "0" * 64, "0" * 6, "g" * 64, DIGEST + "0",
              DIGEST.upper(), DIGEST[:6].upper(), "sha256:" + DIGEST, "../images", "..", "/",
              ".", "refs", "img/..", "images/" + DIGEST, "-i", "--image"]
image_refs = st.one_of(st.sampled_from(IMAGE_REFS), names)

_INTS = ["0", "-1", "1", "2", "63", "64", "65", "256", "257", "10000", "9" * 30, "9" * 5000,
         "1.5", "abc", "", " 2", "0x2", "\u00b2", "\u0661", "\uff12", "1e3", "+3", "-0"]
ints = hostile(_INTS, st.integers(-(2**40), 2**40).map(str), st.text(_NO_NUL, max_size=6))
_FLOATS = ["0", "-1", "nan", "NaN", "inf", "-inf", "1e309", "3600", "3601", "0.0000001", "abc",
           "", "1e-400", "9" * 400, "1_0", "\u0661"]
floats = hostile(_FLOATS, st.floats().map(str), st.text(_NO_NUL, max_size=6))
texts = st.one_of(st.sampled_from(["", "a\nb", "x" * 2000, "console=ttyS1", "--", "-x"]),
                  st.text(_NO_NUL, max_size=40))


def positional(draw: st.DrawFn, values: list[str]) -> list[str]:
    """Positional arguments, sometimes after '--' so that a leading '-' reaches pinnace."""
    if draw(st.booleans()):
        return ["--", *values]
    return values


def options(draw: st.DrawFn, table: dict[str, st.SearchStrategy[str] | None],
            max_size: int = 4) -> list[str]:
    """A few options drawn from ``table`` (option -> values); None values are flags."""
    out: list[str] = []
    if not table:
        return out
    for opt in draw(st.lists(st.sampled_from(sorted(table)), max_size=max_size)):
        strat = table[opt]
        if strat is None:
            out.append(opt)
        elif draw(st.booleans()) or (opt.startswith("-") and not opt.startswith("--")):
            out += [opt, draw(strat)]
        else:
            out.append(f"{opt}={draw(strat)}")
    return out


SHAPE = {"--memory": sizes, "-m": sizes, "--cpus": ints, "-c": ints, "--boot-timeout": floats,
         "--cmdline": texts, "--accel": st.sampled_from(["auto", "kvm", "tcg", "", "KVM", "x"])}
DEVICES = {"-p": ports, "--publish": ports, "--network": network_specs, "--spare-nics": ints,
           "-v": volume_specs, "--volume": volume_specs, "--share": shares,
           "--net": st.sampled_from(["nat", "restricted", "none", "", "NAT", "bridge"])}


# --- the tests ----------------------------------------------------------------------------


@st.composite
def create_args(draw: st.DrawFn) -> list[str]:
    name = draw(st.one_of(names, st.just("new1")))
    image = draw(st.one_of(st.sampled_from(["nonexistent", "img"]), image_refs))
    opts = options(draw, {**SHAPE, **DEVICES, "--snapshot": st.one_of(st.just("snap1"), names),
                          "--image": image_refs}, max_size=5)
    return ["create", "--image", image, *opts, *positional(draw, [name])]


@given(args=create_args(), examples=(
    ["create", "--image", "img", "--memory", "9" * 400, "x1"],
    ["create", "--image", "img", "-p", "\u00b2:80", "x1"],
    ["create", "--image", "img", "-p", "9" * 5000 + ":80", "x1"],
    ["create", "--image", "img", "--share", "~nosuchuser:/data", "x1"],
    ["create", "--image", "img", "--share", "a" * 5000 + ":/data", "x1"],
    ["create", "--image", "a\rb", "x1"],
    ["create", "--image", "img", "--cpus", "two", "x1"],
))
def test_create(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def run_args(draw: st.DrawFn) -> list[str]:
    # run goes as far as starting QEMU when its input is valid; the module's no_qemu
    # fixture stops it there and such an example is discarded.
    image = draw(st.one_of(st.sampled_from(["nonexistent", "img"]), image_refs))
    opts = options(draw, {"--name": names, "-n": names, "--count": ints, "--cpus": ints,
                          "--memory": sizes, "-m": sizes, "--timeout": floats, "--rm": None,
                          **DEVICES}, max_size=5)
    command = draw(st.sampled_from([[], ["--", "true"], ["uname", "-a"], ["--"]]))
    return ["run", "--image", image, *opts, *command]


@given(args=run_args(), examples=(
    ["run", "--image", "img", "--memory", "9" * 400],
    ["run", "--image", "img", "-p", "80:\u00b2"],
    ["run", "--image", "\x1b[2J"],
    ["run", "--count", "many"],
))
def test_run(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def configure_args(draw: st.DrawFn) -> list[str]:
    name = draw(st.one_of(st.sampled_from(MACHINES), names))
    opts = options(draw, SHAPE, max_size=4)
    return ["configure", *opts, *positional(draw, [name])]


@given(args=configure_args(), examples=(
    ["configure", "--memory", "9" * 400, "vm1"],
    ["configure", "--cpus", "two", "vm1"],
))
def test_configure(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def lifecycle_args(draw: st.DrawFn) -> list[str]:
    verb = draw(st.sampled_from(["start", "stop", "halt", "kill", "delete", "status", "logs",
                                 "clone"]))
    existing = st.sampled_from(MACHINES)
    # start on a machine that exists would boot it: only hostile names for start.
    name = draw(names if verb == "start" else st.one_of(existing, names))
    tables: dict[str, dict[str, st.SearchStrategy[str] | None]] = {
        "start": {"--timeout": floats, "--no-wait": None},
        "stop": {"--timeout": floats, "--save": None},
        "delete": {"--force": None, "-f": None},
        "status": {"--format": st.sampled_from(["text", "json", "", "yaml"])},
        "logs": {"--tail": ints, "-n": ints},  # never --follow: it waits for the log
    }
    opts = options(draw, tables.get(verb, {}), max_size=2)
    pos = [name, draw(st.one_of(names, st.just("new1")))] if verb == "clone" else [name]
    return [verb, *opts, *positional(draw, pos)]


@given(args=lifecycle_args(), examples=(
    ["status", "--format", "yaml", "vm1"],
))
def test_lifecycle_verbs(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def exec_args(draw: st.DrawFn) -> list[str]:
    name = draw(st.one_of(st.sampled_from(MACHINES), names))
    opts = options(draw, {"-e": texts, "--env": texts, "-w": texts, "--workdir": texts,
                          "-u": texts, "-t": floats, "-i": None}, max_size=3)
    command = draw(st.sampled_from([["--", "true"], ["--"], [], ["uname", "-a"],
                                    ["--", "sh", "-c", "exit 7"], ["-x"]]))
    return ["exec", *opts, name, *command]


@given(args=exec_args(), examples=(
    ["exec", "vm1"],
))
def test_exec(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


_CP_SIDES = ["vm1:/tmp/x", "vm1:tmp", "vm1:", "ghost:/x", ":/x", "vm1:/proc/x", "file.txt",
             "missing.txt", "shared", "./shared", "with:colon", "with,comma/", "/nonexistent",
             "..", "/", "-", "vm2:/x", "a/b:/x", "\u540d\u524d:/x", "vm1:/" + "a" * 5000]
cp_sides = st.one_of(st.sampled_from(_CP_SIDES),
                     st.builds(lambda n, p: f"{n}:{p}", names, st.sampled_from(GUEST_PATHS)),
                     st.text(_NO_NUL, max_size=20))


@given(args=st.tuples(cp_sides, cp_sides, st.booleans()).map(
    lambda t: ["cp", *(["--"] if t[2] else []), t[0], t[1]]), examples=(
    ["cp", "file.txt", "file2.txt"],
))
def test_cp(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def volume_create_args(draw: st.DrawFn) -> list[str]:
    name = draw(st.one_of(names, st.just("new1")))
    size = draw(sizes)
    extra = draw(st.sampled_from([[], ["--no-journal"], ["--journal"]]))
    size_opt = [f"--size={size}"] if draw(st.booleans()) else ["--size", size]
    return ["volume", "create", *size_opt, *extra, *positional(draw, [name])]


@given(args=volume_create_args(), examples=(
    ["volume", "create", "--size", "9" * 400, "v1"],
    ["volume", "create", "v1"],
))
def test_volume_create(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def one_name_args(draw: st.DrawFn, group: str, verbs: list[str], existing: list[str]
                  ) -> list[str]:
    verb = draw(st.sampled_from(verbs))
    name = draw(st.one_of(st.sampled_from(existing), names))
    extra = ["--verify"] if verb == "inspect" and group == "snapshot" and draw(
        st.booleans()) else []
    return [group, verb, *extra, *positional(draw, [name])]


@given(args=one_name_args("volume", ["rm", "inspect"], ["vol1", "ghost"]), examples=(
    ["volume", "rm"],
))
def test_volume_rm_inspect(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def network_create_args(draw: st.DrawFn) -> list[str]:
    name = draw(st.one_of(names, st.just("new1"), st.just("net1")))
    subnet = draw(subnets)
    sub = [f"--subnet={subnet}"] if draw(st.booleans()) else ["--subnet", subnet]
    return ["network", "create", *sub, *positional(draw, [name])]


@given(args=network_create_args(), examples=(
    ["network", "create", "n2"],
))
def test_network_create(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def network_other_args(draw: st.DrawFn) -> list[str]:
    verb = draw(st.sampled_from(["rm", "inspect", "connect", "disconnect"]))
    net = draw(st.one_of(st.just("net1"), names))
    if verb in ("rm", "inspect"):
        return ["network", verb, *positional(draw, [net])]
    machine = draw(st.one_of(st.sampled_from(MACHINES), names))
    opts = ["--ip", draw(st.sampled_from(_IPS))] if verb == "connect" and draw(
        st.booleans()) else []
    return ["network", verb, *opts, *positional(draw, [net, machine])]


@given(args=network_other_args(), examples=(
    ["network", "connect", "net1"],
))
def test_network_rm_inspect_connect(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def snapshot_args(draw: st.DrawFn) -> list[str]:
    verb = draw(st.sampled_from(["create", "rm", "inspect"]))
    if verb == "create":
        machine = draw(st.one_of(st.sampled_from(MACHINES), names))
        name = draw(st.one_of(names, st.just("new1")))
        return ["snapshot", "create", *positional(draw, [machine, name])]
    return draw(one_name_args("snapshot", [verb], ["snap1", "ghost"]))


@given(args=snapshot_args(), examples=(
    ["snapshot", "create", "vm1"],
))
def test_snapshot(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@given(args=st.tuples(st.sampled_from(["inspect", "rm"]), image_refs, st.booleans()).map(
    lambda t: ["image", t[0], *(["--"] if t[2] else []), t[1]]), examples=(
    ["image", "inspect", "--", "a\nb"],
    ["image", "rm", "--", "\x1b[2J"],
    ["image", "rm"],
))
def test_image_inspect_rm(prop: str, args: list[str]) -> None:
    check(prop, invoke(args))


@st.composite
def multi_name_args(draw: st.DrawFn) -> list[str]:
    """Verbs that take several names, given existing names and hostile ones together."""
    group, verb, existing = draw(st.sampled_from([
        ([], "delete", MACHINES), ([], "stop", MACHINES), ([], "halt", MACHINES),
        (["volume"], "rm", ["vol1"]), (["network"], "rm", ["net1"]),
        (["snapshot"], "rm", ["snap1"]), (["image"], "rm", ["img"]),
    ]))
    these = draw(st.lists(st.one_of(st.sampled_from(list(existing)), names), min_size=2,
                          max_size=3))
    flags = ["--force"] if verb == "delete" and draw(st.booleans()) else []
    return [*group, verb, *flags, *positional(draw, these)]


@given(args=multi_name_args(), examples=(
    ["delete", "vm1", "../x"],
    ["volume", "rm", "vol1", "ghost"],
    ["delete", "vm1", "-x"],
))
def test_multi_name_verbs(prop: str, args: list[str]) -> None:
    """A verb given several names acts on each in turn: one line per name (what it did, or
    its error), exit 1 if any failed; only what was reported done changed the store."""
    o = invoke(args)
    if prop == "no_traceback" or o.exit_code == 2:  # a usage error: nothing was done
        check(prop, o)
        return
    if o.crashed:
        return
    asked_help = bool({"-h", "--help"} & set(args[:args.index("--")] if "--" in args else args))
    if asked_help:  # a "name" that is -h before any '--': the verb's help, nothing done
        assert o.exit_code == 0 and o.output.startswith("Usage:"), o.describe()
        assert not tree_diff(o.before, o.after), o.describe()
        return
    lines = [ln for ln in o.output.split("\n") if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("pinnace: error: ")]
    done = [ln for ln in lines if not ln.startswith("pinnace: error: ")]
    if prop == "one_line_error":
        assert (o.exit_code != 0) == bool(failed), o.describe()
        assert not controls(o.output.rstrip("\n")), o.describe()
        for ln in done:  # "NAME: stopped", "NAME: removed (digest)", ...
            assert ": " in ln, o.describe()
    elif prop == "store_unchanged":
        changed = tree_diff(o.before, o.after)
        if not done:
            assert not changed, o.describe() + "\n" + "\n".join(changed)
        for entry in changed:  # each change belongs to a name reported done
            assert any(ln.split(":", 1)[0] in entry for ln in done), (
                o.describe() + "\n" + "\n".join(changed))


# --- a store that is empty, or holds only machines -------------------------------------------


def build_sparse_store(home: Path) -> None:
    """A store as a first machine leaves it: the skeleton, an image and two machines at
    rest; no volumes/, networks/ or snapshots/ yet."""
    build_store(home)
    for d in ("volumes", "networks", "snapshots", "machines/vm3"):
        shutil.rmtree(home / d)


@st.composite
def fresh_home_args(draw: st.DrawFn) -> list[str]:
    """Commands that fail on a store with little or nothing in it."""
    name = draw(st.one_of(st.just("new1"), names))
    machine = draw(st.sampled_from(["vm1", "vm2", "ghost"]))
    return draw(st.sampled_from([
        ["create", "--image", draw(image_refs), "--", name],
        ["create", "--image", "img", *options(draw, {**SHAPE, **DEVICES}), "--", name],
        ["run", "--image", draw(image_refs)],
        ["volume", "create", "--size", draw(sizes), "--", name],
        ["network", "create", "--subnet", draw(subnets), "--", name],
        ["network", "connect", "--", name, machine],
        ["snapshot", "create", "--", machine, name],
        ["volume", "rm", "--", name], ["network", "rm", "--", name],
        ["snapshot", "rm", "--", name], ["image", "rm", "--", draw(image_refs)],
        ["delete", "--", name], ["configure", "--memory", draw(sizes), "--", machine],
    ]))


@pytest.mark.parametrize("flavour", ["empty", "sparse"])
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@_given(args=fresh_home_args())
@example(args=["create", "--image", "nonexistent", "new1"])
@example(args=["snapshot", "create", "vm1", "new1"])
def test_failed_commands_leave_a_young_store_as_it_was(flavour: str, args: list[str]) -> None:
    """On a PINNACE_HOME that is an empty directory, or that holds machines but none of
    the directories other objects live in, a failed command creates nothing. (The
    locks/ and cache/ directories themselves may appear.)"""
    with tempfile.TemporaryDirectory(prefix="pn-hostile-", dir=SCRATCH) as tmp:
        home, cwd = Path(tmp) / "home", Path(tmp) / "cwd"
        if flavour == "empty":
            home.mkdir()
        else:
            build_sparse_store(home)
        build_cwd(cwd)
        o = invoke_in(home, cwd, args)
    if o.crashed or o.exit_code == 0:
        return  # no_traceback reports a crash; a command that worked may change the store
    diff = [d for d in tree_diff(o.before, o.after) if d not in ("+ locks", "+ cache")]
    assert not diff, "failed command changed the store:\n" + "\n".join(diff) + "\n" + \
        o.describe()
