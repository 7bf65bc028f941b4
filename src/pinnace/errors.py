"""Every error pinnace raises, in one tree.

::

    PinnaceError                      the root: catch this to catch everything pinnace raises
     +-- ConfigError                  bad input: a name, size, path or option (field, value, hint)
     |    +-- ExpressionError         a CI workflow's ${{ }} expression is wrong (expression, problem, position)
     |    +-- EnvFileError            a CI step wrote a $GITHUB_ENV/$GITHUB_OUTPUT the runner cannot read
     |    +-- WorkflowError           a CI workflow file that cannot be read (file, line, problem)
     +-- NotFoundError                no such machine, image or snapshot (kind, name)
     +-- AlreadyExistsError           the name is taken (kind, name)
     +-- StateError                   a call in the wrong lifecycle state (name, state, allowed, hint)
     +-- LockTimeout                  another pinnace call holds the object (path, timeout)
     +-- HostError                    the host lacks something pinnace needs (what, hint)
     |    +-- ToolFailed              a host tool (qemu-img, mkfs.ext4) failed (command, exit_code, output)
     +-- StoreError                   a file in the store is damaged or cannot be written (path, problem)
     +-- InUseError                   an object cannot be removed while others use it (kind, name, users)
     |    +-- ImageInUse              machines are made from the image
     |    +-- VolumeInUse             machines have the volume attached
     |    +-- NetworkInUse            machines joined the network
     +-- ImageBuildError              building an image failed (step, command, exit_code, log_tail)
     +-- SnapshotError                a snapshot is damaged, in use or unusable here (name, problem)
     +-- VolumeError                  a volume is damaged or could not be made (name, problem)
     +-- SwitchError                  a network's switch did not start or keep up (dir, problem, log_tail)
     +-- MachineError                 a machine misbehaved (name, log_tail)
     |    +-- LaunchError             QEMU would not start (command, exit_code)
     |    +-- BootTimeout             the guest did not become ready in time (timeout)
     |    +-- MachineCrashed          QEMU exited while it should have been running (exit_code)
     |    +-- MigrationFailed         QEMU could not save or load the machine's state (problem)
     +-- CommandFailed                a guest command exited non-zero, from ExecResult.check() (result)
     +-- AgentError                   the guest agent channel failed
          +-- ProtocolError           the guest sent something that breaks the protocol
          +-- AgentTimeout            the agent did not answer in time (timeout)
          +-- RemoteError             the agent refused a request (code, message)
          +-- AgentDisconnected       the channel closed while requests were in flight
          +-- UnsafeArchive           a directory from the guest tried to write outside its target
          +-- TooLargeError                a copy from the guest was larger than allowed; nothing kept

Exceptions carry their facts as fields, so a caller can act on them without
parsing the message; ``str()`` of each is one line a user can act on.
"""

from __future__ import annotations

from collections.abc import Sequence


class PinnaceError(Exception):
    """Root of every error pinnace raises."""


class ConfigError(PinnaceError):
    """Bad input: the field, the value given and how to fix it."""

    def __init__(self, field: str, value: object, hint: str) -> None:
        self.field = field
        self.value = value
        self.hint = hint
        super().__init__(f"invalid {field} {value!r}: {hint}")


class ExpressionError(ConfigError):
    """A GitHub Actions expression (``${{ }}``) that does not parse or cannot be evaluated:
    the expression, the problem and where it is (``position``, 1-based, when known)."""

    def __init__(self, expression: str, problem: str, position: int | None = None) -> None:
        self.expression = expression
        self.problem = problem
        self.position = position
        shown = expression if len(expression) <= 200 else expression[:197] + "..."
        where = f" at position {position}" if position is not None else ""
        one_line = problem.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__("expression", shown, one_line + where)
        self.value = expression


class EnvFileError(ConfigError):
    """A CI step wrote an env or output file ($GITHUB_ENV, $GITHUB_OUTPUT) that the
    runner cannot read: which file, and what is wrong with it."""

    def __init__(self, which: str, problem: str) -> None:
        super().__init__(which, problem, "write NAME=value lines, or NAME<<EOF, the "
                         "lines, then EOF alone on its line")


class WorkflowError(ConfigError):
    """A CI workflow file pinnace cannot read, or a request it cannot satisfy: ``file`` and
    ``line`` (1-based; None for the file as a whole) say where, ``problem`` what, ``hint`` how
    to fix it. ``str()`` is one line: ``ci.yml:12: job 'build': 'runs-on' is missing; give a
    label such as ubuntu-latest``."""

    def __init__(self, file: str, line: int | None, problem: str, hint: str = "", *,
                 field: str = "workflow", value: object = None) -> None:
        super().__init__(field, value, hint)
        self.file = file
        self.line = line
        self.problem = problem
        where = f"{file}:{line}" if line else file
        self.args = (f"{where}: {problem}" + (f"; {hint}" if hint else ""),)


class NotFoundError(PinnaceError):
    """No object of this kind with this name exists in the store."""

    def __init__(self, kind: str, name: str, hint: str = "") -> None:
        self.kind = kind
        self.name = name
        msg = f"no {kind} named {name!r}"
        super().__init__(f"{msg}; {hint}" if hint else msg)


class AlreadyExistsError(PinnaceError):
    """An object of this kind with this name exists already."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(
            f"a {kind} named {name!r} exists already; choose another name or delete it first"
        )


class StateError(PinnaceError):
    """A call was made in a lifecycle state that does not allow it."""

    def __init__(self, name: str, action: str, state: str, allowed: Sequence[str], *,
                 reason: str = "", hint: str = "") -> None:
        self.name = name
        self.action = action
        self.state = state
        self.allowed = tuple(allowed)
        self.reason = reason  # why it is in that state, if its status says
        self.hint = hint
        msg = (f"cannot {action} machine {name!r}: it is {state}"
               f"{f' ({reason})' if reason else ''}, "
               f"and that needs it to be {' or '.join(self.allowed)}")
        super().__init__(f"{msg}; {hint}" if hint else msg)


class LockTimeout(PinnaceError):
    """Another pinnace call holds the object's lock for longer than we waited."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        super().__init__(
            f"another pinnace command is busy with {path} (waited {timeout:g} s); "
            "try again when it has finished"
        )


class HostError(PinnaceError):
    """The host lacks a program, device or permission pinnace needs."""

    def __init__(self, what: str, hint: str) -> None:
        self.what = what
        self.hint = hint
        super().__init__(f"{what}; {hint}")


def _tail_suffix(log_tail: str) -> str:
    tail = log_tail.rstrip()
    return f"\n--- last lines of the log ---\n{tail}" if tail else ""


class ImageBuildError(PinnaceError):
    """A step of an image build failed; nothing was added to the store."""

    def __init__(
        self,
        step: str,
        message: str,
        *,
        command: Sequence[str] = (),
        exit_code: int | None = None,
        log_tail: str = "",
    ) -> None:
        self.step = step
        self.command = tuple(command)
        self.exit_code = exit_code
        self.log_tail = log_tail
        self.message = message
        super().__init__(f"image build failed at {step}: {message}")

    def __str__(self) -> str:
        return super().__str__() + _tail_suffix(self.log_tail)


class MachineError(PinnaceError):
    """A machine misbehaved; ``log_tail`` holds the last lines of its serial console."""

    def __init__(self, name: str, message: str, *, log_tail: str = "") -> None:
        self.name = name
        self.message = message
        self.log_tail = log_tail
        super().__init__(f"machine {name!r}: {message}")

    def __str__(self) -> str:
        return super().__str__() + _tail_suffix(self.log_tail)


class LaunchError(MachineError):
    """QEMU refused to start (bad arguments, missing device, no permission)."""

    def __init__(
        self, name: str, message: str, *, command: Sequence[str], exit_code: int | None,
        log_tail: str = "",
    ) -> None:
        self.command = tuple(command)
        self.exit_code = exit_code
        super().__init__(name, message, log_tail=log_tail)


class BootTimeout(MachineError):
    """The guest did not answer on the agent channel within the boot timeout."""

    def __init__(self, name: str, timeout: float, *, log_tail: str = "") -> None:
        self.timeout = timeout
        super().__init__(
            name,
            f"guest did not become ready within {timeout:g} s (QEMU was stopped; see the "
            "serial log below, raise --boot-timeout if the host is slow)",
            log_tail=log_tail,
        )


class MachineCrashed(MachineError):
    """QEMU exited while the machine should have been running. ``reason``: why, as the
    machine's status says (a kernel panic, out of memory, QEMU killed by a signal)."""

    def __init__(self, name: str, exit_code: int | None, *, during: str, log_tail: str = "",
                 reason: str = "") -> None:
        self.exit_code = exit_code
        self.during = during
        self.reason = reason or f"QEMU {describe_exit(exit_code)}"
        text = (f"the machine died during {during}: {reason}" if reason
                else f"QEMU exited during {during} ({describe_exit(exit_code)})")
        super().__init__(name, text, log_tail=log_tail)


def describe_exit(code: int | None) -> str:
    """Say how a process ended, from a shell-style exit status (128+N is signal N)."""
    if code is None:
        return "exit status unknown"
    if code > 128:
        import signal

        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"killed by {name}"
    return f"exit code {code}"


class SnapshotError(PinnaceError):
    """A snapshot cannot be used (damaged, made for another QEMU or shape) or removed."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"snapshot {name!r}: {problem}")


class CommandFailed(PinnaceError):
    """A command in the guest failed; raised by ``ExecResult.check()``, carries the result."""

    def __init__(self, result: object, argv: Sequence[str], exit_code: int, detail: str) -> None:
        self.result = result
        self.argv = list(argv)
        self.exit_code = exit_code
        shown = " ".join(self.argv)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"{shown!r} failed with exit code {exit_code}{detail}")


class AgentError(PinnaceError):
    """The channel to the guest agent failed."""


class ProtocolError(AgentError):
    """The other side sent bytes that break the agent protocol."""


class AgentTimeout(AgentError):
    """The agent did not answer within the timeout."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = timeout
        super().__init__(f"guest agent did not answer {what} within {timeout:g} s")


class RemoteError(AgentError):
    """The agent refused or failed a request; ``code`` is a short machine-readable word."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"guest: {message} ({code})")


class AgentDisconnected(AgentError):
    """The agent channel closed while requests were in flight (the guest stopped or crashed)."""


class UnsafeArchive(AgentError):
    """A tar stream from the guest tried to write outside its target directory."""


class TooLargeError(AgentError):
    """A copy from the guest sent more bytes than the caller allowed; nothing was kept."""


class ToolFailed(HostError):
    """A host program pinnace runs (qemu-img, mkfs.ext4, tar) failed; carries its output."""

    def __init__(self, command: Sequence[str], exit_code: int | None, output: str,
                 hint: str = "") -> None:
        self.command = tuple(command)
        self.exit_code = exit_code
        self.output = output
        last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
        tool = self.command[0].rsplit("/", 1)[-1] if self.command else "a host tool"
        what = f"{tool} failed ({describe_exit(exit_code)})" + (f": {last[:300]}" if last else "")
        super().__init__(what, hint or "see the message above; check free space and "
                         "permissions under PINNACE_HOME")


class StoreError(PinnaceError):
    """A file in the store is damaged, or the filesystem refused a write (full, read-only)."""

    def __init__(self, path: str, problem: str, hint: str = "") -> None:
        self.path = path
        self.problem = problem
        self.hint = hint
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


def store_error(exc: OSError, doing: str) -> StoreError:
    """A StoreError for an OSError met while ``doing`` something in the store."""
    import errno

    path = str(exc.filename or "the store")
    if exc.errno == errno.ENOSPC:
        return StoreError(path, f"no space left on the filesystem while {doing}",
                          "free some space (pinnace gc, or delete machines, images or "
                          "snapshots) and try again")
    if exc.errno == errno.EROFS:
        return StoreError(path, f"the filesystem is read-only while {doing}",
                          "use a writable PINNACE_HOME")
    return StoreError(path, f"{exc.strerror or exc} while {doing}",
                      "check the permissions and free space under PINNACE_HOME")


class InUseError(PinnaceError):
    """An object cannot be removed while other objects depend on it."""

    def __init__(self, kind: str, name: str, users: Sequence[str], hint: str, *,
                 what: str = "machine") -> None:
        self.kind = kind
        self.name = name
        self.users = tuple(users)
        self.machines = self.users
        who = ", ".join(repr(u) for u in self.users)
        verb = "use" if len(self.users) > 1 else "uses"
        noun = f"{what}s" if len(self.users) > 1 else what
        super().__init__(f"{kind} {name!r}: {noun} {who} {verb} it; {hint}")


class ImageInUse(InUseError):
    """An image cannot be removed while machines are made from it."""

    def __init__(self, image: str, machines: Sequence[str]) -> None:
        self.image = image
        super().__init__("image", image, machines, "delete them first")
        who = ", ".join(repr(u) for u in self.users)
        self.args = (f"image {image!r} is used by {who}; delete them first",)


class VolumeInUse(InUseError):
    """A volume cannot be removed while machines have it attached."""

    def __init__(self, name: str, machines: Sequence[str]) -> None:
        if len(machines) > 1:
            hint = "delete the machines or recreate them without the volume"
        else:
            hint = "delete the machine or recreate it without the volume"
        super().__init__("volume", name, machines, hint)


class NetworkInUse(InUseError):
    """A network cannot be removed while machines have a NIC on it."""

    def __init__(self, name: str, machines: Sequence[str], *, what: str = "",
                 fix: str = "") -> None:
        super().__init__("network", name, machines, fix or "delete them or 'pinnace network "
                         "disconnect' them first", what=what or "machine")


class VolumeError(PinnaceError):
    """A volume is damaged or could not be made; ``problem`` says what and how to fix it."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"volume {name!r}: {problem}")


class SwitchError(PinnaceError):
    """A network's switch did not start, or did not take up its ports in time."""

    def __init__(self, dir: str, problem: str, *, log_tail: str = "") -> None:
        self.dir = dir
        self.problem = problem
        self.log_tail = log_tail
        super().__init__(f"network switch in {dir}: {problem}")

    def __str__(self) -> str:
        tail = self.log_tail.rstrip()
        suffix = f"\n--- last lines of switch.log ---\n{tail}" if tail else ""
        return super().__str__() + suffix


class MigrationFailed(MachineError):
    """QEMU could not save or load a machine's state (a migration to or from a file)."""

    def __init__(self, name: str, problem: str, *, log_tail: str = "") -> None:
        self.problem = problem
        super().__init__(name, problem, log_tail=log_tail)
