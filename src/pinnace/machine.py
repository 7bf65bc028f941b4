"""Machines: their lifecycle, state machine and the commands that move them.

States and the moves between them::

    created --start--> starting --agent answers--> ready --stop/halt/kill--> stopping --> stopped
       ^                  |   \\--start(wait=False)--> running                             |
       |                  +--> failed(reason) <-- QEMU died or boot timed out             |
       +------------------------------------- start again ---------------------------------+

    ready --pause--> paused --resume--> ready
    ready --stop(save=True)--> saved --start--> ready (resumed: processes and /tmp kept)
                               saved --halt--> stopped (the saved state is discarded)

A machine made from a snapshot is ``created`` with a pending restore (resume.json):
its first start loads the snapshot instead of booting, then gets its own identity.
A pending restore is always carried out by ``start``, with or without ``wait``.

The state on disk is a record of the last move; what a machine *is* comes from
that record plus a live check of its process (``status()``), so a VMM that died
behind pinnace's back shows as stopped or failed, never as running.

Commands that die: every move is made holding the machine's lock, and the lock dies
with the command. A machine recorded as ``starting`` or ``stopping``, or as busy
being saved or snapshotted, while nobody holds its lock, was left by a command that
was killed; the next command that looks at it finishes or rolls back that move
(see ``_recover``): an interrupted start is killed and marked failed, an
interrupted stop is finished, a guest left paused by an interrupted save or
snapshot runs again (or, if the save had finished, the machine is saved).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import fcntl
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from .agent.client import AgentClient, ExecResult, Process, anchor_from, clock_anchor
from .backends import base as B
from .backends.base import AccelChoice, Backend, Handle, LaunchSpec, NatNic
from .config import NAT_DNS, NAT_GATEWAY, NAT_GUEST, MachineConfig, Nic, PortForward, random_mac
from .errors import (
    AgentDisconnected,
    AgentError,
    AgentTimeout,
    AlreadyExistsError,
    BootTimeout,
    ConfigError,
    LaunchError,
    MachineCrashed,
    MachineError,
    NotFoundError,
    PinnaceError,
    SnapshotError,
    StateError,
    StoreError,
    describe_exit,
    store_error,
)
from .files import AsyncFiles
from .images import Images
from .network.networks import AsyncNetworks
from .snapshots.key import Capture, SnapshotLookup, machine_key, verify
from .store import (
    MachineFiles,
    Store,
    drop_owner,
    read_record,
    tail,
    validate_name,
    write_json,
)
from .volumes import AsyncVolumes

log = logging.getLogger(__name__)

HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?")

STOP_TIMEOUT = 10.0
# How long a force-delete waits for the guest to unmount its writable volumes first.
UNMOUNT_TIMEOUT = 3.0
QUIT_TIMEOUT = 5.0
SERIAL_TAIL_LINES = 30
COMMAND_SHOWN = 200  # characters of a guest command kept in events.jsonl
EVENTS_MAX = 1 << 20  # bytes of events.jsonl before it is rotated (one old one kept)
LOCK_TIMEOUT = 120.0


class MachineState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SAVED = "saved"  # stopped with its running state on disk: start resumes it
    FAILED = "failed"
    BROKEN = "broken"  # the directory is damaged: shown by ls, never a crash


S = MachineState
LIVE = frozenset({S.STARTING, S.RUNNING, S.READY, S.PAUSED, S.STOPPING})
MOVING = frozenset({S.STARTING, S.STOPPING})  # a command is in the middle of a move
STARTABLE = (S.CREATED, S.STOPPED, S.SAVED, S.FAILED)
STOPPABLE = (S.RUNNING, S.READY, S.PAUSED)  # (a start left half-done is recovered first)
UP = (S.READY, S.RUNNING, S.PAUSED)  # the guest exists and can be saved
AT_REST = (S.CREATED, S.STOPPED, S.FAILED)  # and not SAVED: its state fixes its shape
RESTORE_AGENT_TIMEOUT = 30.0
# Fields of state.json that describe the running process; kept across moves while it runs.
_RUN_FIELDS = ("pid", "pid_start", "accel", "started_at", "ready_at", "restored", "was")


@dataclass(frozen=True)
class MachineStatus:
    """What a machine is right now: its state, why, and its process."""

    name: str
    state: MachineState
    reason: str = ""
    pid: int | None = None
    accel: str | None = None
    started_at: float | None = None
    exit_code: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d


@dataclass(frozen=True)
class MachineEnv:
    """What a machine uses, handed to it by the client's wiring (no part holds the client)."""

    store: Store
    backend: Backend
    images: Images
    snapshots: SnapshotLookup
    volumes: AsyncVolumes
    networks: AsyncNetworks


def notice_accel(choice: AccelChoice, requested: str) -> None:
    """Tell the user that KVM could not be used: once, when the probe ran (later answers
    come from its cache and are said only with -v)."""
    if choice.accel == "tcg" and requested == "auto" and choice.reason:
        say = log.warning if choice.probed else log.info
        say("KVM is not usable (%s); using TCG software emulation, which is several times "
            "slower", choice.reason)


def handle_of(record: dict[str, Any]) -> Handle | None:
    """The process a state record names, if it names one."""
    pid, start = record.get("pid"), record.get("pid_start")
    if isinstance(pid, int) and isinstance(start, int) and not isinstance(pid, bool):
        return Handle(pid, start)
    return None


class AsyncMachine:
    """One machine in the store. Get it from ``AsyncPinnace.machines``."""

    def __init__(self, name: str, env: MachineEnv) -> None:
        self.name = name
        self.env = env
        self.paths: MachineFiles = env.store.machine_files(name)
        self.log = log.getChild(name)
        self.files = AsyncFiles(self.agent)
        self._agent: AgentClient | None = None
        self._agent_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<AsyncMachine {self.name}>"

    @property
    def config(self) -> MachineConfig:
        fix = f"repair it, or remove the machine with 'pinnace delete --force {self.name}'"
        try:
            data = read_record(self.paths.config, fix)
            return MachineConfig.build(**data)
        except FileNotFoundError:
            raise NotFoundError("machine", self.name, "see 'pinnace ls'") from None
        except ConfigError as exc:
            raise StoreError(str(self.paths.config), f"is damaged ({exc})", fix) from None

    @contextlib.asynccontextmanager
    async def _locked(self, timeout: float = LOCK_TIMEOUT,
                      *others: tuple[str, str]) -> AsyncIterator[None]:
        """Hold this machine's lock (and ``others``', in the store's lock order)."""
        async with self.env.store.alocked(("machine", self.name), *others, timeout=timeout):
            yield

    # -- state ---------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        try:
            return read_record(self.paths.state, "")
        except (FileNotFoundError, StoreError):
            return {}

    def _write_state(self, state: MachineState, reason: str = "", /, **fields: Any) -> None:
        record = {"state": str(state), "reason": reason, "updated_at": time.time(), **fields}
        write_json(self.paths.state, record)
        self.event(str(state), reason=reason, **{k: v for k, v in fields.items()
                                                 if k in ("pid", "busy")})

    def _rewrite(self, record: dict[str, Any], state: MachineState | None = None,
                 reason: str | None = None, **changes: Any) -> dict[str, Any]:
        """Write the record again with its run fields, ``changes`` applied (None drops)."""
        fields = {k: record[k] for k in (*_RUN_FIELDS, "busy") if k in record}
        fields.update(changes)
        fields = {k: v for k, v in fields.items() if v is not None}
        self._write_state(state or MachineState(record["state"]),
                          str(record.get("reason", "")) if reason is None else reason, **fields)
        return self._record()

    def event(self, event: str, **fields: Any) -> None:
        """Append one line to the machine's events.jsonl (a history for people, not state)."""
        line = json.dumps({"time": time.time(), "event": event, **fields})
        with contextlib.suppress(OSError):
            if self.paths.events.stat().st_size > EVENTS_MAX:  # (every command adds one)
                self._rotate_events()
        with contextlib.suppress(OSError), open(self.paths.events, "a") as f:
            f.write(line + "\n")

    def _rotate_events(self) -> None:
        """Keep events.jsonl short: the full one becomes events.1.jsonl. Under a lock on
        the file, and only if it is still the full one: two processes never both rotate
        (the second would put a one-line file over the history)."""
        with open(self.paths.events, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            st = os.fstat(f.fileno())
            if st.st_size > EVENTS_MAX and os.stat(self.paths.events).st_ino == st.st_ino:
                os.replace(self.paths.events, self.paths.old_events)

    def _alive(self) -> bool:
        handle = handle_of(self._record())
        return handle is not None and self.env.backend.alive(handle)

    async def status(self, *, holding_lock: bool = False) -> MachineStatus:
        """The machine's state, reconciled with whether its process is alive; a move
        left half-done by a command that died is finished or rolled back first.
        ``holding_lock``: the caller holds this machine's lock (``Store.locked``)."""
        return await self._status(holding=holding_lock)

    async def _status(self, *, holding: bool) -> MachineStatus:
        """``holding``: the caller holds this machine's lock, so any move recorded in
        state.json is one a dead command left (the caller's own has not begun)."""
        if not self.paths.dir.is_dir():
            raise NotFoundError("machine", self.name, "see 'pinnace ls'")
        try:
            record = read_record(self.paths.state, "")
            state = MachineState(record.get("state", ""))
        except (FileNotFoundError, StoreError, ValueError):
            return MachineStatus(self.name, S.BROKEN, f"{self.paths.state} is missing or "
                                 f"damaged; 'pinnace delete --force {self.name}' removes the "
                                 "machine")
        moving = state in MOVING or bool(record.get("busy"))
        if moving and not holding:
            lock = self.env.store.try_locked("machine", self.name)
            if lock is None:  # the command making the move lives: what it wrote is the truth
                return self._as_recorded(state, record)
            try:  # nobody holds it: look again, now that nothing can change under us
                return await self._status(holding=True)
            finally:
                lock.release()
        handle = handle_of(record)
        if handle is None and state == S.STARTING:  # killed between launch and record?
            handle = self.env.backend.find(self.paths)
        alive = handle is not None and self.env.backend.alive(handle)
        if state in LIVE and not alive:
            return await self._settle(state, record, holding=holding)
        if moving:  # holding, and the process lives: a dead command's move
            await self._recover(state, record, handle)
            return await self._status(holding=True)
        return self._as_recorded(state, record, handle if alive else None)

    def _as_recorded(self, state: MachineState, record: dict[str, Any],
                     handle: Handle | None = None) -> MachineStatus:
        if handle is None and state in LIVE:
            found = handle_of(record)
            handle = found if found is not None and self.env.backend.alive(found) else None
        return MachineStatus(self.name, state, str(record.get("reason", "")),
                             handle.pid if handle is not None and state in LIVE else None,
                             record.get("accel"), record.get("started_at"),
                             record.get("exit_code"))

    async def _settle(self, was: MachineState, record: dict[str, Any], *,
                      holding: bool) -> MachineStatus:
        """The process is gone though the record says it runs: decide what it is now,
        and record it (if no other command is changing the machine)."""
        backend = self.env.backend
        code = await backend.await_exit_status(self.paths) if handle_of(record) else None
        serial = tail(self.paths.serial_log, 200)
        if record.get("busy") == "save" and self.paths.resume.exists():
            state, reason = S.SAVED, "state saved; start resumes it"
        elif was == S.STOPPING:
            state, reason = S.STOPPED, ""
        elif was == S.STARTING and handle_of(record) is None:
            state, reason = S.FAILED, "the command starting it was interrupted; start it again"
        elif "Kernel panic" in serial:
            state, reason = S.FAILED, panic_reason(serial)
        elif code == 0:
            state, reason = S.STOPPED, "the guest powered off"
        else:
            state, reason = S.FAILED, f"QEMU {describe_exit(code)}"
        status = MachineStatus(self.name, state, reason, None, record.get("accel"),
                               record.get("started_at"), code)
        lock = None if holding else self.env.store.try_locked("machine", self.name)
        if not holding and lock is None:
            return status  # someone else is changing it; report, do not write
        try:
            if self._record() != record:  # it moved since we looked: say what it is now
                return await self._status(holding=holding) if holding else status
            await self._drop_agent()
            self._cleanup_runtime()
            if state != S.SAVED:
                self._discard_partial_save()
                self._forget_used_restore(record)
            self._write_state(state, reason, exit_code=code, accel=record.get("accel"))
        finally:
            if lock is not None:
                lock.release()
        return status

    async def _recover(self, state: MachineState, record: dict[str, Any],
                       handle: Handle | None) -> None:
        """Finish or roll back a move a dead command left (we hold the lock; the process
        is alive)."""
        backend = self.env.backend
        busy = record.get("busy")
        self.log.info("%s was left %s by a command that died; recovering", self.name,
                      busy or state)
        if state in MOVING:
            if handle is not None:
                await backend.kill(handle, self.paths)
            await self._drop_agent()
            self._cleanup_runtime()
            self._discard_partial_save()
            if state == S.STARTING:
                self._write_state(S.FAILED, "the command starting it was interrupted; start it "
                                  "again", accel=record.get("accel"))
            else:
                self._forget_used_restore(record)
                self._write_state(S.STOPPED, "the command stopping it was interrupted; it was "
                                  "killed", accel=record.get("accel"))
            return
        if busy == "save" and self.paths.resume.exists():
            # The state was saved whole (resume.json comes last): finish going down.
            if handle is not None:
                await backend.kill(handle, self.paths)
            await self._drop_agent()
            self._cleanup_runtime()
            self._write_state(S.SAVED, "state saved; start resumes it", accel=record.get("accel"))
            return
        # An interrupted save or snapshot: the guest may be left paused. Let it run again.
        self._discard_partial_save()
        if state != S.PAUSED:
            with contextlib.suppress(PinnaceError):
                if await backend.run_state(self.paths) != B.RUNNING:
                    await backend.resume(self.paths)
        self._rewrite(record, busy=None)

    def _discard_partial_save(self) -> None:
        """A saved state whose save never finished (no resume.json points at it)."""
        if not self.paths.resume.exists():
            with contextlib.suppress(FileNotFoundError):
                self.paths.saved_state.unlink()

    def _consume_restore(self, record: dict[str, Any]) -> dict[str, Any]:
        """Before a save or snapshot: a resume.json this run has already used (left by a
        command killed just after restoring) goes now, so that only the one this save
        writes can be found. Returns the record, without its ``restored`` mark."""
        if not record.get("restored"):
            return record
        self._forget_used_restore(record)
        return self._rewrite(record, restored=None)

    def _forget_used_restore(self, record: dict[str, Any]) -> None:
        """A run that began with a restore has used its resume.json: one left behind (the
        command died between recording the restore and removing it) must not be loaded
        again by the next start."""
        if record.get("restored"):
            self._discard_saved()

    def _cleanup_runtime(self) -> None:
        for p in self.paths.runtime_files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def _require(self, action: str, allowed: tuple[MachineState, ...]) -> MachineStatus:
        """The current status (call holding the lock), if its state is one ``action``
        accepts; else StateError."""
        st = await self._status(holding=True)
        if st.state not in allowed:
            raise StateError(self.name, action, str(st.state), [str(s) for s in allowed])
        return st

    @contextlib.asynccontextmanager
    async def _busy(self, what: str) -> AsyncIterator[None]:
        """Mark the machine busy with ``what`` (the guest may be paused meanwhile). The
        mark is cleared only when the work ends well: after a failure, or in a command
        that dies inside, it stays for ``_recover`` to finish or roll back."""
        self._rewrite(self._record(), busy=what)
        yield
        record = self._record()
        if record.get("busy") == what:
            self._rewrite(record, busy=None)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, wait: bool = True, timeout: float | None = None) -> MachineStatus:
        """Boot the machine; with ``wait``, return once its agent answers (state ready).
        A machine with a pending restore (from a snapshot, or saved) is restored whether
        or not ``wait`` is given: its VMM can do nothing until the state is loaded."""
        async with self._locked():
            await self._require("start", STARTABLE)
            cfg = self.config
            backend = self.env.backend
            boot = self.env.images.boot(cfg.image_digest, cfg.image)
            choice = await backend.choose_accel(cfg.accel)
            notice_accel(choice, cfg.accel)
            resume = self._resume_plan(cfg, choice.accel)
            devices = await self._claim_devices(cfg)
            spec = LaunchSpec(
                name=self.name, files=self.paths, **boot.launch_fields(),
                cpus=cfg.cpus, memory_mib=cfg.memory_mib, accel=choice.accel,
                cmdline=cfg.cmdline,
                memory_file=Path(resume["memory"]) if resume and resume.get("memory") else None,
                incoming=resume is not None, **devices,
            )
            self._cleanup_runtime()
            try:
                if self.paths.serial_log.exists():
                    self.paths.serial_log.replace(self.paths.prev_serial_log)
                with contextlib.suppress(FileNotFoundError):
                    self.paths.qemu_log.unlink()
            except OSError as exc:
                raise store_error(exc, "rotating the machine's logs") from None
            self._write_state(S.STARTING, accel=choice.accel)
            started = time.time()
            try:
                launched = await backend.launch(spec)
            except LaunchError as exc:
                self._write_state(S.FAILED, exc.message, accel=choice.accel)
                raise
            if isinstance(launched, int):
                qlog = tail(self.paths.qemu_log)
                first = qlog.strip().splitlines()[-1] if qlog.strip() else describe_exit(launched)
                self._write_state(S.FAILED, f"QEMU would not start: {first}",
                                  accel=choice.accel, exit_code=launched)
                raise LaunchError(self.name, f"QEMU would not start: {first}", command=(),
                                  exit_code=launched, log_tail=qlog)
            fields: dict[str, Any] = {"pid": launched.pid, "pid_start": launched.start_time,
                                      "accel": choice.accel, "started_at": started}
            if resume is not None:
                self._write_state(S.STARTING, **fields)
                return await self._restore(resume, launched, fields, timeout)
            self._write_state(S.STARTING if wait else S.RUNNING, **fields)
            if not wait:
                return await self._status(holding=True)
            boot_timeout = timeout if timeout is not None else cfg.boot_timeout
            try:
                await self._connect_agent(boot_timeout, alive=lambda: backend.alive(launched))
            except AgentError as exc:
                await backend.kill(launched, self.paths)
                serial = tail(self.paths.serial_log, SERIAL_TAIL_LINES)
                panic = [ln for ln in tail(self.paths.serial_log, 300).splitlines()
                         if "Kernel panic" in ln]
                if panic and panic[-1] not in serial:  # the stack dump pushed it out
                    serial = f"{panic[-1]}\n...\n{serial}"
                code = backend.exit_status(self.paths)
                self._cleanup_runtime()
                if isinstance(exc, AgentTimeout) and code in (None, 137):
                    self._write_state(S.FAILED, f"boot timed out after {boot_timeout:g} s",
                                      accel=choice.accel)
                    raise BootTimeout(self.name, boot_timeout, log_tail=serial) from None
                crashed = MachineCrashed(self.name, code, during="boot", log_tail=serial)
                self._write_state(S.FAILED, crashed.message, accel=choice.accel, exit_code=code)
                raise crashed from exc
            try:
                await self._setup_guest(self._agent, cfg, None, mounts=True)
            except (AgentError, ConnectionError, MachineError) as exc:
                await self._fail_start(launched, f"setting up the guest failed: {exc}",
                                       choice.accel)
            self._write_state(S.READY, **fields, ready_at=time.time())
            return await self._status(holding=True)

    async def _fail_start(self, launched: Handle, reason: str, accel: str | None) -> NoReturn:
        await self.env.backend.kill(launched, self.paths)
        await self._drop_agent()
        self._cleanup_runtime()
        self._write_state(S.FAILED, reason, accel=accel)
        raise MachineError(self.name, reason, log_tail=tail(self.paths.qemu_log))

    async def _claim_devices(self, cfg: MachineConfig) -> dict[str, Any]:
        """Check what the machine's devices need from the host, and take it: free host
        ports for its forwards, volumes no other running machine writes to, its NICs
        plugged into their networks' switches. Returns the LaunchSpec's device fields."""
        for p in cfg.ports:
            _check_port_free(p, self.env.store, self.name)
        volumes = []
        for v in cfg.volumes:
            vol = self.env.volumes.get(v.source)
            for other in self.env.volumes.users(v.source):
                if other == self.name:
                    continue
                om = AsyncMachine(other, self.env)
                try:
                    running = (await om.status()).state in LIVE
                    theirs = [m.ro for m in om.config.volumes if m.source == v.source]
                except PinnaceError:
                    continue  # a damaged or vanishing machine does not hold the volume
                if running and not (v.ro and all(theirs)):
                    raise ConfigError("volume", v.source, f"machine {other!r} is running with "
                                      "it; a volume is written by one machine at a time "
                                      "(attach it :ro to both to share it)")
            volumes.append((vol.image, v.ro))
        for sh in cfg.shares:
            if not Path(sh.source).is_dir():
                raise ConfigError("share", sh.source, "the host folder is gone; recreate it, "
                                  "or recreate the machine without it")
        for i, nic in enumerate(cfg.nics):
            if nic.network:
                await asyncio.to_thread(self.env.networks.register, nic.network, self.name,
                                        self.paths, i, nic.mac, nic.ip)
        nat = None
        if cfg.net != "none":
            nat = NatNic(cfg.nat_mac, restrict=cfg.net == "restricted", forwards=tuple(
                (p.proto, p.host_ip, p.host_port, p.guest_port) for p in cfg.ports))
        return {"nat": nat, "nics": tuple(n.mac for n in cfg.nics), "volumes": tuple(volumes),
                "shares": tuple((Path(sh.source), sh.ro) for sh in cfg.shares)}

    async def _setup_guest(self, agent: AgentClient | None, cfg: MachineConfig,
                           macs: dict[str, Any] | None, *, mounts: bool) -> None:
        """Give the guest its network (addresses by MAC, no DHCP) and, with ``mounts`` (a
        boot, or a clone of a ready template), mount its volumes and shares. ``macs`` are
        the MACs the NICs have now when they are not the machine's own (a clone just
        restored): the agent changes them first. A clone of a ready template
        (``macs["template"]``) starts from a known state, the NAT NIC up with NAT_GUEST
        and the others down and bare, so only what differs is sent; its guest saw the
        template's empty placeholder disks, so each volume's disk is probed again."""
        assert agent is not None
        for i, n in enumerate(cfg.nics):
            if not n.network:
                await self.env.backend.set_link(self.paths, i, False)
        known = bool((macs or {}).get("template"))
        requests = []
        routes = self._default_route(cfg)
        if cfg.net != "none":
            nat = cfg.net == "nat" and routes is None
            requests.append(self._nic_request(
                agent, (macs or {}).get("nat"), cfg.nat_mac,
                None if known else [NAT_GUEST], up=None if known else True,
                gateway=NAT_GATEWAY if nat else None, nameservers=[NAT_DNS] if nat else []))
        old = list((macs or {}).get("nics") or [])
        for i, nic in enumerate(cfg.nics):
            bare = known and not nic.network
            requests.append(self._nic_request(
                agent, old[i] if i < len(old) else None, nic.mac,
                None if bare else [nic.ip] if nic.network else [],
                up=None if bare else bool(nic.network),
                **(routes[1] if routes is not None and routes[0] == i else {})))
        if mounts:
            requests += [agent.mount("ext4", B.volume_serial(i), v.path, ro=v.ro, rescan=known)
                         for i, v in enumerate(cfg.volumes)]
            requests += [agent.mount("9p", B.share_tag(i), sh.path, ro=sh.ro)
                         for i, sh in enumerate(cfg.shares)]
        await asyncio.gather(*requests)

    def _default_route(self, cfg: MachineConfig) -> tuple[int, dict[str, Any]] | None:
        """Which NIC has the default route and name servers, and what they are: the
        first on a network with a router (or on the internet), over the NAT NIC's."""
        return next(((i, r) for i, r in ((i, self._routes(n.network)) for i, n
                                         in enumerate(cfg.nics) if n.network) if r), None)

    async def _reroute(self, agent: AgentClient, cfg: MachineConfig) -> None:
        """After the NIC with the default route left: give it to the next one that can
        have it, or back to the NAT NIC."""
        routes = self._default_route(cfg)
        if routes is not None:
            await self._nic_request(agent, None, cfg.nics[routes[0]].mac, None, up=None,
                                    **routes[1])
        elif cfg.net == "nat":
            await self._nic_request(agent, None, cfg.nat_mac, None, up=None,
                                    gateway=NAT_GATEWAY, nameservers=[NAT_DNS])

    def _routes(self, network: str) -> dict[str, Any]:
        """The default route and name servers a NIC on ``network`` brings: its router's
        (or on the internet, its core's), else none."""
        try:
            net = self.env.networks.get(network)
        except PinnaceError:
            return {}
        if net.gateway is None:
            return {}
        return {"gateway": net.gateway, "nameservers": net.nameservers}

    @staticmethod
    def _nic_request(agent: AgentClient, now: str | None, mac: str, addresses: list[str] | None,
                     *, up: bool | None, gateway: str | None = None,
                     nameservers: list[str] | None = None) -> Any:
        """set_network for the NIC whose MAC is ``now`` (or ``mac``); fields left None are
        left as they are in the guest."""
        args: dict[str, Any] = {"mac": now or mac}
        if now and now != mac:
            args["set_mac"] = mac
        if addresses is not None:
            args["addresses"] = addresses
        if up is not None:
            args["up"] = up
        if gateway:
            args["gateway"] = gateway
        if nameservers:
            args["nameservers"] = nameservers
        return agent.request("set_network", **args)

    async def connect(self, network: str, ip: str | None = None) -> str:
        """Plug a NIC into ``network`` and give it an address; return the address. A running
        machine uses a spare NIC (create it with spare_nics); one at rest gets a new NIC."""
        await self.env.networks.named(network)  # it must exist (and the name be valid)
        async with self._locked(LOCK_TIMEOUT, ("network", network)):
            st = await self._status(holding=True)
            live = st.state in (S.READY, S.RUNNING)
            if not live and (st.state not in AT_REST or self._saved_state_pending()):
                raise StateError(self.name, "connect", str(st.state),
                                 ["ready", "running", *[str(x) for x in AT_REST]])
            cfg = self.config
            if any(n.network == network for n in cfg.nics):
                raise ConfigError("network", network, f"{self.name!r} is already on it")
            self.env.networks.check_joins(network, [n.network for n in cfg.nics if n.network])
            spare = [i for i, n in enumerate(cfg.nics) if not n.network]
            if not spare and (live or cfg.snapshot):
                raise ConfigError("network", network, f"{self.name!r} has no spare NIC (its "
                                  "devices are fixed while it runs or restores a snapshot); "
                                  "create it with --spare-nics 1")
            addr = self.env.networks.allocate(network, ip, set())
            nics = list(cfg.nics)
            index = spare[0] if spare else len(nics)
            mac = nics[index].mac if spare else random_mac()
            nic = Nic(mac, network, addr)
            if spare:
                nics[index] = nic
            else:
                nics.append(nic)
            new = cfg.with_changes(nics=tuple(nics))
            write_json(self.paths.config, new.to_dict())
            if live:
                await asyncio.to_thread(self.env.networks.register, network, self.name,
                                        self.paths, index, mac, addr)
                await self.env.backend.set_link(self.paths, index, True)
                agent = await self.agent()
                routes = self._default_route(new)  # (as a boot would give it)
                await self._nic_request(agent, None, mac, [addr], up=True, **(
                    routes[1] if routes is not None and routes[0] == index else {}))
            self.event("connected", network=network, address=addr)
            return addr

    async def disconnect(self, network: str) -> None:
        """Unplug the machine's NIC from ``network``; a running machine keeps it, spare."""
        async with self._locked(LOCK_TIMEOUT, ("network", network)):
            st = await self._status(holding=True)
            cfg = self.config
            found = [i for i, n in enumerate(cfg.nics) if n.network == network]
            if not found:
                raise ConfigError("network", network, f"{self.name!r} is not on it")
            index = found[0]
            nic = cfg.nics[index]
            nics = list(cfg.nics)
            nics[index] = Nic(nic.mac)
            if st.state in (S.READY, S.RUNNING):
                agent = await self.agent()
                await self._nic_request(agent, None, nic.mac, [], up=False)
                await self.env.backend.set_link(self.paths, index, False)
                held = self._default_route(cfg)
                if held is not None and held[0] == index:
                    await self._reroute(agent, cfg.with_changes(nics=tuple(nics)))
            elif st.state not in AT_REST or self._saved_state_pending():
                raise StateError(self.name, "disconnect", str(st.state),
                                 ["ready", "running", *[str(x) for x in AT_REST]])
            await asyncio.to_thread(self.env.networks.unregister, network, self.name, index)
            write_json(self.paths.config, cfg.with_changes(nics=tuple(nics)).to_dict())
            self.event("disconnected", network=network)

    def _resume_plan(self, cfg: MachineConfig, accel: str) -> dict[str, Any] | None:
        """What the next start restores (resume.json), checked against this host; or None."""
        try:
            plan = read_record(self.paths.resume, "'pinnace halt' discards the saved state")
        except FileNotFoundError:
            return None
        except StoreError as exc:
            raise MachineError(self.name, str(exc)) from None
        want = machine_key(self.env.backend, cfg, accel)
        if plan.get("snapshot"):
            snap = self.env.snapshots.by_ref(str(plan["snapshot"]))
            verify(snap)
            changed = want.changes(snap.key)
            if changed:
                raise SnapshotError(snap.name, f"it cannot be loaded here: {'; '.join(changed)}")
        else:
            changed = want.changes(plan.get("key") or {})
            if changed:
                raise MachineError(self.name, f"its saved state does not fit this host: "
                                   f"{'; '.join(changed)}; 'pinnace halt' discards it")
            if not (self.paths.dir / str(plan.get("state"))).is_file():
                raise MachineError(self.name, "the saved state file is missing; 'pinnace halt' "
                                   "discards the saved state")
        return dict(plan)

    async def _restore(self, plan: dict[str, Any], launched: Handle,
                       fields: dict[str, Any], timeout: float | None) -> MachineStatus:
        """Load a saved state into the VMM just launched, run it, and reconnect the agent;
        a clone of a snapshot also gets its own hostname, the host's clock and fresh
        entropy, and a clone of a ready template its volumes and shares."""
        backend = self.env.backend

        def alive() -> bool:
            return backend.alive(launched)

        try:
            # Connect to the agent while the state loads: the HELLO waits in the port's
            # socket and the guest reads it as soon as its CPUs run.
            connecting = asyncio.ensure_future(AgentClient.open(
                self.paths, timeout=timeout or RESTORE_AGENT_TIMEOUT, alive=alive))
            try:
                await backend.load(self.paths, self.paths.dir / plan["state"],
                                   ignore_shared=bool(plan.get("ignore_shared")))
            except BaseException:
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await (await connecting).close()
                raise
            resumed = time.time()
            agent = await connecting
            # Send the identity and network requests now, before the WELCOME: the guest
            # reads them right after the HELLO, with no round trip in between. The clock
            # is right however long they wait: set_time carries the guest's monotonic
            # clock at the moment it resumed (``clock``, read when it was saved).
            at = anchor_from(plan.get("clock"))
            work = [asyncio.ensure_future(agent.refresh_identity(
                self.name if plan.get("snapshot") else None,
                epoch=resumed if at is not None else None, at=at))]
            if plan.get("snapshot"):
                # A clone of a ready template mounts its volumes and shares now (the
                # template had empty ones, never mounted); a named snapshot has none; a
                # machine's own saved state (no snapshot) has them mounted already.
                macs = plan.get("macs") or {}
                work.append(asyncio.ensure_future(self._setup_guest(
                    agent, self.config, macs, mounts=bool(macs.get("template")))))
            try:
                await agent.welcomed(timeout or RESTORE_AGENT_TIMEOUT, alive=alive)
                await asyncio.gather(*work)
            except BaseException:
                for task in work:  # one failed: the others must not go on talking to it
                    task.cancel()
                await asyncio.gather(*work, return_exceptions=True)
                await agent.close()
                raise
            async with self._agent_lock:
                self._agent = agent
        except (MachineError, ConnectionError, AgentError, KeyError, TypeError) as exc:
            await self._fail_start(launched, f"restoring the saved state failed: {exc}",
                                   fields.get("accel"))
        # Ready first, then the saved state goes: a command killed in between leaves a
        # running machine whose used resume.json is forgotten when it stops.
        self._write_state(S.READY, **fields, ready_at=time.time(), restored=True)
        self._discard_saved()
        return await self._status(holding=True)

    async def _connect_agent(self, timeout: float, alive: Callable[[], bool]) -> AgentClient:
        async with self._agent_lock:
            if self._agent is not None and not self._agent.closed:
                return self._agent
            self._agent = await AgentClient.connect(self.paths, timeout=timeout, alive=alive)
            return self._agent

    async def agent(self, timeout: float = 10.0) -> AgentClient:
        """The agent connection, opened on first use and kept. The state is checked every
        time (a file and /proc): a paused guest would otherwise leave a request waiting."""
        st = await self.status()
        if st.state not in (S.READY, S.RUNNING):
            raise StateError(self.name, "reach the guest agent of", str(st.state),
                             ["ready", "running"], reason=st.reason)
        return await self._connect_agent(timeout, alive=self._alive)

    async def _drop_agent(self) -> None:
        async with self._agent_lock:
            if self._agent is not None:
                await self._agent.close()
                self._agent = None

    async def stop(self, *, timeout: float = STOP_TIMEOUT, save: bool = False) -> MachineStatus:
        """Power the guest off through its agent; quit QEMU, then kill it, if that takes too long.

        With ``save``, write the running state (RAM, devices) instead: the next ``start``
        resumes exactly there, running processes and /tmp included.
        """
        if save:
            return await self._save()
        return await self._shutdown("stop", graceful=True, timeout=timeout)

    async def _save(self) -> MachineStatus:
        backend = self.env.backend
        async with self._locked():
            st = await self._require("save", UP)
            record = self._consume_restore(self._record())
            handle = handle_of(record)
            assert handle is not None
            key = machine_key(backend, self.config, st.accel or "tcg")
            reading = await self._guest_clock(st.state)
            await self._drop_agent()
            async with self._busy("save"):
                try:
                    stopped = await backend.save(self.paths, self.paths.saved_state,
                                                 ignore_shared=False)
                except MachineError as exc:
                    if st.state != S.PAUSED:
                        with contextlib.suppress(PinnaceError):
                            await backend.resume(self.paths)
                    full = self.env.store.out_of_space(self.paths.dir)
                    with contextlib.suppress(FileNotFoundError):
                        self.paths.saved_state.unlink()
                    why = "no space left on the filesystem" if full else exc.message
                    raise MachineError(self.name, "saving failed, the machine keeps running: "
                                       f"{why}", log_tail=tail(self.paths.qemu_log)) from None
                # resume.json comes last: with it, the saved state is whole. Its "state" is
                # relative to the machine's folder, which may be renamed (a snapshot's is
                # absolute: the folder's path joined with it is the snapshot's).
                write_json(self.paths.resume, {
                    "state": self.paths.cwd_path(self.paths.saved_state), "memory": None,
                    "ignore_shared": False,
                    "snapshot": "", "clock": clock_anchor(reading, stopped), "key": asdict(key)})
                await self._bring_down(handle, graceful=False, timeout=0, kill=False)
                self._cleanup_runtime()
                self._write_state(S.SAVED, "state saved; start resumes it",
                                  accel=record.get("accel"))
            return await self._status(holding=True)

    async def capture(self, stream: Path, disk: Path) -> Capture:
        """Save the running machine's whole state (RAM included) to ``stream`` and copy its
        disk to ``disk``, then let it run on: what a snapshot is made from."""
        backend = self.env.backend
        async with self._locked():
            st = await self._require("snapshot", UP)
            self._consume_restore(self._record())
            cfg = self.config
            key = machine_key(backend, cfg, st.accel or "tcg")
            reading = await self._guest_clock(st.state)
            await self._drop_agent()
            async with self._busy("snapshot"):
                try:
                    stopped = await backend.save(self.paths, stream, ignore_shared=False)
                    try:
                        await asyncio.to_thread(shutil.copyfile, self.paths.disk, disk)
                    except OSError as exc:
                        raise store_error(exc, "copying the machine's disk") from None
                finally:
                    if st.state != S.PAUSED:
                        await backend.resume(self.paths)
            return Capture(cfg, key, clock_anchor(reading, stopped))

    async def _guest_clock(self, state: MachineState) -> tuple[float, float] | None:
        """Read the guest's CLOCK_MONOTONIC before saving it (see AgentClient.monotonic);
        None when it is paused (its clock stopped earlier, at a moment not known)."""
        if state == S.PAUSED:
            return None
        try:
            agent = await self.agent(timeout=3.0)
        except PinnaceError as exc:
            self.log.debug("no clock reading before saving: %s", exc)
            return None
        return await agent.monotonic()

    async def pause(self) -> MachineStatus:
        """Stop the guest's CPUs; it keeps its memory and resumes where it was."""
        async with self._locked():
            await self._require("pause", (S.READY, S.RUNNING))
            await self.env.backend.pause(self.paths)
            record = self._record()
            self._rewrite(record, S.PAUSED, "paused; resume runs it again",
                          was=record["state"])
            return await self._status(holding=True)

    async def resume(self) -> MachineStatus:
        """Run a paused guest again."""
        async with self._locked():
            await self._require("resume", (S.PAUSED,))
            await self.env.backend.resume(self.paths)
            record = self._record()
            was = S.RUNNING if record.get("was") == str(S.RUNNING) else S.READY
            self._rewrite(record, was, "", was=None)
            return await self._status(holding=True)

    async def halt(self) -> MachineStatus:
        """Stop at once without asking the guest: QEMU quits (disk caches flushed), or is killed.
        A saved machine's saved state is discarded (it becomes stopped)."""
        async with self._locked():
            st = await self._status(holding=True)
            if st.state == S.SAVED or (st.state in AT_REST and self._saved_state_pending()):
                # (a failed resume keeps its saved state; halt is the way to drop it)
                self._discard_saved()
                self._write_state(S.STOPPED, "saved state discarded")
                return await self._status(holding=True)
            await self._require("halt", (*STOPPABLE, S.SAVED))
            return await self._down(st, graceful=False, timeout=0, kill=False)

    def _saved_state_pending(self) -> bool:
        """A resume.json of ``stop --save`` (not a snapshot's) waits for the next start."""
        try:
            return not read_record(self.paths.resume, "").get("snapshot")
        except FileNotFoundError:
            return False
        except StoreError:
            return True  # unreadable: halt is the way to be rid of it

    def _discard_saved(self) -> None:
        for p in (self.paths.resume, self.paths.saved_state):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def kill(self) -> MachineStatus:
        """SIGKILL the machine's QEMU."""
        return await self._shutdown("kill", graceful=False, timeout=0, kill=True)

    async def _shutdown(self, action: str, *, graceful: bool, timeout: float,
                        kill: bool = False) -> MachineStatus:
        async with self._locked():
            st = await self._require(action, STOPPABLE)
            return await self._down(st, graceful=graceful, timeout=timeout, kill=kill)

    async def _down(self, st: MachineStatus, *, graceful: bool, timeout: float,
                    kill: bool) -> MachineStatus:
        """Take a live machine down (holding its lock) and record it stopped."""
        record = self._record()
        handle = handle_of(record)
        assert handle is not None
        self._write_state(S.STOPPING, **{k: record[k] for k in _RUN_FIELDS if k in record})
        how = await self._bring_down(handle, graceful=graceful and st.state != S.PAUSED,
                                     timeout=timeout, kill=kill)
        await self._drop_agent()
        self._cleanup_runtime()
        self._forget_used_restore(record)
        self._write_state(S.STOPPED, how, accel=record.get("accel"),
                          exit_code=await self.env.backend.await_exit_status(self.paths))
        return await self._status(holding=True)

    async def _bring_down(self, handle: Handle, *, graceful: bool, timeout: float,
                          kill: bool) -> str:
        """Escalate: agent poweroff, QMP quit, SIGKILL. Return how it went down."""
        backend = self.env.backend
        how = "killed"
        if not kill and graceful:
            try:
                agent = await self._connect_agent(min(timeout, 3.0),
                                                  alive=lambda: backend.alive(handle))
                await agent.request("poweroff", timeout=min(timeout, 3.0))
            except AgentError as exc:
                self.log.debug("agent poweroff failed: %s", exc)
            if await backend.wait_exit(handle, timeout):
                how = "powered off by the agent"
        if not kill and how == "killed":
            if await backend.quit(self.paths, QUIT_TIMEOUT):
                if await backend.wait_exit(handle, QUIT_TIMEOUT):
                    how = "QEMU quit" if not graceful else "the guest did not power off; QEMU quit"
        if how == "killed":
            await backend.kill(handle, self.paths)
        else:  # the launcher writes the status just after the process ends: let it finish
            await backend.await_exit_status(self.paths)
        return how

    async def delete(self, *, force: bool = False) -> None:
        """Remove the machine and everything in its directory; ``force`` kills it first."""
        async with self._locked():
            st = await self._status(holding=True)
            if st.state in LIVE or st.state == S.BROKEN:
                if not force and st.state != S.BROKEN:
                    raise StateError(self.name, "delete", str(st.state),
                                     [str(s) for s in AT_REST] + ["any state, with --force"])
                handle = handle_of(self._record())
                if st.state == S.READY:
                    await self._unmount_volumes()
                if handle is not None:
                    await self.env.backend.kill(handle, self.paths)
            await self._drop_agent()
            with contextlib.suppress(PinnaceError, OSError):
                for i, nic in enumerate(self.config.nics):
                    if nic.network:
                        await asyncio.to_thread(self.env.networks.unregister, nic.network,
                                                self.name, i)
            self.env.store.remove_tree(self.paths.dir)

    async def _unmount_volumes(self) -> None:
        """Before a ready machine is killed: unmount its writable volumes, so that what the
        guest wrote to them is on them and their journals are clean (a kill loses what is
        still in the guest's page cache). A guest that does not answer soon is killed
        anyway: it is untrusted, and the kill is what was asked for."""
        paths = [v.path for v in self.config.volumes if not v.ro]
        if not paths:
            return
        try:
            agent = await self._connect_agent(UNMOUNT_TIMEOUT, alive=self._alive)
            if "unmount" in agent.capabilities:  # no umount(8) to start: a round trip
                await agent.request("unmount", timeout=UNMOUNT_TIMEOUT)
            else:  # an agent from before 0.3.0
                await asyncio.wait_for(agent.exec(["umount", *paths],
                                                  timeout=UNMOUNT_TIMEOUT),
                                       UNMOUNT_TIMEOUT + 1)
        except (TimeoutError, PinnaceError, OSError) as exc:
            log.info("%s: could not unmount its volumes before the kill: %s", self.name, exc)

    async def rename(self, new: str) -> AsyncMachine:
        """Give the machine the name ``new``, in any state but broken, running or not, and
        return a handle on it (this one then names no machine). Its folder is renamed
        under both names' locks: its VMM runs on (it names its files relative to its
        folder), config.json takes the new name, and NICs on virtual networks are plugged
        into their switches under it. Refused if a machine ``new`` exists.

        Internal: the groundwork of a warm pool (a restored clone waits under a pool name
        and is renamed when claimed); neither the sync API nor the CLI offers it. The
        guest keeps its hostname, and QEMU its ``-name``: giving it its new identity is
        the claimer's business. One thing still points at the old folder: QEMU (7.2)
        removes its pid file at exit by the absolute path it resolved when it started.
        A machine made under the old name while this VMM runs loses its pid file then,
        which only matters if a start of it dies before recording its VMM: reuse the
        old name later, or not at all."""
        validate_name("machine", new)
        store = self.env.store
        if new == self.name:
            raise ConfigError("machine name", new, "it is the machine's name already")
        if not store.socket_paths_fit(new):
            raise ConfigError("machine name", new, "it is too long for this PINNACE_HOME's "
                              "socket paths; choose a shorter name")
        while True:
            # The networks' locks are taken with the machines' (in the store's order), so
            # they are named before the config can be read under lock: look again then.
            nets = sorted({n.network for n in self.config.nics if n.network})
            async with self._locked(LOCK_TIMEOUT, ("machine", new),
                                    *(("network", n) for n in nets)):
                st = await self._status(holding=True)
                if st.state == S.BROKEN:
                    raise StateError(self.name, "rename", str(st.state),
                                     ["any state but broken"])
                cfg = self.config
                if sorted({n.network for n in cfg.nics if n.network}) != nets:
                    continue  # connected or disconnected meanwhile
                return await self._rename(new, cfg, live=st.state in LIVE)

    async def _rename(self, new: str, cfg: MachineConfig, *, live: bool) -> AsyncMachine:
        """:meth:`rename`, holding the locks."""
        store, networks = self.env.store, self.env.networks
        target = store.machine_files(new)
        if target.dir.exists():
            raise AlreadyExistsError("machine", new)
        await self._drop_agent()
        ports = [(i, nic) for i, nic in enumerate(cfg.nics) if nic.network]
        # Unplugged under the old name before the folder moves: a switch rescanning in
        # between must not bind the old paths again (it would make the old folder anew).
        # A running machine is plugged in again under the new name once it has moved;
        # one at rest is when it starts.
        for i, nic in ports:
            await asyncio.to_thread(networks.unregister, nic.network, self.name, i)
        try:
            store.put_in_place(self.paths.dir, target.dir, "the renamed machine")
        except BaseException as exc:
            if live:
                for i, nic in ports:
                    await asyncio.to_thread(networks.register, nic.network, self.name,
                                            self.paths, i, nic.mac, nic.ip)
            if isinstance(exc, FileExistsError):
                raise AlreadyExistsError("machine", new) from None
            raise
        renamed = AsyncMachine(new, self.env)
        write_json(target.config, cfg.with_changes(name=new).to_dict())
        renamed.event("renamed", was=self.name)
        if live:
            for i, nic in ports:
                await asyncio.to_thread(networks.register, nic.network, new, target, i,
                                        nic.mac, nic.ip)
        return renamed

    async def configure(self, **changes: Any) -> MachineConfig:
        """Change cpus, memory, cmdline, boot_timeout or accel; only while the machine is at rest."""
        allowed = {"cpus", "memory", "memory_mib", "cmdline", "boot_timeout", "accel"}
        unknown = set(changes) - allowed
        if unknown:
            raise ConfigError("option", sorted(unknown)[0],
                              f"configure can change {', '.join(sorted(allowed))}")
        async with self._locked():
            st = await self._require("configure", AT_REST)
            if self._saved_state_pending():
                raise StateError(self.name, "configure", f"{st.state} with a saved state",
                                 ["created", "stopped or failed without one ('pinnace halt' "
                                  "discards it)"])
            cfg = self.config.with_changes(**changes)
            write_json(self.paths.config, cfg.to_dict())
            self.event("configured", changes={k: v for k, v in changes.items() if v is not None})
            return cfg

    async def keep(self) -> MachineConfig:
        """Make a machine of ``run --rm`` (or a test session) an ordinary one: nobody
        deletes it when its owner ends, and ``gc`` leaves it alone."""
        async with self._locked():
            cfg = self.config
            if cfg.ephemeral:  # config first: killed in between, it is kept all the same
                cfg = cfg.with_changes(ephemeral=False)
                write_json(self.paths.config, cfg.to_dict())
            drop_owner(self.paths)
            self.event("kept")
            return cfg

    # -- the guest -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _guest_work(self, what: str) -> AsyncIterator[None]:
        """Around a request to the guest: if its channel closes because the machine died,
        raise MachineCrashed saying why (a kernel panic, out of memory, QEMU killed) and
        at once, rather than the bare closed channel."""
        try:
            yield
        except AgentDisconnected as exc:
            st = await self._ended()
            if st is None:
                raise
            raise MachineCrashed(self.name, st.exit_code, during=what, reason=st.reason,
                                 log_tail=self.serial_tail()) from exc

    async def _ended(self, wait: float = 3.0) -> MachineStatus | None:
        """The status of a machine whose agent channel just closed, once its VMM has
        exited (it closes the channel a moment before); None if it still runs."""
        deadline = time.monotonic() + wait
        while True:
            st = await self.status()
            if st.state not in LIVE:
                return st
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)

    def _record_command(self, argv: list[str] | str, started: float, **outcome: Any) -> None:
        """Note a guest command in events.jsonl: the machine's recent history, shown when
        a test that used it fails."""
        shown = argv if isinstance(argv, str) else shlex.join(str(a) for a in argv)
        self.event("exec", command=shown[:COMMAND_SHOWN],
                   seconds=round(time.monotonic() - started, 3), **outcome)

    async def exec(self, argv: list[str] | str, *, input: bytes | None = None,
                   timeout: float | None = 60.0, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None) -> ExecResult:
        """Run a command in the guest and return its output and exit code.

        ``argv`` as a list runs that program; as a string it runs under ``/bin/sh -c``.
        If the machine dies meanwhile, MachineCrashed says why.
        """
        agent = await self.agent()
        shell = argv if isinstance(argv, str) else None
        started = time.monotonic()
        try:
            async with self._guest_work("a command"):
                result = await agent.exec(None if shell is not None else list(argv),
                                          shell=shell, input=input, timeout=timeout, env=env,
                                          cwd=cwd, user=user)
        except (AgentError, MachineError) as exc:
            self._record_command(argv, started, error=str(exc)[:COMMAND_SHOWN])
            raise
        self._record_command(argv, started, exit_code=result.exit_code,
                             **({"timed_out": True} if result.timed_out else {}))
        return result

    async def start_process(self, argv: list[str] | str, *, stdin: bool = False,
                            pty: dict[str, Any] | None = None, timeout: float | None = None,
                            env: dict[str, str] | None = None, cwd: str | None = None,
                            user: str | None = None,
                            collect: list[str] | None = None) -> Process:
        """Start a command and stream its output: ``async for stream, data in proc``.
        ``collect``: files read back with its exit status (see AgentClient.start_exec)."""
        agent = await self.agent()
        shell = argv if isinstance(argv, str) else None
        started = time.monotonic()
        proc = agent.start_exec(None if shell is not None else list(argv), shell=shell,
                                stdin=stdin, pty=pty, timeout=timeout, env=env, cwd=cwd,
                                user=user, collect=collect)
        proc.on_exit = lambda result: self._record_command(argv, started,
                                                            exit_code=result.exit_code)
        return proc

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        agent = await self.agent(timeout)
        async with self._guest_work("a ping"):
            return await agent.request("ping", timeout=timeout)

    async def info(self, timeout: float = 10.0) -> dict[str, Any]:
        agent = await self.agent(timeout)
        async with self._guest_work("an info request"):
            return await agent.request("info", timeout=timeout)

    def address(self, network: str | Any) -> str:
        """This machine's address on ``network`` (a name, or a Network), without its
        prefix: "10.100.0.2"."""
        name = str(getattr(network, "name", network))
        for nic in self.config.nics:
            if nic.network == name:
                return nic.ip.partition("/")[0]
        raise NotFoundError("address on network", name, f"machine {self.name!r} is not on it "
                            f"(see 'pinnace ls --format json')")

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The machine's last ``limit`` events (starts, restores, commands with their exit
        codes), oldest first, from events.jsonl; damaged lines are skipped."""
        out: list[dict[str, Any]] = []
        lines = tail(self.paths.events, limit).splitlines()
        if len(lines) < limit:  # rotated a moment ago: the rest is in the old one
            lines = tail(self.paths.old_events, limit - len(lines)).splitlines() + lines
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    async def set_time(self, epoch: float | None = None) -> float:
        """Set the guest's clock (to the host's by default); return the guest's new time."""
        agent = await self.agent()
        reply = await agent.request("set_time", epoch=time.time() if epoch is None else epoch)
        return float(reply["time"])

    async def set_hostname(self, hostname: str) -> None:
        if not isinstance(hostname, str) or not HOSTNAME_RE.fullmatch(hostname):
            raise ConfigError("hostname", hostname, "use 1-63 letters, digits, '-' and '.', "
                              "starting and ending with a letter or digit")
        agent = await self.agent()
        await agent.request("set_hostname", hostname=hostname)

    async def reseed(self, nbytes: int = 64) -> None:
        """Feed the guest kernel fresh randomness from the host and reseed its CRNG."""
        agent = await self.agent()
        await agent.request("reseed", seed=base64.b64encode(os.urandom(nbytes)).decode())

    async def set_network(self, ifname: str, addresses: list[str], *, gateway: str | None = None,
                          mtu: int | None = None, nameservers: list[str] | None = None,
                          up: bool = True) -> list[dict[str, Any]]:
        """Give a guest interface static addresses ("10.77.0.5/24"), replacing its old ones;
        optionally a default route, MTU and name servers. No DHCP involved."""
        for a in [*addresses, *([gateway] if gateway else []), *(nameservers or [])]:
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                raise ConfigError("address", a, "give an IP address, with /prefix for an interface "
                                  "address (e.g. 10.77.0.5/24)") from None
        agent = await self.agent()
        reply = await agent.request("set_network", ifname=ifname, addresses=list(addresses),
                                    gateway=gateway, mtu=mtu, nameservers=nameservers or [], up=up)
        return list(reply.get("addresses") or [])

    def serial_tail(self, lines: int = SERIAL_TAIL_LINES) -> str:
        return tail(self.paths.serial_log, lines)

    async def close(self) -> None:
        """Drop this handle's agent connection (the machine keeps running)."""
        await self._drop_agent()


def panic_reason(serial: str) -> str:
    """Why a guest whose console shows a kernel panic died, in one line: the panic's
    own words (printable, cut short: they come from the guest), and whether it ran out
    of memory first."""
    # (the panic's own line, else the "---[ end Kernel panic - ... ]---" after the dump)
    panics = [ln for ln in serial.splitlines() if "Kernel panic" in ln]
    said = panics[-1].split("Kernel panic", 1)[1].lstrip(" -").removeprefix("not syncing:")
    said = said.strip().removesuffix("]---").strip()
    said = "".join(c if c.isprintable() else "?" for c in said)[:120]
    oom = "Out of memory" in serial or "oom-kill" in serial
    head = "the guest ran out of memory and its kernel panicked" if oom \
        else "the guest kernel panicked"
    return f"{head}: {said}" if said else head


def _check_port_free(p: PortForward, store: Store, me: str) -> None:
    """ConfigError naming who holds the host port of forward ``p``, if anyone does."""
    kind = socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((p.host_ip, p.host_port))
            return
        except OSError as exc:
            problem = exc.strerror or str(exc)
    holder = "another program on this host"
    for name, cfg in store.machine_configs():
        ports = cfg.get("ports") or []
        if name != me and isinstance(ports, list) and any(
                isinstance(q, dict) and q.get("host_port") == p.host_port
                and q.get("proto") == p.proto for q in ports):
            holder = f"machine {name!r}, if it is running"
    raise ConfigError("port", str(p), f"host port {p.host_ip}:{p.host_port}/{p.proto} cannot be "
                      f"used ({problem}; held by {holder}); choose another host port")


__all__ = [
    "AT_REST",
    "LIVE",
    "AsyncMachine",
    "MachineEnv",
    "MachineState",
    "MachineStatus",
    "handle_of",
    "notice_accel",
]
