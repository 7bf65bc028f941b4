"""A backend without a VMM, for unit tests of the layers above the seam.

A "machine" is a record in this process. Its guest agent is real in one sense: an
asyncio server on each of the machine's agent sockets speaks pinnace's agent
protocol, so the host side (AgentClient, restore, identity, exec) runs unchanged.
It answers only while its "CPUs" run: a machine waiting for a state to load, or
paused, keeps its HELLO unanswered, as a real guest would.

What it is not: proof that anything works with QEMU. Guest tests do that.
Everything lives in the event loop that launched it; keep a test in one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent import protocol as P
from ..errors import MachineError, MigrationFailed
from ..store import MachineFiles
from .base import INCOMING, PAUSED, RUNNING, SAVED, AccelChoice, Handle, LaunchSpec

FAKE_PID_BASE = 1 << 23  # above any real pid_max, so a fake pid names no real process


@dataclass
class FakeGuest:
    """One fake machine."""

    spec: LaunchSpec
    handle: Handle
    state: str
    running: asyncio.Event
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    hostname: str = ""
    links: dict[int, bool] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)  # the mount requests, as sent

    def set_state(self, state: str) -> None:
        self.state = state
        if state == RUNNING:
            self.running.set()
        else:
            self.running.clear()


class FakeBackend:
    """The Backend protocol, in memory. ``fail`` maps an operation ("launch", "save",
    "load", "boot") to what goes wrong the next time it runs: an exception to raise, an
    int exit code (launch: the VMM dies at once), or "hang" (boot: the agent never
    answers)."""

    name = "fake"

    def __init__(self, *, kvm: bool = False) -> None:
        self.kvm = kvm
        # By a mark each launch leaves in the machine's folder, so that, like QEMU, a VMM
        # is still found after its folder is renamed (a warm-pool claim).
        self.guests: dict[str, FakeGuest] = {}
        self.exits: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Any] = {}
        self._pids = FAKE_PID_BASE
        self._launches = 0
        self._probed = False

    def _guest(self, files: MachineFiles, doing: str) -> FakeGuest:
        guest = self.guests.get(_mark(files))
        if guest is None:
            raise MachineError(files.dir.name, f"QEMU did not answer while {doing}: "
                               "it is not running")
        return guest

    def _failure(self, op: str) -> Any:
        return self.fail.pop(op, None)

    # -- facts -------------------------------------------------------------------------

    async def choose_accel(self, requested: str) -> AccelChoice:
        if requested == "auto":  # the first answer is a "probe", later ones come cached
            probed, self._probed = not self._probed, True
            return AccelChoice("kvm" if self.kvm else "tcg", "" if self.kvm else "fake: no KVM",
                               probed)
        return AccelChoice(requested, "requested", False)

    def identity(self, accel: str) -> dict[str, str]:
        return {"qemu": "fake-1", "cpu_model": f"fake-{accel}"}

    def devices_key(self, nat: bool, nics: int, volumes: int, shares: int) -> str:
        return f"fake,nat*{int(nat)},dgram*{nics},blk*{volumes},9p*{shares}"

    async def create_disk(self, base: Path, disk: Path, *, base_format: str = "raw",
                          size: int | None = None) -> None:
        disk.write_text(json.dumps({"base": str(base), "format": base_format, "size": size}))

    async def disk_size(self, disk: Path) -> int:
        return 1 << 30

    # -- processes -----------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> Handle | int:
        files = spec.files
        self.calls.append(("launch", spec.name))
        self._launches += 1
        mark = f"vm{self._launches}"
        (files.dir / MARK).write_text(mark)
        failure = self._failure("launch")
        if isinstance(failure, BaseException):
            raise failure
        if isinstance(failure, int):
            files.qemu_log.write_text("qemu-system-x86_64: fake: cannot start\n")
            self.exits[mark] = failure
            return failure
        self._pids += 1
        handle = Handle(self._pids, 1)
        guest = FakeGuest(spec, handle, INCOMING if spec.incoming else RUNNING, asyncio.Event())
        guest.set_state(guest.state)
        if spec.memory_file is not None and spec.memory_shared:
            spec.memory_file.write_bytes(b"\0" * 4096)
        hang = self._failure("boot") == "hang"

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(guest, reader, writer, hang)

        for port in range(spec.agent_ports):
            path = files.agent_sock(port)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            guest.servers.append(await asyncio.start_unix_server(serve, path=str(path)))
        self.guests[mark] = guest
        files.pid.write_text(f"{handle.pid}\n")
        return handle

    def alive(self, handle: Handle) -> bool:
        return any(g.handle == handle for g in self.guests.values())

    def guest(self, files: MachineFiles) -> FakeGuest | None:
        """The running fake VMM of a machine's folder, if any (for tests)."""
        return self.guests.get(_mark(files))

    def find(self, files: MachineFiles) -> Handle | None:
        guest = self.guests.get(_mark(files))
        return guest.handle if guest is not None else None

    def exit_status(self, files: MachineFiles) -> int | None:
        return self.exits.get(_mark(files))

    async def await_exit_status(self, files: MachineFiles, timeout: float = 1.0) -> int | None:
        return self.exits.get(_mark(files))

    async def wait_exit(self, handle: Handle, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive(handle):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def exit(self, files: MachineFiles, code: int) -> None:
        """The machine's VMM ends with ``code`` (137: killed). Tests call it to crash one."""
        self._exit_mark(_mark(files), code)

    def _exit_mark(self, mark: str, code: int) -> None:
        guest = self.guests.pop(mark, None)
        if guest is None:
            return
        self.calls.append(("exit", f"{guest.spec.name}:{code}"))
        for server in guest.servers:
            server.close()
        for writer in guest.writers:  # as a dying VMM's sockets close
            writer.close()
        self.exits[mark] = code

    async def close(self) -> None:
        """End every fake machine and close its sockets (call before the loop ends)."""
        servers = [srv for g in self.guests.values() for srv in g.servers]
        for mark in list(self.guests):
            self._exit_mark(mark, 137)
        for srv in servers:
            await srv.wait_closed()
        await asyncio.sleep(0.05)  # let both ends of every connection see it close

    async def kill(self, handle: Handle, files: MachineFiles) -> None:
        for mark, guest in list(self.guests.items()):
            if guest.handle == handle:
                self._exit_mark(mark, 137)

    async def quit(self, files: MachineFiles, timeout: float) -> bool:
        if _mark(files) not in self.guests:
            return False
        self.exit(files, 0)
        return True

    # -- control ---------------------------------------------------------------------------

    async def run_state(self, files: MachineFiles) -> str:
        return self._guest(files, "asking for its run state").state

    async def pause(self, files: MachineFiles) -> None:
        self._guest(files, "pausing the guest").set_state(PAUSED)

    async def resume(self, files: MachineFiles) -> None:
        guest = self._guest(files, "resuming the guest")
        if guest.state == INCOMING:
            raise MachineError(files.dir.name, "cannot resume: no state was loaded")
        guest.set_state(RUNNING)

    async def save(self, files: MachineFiles, dest: Path, *, ignore_shared: bool) -> float:
        guest = self._guest(files, "saving its state")
        self.calls.append(("save", guest.spec.name))
        guest.set_state(PAUSED)
        stopped = time.monotonic()
        failure = self._failure("save")
        if failure is not None:
            raise failure if isinstance(failure, BaseException) else MigrationFailed(
                guest.spec.name, "saving the state failed: fake failure")
        dest.write_text(json.dumps({"fake-state": guest.spec.name, "hostname": guest.hostname,
                                    "ignore_shared": ignore_shared}))
        guest.set_state(SAVED)
        return stopped

    async def load(self, files: MachineFiles, src: Path, *, ignore_shared: bool,
                   run: bool = True) -> None:
        guest = self._guest(files, "loading its state")
        self.calls.append(("load", guest.spec.name))
        failure = self._failure("load")
        if failure is not None:
            raise failure if isinstance(failure, BaseException) else MigrationFailed(
                guest.spec.name, "loading the state failed: fake failure")
        if guest.state != INCOMING:
            raise MigrationFailed(guest.spec.name, "loading the state failed: not incoming")
        try:
            saved = json.loads(src.read_text())
        except (OSError, ValueError) as exc:
            raise MigrationFailed(guest.spec.name, f"loading the state failed: {exc}") from None
        guest.hostname = str(saved.get("hostname", ""))
        guest.set_state(RUNNING if run else PAUSED)

    async def set_link(self, files: MachineFiles, nic: int, up: bool) -> None:
        self._guest(files, f"setting the link of NIC {nic}").links[nic] = up

    # -- the agent -------------------------------------------------------------------------

    async def _serve(self, guest: FakeGuest, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, hang: bool) -> None:
        frames = P.FrameReader()
        guest.writers.add(writer)
        try:
            while data := await reader.read(65536):
                for frame in frames.feed(data):
                    if hang:
                        continue
                    await guest.running.wait()
                    self._answer(guest, frame, writer)
                await writer.drain()
        except (ConnectionError, P.FrameError):
            pass
        finally:
            guest.writers.discard(writer)
            writer.close()

    def _answer(self, guest: FakeGuest, frame: P.Frame, writer: asyncio.StreamWriter) -> None:
        if frame.kind == P.HELLO:
            hello = frame.json()
            writer.write(P.encode_json(P.WELCOME, 0, {
                "version": P.PROTOCOL_VERSION, "agent": "fake", "nonce": hello.get("nonce"),
                "max_frame": P.MAX_FRAME, "window": P.STREAM_WINDOW,
                "capabilities": sorted([*AGENT_OPS, *P.FEATURES]), "pid": 1}))
            return
        if frame.kind != P.REQUEST:
            return
        req = frame.json()
        op = req.get("op")
        chan = frame.chan
        if op == "exec":
            argv = req.get("argv") or ["sh", "-c", str(req.get("shell"))]
            guest.commands.append(list(argv))
            writer.write(P.encode_json(P.EVENT, chan, {"started": 100}))
            code = 1 if argv[:1] == ["false"] else 0
            if argv[:1] == ["echo"]:
                writer.write(P.encode(P.DATA, chan, (" ".join(argv[1:]) + "\n").encode(),
                                      P.STDOUT))
            if argv[:1] == ["hostname"]:
                writer.write(P.encode(P.DATA, chan, f"{guest.hostname}\n".encode(), P.STDOUT))
            writer.write(P.encode_json(P.REPLY, chan, {"exit_code": code}))
            return
        if op not in AGENT_OPS:
            writer.write(P.encode_json(P.ERROR, chan, {"code": "unknown-op",
                                                       "message": f"unknown operation {op!r}"}))
            return
        reply: dict[str, Any] = {}
        if op == "set_hostname":
            guest.hostname = str(req.get("hostname"))
        elif op == "set_time":
            reply = {"time": time.time()}
        elif op == "clock":
            reply = {"monotonic": time.monotonic()}
        elif op == "set_network":
            reply = {"addresses": list(req.get("addresses") or [])}
        elif op == "mount":
            guest.mounts.append({k: v for k, v in req.items() if k != "op"})
            reply = {"path": req.get("path"), "device": str(req.get("source"))}
        elif op == "unmount":
            self.calls.append(("unmount", guest.spec.name))
            reply = {"unmounted": [str(m.get("path")) for m in guest.mounts], "failed": []}
        elif op == "poweroff":
            asyncio.get_running_loop().call_later(0.01, self.exit, guest.spec.files, 0)
        writer.write(P.encode_json(P.REPLY, chan, reply))


AGENT_OPS = frozenset({"ping", "exec", "info", "poweroff", "reboot", "set_time", "clock",
                       "set_hostname", "get", "put", "reseed", "set_network", "mount",
                       "unmount"})

__all__ = ["FakeBackend", "FakeGuest"]


MARK = ".fake-vm"


def _mark(files: MachineFiles) -> str:
    """The mark of the last launch in a machine's folder ("" if never launched)."""
    try:
        return (files.dir / MARK).read_text()
    except OSError:
        return ""
