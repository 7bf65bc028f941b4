"""pinnace's pytest plugin: a fresh machine per test, its evidence on failure, nothing
left behind.

Loaded through the ``pytest11`` entry point when pinnace is installed (``-p no:pinnace``
turns it off). Fixtures: ``pinnace`` (session: the client), ``vm`` (a fresh machine per
test, restored from its image's ready snapshot), ``vm_factory``, ``network_factory``,
``volume_factory`` and ``vm_host`` (a testinfra Host for ``vm``). Marker:
``@pytest.mark.pinnace(image=..., cpus=..., memory=..., net=...)``. See docs/pytest.md.

How nothing is left behind: everything a session makes is ephemeral, owned by the
session's process ("PID STARTTIME": :class:`pinnace.store.Owned`). A test's fixtures
delete what they made at its teardown; at the session's end everything the process
still owns goes too (a machine a Ctrl-C caught half made, say); what a session killed
outright (SIGKILL) leaves is removed by its reaper (:mod:`pinnace.reaper`) as soon as
it dies, or, if the reaper died too, by the next session before it makes anything (and
by ``pinnace gc``). Under pytest-xdist each worker is its own owner, with
its own machine names; the ready snapshot is built once for all (under its lock).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import reaper

if TYPE_CHECKING:
    from .client import Machine, Pinnace
    from .network.networks import Network
    from .volumes import Volume

FIXTURES = frozenset({"pinnace", "vm", "vm_factory", "network_factory", "volume_factory",
                      "vm_host"})
# What the marker (and an indirect parameter of `vm`) may set.
VM_OPTIONS = ("image", "cpus", "memory", "net", "timeout")
KEEP = ("never", "failed", "always")
CONSOLE_LINES = 30  # of each machine's serial console, in a failed test's report
COMMANDS_SHOWN = 10  # of its last commands
ARTIFACT_MAX = 16 << 20  # bytes of any one log copied into the artifacts folder
DMESG_TIMEOUT = 5.0

SESSION = pytest.StashKey["PinnaceSession"]()
RECORD = pytest.StashKey["TestRecord"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pinnace", "pinnace microVMs (fixtures vm, vm_factory, "
                            "network_factory, volume_factory, vm_host)")
    group.addoption("--pinnace-home", metavar="DIR",
                    help="the pinnace store (default: $PINNACE_HOME, else "
                    "~/.local/share/pinnace)")
    group.addoption("--pinnace-image", metavar="NAME",
                    help="the image of machines whose test names none (default: ini "
                    "pinnace_image, else 'default')")
    group.addoption("--pinnace-keep", choices=KEEP, metavar="never|failed|always",
                    help="keep a test's machines running after it: never (default), when "
                    "it failed, or always; the report says how to reach them")
    group.addoption("--pinnace-artifacts", metavar="DIR",
                    help="save the full logs of a failed test's machines under "
                    "DIR/<test>/<machine>/")
    group.addoption("--pinnace-timeout", type=float, metavar="SECONDS",
                    help="the longest a machine's boot or restore may take (default: "
                    "pinnace's own, 30-120 s)")
    parser.addini("pinnace_image", "the default image of pinnace's fixtures")
    parser.addini("pinnace_keep", "keep machines: never, failed or always")
    parser.addini("pinnace_artifacts", "folder for failed tests' machine logs")
    parser.addini("pinnace_timeout", "seconds a machine's boot or restore may take")


@dataclass(frozen=True)
class Settings:
    """The plugin's options: command line over ini file over defaults."""

    home: str | None
    image: str
    keep: str
    artifacts: Path | None
    timeout: float | None

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        def get(name: str) -> Any:
            value = config.getoption(f"pinnace_{name}")
            if value is None and name != "home":
                value = config.getini(f"pinnace_{name}") or None
            return value

        keep = str(get("keep") or "never")
        if keep not in KEEP:
            raise pytest.UsageError(f"pinnace_keep = {keep!r}: give never, failed or always")
        timeout = get("timeout")
        if timeout is not None:
            try:
                timeout = float(timeout)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout < 86400:
                raise pytest.UsageError(f"pinnace timeout {get('timeout')!r}: give a number "
                                        "of seconds above 0")
        artifacts = get("artifacts")
        home = get("home")
        return cls(home=str(Path(home).absolute()) if home else None,
                   image=str(get("image") or "default"), keep=keep,
                   artifacts=Path(artifacts).absolute() if artifacts else None,
                   timeout=timeout)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pinnace(image=None, cpus=None, memory=None, net=None, timeout=None): "
        "what the `vm` fixture's machine is made of. Tests that use pinnace's fixtures are "
        "marked `pinnace` (so -m 'not pinnace' skips them).")
    session = PinnaceSession(config, Settings.from_config(config))
    config.stash[SESSION] = session
    config.pluginmanager.register(Summary(config), "pinnace-summary")
    if "testinfra" in sys.modules:  # its plugin is loaded: `--hosts=pinnace://NAME` works
        from .testinfra import register

        register()


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION, None)
    if session is not None:
        session.finish()  # (the session fixture did this already, unless it never ran)


@pytest.hookimpl(tryfirst=True)  # before -m selects: tests using the fixtures are marked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("pinnace")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    session = item.config.stash.get(SESSION, None)
    if session is not None and session.notes:
        report.user_properties += [("pinnace_note", n) for n in session.notes]
        session.notes.clear()
    record = item.stash.get(RECORD, None)
    if record is None:
        return report
    if report.failed and report.when in ("setup", "call"):
        record.failed = True
        for title, text in record.evidence(item.nodeid):
            report.sections.append((title, text))
    if report.when == "teardown":
        for name, hint in record.kept:
            report.user_properties.append(("pinnace_kept", f"{name}: {hint}"))
    return report


class Summary:
    """What the end of the run says (in the controller, under xdist): machines kept, and
    what workers said. One per session (a plugin object, registered at configure)."""

    def __init__(self, config: pytest.Config) -> None:
        self.in_worker = hasattr(config, "workerinput")
        self.kept: list[str] = []
        self.notes: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # (in the controller, for every worker's report too)
        for key, value in report.user_properties:
            if key == "pinnace_kept":
                self.kept.append(f"{report.nodeid}: kept {value}")
            elif key == "pinnace_note" and not self.in_worker:
                self.notes.append(str(value))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.notes:
            terminalreporter.section("pinnace: what the workers said")
            for line in self.notes:
                terminalreporter.write_line(f"pinnace: {line}")
        if self.kept:
            terminalreporter.section("pinnace: machines kept running")
            for line in self.kept:
                terminalreporter.write_line(line)


# --- the session: one client, names, cleanup -----------------------------------------


class PinnaceSession:
    """What one pytest process (a worker, under xdist) shares between its tests: the
    client, made on first use, and the names it gives."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        # (its own worker id: an inner pytest started from a worker inherits the
        # environment variable, not the worker's input)
        workerinput = getattr(config, "workerinput", None)
        self.worker = str(workerinput.get("workerid", "")) if workerinput else ""
        self.notes: list[str] = []  # a worker's lines for the controller
        self._client: Pinnace | None = None
        self._old_sigterm: Any = None

    def say(self, text: str) -> None:
        """A line on the terminal now, even while a test's output is captured; in an
        xdist worker (whose output goes nowhere), a note the controller prints at the
        end (it comes with the next test report)."""
        if self.worker:
            self.notes.append(f"[{self.worker}] {text}")
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        quiet = capman.global_and_fixture_disabled() if capman is not None \
            else contextlib.nullcontext()
        with quiet:
            reporter.write_line(f"pinnace: {text}")

    def client(self) -> Pinnace:
        """The client; the first call also removes what dead test sessions owned."""
        if self._client is None:
            from .client import Pinnace
            from .errors import PinnaceError

            pn = Pinnace(self.settings.home)
            try:
                for removed in pn.gc(owned_only=True):
                    self.say(f"{removed}")
            except BaseException:
                pn.close()
                raise
            self._client = pn
            self._catch_sigterm()
            try:
                reaper.spawn(pn.store)
            except (OSError, PinnaceError) as exc:  # the next session, and gc, remain
                self.say(f"no reaper for this session ({exc}): if it is killed, the next "
                         "session removes its machines")
        return self._client

    def _catch_sigterm(self) -> None:
        """SIGTERM (an IDE's stop button, a CI's cancel) ends the session as Ctrl-C does,
        so that its teardown removes its machines (only if nobody else handles it)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm)

    def finish(self) -> None:
        """Remove whatever this process still owns, and close the client."""
        pn, self._client = self._client, None
        if pn is None:
            return
        try:
            for removed in pn.release():
                self.say(f"{removed} (at the session's end)")
            if not pn.release(dry_run=True):  # (else the reaper tries again)
                reaper.disarm()
        finally:
            pn.close()
            if self._old_sigterm is not None:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def name(self, item: pytest.Item, hint: str | None = None) -> str:
        """A fresh object name for ``item``: its worker, its test's name (or ``hint``),
        a random tag; short enough for a machine's socket paths."""
        prefix = f"pt{self.worker.removeprefix('gw')}"
        words = re.sub(r"[^a-z0-9]+", "-", (hint or item.name).lower()).strip("-")
        tag = secrets.token_hex(3)
        pn = self.client()
        for cut in (28, 12, 0):
            slug = words[:cut].strip("-")
            name = "-".join(p for p in (prefix, slug, tag) if p)
            if pn.store.socket_paths_fit(name):
                return name
        return name  # (the store's path is too long even so: creating says so)

    def hint(self, name: str) -> str:
        """How to reach a kept machine from a shell."""
        home = self.settings.home
        env = f"PINNACE_HOME={home} " if home and home != os.environ.get("PINNACE_HOME") \
            else ""
        return (f"'{env}pinnace shell {name}' gets a shell in it; "
                f"'{env}pinnace delete --force {name}' removes it")


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


# --- one test: what it made, its evidence, its teardown ------------------------------


@dataclass
class TestRecord:
    """What one test made, in the order made; and whether it failed."""

    __test__ = False  # (not a test class, whatever its name)

    session: PinnaceSession
    machines: list[Machine] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    failed: bool = False
    kept: list[tuple[str, str]] = field(default_factory=list)
    _saved: set[str] = field(default_factory=set)

    @property
    def keep(self) -> bool:
        mode = self.session.settings.keep
        return mode == "always" or (mode == "failed" and self.failed)

    def evidence(self, nodeid: str) -> list[tuple[str, str]]:
        """One report section per machine: its state, last commands and console; with
        --pinnace-artifacts, its full logs saved too."""
        out = []
        artifacts = self.session.settings.artifacts
        for m in self.machines:
            try:
                lines = describe(m)
            except Exception as exc:  # (the test deleted it, say): a report must not fail
                out.append((f"pinnace machine {m.name}", f"no evidence: {exc}"))
                continue
            if artifacts is not None and m.name not in self._saved:
                folder = artifacts / test_folder(nodeid) / m.name
                try:
                    save_logs(m, folder)
                    self._saved.add(m.name)
                    lines.append(f"full logs: {folder}")
                except Exception as exc:
                    lines.append(f"could not save its logs in {folder}: {exc}")
            if self.keep:
                lines.append(f"kept running: {self.session.hint(m.name)}")
            out.append((f"pinnace machine {m.name}", "\n".join(lines)))
        return out

    def teardown(self) -> None:
        """Delete what the test made (machines first: networks and volumes are removed
        once nothing uses them); or, when kept, make it all outlive the session."""
        from .errors import NotFoundError

        pn = self.session.client()
        errors: list[BaseException] = []

        def attempt(fn: Callable[[], object]) -> None:
            try:
                fn()
            except NotFoundError:
                pass  # removed by the test itself
            except Exception as exc:
                errors.append(exc)

        keep = self.keep
        for m in self.machines:
            if keep:
                before = len(errors)
                attempt(m.keep)
                if len(errors) == before:
                    self.kept.append((m.name, self.session.hint(m.name)))
            else:
                attempt(functools.partial(m.delete, force=True))
        for name in self.networks:
            attempt(functools.partial(pn.networks.keep if keep else pn.networks.remove, name))
        for name in self.volumes:
            attempt(functools.partial(pn.volumes.keep if keep else pn.volumes.remove, name))
        if errors:
            raise errors[0]


def describe(m: Machine) -> list[str]:
    """A machine's state, last commands and console tail, as report lines (the guest's
    text made printable: it is untrusted)."""
    from .errors import PinnaceError

    try:
        st = m.status()
        state = f"state: {st.state}" + (f" ({st.reason})" if st.reason else "")
    except PinnaceError as exc:
        state = f"state: unknown ({exc})"
    lines = [printable(state)]
    commands = [e for e in m.history(200) if e.get("event") == "exec"][-COMMANDS_SHOWN:]
    if commands:
        lines.append("last commands:")
        for e in commands:
            if "error" in e:
                outcome = f"error: {e['error']}"
            elif e.get("timed_out"):
                outcome = "timed out"
            else:
                outcome = f"exit {e.get('exit_code')}"
            lines.append(printable(f"  {outcome:>8}  {e.get('seconds', 0):7.2f} s  "
                                   f"{e.get('command', '')}"))
    console = m.serial_tail(CONSOLE_LINES).rstrip("\n")
    if console:
        lines.append(f"console (last {CONSOLE_LINES} lines):")
    elif m.config.snapshot:
        lines.append("console: nothing written to it since the machine was restored")
    else:
        lines.append("console: (empty)")
    lines += [printable(ln) for ln in console.splitlines()]
    return lines


def printable(text: str) -> str:
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in text)


def test_folder(nodeid: str) -> str:
    """A folder name for a test: readable, unique (a digest of the whole id)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:100]
    return f"{readable}-{hashlib.sha256(nodeid.encode()).hexdigest()[:8]}"


def save_logs(m: Machine, folder: Path) -> None:
    """Copy a machine's logs into ``folder``: console (this boot and the one before),
    events and commands, QEMU's log, config and state; and the guest's dmesg if it
    still answers. Each file is cut to its last ARTIFACT_MAX bytes."""
    from .errors import PinnaceError

    folder.mkdir(parents=True, exist_ok=True)
    files = m.aio.paths
    for src in (files.serial_log, files.prev_serial_log, files.events, files.old_events,
                files.qemu_log, files.config, files.state):
        copy_tail(src, folder / src.name)
    with contextlib.suppress(PinnaceError):
        if str(m.status().state) == "ready":
            r = m.exec(["dmesg"], timeout=DMESG_TIMEOUT)
            (folder / "dmesg.txt").write_bytes(r.stdout[-ARTIFACT_MAX:])


def copy_tail(src: Path, dst: Path) -> None:
    try:
        with open(src, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - ARTIFACT_MAX))
            data = f.read(ARTIFACT_MAX)
    except FileNotFoundError:
        return
    dst.write_bytes(data)


# --- fixtures ------------------------------------------------------------------------


class _Factory:
    """What the factory fixtures share: the session, the test and its record."""

    def __init__(self, session: PinnaceSession, item: pytest.Item, record: TestRecord) -> None:
        self._session = session
        self._item = item
        self._record = record


class MachineFactory(_Factory):
    """``vm_factory``: makes machines for one test, restored from the ready snapshot of
    their image and shape; the test's teardown deletes them."""

    def __call__(self, image: str | None = None, *, cpus: int | None = None,
                 memory: str | int | None = None, net: str | None = None,
                 networks: Sequence[Network | str | tuple[Network | str, str]] = (),
                 volumes: Sequence[str | tuple[Volume | str, str]] = (),
                 shares: Sequence[str | tuple[str | os.PathLike[str], str]] = (),
                 name: str | None = None, timeout: float | None = None) -> Machine:
        """A running machine. ``networks``: networks (from ``network_factory``, or names),
        each optionally with an address: ``(net, "10.100.0.9")``. ``volumes``:
        ``(volume, "/data")`` or "NAME:/data[:ro]"; ``shares``: ``("./src", "/src")`` or
        "HOST:GUEST[:ro]". ``name``: the guest's hostname (its machine name is still
        unique to this test and worker). ``timeout``: for its restore (and the ready
        snapshot's first boot), over --pinnace-timeout."""
        session = self._session
        pn = session.client()
        machine_name = session.name(self._item, name)
        [m] = pn.machines.run(
            image=image or session.settings.image, name=machine_name, cpus=cpus,
            memory=memory, rm=True, timeout=timeout or session.settings.timeout,
            notify=session.say, net=net,
            networks=[_joined(n) for n in networks],
            volumes=[_mount(v) for v in volumes], shares=[_mount(s) for s in shares])
        self._record.machines.append(m)
        if name is not None:
            m.set_hostname(name)
        return m


def _joined(spec: Network | str | tuple[Network | str, str]) -> str:
    if isinstance(spec, tuple):
        net, ip = spec
        return f"{getattr(net, 'name', net)}:{ip}"
    return str(getattr(spec, "name", spec))


def _mount(spec: Any) -> str:
    if isinstance(spec, tuple):
        source, path, *ro = spec
        return ":".join([str(getattr(source, "name", source)), str(path), *map(str, ro)])
    return str(spec)


class NetworkFactory(_Factory):
    """``network_factory``: virtual networks for one test, removed after it."""

    def __call__(self, subnet: str | None = None, *, name: str | None = None) -> Network:
        """A new network; ``subnet`` ("10.77.0.0/24") or the first free /24 of
        10.100.0.0/16. Its name is unique to this test and worker."""
        net_name = self._session.name(self._item, name)
        net = self._session.client().networks.create(net_name, subnet, ephemeral=True)
        self._record.networks.append(net.name)
        return net


class VolumeFactory(_Factory):
    """``volume_factory``: volumes for one test, removed after it."""

    def __call__(self, size: str | int = "256M", *, name: str | None = None) -> Volume:
        """A new, empty ext4 volume of ``size``; attach it with
        ``vm_factory(volumes=[(vol, "/data")])``."""
        vol_name = self._session.name(self._item, name)
        vol = self._session.client().volumes.create(vol_name, size, ephemeral=True)
        self._record.volumes.append(vol.name)
        return vol


def vm_options(item: pytest.Item, param: object) -> dict[str, Any]:
    """What ``vm`` is made of: the pinnace markers, closest last, then an indirect
    parameter (a dict of options, or an image name)."""
    opts: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers(name="pinnace"))):
        if mark.args:
            pytest.fail("@pytest.mark.pinnace takes keyword options only, e.g. "
                        "@pytest.mark.pinnace(image='default', memory='512M')", pytrace=False)
        opts.update(mark.kwargs)
    if isinstance(param, dict):
        opts.update(param)
    elif isinstance(param, str):
        opts["image"] = param
    elif param is not None:
        pytest.fail(f"vm's parameter {param!r}: give an image name or a dict of "
                    f"{', '.join(VM_OPTIONS)}", pytrace=False)
    unknown = sorted(set(opts) - set(VM_OPTIONS))
    if unknown:
        pytest.fail(f"pinnace option {unknown[0]!r} is unknown: the marker and vm's "
                    f"parameter take {', '.join(VM_OPTIONS)}", pytrace=False)
    return opts


@pytest.fixture(scope="session")
def pinnace(request: pytest.FixtureRequest) -> Iterator[Pinnace]:
    """The pinnace client (sync API) of this session, on the store of --pinnace-home or
    $PINNACE_HOME. What the session made is removed at its end."""
    session = request.config.stash[SESSION]
    yield session.client()
    session.finish()


@pytest.fixture
def _pinnace_test(pinnace: Pinnace, request: pytest.FixtureRequest) -> Iterator[TestRecord]:
    session = request.config.stash[SESSION]
    record = TestRecord(session)
    request.node.stash[RECORD] = record
    yield record
    record.teardown()


@pytest.fixture
def vm_factory(_pinnace_test: TestRecord, request: pytest.FixtureRequest) -> MachineFactory:
    """Makes machines for this test: ``vm_factory(image=, cpus=, memory=, net=,
    networks=[...], volumes=[...], shares=[...], name=)``; all deleted after it."""
    return MachineFactory(_pinnace_test.session, request.node, _pinnace_test)


@pytest.fixture
def network_factory(_pinnace_test: TestRecord, request: pytest.FixtureRequest
                    ) -> NetworkFactory:
    """Makes virtual networks for this test: ``network_factory(subnet=None)``."""
    return NetworkFactory(_pinnace_test.session, request.node, _pinnace_test)


@pytest.fixture
def volume_factory(_pinnace_test: TestRecord, request: pytest.FixtureRequest) -> VolumeFactory:
    """Makes volumes for this test: ``volume_factory(size="256M")``."""
    return VolumeFactory(_pinnace_test.session, request.node, _pinnace_test)


@pytest.fixture
def vm(vm_factory: MachineFactory, request: pytest.FixtureRequest) -> Machine:
    """A fresh running machine for this test, deleted after it; what it is made of comes
    from ``@pytest.mark.pinnace(...)`` and --pinnace-image."""
    from .errors import PinnaceError

    opts = vm_options(request.node, getattr(request, "param", None))
    try:
        return vm_factory(**opts)
    except PinnaceError as exc:  # one clear line, not pinnace's insides
        pytest.fail(f"pinnace could not make the test's machine: {exc}", pytrace=False)


@pytest.fixture
def vm_host(request: pytest.FixtureRequest) -> Any:
    """A testinfra Host for ``vm`` (needs pytest-testinfra; the test is skipped, saying
    so, without it)."""
    try:
        import testinfra  # noqa: F401
    except ImportError:
        pytest.skip("vm_host needs testinfra: pip install pytest-testinfra")
    from .testinfra import host_for

    return host_for(request.getfixturevalue("vm"),
                    pinnace=request.getfixturevalue("pinnace"))
