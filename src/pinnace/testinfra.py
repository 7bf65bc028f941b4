"""A testinfra backend for pinnace guests: ``pinnace://NAME``.

testinfra (pytest-testinfra) keeps its backends in a fixed table; importing this module
adds ``pinnace`` to it, so that::

    import pinnace.testinfra
    import testinfra

    host = testinfra.get_host("pinnace://web")          # or pinnace://USER@web
    assert host.file("/etc/hostname").exists
    with host.sudo("nobody"):
        assert host.check_output("whoami") == "nobody"

works in a plain script, and ``pytest --hosts=pinnace://web`` in a test run that imports
it (a ``conftest.py`` with ``import pinnace.testinfra``). Commands run as
``/bin/sh -c COMMAND`` through the guest agent (no network, no ssh), as root, or as USER
(the agent's ``user=``). The query options are testinfra's: ``sudo=true``,
``sudo_user=NAME`` and ``timeout=SECONDS`` (per command; 60 s unless given).

``testinfra.get_host`` keeps one Host per spec for the life of the process; a test that
makes a machine of its own should use :func:`host_for`, which gives a fresh Host for a
handle. The store is ``$PINNACE_HOME`` unless a client is passed as ``pinnace=``.

pinnace itself never imports this module (nor testinfra): only its users do.
"""

from __future__ import annotations

import atexit
import math
import threading
from typing import TYPE_CHECKING, Any

import testinfra.backend
import testinfra.host
from testinfra.backend.base import BaseBackend, CommandResult

from .errors import CommandFailed, ConfigError, NotFoundError, StateError

if TYPE_CHECKING:
    from .agent.client import ExecResult
    from .client import Machine, Pinnace

SCHEME = "pinnace"
CLASSPATH = "pinnace.testinfra.PinnaceBackend"
DEFAULT_TIMEOUT = 60.0
SPEC_HINT = "write pinnace://NAME or pinnace://USER@NAME"

_clients: dict[str, Pinnace] = {}
_clients_lock = threading.Lock()


def _default_client() -> Pinnace:
    """One client per store ($PINNACE_HOME as it is now) for this process, closed at exit."""
    from .client import Pinnace
    from .store import default_home

    home = str(default_home())
    with _clients_lock:
        client = _clients.get(home)
        if client is None:
            client = _clients[home] = Pinnace(home)
            if len(_clients) == 1:
                atexit.register(_close_clients)
        return client


def _close_clients() -> None:
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()


def _parse_timeout(value: float | str | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError("testinfra timeout", value,
                          "give seconds, a positive number: pinnace://NAME?timeout=120")
    return seconds


def _not_running_hint(name: str, state: str) -> str:
    if state == "paused":
        return f"resume it with 'pinnace resume {name}'"
    if state == "broken":
        return f"see 'pinnace ls'; 'pinnace delete --force {name}' removes it"
    if state in ("starting", "stopping"):
        return f"another pinnace command is moving it; see 'pinnace ls', then 'pinnace start {name}'"
    return f"start it with 'pinnace start {name}'"


class PinnaceBackend(BaseBackend):
    """Runs testinfra's commands in a pinnace guest through its agent.

    ``hostname`` is ``NAME`` or ``USER@NAME``; ``pinnace`` a client to use (default: one
    on ``$PINNACE_HOME``, made on first use); ``machine`` a handle to use instead of
    looking the name up; ``timeout`` seconds per command.
    """

    NAME = SCHEME

    def __init__(self, hostname: str, *args: Any, pinnace: Pinnace | None = None,
                 machine: Machine | None = None, timeout: float | str | None = None,
                 **kwargs: Any) -> None:
        name, user = self.parse_containerspec(hostname or "")
        if machine is not None and not name:
            name = machine.name
        if not name or user == "":
            raise ConfigError("testinfra host", f"{SCHEME}://{hostname or ''}", SPEC_HINT)
        if machine is not None and machine.name != name:
            raise ConfigError("testinfra host", f"{SCHEME}://{hostname}",
                              f"the machine given is {machine.name!r}")
        self.name = name
        self.user = user
        self.timeout = _parse_timeout(timeout)
        self._pinnace = pinnace
        self._machine = machine
        self._lock = threading.Lock()
        super().__init__(name, *args, **kwargs)

    def get_pytest_id(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"{SCHEME}://{who}{self.name}"

    @property
    def machine(self) -> Machine:
        """The machine's handle: the one given, else looked up by name on first use."""
        with self._lock:
            if self._machine is None:
                client = self._pinnace if self._pinnace is not None else _default_client()
                try:
                    self._machine = client.machines.get(self.name)
                except NotFoundError:
                    raise self._not_found() from None
            return self._machine

    def _not_found(self) -> NotFoundError:
        return NotFoundError("machine", self.name,
                             f"see 'pinnace ls'; 'pinnace create {self.name} --start' makes one")

    def _exec(self, argv: list[str]) -> ExecResult:
        machine = self.machine
        try:
            return machine.exec(argv, timeout=self.timeout, user=self.user)
        except NotFoundError as exc:
            if exc.kind != "machine":
                raise
            raise self._not_found() from None
        except StateError as exc:
            raise StateError(self.name, "run testinfra commands in", exc.state, exc.allowed,
                             reason=exc.reason,
                             hint=_not_running_hint(self.name, exc.state)) from None

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        # host.sudo() replaces get_command: the command must be built through it.
        cmd = self.get_command(command, *args)
        argv = ["/bin/sh", "-c", cmd]
        res = self._exec(argv)
        if res.timed_out:
            raise CommandFailed(res, argv, res.exit_code,
                                f" (killed after {self.timeout:g} s; "
                                f"pinnace://{self.name}?timeout=SECONDS allows longer)")
        return self.result(res.exit_code, self.encode(cmd), res.stdout, res.stderr)


def register() -> None:
    """Add ``pinnace`` to testinfra's backends (again is harmless)."""
    testinfra.backend.BACKENDS[SCHEME] = CLASSPATH


def host_for(machine: Machine, *, pinnace: Pinnace | None = None, user: str | None = None,
             sudo: bool = False) -> testinfra.host.Host:
    """A fresh testinfra Host on ``machine`` (not from testinfra's cache of hosts, which
    would hand a later machine of the same name the first one's host)."""
    spec = f"{user}@{machine.name}" if user else machine.name
    backend = PinnaceBackend(spec, pinnace=pinnace, machine=machine, sudo=sudo)
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host


register()

__all__ = ["DEFAULT_TIMEOUT", "PinnaceBackend", "host_for", "register"]
